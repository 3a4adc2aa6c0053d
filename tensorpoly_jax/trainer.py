"""The training loop: jitted, sharded steps over a ``('data', 'model')`` mesh, orbax checkpoints
every K steps with resume, a NaN stop that keeps the last good checkpoint, and metrics.

Only the trained params (adapters and routers, or the whole backbone in the backbone stage) are
in the train state and the optimizer; the frozen backbone is a separate, never-updated input.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util
from flax.core import unfreeze
from jax.experimental import multihost_utils

from tensorpoly_jax import (checkpoints, console, field_types, losses, optimizers, partitioning,
                            paths, run_lock)
from tensorpoly_jax.metrics import MetricLogger
from tensorpoly_jax.optimizers import OptimizerConfig, make_optimizer
from tensorpoly_jax.param_roles import param_role
from tensorpoly_jax.t5.model import EncoderDecoder, describe, merge_params, split_params
from tensorpoly_jax.t5.seq2seq import Seq2SeqModel


OPERATIONAL_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every", "model_parallel",
                      "num_devices", "new_schedule")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  batch_size: int = 8
  inputs_length: int = 256
  targets_length: int = 256
  loss: str = "lm"  # "lm": seqio LM batches; "tfew": answer-choice batches with T-Few's losses
  tfew_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # lm, unlikelihood, mc
  train_backbone: bool = False
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  log_every: int = 50
  seed: int = 0
  model_parallel: int = 1
  num_devices: int = 0  # the mesh's devices: 0 = all of them
  optimizer: OptimizerConfig = OptimizerConfig()
  # Resume a run whose steps or optimizer settings changed, rebuilding its schedule from the
  # restored step (NEW_SCHEDULE); any other difference is still refused.
  new_schedule: bool = False

  def __post_init__(self):
    field_types.check(self)
    for name in ("steps", "batch_size", "inputs_length", "targets_length", "checkpoint_every",
                 "keep_checkpoints", "log_every", "model_parallel"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
    if self.loss not in losses.LOSS_MODES:
      raise ValueError(f"loss {self.loss!r} is unknown; choose one of {losses.LOSS_MODES}.")

  def identity(self) -> dict:
    """The settings a run's result depends on: what a rerun into the same folder must repeat
    (how often it logs or saves, and how it is sharded, may change)."""
    fields = dataclasses.asdict(self)
    for name in OPERATIONAL_FIELDS:
      fields.pop(name)
    return json.loads(json.dumps(fields))  # tuples as lists, as a checkpoint's JSON reads back

  def make_mesh(self):
    """The run's ``('data', 'model')`` mesh over ``num_devices`` devices (0: all)."""
    devices = jax.devices()[:self.num_devices] if self.num_devices else None
    return partitioning.make_mesh(self.model_parallel, devices)


@struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  opt_state: Any
  rng: jnp.ndarray


class TrainingDiverged(RuntimeError):
  """The loss, the gradients or the updated params stopped being finite; the last good checkpoint
  is kept."""


# What each train step checks for NaN and inf, in the order of its ``finite`` metric.
FINITE_CHECKS = ("loss", "gradients", "updated params")


@dataclasses.dataclass(frozen=True)
class AdapterParams:
  """Which params a run trains: ``split(params) -> (trained, frozen)`` and its inverse ``merge``.
  This one: every adapter and router param, the backbone frozen."""

  def split(self, params) -> tuple[dict, dict]:
    return split_params(params)

  def merge(self, trained, frozen) -> dict:
    return merge_params(trained, frozen)


@dataclasses.dataclass(frozen=True)
class AllParams(AdapterParams):
  """Every param trains (the backbone stage)."""

  def split(self, params) -> tuple[dict, dict]:
    return params, {}

  def merge(self, trained, frozen) -> dict:
    return trained


def make_train_step(model: EncoderDecoder, optimizer, mode: str, tfew_weights=(1.0, 1.0, 1.0),
                    trained: AdapterParams = AdapterParams()):
  loss_fn = Seq2SeqModel(model).loss_fn(mode, tfew_weights)

  def step(state: TrainState, frozen, batch):
    rng, dropout_rng, routing_rng = jax.random.split(state.rng, 3)
    rngs = {"dropout": dropout_rng, "routing": routing_rng}
    grad_fn = jax.value_and_grad(lambda p: loss_fn(trained.merge(p, frozen), batch, rngs),
                                 has_aux=True)
    (loss, metrics), grads = grad_fn(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A finite loss can come with NaN gradients (a 0 * inf in a backward pass) and finite
    # gradients with inf params (an overflowing update): each is checked where it is made.
    finite = jnp.stack([jnp.isfinite(loss), all_finite(grads), all_finite(params)])
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads), **role_norms("grad_norm", grads),
               **role_norms("update_norm", updates), "finite": finite}
    return TrainState(state.step + 1, params, opt_state, rng), metrics

  return step


def all_finite(tree) -> jnp.ndarray:
  """One device bool: whether every element of every leaf is finite."""
  return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(tree)]))


def role_norms(prefix: str, tree) -> dict:
  """``{f"{prefix}/{role}": global norm}`` per param role: whether leaves, routers and LoRA
  weights move at comparable speeds is the first question when one method trains worse."""
  return {f"{prefix}/{role}": optax.tree.norm(values)
          for role, values in leaves_by_role(tree).items()}


def leaves_by_role(tree) -> dict[str, list]:
  """A param tree's leaves grouped by role (``param_roles``)."""
  groups: dict[str, list] = {}
  for path, value in traverse_util.flatten_dict(unfreeze(tree)).items():
    groups.setdefault(param_role(path), []).append(value)
  return groups


def role_sizes(tree) -> dict[str, int]:
  """Number of params per role."""
  return {role: sum(int(leaf.size) for leaf in leaves)
          for role, leaves in leaves_by_role(tree).items()}


@dataclasses.dataclass
class TrainResult:
  params: Any  # the full param tree after training (frozen backbone + trained params)
  history: list[dict]
  resumed_from: int
  state: TrainState  # the final sharded train state


class Trainer:
  """Trains one model with one ``TrainConfig`` on that config's mesh, and holds the jitted init
  and step it built for each shape of trained params: the few-shot runs of one method over tasks
  and seeds share one compiled step.

  ``abstract_variables`` (``jax.eval_shape`` of ``model.init``) carries the logical axes;
  ``trained`` says which params train (default: the adapters, or every param with
  ``train_backbone``).
  """

  def __init__(self, model: EncoderDecoder, config: TrainConfig, abstract_variables,
               trained: AdapterParams | None = None):
    self.model, self.config = model, config
    self.trained = trained or (AllParams() if config.train_backbone else AdapterParams())
    self.mesh = config.make_mesh()
    if config.batch_size % self.mesh.shape["data"]:
      raise ValueError(
          f"batch_size={config.batch_size} must be divisible by the mesh's data axis"
          f" ({self.mesh.shape['data']} = {self.mesh.devices.size} devices / model_parallel"
          f" {config.model_parallel}); set BATCH_SIZE to a multiple of {self.mesh.shape['data']}.")
    shardings = partitioning.param_shardings(abstract_variables, self.mesh)
    self.trainable_shardings, self.frozen_shardings = self.trained.split(shardings)
    self._steps: dict[tuple, Steps] = {}
    self._described = False

  def steps(self, trainable) -> Steps:
    """The jitted init and step for trained params shaped like ``trainable``; the step's compile
    for each batch shape is announced with its time."""
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    key = (treedef, tuple(leaves))
    if key not in self._steps:
      steps = build_steps(self.model, self.config, self.mesh, shapes, self.trainable_shardings,
                          self.frozen_shardings, self.trained)
      batch_shapes = lambda state, frozen, batch: {k: v.shape for k, v in batch.items()}
      self._steps[key] = dataclasses.replace(
          steps, step=console.timed_compiles(steps.step, "compiling the train step", batch_shapes))
    return self._steps[key]

  def _announce(self, description: str, trainable, frozen, model_dir: str, start: int,
                steps: int) -> None:
    """The run's start: devices, mesh, model and trained params by role the first time this
    trainer runs (its later runs share them), then where this run is and writes."""
    if not self._described:
      self._described = True
      devices = self.mesh.devices
      console.say(
          f"{description}: {devices.size} {devices.flat[0].platform} device(s) in"
          f" {jax.process_count()} process(es), mesh {dict(self.mesh.shape)}")
      console.say(f"{description}: {describe(self.model.config)}")
      by_role = role_sizes(trainable)
      roles = ", ".join(f"{role} {size:,}" for role, size in by_role.items())
      console.say(f"{description}: trained params {sum(by_role.values()):,} ({roles}); frozen"
                  f" {sum(role_sizes(frozen).values()):,}")
    position = f"resuming at step {start}" if start else "from step 0"
    console.say(f"{description}: {steps} steps, batch {self.config.batch_size}, {position};"
                f" writes {paths.resolve(model_dir)}")

  def fit(self, params, batches: Callable[[int], Iterator[dict]], model_dir: str, meta: dict,
          seed: int | None = None, description: str = "train") -> TrainResult:
    """Trains ``params`` from the latest checkpoint in ``model_dir`` (or from ``params``) to
    ``config.steps``; ``batches(start_step)`` yields this process's numpy batches from that step
    on; ``seed`` (default the config's) seeds dropout and routing noise. A second run into the
    same ``model_dir`` is refused while this one holds it (``run_lock``)."""
    paths.check_writable(model_dir)
    with run_lock.hold(model_dir):
      config = self.config if seed is None else dataclasses.replace(self.config, seed=seed)
      meta = {**meta, "train": config.identity(), "code_version": code_version()}
      trainable, frozen = self.trained.split(params)
      steps = self.steps(trainable)
      frozen = jax.device_put(frozen, self.frozen_shardings)  # a no-op for params on the mesh
      state = steps.init(jax.device_put(trainable, self.trainable_shardings),
                         jax.random.PRNGKey(config.seed))
      mngr, restored, start = checkpoints.restore_latest(
          str(paths.resolve(model_dir) / "checkpoints"), config.keep_checkpoints,
          checkpoints.abstract(state), meta,
          config.new_schedule)
      paths.write_json(os.path.join(model_dir, IDENTITY_FILE), meta)  # only once it is agreed
      self._announce(description, trainable, frozen, model_dir, start, config.steps)
      with contextlib.closing(mngr):
        state = restored if restored is not None else state
        state, history = _loop(state, frozen, steps.step, batches(start), self.mesh, start,
                               config, mngr, meta, model_dir, description)
    return TrainResult(self.trained.merge(state.params, frozen), history, start, state)


IDENTITY_FILE = "identity.json"  # the run's identity as its checkpoints record it


def code_version() -> str:
  try:
    return importlib.metadata.version("tensorpoly-jax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def train(model: EncoderDecoder, params, batches: Callable[[int], Iterator[dict]],
          config: TrainConfig, model_dir: str, meta: dict, abstract_variables,
          description: str = "train") -> TrainResult:
  """One run with a trainer of its own (``Trainer.fit``)."""
  return Trainer(model, config, abstract_variables).fit(params, batches, model_dir, meta,
                                                        description=description)


@dataclasses.dataclass(frozen=True)
class Steps:
  """A run's jitted state initializer and train step, and the train state's shardings."""

  init: Callable
  step: Callable
  state_shardings: TrainState


def build_steps(model: EncoderDecoder, config: TrainConfig, mesh, trainable_shapes,
                trainable_shardings, frozen_shardings,
                trained: AdapterParams = AdapterParams()) -> Steps:
  """The jitted init and step for trained params of these shapes and shardings."""
  optimizer = make_optimizer(config.optimizer, trainable_shapes, config.steps)
  replicated = partitioning.replicated(mesh)
  opt_shapes = jax.eval_shape(optimizer.init, trainable_shapes)
  opt_shardings = partitioning.state_shardings(opt_shapes, trainable_shapes, trainable_shardings,
                                               mesh)
  shardings = TrainState(replicated, trainable_shardings, opt_shardings, replicated)
  init = jax.jit(lambda params, rng: TrainState(jnp.asarray(0, jnp.int32), params,
                                                optimizer.init(params), rng),
                 out_shardings=shardings)
  step = jax.jit(make_train_step(model, optimizer, config.loss, config.tfew_weights, trained),
                 in_shardings=(shardings, frozen_shardings, None),  # batches come sharded
                 out_shardings=(shardings, replicated), donate_argnums=(0,))
  return Steps(init, step, shardings)


def _loop(state, frozen, step_fn, batches, mesh, start, config, mngr, meta, model_dir,
          description):
  """Runs steps ``start+1..config.steps``; returns the final state and the logged metrics.

  Metrics stay on the devices between log points (no host sync per step, which would stall an
  accelerator); they are fetched every ``log_every`` steps and before every checkpoint, so a
  non-finite loss, gradient or param is caught before a checkpoint could keep it.
  """
  history, pending = [], []
  last_saved = mngr.latest_step()
  rate = optimizers.logged_learning_rate(config.optimizer, state.params, config.steps)
  last_log = (start, time.perf_counter())
  with MetricLogger(model_dir, description, start, config.steps) as logger, \
      PreemptionNotice() as preemption:
    for step in range(start + 1, config.steps + 1):
      state, metrics = step_fn(state, frozen, partitioning.shard_batch(next(batches), mesh))
      pending.append((step, metrics))
      logger.advance()
      preempted = preemption.reached(step)
      log = step % config.log_every == 0 or step == config.steps
      save = step % config.checkpoint_every == 0 or step == config.steps or preempted
      if not (log or save):
        continue
      fetched = _fetch_finite(pending, mngr, last_saved)
      pending = []
      if log:
        now = time.perf_counter()  # after the fetch: every step up to here has run
        fetched.update(learning_rate=rate(step),
                       steps_per_second=(step - last_log[0]) / max(now - last_log[1], 1e-9))
        last_log = (step, now)
        logger.log(step, fetched)
        history.append({"step": step, **fetched})
      if save:
        checkpoints.save(mngr, step, state, {**meta, "data_position": step})
        last_saved = step
      if preempted:
        raise Preempted(f"{preemption.saved_at(step)} in {mngr.directory}; run the same command"
                        " again to resume from it.")
  return state, history


def _fetch_finite(pending, mngr, last_saved) -> dict:
  """The newest step's metrics as floats (without the ``finite`` flags); raises TrainingDiverged
  naming the first step (and the unchecked interval) whose loss, gradients or updated params were
  not all finite."""
  values = jax.device_get([metrics for _, metrics in pending])
  for (step, _), metrics in zip(pending, values):
    broken = [name for name, ok in zip(FINITE_CHECKS, metrics.pop("finite")) if not ok]
    if broken:
      kept = (f"checkpoint step {last_saved} in {mngr.directory}" if last_saved
              else "no checkpoint")
      raise TrainingDiverged(
          f"{' and '.join(broken)} became non-finite at step {step} (loss {float(metrics['loss'])},"
          f" grad_norm {float(metrics['grad_norm'])}; steps {pending[0][0]}-{pending[-1][0]} were"
          f" checked together); stopped without saving it ({kept} is the last good state). Lower"
          " the learning rate or check the data.")
  return {k: float(v) for k, v in values[-1].items()}


class Preempted(Exception):
  """Training stopped on SIGTERM (a TPU preemption notice) after saving a checkpoint."""


class PreemptionNotice:
  """Turns a preemption notice (SIGTERM) into one step at which every process saves.

  Several processes: JAX's preemption sync service (started by ``jax.distributed.initialize``)
  catches SIGTERM on whichever host receives it and agrees with the others on the next safe step,
  so all hosts save that same step. One process: a SIGTERM handler, saving at the next step.
  """

  def __init__(self):
    self.received = False
    self._previous = None
    self._shared = jax.process_count() > 1

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def saved_at(self, step: int) -> str:
    if self._shared:
      return f"preemption notice: every process saved checkpoint step {step}"
    return f"SIGTERM received: saved checkpoint step {step}"

  def reached(self, step: int) -> bool:
    if self._shared:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received

  def __enter__(self):
    if not self._shared and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
