"""Logical axis rules (T5X vocabulary plus the adapter axes) and the shardings they give on a mesh."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import traverse_util
from flax.core import unfreeze
from flax.linen import partitioning as nn_partitioning
from flax.linen import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

# T5X's standard rules (1-D model parallelism) followed by the adapter axes, all replicated:
# adapters are small, so sharding them would cost more in collectives than it saves in memory.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("joined_kv", "model"),
    ("relpos_buckets", None),
    ("abspos_buckets", None),
    ("length", None),
    ("layers", None),
    ("stack", None),
    ("mlp_activations", None),
    ("tasks", None),
    ("splits", None),
    ("skills", None),
    ("lora_rank", None),
    ("order", None),
    ("leaf", None),
)


def make_mesh(model_parallel: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``('data', 'model')`` mesh over all (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  if model_parallel < 1 or len(devices) % model_parallel:
    raise ValueError(
        f"model_parallel={model_parallel} must divide the {len(devices)} devices; set"
        f" MODEL_PARALLEL to one of {[k for k in range(1, len(devices) + 1) if len(devices) % k == 0]}."
    )
  grid = np.asarray(devices).reshape(len(devices) // model_parallel, model_parallel)
  return Mesh(grid, MESH_AXES)


def logical_specs(variables) -> dict:
  """Logical PartitionSpecs for ``variables['params']``, read from the ``params_axes`` collection.

  ``nn.get_partition_spec`` does not see axes declared with ``param_with_axes``, so the specs come
  from the sown metadata; a param without metadata is replicated.
  """
  axes = nn_partitioning.get_axis_names(variables.get("params_axes", {}))
  flat_axes = traverse_util.flatten_dict(unfreeze(axes))
  flat_params = traverse_util.flatten_dict(unfreeze(variables["params"]))
  return traverse_util.unflatten_dict(
      {path: flat_axes.get(path, PartitionSpec()) for path in flat_params})


def param_shardings(variables, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
  """NamedShardings for ``variables['params']`` under the logical ``rules``."""
  return spmd.logical_to_mesh_sharding(logical_specs(variables), mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches split along their leading axis over the ``data`` mesh axis."""
  return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _dict_path(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(tree, params, params_shardings, mesh: Mesh):
  """Shardings for an optimizer state: a leaf shaped like the param whose dict path ends its own
  path (Adam moments, multi-transform inner states) takes that param's sharding; factored or
  scalar leaves are replicated."""
  flat_params = {_dict_path(p): (v.shape, s) for (p, v), s in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(params_shardings))}

  def sharding_for(path, leaf):
    keys = _dict_path(path)
    for start in range(len(keys)):
      match = flat_params.get(keys[start:])
      if match is not None and match[0] == getattr(leaf, "shape", None):
        return match[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(sharding_for, tree)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Global arrays from each process's share of the batch, split over the ``data`` axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
