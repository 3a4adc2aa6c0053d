"""Task registrations: seqio tasks and mixtures, and what the rest of a run reads beside them.

Every training task is one (dataset, template) pair and one routing task; its integer id comes
from the mixture's id map (sorted task names), which checkpoints store. A held-out task keeps
every rendering of an example (one per template that applies), and a template is drawn per
example: per step when its few shots train, per (example, seed) when it is evaluated; the trainer
gives a held-out task a fresh router row during adaptation.

Examples carry ``inputs``, ``targets`` (tokenized), ``answer_choices`` (strings, padded with "")
``num_choices`` and ``label`` (the gold choice), ``example`` and ``template`` (which source example
and template a row renders), and ``task_id`` for training tasks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import logging
from typing import Callable, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf
from tensorflow.python.autograph.core import ag_ctx

from tensorpoly_jax.data import embedded

class _InMemorySourceFilter(logging.Filter):
  """seqio warns on every read that an uncached FunctionDataSource shuffles poorly on restart;
  ours are in-memory lists that seqio shuffles per example, and resumes skip to the exact batch."""

  def filter(self, record):
    return "uncached FunctionDataset" not in record.getMessage()


logging.getLogger("absl").addFilter(_InMemorySourceFilter())

EMBEDDED_TRAIN = "embedded_train"
EMBEDDED_HELDOUT = "embedded_heldout"
EMBEDDED_THREE_SKILL = "embedded_three_skill"
EMBEDDED_SHOTS = 32  # the embedded held-out tasks' k when a run sets none
NO_TASK_ID = -1
POOL_SPLIT = "train"  # a held-out task's few-shot pool in every suite
TASK_FEATURE = "task_id"


def byte_vocabulary() -> seqio.Vocabulary:
  """The embedded suite's vocabulary: UTF-8 bytes (ids 3..258), nothing to download."""
  return seqio.ByteVocabulary()


def sentencepiece_vocabulary(model_file: str) -> seqio.Vocabulary:
  """T5's SentencePiece vocabulary, read from a checkpoint folder's ``spiece.model``."""
  return seqio.SentencePieceVocabulary(model_file)


def output_features(vocabulary: seqio.Vocabulary, inputs_eos: bool = True):
  """Tokenized ``inputs``/``targets`` and the routing ``task_id`` (``int32[1]``): an output
  feature, so that seqio mixtures keep it wherever they are read (T5X's ``utils.get_dataset``
  passes no ``passthrough_features``)."""
  return {"inputs": seqio.Feature(vocabulary, add_eos=inputs_eos),
          "targets": seqio.Feature(vocabulary, add_eos=True),
          TASK_FEATURE: seqio.Feature(seqio.PassThroughVocabulary(0), add_eos=False)}


class RoutedEncDecFeatureConverter(seqio.EncDecFeatureConverter):
  """T5X's encoder-decoder converter, passing the routing ``task_id`` (shape [1]) through.

  Unpacked only: a packed row would mix examples of different tasks under one task id."""

  def __init__(self, pack: bool = False, **kwargs):
    if pack:
      raise ValueError("tensorpoly batches are unpacked (one task id per row): set pack=False"
                       " (T5X: DatasetConfig.pack = False).")
    spec = seqio.FeatureConverter.FeatureSpec
    kwargs.setdefault("passthrough_features", {TASK_FEATURE: spec(dtype=tf.int32, rank=1)})
    super().__init__(pack=False, **kwargs)

  def __call__(self, ds, task_feature_lengths):
    # T5X run files give lengths for inputs and targets only; the routing id is one int.
    return super().__call__(ds, {TASK_FEATURE: 1, **task_feature_lengths})


def feature_converter() -> seqio.FeatureConverter:
  return RoutedEncDecFeatureConverter()


def feature_lengths(inputs_length: int, targets_length: int) -> dict[str, int]:
  return {"inputs": inputs_length, "targets": targets_length, TASK_FEATURE: 1}


@dataclasses.dataclass(frozen=True)
class Rows:
  """Prompted rows of one split, and what could not be used: ``dropped`` maps a reason to a count.

  A row is a dict: ``inputs``, ``targets``, ``answer_choices``, ``label`` (indexes the choices;
  -1 for free text), ``example`` (the source example it renders) and ``template`` (its index)."""

  rows: list[dict]
  dropped: Mapping[str, int] = dataclasses.field(default_factory=dict)


def numbered(rows: Sequence[Mapping]) -> list[dict]:
  """Rows that render one example each: ``example`` is the row's position, ``template`` 0 unless
  given."""
  return [{"template": 0, **row, "example": index} for index, row in enumerate(rows)]


@dataclasses.dataclass(frozen=True, eq=False)
class TaskInfo:
  """A registered task as few-shot draws, rank classification and ``tensorpoly data`` read it.

  ``read(split, examples)`` gives the rows of those source examples (``None``: the whole split),
  rendering nothing else, so a k-shot draw from a large pool renders k examples;
  ``num_examples(split)`` counts the split's source examples. ``num_shots`` is the suite's
  few-shot k for the task (T-Few's per-task k on T0), used when a run sets none."""

  read: Callable[[str, Sequence[int] | None], Rows]
  num_examples: Callable[[str], int]
  splits: tuple[str, ...]
  vocabulary: seqio.Vocabulary
  inputs_eos: bool = True
  task_id: int = NO_TASK_ID
  templates: tuple[str, ...] = ()
  num_shots: int | None = None


def in_memory(rows_fn: Callable[[str], Rows | Sequence[Mapping]], splits: Sequence[str],
              vocabulary: seqio.Vocabulary, **fields) -> TaskInfo:
  """A TaskInfo over rows produced whole by ``rows_fn(split)`` (read once per split); a plain
  list is one example per row."""

  @functools.cache
  def whole(split: str) -> Rows:
    rows = rows_fn(split)
    return rows if isinstance(rows, Rows) else Rows(numbered(rows))

  def read(split, examples=None):
    rows = whole(split)
    if examples is None:
      return rows
    wanted = set(int(e) for e in examples)
    return Rows([row for row in rows.rows if row["example"] in wanted], rows.dropped)

  def num_examples(split):
    return len({row["example"] for row in whole(split).rows})

  return TaskInfo(read, num_examples, tuple(splits), vocabulary, **fields)


def _columns(rows: Sequence[Mapping], task_id: int) -> dict[str, np.ndarray]:
  """Column arrays for ``tf.data.Dataset.from_tensor_slices``; choices padded with ""."""
  width = max([len(r["answer_choices"]) for r in rows] + [1])
  return {
      "inputs": np.array([r["inputs"] for r in rows], object),
      "targets": np.array([r["targets"] for r in rows], object),
      "answer_choices": np.array([list(r["answer_choices"]) + [""] * (width - len(r["answer_choices"]))
                                  for r in rows], object).reshape(len(rows), width),
      "num_choices": np.array([len(r["answer_choices"]) for r in rows], np.int32),
      "label": np.array([r["label"] for r in rows], np.int32),
      "example": np.array([r["example"] for r in rows], np.int32),
      "template": np.array([r["template"] for r in rows], np.int32),
      TASK_FEATURE: np.full((len(rows), 1), task_id, np.int32),
  }


def examples_source(info: TaskInfo) -> seqio.DataSource:
  """A seqio source over every row of a task's splits."""
  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # one in-memory shard; seqio shuffles examples
    return tf.data.Dataset.from_tensor_slices(_columns(info.read(split, None).rows, info.task_id))

  return seqio.FunctionDataSource(dataset_fn, splits=list(info.splits))


# Python-side reads of a registered task (rank-classification arrays), reused by the many
# few-shot runs over one task; dropped when the task is registered again.
_READ_CACHE: dict[str, dict] = {}
_INFO: dict[str, TaskInfo] = {}


def cached_read(name: str, key, read: Callable[[], object]):
  """``read()`` once per registered task ``name`` and ``key``."""
  entries = _READ_CACHE.setdefault(name, {})
  if key not in entries:
    entries[key] = read()
  return entries[key]


def register_task(name: str, info: TaskInfo) -> seqio.Task:
  """Registers (or re-registers) a seqio task over ``info``'s rows and keeps ``info`` for
  ``task_info``."""
  task = add_task(name, examples_source(info), info.vocabulary, info.inputs_eos)
  _INFO[name] = info
  return task


def task_info(name: str) -> TaskInfo:
  """A registered task's TaskInfo; a seqio task registered elsewhere (a user's TASK_MODULE) is
  read through its source, which must give ``inputs``, ``targets``, ``answer_choices`` and
  ``label`` for rank classification."""
  if name in _INFO:
    return _INFO[name]
  task = get_task_or_mixture(name)
  if isinstance(task, seqio.Mixture):
    raise ValueError(f"{name!r} is a mixture; name one of its tasks: {mixture_task_names(name)}.")
  features = task.output_features
  decode = lambda value: value.decode() if isinstance(value, bytes) else value

  def rows_fn(split):
    rows = []
    for ex in task.source.get_dataset(split=split, shuffle=False).as_numpy_iterator():
      missing = {"inputs", "targets", "answer_choices", "label"} - set(ex)
      if missing:
        raise ValueError(f"seqio task {name!r}: its source gives no {sorted(missing)}; rank"
                         " classification and few-shot draws need inputs, targets, answer_choices"
                         " and label (the index of the target among the choices).")
      count = int(ex.get("num_choices", len(ex["answer_choices"])))
      rows.append({"inputs": decode(ex["inputs"]), "targets": decode(ex["targets"]),
                   "answer_choices": [decode(c) for c in ex["answer_choices"][:count]],
                   "label": int(ex["label"])})
    return rows

  return in_memory(rows_fn, task.splits, features["targets"].vocabulary,
                   inputs_eos=features["inputs"].add_eos)


class InMemoryTask(seqio.Task):
  """A seqio task whose tokenized examples stay in memory once read.

  seqio shuffles after repeating, with a buffer of 1000 examples per task: on a task of a few
  hundred rows the buffer spans several epochs, and each epoch would tokenize every row again
  (the embedded mixture's first batch: 36,000 tokenizations). Caching before the repeat reads each
  row once and leaves the stream unchanged: the same examples in the same order."""

  def preprocess_precache(self, dataset: tf.data.Dataset, seed: int | None = None):
    return super().preprocess_precache(dataset, seed).cache()


def exact_match(targets, predictions) -> dict[str, float]:
  """Percentage of generated predictions equal to their target text: what T5X's inference
  evaluation (``python -m t5x.train`` with an ``infer_eval`` dataset) reports for a task."""
  return {"exact_match": 100.0 * sum(t == p for t, p in zip(targets, predictions))
          / max(len(targets), 1)}


def add_task(name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary,
             inputs_eos: bool = True) -> seqio.Task:
  """Registers (or re-registers) a task with tokenized inputs/targets, scored by exact match
  when T5X generates for it."""
  _READ_CACHE.pop(name, None)
  _INFO.pop(name, None)
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  # Tokenizing is deterministic: everything runs before the cache point, nothing after it.
  return seqio.TaskRegistry.add(
      name, source, output_features=output_features(vocabulary, inputs_eos), task_cls=InMemoryTask,
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos,
                     seqio.CacheDatasetPlaceholder()], metric_fns=[exact_match])


def add_mixture(name: str, tasks_and_rates: Sequence[tuple[str, float]]) -> seqio.Mixture:
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, list(tasks_and_rates))


def routing_ids(task_names: Sequence[str]) -> dict[str, int]:
  """The stable id map of a training mixture: sorted task names -> 0..T-1."""
  return {name: index for index, name in enumerate(sorted(task_names))}


@functools.lru_cache(maxsize=8)
def _embedded_suite(seed: int, sizes: embedded.Sizes):
  return embedded.generate(seed, sizes)


def embedded_train_task(task: str, template: int) -> str:
  return f"embedded__{task}__t{template}"


def embedded_heldout_task(task: str) -> str:
  return f"embedded__{task}"


def register_embedded(seed: int = 0, sizes: embedded.Sizes = embedded.Sizes()) -> dict[str, int]:
  """Registers the mini-T0 suite; returns the training mixture's routing id map.

  Mixtures: ``embedded_train`` (every training (task, template) pair, equal rates),
  ``embedded_heldout`` (the held-out tasks, random template per example) and
  ``embedded_three_skill`` (the harder held-out suite: three skills per task).
  """
  vocabulary = byte_vocabulary()
  suite = lambda: _embedded_suite(seed, sizes)
  names = {embedded_train_task(t, k): (t, k) for t in embedded.TRAIN_TASKS
           for k in range(len(embedded.TEMPLATES))}
  ids = routing_ids(list(names))
  for name, (task, template) in names.items():
    rows_fn = lambda split, task=task, template=template: [
        r for r in suite()[task][split] if r["template"] == template]
    register_task(name, in_memory(rows_fn, embedded.TRAIN_SPLITS, vocabulary, task_id=ids[name],
                                  templates=(embedded.TEMPLATES[template],)))
  add_mixture(EMBEDDED_TRAIN, [(name, 1.0) for name in sorted(names)])
  for task in embedded.EVALUATED_TASKS:
    rows_fn = lambda split, task=task: suite()[task][split]
    register_task(embedded_heldout_task(task),
                  in_memory(rows_fn, embedded.HELDOUT_SPLITS, vocabulary,
                            templates=embedded.TEMPLATES, num_shots=EMBEDDED_SHOTS))
  for mixture, suite_tasks in ((EMBEDDED_HELDOUT, embedded.HELDOUT_TASKS),
                               (EMBEDDED_THREE_SKILL, embedded.THREE_SKILL_TASKS)):
    add_mixture(mixture, [(embedded_heldout_task(t), 1.0) for t in sorted(suite_tasks)])
  return ids


def get_task_or_mixture(name: str) -> seqio.Task | seqio.Mixture:
  """Looks a name up in seqio's registries; an unknown name lists the closest known ones."""
  known = list(seqio.TaskRegistry.names()) + list(seqio.MixtureRegistry.names())
  if name not in known:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Did you mean {close}?" if close else f" {len(known)} are registered."
    raise ValueError(f"unknown seqio task or mixture {name!r}.{hint} Register it first (e.g."
                     " tensorpoly_jax.data.tasks.register_embedded / register_t0).")
  return seqio.get_mixture_or_task(name)


def mixture_task_names(name: str) -> list[str]:
  provider = get_task_or_mixture(name)
  return sorted(t.name for t in provider.tasks) if isinstance(provider, seqio.Mixture) else [name]


def get_dataset(name: str, inputs_length: int, targets_length: int, split: str = "train",
                shuffle: bool = True, seed: int | None = None,
                shard_info: seqio.ShardInfo | None = None, num_epochs: int | None = 1):
  """Model-ready examples (``encoder_input_tokens`` ... ``task_id``) of a task or mixture."""
  provider = get_task_or_mixture(name)
  lengths = feature_lengths(inputs_length, targets_length)
  with _autograph_for(provider):
    ds = provider.get_dataset(lengths, split=split, shuffle=shuffle, seed=seed,
                              shard_info=shard_info, num_epochs=num_epochs)
    return feature_converter()(ds.map(lambda ex: {k: ex[k] for k in lengths}), lengths)


def _autograph_for(provider: seqio.Task | seqio.Mixture):
  """tf.data traces every map function of every task when a dataset is built, through AutoGraph
  by default: 6 of the 9 s that the embedded mixture's 36 tasks take to build. Our own tasks map
  only seqio's tokenize and append_eos and the feature converter, which have no tensor-dependent
  Python control flow, so they are traced plainly; a mixture holding anyone else's task keeps
  AutoGraph for all (a user's preprocessor may branch on tensors)."""
  leaves = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  own = all(isinstance(task, InMemoryTask) for task in leaves)
  return ag_ctx.ControlStatusCtx(ag_ctx.Status.DISABLED) if own else contextlib.nullcontext()
