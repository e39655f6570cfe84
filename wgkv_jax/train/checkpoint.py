"""Gate checkpoints: orbax steps to resume training, one safetensors file to ship, official PyTorch import.

All three hold the same params layout, the stacked gate tree of `gates.init_stacked` (every leaf
[L, ...]), and only the gates: the frozen backbone always comes from its original HF/GGUF files.

    <dir>/<step>/{gate, opt_state, meta, fingerprint}    GateCheckpointer: exact resume (orbax)
    gate.safetensors  layers.{l}.<leaf path>              export_gate_safetensors / load_gate_safetensors
    model.layers.{l}.self_attn.g_predictors.<name>       convert_official_gate (torch.save dicts)

Axis letters: l layer, k KV head, e head dim, j gate hidden units (D_in), i gate inputs (2E).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors
import safetensors.numpy

from wgkv_jax.model.config import ModelConfig

_TREE_ITEMS = ("gate", "opt_state")
_JSON_ITEMS = ("meta", "fingerprint")
_MAX_LISTED = 12  # differences listed in one error message

# --------------------------------------------------------------------------- helpers


def _json_copy(obj: Any, what: str) -> Any:
    """`obj` as it will read back from JSON (tuples become lists), or a TypeError naming `what`."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serializable (str, int, float, bool, None, lists, dicts): {e}") from e


def _key_name(entry) -> str:
    # DictKey.key, GetAttrKey.name (namedtuple fields), SequenceKey.idx: orbax stores a namedtuple
    # as a dict of its fields and a tuple as a list, so these names match the on-disk metadata.
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"mu/w1": (shape, dtype name)} for every array leaf (arrays, ShapeDtypeStructs, orbax metadata)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in flat}


def _fmt(spec: tuple[tuple[int, ...], str]) -> str:
    return f"shape {spec[0]} {spec[1]}"


def _tree_diff(stored: dict, wanted: dict, item: str) -> list[str]:
    lines = []
    for path in sorted(stored.keys() | wanted.keys()):
        s, w = stored.get(path), wanted.get(path)
        if s is None:
            lines.append(f"{item}/{path}: requested ({_fmt(w)}) but not in the checkpoint")
        elif w is None:
            lines.append(f"{item}/{path}: in the checkpoint ({_fmt(s)}) but not in the requested tree")
        elif s != w:
            lines.append(f"{item}/{path}: checkpoint has {_fmt(s)}, requested {_fmt(w)}")
    return lines


def _listing(lines: list[str]) -> str:
    more = len(lines) - _MAX_LISTED
    return "\n  " + "\n  ".join(lines[:_MAX_LISTED] + ([f"... and {more} more"] if more > 0 else []))


def _abstract(tree):
    """ShapeDtypeStructs for a tree of arrays or ShapeDtypeStructs; unsharded leaves go to the first device."""

    def one(x):
        s = x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x)
        if s.sharding is None:
            s = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        return s

    return jax.tree.map(one, tree)


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for name in _TREE_ITEMS:
        registry.add(name, ocp.args.StandardSave)
        registry.add(name, ocp.args.StandardRestore)
    for name in _JSON_ITEMS:
        registry.add(name, ocp.args.JsonSave)
        registry.add(name, ocp.args.JsonRestore)
    return registry


# --------------------------------------------------------------------------- orbax: resumable training


class GateCheckpointer:
    """Step checkpoints of one gate-training run: gate params, optimizer state and a JSON meta dict.

    Every step directory also stores `fingerprint` (what the gates were trained for: model name,
    n_layers, n_kv_heads, head_dim, gate name, ...). Opening a directory whose checkpoints carry a
    different fingerprint raises ValueError, so two runs never mix. Restores check the requested
    trees against the stored metadata first and raise ValueError naming every differing leaf;
    they never write. Saves are asynchronous in orbax and awaited before `save` returns.

        ckpt = GateCheckpointer("runs/x/checkpoints", fingerprint={"model": ..., "gate": "wgkv"})
        if ckpt.latest_step() is not None:
            gate_params, opt_state, meta = ckpt.restore(None, gate_params, opt_state)
        ckpt.save(step, gate_params, opt_state, {"step": step, "data_state": ...})

    Args:
      directory: root of the step directories (created if missing).
      fingerprint: JSON dict identifying the run's model and gate.
      max_to_keep: only the latest `max_to_keep` steps are kept.
    """

    def __init__(self, directory: str | os.PathLike, *, fingerprint: Mapping[str, Any], max_to_keep: int = 3):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep} must be >= 1")
        self.directory = Path(directory).absolute()
        self.fingerprint = _json_copy(dict(fingerprint), "fingerprint")
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            enable_async_checkpointing=True,
            create=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, handler_registry=_handler_registry())
        self._checked_for_save = False  # the directory's latest step was compared with what we save
        try:
            latest = self.latest_step()
            if latest is not None:
                self._check_fingerprint(latest)
        except BaseException:
            self._mngr.close()
            raise

    # -- queries

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    # -- save / restore

    def save(self, step: int, gate_params, opt_state, meta: Mapping[str, Any]) -> None:
        """Write step `step` and wait until it is committed; older steps beyond `max_to_keep` are deleted.

        Raises:
          TypeError: `meta` is not JSON-serializable.
          ValueError: the directory now holds another run's checkpoints (fingerprint or tree shapes
            differ from its latest step), or `step` is not above the latest saved step.
        """
        meta = _json_copy(dict(meta), "meta")
        if not self._checked_for_save:
            self._mngr.reload()  # another process may have written here since we opened the directory
            latest = self.latest_step()
            if latest is not None:
                self._check_fingerprint(latest)
                diff = self._diff_trees(latest, {"gate": gate_params, "opt_state": opt_state})
                if diff:
                    raise ValueError(
                        f"refusing to save step {step} into {self.directory}: its checkpoints (latest step "
                        f"{latest}) have differently shaped gate/optimizer trees; use another directory:"
                        + _listing(diff)
                    )
            self._checked_for_save = True
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"cannot save step {step} into {self.directory}: it already holds step {latest}, and steps must "
                "increase (retention and resume both follow the step number)"
            )
        args = ocp.args.Composite(
            gate=ocp.args.StandardSave(gate_params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
            fingerprint=ocp.args.JsonSave(self.fingerprint),
        )
        self._mngr.save(step, args=args, force=True)
        self._mngr.wait_until_finished()

    def restore(self, step: int | None, abstract_gate_params, abstract_opt_state=None):
        """Read a step (the latest when `step` is None). Returns (gate_params, opt_state, meta).

        Args:
          step: the step to read, or None for the latest.
          abstract_gate_params, abstract_opt_state: trees of ShapeDtypeStructs (or arrays, whose
            shapes, dtypes and shardings are used) giving the structure to restore into. With
            `abstract_opt_state=None` the optimizer state is not read and None is returned for it.

        Raises:
          FileNotFoundError: no checkpoint (for that step) in the directory.
          ValueError: the requested trees differ from the stored ones (every differing leaf path is
            listed with both shapes and dtypes), or the step has another run's fingerprint.
        """
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no gate checkpoint in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no gate checkpoint for step {step} in {self.directory}; it holds steps {steps}")
        self._check_fingerprint(step)
        wanted = {"gate": _abstract(abstract_gate_params)}
        if abstract_opt_state is not None:
            wanted["opt_state"] = _abstract(abstract_opt_state)
        diff = self._diff_trees(step, wanted)
        if diff:
            raise ValueError(
                f"cannot restore step {step} of {self.directory}: the requested trees differ from the checkpoint "
                "(was it written for another gate, expand or model?):" + _listing(diff)
            )
        args = {name: ocp.args.StandardRestore(tree) for name, tree in wanted.items()}
        out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
        return out["gate"], (out["opt_state"] if "opt_state" in wanted else None), out["meta"]

    def close(self) -> None:
        """Wait for pending saves and release orbax's background resources."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- checks (read-only)

    def _check_fingerprint(self, step: int) -> None:
        try:
            stored = self._mngr.restore(step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore()))
            stored = stored["fingerprint"]
        except Exception as e:
            raise ValueError(
                f"{self.directory} step {step} has no readable gate fingerprint (not written by GateCheckpointer?); "
                "use another directory"
            ) from e
        if stored == self.fingerprint:
            return
        ours, missing = self.fingerprint, "<missing>"
        lines = [
            f"{key}: checkpoint has {stored.get(key, missing)!r}, this run has {ours.get(key, missing)!r}"
            for key in sorted(stored.keys() | ours.keys())
            if stored.get(key, missing) != ours.get(key, missing)
        ]
        raise ValueError(
            f"{self.directory} holds checkpoints of a different run (step {step}); use another directory, "
            "or delete it to start over:" + _listing(lines)
        )

    def _diff_trees(self, step: int, trees: dict[str, Any]) -> list[str]:
        stored = self._mngr.item_metadata(step)
        lines = []
        for name, tree in trees.items():
            item = stored.get(name)
            if item is None:
                lines.append(f"{name}: not in the checkpoint")
                continue
            lines += _tree_diff(_leaf_specs(item.tree), _leaf_specs(tree), name)
        return lines


# --------------------------------------------------------------------------- safetensors: one shippable file

_FORMAT = "wgkv_jax.gate/1"
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def _flat_names(gate_params) -> dict[str, Any]:
    """{"pre_k_norm.weight": leaf} for a nested dict of arrays."""
    flat, _ = jax.tree_util.tree_flatten_with_path(gate_params)
    out = {}
    for path, leaf in flat:
        parts = [_key_name(k) for k in path]
        if any("." in p for p in parts):
            raise ValueError(f"gate param path {parts} contains '.', which safetensors keys use as separator")
        out[".".join(parts)] = leaf
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _gate_dims(layer_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, int | None]:
    """(n_kv_heads, head_dim) of one layer's gate: norms are [E]; every other leaf starts with [K]."""
    head_dims = {s[-1] for n, s in layer_shapes.items() if n.endswith("_norm.weight")}
    heads = {s[0] for n, s in layer_shapes.items() if not n.endswith("_norm.weight") and s}
    return (heads.pop() if len(heads) == 1 else None), (head_dims.pop() if len(head_dims) == 1 else None)


def export_gate_safetensors(path: str | os.PathLike, gate_params, meta: Mapping[str, Any]) -> None:
    """Write stacked gate params as one safetensors file: one tensor per layer and leaf, `layers.{l}.<path>`.

    `meta` (JSON: gate/model config, metrics, ...) goes JSON-encoded into the file's metadata under
    "meta". The file is written next to `path` and renamed, so a crash never leaves half a file.
    """
    path = Path(path)
    meta_json = json.dumps(_json_copy(dict(meta), "meta"))
    flat = {name: np.asarray(jax.device_get(x)) for name, x in _flat_names(gate_params).items()}
    n_layers = {x.shape[0] if x.ndim else None for x in flat.values()}
    if len(n_layers) != 1 or None in n_layers:
        shapes = {name: x.shape for name, x in flat.items()}
        raise ValueError(f"gate params must all have the same leading [n_layers] axis; got {shapes}")
    (L,) = n_layers
    tensors = {f"layers.{l}.{name}": np.ascontiguousarray(x[l]) for l in range(L) for name, x in flat.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    safetensors.numpy.save_file(tensors, str(tmp), metadata={"format": _FORMAT, "meta": meta_json})
    os.replace(tmp, path)


def load_gate_safetensors(path: str | os.PathLike, model_cfg: ModelConfig | None = None):
    """Read a file of `export_gate_safetensors`. Returns (stacked gate params, meta dict).

    With `model_cfg`, the gates must fit it: n_layers, n_kv_heads and head_dim are checked and a
    ValueError names each difference with both values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gate checkpoint not found: {path}")
    per_layer: dict[int, dict[str, np.ndarray]] = {}
    with safetensors.safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a wgkv_jax gate file (metadata format {metadata.get('format')!r})")
        for key in f.keys():
            m = _LAYER_KEY.fullmatch(key)
            if m is None:
                raise ValueError(f"{path}: unexpected tensor {key!r}; gate files hold only layers.<l>.<name>")
            per_layer.setdefault(int(m[1]), {})[m[2]] = f.get_tensor(key)
    L = len(per_layer)
    if L == 0 or sorted(per_layer) != list(range(L)):
        raise ValueError(f"{path}: gate layers must be numbered 0..n-1, found {sorted(per_layer)}")
    shapes = {name: x.shape for name, x in per_layer[0].items()}
    for l in range(1, L):
        if {name: x.shape for name, x in per_layer[l].items()} != shapes:
            raise ValueError(f"{path}: layer {l} holds different tensors or shapes than layer 0")
    if model_cfg is not None:
        n_kv_heads, head_dim = _gate_dims(shapes)
        problems = [
            f"the gate checkpoint has {unit.format(ours)}, the model has {unit.format(theirs)}"
            for unit, ours, theirs in (
                ("{} layers", L, model_cfg.n_layers),
                ("{} KV heads", n_kv_heads, model_cfg.n_kv_heads),
                ("head_dim {}", head_dim, model_cfg.head_dim),
            )
            if ours != theirs
        ]
        if problems:
            raise ValueError(f"{path} does not fit the model {model_cfg.name!r}: " + "; ".join(problems))
    stacked = {name: jnp.asarray(np.stack([per_layer[l][name] for l in range(L)])) for name in shapes}
    return _unflatten(stacked), json.loads(metadata.get("meta", "{}"))


# --------------------------------------------------------------------------- official PyTorch gates

_OFFICIAL_PREFIX = "model.layers.{l}.self_attn.g_predictors."
_OFFICIAL_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.self_attn\.g_predictors\.(.+)")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; bfloat16 has no numpy dtype, so cast in torch first
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, np.float32)


def convert_official_gate(state_dict_or_path, model_cfg: ModelConfig, expand: float = 4.0) -> dict:
    """Stacked params of `gates.make("wgkv", model_cfg, expand=expand)` from an official WG-KV checkpoint.

    The official gate of layer l (reference/wgkv.md section 2.3) holds, under
    `model.layers.{l}.self_attn.g_predictors.` (any prefix before `layers.` is accepted), with
    H = n_kv_heads, d = head_dim, D_in = int(d * expand):

        pre_key_norm.weight  [d]             -> pre_k_norm/weight [L, E]
        post_key_norm.weight [d]             -> post_k_norm/weight [L, E]
        conv1.weight  [H*D_in, 2d, 1]        -> w1 [L, K, J, I]   (groups=H: output block h is head h)
        conv1.bias    [H*D_in]               -> b1 [L, K, J]
        conv2.weight  [H, D_in, 1]           -> w2 [L, K, J]
        conv2.bias    [H]                    -> b2 [L, K]

    Args:
      state_dict_or_path: a dict of torch tensors or numpy arrays, or the path of a `torch.save`
        file (read with `weights_only=True`; torch is imported only then).
      model_cfg: the model the gates were trained for. expand: D_in / head_dim of the checkpoint.

    Returns: the gate params tree, float32, every leaf stacked on a leading [n_layers] axis.

    Raises:
      FileNotFoundError: the path does not exist.
      ValueError: tensors missing, unexpected or of the wrong shape (all listed).
    """
    state_dict = _official_state_dict(state_dict_or_path)
    L, K, E = model_cfg.n_layers, model_cfg.n_kv_heads, model_cfg.head_dim
    J = int(E * expand)
    expected = {
        "pre_key_norm.weight": (E,),
        "post_key_norm.weight": (E,),
        "conv1.weight": (K * J, 2 * E, 1),
        "conv1.bias": (K * J,),
        "conv2.weight": (K, J, 1),
        "conv2.bias": (K,),
    }
    found: dict[tuple[int, str], np.ndarray] = {}
    problems = []
    for key, value in state_dict.items():
        m = _OFFICIAL_KEY.fullmatch(key)
        if m is None or m[2] not in expected:
            problems.append(f"unexpected tensor {key!r}")
        elif int(m[1]) >= L:
            problems.append(f"unexpected tensor {key!r}: the model has {L} layers")
        elif (int(m[1]), m[2]) in found:
            problems.append(f"duplicate tensor {key!r} for layer {m[1]}")
        else:
            x = _to_numpy(value)
            if x.shape != expected[m[2]]:
                problems.append(
                    f"{key}: shape {x.shape}, expected {expected[m[2]]} "
                    f"(n_kv_heads={K}, head_dim={E}, D_in=int(head_dim*expand)={J})"
                )
            found[int(m[1]), m[2]] = x
    problems += [
        f"missing tensor {_OFFICIAL_PREFIX.format(l=l) + name!r}"
        for l in range(L)
        for name in expected
        if (l, name) not in found
    ]
    if problems:
        raise ValueError(
            f"official gate checkpoint does not match {model_cfg.name!r} ({L} layers) with expand={expand}:"
            + _listing(problems)
        )

    def stack(name: str, shape: tuple[int, ...]) -> jax.Array:
        return jnp.asarray(np.stack([found[l, name].reshape(shape) for l in range(L)]), jnp.float32)

    return {
        "pre_k_norm": {"weight": stack("pre_key_norm.weight", (E,))},
        "post_k_norm": {"weight": stack("post_key_norm.weight", (E,))},
        "w1": stack("conv1.weight", (K, J, 2 * E)),
        "b1": stack("conv1.bias", (K, J)),
        "w2": stack("conv2.weight", (K, J)),
        "b2": stack("conv2.bias", (K,)),
    }


def _official_state_dict(state_dict_or_path) -> Mapping[str, Any]:
    if isinstance(state_dict_or_path, Mapping):
        return state_dict_or_path
    path = Path(state_dict_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"official gate checkpoint not found: {path}")
    import torch  # lazy: torch is an optional extra, needed only for .pt files

    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state_dict).__name__}")
    return state_dict


__all__ = ["GateCheckpointer", "convert_official_gate", "export_gate_safetensors", "load_gate_safetensors"]
