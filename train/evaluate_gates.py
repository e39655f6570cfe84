"""Compare trained gates against full, local-window and random admission at equal KV ratio.

    python -m train.evaluate_gates runs/smol-0.08 runs/smol-0.16 runs/smol-0.32 --context 4096 \
        --out results/gates_smollm2.json

For every run directory (holding gate.safetensors and summary.json from `train.distill`) it
reports: lambda, hard admission rate beyond the window, KV ratio at `context` (local window
included), validation distill MSE, and held-out perplexity at `context` under hard admission
for the gate, full cache, window only, and random admission at the gate's measured rate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """Run directories of `train.distill`."""
    context: int = 4096
    samples: int = 8
    """Held-out samples of `context` tokens."""
    batch_size: int = 1
    seed: int = 0
    out: str = "results/gates.json"


def _ppl(model, gate_params, tokens, attend, batch_size):
    from wgkv_jax.train.evaluate import admission_nll, kv_ratio
    from wgkv_jax.train.objective import admission_rate

    nll, n, ratios, rates = 0.0, 0, [], []
    for i in range(0, len(tokens), batch_size):
        s, c, admit = admission_nll(
            model.params, gate_params, jnp.asarray(tokens[i : i + batch_size]), cfg=model.config, attend=attend
        )
        nll, n = nll + float(s), n + int(c)
        ratios.append(float(kv_ratio(admit, attend.window)))
        rates.append(float(admission_rate(admit.astype(jnp.float32), attend.window, 0.5)))
    return math.exp(nll / n), float(np.mean(ratios)), float(np.mean(rates))


def main(args: EvalArgs) -> int:
    from wgkv_jax import gates
    from wgkv_jax.api import load_model
    from wgkv_jax.train.checkpoint import load_gate_safetensors
    from wgkv_jax.train.data import DataConfig, build_dataset
    from wgkv_jax.train.evaluate import AdmissionAttend

    metas = [load_gate_safetensors(Path(run) / "gate.safetensors")[1]["config"] for run in args.runs]
    first = metas[0]
    if any(
        (m["model"], m["window"], m["corpora"]) != (first["model"], first["window"], first["corpora"]) for m in metas
    ):
        raise SystemExit("all runs must share the model, the window and the corpora")
    model = load_model(first["model"])
    window = first["window"]
    data = DataConfig(
        corpora=tuple(first["corpora"]), seq_len=args.context, val_fraction=first["val_fraction"], seed=first["seed"]
    )
    val = build_dataset(data, model.tokenizer).val
    if len(val) < args.samples:
        raise SystemExit(f"only {len(val)} held-out samples of {args.context} tokens; lower --samples")
    tokens = np.asarray(val[: args.samples])

    rows = []
    for run, tcfg in zip(tqdm(args.runs, desc="gates"), metas, strict=True):
        gp, _ = load_gate_safetensors(Path(run) / "gate.safetensors", model.config)
        summary = json.loads((Path(run) / "summary.json").read_text())
        gate = gates.make(tcfg["gate"], model.config, expand=tcfg["expand"])
        attend = AdmissionAttend("gate", window, gate, tau=tcfg["tau"])
        ppl, ratio, rate = _ppl(model, jax.device_put(gp), tokens, attend, args.batch_size)
        rand = AdmissionAttend("random", window, rate=rate, seed=args.seed)
        ppl_r, ratio_r, _ = _ppl(model, None, tokens, rand, args.batch_size)
        rows.append(
            {
                "run": run,
                "lambda": tcfg["lam"],
                "val_distill": summary.get("val_distill"),
                "admit_rate": rate,
                "kv_ratio": ratio,
                "ppl_gate": ppl,
                "ppl_random": ppl_r,
                "kv_ratio_random": ratio_r,
            }
        )
    base = {}
    for mode in ("full", "local"):
        ppl, ratio, _ = _ppl(model, None, tokens, AdmissionAttend(mode, window), args.batch_size)
        base[mode] = {"ppl": ppl, "kv_ratio": ratio}
    result = {
        "model": model.config.name,
        "context": args.context,
        "samples": args.samples,
        "window": window,
        "device": str(jax.devices()[0].device_kind),
        "gates": rows,
        "baselines": base,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"| lambda | admit rate beyond W | KV ratio @ {args.context} | val distill MSE | ppl gate | "
        "ppl random (same rate) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['lambda']} | {r['admit_rate']:.3f} | {r['kv_ratio']:.3f} | {r['val_distill']:.4g} | "
            f"{r['ppl_gate']:.2f} | {r['ppl_random']:.2f} |"
        )
    print(
        f"full cache: ppl {base['full']['ppl']:.2f} (KV ratio 1.0); local window only: ppl "
        f"{base['local']['ppl']:.2f} (KV ratio {base['local']['kv_ratio']:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(EvalArgs)))
