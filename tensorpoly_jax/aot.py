"""Ahead-of-time compile of the real steps for a target (a TPU topology through libtpu, on any
host, or this machine's devices) from shapes alone: no weights, no data, no accelerator.

Reports what a run needs before anyone pays for a pod: per-device argument / temporary / output
bytes against the device's HBM, compile seconds, FLOPs per device, the collectives XLA inserted
and the kernels a step runs (MaxText's ``train_compile.py`` idea). The ``frozen`` stage is the
pretraining step without an adapter, only the relative position biases trained: the baseline an
adapter step's kernels are compared with, since its backward still runs through every block.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tensorpoly_jax import evaluation, partitioning, trainer
from tensorpoly_jax.hlo_counts import kernel_counts
from tensorpoly_jax.t5.model import (EncoderDecoder, T5Config, abstract_variables, merge_params,
                                     split_params)

STAGES = ("backbone", "pretrain", "frozen", "adapt", "eval")
LM_STAGES = ("backbone", "pretrain", "frozen")  # trained on the LM loss; the others on T-Few's
# HBM per chip; a chip exposes one device per TensorCore unless it runs as a megacore.
CHIP_HBM_GIB = {"TPU v2": 16, "TPU v3": 32, "TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95,
                "TPU v6 lite": 32}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_TOPOLOGY_EXAMPLES = "v4:2x2x4 (v4-32), v5e:4x4 (v5litepod-16), v5p:2x2x2, v6e:2x2, or local"


@dataclasses.dataclass(frozen=True)
class RelativeBiasParams(trainer.AdapterParams):
  """The frozen stage's split: only the relative position biases train. They enter every
  block's attention logits, so their gradient needs the whole activation backward."""

  def split(self, params) -> tuple[dict, dict]:
    return split_params(params, lambda path: "relpos_bias" in path)


class DoesNotFit(RuntimeError):
  """The compiled step needs more memory per device than the device has; ``report`` says how much."""

  def __init__(self, message: str, report: dict):
    super().__init__(message)
    self.report = report


@dataclasses.dataclass(frozen=True)
class StepShapes:
  """The sizes a step is compiled for (gin: ``compile_step.*``)."""

  batch_size: int = 32
  inputs_length: int = 256
  targets_length: int = 256
  num_choices: int = 4  # answer choices per example (adapt and eval stages)
  num_tasks: int = 318  # routing tasks in pretraining (T0: every dataset x template pair)
  model_parallel: int = 1
  param_dtype: str = "float32"  # the frozen backbone's stored dtype (`convert --dtype`)

  def train_config(self, optimizer=None) -> trainer.TrainConfig:
    """The run settings these shapes stand for (default optimizer: the T0 recipe's)."""
    return trainer.TrainConfig(batch_size=self.batch_size, inputs_length=self.inputs_length,
                               targets_length=self.targets_length,
                               model_parallel=self.model_parallel,
                               **({"optimizer": optimizer} if optimizer is not None else {}))


def target_devices(topology: str) -> list:
  """The devices of a TPU topology (``v4:2x2x4``; needs libtpu) or, for ``local``, this host's."""
  if topology == "local":
    return jax.devices()
  if not re.fullmatch(r"[A-Za-z0-9_ ]+[=_:][0-9x]+(_twisted|_untwisted)?", topology):
    raise ValueError(f"--topology={topology!r} is not a topology name; use one like"
                     f" {_TOPOLOGY_EXAMPLES}.")
  # Describing a topology reserves no TPU, so a compile may run beside another libtpu user
  # (a second compile, a test worker) instead of failing on libtpu's one-process lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as err:  # libtpu missing, or a name it does not know
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise ValueError(
        f"--topology={topology!r}: libtpu could not describe it ({first[:200]}). Use a name like"
        f" {_TOPOLOGY_EXAMPLES}; compiling for TPUs needs libtpu: pip install"
        " 'tensorpoly-jax[tpu]'.") from None


def device_hbm_bytes(devices) -> int | None:
  """Memory of one device: a TPU chip's HBM shared by its cores, or what the runtime reports."""
  device = devices[0]
  if device.platform == "tpu" and device.device_kind in CHIP_HBM_GIB:
    cores = sum(1 for d in devices if getattr(d, "coords", None) == getattr(device, "coords", 0))
    return CHIP_HBM_GIB[device.device_kind] * 2**30 // max(1, cores)
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return (stats or {}).get("bytes_limit")


def make_mesh(devices, shapes: StepShapes):
  """The run's mesh, checking that the batch splits over its ``data`` axis (before compiling)."""
  mesh = partitioning.make_mesh(shapes.model_parallel, devices)
  if shapes.batch_size % mesh.shape["data"]:
    raise ValueError(
        f"batch_size={shapes.batch_size} cannot be split over the mesh's data axis"
        f" ({mesh.shape['data']} = {len(devices)} devices / model_parallel"
        f" {shapes.model_parallel}); set BATCH_SIZE to a multiple of {mesh.shape['data']} or"
        " raise MODEL_PARALLEL.")
  return mesh


def _abstract(tree, shardings, dtype=None):
  return jax.tree_util.tree_map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, dtype or leaf.dtype,
                                                  sharding=sharding), tree, shardings)


def _batch(stage: str, shapes: StepShapes, mesh, routed: bool) -> dict:
  b, l, t, c = shapes.batch_size, shapes.inputs_length, shapes.targets_length, shapes.num_choices
  if stage in LM_STAGES:
    spec = {"encoder_input_tokens": (b, l), "decoder_input_tokens": (b, t),
            "decoder_target_tokens": (b, t), "decoder_loss_weights": (b, t)}
  else:
    spec = {"encoder_input_tokens": (b, l), "choice_tokens": (b, c, t), "label": (b,)}
  if routed:
    spec["task_ids"] = (b,)
  sharding = partitioning.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "decoder_loss_weights" else jnp.int32,
                                  sharding=sharding) for k, shape in spec.items()}


def lower(stage: str, config: T5Config, shapes: StepShapes, mesh, train: trainer.TrainConfig):
  """``(lowered step, its abstract sharded arguments)`` for ``stage``."""
  if stage not in STAGES:
    raise ValueError(f"--stage={stage!r} is unknown; choose one of {STAGES}.")
  if stage in ("backbone", "frozen"):
    config = config.replace(adapter=None)
  elif config.adapter is None:
    raise ValueError(f"--stage={stage} needs an adapter: add --gin_file=adapters/<method>.gin.")
  else:  # few-shot adaptation routes a held-out task with one new router row
    tasks = shapes.num_tasks + (stage != "pretrain")
    config = config.replace(adapter=config.adapter.with_tasks(tasks))
  model = EncoderDecoder(config)
  variables = abstract_variables(model)
  shardings = partitioning.param_shardings(variables, mesh)
  frozen_dtype = jnp.dtype(shapes.param_dtype)
  routed = config.adapter is not None and config.adapter.routed
  batch = _batch(stage, shapes, mesh, routed)
  train = dataclasses.replace(train, loss="lm" if stage in LM_STAGES else "tfew",
                              train_backbone=stage == "backbone")
  trained = RelativeBiasParams() if stage == "frozen" else trainer.AdapterParams()
  if train.train_backbone:
    trainable, frozen = _abstract(variables["params"], shardings), {}
    trainable_shardings, frozen_shardings = shardings, {}
  else:
    (trainable_shapes, frozen_shapes), (trainable_shardings, frozen_shardings) = (
        trained.split(variables["params"]), trained.split(shardings))
    trainable = _abstract(trainable_shapes, trainable_shardings)
    frozen = _abstract(frozen_shapes, frozen_shardings, frozen_dtype)
  if stage == "eval":
    args = (merge_params(trainable, frozen), batch["encoder_input_tokens"],
            batch["choice_tokens"], batch.get("task_ids"))
    return evaluation.Scorer(model, mesh).score.lower(*args), args
  steps = trainer.build_steps(model, train, mesh, trainable, trainable_shardings,
                              frozen_shardings, trained)
  state = _abstract(jax.eval_shape(steps.init, trainable, jax.random.PRNGKey(0)),
                    steps.state_shardings)
  return steps.step.lower(state, frozen, batch), (state, frozen, batch)


_HBM_ERROR = re.compile(r"memory required for HLO temporaries \(([\d.]+)G\) exceeds available"
                        r" HBM \(([\d.]+)G\)")


def argument_bytes(args) -> int:
  """Bytes of one device's shards of abstract sharded arguments."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in jax.tree_util.tree_leaves(args))


def collectives(hlo_text: str) -> dict[str, int]:
  """How many of each collective op the compiled HLO holds (async start/done pairs once), each
  once however often it runs (``kernels`` counts what runs per step)."""
  counts = collections.Counter()
  for op in COLLECTIVES:
    counts[op] = len(re.findall(rf"= [^=]*?\b{op}(-start)?\(", hlo_text))
  return {op: n for op, n in counts.items() if n}


def compile_stage(stage: str, config: T5Config, shapes: StepShapes, topology: str,
                  train: trainer.TrainConfig | None = None,
                  kernel_group: Callable[[str], str] | None = None) -> dict:
  """Compiles ``stage`` for ``topology`` and returns the report (see ``tensorpoly compile``);
  ``kernel_group`` also counts its fusions by group (``hlo_counts.kernel_counts``)."""
  devices = target_devices(topology)
  mesh = make_mesh(devices, shapes)
  train = train or shapes.train_config()
  started = time.perf_counter()
  lowered, args = lower(stage, config, shapes, mesh, train)
  hbm = device_hbm_bytes(devices)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as err:
    # The TPU compiler refuses a program over the HBM; it says how much the temporaries need.
    over = _HBM_ERROR.search(str(err))
    if over is None:
      raise
    temp, hbm = (int(float(x) * 2**30) for x in over.groups())
    memory = dict(argument=argument_bytes(args), output=0, temp=temp, alias=0)
    flops, ops, kernels = float("nan"), {}, {}
  else:
    analysis = compiled.memory_analysis()
    memory = dict(argument=analysis.argument_size_in_bytes, output=analysis.output_size_in_bytes,
                  temp=analysis.temp_size_in_bytes, alias=analysis.alias_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo_text = compiled.as_text()
    flops, ops, kernels = (float((cost or {}).get("flops", np.nan)), collectives(hlo_text),
                           kernel_counts(hlo_text, kernel_group))
  seconds = time.perf_counter() - started
  per_device = memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
  return {
      "stage": stage, "topology": topology, "device_kind": devices[0].device_kind,
      "devices": len(devices), "mesh": dict(mesh.shape),
      "model": {"layers": [config.num_encoder_layers, config.num_decoder_layers],
                "emb_dim": config.emb_dim, "scan_layers": config.scan_layers,
                "remat": config.remat, "dtype": jnp.dtype(config.dtype).name,
                "adapter": None if stage in ("backbone", "frozen") or config.adapter is None
                else config.adapter.method},
      "shapes": dataclasses.asdict(shapes),
      "compile_seconds": round(seconds, 1),
      **{f"{kind}_bytes": int(n) for kind, n in memory.items()},
      "per_device_bytes": int(per_device),
      "hbm_bytes": hbm,
      "fits": None if hbm is None else bool(per_device <= hbm),
      "flops_per_device": flops,
      "collectives": ops,
      "kernels": kernels,
  }


def advice(report: dict) -> str:
  """What to change when a step does not fit, leaving out what is already set."""
  over = report["per_device_bytes"] - report["hbm_bytes"]
  model, shapes = report["model"], report["shapes"]
  fixes = [f"--gin.MODEL_PARALLEL={2 * report['mesh']['model']} (shards the backbone over more"
           f" devices; now {report['mesh']['model']})"]
  if model["remat"] != "full":
    fixes.insert(0, f"--gin.REMAT=\"'full'\" (now {model['remat']!r})")
  if shapes["param_dtype"] != "bfloat16" and report["stage"] != "backbone":
    fixes.append("a backbone converted with --dtype=bfloat16 (--gin.PARAM_DTYPE=\"'bfloat16'\")")
  if shapes["batch_size"] > report["mesh"]["data"]:
    fixes.append(f"a smaller --gin.BATCH_SIZE (now {shapes['batch_size']}; one example per"
                 f" device is {report['mesh']['data']})")
  return (f"the {report['stage']} step needs {_gib(report['per_device_bytes'])} per device,"
          f" {_gib(over)} more than the {_gib(report['hbm_bytes'])} of a {report['device_kind']}"
          f" device. Try: {'; '.join(fixes)}.")


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB"


def format_report(report: dict) -> str:
  mesh = " x ".join(f"{k}={v}" for k, v in report["mesh"].items())
  hbm = "unknown" if report["hbm_bytes"] is None else _gib(report["hbm_bytes"])
  model = report["model"]
  lines = [
      f"stage {report['stage']} ({model['adapter'] or 'no adapter'}), {model['layers'][0]}+"
      f"{model['layers'][1]} layers, d={model['emb_dim']}, scan={model['scan_layers']},"
      f" remat={model['remat']}, {model['dtype']}",
      f"target {report['topology']}: {report['devices']} x {report['device_kind']}, mesh {mesh}",
      f"compiled in {report['compile_seconds']:.1f} s",
      f"per device: arguments {_gib(report['argument_bytes'])} + temporaries"
      f" {_gib(report['temp_bytes'])} + outputs {_gib(report['output_bytes'])} - aliased"
      f" {_gib(report['alias_bytes'])} = {_gib(report['per_device_bytes'])} of {hbm} HBM"
      f" -> {'fits' if report['fits'] else 'DOES NOT FIT' if report['fits'] is False else '?'}",
      f"FLOPs per device per step: {report['flops_per_device']:.3e}",
      "collectives: " + (", ".join(f"{op} x{n}" for op, n in report["collectives"].items())
                         or "none"),
  ]
  if report["kernels"]:
    kernels = report["kernels"]
    lines.append(f"kernels per step: {kernels['ops']:,} ops, of which {kernels['fusions']:,}"
                 " fusions" + (f" (at least: {kernels['unknown_trip_counts']} loop(s) of unknown"
                               " trip count counted once)" if kernels["unknown_trip_counts"]
                               else ""))
  return "\n".join(lines)
