"""Orbax checkpoints of the train state with their run metadata, and adapter-only export.

A checkpoint holds ``{step, params, opt_state, rng}`` (params: the trained ones only) and a JSON
``meta`` with the routing task-id map and the model/adapter configs, so a checkpoint is never read
with a shifted id map or a different adapter.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from flax.core import unfreeze
from jax.experimental import multihost_utils

from tensorpoly_jax import adaptation, distributed, paths
from tensorpoly_jax.t5 import layout

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_META = "adapter_config.json"
# Meta of an export that holds router rows only: the export they extend (``export_router_rows``).
BASE_ADAPTER = "base_adapter"
# Meta fields that must agree between a checkpoint and the run that resumes from it.
MATCHED_FIELDS = ("model", "adapter", "routing_ids", "stage", "train", "backbone")
# The train settings a resumed run may change when it asks for a new schedule.
SCHEDULE_FIELDS = ("steps", "optimizer")


class CheckpointMismatchError(ValueError):
  """A checkpoint written by a different run configuration."""


class CheckpointsDamagedError(RuntimeError):
  """Every checkpoint of a run was damaged and moved aside: nothing is left to resume from."""


# What orbax 0.12 / tensorstore 0.1 raise when a finished step's files are missing, cut short or
# altered (found by truncating, emptying, deleting and bit-flipping each file of a saved step):
# a JSON file (meta, state/_METADATA, array_metadatas) cut or altered gives JSONDecodeError or
# UnicodeDecodeError, one deleted FileNotFoundError, an item folder deleted KeyError('Item ... was
# not found in the checkpoint'), and a data file or OCDBT manifest gives tensorstore's status:
# NOT_FOUND (deleted), OUT_OF_RANGE (cut), DATA_LOSS (altered), FAILED_PRECONDITION (an
# undecodable zstd stream), raised as a ValueError or as the cause of orbax's read error.
# Anything else (RESOURCE_EXHAUSTED or MemoryError, PERMISSION_DENIED, UNAVAILABLE, a bug) says
# nothing about the files and propagates.
DAMAGE_STATUSES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS", "FAILED_PRECONDITION")


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  # Handlers by item name let ``item_metadata`` read a step's tree before restoring it.
  handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(paths.resolve(directory), options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()


def restore_latest(directory: str, keep: int, abstract_state, meta: dict,
                   new_schedule: bool = False):
  """``(manager, state, step)`` from the newest readable checkpoint (``(manager, None, 0)`` if
  there is none).

  Only a damaged checkpoint (``damage_in``: missing, cut or altered files) is moved aside to
  ``<directory>_corrupt/<step>``, by process 0 once every process agrees (one host's failed read
  is enough), with a warning naming it, never deleted; the previous one is tried. If none is left,
  CheckpointsDamagedError: a run never starts over from step 0 on its own. A readable checkpoint
  of another configuration (meta fields, or the state's paths, shapes and dtypes: another
  optimizer or adapter shape) raises CheckpointMismatchError before any step runs; any other
  error propagates as it was raised.
  """
  while True:
    mngr = manager(directory, keep)
    step = mngr.latest_step()
    if step is None:
      _refuse_if_quarantined(directory, mngr)
      return mngr, None, 0
    where = str(mngr.directory / str(step))
    try:
      state, damage = _restore(mngr, step, abstract_state, meta, where, new_schedule), None
    except Exception as err:
      damage = damage_in(err)
      if damage is None:
        mngr.close()
        raise
      state = None
    if not distributed.any_process(damage is not None):
      return mngr, state, step
    mngr.close()
    moved = quarantine(directory, step)
    # tensorstore's messages go on with the whole store spec: its first lines say what broke.
    reason = (f"{type(damage).__name__}: {str(damage)[:300]}" if damage is not None
              else "another process could not read it")
    warnings.warn(f"checkpoint {where} is damaged ({reason}); moved it to {moved} and falling back"
                  " to the previous checkpoint.", RuntimeWarning)


def _restore(mngr: ocp.CheckpointManager, step: int, abstract_state, meta: dict, where: str,
             new_schedule: bool):
  saved_meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  check_meta(saved_meta, meta, where, new_schedule)
  saved_tree = mngr.item_metadata(step).get("state")
  if saved_tree is None:  # orbax restores without it, but every save writes it
    raise FileNotFoundError(f"{where} has no state tree metadata (state/_METADATA)")
  check_structure(saved_tree.tree, abstract_state, where)
  return mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))["state"]


def damage_in(err: BaseException) -> BaseException | None:
  """The error in ``err`` or its causes that says the step's files are damaged (see
  ``DAMAGE_STATUSES``), or None: orbax raises tensorstore's errors as causes of its own."""
  while err is not None:
    if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError)):
      return err
    if isinstance(err, KeyError) and "was not found in the checkpoint" in str(err):
      return err
    if isinstance(err, ValueError) and str(err).split(":", 1)[0] in DAMAGE_STATUSES:
      return err
    err = err.__cause__
  return None


def quarantine(directory: str, step: int) -> str:
  """Moves checkpoint ``step`` out of the manager's sight, keeping every byte of it: process 0
  moves it and every process waits for that before listing the steps again. Returns where it went
  (on the other processes: the folder it went into)."""
  source = paths.resolve(directory)
  target = _quarantine_root(directory)
  if jax.process_index() == 0:
    target.mkdir(parents=True, exist_ok=True)
    target, suffix = target / f"{step}", 1
    while target.exists():
      target = target.parent / f"{step}.{suffix}"
      suffix += 1
    (source / str(step)).rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"tensorpoly quarantine {directory} {step}")
  return str(target)


def _quarantine_root(directory: str):
  source = paths.resolve(directory)
  return source.parent / f"{source.name}_corrupt"


def _refuse_if_quarantined(directory: str, mngr: ocp.CheckpointManager) -> None:
  """Closes ``mngr`` and raises CheckpointsDamagedError when every checkpoint was moved aside as
  damaged (by this run or an earlier one): starting over from step 0 is for the user to choose."""
  root = _quarantine_root(directory)
  if root.exists() and any(root.iterdir()):
    mngr.close()
    steps = ", ".join(sorted((p.name for p in root.iterdir()), key=lambda name: (len(name), name)))
    raise CheckpointsDamagedError(
        f"every checkpoint in {directory} was damaged and moved to {root} (steps {steps}); there"
        " is nothing left to resume from, and a run does not start over from step 0 on its own."
        f" To start over deliberately, move {root} out of the way (keep it to inspect the damaged"
        " files) or use a new --model_dir, and run the same command again.")


def check_structure(saved_tree, abstract_state, where: str) -> None:
  """Refuses a checkpoint whose state has other paths, shapes or dtypes than this run's (another
  optimizer or adapter shape): orbax would refuse some of them with its own message and silently
  cast the dtypes."""
  saved, expected = ocp.tree.to_flat_dict(saved_tree), ocp.tree.to_flat_dict(abstract_state)
  differences = []
  for path in sorted(set(saved) | set(expected)):
    have, want = _array_type(saved.get(path)), _array_type(expected.get(path))
    if have != want:
      differences.append(f"{'/'.join(path)}: checkpoint {have} vs run {want}")
  if differences:
    raise CheckpointMismatchError(
        f"checkpoint {where} holds a train state of another structure ({len(differences)}"
        f" differences: {'; '.join(differences[:6])}{'; ...' if len(differences) > 6 else ''}):"
        " it was written with another optimizer or adapter shape. Use a new --model_dir, or the"
        " configuration that wrote it.")


def _array_type(value) -> str:
  if value is None:
    return "absent"
  return f"{np.dtype(value.dtype).name}{list(value.shape)}"


def check_meta(saved: dict, expected: dict, where: str, new_schedule: bool = False) -> None:
  """Refuses a checkpoint whose run identity differs from this run's, naming every difference;
  with ``new_schedule`` a resumed run may change its steps and optimizer settings."""
  differences, schedule_only = [], True
  for field in MATCHED_FIELDS:
    saved_value, value = saved.get(field), expected.get(field)
    if saved_value == value:
      continue
    if field == "train" and isinstance(saved_value, dict) and isinstance(value, dict):
      changed = {k for k in set(saved_value) | set(value) if saved_value.get(k) != value.get(k)}
      if changed <= set(SCHEDULE_FIELDS) and new_schedule:
        continue
      schedule_only &= changed <= set(SCHEDULE_FIELDS)
    else:
      schedule_only = False
    differences.append(f"{field}: {_diff(saved_value, value)}")
  if differences:
    schedule = ("; or continue this run with the new steps and optimizer settings:"
                " --gin.NEW_SCHEDULE=True" if schedule_only else "")
    raise CheckpointMismatchError(
        f"checkpoint {where} was written by another run:\n  " + "\n  ".join(differences)
        + f"\nUse a new --model_dir, or the settings that wrote it{schedule}.")


def _diff(saved, expected) -> str:
  if isinstance(saved, dict) and isinstance(expected, dict):
    keys = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
    return ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {expected.get(k)!r}" for k in keys)
  return f"checkpoint {saved!r} vs run {expected!r}"


def abstract(tree):
  """Shape/dtype/sharding structs of a pytree (what restore fills in)."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def export_adapter(model_dir: str, name: str, adapter_params, meta: dict) -> str:
  """Writes only the adapter and router params (safetensors) and their config (JSON) to
  ``model_dir/name`` as one folder (``paths.write_folder``: an older export is replaced whole),
  refusing a path (``..``, a symlink) that resolves outside ``model_dir``."""
  from safetensors.numpy import save

  _check_inside(model_dir, name)
  directory = paths.resolve(model_dir) / name
  # One file layout whatever the run's: per-layer names, as HF conversion and T5X use.
  flat = traverse_util.flatten_dict(layout.unstack_layers(unfreeze(adapter_params)))
  # safetensors writes an array's buffer as if it were C-ordered: a transposed view would be
  # saved scrambled.
  weights = save({"/".join(k): np.ascontiguousarray(jax.device_get(v)) for k, v in flat.items()})
  paths.write_folder(directory, {ADAPTER_FILE: weights,
                                 ADAPTER_META: json.dumps(meta, indent=2, sort_keys=True)})
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


def export_fingerprint(directory: str) -> str:
  """A short digest of an adapter export's files: a result computed from it names it, and a
  retrained export under the same path is told apart."""
  directory = paths.resolve(directory)
  digest = hashlib.sha256()
  for name in (ADAPTER_META, ADAPTER_FILE):
    digest.update((directory / name).read_bytes())
  return digest.hexdigest()[:16]


def base_reference(base_dir: str) -> dict:
  """What a router-rows export records of the export it extends: its path and fingerprint."""
  return {"path": str(base_dir) if paths.is_remote(base_dir) else os.path.abspath(base_dir),
          "fingerprint": export_fingerprint(base_dir)}


def export_router_rows(model_dir: str, name: str, rows, meta: dict, base: dict) -> str:
  """An export of new tasks' router rows only (kilobytes), which ``load_adapter`` appends to the
  export ``base`` (``base_reference``) refers to, and refuses to load once that export is
  retrained or gone."""
  return export_adapter(model_dir, name, rows, {**meta, BASE_ADAPTER: base})


def load_adapter(directory: str) -> tuple[dict, dict]:
  """``(adapter params, meta)`` written by ``export_adapter`` (per-layer layout, host arrays); a
  router-rows export comes back with its rows appended to its base export's params."""
  params, meta = read_export(directory)
  base = meta.get(BASE_ADAPTER)
  if base is None:
    return params, meta
  check_base(directory, base)
  base_params, _ = load_adapter(base["path"])
  return adaptation.append_rows(base_params, params), meta


def check_base(directory: str, base: dict) -> None:
  """Refuses a router-rows export whose base export (``meta[BASE_ADAPTER]``) is gone or was
  rewritten since: its rows were trained with the base's params as they were."""
  where = base["path"]
  if not (paths.resolve(where) / ADAPTER_META).exists():
    raise FileNotFoundError(
        f"{directory} holds router rows for the adapter export {where}, which is gone: put that"
        " export back where it was, or adapt again from where it is now.")
  if export_fingerprint(where) != base["fingerprint"]:
    raise CheckpointMismatchError(
        f"{directory} holds router rows for the adapter export {where} as it was (fingerprint"
        f" {base['fingerprint']}), but it was since rewritten ({export_fingerprint(where)}):"
        " adapt again from the export as it is now.")


def read_export(directory: str) -> tuple[dict, dict]:
  """``(params, meta)`` as an export's files hold them (a router-rows export: its rows only)."""
  from safetensors.numpy import load

  directory = paths.resolve(directory)
  missing = [name for name in (ADAPTER_META, ADAPTER_FILE) if not (directory / name).exists()]
  if missing:
    raise FileNotFoundError(
        f"{directory} is not an adapter export (no {' or '.join(missing)}): set ADAPTER_DIR to"
        " the `adapter` folder a pretraining run wrote, or an adapted task's"
        " `adapt/<task>_seed<seed>/adapter`.")
  meta = json.loads((directory / ADAPTER_META).read_text())
  flat = load((directory / ADAPTER_FILE).read_bytes())  # a dict in no fixed order
  return traverse_util.unflatten_dict({tuple(k.split("/")): flat[k] for k in sorted(flat)}), meta
