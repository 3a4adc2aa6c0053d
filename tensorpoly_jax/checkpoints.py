"""Orbax checkpoints of the train state with their run metadata, and adapter-only export.

A checkpoint holds ``{step, params, opt_state, rng}`` (params: the trained ones only) and a JSON
``meta`` with the routing task-id map and the model/adapter configs, so a checkpoint is never read
with a shifted id map or a different adapter.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from flax.core import unfreeze

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_META = "adapter_config.json"
# Meta fields that must agree between a checkpoint and the run that resumes from it.
MATCHED_FIELDS = ("model", "adapter", "routing_ids", "stage")


class CheckpointMismatchError(ValueError):
  """A checkpoint written by a different run configuration."""


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, meta: dict):
  """``(state, step)`` from the newest checkpoint, or ``(None, 0)`` when there is none."""
  step = mngr.latest_step()
  if step is None:
    return None, 0
  saved_meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  check_meta(saved_meta, meta, os.path.join(str(mngr.directory), str(step)))
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"], step


def check_meta(saved: dict, expected: dict, where: str) -> None:
  for field in MATCHED_FIELDS:
    if saved.get(field) != expected.get(field):
      raise CheckpointMismatchError(
          f"checkpoint {where} was written with a different {field!r}:"
          f" {_diff(saved.get(field), expected.get(field))}. Use a new --model_dir, or the"
          " configuration that wrote it.")


def _diff(saved, expected) -> str:
  if isinstance(saved, dict) and isinstance(expected, dict):
    keys = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
    return ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {expected.get(k)!r}" for k in keys[:4])
  return f"checkpoint {saved!r} vs run {expected!r}"


def abstract(tree):
  """Shape/dtype/sharding structs of a pytree (what restore fills in)."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def export_adapter(directory: str, adapter_params, meta: dict) -> str:
  """Writes only the adapter and router params (safetensors) and their config (JSON)."""
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  flat = traverse_util.flatten_dict(unfreeze(adapter_params))
  save_file({"/".join(k): np.asarray(jax.device_get(v)) for k, v in flat.items()},
            os.path.join(directory, ADAPTER_FILE))
  with open(os.path.join(directory, ADAPTER_META), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  return directory


def load_adapter(directory: str) -> tuple[dict, dict]:
  """``(adapter params, meta)`` written by ``export_adapter``."""
  from safetensors.numpy import load_file

  with open(os.path.join(directory, ADAPTER_META)) as f:
    meta = json.load(f)
  flat = load_file(os.path.join(directory, ADAPTER_FILE))
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()}), meta
