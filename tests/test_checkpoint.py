"""Gate checkpoints: exact orbax resume, safetensors export, official PyTorch conversion."""

from __future__ import annotations

import dataclasses
import hashlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors
from conftest import TINY_LLAMA

from wgkv_jax import gates, sharding
from wgkv_jax.train.checkpoint import (
    GateCheckpointer,
    convert_official_gate,
    export_gate_safetensors,
    load_gate_safetensors,
)
from wgkv_jax.train.step import make_optimizer

CFG = TINY_LLAMA  # 2 layers, 2 KV heads, head_dim 16
EXPAND = 2.0


def fingerprint(cfg=CFG, gate="wgkv", expand=EXPAND) -> dict:
    return {
        "model": cfg.name,
        "n_layers": cfg.n_layers,
        "n_kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "gate": gate,
        "expand": expand,
    }


def gate_and_params(name="wgkv", expand=EXPAND, seed=0):
    gate = gates.make(name, CFG, expand=expand)
    return gate, gates.init_stacked(gate, CFG, jax.random.PRNGKey(seed))


def keys_btke(b=2, t=5, seed=0):
    rng = np.random.default_rng(seed)
    shape = (b, t, CFG.n_kv_heads, CFG.head_dim)
    return jnp.asarray(rng.normal(size=shape), jnp.float32), jnp.asarray(rng.normal(size=shape), jnp.float32)


def toy_trainer(gate, optimizer):
    """A jitted optimizer step on a toy loss through every layer's gate (same executable for every caller)."""
    k_pre, k_post = keys_btke()
    target_bkt = jnp.linspace(0.05, 0.95, 2 * 2 * 5).reshape(2, 2, 5)  # [B, K, T] of keys_btke()

    def loss(gate_params):
        g_lbkt = jax.vmap(lambda p: gate.apply({"params": p}, k_pre, k_post, k_post))(gate_params)
        return jnp.mean((g_lbkt - target_bkt) ** 2)

    @jax.jit
    def step(gate_params, opt_state):
        grads = jax.grad(loss)(gate_params)
        updates, opt_state = optimizer.update(grads, opt_state, gate_params)
        return optax.apply_updates(gate_params, updates), opt_state

    return step


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def file_digests(root) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture
def trained():
    """Gate params and AdamW state after two updates (non-trivial mu, nu and count)."""
    gate, params = gate_and_params()
    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    opt_state = optimizer.init(params)
    step = toy_trainer(gate, optimizer)
    for _ in range(2):
        params, opt_state = step(params, opt_state)
    return params, opt_state


META = {"step": 7, "data_state": {"epoch": 1, "pos": [3, 1, 2]}, "config": {"lr": 1e-3, "out": None}, "loss": 0.25}


# ----------------------------------------------------------------------------- orbax


def test_orbax_roundtrip_is_exact(tmp_path, trained):
    params, opt_state = trained
    with GateCheckpointer(tmp_path / "ckpt", fingerprint=fingerprint()) as ckpt:
        assert ckpt.latest_step() is None
        ckpt.save(7, params, opt_state, META)
    abstract = jax.eval_shape(lambda: trained)
    with GateCheckpointer(tmp_path / "ckpt", fingerprint=fingerprint()) as ckpt:
        assert ckpt.latest_step() == 7
        got_params, got_opt, meta = ckpt.restore(None, *abstract)
        assert_trees_equal(got_params, params)
        assert_trees_equal(got_opt, opt_state)  # namedtuples (ScaleByAdamState, ...) come back as such
        assert meta == META
        only_gate, no_opt, _ = ckpt.restore(7, params)  # concrete arrays work as targets too
        assert no_opt is None
        assert_trees_equal(only_gate, params)
        # As in fit(): targets replicated over a data-parallel mesh come back with that sharding.
        rep = sharding.replicated(sharding.make_mesh(model=1))
        got_params, got_opt, _ = ckpt.restore(7, *jax.device_put(trained, rep))
        assert all(x.sharding == rep for x in jax.tree.leaves((got_params, got_opt)))
        assert_trees_equal(got_opt, opt_state)


def test_retention_keeps_the_last_n(tmp_path, trained):
    params, opt_state = trained
    with GateCheckpointer(tmp_path, fingerprint=fingerprint(), max_to_keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, params, opt_state, {"step": step})
        assert ckpt.all_steps() == [3, 4]
        with pytest.raises(ValueError, match=r"cannot save step 3 .* already holds step 4"):
            ckpt.save(3, params, opt_state, {"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["3", "4"]
    with GateCheckpointer(tmp_path, fingerprint=fingerprint(), max_to_keep=2) as ckpt:
        assert ckpt.latest_step() == 4
        assert ckpt.restore(3, params, opt_state)[2] == {"step": 3}
        with pytest.raises(FileNotFoundError, match=r"step 1 .*\[3, 4\]"):
            ckpt.restore(1, params, opt_state)


def test_mismatching_restore_raises_and_leaves_the_checkpoint_intact(tmp_path, trained):
    params, opt_state = trained
    ckpt = GateCheckpointer(tmp_path, fingerprint=fingerprint())
    ckpt.save(1, params, opt_state, {"step": 1})
    before = file_digests(tmp_path)

    _, wider = gate_and_params(expand=4.0)  # w1 [L, K, 64, 32] instead of [L, K, 32, 32]
    with pytest.raises(
        ValueError, match=r"gate/w1: checkpoint has shape \(2, 2, 32, 32\) float32, requested shape \(2, 2, 64, 32\)"
    ):
        ckpt.restore(None, wider, optax.adamw(1e-2).init(wider))
    _, linear = gate_and_params("linear")
    with pytest.raises(ValueError, match=r"gate/w1: in the checkpoint .* but not in the requested tree") as e:
        ckpt.restore(None, linear)
    assert "gate/w: requested (shape (2, 2, 32) float32) but not in the checkpoint" in str(e.value)
    as_bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
    with pytest.raises(
        ValueError, match=r"gate/b2: checkpoint has shape \(2, 2\) float32, requested shape \(2, 2\) bfloat16"
    ):
        ckpt.restore(None, as_bf16)
    with pytest.raises(ValueError, match=r"opt_state/0/count"):
        ckpt.restore(None, params, optax.sgd(1e-2, momentum=0.9).init(params))

    assert file_digests(tmp_path) == before
    assert ckpt.all_steps() == [1]
    got_params, got_opt, _ = ckpt.restore(None, params, opt_state)
    assert_trees_equal(got_params, params)
    assert_trees_equal(got_opt, opt_state)
    ckpt.close()


def test_a_directory_of_another_run_is_refused(tmp_path, trained):
    params, opt_state = trained
    with GateCheckpointer(tmp_path, fingerprint=fingerprint()) as ckpt:
        ckpt.save(1, params, opt_state, {"step": 1})
    before = file_digests(tmp_path)
    with pytest.raises(ValueError, match=r"different run .*\n  gate: checkpoint has 'wgkv', this run has 'linear'"):
        GateCheckpointer(tmp_path, fingerprint=fingerprint(gate="linear"))
    with pytest.raises(ValueError, match=r"n_layers: checkpoint has 2, this run has 30"):
        GateCheckpointer(tmp_path, fingerprint=fingerprint(cfg=dataclasses.replace(CFG, n_layers=30)))
    # A checkpointer opened on an empty directory re-checks at its first save.
    other = GateCheckpointer(tmp_path / "late", fingerprint=fingerprint(expand=4.0))
    with GateCheckpointer(tmp_path / "late", fingerprint=fingerprint()) as ckpt:
        ckpt.save(1, params, opt_state, {"step": 1})
    with pytest.raises(ValueError, match=r"expand: checkpoint has 2.0, this run has 4.0"):
        other.save(2, params, opt_state, {"step": 2})
    other.close()
    with (
        GateCheckpointer(tmp_path, fingerprint=fingerprint()) as ckpt,
        pytest.raises(TypeError, match="meta must be JSON"),
    ):
        ckpt.save(2, params, opt_state, {"x": np.zeros(2)})
    assert {k: v for k, v in file_digests(tmp_path).items() if not k.startswith("late")} == before


def test_stop_and_resume_is_bitwise_identical(tmp_path):
    gate, init = gate_and_params(seed=3)
    optimizer = make_optimizer(lr=1e-2, weight_decay=0.1, steps=6, warmup_frac=0.34)  # the schedule reads count
    step = toy_trainer(gate, optimizer)

    params, opt_state = init, optimizer.init(init)
    for _ in range(6):
        params, opt_state = step(params, opt_state)

    resumed, resumed_opt = init, optimizer.init(init)
    for _ in range(3):
        resumed, resumed_opt = step(resumed, resumed_opt)
    with GateCheckpointer(tmp_path, fingerprint=fingerprint()) as ckpt:
        ckpt.save(3, resumed, resumed_opt, {"step": 3})
    del resumed, resumed_opt
    fresh = gates.init_stacked(gate, CFG, jax.random.PRNGKey(99))  # a new process builds its trees anew
    with GateCheckpointer(tmp_path, fingerprint=fingerprint()) as ckpt:
        resumed, resumed_opt, meta = ckpt.restore(None, fresh, optimizer.init(fresh))
    for _ in range(meta["step"], 6):
        resumed, resumed_opt = step(resumed, resumed_opt)

    assert_trees_equal(resumed, params)
    assert_trees_equal(resumed_opt, opt_state)


# ----------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("name", sorted(gates.GATES))
def test_safetensors_roundtrip_is_exact(tmp_path, name):
    _, params = gate_and_params(name, seed=1)
    meta = {"config": {"gate": name, "expand": EXPAND, "corpora": ["sotu", "kjv"]}, "val_distill": 0.125, "step": 10}
    path = tmp_path / "out" / "gate.safetensors"
    export_gate_safetensors(path, params, meta)
    got, got_meta = load_gate_safetensors(path, CFG)
    assert_trees_equal(got, params)
    assert got_meta == meta
    with safetensors.safe_open(str(path), framework="numpy") as f:
        names = set(f.keys())
        assert all(isinstance(v, str) for v in f.metadata().values())
    assert names == {f"layers.{l}.{k}" for l in range(CFG.n_layers) for k in _flat_keys(params)}
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temporary file left behind


def _flat_keys(params) -> set[str]:
    return {".".join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_safetensors_layout_is_per_layer(tmp_path):
    _, params = gate_and_params()
    export_gate_safetensors(tmp_path / "g.safetensors", params, {})
    with safetensors.safe_open(str(tmp_path / "g.safetensors"), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("layers.1.w1"), np.asarray(params["w1"][1]))
        assert f.get_tensor("layers.0.pre_k_norm.weight").shape == (CFG.head_dim,)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_layers": 3}, "gate checkpoint has 2 layers, the model has 3"),
        ({"n_kv_heads": 1}, "gate checkpoint has 2 KV heads, the model has 1"),
        ({"head_dim": 8}, "gate checkpoint has head_dim 16, the model has head_dim 8"),
    ],
    ids=["n_layers", "n_kv_heads", "head_dim"],
)
def test_safetensors_rejects_another_model(tmp_path, change, message):
    _, params = gate_and_params()
    export_gate_safetensors(tmp_path / "g.safetensors", params, {"a": 1})
    with pytest.raises(ValueError, match=message):
        load_gate_safetensors(tmp_path / "g.safetensors", dataclasses.replace(CFG, **change))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.safetensors"))):
        load_gate_safetensors(tmp_path / "nope.safetensors")


# ----------------------------------------------------------------------------- official PyTorch gates


def official_gate_model(cfg, expand, seed=0):
    """The paper's gate in PyTorch, one per layer, named as in the official checkpoints."""
    import torch

    nn = torch.nn

    class GatingRMSNorm(nn.Module):
        def __init__(self, d, eps=1e-6):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

        def forward(self, x):
            x32 = x.float()
            return self.weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))

    class Gate(nn.Module):
        def __init__(self, n_heads, head_dim, expand):
            super().__init__()
            d_in = int(head_dim * expand)
            self.pre_key_norm, self.post_key_norm = GatingRMSNorm(head_dim), GatingRMSNorm(head_dim)
            self.conv1 = nn.Conv1d(n_heads * 2 * head_dim, n_heads * d_in, 1, groups=n_heads)
            self.conv2 = nn.Conv1d(n_heads * d_in, n_heads, 1, groups=n_heads)

        def forward(self, pre_k_bhtd, post_k_bhtd):  # -> g [B, H, T]
            x_bhti = torch.cat([self.pre_key_norm(pre_k_bhtd), self.post_key_norm(post_k_bhtd)], dim=-1)
            b, h, t, i = x_bhti.shape
            x_bct = x_bhti.permute(0, 1, 3, 2).reshape(b, h * i, t)  # channels of head h: [h*2d, (h+1)*2d)
            return torch.sigmoid(self.conv2(nn.functional.gelu(self.conv1(x_bct))))

    torch.manual_seed(seed)
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList()
    for _ in range(cfg.n_layers):
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.g_predictors = Gate(cfg.n_kv_heads, cfg.head_dim, expand)
        with torch.no_grad():  # norm weights start at 1; make them matter
            for norm in (layer.self_attn.g_predictors.pre_key_norm, layer.self_attn.g_predictors.post_key_norm):
                norm.weight.uniform_(0.5, 1.5)
        root.model.layers.append(layer)
    return torch, root


def test_official_gate_converts_exactly(tmp_path):
    expand = 1.5
    torch, official = official_gate_model(CFG, expand)
    torch.save(official.state_dict(), tmp_path / "llama-0.16.pt")
    stacked = convert_official_gate(tmp_path / "llama-0.16.pt", CFG, expand)
    gate = gates.make("wgkv", CFG, expand=expand)
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(
        jnp.shape, jax.eval_shape(lambda: gates.init_stacked(gate, CFG, jax.random.PRNGKey(0)))
    )
    k_pre, k_post = keys_btke(b=2, t=7, seed=5)
    for l in range(CFG.n_layers):
        ours_bkt = gate.apply({"params": jax.tree.map(lambda x, l=l: x[l], stacked)}, k_pre, k_post, k_post)
        with torch.no_grad():
            ref_bht = official.model.layers[l].self_attn.g_predictors(
                torch.from_numpy(np.array(k_pre)).transpose(1, 2),
                torch.from_numpy(np.array(k_post)).transpose(1, 2),
            )
        np.testing.assert_allclose(np.asarray(ours_bkt), ref_bht.numpy(), rtol=0, atol=1e-5)
    # numpy state dicts convert the same
    numpy_sd = {k: v.numpy() for k, v in official.state_dict().items()}
    assert_trees_equal(convert_official_gate(numpy_sd, CFG, expand), stacked)


def test_official_gate_errors_name_the_tensors(tmp_path):
    _, official = official_gate_model(CFG, 2.0)
    sd = {k: v.numpy() for k, v in official.state_dict().items()}
    prefix = "model.layers.1.self_attn.g_predictors."

    missing = {k: v for k, v in sd.items() if k != prefix + "conv1.bias"}
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.self_attn\.g_predictors\.conv1\.bias'"):
        convert_official_gate(missing, CFG, 2.0)
    extra = {**sd, "model.layers.2.self_attn.g_predictors.conv2.bias": sd[prefix + "conv2.bias"], "lm_head.weight": 0}
    with pytest.raises(ValueError, match=r"the model has 2 layers[\s\S]*unexpected tensor 'lm_head.weight'"):
        convert_official_gate(extra, CFG, 2.0)
    with pytest.raises(ValueError, match=r"conv1\.weight: shape \(64, 32, 1\), expected \(128, 32, 1\)"):
        convert_official_gate(sd, CFG, 4.0)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.pt"))):
        convert_official_gate(tmp_path / "missing.pt", CFG, 2.0)
