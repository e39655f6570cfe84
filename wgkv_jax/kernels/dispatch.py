"""Which attention implementation runs where: `attention_impl="auto" | "reference" | "pallas" | "cudnn"`.

Two attention problems exist in the library:

  * ragged: queries over a cache with per-head lengths (dual-cache prefill chunks and decode,
    full-cache decode). "pallas" is `kernels.ragged` (Pallas-Triton on GPU, interpret mode on
    CPU); "cudnn" (GPU) sends the bulk of a prefill chunk's global keys (those every query sees)
    through cuDNN flash attention and the rest through the kernel; "reference" is dense jnp.
  * soft-gated (gate training): "pallas" is `kernels.soft_flash` (flash forward + backward with
    the gate bias), "reference" the query-blocked XLA path of `attention.soft_gate`.
  * causal: a fresh prompt over itself (full-cache prefill). "cudnn" is
    `jax.nn.dot_product_attention(implementation="cudnn")`, "pallas" the ragged kernel with
    causal block skipping, "reference" the blocked XLA path.

"auto" picks the fast path of the backend (GPU: cudnn for ragged, cuDNN for causal when the
dtype allows, else pallas) and the reference elsewhere. An explicit choice that cannot run is
replaced by the reference with one warning naming the reason. On TPU, "pallas" runs the Mosaic
version of the ragged kernel (`kernels.ragged_tpu`), tested in TPU interpret mode and lowered for
TPU on CPU but not yet compiled on TPU hardware, so "auto" keeps the reference there.

Resolved names: "reference", "pallas" (compiled), "interpret" (Pallas on CPU), "cudnn",
"pallas-tpu" (the Mosaic TPU kernel), and for tests "interpret-xla" (the cudnn split on CPU with
XLA in cuDNN's place) and "interpret-tpu" (the TPU kernel in TPU interpret mode on CPU).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

IMPLS = ("auto", "reference", "pallas", "cudnn")
_warned: set[str] = set()


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention_impl={impl!r}; expected one of {', '.join(map(repr, IMPLS))}")
    return impl


def fallback(reason: str) -> str:
    """Warn once per distinct reason; returns "reference"."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"{reason}; using the reference attention instead", stacklevel=3)
    return "reference"


def _backend(backend: str | None) -> str:
    return backend or jax.default_backend()


def ragged_impl(impl: str, backend: str | None = None) -> str:
    """Resolve `impl` for ragged attention over a cache."""
    backend = _backend(check_impl(impl) and backend)
    if impl == "reference" or (impl == "auto" and backend != "gpu"):
        return "reference"
    if backend == "gpu":
        return "pallas" if impl == "pallas" else "cudnn"
    if impl == "cudnn":
        return fallback(f"attention_impl='cudnn' needs a GPU (backend: {backend})")
    if backend == "cpu":
        return "interpret"
    if backend == "tpu":  # explicit only: not yet compiled on TPU hardware (lowering checked on CPU)
        return "pallas-tpu"
    return fallback(f"attention_impl={impl!r}: the Pallas kernels have no {backend} version yet")


def causal_impl(impl: str, dtype, head_dim: int, backend: str | None = None) -> str:
    """Resolve `impl` for causal self-attention of a fresh prompt."""
    backend = _backend(check_impl(impl) and backend)
    cudnn_ok = backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
    if impl == "auto":
        if backend != "gpu":
            return "reference"
        return "cudnn" if cudnn_ok else "pallas"
    if impl == "cudnn":
        if cudnn_ok:
            return "cudnn"
        got = f"{backend}, {jnp.dtype(dtype)}, head_dim {head_dim}"
        return fallback(f"cuDNN attention needs a GPU, bf16/f16 and head_dim % 8 == 0 (got {got})")
    if impl == "pallas":
        return ragged_impl("pallas", backend)
    return "reference"


def soft_impl(impl: str, head_dim: int, backend: str | None = None) -> str:
    """Resolve `impl` for soft-gated training attention: "reference" (blocked XLA), "pallas" or
    "interpret" (the flash kernels compiled / on CPU)."""
    backend = _backend(check_impl(impl) and backend)
    shape_ok = head_dim >= 16 and not head_dim & (head_dim - 1)
    if impl == "reference" or (impl == "auto" and (backend != "gpu" or not shape_ok)):
        return "reference"
    if impl == "cudnn":
        return fallback("attention_impl='cudnn': cuDNN has no soft-gated attention (a per-key learned bias)")
    if not shape_ok:
        return fallback(f"soft-gated Pallas attention needs head_dim a power of two >= 16 (got {head_dim})")
    if backend == "gpu":
        return "pallas"
    if backend == "cpu":
        return "interpret"
    return fallback(f"attention_impl={impl!r}: the Pallas kernels have no {backend} version yet")
