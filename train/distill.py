"""Train write gates for a frozen model (WG-KV distillation).

    python -m train.distill --config smollm2_135m --lambda 0.16 --steps 2000 --out runs/smol-0.16
    python -m train.distill --config tiny_cpu                      # a seconds-long CPU smoke test

`--config` picks a preset from `configs/train.py`; every field can be overridden (`--help`).
Rerunning with the same `--out` resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys

import tyro

from configs.train import PRESETS, TrainConfig


def parse(argv: list[str]) -> TrainConfig:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="smollm2_135m")
    known, rest = pre.parse_known_args(argv)
    if known.config not in PRESETS:
        raise SystemExit(f"error: unknown --config {known.config!r}; presets: {sorted(PRESETS)}")
    return tyro.cli(
        TrainConfig, default=PRESETS[known.config], args=rest, description=f"{__doc__}\nPreset: {known.config}"
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse(sys.argv[1:] if argv is None else argv)
    from wgkv_jax.train.fit import fit

    summary = fit(cfg)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
