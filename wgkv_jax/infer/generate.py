"""Autoregressive generation with a static-shape, donated KV cache: full or WG-KV dual.

Shapes are bucketed so a new prompt length costs a compile only when it crosses a bucket:
prompts are padded to a power of two, the full cache to a multiple of `CACHE_ALIGN`.
Two loops share the same jitted decode step: `lax.while_loop` entirely on device (default),
or a host loop that hands every new token to a callback (streaming).

Full cache: prompts are right-padded and prefilled in one call (slot == position).
Dual cache (`cache=CacheConfig(...)`): prompts are left-padded (pads get negative positions
and are never stored) and prefilled in chunks, each chunk attending to the cache and itself,
so every row's positions stay contiguous and all rows finish the prompt at the same index.

Axis letters: b batch, t time, n generated-token index.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wgkv_jax import policies, sharding
from wgkv_jax.cache import evict
from wgkv_jax.cache import paged as paged_store
from wgkv_jax.cache.admission import Admission
from wgkv_jax.cache.cascading import CascadeAttend, CascadeConfig, CascadingCache
from wgkv_jax.cache.dual import CacheConfig, CapacityError, DualAttend, DualCache
from wgkv_jax.cache.full import DecodeKVCache, FullAttend, KVCache, decode_attend, prefill_attend
from wgkv_jax.cache.paged import PagedDualCache
from wgkv_jax.cache.per_layer import PerLayerCache, wrap_attend
from wgkv_jax.infer.sampling import SamplingConfig, sample
from wgkv_jax.kernels import dispatch
from wgkv_jax.model.config import ModelConfig
from wgkv_jax.model.transformer import Params, hidden_states, lm_head

MIN_PROMPT_BUCKET = 16
CACHE_ALIGN = 256


class ContextLengthError(ValueError):
    """A prompt does not fit the model's context window."""


def prompt_bucket(n: int) -> int:
    """Smallest power of two >= n (at least MIN_PROMPT_BUCKET)."""
    return max(MIN_PROMPT_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def length_bucket(n: int) -> int:
    """n rounded up on a grid of 8 steps per power of two (the dual cache's capacity bucket):
    at most 12.5% over n, and a compile only every such step."""
    step = 1 << max((n - 1).bit_length() - 4, 0)
    return -(-n // step) * step


def cache_bucket(n: int) -> int:
    return -(-n // CACHE_ALIGN) * CACHE_ALIGN


@dataclasses.dataclass
class CacheStats:
    """KV-cache accounting at the end of generation (all rows together).

    Attributes:
      kind: "full", "dual" or "cascading".
      allocated_bytes: bytes of the K/V buffers allocated (static shapes: ring + capacity).
      full_cache_bytes: bytes a full cache would need for exactly the same tokens.
      stored_entries: K/V entries (one per layer, row, KV head, token) held at the end.
      full_entries: entries a full cache holds for the same tokens.
      kv_ratio: the paper's ratio, per layer/head (W + global entries) / tokens, averaged
        (the local region counts whole, as in the reference profiler, once the sequence fills it:
        min(W, tokens), so a sequence shorter than W has ratio 1, not W / tokens).
      admission_per_layer: admitted fraction of the tokens that left the window, per layer.
      evicted: admitted entries dropped because the global store was full.
      policy_evicted: admitted entries an eviction policy removed after the prompt.
      capacity, window: the static sizes used (0 for a full cache).
      global_lengths: used global slots per [layer][row][KV head] (dual cache; empty for full).
    """

    kind: str
    allocated_bytes: int
    full_cache_bytes: int
    stored_entries: int
    full_entries: int
    kv_ratio: float
    admission_per_layer: list[float]
    evicted: int
    policy_evicted: int = 0
    capacity: int = 0
    window: int = 0
    global_lengths: list = dataclasses.field(default_factory=list)

    @property
    def stored_fraction(self) -> float:
        return self.stored_entries / max(self.full_entries, 1)

    def summary(self) -> str:
        """A compact one-paragraph report for the terminal."""
        mib = 2**20
        text = (
            f"KV entries {self.stored_entries:,} of {self.full_entries:,} ({100 * self.stored_fraction:.1f}%), "
            f"kv ratio {self.kv_ratio:.3f} | allocated {self.allocated_bytes / mib:.2f} MiB "
            f"vs full {self.full_cache_bytes / mib:.2f} MiB"
        )
        if self.kind == "dual":
            rates = " ".join(f"{100 * r:.0f}" for r in self.admission_per_layer)
            text += f" | W={self.window} C={self.capacity}, evicted {self.evicted}"
            if self.policy_evicted:
                text += f", evicted by the policy {self.policy_evicted:,}"
            text += f"\nadmitted % per layer: {rates}"
        return text


@dataclasses.dataclass
class GenerationResult:
    """What `generate` returns.

    Attributes:
      texts: decoded continuations (EOS and later tokens removed).
      tokens: generated ids per prompt (EOS excluded).
      prompt_tokens: prompt ids per prompt (after the chat template).
      finished: True where the row stopped on an EOS token.
      prefill_s, decode_s: wall time of the prefill and of the decode loop (compilation included
        on the first call of a shape bucket).
      cache_bytes: bytes of the allocated KV cache.
      cache_stats: what the cache holds at the end (see `CacheStats`).
    """

    texts: list[str]
    tokens: list[list[int]]
    prompt_tokens: list[list[int]]
    finished: list[bool]
    prefill_s: float
    decode_s: float
    cache_bytes: int
    cache_stats: CacheStats | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        n = sum(len(t) for t in self.tokens)
        return n / self.decode_s if self.decode_s > 0 else float("nan")


# ----------------------------------------------------------------------------- jitted pieces


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "attend"), donate_argnames=("cache",))
def prefill(
    params: Params, cfg: ModelConfig, cache: KVCache, tokens_bt, lengths_b, key, sampling: SamplingConfig,
    attend: FullAttend = prefill_attend,
):  # fmt: skip
    """Run the (right-padded) prompts, fill the cache, sample each row's first new token."""
    b, t = tokens_bt.shape
    pos_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    with jax.named_scope("prefill"):
        h_btd, cache = hidden_states(params, cfg, tokens_bt, pos_bt, attend=attend, state=cache)
    h_last_b1d = h_btd[jnp.arange(b), lengths_b - 1][:, None]
    logits_bv = lm_head(params, cfg, h_last_b1d)[:, 0]
    return sample(logits_bv, key, sampling), cache


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "attend"), donate_argnames=("cache",))
def prefill_chunk(params: Params, cfg: ModelConfig, cache, tokens_bt, pos_bt, key, sampling, attend):
    """One prefill chunk on a dual cache; samples from every row's last position (the prompt end
    on the final chunk, since prompts are left-padded)."""
    with jax.named_scope("prefill_chunk"):
        h_btd, cache = hidden_states(params, cfg, tokens_bt, pos_bt, attend=attend, state=cache)
    return sample(lm_head(params, cfg, h_btd[:, -1:])[:, 0], key, sampling), cache


def _decode_step(params, cfg, cache, tok_b, pos_b, key, sampling, attend=decode_attend):
    before = getattr(attend, "before_decode", None)  # e.g. the dual cache's batched promotion
    if before is not None:
        cache = before(cache, pos_b)
    with jax.named_scope("decode"):
        h_btd, cache = hidden_states(params, cfg, tok_b[:, None], pos_b[:, None], attend=attend, state=cache)
    return sample(lm_head(params, cfg, h_btd)[:, 0], key, sampling), cache


decode_step = jax.jit(_decode_step, static_argnames=("cfg", "sampling", "attend"), donate_argnames=("cache",))


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "sampling", "max_new", "eos_ids", "attend", "stop_on_evict"),
    donate_argnames=("cache",),
)
def decode_loop(
    params,
    cfg,
    cache,
    first_b,
    lengths_b,
    key,
    sampling,
    max_new: int,
    eos_ids: tuple[int, ...],
    n_new,
    attend=decode_attend,
    stop_on_evict: bool = False,
):
    """All decode steps in one `lax.while_loop` on device.

    Returns (tokens [B, max_new] with -1 after a row stops, cache). Token i of row b sits at
    position lengths_b[b] + i; `n_new` (traced, <= max_new) bounds the steps. With
    `stop_on_evict`, the loop also stops once a dual cache has dropped an entry.
    """
    b = first_b.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-2,), jnp.int32)

    def cond(state):
        i, _, done_b, _, cache = state
        go = (i < n_new) & ~jnp.all(done_b)
        return go & jnp.all(cache.evicted == 0) if stop_on_evict else go

    def body(state):  # i tokens are out; the step at position lengths + i - 1 makes token i
        i, tok_b, done_b, out_bn, cache = state
        nxt_b, cache = _decode_step(
            params, cfg, cache, tok_b, lengths_b + i - 1, jax.random.fold_in(key, i), sampling, attend
        )
        out_bn = out_bn.at[:, i].set(jnp.where(done_b, -1, nxt_b))
        done_b = done_b | jnp.isin(nxt_b, eos) | (i + 1 >= n_new)
        return i + 1, nxt_b, done_b, out_bn, cache

    out_bn = jnp.full((b, max_new), -1, jnp.int32).at[:, 0].set(first_b)
    done_b = jnp.isin(first_b, eos) | (n_new <= 1)
    init = (jnp.ones((), jnp.int32), first_b, done_b, out_bn, cache)
    _, _, _, out_bn, cache = jax.lax.while_loop(cond, body, init)
    return out_bn, cache


# ----------------------------------------------------------------------------- driver


def generate_ids(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    eos_ids: Sequence[int] = (),
    mesh=None,
    on_token: Callable[[np.ndarray], None] | None = None,
    cache_dtype=None,
    cache: CacheConfig | None = None,
    admission: Admission | None = None,
    gate_params=None,
    attention_impl: str = "auto",
    policy=None,
    kvzip_prompt_ids: tuple[Sequence[int], Sequence[int]] | None = None,
    read_policy=None,
    return_cache: bool = False,
    room: int | None = None,
    context: PrefilledContext | None = None,
    paged: int | None = None,
) -> tuple[list[list[int]], list[bool], dict]:
    """Generate from token-id prompts. Returns (new ids per row incl. EOS, finished flags, stats).

    `on_token`, when given, receives every step's int32 [B] tokens on the host (streaming);
    otherwise the whole decode runs in one on-device loop. With `cache` (a CacheConfig) the
    WG-KV dual cache is used, admission decided by `admission` (e.g. `GateAdmission`, whose
    stacked per-layer params `gate_params` are placed beside the layer params).
    `attention_impl` ("auto", "reference", "pallas", "cudnn") picks the attention kernels
    (`kernels.dispatch`). stats["cache"] is a `CacheStats`.

    `policy` (dual cache only; a `wgkv_jax.policies` eviction policy or Chain of them) evicts from
    the global store after the prompt (`wgkv_jax.cache.evict`): the store is scored, cut to the
    policy's budget and compacted into a smaller capacity before decoding. A KeepRatio budget is a
    fraction of the prompt's KV entries (ring included). KVzip needs `kvzip_prompt_ids`, the
    token ids of its two repeat prompts (`wgkv_jax.generate` makes them with the tokenizer).
    `read_policy` (a `policies.Quest`, group="max"): decode queries read only their top pages of
    the global store. `return_cache`: also return the final cache pytree as stats["cache_state"].
    `room`: store slots kept free for later tokens after a policy's eviction (default
    max_new_tokens). `context` (a `PrefilledContext`): the prompt (one row) continues that context
    (positions after it), on a copy of its cache; the context itself is left unchanged.
    `paged` (a page size, e.g. 32): after the prompt, the global store moves into one page pool
    shared by every layer and head (`wgkv_jax.cache.paged`), so ragged per-head lengths cost only
    their pages; decoding gives the same tokens.
    """
    sampling = sampling or SamplingConfig()
    dispatch.check_impl(attention_impl)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must contain at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if (cache is None) != (admission is None):
        raise ValueError("a dual cache needs both `cache` (CacheConfig) and `admission`; pass neither for a full cache")
    cascading = isinstance(policy, policies.Cascading)
    if cascading and (cache is not None or read_policy is not None or context is not None):
        raise ValueError(
            "Cascading is its own cache (admission by attention EMA): pass no `cache`/`admission`, "
            "read_policy or context with it"
        )
    if policy is not None and cache is None and not cascading:
        raise ValueError("an eviction policy runs on the dual cache; pass `cache` (CacheConfig) and `admission` too")
    if paged is not None and (cache is None or context is not None or mesh is not None):
        raise ValueError(
            f"paged={paged}: the paged store is a dual-cache option for a fresh prompt on one device; "
            "pass `cache` and `admission`, and no context or mesh"
        )
    if context is not None:
        if len(prompts) != 1 or policy is not None or cache is not None:
            raise ValueError("a prefilled context takes one prompt at a time, and no new cache or policy")
        cache, admission, gate_params = context.cache, context.admission, context.gate_params
        if context.cascade is not None:  # a Cascading context: its own cache, no dual-cache settings
            cascading = True
    kvzip = False if cascading else _check_policy(policy, kvzip_prompt_ids)
    if read_policy is not None:
        if cache is None:
            raise ValueError("read_policy (Quest) reads the dual cache's global store; pass `cache` and `admission`")
        if not isinstance(read_policy, policies.Quest) or read_policy.group != "max":
            raise ValueError(
                f"read_policy must be policies.Quest(..., group='max') (one page set per KV head); got {read_policy!r}"
            )
    offset = context.length if context is not None else 0
    lengths = [offset + len(p) for p in prompts]
    longest = max(lengths)
    if longest >= cfg.max_seq_len:
        raise ContextLengthError(
            f"prompt of {longest} tokens does not fit the context limit of {cfg.max_seq_len} tokens "
            f"(need at least one position left to generate)"
        )
    if longest + max_new_tokens > cfg.max_seq_len:
        new = cfg.max_seq_len - longest
        warnings.warn(
            f"max_new_tokens={max_new_tokens} exceeds the context limit {cfg.max_seq_len} "
            f"for a {longest}-token prompt; generating at most {new}",
            stacklevel=2,
        )
        max_new_tokens = new
    batch = len(prompts)
    dtype = cache_dtype or params["embed"].dtype
    lengths_b = np.asarray(lengths, np.int32)
    key = jax.random.PRNGKey(seed)
    eos = tuple(int(e) for e in eos_ids)
    put = _placer(mesh)

    t0 = time.perf_counter()
    if cascading:
        ccfg = context.cascade if context is not None else policy.cache_config(longest)
        attend, stop_on_evict = CascadeAttend(ccfg, cfg), False
        if context is not None:
            first_b, state, shape_info = _continue_context(
                params, cfg, context, prompts[0], attend, jax.random.fold_in(key, 0), sampling, put
            )
        else:
            first_b, state, shape_info = _prefill_cascading(
                params, cfg, ccfg, prompts, attend, key, sampling, put, dtype
            )
    elif cache is None:
        t_bucket = min(prompt_bucket(longest), cfg.max_seq_len)
        size = cache_bucket(t_bucket + max_new_tokens)
        tokens_bt = np.zeros((batch, t_bucket), np.int32)
        for i, p in enumerate(prompts):
            tokens_bt[i, : len(p)] = p
        attend, stop_on_evict = FullAttend("decode", dispatch.ragged_impl(attention_impl)), False
        prefill_impl = dispatch.causal_impl(attention_impl, dtype, cfg.head_dim)
        if _cpu_decode_layout(attend.impl, prefill_impl, params, mesh):
            state = DecodeKVCache.zeros(cfg, batch, size, dtype)
        else:
            state = put(lambda: KVCache.zeros(cfg, batch, size, dtype), KVCache.logical_axes())
        first_b, state = prefill(
            params, cfg, state, put(tokens_bt, ("batch", "seq")), put(lengths_b, ("batch",)),
            jax.random.fold_in(key, 0), sampling, FullAttend("prefill", prefill_impl),
        )  # fmt: skip
        shape_info = {"prompt_bucket": t_bucket, "cache_size": size}
    else:
        params = with_gate(params, gate_params)
        impl = dispatch.ragged_impl(attention_impl)
        attend = DualAttend(
            admission, defer_gating=cache.defer_gating, impl=impl, batched_promotion=True, read_policy=read_policy
        )
        prefill_attend_ = DualAttend(admission, impl=impl)
        stop_on_evict = cache.overflow == "error"
        if context is not None:
            first_b, state, shape_info = _continue_context(
                params, cfg, context, prompts[0], prefill_attend_, jax.random.fold_in(key, 0), sampling, put
            )
        else:
            first_b, state, shape_info = _prefill_dual(
                params, cfg, cache, prompts, policy, kvzip, kvzip_prompt_ids, read_policy, prefill_attend_, key,
                sampling, put, dtype, max_new_tokens if room is None else room, max_new_tokens, stop_on_evict,
            )  # fmt: skip
        if paged is not None:
            if isinstance(state, PerLayerCache):
                raise ValueError(
                    f"paged={paged}: this eviction left a capacity per layer (unrolled layers); the paged store "
                    "takes the stacked cache: load the model with layers='stacked', or drop `paged`"
                )
            state = paged_store.from_dual(state, page=paged, room=max_new_tokens)
            shape_info.update(pages=state.pages, page=state.page)
    attend = wrap_attend(attend, state)  # a capacity per layer after a ragged eviction (unrolled layers)
    first_b.block_until_ready()
    t1 = time.perf_counter()
    if on_token is None:
        out_bn, state = decode_loop(
            params, cfg, state, first_b, put(lengths_b, ("batch",)), key, sampling, max_new_tokens, eos,
            jnp.int32(max_new_tokens), attend, stop_on_evict,
        )  # fmt: skip
        out_bn = np.asarray(out_bn)
    else:
        out_bn = np.full((batch, max_new_tokens), -1, np.int32)
        done_b = np.zeros(batch, bool)
        tok_b = first_b
        for i in range(max_new_tokens):
            host_b = np.asarray(tok_b)
            out_bn[:, i] = np.where(done_b, -1, host_b)
            on_token(out_bn[:, i])
            done_b |= np.isin(host_b, eos) | (i + 1 >= max_new_tokens)
            if done_b.all():
                break
            tok_b, state = decode_step(
                params, cfg, state, tok_b, put(lengths_b + i, ("batch",)), jax.random.fold_in(key, i + 1), sampling,
                attend,
            )  # token i + 1 at position lengths + i  # fmt: skip
            if stop_on_evict:
                _raise_on_overflow(state, state.capacity, "decode")
    t2 = time.perf_counter()
    if stop_on_evict:
        _raise_on_overflow(state, state.capacity, "decode")
    new_ids, finished = [], []
    for row in out_bn:
        ids = [int(x) for x in row if x >= 0]
        stop = next((j for j, x in enumerate(ids) if x in eos), None)
        finished.append(stop is not None)
        new_ids.append(ids if stop is None else ids[: stop + 1])
    # every emitted token except the last was fed back through the model and stored
    seen_b = np.asarray([n + max(len(ids) - 1, 0) for n, ids in zip(lengths, new_ids, strict=True)])
    stats = {
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "cache_bytes": state.nbytes,
        "cache": cache_stats(state, cfg, seen_b, shape_info.get("policy_dropped")),
        **shape_info,
    }
    if return_cache:
        stats["cache_state"] = state.to_cache() if isinstance(state, DecodeKVCache) else state
    return new_ids, finished, stats


def _cpu_decode_layout(decode_impl: str, prefill_impl: str, params, mesh) -> bool:
    """Whether the full cache is a `DecodeKVCache` (per-layer buffers, keys transposed): when
    both phases run the XLA reference attention (not a kernel that reads [L, B, K, S, E]), the
    layers are unrolled (a static layer index) and there is no mesh (merging batch and heads
    would mix sharded axes)."""
    return (
        decode_impl == "reference"
        and prefill_impl == "reference"
        and isinstance(params["layers"], list | tuple)
        and mesh is None
    )


CASCADE_STRIDE = 512


def _left_pad(prompts, t_bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts left-padded to t_bucket: tokens [B, T] and positions [B, T] (negative on pads)."""
    lengths_b = np.asarray([len(p) for p in prompts], np.int32)
    tokens_bt = np.zeros((len(prompts), t_bucket), np.int32)
    for i, p in enumerate(prompts):
        tokens_bt[i, t_bucket - len(p) :] = p
    return tokens_bt, np.arange(t_bucket, dtype=np.int32)[None, :] - (t_bucket - lengths_b)[:, None]


def _prefill_cascading(params, cfg, ccfg, prompts, attend, key, sampling, put, dtype):
    """Strided prefill of left-padded prompts into a fresh cascading cache (section 4.5 of
    reference/baselines.md: each chunk attends to the cache and itself, then is pushed)."""
    batch = len(prompts)
    lengths_b = np.asarray([len(p) for p in prompts], np.int32)
    t_bucket = prompt_bucket(int(lengths_b.max()))
    chunk = min(t_bucket, CASCADE_STRIDE)
    state = put(lambda: CascadingCache.zeros(cfg, batch, ccfg, dtype), CascadingCache.logical_axes())
    tokens_bt, pos_bt = _left_pad(prompts, t_bucket)
    for c in range(0, t_bucket, chunk):
        first_b, state = prefill_chunk(
            params, cfg, state, put(tokens_bt[:, c : c + chunk], ("batch", "seq")),
            put(pos_bt[:, c : c + chunk], ("batch", "seq")), jax.random.fold_in(key, 0), sampling, attend,
        )  # fmt: skip
    info = {"prompt_bucket": t_bucket, "chunk": chunk, "capacity": ccfg.capacity, "window": ccfg.window}
    return first_b, state, dict(info, cascade=ccfg)


def _prefill_dual(
    params, cfg, cache, prompts, policy, kvzip, kvzip_prompt_ids, read_policy, prefill_attend_, key, sampling, put,
    dtype, room, max_new_tokens, stop_on_evict,
):  # fmt: skip
    """Chunked prefill of left-padded prompts into a fresh dual cache, then the policy's eviction."""
    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    t_bucket = prompt_bucket(longest)
    chunk = min(t_bucket, cache.chunk)
    w = cache.window
    if policy is not None:
        policy = evict.store_policy(policy, longest, w)
    if (policy is not None or read_policy is not None) and cache.capacity is None:
        # the store holds every admitted token: until the policy has scored it, or for Quest to page through
        cache = dataclasses.replace(cache, capacity_fraction=1.0)
    capacity = cache.resolve_capacity(length_bucket(longest + max(max_new_tokens, room)))
    state = put(
        lambda: DualCache.zeros(cfg, batch, w, capacity, dtype, chunk=chunk, defer=cache.defer_gating),
        DualCache.logical_axes(w),
    )
    tokens_bt, pos_bt = _left_pad(prompts, t_bucket)
    heads = isinstance(policy, policies.KVzipHeads)  # no scores at run time: whole heads kept or dropped
    for c in range(0, t_bucket, chunk):
        chunk_attend, chunk_state = prefill_attend_, state
        if policy is not None and not kvzip and not heads and c + chunk >= t_bucket:  # the last chunk scores
            chunk_attend = evict.ScoreAttend(prefill_attend_, policy)
            shape = state.glob_pos.shape
            zeros = put(lambda shape=shape: jnp.zeros(shape, jnp.float32), SCORE_AXES)
            chunk_state = (state, zeros)
        first_b, state = prefill_chunk(
            params, cfg, chunk_state, put(tokens_bt[:, c : c + chunk], ("batch", "seq")),
            put(pos_bt[:, c : c + chunk], ("batch", "seq")), jax.random.fold_in(key, 0), sampling,
            chunk_attend,
        )  # fmt: skip
        if isinstance(state, tuple):
            state, scores = state
        if stop_on_evict:
            _raise_on_overflow(state, capacity, "prefill")
    shape_info = {"prompt_bucket": t_bucket, "chunk": chunk, "capacity": capacity, "window": w}
    if policy is not None:
        if heads:
            scores = policy.store_scores(jnp.arange(state.capacity) < state.length[..., None])
        if kvzip:
            first, nxt = kvzip_prompt_ids
            state, scores = evict.kvzip_pass(
                params, cfg, state, [list(p) for p in prompts], policy, first_ids=first, next_ids=nxt, put=put
            )
        per_layer = isinstance(params["layers"], list | tuple)  # unrolled: each layer keeps its own capacity
        state, dropped_l = evict.evict(state, scores, policy, room=room, per_layer=per_layer)
        shape_info.update(policy=policy, policy_dropped=dropped_l, capacity=state.capacity)
        if per_layer:
            shape_info["capacities"] = state.capacities
    return first_b, state, shape_info


@dataclasses.dataclass(frozen=True)
class PrefilledContext:
    """A context prefilled (and compressed by a policy) once, to be continued by several prompts
    (KVzip's query-agnostic use): `wgkv_jax.prefill_context` makes one, `generate(context=...)`
    continues it on a copy. length: the context's tokens (row 0 of `state`). A Cascading context
    holds a `CascadingCache` and its `cascade` config instead of the dual-cache settings."""

    state: DualCache | PerLayerCache | CascadingCache
    length: int
    cache: CacheConfig | None
    admission: Admission | None
    gate_params: object = None
    stats: CacheStats | None = None
    cascade: CascadeConfig | None = None


def _context_pieces(context: PrefilledContext, ids, put):
    """A copy of the context's cache and the (tokens, positions) pieces that continue it: unpadded
    pieces that fit the ring's spare slots."""
    state = jax.tree.map(jnp.copy, context.state)  # the caller's context stays intact (donation below)
    spare = CASCADE_STRIDE if context.cascade is not None else state.ring_size - state.window
    pieces = []
    for c in range(0, len(ids), spare):
        piece = np.asarray([ids[c : c + spare]], np.int32)
        pos = (context.length + c + np.arange(piece.shape[1], dtype=np.int32))[None]
        pieces.append((c, put(piece, ("batch", "seq")), put(pos, ("batch", "seq"))))
    return state, pieces


def _continue_context(params, cfg, context: PrefilledContext, ids, prefill_attend_, key, sampling, put):
    """Prefill `ids` after the context (on a copy of its cache)."""
    state, pieces = _context_pieces(context, ids, put)
    prefill_attend_ = wrap_attend(prefill_attend_, state)
    for _, piece, pos in pieces:
        first_b, state = prefill_chunk(params, cfg, state, piece, pos, key, sampling, prefill_attend_)
    if context.cascade is not None:
        info = {"context_tokens": context.length, "capacity": context.cascade.capacity, "cascade": context.cascade}
    else:
        info = {"context_tokens": context.length, "capacity": state.capacity, "window": state.window}
    return first_b, state, info


@functools.partial(jax.jit, static_argnames=("cfg", "attend"), donate_argnames=("cache",))
def chunk_logprobs(params: Params, cfg: ModelConfig, cache, tokens_bt, pos_bt, attend):
    """One chunk over a dual cache (teacher forcing): log-probabilities [B, T, V] after each token."""
    h_btd, cache = hidden_states(params, cfg, tokens_bt, pos_bt, attend=attend, state=cache)
    return jax.nn.log_softmax(lm_head(params, cfg, h_btd).astype(jnp.float32), axis=-1), cache


def context_logprobs(
    params: Params, cfg: ModelConfig, context: PrefilledContext, ids: Sequence[int], *, attention_impl="auto", mesh=None
) -> np.ndarray:
    """log p(ids[i + 1] | context, ids[: i + 1]) for i < len(ids) - 1, float32 [len(ids) - 1].

    The continuation is teacher-forced through the context's (compressed) cache exactly as a
    prompt continuing it would be prefilled (same pieces, same admission), on a copy of the
    cache: the context is left unchanged. The first token of `ids` is conditioned on, not scored.
    """
    if len(ids) < 2:
        raise ValueError(f"a continuation of {len(ids)} token(s) has nothing to score; need >= 2")
    if context.length + len(ids) > cfg.max_seq_len:
        raise ContextLengthError(
            f"context ({context.length}) + continuation ({len(ids)}) tokens exceed the limit of {cfg.max_seq_len}"
        )
    put = _placer(mesh)
    params = with_gate(params, context.gate_params)
    if context.cascade is not None:
        attend = CascadeAttend(context.cascade, cfg)
    else:
        attend = DualAttend(context.admission, impl=dispatch.ragged_impl(attention_impl))
    state, pieces = _context_pieces(context, list(map(int, ids)), put)
    attend = wrap_attend(attend, state)
    targets = np.asarray(ids[1:], np.int64)
    out = []
    for c, piece, pos in pieces:
        lp_btv, state = chunk_logprobs(params, cfg, state, piece, pos, attend)
        lp_tv = np.asarray(lp_btv[0])
        tgt = targets[c : c + lp_tv.shape[0]]
        out.append(lp_tv[np.arange(len(tgt)), tgt])
    return np.concatenate(out).astype(np.float32)


def with_gate(params: Params, gate_params) -> Params:
    """The model params with the stacked per-layer gate params beside each layer's weights."""
    if gate_params is None:
        return params
    layers = params["layers"]
    if isinstance(layers, list | tuple):  # unrolled layers: each gets its slice of the gate
        layers = [dict(p, gate=jax.tree.map(lambda x, i=i: x[i], gate_params)) for i, p in enumerate(layers)]
    else:
        layers = dict(layers, gate=gate_params)
    return dict(params, layers=layers)


SCORE_AXES = ("layers", "batch", "kv_heads", "cache_seq")


def _check_policy(policy, kvzip_prompt_ids) -> bool:
    """Validate an eviction policy for generation; True when it is KVzip (a repeat pass)."""
    if policy is None:
        return False
    if isinstance(policy, policies.Quest):
        raise ValueError("Quest is read-time page selection, not eviction; it does not go in `policy`")
    if not isinstance(policy, policies.Policy):
        raise ValueError(f"policy must be a wgkv_jax.policies eviction policy or Chain; got {policy!r}")
    stages = policy.policies if isinstance(policy, policies.Chain) else (policy,)
    if isinstance(policy, policies.Chain) and policy.admission is not None:
        raise ValueError("a Chain's WriteGate is admission: pass it through wgkv_jax.generate (or as `admission`)")
    if isinstance(policy, policies.Chain) and any(isinstance(s, policies.KVzipHeads) for s in stages):
        raise ValueError("KVzipHeads keeps or drops whole heads; use it as the only eviction stage")
    if any(isinstance(s, policies.KVzip) for s in stages):
        if not isinstance(policy, policies.KVzip):
            raise ValueError("KVzip scores with its own repeat pass; use it as the only eviction stage")
        if kvzip_prompt_ids is None:
            raise ValueError("KVzip needs kvzip_prompt_ids=(first, next): the token ids of its two repeat prompts")
        return True
    return False


def _placer(mesh):
    """put(array, logical axes) and put(init fn, logical axes tree): place on `mesh` (or default device)."""

    def put(x, axes):
        if callable(x):
            if mesh is None:
                return x()
            shardings = sharding.tree_shardings(jax.eval_shape(x), axes, mesh)
            return jax.jit(x, out_shardings=shardings)()
        if mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, sharding.logical_sharding(axes, x.shape, mesh))

    return put


def _raise_on_overflow(state: DualCache, capacity: int, phase: str) -> None:
    evicted = np.asarray(state.evicted)
    if evicted.sum() == 0:
        return
    l, b, k = np.unravel_index(int(np.argmax(evicted)), evicted.shape)
    need = int(np.asarray(state.length)[l, b, k] + evicted[l, b, k])
    raise CapacityError(
        f"the global KV cache overflowed during {phase}: layer {l}, row {b}, KV head {k} admitted at least "
        f"{need} tokens but the capacity is {capacity} per head ({int(evicted.sum())} entries over in all); "
        f"raise CacheConfig.capacity / capacity_fraction, or use overflow='evict_lowest'"
    )


def cache_stats(state, cfg: ModelConfig, seen_b: np.ndarray, policy_dropped_l=None) -> CacheStats:
    """Accounting of a full or dual cache after `seen_b[b]` tokens of row b went through the model
    (`policy_dropped_l`: entries an eviction policy removed from the store, per layer)."""
    dual = isinstance(state, DualCache | PerLayerCache | PagedDualCache)
    itemsize = state.ring_k.dtype.itemsize if dual else state.v[0].dtype.itemsize
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize
    full_entries = int(seen_b.sum()) * cfg.n_layers * cfg.n_kv_heads
    if isinstance(state, CascadingCache):
        held_lbk = np.sum(np.asarray(state.pos) >= 0, axis=-1)
        return CacheStats(
            kind="cascading",
            allocated_bytes=state.kv_nbytes,
            full_cache_bytes=int(seen_b.sum()) * per_token,
            stored_entries=int(held_lbk.sum()),
            full_entries=full_entries,
            kv_ratio=float(np.mean(held_lbk / seen_b[None, :, None])),
            admission_per_layer=(held_lbk.sum(axis=(1, 2)) / max(int(seen_b.sum()) * cfg.n_kv_heads, 1)).tolist(),
            evicted=0,
            capacity=state.size,
        )
    if isinstance(state, KVCache | DecodeKVCache):
        return CacheStats(
            kind="full",
            allocated_bytes=state.nbytes,
            full_cache_bytes=int(seen_b.sum()) * per_token,
            stored_entries=full_entries,
            full_entries=full_entries,
            kv_ratio=1.0,
            admission_per_layer=[1.0] * cfg.n_layers,
            evicted=0,
        )
    w = state.window
    length_lbk = np.asarray(state.length)
    evicted_lbk = np.asarray(state.evicted)
    stored = np.minimum(seen_b, w)[None, :, None] + length_lbk
    left_b = np.maximum(seen_b - w, 0)  # tokens that went through the window
    dropped_l = np.zeros(cfg.n_layers, np.int64) if policy_dropped_l is None else np.asarray(policy_dropped_l)
    admitted_l = (length_lbk + evicted_lbk).sum(axis=(1, 2)) + dropped_l
    left_total = max(int(left_b.sum()) * cfg.n_kv_heads, 1)
    return CacheStats(
        kind="dual",
        allocated_bytes=state.kv_nbytes,
        full_cache_bytes=int(seen_b.sum()) * per_token,
        stored_entries=int(stored.sum()),
        full_entries=full_entries,
        kv_ratio=float(np.mean((np.minimum(seen_b, w)[None, :, None] + length_lbk) / seen_b[None, :, None])),
        admission_per_layer=[float(a) / left_total for a in admitted_l],
        evicted=int(evicted_lbk.sum()),
        policy_evicted=int(dropped_l.sum()),
        capacity=state.capacity,
        window=w,
        global_lengths=length_lbk.tolist(),
    )
