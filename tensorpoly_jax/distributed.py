"""Joins a multi-host run: ``jax.distributed.initialize`` when the flags or the environment say
this is one process of several, before anything touches a JAX backend.

Explicit settings (flags, or ``TENSORPOLY_COORDINATOR_ADDRESS`` / ``TENSORPOLY_NUM_PROCESSES`` /
``TENSORPOLY_PROCESS_ID``) win; otherwise a multi-process SLURM step, Open MPI job or multi-host
TPU VM (or ``TENSORPOLY_MULTIHOST=1``, which ``launch/tpu.sh`` sets) lets JAX read the cluster
from its environment. A single process does nothing.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

ENV_PREFIX = "TENSORPOLY_"


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """Where this process sits in the run; all ``None`` means "detect from the environment"."""

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @classmethod
  def from_env(cls, environ=os.environ) -> "ProcessGroup":
    def read(name, convert=str):
      value = environ.get(ENV_PREFIX + name.upper())
      if value in (None, ""):
        return None
      try:
        return convert(value)
      except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={value!r} is not a valid {name}.") from None

    return cls(read("coordinator_address"), read("num_processes", int), read("process_id", int))

  def merged(self, other: "ProcessGroup") -> "ProcessGroup":
    """Fields set here win over ``other``'s."""
    return ProcessGroup(*(mine if mine is not None else theirs for mine, theirs in zip(
        dataclasses.astuple(self), dataclasses.astuple(other))))

  @property
  def explicit(self) -> bool:
    return any(v is not None for v in dataclasses.astuple(self))

  def check(self) -> None:
    missing = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is None]
    if missing:
      raise ValueError(
          f"multi-host settings are incomplete: {', '.join(missing)} not set. Give all of"
          " --coordinator_address, --num_processes and --process_id (or their TENSORPOLY_*"
          " environment variables), or none to let JAX detect the cluster.")
    if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
      raise ValueError(f"process_id={self.process_id} must be in [0, num_processes="
                       f"{self.num_processes}).")


def cluster_detected(environ=os.environ) -> bool:
  """True where the environment describes several processes that JAX can join on its own."""
  def count(name):
    try:
      return int(environ.get(name, "1"))
    except ValueError:
      return 1

  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  return (environ.get(ENV_PREFIX + "MULTIHOST") == "1"
          or ("SLURM_JOB_ID" in environ and count("SLURM_NTASKS") > 1)
          or count("OMPI_COMM_WORLD_SIZE") > 1
          or len([h for h in hosts.split(",") if h]) > 1
          or "MEGASCALE_COORDINATOR_ADDRESS" in environ)


def initialize(group: ProcessGroup = ProcessGroup(), environ=os.environ) -> bool:
  """Joins the run if it has several processes; returns whether ``initialize`` was called."""
  group = group.merged(ProcessGroup.from_env(environ))
  if group.explicit:
    group.check()
    if group.num_processes == 1:
      return False
    jax.distributed.initialize(group.coordinator_address, group.num_processes, group.process_id)
    return True
  if cluster_detected(environ):
    jax.distributed.initialize()
    return True
  return False


def any_process(flag: bool) -> bool:
  """Whether ``flag`` holds on any process: a decision every host must take the same way (a
  checkpoint one host cannot read, a lock process 0 could not take) is taken on this."""
  if jax.process_count() == 1:
    return flag
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def add_flags(parser) -> None:
  parser.add_argument("--coordinator_address", default=None,
                      help="host:port of process 0, for a multi-host run without cluster detection")
  parser.add_argument("--num_processes", type=int, default=None, metavar="N",
                      help="how many processes the run has (or TENSORPOLY_NUM_PROCESSES)")
  parser.add_argument("--process_id", type=int, default=None, metavar="I",
                      help="this process's index, in [0, num_processes) (or TENSORPOLY_PROCESS_ID)")


def group_from_args(args) -> ProcessGroup:
  return ProcessGroup(args.coordinator_address, args.num_processes, args.process_id)
