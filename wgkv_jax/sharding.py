"""Device mesh and logical-axis sharding rules: the only module that names mesh axes.

Arrays are described by *logical* axes ("batch", "kv_heads", "ffn", ...). `RULES` maps each
logical axis to a mesh axis of the (data, model) mesh. A dimension that the mesh axis does
not divide is replicated instead (SmolLM2 has 3 KV heads; a 2-way model axis cannot split them).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"

# logical axis -> mesh axis (None = replicated)
RULES: dict[str, str | None] = {
    "batch": DATA,
    "vocab": MODEL,
    "q_heads": MODEL,
    "kv_heads": MODEL,
    "ffn": MODEL,
    "embed": None,
    "head_dim": None,
    "layers": None,
    "seq": None,
    "cache_seq": None,
}


def make_mesh(data: int | None = None, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all). `data` defaults to n_devices // model."""
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        data = len(devices) // model
    if data * model != len(devices):
        raise ValueError(f"mesh data={data} x model={model} = {data * model} does not match {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array with logical `axes`; indivisible dimensions are replicated."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match array rank {len(shape)} (shape {tuple(shape)})")
    spec = []
    for name, size in zip(axes, shape, strict=True):
        if name is not None and name not in RULES:
            raise KeyError(f"unknown logical axis {name!r}; known: {sorted(RULES)}")
        mesh_axis = RULES.get(name) if name is not None else None
        if mesh_axis is not None and (mesh.shape[mesh_axis] == 1 or size % mesh.shape[mesh_axis]):
            mesh_axis = None
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def logical_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, shape, mesh))


def tree_shardings(tree, axes_tree, mesh: Mesh):
    """NamedShardings for a pytree of arrays given a matching pytree of logical-axis tuples."""
    return jax.tree.map(
        lambda x, axes: logical_sharding(axes, x.shape, mesh),
        tree,
        axes_tree,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, str | None) for a in x),
    )


def shard_tree(tree, axes_tree, mesh: Mesh):
    """Place a pytree of host arrays on the mesh according to its logical axes."""
    return jax.device_put(tree, tree_shardings(tree, axes_tree, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
