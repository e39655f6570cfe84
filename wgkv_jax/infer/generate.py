"""Autoregressive generation with a static-shape, donated KV cache.

Shapes are bucketed so a new prompt length costs a compile only when it crosses a bucket:
prompts are right-padded to a power of two, the cache to a multiple of `CACHE_ALIGN`.
Two loops share the same jitted decode step: `lax.while_loop` entirely on device (default),
or a host loop that hands every new token to a callback (streaming).

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

from wgkv_jax import sharding
from wgkv_jax.cache.full import KVCache, decode_attend, prefill_attend
from wgkv_jax.infer.sampling import SamplingConfig, sample
from wgkv_jax.model.config import ModelConfig
from wgkv_jax.model.transformer import Params, hidden_states, lm_head

MIN_PROMPT_BUCKET = 16
CACHE_ALIGN = 256


class ContextLengthError(ValueError):
    """A prompt does not fit the model's context window."""


def prompt_bucket(n: int) -> int:
    """Smallest power of two >= n (at least MIN_PROMPT_BUCKET)."""
    return max(MIN_PROMPT_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def cache_bucket(n: int) -> int:
    return -(-n // CACHE_ALIGN) * CACHE_ALIGN


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
    """

    texts: list[str]
    tokens: list[list[int]]
    prompt_tokens: list[list[int]]
    finished: list[bool]
    prefill_s: float
    decode_s: float
    cache_bytes: int

    @property
    def decode_tokens_per_s(self) -> float:
        n = sum(len(t) for t in self.tokens)
        return n / self.decode_s if self.decode_s > 0 else float("nan")


# ----------------------------------------------------------------------------- jitted pieces


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"), donate_argnames=("cache",))
def prefill(params: Params, cfg: ModelConfig, cache: KVCache, tokens_bt, lengths_b, key, sampling: SamplingConfig):
    """Run the (right-padded) prompts, fill the cache, sample each row's first new token."""
    b, t = tokens_bt.shape
    pos_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    with jax.named_scope("prefill"):
        h_btd, cache = hidden_states(params, cfg, tokens_bt, pos_bt, attend=prefill_attend, state=cache)
    h_last_b1d = h_btd[jnp.arange(b), lengths_b - 1][:, None]
    logits_bv = lm_head(params, cfg, h_last_b1d)[:, 0]
    return sample(logits_bv, key, sampling), cache


def _decode_step(params, cfg, cache, tok_b, pos_b, key, sampling):
    with jax.named_scope("decode"):
        h_btd, cache = hidden_states(params, cfg, tok_b[:, None], pos_b[:, None], attend=decode_attend, state=cache)
    return sample(lm_head(params, cfg, h_btd)[:, 0], key, sampling), cache


decode_step = jax.jit(_decode_step, static_argnames=("cfg", "sampling"), donate_argnames=("cache",))


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "max_new", "eos_ids"), donate_argnames=("cache",))
def decode_loop(params, cfg, cache, first_b, lengths_b, key, sampling, max_new: int, eos_ids: tuple[int, ...], n_new):
    """All decode steps in one `lax.while_loop` on device.

    Returns (tokens [B, max_new] with -1 after a row stops, cache). Token i of row b sits at
    position lengths_b[b] + i; `n_new` (traced, <= max_new) bounds the steps.
    """
    b = first_b.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-2,), jnp.int32)

    def cond(state):
        i, _, done_b, _, _ = state
        return (i < n_new) & ~jnp.all(done_b)

    def body(state):  # i tokens are out; the step at position lengths + i - 1 makes token i
        i, tok_b, done_b, out_bn, cache = state
        nxt_b, cache = _decode_step(params, cfg, cache, tok_b, lengths_b + i - 1, jax.random.fold_in(key, i), sampling)
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
) -> tuple[list[list[int]], list[bool], dict]:
    """Generate from token-id prompts. Returns (new ids per row incl. EOS, finished flags, stats).

    `on_token`, when given, receives every step's int32 [B] tokens on the host (streaming);
    otherwise the whole decode runs in one on-device loop.
    """
    sampling = sampling or SamplingConfig()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must contain at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    lengths = [len(p) for p in prompts]
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
    t_bucket = min(prompt_bucket(longest), cfg.max_seq_len)
    size = cache_bucket(t_bucket + max_new_tokens)
    dtype = cache_dtype or params["embed"].dtype

    tokens_bt = np.zeros((batch, t_bucket), np.int32)
    for i, p in enumerate(prompts):
        tokens_bt[i, : len(p)] = p
    lengths_b = np.asarray(lengths, np.int32)
    if mesh is not None:
        batch_sh = sharding.logical_sharding(("batch", "seq"), tokens_bt.shape, mesh)
        tokens_bt = jax.device_put(tokens_bt, batch_sh)
        lengths_b = jax.device_put(lengths_b, sharding.logical_sharding(("batch",), lengths_b.shape, mesh))
        cache_sh = sharding.tree_shardings(
            jax.eval_shape(lambda: KVCache.zeros(cfg, batch, size, dtype)), KVCache.logical_axes(), mesh
        )
        cache = jax.jit(lambda: KVCache.zeros(cfg, batch, size, dtype), out_shardings=cache_sh)()
    else:
        cache = KVCache.zeros(cfg, batch, size, dtype)
    cache_bytes = cache.nbytes
    key = jax.random.PRNGKey(seed)

    t0 = time.perf_counter()
    first_b, cache = prefill(params, cfg, cache, tokens_bt, lengths_b, jax.random.fold_in(key, 0), sampling)
    first_b.block_until_ready()
    t1 = time.perf_counter()
    eos = tuple(int(e) for e in eos_ids)
    if on_token is None:
        out_bn, cache = decode_loop(
            params, cfg, cache, first_b, lengths_b, key, sampling, max_new_tokens, eos, jnp.int32(max_new_tokens)
        )
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
            tok_b, cache = decode_step(
                params, cfg, cache, tok_b, lengths_b + i, jax.random.fold_in(key, i + 1), sampling
            )  # token i + 1 at position lengths + i
    t2 = time.perf_counter()
    new_ids, finished = [], []
    for row in out_bn:
        ids = [int(x) for x in row if x >= 0]
        stop = next((j for j, x in enumerate(ids) if x in eos), None)
        finished.append(stop is not None)
        new_ids.append(ids if stop is None else ids[: stop + 1])
    stats = {
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "cache_bytes": cache_bytes,
        "prompt_bucket": t_bucket,
        "cache_size": size,
    }
    return new_ids, finished, stats
