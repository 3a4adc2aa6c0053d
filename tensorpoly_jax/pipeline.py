"""The paper's pipeline as stages over one model directory: backbone training (the embedded
suite's stand-in for T0), multi-task adapter pretraining, few-shot adaptation of a held-out task
with a fresh router row, and rank-classification evaluation."""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from tensorpoly_jax import (adaptation, checkpoints, console, evaluation, fingerprint, metrics,
                            partitioning, records, trainer)
from tensorpoly_jax.data import batches, choices, fewshot, tasks
from tensorpoly_jax.methods import AdapterConfig, from_dict
from tensorpoly_jax.t5 import convert, layout
from tensorpoly_jax.t5.model import (EncoderDecoder, RunOptions, T5Config, abstract_variables,
                                     config_to_dict, merge_params, split_params)


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A frozen backbone loaded once and kept on the mesh, shared by every run that reads it."""

  config: T5Config  # architecture from the checkpoint, run options applied
  params: dict  # global arrays, sharded by the logical rules on ``mesh``
  mesh: jax.sharding.Mesh
  fingerprint: str | None = None  # its content (``fingerprint``): what runs and exports record


def load_backbone(backbone_dir: str, options: RunOptions = RunOptions(),
                  mesh: jax.sharding.Mesh | None = None) -> Backbone:
  """Restores each process's shards of a converted backbone straight onto ``mesh`` (default: all
  devices, data parallel), in the layout ``options`` ask for."""
  mesh = mesh or partitioning.make_mesh()
  config, params = convert.load_converted(backbone_dir, mesh, options.scan_layers)
  stored = convert.stored_fingerprint(backbone_dir)
  return Backbone(options.apply(config), params, mesh,
                  stored or fingerprint.params_fingerprint(params))


def results_identity(backbone: Backbone, adapter_dir: str | None) -> dict:
  """What a results file was computed from: the backbone's and the adapter export's contents."""
  adapter = None if adapter_dir is None else checkpoints.export_fingerprint(adapter_dir)
  return {"backbone": backbone.fingerprint, "adapter": adapter,
          "code_version": trainer.code_version()}


def check_backbone(meta: dict, backbone: Backbone, adapter_dir: str) -> None:
  """Refuses an adapter export trained on another backbone than ``backbone`` (same shapes,
  other weights would score silently wrong)."""
  check_fingerprint(meta, backbone.fingerprint, adapter_dir)


def check_fingerprint(meta: dict, backbone_fingerprint: str | None, adapter_dir: str) -> None:
  """``check_backbone`` for a backbone known by its fingerprint only."""
  trained_on = meta.get("backbone")
  if trained_on is not None and trained_on != backbone_fingerprint:
    raise checkpoints.CheckpointMismatchError(
        f"the adapter export {adapter_dir} was trained on the backbone with fingerprint"
        f" {trained_on}, but BACKBONE_DIR holds the backbone {backbone_fingerprint}: set"
        " BACKBONE_DIR to the backbone it was trained on.")


def init_params(model: EncoderDecoder, seed: int, adapters_only: bool):
  """Fresh params; with ``adapters_only`` jit drops the backbone's initializers entirely."""
  tokens = jnp.ones((1, 4), jnp.int32)

  def init(rng):
    params = model.init(rng, tokens, tokens, tokens, enable_dropout=False,
                        task_ids=jnp.zeros((1,), jnp.int32))["params"]
    return split_params(params)[0] if adapters_only else params

  return jax.jit(init)(jax.random.PRNGKey(seed))


def count_params(tree) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def run_meta(stage: str, config: T5Config, routing_ids: dict[str, int],
             backbone: str | None = None) -> dict:
  """What a run's checkpoints and exports record of it (the trainer adds its train settings):
  a rerun must agree on all of it. ``backbone`` is the frozen backbone's fingerprint."""
  adapter = None if config.adapter is None else config.adapter.to_dict()
  return {"stage": stage, "model": config_to_dict(config), "adapter": adapter,
          "routing_ids": routing_ids, "backbone": backbone}


def local_batch_size(global_batch: int) -> int:
  processes = jax.process_count()
  if global_batch % processes:
    raise ValueError(f"batch_size={global_batch} must be divisible by the {processes} processes.")
  return global_batch // processes


def _shard_info():
  import seqio

  return seqio.ShardInfo(jax.process_index(), jax.process_count())


def train_backbone(model_dir: str, config: T5Config, mixture: str, train: trainer.TrainConfig) -> str:
  """Trains the whole backbone on a mixture (the embedded suite's stand-in for T0 pretraining)
  and writes it where adapter runs read backbones from; returns that folder."""
  config = config.replace(adapter=None)
  model = EncoderDecoder(config)
  train = dataclasses.replace(train, train_backbone=True)
  stream = lambda start: batches.lm_batches(
      mixture, local_batch_size(train.batch_size), train.inputs_length, train.targets_length,
      train.seed, start, _shard_info())
  result = trainer.train(model, init_params(model, train.seed, adapters_only=False), stream, train,
                         os.path.join(model_dir, "run"), run_meta("backbone", config, {}),
                         abstract_variables(model), description="backbone")
  output = os.path.join(model_dir, "backbone")
  finished_earlier = result.resumed_from == train.steps
  if not (finished_earlier and convert.has_converted(output)):  # a rerun keeps what it wrote
    convert.save_converted(output, config, result.params)
  return output


def pretrain_adapters(model_dir: str, backbone: Backbone, adapter: AdapterConfig, mixture: str,
                      train: trainer.TrainConfig):
  """Multi-task adapter pretraining: every mixture task is a routing task. Exports the adapter."""
  routing_ids = tasks.routing_ids(tasks.mixture_task_names(mixture))
  config = backbone.config.replace(adapter=adapter.with_tasks(len(routing_ids)))
  model = EncoderDecoder(config)
  params = merge_params(init_params(model, train.seed, adapters_only=True), backbone.params)
  stream = lambda start: batches.lm_batches(
      mixture, local_batch_size(train.batch_size), train.inputs_length, train.targets_length,
      train.seed, start, _shard_info())
  meta = run_meta("pretrain", config, routing_ids, backbone.fingerprint)
  result = trainer.train(model, params, stream, train, os.path.join(model_dir, "run"), meta,
                         abstract_variables(model), description=f"pretrain {adapter.method}")
  export = os.path.join(model_dir, "adapter")
  if jax.process_index() == 0:
    checkpoints.export_adapter(model_dir, "adapter", split_params(result.params)[0], meta)
  return result, export


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A pretrained adapter export and what its held-out runs share: what their router-rows exports
  record of it (``checkpoints.base_reference``), the model that routes a held-out task as
  ``task_id`` (T, after the T pretraining tasks, on one more router row; None under ``arrow``),
  how it adapts (``adaptation``), and the trainer that compiles their step once (None when the
  mode trains nothing)."""

  params: dict
  meta: dict
  base: dict
  mode: str
  model: EncoderDecoder
  task_id: int | None
  runner: trainer.Trainer | None


def load_pretrained(backbone: Backbone, adapter_dir: str, train: trainer.TrainConfig,
                    mode: str = "full", arrow_top_k: int = 4) -> Pretrained:
  """A pretrained export, checked against ``backbone`` and ``mode`` before any run."""
  params, meta = checkpoints.load_adapter(adapter_dir)
  check_backbone(meta, backbone, adapter_dir)
  adapter = from_dict(meta["adapter"])
  adaptation.check_mode(mode, adapter)
  if adaptation.trains(mode) and train.loss != "tfew":
    raise ValueError(f"few-shot adaptation trains on answer-choice batches with T-Few's losses:"
                     f" TrainConfig.loss must be 'tfew' (runs/adapt.gin sets it), got {train.loss!r}.")
  task_id = len(meta["routing_ids"])
  if mode == "arrow":
    adapter, task_id = dataclasses.replace(adapter, arrow_top_k=arrow_top_k), None
  else:
    adapter = adapter.with_tasks(task_id + 1)
  model = EncoderDecoder(backbone.config.replace(adapter=adapter))
  runner = None
  if adaptation.trains(mode):
    trained = adaptation.RouterRows(task_id) if mode in adaptation.ROUTER_ONLY else None
    runner = trainer.Trainer(model, train, abstract_variables(model), trained)
  return Pretrained(params, meta, checkpoints.base_reference(adapter_dir), mode, model, task_id,
                    runner)


def adapt(model_dir: str, backbone: Backbone, pretrained: Pretrained, task_name: str, k: int,
          seed: int, choice_width: int | None = None):
  """Adapts a held-out task from a pretrained adapter as ``pretrained.mode`` says
  (``adaptation``), training on k examples whose choices are padded to ``choice_width``
  (``choices.pad_choices``); exports it to ``model_dir/adapter`` (router rows only, on the
  pretrained export, unless every param trained) and returns the adapted params."""
  mode, task_id = pretrained.mode, pretrained.task_id
  routing_ids = dict(pretrained.meta["routing_ids"])
  rows = {}
  if adaptation.gives_row(mode):
    routing_ids[task_name] = task_id
    rows = adaptation.new_rows(pretrained.params, mode, seed)
  adapter_params = layout.to_layout(adaptation.append_rows(pretrained.params, rows),
                                    pretrained.model.config.scan_layers)
  stage = f"adapt {task_name} k={k} seed={seed}" + ("" if mode == "full" else f" mode={mode}")
  meta = {**run_meta(stage, pretrained.model.config, routing_ids, backbone.fingerprint),
          "task": task_name, "task_id": task_id, "seed": seed, "adapt_mode": mode}
  if pretrained.runner is None:
    params = merge_params(place_adapter(adapter_params, pretrained.model, backbone.mesh),
                          backbone.params)
  else:
    train = pretrained.runner.config
    arrays = choices.pad_choices(
        fewshot.fewshot_arrays(task_name, k, seed, train.inputs_length, train.targets_length),
        choice_width)
    stream = lambda start: batches.choice_batches(arrays, train.batch_size, seed, start, task_id,
                                                  _shard_info())
    # The few-shot seed seeds the run too.
    params = pretrained.runner.fit(merge_params(adapter_params, backbone.params), stream,
                                   model_dir, meta, seed=seed,
                                   description=f"adapt {task_name} s{seed}").params
  if jax.process_index() == 0:
    if mode == "full":  # the pretraining export's schema plus the adapted task
      checkpoints.export_adapter(model_dir, "adapter", split_params(params)[0], meta)
    else:
      if mode in adaptation.ROUTER_ONLY:  # the rows as trained
        rows = pretrained.runner.trained.split(params)[0]
      checkpoints.export_router_rows(model_dir, "adapter", rows, meta, pretrained.base)
  return params


def place_adapter(adapter_params, model: EncoderDecoder, mesh) -> dict:
  """Adapter params put on ``mesh`` in ``model``'s layout, sharded by its logical axes."""
  shardings = split_params(partitioning.param_shardings(abstract_variables(model), mesh))[0]
  return jax.device_put(layout.to_layout(adapter_params, model.config.scan_layers), shardings)


ADAPT_RESULT = "result.json"


@dataclasses.dataclass(frozen=True)
class AdaptResults:
  """Held-out accuracy per task and few-shot seed (``{task: {seed: accuracy}}``), the params one
  adapted task trains (by the mode: every adapter param, its router rows, or none), each task's
  few-shot k (0 when the mode trains nothing), the runs that did not finish (``{"<task>_seed<seed>":
  {"status", "error"}}``: ``records.raise_unfinished``), the backbone and adapter export they were
  computed from, and the exports that serve every adapted task at once (``{seed: folder}``)."""

  accuracy: dict[str, dict[str, float]]
  adaptation_params: int
  shots: dict[str, int]
  unfinished: dict[str, dict[str, str]]
  identity: dict  # what they were computed from (``results_identity``)
  exports: dict[str, str] = dataclasses.field(default_factory=dict)


def adapt_heldout(model_dir: str, backbone: Backbone, adapter_dir: str, heldout,
                  shots: int | None, seeds, train: trainer.TrainConfig, eval_batch_size: int = 32,
                  length_normalize: bool = True, eval_split: str = "validation",
                  mode: str = "full", arrow_top_k: int = 4) -> AdaptResults:
  """Adaptation of every held-out task for every seed from one pretrained adapter in ``mode``
  (``adaptation``), each evaluated on its task's ``eval_split``; runs in
  ``model_dir/adapt/<task>_seed<seed>``. ``shots=None`` gives each task its own k (T-Few's
  per-task k on T0). Every mode but ``full`` also writes, per seed, one export that routes every
  adapted task by its name (``model_dir/adapters/seed<seed>``: ``multi_task_export``).

  Each run writes its accuracy, or its error, to ``result.json`` in its folder when it ends (a
  ``records`` record with the settings below); a rerun reads the finished ones instead of
  adapting again, and one failed run no longer stops the others."""
  pretrained = load_pretrained(backbone, adapter_dir, train, mode, arrow_top_k)
  scorer = evaluation.Scorer(pretrained.model, backbone.mesh, length_normalize)
  identity = results_identity(backbone, adapter_dir)
  # Every task's batches as wide as the widest task's: one compiled step and scorer for all.
  width = choices.choice_width(heldout, eval_split, train.inputs_length, train.targets_length)

  def adapt_and_score(run_dir: str, task: str, k: int, seed: int) -> dict:
    params = adapt(run_dir, backbone, pretrained, task, k, seed, choice_width=width)
    value = evaluate_task(scorer, params, task, pretrained.task_id, train.inputs_length,
                          train.targets_length, eval_split, eval_batch_size, seed,
                          choice_width=width).accuracy
    metrics.write_eval(run_dir, value, train.steps if adaptation.trains(mode) else 0)
    return {"accuracy": value}

  accuracy: dict[str, dict[str, float]] = {}
  unfinished: dict[str, dict[str, str]] = {}
  shots_used = {task: fewshot.num_shots(task, shots) if adaptation.trains(mode) else 0
                for task in heldout}
  runs = [(task, k, seed) for task, k in shots_used.items() for seed in seeds]
  for number, (task, k, seed) in enumerate(runs, 1):
    name = f"{task}_seed{seed}"
    run_dir = os.path.join(model_dir, "adapt", name)
    settings = {"task": task, "seed": seed, "shots": k, "split": eval_split, "adapt_mode": mode,
                "adapter_dir": str(adapter_dir), "length_normalize": length_normalize,
                "train": dataclasses.asdict(train), **identity}
    if mode == "arrow":
      settings["arrow_top_k"] = arrow_top_k
    console.say(f"adapt run {number}/{len(runs)}: {task}, seed {seed}, k={k}"
                + ("" if mode == "full" else f", mode {mode}"))
    record = records.run_once(os.path.join(run_dir, ADAPT_RESULT), settings,
                              lambda: adapt_and_score(run_dir, task, k, seed))
    if record["status"] == records.FINISHED:
      accuracy.setdefault(task, {})[str(seed)] = record["accuracy"]
      outcome = f"accuracy {record['accuracy']:.4f} on {eval_split}"
    else:
      unfinished[name] = {"status": record["status"], "error": record["error"]}
      outcome = f"{record['status']}: {record['error']}"
    console.say(f"adapt run {number}/{len(runs)}: {task}, seed {seed}: {outcome}")
  exports = {}
  if mode != "full" and jax.process_index() == 0:
    for seed in seeds:
      adapted = [t for t in heldout if str(seed) in accuracy.get(t, {})]
      if adapted:
        exports[str(seed)] = multi_task_export(
            model_dir, f"adapters/seed{seed}",
            [os.path.join(model_dir, "adapt", f"{t}_seed{seed}", "adapter") for t in adapted])
  return AdaptResults(accuracy, adaptation_params(pretrained), shots_used, unfinished, identity,
                      exports)


def adaptation_params(pretrained: Pretrained) -> int:
  """The params one adapted task trains."""
  if pretrained.runner is None:
    return 0
  adapter = split_params(abstract_variables(pretrained.model)["params"])[0]
  return count_params(jax.eval_shape(lambda p: pretrained.runner.trained.split(p)[0], adapter))


def multi_task_export(model_dir: str, name: str, task_exports: list[str]) -> str:
  """One export holding the router rows of several tasks adapted from one pretrained export
  (each a router-rows export, as ``adapt`` writes outside ``full``), routing each by its name:
  task ``i`` of ``task_exports`` gets id ``T + i``, its row the one it was adapted with."""
  metas, all_rows = [], []
  for directory in task_exports:
    rows, meta = checkpoints.read_export(directory)
    metas.append(meta)
    all_rows.append(rows)
  first = metas[0]
  for directory, meta in zip(task_exports, metas):
    if meta.get(checkpoints.BASE_ADAPTER) != first.get(checkpoints.BASE_ADAPTER):
      raise checkpoints.CheckpointMismatchError(
          f"{directory} was adapted from another pretrained export than {task_exports[0]}: one"
          " export serves tasks adapted from one pretrained export.")
  routing_ids = {t: i for t, i in first["routing_ids"].items() if t != first["task"]}
  adapter, rows = from_dict(first["adapter"]), {}
  if adaptation.gives_row(first["adapt_mode"]):
    pretraining_tasks = len(routing_ids)
    routing_ids.update({meta["task"]: pretraining_tasks + i for i, meta in enumerate(metas)})
    rows = jax.tree_util.tree_map(lambda *task_rows: np.concatenate(task_rows), *all_rows)
    adapter = adapter.with_tasks(len(routing_ids))
  meta = {key: value for key, value in first.items()
          if key not in ("task", "task_id", checkpoints.BASE_ADAPTER)}
  meta.update(stage=f"adapted tasks seed={first['seed']}", routing_ids=routing_ids,
              adapter=adapter.to_dict(), tasks=[m["task"] for m in metas])
  base = first[checkpoints.BASE_ADAPTER]
  checkpoints.check_base(task_exports[0], base)
  return checkpoints.export_router_rows(model_dir, name, rows, meta, base)


@dataclasses.dataclass(frozen=True)
class Evaluated:
  """One task's rank classification: the predicted and the true choice of each example."""

  predictions: np.ndarray
  labels: np.ndarray

  @property
  def accuracy(self) -> float:
    return float(np.mean(self.predictions == self.labels))

  def lines(self, task_name: str) -> list[dict]:
    """Per-example records (``tensorpoly eval``'s predictions file)."""
    return [{"task": task_name, "example": index, "prediction": int(p), "label": int(l)}
            for index, (p, l) in enumerate(zip(self.predictions, self.labels))]


def evaluate_task(scorer: evaluation.Scorer, params, task_name: str, task_id: int | None,
                  inputs_length: int, targets_length: int, split: str = "validation",
                  batch_size: int = 32, seed: int = 0,
                  choice_width: int | None = None) -> Evaluated:
  """Predictions on ``split``, each example under a template drawn with ``seed``, its choices
  padded to ``choice_width`` (``choices.pad_choices``)."""
  arrays = choices.pad_choices(
      choices.evaluation_arrays(task_name, split, inputs_length, targets_length, seed),
      choice_width)
  predictions = scorer.predict(params, arrays, task_id, batch_size, f"eval {task_name} ({split})")
  return Evaluated(predictions, np.asarray(arrays["label"]))


def with_adapter(backbone: Backbone, adapter_dir: str | None) -> tuple[T5Config, dict, dict]:
  """``(config, params, meta)`` of the backbone with an adapter export placed beside it on its
  mesh (checked to be trained on it); without one, the backbone's and an empty meta."""
  if adapter_dir is None:
    return backbone.config, backbone.params, {}
  adapter_params, meta = checkpoints.load_adapter(adapter_dir)
  check_backbone(meta, backbone, adapter_dir)
  config = backbone.config.replace(adapter=from_dict(meta["adapter"]))
  adapter_params = place_adapter(adapter_params, EncoderDecoder(config), backbone.mesh)
  return config, merge_params(adapter_params, backbone.params), meta
