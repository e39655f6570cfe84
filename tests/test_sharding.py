"""Sharded == unsharded on 8 fake CPU devices (see conftest: --xla_force_host_platform_device_count=8)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import TINY_LLAMA, TINY_QWEN2

import wgkv_jax
from wgkv_jax import sharding
from wgkv_jax.model import init_params, param_logical_axes

# conftest sets XLA_FLAGS before jax starts; fail loudly rather than skip if that did not take effect
assert jax.device_count() >= 8, f"sharding tests need 8 (fake) devices, found {jax.device_count()}"


@pytest.mark.parametrize("cfg", [TINY_LLAMA, TINY_QWEN2], ids=lambda c: c.arch)
@pytest.mark.parametrize("data,model", [(4, 2), (2, 4), (8, 1)])
def test_sharded_logits_equal_unsharded(cfg, data, model):
    host = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(0)))
    plain = wgkv_jax.Model(config=cfg, params=jax.device_put(host))
    sharded = plain.shard(wgkv_jax.make_mesh(data=data, model=model))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 24)).astype(np.int32)
    np.testing.assert_allclose(sharded.logits(tokens), plain.logits(tokens), atol=1e-5, rtol=1e-5)
    wq = sharded.params["layers"]["wq"]
    assert wq.sharding.spec[2] == ("model" if model > 1 else None)  # query heads split over `model`
    assert len(wq.sharding.device_set) == 8


def test_sharded_generation_equals_unsharded():
    cfg = TINY_LLAMA
    host = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(1)))
    plain = wgkv_jax.Model(config=cfg, params=jax.device_put(host))
    sharded = plain.shard(wgkv_jax.make_mesh(data=4, model=2))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 9, 14, 5)]
    a = wgkv_jax.generate(plain, prompts, max_new_tokens=6)
    b = wgkv_jax.generate(sharded, prompts, max_new_tokens=6)
    assert a.tokens == b.tokens


def test_logical_spec_rules():
    mesh = wgkv_jax.make_mesh(data=4, model=2)
    # SmolLM2 has 3 KV heads: a 2-way model axis cannot split them, so they are replicated
    assert sharding.logical_spec(("batch", "kv_heads"), (8, 3), mesh) == jax.sharding.PartitionSpec("data", None)
    assert sharding.logical_spec(("batch", "kv_heads"), (8, 4), mesh) == jax.sharding.PartitionSpec("data", "model")
    with pytest.raises(KeyError, match="unknown logical axis 'heads'"):
        sharding.logical_spec(("heads",), (4,), mesh)
    with pytest.raises(ValueError, match="do not match array rank 1"):
        sharding.logical_spec(("batch", "embed"), (4,), mesh)
    with pytest.raises(ValueError, match="data=3 x model=2 = 6 does not match 8 devices"):
        wgkv_jax.make_mesh(data=3, model=2)


def test_param_axes_cover_every_param():
    for cfg in (TINY_LLAMA, TINY_QWEN2):
        params = init_params(cfg, jax.random.PRNGKey(0))
        axes = param_logical_axes(cfg)
        assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple))
        for p, a in zip(
            jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)), strict=True
        ):
            assert p.ndim == len(a)
