"""The evaluation matrix: tasks x context lengths x cache methods x keep ratios, scored as RULER does.

    cells = run_matrix(model, EvalConfig(tasks=("niah", "vt"), lengths=(2048,),
                                         methods=("full", "wgkv", "snapkv"), keep_ratios=(0.25,)),
                       out_dir="results/eval_smollm2")
    write_reports(cells, out_dir)          # results.json, table.md, accuracy_vs_kv.png, admission.png

A *cell* is one (task, length, method, keep ratio): `samples` prompts (seeds seed .. seed + n - 1)
generated in one batch, each answer scored by the task's metric (`wgkv_jax.eval.scoring`), and the
KV ratio MEASURED from the cache after generation (`CacheStats.kv_ratio`: (W + global entries) /
tokens, averaged over layers, rows and KV heads; 1 for the full cache), never the nominal budget.

Methods (`METHODS`; "<policy>" is any name of `wgkv_jax.policies.available()`):

| method          | admission        | after the prompt                | keep ratio means               |
|-----------------|------------------|---------------------------------|--------------------------------|
| full            | (full cache)     | -                               | (none; one cell)               |
| wgkv            | the write gate   | -                               | (none; the gate decides)       |
| wgkv@<tau>      | the write gate, admitting g > tau (a tau sweep draws WG-KV's curve) | - | (none)     |
| local           | none (ring only) | -                               | the window W = r * n           |
| <policy>        | all              | the policy evicts               | kept / prompt entries          |
| wgkv+<policy>   | the write gate   | the policy evicts the admitted  | kept / prompt entries          |
| quest           | all              | decode reads the top r pages    | pages read (memory stays full) |
| cascading       | (its own cache)  | -                               | cache slots / prompt tokens    |

Task "ppl" scores no answer: its cell is the perplexity of the last `PPL_SCORED` tokens of a real
text after the method prefilled and compressed the rest (`prefill_context`, then the tokens are
teacher-forced through that cache by `context_logprobs`); "full" is then the dual cache keeping
every entry, which equals the full cache. Quest has no ppl cell (it selects pages at decode).

Cells are appended to `cells.jsonl` in the output folder as they finish and skipped when the same
settings are asked again, so an interrupted matrix resumes where it stopped. Everything is greedy
and seeded: the same settings give the same cells.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wgkv_jax.eval.scoring import score as score_answer
from wgkv_jax.eval.tasks import TASKS, make_task

MAX_NEW = {"niah": 24, "multikey": 24, "multivalue": 48, "multiquery": 48, "vt": 32, "cwe": 64, "qa": 32}
PPL_SCORED = 128  # ppl: the tokens scored after each (compressed) context
FIXED = ("full", "wgkv", "local", "quest")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate. `window`: W of the eviction-only methods (the WG-KV methods use the gate's
    training window); a method with a budget shrinks W to half of it when the budget is smaller."""

    tasks: tuple[str, ...] = ("niah", "multikey", "vt", "qa")
    lengths: tuple[int, ...] = (2048,)
    methods: tuple[str, ...] = ("full", "wgkv", "local", "streaming_llm", "snapkv", "h2o", "kvzip")
    keep_ratios: tuple[float, ...] = (0.1, 0.25, 0.5)
    samples: int = 4
    seed: int = 0
    chat: bool = False
    window: int | None = 64
    ckpt: str | None = None
    attention_impl: str = "auto"

    def __post_init__(self):
        from wgkv_jax import policies

        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
        names = set(policies.available())
        for m in self.methods:
            if m.startswith("wgkv@"):
                _tau_of(m)  # raises on a bad threshold
                continue
            base = m.split("+", 1)[1] if m.startswith("wgkv+") else m
            if m not in FIXED and base not in names:
                raise ValueError(
                    f"unknown method {m!r}; choose from {list(FIXED)}, a policy {sorted(names)} or wgkv+<policy>"
                )
            if base == "kvzip_heads":
                raise ValueError(
                    f"{m}: KVzip's head-level mode needs calibrated head scores; run it from the Python API "
                    "(wgkv_jax.kvzip_head_scores, then policy=policies.KVzipHeads(...))"
                )
            if m == "wgkv+cascading":
                raise ValueError("wgkv+cascading: Cascading is its own cache and does not compose with the gate")
        if not self.keep_ratios or any(not 0 < r <= 1 for r in self.keep_ratios):
            raise ValueError(f"keep_ratios {self.keep_ratios} must be in (0, 1]")
        if self.samples < 1 or any(n < 128 for n in self.lengths):
            raise ValueError(f"samples={self.samples} must be >= 1 and lengths {self.lengths} >= 128")

    def cells(self) -> list[tuple[str, int, str, float | None]]:
        out = []
        for n in self.lengths:
            for task in self.tasks:
                for m in self.methods:
                    if task == "ppl" and m == "quest":
                        continue  # Quest selects pages for decode queries; a scored continuation is prefilled
                    ratios = [None] if m in ("full", "wgkv") or m.startswith("wgkv@") else self.keep_ratios
                    out.extend((task, n, m, r) for r in ratios)
        return out


def _key(model_name: str, cfg: EvalConfig, task: str, n: int, method: str, ratio) -> str:
    fields = dict(
        model=model_name, task=task, length=n, method=method, keep_ratio=ratio, samples=cfg.samples,
        seed=cfg.seed, chat=cfg.chat, window=cfg.window, ckpt=cfg.ckpt,
    )  # fmt: skip
    return json.dumps(fields, sort_keys=True)


def _tau_of(method: str) -> float:
    """The admission threshold of method "wgkv@<tau>"."""
    try:
        tau = float(method.split("@", 1)[1])
    except ValueError:
        tau = float("nan")
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"method {method!r}: the threshold after '@' must be a number in [0, 1)")
    return tau


def _block(x: int, block: int = 16) -> int:
    return max(block, x // block * block)


def _generate_kwargs(model, cfg: EvalConfig, method: str, ratio, n: int) -> dict:
    """wgkv_jax.generate arguments of one method at keep ratio `ratio` for n-token prompts.

    W: the gate's training window for the WG-KV methods (cfg.window when it has none), cfg.window
    for the eviction-only ones; a method with a budget r * n shrinks W to at most half of it."""
    import wgkv_jax

    if method == "full":
        return {}
    if method == "cascading":
        return {"policy": "cascading", "keep_ratio": ratio}
    if method == "local":
        return {"gate": "none", "cache": wgkv_jax.CacheConfig(window=_block(int(ratio * n)))}
    gate, name, w, tau = "all", method, cfg.window or 256, 0.1
    if method.startswith("wgkv"):
        tau = _tau_of(method) if method.startswith("wgkv@") else tau
        gate = wgkv_jax.load_gate(model, cfg.ckpt, tau=tau)
        w = gate.window or w
        name = method.split("+", 1)[1] if "+" in method else None
    if ratio is not None:
        w = min(w, _block(int(ratio * n) // 2))
    kw = {"gate": gate, "cache": wgkv_jax.CacheConfig(window=w, tau=tau)}
    if name is not None:
        kw.update(policy=name, keep_ratio=ratio)
    return kw


def run_cell(model, cfg: EvalConfig, task: str, n: int, method: str, ratio) -> dict:
    """Generate and score one cell; returns its record (see the module docstring)."""
    import wgkv_jax

    if task == "ppl":
        return _ppl_cell(model, cfg, n, method, ratio)
    tasks = [make_task(task, model.tokenizer, n, seed=cfg.seed + i, chat=cfg.chat) for i in range(cfg.samples)]
    kw = _generate_kwargs(model, cfg, method, ratio, n)
    t0 = time.perf_counter()
    out = wgkv_jax.generate(
        model, [t.prompt for t in tasks], max_new_tokens=MAX_NEW[task], chat=cfg.chat, temperature=0.0,
        attention_impl=cfg.attention_impl, **kw,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    scores = [score_answer(t, text) for t, text in zip(tasks, out.texts, strict=True)]
    s = out.cache_stats
    record = {
        "task": task,
        "length": n,
        "method": method,
        "keep_ratio": ratio,
        "accuracy": float(np.mean(scores)),
        "scores": scores,
        "predictions": out.texts,
        "answers": [list(t.answers) for t in tasks],
        "kv_ratio": s.kv_ratio,
        "stored_fraction": s.stored_fraction,
        "kv_bytes": s.allocated_bytes,
        "full_bytes": s.full_cache_bytes,
        "policy_evicted": s.policy_evicted,
        "window": s.window,
        "capacity": s.capacity,
        "seconds": seconds,
    }
    if method == "quest":
        record["read_ratio"] = ratio  # Quest saves reads, not memory
    if s.kind == "dual" and s.global_lengths:
        lengths = np.asarray(s.global_lengths, np.float64)  # [L, B, K]
        beyond = np.asarray(
            [max(len(ids) + len(t) - 1 - s.window, 1) for ids, t in zip(out.prompt_tokens, out.tokens, strict=True)]
        )
        record["stored_per_layer_head"] = (lengths / beyond[None, :, None]).mean(axis=1).tolist()
    return record


def _ppl_cell(model, cfg: EvalConfig, n: int, method: str, ratio) -> dict:
    """Perplexity of the last PPL_SCORED tokens of an n-token real text after its first part was
    prefilled (and compressed) by the method: `prefill_context` then `context_logprobs`. "full"
    is the dual cache admitting and keeping everything (equal to the full cache, I1)."""
    import wgkv_jax

    ctx_len = n - PPL_SCORED - 1
    if method == "full":
        window = _block(min(cfg.window or 256, ctx_len // 2))
        kw = {"gate": "all", "cache": wgkv_jax.CacheConfig(window=window, capacity_fraction=1.0)}
    else:
        kw = _generate_kwargs(model, cfg, method, ratio, ctx_len)
    nll, stats, t0 = [], [], time.perf_counter()
    for i in range(cfg.samples):
        task = make_task("ppl", model.tokenizer, n, seed=cfg.seed + i)
        ids = model.encode_prompt(task.prompt, chat=False)
        if len(ids) < PPL_SCORED + 32:
            raise ValueError(f"ppl: a {n}-token cell leaves no context before the {PPL_SCORED} scored tokens")
        split = len(ids) - PPL_SCORED - 1
        ctx = wgkv_jax.prefill_context(model, ids[:split], attention_impl=cfg.attention_impl, **kw)
        lp = wgkv_jax.context_logprobs(model, ctx, ids[split:], attention_impl=cfg.attention_impl)
        nll.append(float(-lp.mean()))
        stats.append(ctx.stats)
    return {
        "task": "ppl",
        "length": n,
        "method": method,
        "keep_ratio": ratio,
        "accuracy": None,
        "ppl": float(np.exp(np.mean(nll))),
        "nll": nll,
        "kv_ratio": float(np.mean([s.kv_ratio for s in stats])),
        "stored_fraction": float(np.mean([s.stored_fraction for s in stats])),
        "kv_bytes": stats[-1].allocated_bytes,
        "full_bytes": stats[-1].full_cache_bytes,
        "policy_evicted": stats[-1].policy_evicted,
        "window": stats[-1].window,
        "capacity": stats[-1].capacity,
        "seconds": time.perf_counter() - t0,
    }


def run_matrix(
    model, cfg: EvalConfig, out_dir: str | Path, *, model_name: str = "", progress: bool = True
) -> list[dict]:
    """Every cell of `cfg`, resuming from `out_dir`/cells.jsonl; returns all the cells' records."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "cells.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["key"]] = rec
    name = model_name or model.config.name
    records = []
    todo = cfg.cells()
    bar = tqdm(todo, desc="evaluate", disable=not progress, unit="cell")
    for task, n, method, ratio in bar:
        key = _key(name, cfg, task, n, method, ratio)
        bar.set_postfix_str(f"{task} {n} {method} {ratio if ratio is not None else ''}")
        if key in done:
            records.append(done[key])
            continue
        rec = {"key": key, "model": name, **run_cell(model, cfg, task, n, method, ratio)}
        with path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        records.append(rec)
    return records


# ----------------------------------------------------------------------------- reports


def _label(rec) -> str:
    r = rec["keep_ratio"]
    return rec["method"] if r is None else f"{rec['method']}@{r:g}"


def summarize(records: Sequence[dict]) -> list[dict]:
    """One row per (length, method, keep ratio): accuracy per task, the mean, the measured KV ratio."""
    rows = {}
    for rec in records:
        k = (rec["length"], rec["method"], rec["keep_ratio"])
        row = rows.setdefault(
            k, {"length": k[0], "method": k[1], "keep_ratio": k[2], "tasks": {}, "kv": [], "ppl": None}
        )
        if rec["task"] == "ppl":
            row["ppl"] = rec["ppl"]
        else:
            row["tasks"][rec["task"]] = rec["accuracy"]
        row["kv"].append(rec["kv_ratio"])
    out = []
    for row in rows.values():
        accs = list(row["tasks"].values())
        out.append(
            {
                "length": row["length"],
                "method": row["method"],
                "keep_ratio": row["keep_ratio"],
                "accuracy": {t: a for t, a in sorted(row["tasks"].items())},
                "mean_accuracy": float(np.mean(accs)) if accs else None,
                "ppl": row["ppl"],
                "kv_ratio": float(np.mean(row["kv"])),
            }
        )
    return sorted(out, key=lambda r: (r["length"], r["method"], r["keep_ratio"] or 0))


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both lower KV ratio and higher accuracy, by KV ratio."""
    front, best = [], -1.0
    for kv, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((kv, acc))
            best = acc
    return front


def markdown_table(summary: Sequence[dict]) -> str:
    tasks = sorted({t for r in summary for t in r["accuracy"]})
    ppl = any(r.get("ppl") is not None for r in summary)
    cols = [*tasks, "mean"] if tasks else []
    cols += ["ppl"] if ppl else []
    lines = []
    for n in sorted({r["length"] for r in summary}):
        lines += [f"### {n} tokens", "", "| method | measured KV ratio | " + " | ".join(cols) + " |"]
        lines.append("|---|---|" + "---|" * len(cols))
        for r in (r for r in summary if r["length"] == n):
            label = r["method"] if r["keep_ratio"] is None else f"{r['method']} @ {r['keep_ratio']:g}"
            cells = [f"{100 * r['accuracy'][t]:.0f}" if t in r["accuracy"] else "" for t in tasks]
            if tasks:
                cells.append("" if r["mean_accuracy"] is None else f"{100 * r['mean_accuracy']:.1f}")
            if ppl:
                cells.append("" if r.get("ppl") is None else f"{r['ppl']:.2f}")
            lines.append(f"| {label} | {r['kv_ratio']:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _series(method: str) -> str:
    """Plot series of a method: the WG-KV threshold sweep is one curve."""
    return "wgkv (tau sweep)" if method == "wgkv" or method.startswith("wgkv@") else method


def _plot_series(ax, rows, field: str, scale: float = 1.0) -> None:
    """One line per method series through its (measured KV ratio, field) points."""
    for method in sorted({_series(r["method"]) for r in rows}):
        pts = sorted((r["kv_ratio"], r[field]) for r in rows if _series(r["method"]) == method)
        style = "o-" if method.startswith("wgkv") else "s--" if method in ("full", "local") else "^:"
        ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], style, label=method, ms=6)


def write_reports(records: Sequence[dict], out_dir: str | Path, *, title: str = "") -> dict:
    """results.json, table.md, accuracy_vs_kv.png, ppl_vs_kv.png (with ppl cells) and (when a gate
    ran) admission.png in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    summary = summarize(records)
    (out_dir / "results.json").write_text(json.dumps({"summary": summary, "cells": list(records)}, indent=1))
    (out_dir / "table.md").write_text((f"## {title}\n\n" if title else "") + markdown_table(summary))
    paths = {"results": str(out_dir / "results.json"), "table": str(out_dir / "table.md")}
    acc_rows = [r for r in summary if r["mean_accuracy"] is not None]
    if acc_rows:
        lengths = sorted({r["length"] for r in acc_rows})
        fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), squeeze=False)
        for ax, n in zip(axes[0], lengths, strict=True):
            rows = [r for r in acc_rows if r["length"] == n and r["method"] != "quest"]
            _plot_series(ax, rows, "mean_accuracy", scale=100)
            base = [
                (r["kv_ratio"], r["mean_accuracy"])
                for r in rows
                if r["method"] not in ("full",) and not r["method"].startswith("wgkv")
            ]
            front = pareto(base)
            if front:
                front.append((1.05, front[-1][1]))  # the front holds to the right edge
                ax.step(
                    [p[0] for p in front],
                    [100 * p[1] for p in front],
                    "k-",
                    where="post",
                    alpha=0.3,
                    lw=4,
                    label="eviction-only Pareto front",
                )
            ax.set(
                xlabel="measured KV ratio (kept / full)",
                ylabel="mean accuracy (%)",
                title=f"{title} {n} tokens".strip(),
                xlim=(0, 1.05),
                ylim=(-2, 102),
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out_dir / "accuracy_vs_kv.png", dpi=120)
        plt.close(fig)
        paths["plot"] = str(out_dir / "accuracy_vs_kv.png")
    ppl_rows = [r for r in summary if r.get("ppl") is not None]
    if ppl_rows:
        lengths = sorted({r["length"] for r in ppl_rows})
        fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), squeeze=False)
        for ax, n in zip(axes[0], lengths, strict=True):
            _plot_series(ax, [r for r in ppl_rows if r["length"] == n], "ppl")
            ax.set(
                xlabel="measured KV ratio (kept / full)",
                ylabel=f"perplexity of the last {PPL_SCORED} tokens",
                yscale="log",
                title=f"{title} {n} tokens".strip(),
                xlim=(0, 1.05),
            )
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(out_dir / "ppl_vs_kv.png", dpi=120)
        plt.close(fig)
        paths["ppl_plot"] = str(out_dir / "ppl_vs_kv.png")
    gate = [r for r in records if r["method"] == "wgkv" and "stored_per_layer_head" in r]
    if gate:
        heat = np.mean([np.asarray(r["stored_per_layer_head"]) for r in gate], axis=0)  # [L, K]
        fig, ax = plt.subplots(figsize=(4 + heat.shape[1] * 0.4, 6))
        im = ax.imshow(heat, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(heat.max()), 1e-3))
        ax.set(xlabel="KV head", ylabel="layer", title="WG-KV: admitted fraction of the tokens past W")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out_dir / "admission.png", dpi=120)
        plt.close(fig)
        paths["admission"] = str(out_dir / "admission.png")
    return paths
