"""Orbax checkpoints of the train state with their run metadata, and adapter-only export.

A checkpoint holds ``{step, params, opt_state, rng}`` (params: the trained ones only) and a JSON
``meta`` with the routing task-id map and the model/adapter configs, so a checkpoint is never read
with a shifted id map or a different adapter.
"""
from __future__ import annotations

import json
import os
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from flax.core import unfreeze

from tensorpoly_jax import paths
from tensorpoly_jax.t5 import layout

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_META = "adapter_config.json"
# Meta fields that must agree between a checkpoint and the run that resumes from it.
MATCHED_FIELDS = ("model", "adapter", "routing_ids", "stage")


class CheckpointMismatchError(ValueError):
  """A checkpoint written by a different run configuration."""


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(paths.resolve(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()


def restore_latest(directory: str, keep: int, abstract_state, meta: dict):
  """``(manager, state, step)`` from the newest readable checkpoint (``(manager, None, 0)`` if
  there is none).

  An unreadable checkpoint (half-written, truncated) is moved aside to
  ``<directory>_corrupt/<step>`` with a warning naming it, never deleted or overwritten, and the
  previous one is tried. A readable checkpoint of another configuration raises
  CheckpointMismatchError before any step runs.
  """
  while True:
    mngr = manager(directory, keep)
    step = mngr.latest_step()
    if step is None:
      return mngr, None, 0
    where = str(mngr.directory / str(step))
    try:
      saved_meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      check_meta(saved_meta, meta, where)
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
      return mngr, restored["state"], step
    except CheckpointMismatchError:
      mngr.close()
      raise
    except Exception as err:  # orbax/tensorstore raise many types for damaged files
      mngr.close()
      moved = quarantine(directory, step)
      warnings.warn(f"checkpoint {where} is unreadable ({type(err).__name__}: {err}); moved it to"
                    f" {moved} and falling back to the previous checkpoint.", RuntimeWarning)


def quarantine(directory: str, step: int) -> str:
  """Moves checkpoint ``step`` out of the manager's sight, keeping every byte of it."""
  source = paths.resolve(directory)
  target_root = source.parent / f"{source.name}_corrupt"
  target_root.mkdir(parents=True, exist_ok=True)
  target = target_root / f"{step}"
  suffix = 1
  while target.exists():
    target = target_root / f"{step}.{suffix}"
    suffix += 1
  (source / str(step)).rename(target)
  return str(target)


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


def export_adapter(model_dir: str, name: str, adapter_params, meta: dict) -> str:
  """Writes only the adapter and router params (safetensors) and their config (JSON) to
  ``model_dir/name``, refusing a path (``..``, a symlink) that resolves outside ``model_dir``."""
  from safetensors.numpy import save

  _check_inside(model_dir, name)
  directory = paths.resolve(model_dir) / name
  directory.mkdir(parents=True, exist_ok=True)
  # One file layout whatever the run's: per-layer names, as HF conversion and T5X use.
  flat = traverse_util.flatten_dict(layout.unstack_layers(unfreeze(adapter_params)))
  # safetensors writes an array's buffer as if it were C-ordered: a transposed view would be
  # saved scrambled.
  (directory / ADAPTER_FILE).write_bytes(
      save({"/".join(k): np.ascontiguousarray(jax.device_get(v)) for k, v in flat.items()}))
  (directory / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
  return str(directory)


def _check_inside(model_dir: str, name: str) -> None:
  """Refuses an export name (``..``, a symlink) that resolves outside ``model_dir``."""
  if paths.is_remote(model_dir):
    if ".." in name.split("/"):
      raise ValueError(f"adapter export {name!r} leaves model_dir {model_dir!r}; exports stay"
                       " inside the model directory.")
    return
  directory = os.path.join(model_dir, name)
  root = os.path.realpath(model_dir)
  if os.path.commonpath([root, os.path.realpath(directory)]) != root:
    raise ValueError(f"adapter export {directory!r} resolves to {os.path.realpath(directory)!r},"
                     f" outside model_dir {root!r}; exports stay inside the model directory.")


def load_adapter(directory: str) -> tuple[dict, dict]:
  """``(adapter params, meta)`` written by ``export_adapter`` (per-layer layout, host arrays)."""
  from safetensors.numpy import load

  directory = paths.resolve(directory)
  meta = json.loads((directory / ADAPTER_META).read_text())
  flat = load((directory / ADAPTER_FILE).read_bytes())  # a dict in no fixed order
  return traverse_util.unflatten_dict({tuple(k.split("/")): flat[k] for k in sorted(flat)}), meta
