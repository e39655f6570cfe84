"""Generate text from the command line, with the WG-KV dual cache (default) or a full cache.

python -m infer.generate --prompt "The capital of France is" --max-new-tokens 8 --temperature 0
python -m infer.generate --ckpt runs/gate --prompt-file long.txt --window 256 --capacity 2048
python -m infer.generate --model /path/to/hf_dir --prompt-file long.txt --no-chat --full-cache
python -m infer.generate --prompt-file long.txt --policy snapkv --keep-ratio 0.25            # WG-KV + SnapKV
python -m infer.generate --prompt-file long.txt --ckpt all --policy kvzip --keep-ratio 0.3   # KVzip alone
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Literal

import tyro


@dataclasses.dataclass(frozen=True)
class GenerateArgs:
    """Generate a continuation; admitted KV entries go to a fixed-capacity global cache."""

    prompt: str | None = None
    """Prompt text."""
    prompt_file: Path | None = None
    """Read the prompt from this file instead (for long contexts)."""
    model: str = "smollm2-135m"
    """A named model, an HF directory (config.json + safetensors) or a .gguf file."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0 = greedy."""
    top_k: int = 0
    """0 = off."""
    top_p: float = 1.0
    """1.0 = off."""
    seed: int = 0
    chat: bool = True
    """Wrap the prompt in the model's chat template when it has one (instruct models)."""
    system: str | None = None
    """System message for chat models (default: the template's own)."""
    dtype: Literal["float32", "bfloat16", "auto"] = "auto"
    """Weights/activations dtype; auto = float32 on CPU, bfloat16 on accelerators."""
    layers: Literal["auto", "stacked", "unrolled", "fused"] = "auto"
    """Weight layout: one buffer per layer ("unrolled"), the same with q/k/v and gate/up fused
    into one matmul each ("fused"; one device; fastest GPU decode), or stacked (scan); auto =
    fused on one GPU, unrolled on a GPU mesh, stacked elsewhere (`wgkv_jax.load_model`)."""
    attention_impl: Literal["auto", "reference", "pallas", "cudnn"] = "auto"
    """Attention kernels (wgkv_jax.kernels.dispatch): auto = Pallas/cuDNN on GPU, XLA elsewhere."""
    model_parallel: int = 1
    """Size of the `model` mesh axis; the remaining devices form the `data` axis."""
    stream: bool = True
    """Print tokens as they are generated."""
    ckpt: str | None = None
    """Gate: a gate.safetensors file, a training output directory, or 'all' / 'none' / 'random:<rate>'.
    Default: the gate shipped for the model."""
    full_cache: bool = False
    """Use a plain full KV cache (the baseline) instead of the dual cache."""
    window: int | None = None
    """Local window W (default: the gate's training window, else 256)."""
    capacity: int | None = None
    """Global cache slots per layer and KV head (default: capacity_fraction of the tokens beyond W)."""
    capacity_fraction: float = 0.5
    chunk: int = 512
    """Prefill chunk length (power of two)."""
    tau: float = 0.1
    """Admission threshold: a token is admitted iff g > tau."""
    overflow: Literal["evict_lowest", "error"] = "evict_lowest"
    """When the global cache is full: drop the lowest-scored entry, or stop with an error."""
    defer_gating: bool = False
    """Gate the local ring once every W decode steps instead of every token."""
    policy: str | None = None
    """Eviction after the prompt (wgkv_jax.policies): snapkv, h2o, streaming_llm, kvzip, ...; it chooses
    among the admitted tokens (admission: --ckpt; --ckpt all = the policy alone)."""
    keep_ratio: float | None = None
    """With --policy: the fraction of the prompt's KV entries kept (local window included)."""
    budget_kind: Literal["auto", "per-head", "per-layer", "global"] = "auto"
    """How the --keep-ratio budget is spread: the policy's default (auto), the same count per head,
    per layer (AdaKV), or one count over all layers (KVzip's default)."""
    room: int | None = None
    """With --policy: store slots left free for decode (default --max-new-tokens). 0 holds the store
    at the budget: tokens admitted during decode replace the lowest gate score."""
    paged: int | None = None
    """Page size (e.g. 32) of a paged global store: after the prompt, one page pool shared by all
    layers and heads, so ragged per-head admission allocates only its pages (same tokens)."""


def _cache_config(wgkv_jax, args: GenerateArgs, *, window: int):
    return wgkv_jax.CacheConfig(
        window=window,
        capacity=args.capacity,
        capacity_fraction=args.capacity_fraction,
        chunk=args.chunk,
        tau=args.tau,
        overflow=args.overflow,
        defer_gating=args.defer_gating,
    )


def _policy(args: GenerateArgs):
    """The eviction policy of --policy / --keep-ratio / --budget-kind (ValueError on bad values)."""
    from wgkv_jax import policies

    if args.policy is None:
        if args.keep_ratio is not None or args.budget_kind != "auto":
            raise ValueError("--keep-ratio and --budget-kind go with --policy")
        return None
    if args.full_cache:
        raise ValueError("--policy evicts from the dual cache; drop --full-cache")
    if args.keep_ratio is None:
        raise ValueError(f"--policy {args.policy} needs --keep-ratio (the fraction of the prompt's KV entries kept)")
    policy = policies.get(args.policy, keep_ratio=args.keep_ratio)
    kinds = {"per-head": policies.PerHead, "per-layer": policies.PerLayer, "global": policies.Global}
    if args.budget_kind != "auto":
        import dataclasses as dc

        policy = dc.replace(policy, budget=kinds[args.budget_kind](policies.KeepRatio(args.keep_ratio)))
    return policy


def main(args: GenerateArgs) -> int:
    import wgkv_jax

    if (args.prompt is None) == (args.prompt_file is None):
        print("error: give exactly one of --prompt or --prompt-file", file=sys.stderr)
        return 2
    if args.prompt_file is not None and not args.prompt_file.exists():
        print(f"error: --prompt-file {args.prompt_file} does not exist", file=sys.stderr)
        return 2
    prompt = args.prompt if args.prompt is not None else args.prompt_file.read_text()
    try:  # settings errors before the (slow) model load
        policy = _policy(args)
        if not args.full_cache:
            _cache_config(wgkv_jax, args, window=args.window or 256)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mesh = wgkv_jax.make_mesh(model=args.model_parallel) if args.model_parallel > 1 else None
    try:
        dtype = None if args.dtype == "auto" else args.dtype
        model = wgkv_jax.load_model(args.model, dtype=dtype, mesh=mesh, layers=args.layers)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chat = bool(args.chat and model.tokenizer is not None and model.tokenizer.chat_template)
    dual = {}
    if isinstance(policy, wgkv_jax.policies.Cascading):
        if args.ckpt not in (None, "all") or args.full_cache:
            print("error: --policy cascading is its own cache; drop --ckpt / --full-cache", file=sys.stderr)
            return 2
    elif not args.full_cache:
        try:
            gate = wgkv_jax.load_gate(model, args.ckpt, tau=args.tau)
            cache = _cache_config(wgkv_jax, args, window=args.window or gate.window or 256)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        dual = {"gate": gate, "cache": cache}

    def emit(row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        out = wgkv_jax.generate(
            model,
            [prompt],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            chat=chat,
            system=args.system,
            stream=emit if args.stream else None,
            attention_impl=args.attention_impl,
            policy=policy,
            **({"room": args.room} if args.room is not None else {}),
            **({"paged": args.paged} if args.paged is not None else {}),
            **dual,
        )
    except (ValueError, wgkv_jax.CapacityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.stream:
        sys.stdout.write(out.texts[0])
    sys.stdout.write("\n")
    n_prompt, n_new = len(out.prompt_tokens[0]), len(out.tokens[0])
    print(
        f"[{model.config.name}] prompt {n_prompt} tok, generated {n_new} tok | "
        f"prefill {n_prompt / out.prefill_s:.0f} tok/s, decode {out.decode_tokens_per_s:.1f} tok/s "
        f"(first call includes compilation)",
        file=sys.stderr,
    )
    kind = "full" if args.full_cache else "dual" if policy is None else f"dual + {policy.name} {args.keep_ratio}"
    kind = f"cascading {args.keep_ratio}" if isinstance(policy, wgkv_jax.policies.Cascading) else kind
    print(f"[{kind} cache] {out.cache_stats.summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(GenerateArgs)))
