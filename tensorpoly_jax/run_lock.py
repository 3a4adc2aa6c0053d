"""One writer per model_dir: ``<model_dir>/.lock`` names the run that writes there (host, pid,
start time as JSON). Process 0 takes it before a run's first write and removes it when the run
ends, however it ends, so a second run into the same folder stops at once instead of interleaving
its checkpoints and metrics with the first's.

A lock left by a killed run (SIGKILL, the OOM killer) on this host, whose pid is no longer alive,
is taken over with a warning: the same command must resume after a crash, and on the same host a
dead pid is certain. A lock of another host is never taken over: whether that run still lives
cannot be known from here, so the error names it and says how to remove it.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import warnings

import jax

from tensorpoly_jax import distributed, paths

LOCK_FILE = ".lock"


class ModelDirLocked(RuntimeError):
  """Another run holds the model dir's lock."""


@contextlib.contextmanager
def hold(model_dir: str):
  """Holds ``model_dir``'s lock for the block; every process raises ModelDirLocked when process 0
  could not take it."""
  lock = paths.resolve(model_dir) / LOCK_FILE
  mine = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
  refused = None
  if jax.process_index() == 0:
    try:
      _take(lock, mine)
    except ModelDirLocked as err:
      refused = err
  if distributed.any_process(refused is not None):
    raise refused or ModelDirLocked(f"process 0 could not lock {model_dir}; its error names the"
                                    " run that holds it.")
  try:
    yield
  finally:
    if jax.process_index() == 0 and _read(lock) == mine:  # never a lock another run took over
      lock.unlink()


def _take(lock, mine: dict) -> None:
  try:
    _create(lock, json.dumps(mine))
    return
  except FileExistsError:
    holder = _read(lock)
  if not _dead_here(holder):
    raise ModelDirLocked(_held(lock, holder))
  _remove_stale(lock, holder)
  warnings.warn(f"took over {lock}: the run that left it ({_who(holder)}) is no longer alive on"
                " this host.", RuntimeWarning)
  try:
    _create(lock, json.dumps(mine))
  except FileExistsError:  # another run took it over first
    raise ModelDirLocked(_held(lock, _read(lock))) from None


def _create(lock, text: str) -> None:
  """Writes the lock if there is none, else FileExistsError."""
  if paths.is_remote(lock):
    # Object stores have no exclusive create through epath: two runs started in the same second
    # can both pass this check.
    if lock.exists():
      raise FileExistsError(str(lock))
    lock.write_text(text)
    return
  with open(lock, "x") as f:  # O_EXCL: of two runs starting together, exactly one creates it
    f.write(text)


def _remove_stale(lock, holder: dict) -> None:
  """Removes the lock of a dead run, unless another run took it over since it was read."""
  if paths.is_remote(lock):
    lock.unlink()
    return
  aside = lock.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
  try:
    os.rename(lock, aside)  # atomic: of two runs taking over, one moves the stale lock
  except FileNotFoundError:
    raise ModelDirLocked(_held(lock, _read(lock))) from None
  moved = _read(aside)
  if moved != holder:  # a live run's lock, written after the stale one was read: give it back
    os.rename(aside, lock)
    raise ModelDirLocked(_held(lock, moved))
  os.remove(aside)


def _read(lock) -> dict:
  """The holder a lock names; ``{}`` when it is gone, empty or cut (a writer killed mid-write)."""
  try:
    holder = json.loads(lock.read_text())
  except (FileNotFoundError, ValueError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _dead_here(holder: dict) -> bool:
  """Whether the holder ran on this host and its pid is gone (not merely another user's)."""
  if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
    return False
  try:
    os.kill(holder["pid"], 0)  # signal 0 only asks whether the pid exists
  except ProcessLookupError:
    return True
  except PermissionError:  # it exists, run by another user
    pass
  return False


def _who(holder: dict) -> str:
  if not holder:
    return "a run whose lock is empty or unreadable"
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, started"
          f" {holder.get('started')}")


def _held(lock, holder: dict) -> str:
  here = holder.get("host") == socket.gethostname()
  status = ("it is still running on this host" if here else
            "whether it still runs cannot be checked from this host")
  return (f"model_dir {lock.parent} is in use by another run ({_who(holder)}; {status}): two runs"
          " writing one model_dir would mix their checkpoints and metrics. Wait for it to end or"
          f" use another --model_dir; if that run is gone, remove {lock} and run again.")
