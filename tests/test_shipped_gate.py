"""The trained gates shipped with the package, on held-out text (slow: real model)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from wgkv_jax import gates
from wgkv_jax.train.data import DataConfig, build_dataset
from wgkv_jax.train.evaluate import AdmissionAttend, admission_nll, kv_ratio
from wgkv_jax.train.objective import admission_rate


@pytest.mark.slow
def test_shipped_gate_beats_random_admission_at_equal_rate(smollm2, tmp_path):
    gate, params, meta = gates.load("smollm2-135m", smollm2.config)
    cfg = meta["config"]
    assert meta["fingerprint"]["n_layers"] == smollm2.config.n_layers
    data = DataConfig(corpora=tuple(cfg["corpora"]), seq_len=1024, val_fraction=cfg["val_fraction"], seed=cfg["seed"])
    tokens = jnp.asarray(np.asarray(build_dataset(data, smollm2.tokenizer, cache_dir=tmp_path, progress=False).val[:1]))
    window = cfg["window"]

    def ppl(attend, gate_params=None):
        nll, n, admit = admission_nll(smollm2.params, gate_params, tokens, cfg=smollm2.config, attend=attend)
        return math.exp(float(nll) / int(n)), admit

    ppl_gate, admit = ppl(AdmissionAttend("gate", window, gate, tau=cfg["tau"], block=256), params)
    rate = float(admission_rate(admit.astype(jnp.float32), window, 0.5))
    ppl_full, _ = ppl(AdmissionAttend("full", window, block=256))
    ppl_rand, _ = ppl(AdmissionAttend("random", window, rate=rate, seed=0, block=256))
    assert 0.02 < rate < 0.3  # the shipped trade-off admits a minority of the tokens leaving the window
    assert float(kv_ratio(admit, window)) < 0.5
    assert ppl_gate < ppl_rand
    assert ppl_gate < 1.05 * ppl_full


def test_shipped_qwen_gate_matches_its_model_and_gates_in_range():
    """The Qwen2.5-Coder-0.5B gate (trained on the GPU) loads against that architecture's shapes
    (Qwen2.5-0.5B's: 24 layers, 2 KV heads, head_dim 64) and scores keys into [0, 1]."""
    import jax

    from configs.models import QWEN25_05B, SMOLLM2_135M

    gate, params, meta = gates.load("qwen2.5-coder-0.5b", QWEN25_05B)
    assert meta["config"]["model"] == "qwen2.5-coder-0.5b" and meta["config"]["lam"] == 0.32
    assert meta["fingerprint"]["n_layers"] == QWEN25_05B.n_layers
    k = jax.random.normal(jax.random.key(0), (2, 16, QWEN25_05B.n_kv_heads, QWEN25_05B.head_dim))
    g = gate.apply({"params": jax.tree.map(lambda x: x[0], params)}, k, k, k)
    assert g.shape == (2, QWEN25_05B.n_kv_heads, 16) and bool(jnp.all((g >= 0) & (g <= 1))) and float(jnp.std(g)) > 0
    with pytest.raises(ValueError):
        gates.load("qwen2.5-coder-0.5b", SMOLLM2_135M)  # 30 layers, 3 KV heads: refused, not misread
