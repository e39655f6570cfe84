"""Evaluate cache methods on RULER-style tasks: accuracy vs measured KV ratio, table and plots.

python -m infer.evaluate --tasks niah,multikey,vt,qa,ppl --lengths 2048,4096 \
    --methods full,wgkv,local,streaming_llm,snapkv,h2o,kvzip,wgkv+snapkv --keep-ratios 0.1,0.25,0.5 \
    --out results/eval_smollm2
python -m infer.evaluate --model /path/to/qwen.gguf --ckpt runs/qwen_gate --lengths 4096 --out results/eval_qwen

Finished cells are kept in <out>/cells.jsonl, so a rerun (or an interrupted run) only computes the
missing ones. Writes <out>/results.json, table.md, accuracy_vs_kv.png and admission.png.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Literal

import tyro


@dataclasses.dataclass(frozen=True)
class EvaluateArgs:
    """Run the evaluation matrix (wgkv_jax.eval.harness)."""

    out: Path = Path("results/eval")
    """Output folder (cells.jsonl, results.json, table.md, PNG plots)."""
    model: str = "smollm2-135m"
    """A named model, an HF directory or a .gguf file."""
    tasks: str = "niah,multikey,vt,qa"
    """Comma-separated: niah, multikey, multivalue, multiquery, vt, cwe, qa, ppl (perplexity of the last
    128 tokens of a real text after the method compressed the rest)."""
    lengths: str = "2048"
    """Prompt lengths in tokens, comma-separated."""
    methods: str = "full,wgkv,local,streaming_llm,snapkv,h2o,kvzip,wgkv+snapkv"
    """full, wgkv, local, quest, any policy name, or wgkv+<policy>."""
    keep_ratios: str = "0.1,0.25,0.5"
    samples: int = 4
    """Prompts per cell (seeds seed .. seed + samples - 1), generated as one batch."""
    seed: int = 0
    chat: bool = False
    """Chat-template prompts (default: completion prompts ending in an answer cue)."""
    window: int | None = 64
    """Local window W of the eviction-only methods (the WG-KV ones use the gate's training window)."""
    ckpt: str | None = None
    """The write gate of wgkv methods (default: the model's shipped gate)."""
    dtype: Literal["float32", "bfloat16", "auto"] = "auto"
    attention_impl: Literal["auto", "reference", "pallas", "cudnn"] = "auto"
    progress: bool = True


def main(args: EvaluateArgs) -> int:
    import wgkv_jax
    from wgkv_jax.eval.harness import EvalConfig, run_matrix, write_reports

    try:
        cfg = EvalConfig(
            tasks=tuple(args.tasks.split(",")),
            lengths=tuple(int(x) for x in args.lengths.split(",")),
            methods=tuple(args.methods.split(",")),
            keep_ratios=tuple(float(x) for x in args.keep_ratios.split(",")),
            samples=args.samples,
            seed=args.seed,
            chat=args.chat,
            window=args.window,
            ckpt=args.ckpt,
            attention_impl=args.attention_impl,
        )
        model = wgkv_jax.load_model(args.model, dtype=None if args.dtype == "auto" else args.dtype)
        records = run_matrix(model, cfg, args.out, model_name=args.model, progress=args.progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_reports(records, args.out, title=args.model)
    print((args.out / "table.md").read_text())
    print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(EvaluateArgs)))
