"""The gate-training driver behind `python -m train.distill`: data, steps, validation, checkpoints.

Everything that changes per step lives in pytrees (gate params, optimizer state) and a small
JSON state (step, data iterator); restarting with the same output directory resumes exactly.
Outputs in `cfg.out`: checkpoints/ (orbax), metrics.jsonl, gate.safetensors, summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from configs.train import TrainConfig
from wgkv_jax import gates, sharding
from wgkv_jax.api import load_model
from wgkv_jax.kernels import dispatch
from wgkv_jax.train.checkpoint import GateCheckpointer, export_gate_safetensors
from wgkv_jax.train.data import BatchIterator, DataConfig, build_dataset
from wgkv_jax.train.objective import SoftGateAttend
from wgkv_jax.train.step import eval_step, make_optimizer, train_step


def _fingerprint(cfg: TrainConfig, model_cfg) -> dict:
    return {
        "model": model_cfg.name,
        "n_layers": model_cfg.n_layers,
        "n_kv_heads": model_cfg.n_kv_heads,
        "head_dim": model_cfg.head_dim,
        "gate": cfg.gate,
        "expand": cfg.expand,
    }


def _floats(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def validate(gate_params, params, model_cfg, attend, val_bt: np.ndarray, cfg: TrainConfig, put) -> dict:
    """Mean validation metrics over up to `cfg.val_batches` batches of the held-out split."""
    rows = []
    for i in range(min(cfg.val_batches, len(val_bt) // cfg.batch_size)):
        batch = put(val_bt[i * cfg.batch_size : (i + 1) * cfg.batch_size])
        rows.append(
            _floats(eval_step(gate_params, params, batch, cfg=model_cfg, attend=attend, lam=cfg.lam, tau=cfg.tau))
        )
    return {f"val_{k}": float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def fit(cfg: TrainConfig, *, progress: bool = True) -> dict:
    """Train (or resume) gates as configured; returns the final summary dict."""
    dispatch.check_impl(cfg.attention_impl)  # before anything slow
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n_dev = jax.device_count()
    if cfg.batch_size % n_dev:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {n_dev} devices (data parallel)")
    mesh = sharding.make_mesh(data=n_dev, model=1)
    model = load_model(cfg.model, dtype=None if cfg.dtype == "auto" else cfg.dtype, mesh=mesh)
    mcfg = model.config
    data = build_dataset(
        DataConfig(corpora=cfg.corpora, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction, seed=cfg.seed),
        model.tokenizer,
        progress=progress,
    )
    train_bt, val_bt = data.train, data.val
    if len(train_bt) < cfg.batch_size:
        raise ValueError(f"only {len(train_bt)} training samples of {cfg.seq_len} tokens; need >= batch_size")
    batches = BatchIterator(train_bt, cfg.batch_size, cfg.seed)

    gate = gates.make(cfg.gate, mcfg, expand=cfg.expand)
    impl = dispatch.soft_impl(cfg.attention_impl, mcfg.head_dim)
    attend = SoftGateAttend(gate, window=cfg.window, eps=cfg.eps, block=cfg.attn_block, impl=impl)
    optimizer = make_optimizer(cfg.lr, cfg.weight_decay, cfg.steps, cfg.warmup_frac)
    replicated = sharding.replicated(mesh)
    batch_sharding = sharding.logical_sharding(("batch", "seq"), (cfg.batch_size, cfg.seq_len), mesh)

    def put(x):
        return jax.device_put(jnp.asarray(x, jnp.int32), batch_sharding)

    gate_params = jax.device_put(gates.init_stacked(gate, mcfg, jax.random.PRNGKey(cfg.seed)), replicated)
    opt_state = jax.device_put(optimizer.init(gate_params), replicated)
    ckpt = GateCheckpointer(out / "checkpoints", fingerprint=_fingerprint(cfg, mcfg))
    step = 0
    if ckpt.latest_step() is not None:
        gate_params, opt_state, meta = ckpt.restore(None, gate_params, opt_state)
        gate_params, opt_state = jax.device_put((gate_params, opt_state), replicated)
        step = int(meta["step"])
        batches.restore(meta["data_state"])
        print(f"resumed from {out / 'checkpoints'} at step {step}")

    log = (out / "metrics.jsonl").open("a")
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc=f"gates λ={cfg.lam}", unit="step")
    t_last, steps_since, metrics = time.perf_counter(), 0, {}
    while step < cfg.steps:
        gate_params, opt_state, m = train_step(
            gate_params,
            opt_state,
            model.params,
            put(next(batches)),
            cfg=mcfg,
            attend=attend,
            optimizer=optimizer,
            lam=cfg.lam,
            tau=cfg.tau,
        )
        step += 1
        steps_since += 1
        bar.update(1)
        row = {}
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics = _floats(m)
            now = time.perf_counter()
            metrics["tokens_per_s"] = steps_since * tokens_per_step / (now - t_last)
            t_last, steps_since = now, 0
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                distill=f"{metrics['distill']:.4f}",
                sparsity=f"{metrics['sparsity']:.3f}",
                admit=f"{metrics['admit']:.3f}",
                tok_s=f"{metrics['tokens_per_s']:.0f}",
            )
            row |= metrics
        if step % cfg.val_every == 0 or step == cfg.steps:
            row |= validate(gate_params, model.params, mcfg, attend, val_bt, cfg, put)
        if row:
            log.write(json.dumps({"step": step, **row}) + "\n")
            log.flush()
        if step % cfg.save_every == 0 or step == cfg.steps:
            ckpt.save(
                step,
                gate_params,
                opt_state,
                {"step": step, "data_state": batches.state(), "config": dataclasses.asdict(cfg)},
            )
    bar.close()
    log.close()
    ckpt.close()
    final = validate(gate_params, model.params, mcfg, attend, val_bt, cfg, put)
    meta = {"config": dataclasses.asdict(cfg), "fingerprint": _fingerprint(cfg, mcfg), "step": step, **final}
    export_gate_safetensors(out / "gate.safetensors", jax.device_get(gate_params), meta)
    summary = {"step": step, **{k: v for k, v in metrics.items() if k != "grad_norm"}, **final}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
