"""seqio registrations: the embedded mini-T0 suite, the T0 training mixture and held-out tasks.

Every training task is one (dataset, template) pair and one routing task; its integer id comes
from the mixture's id map (sorted task names), which checkpoints store. Held-out tasks keep all
their ``original_task`` templates and draw one at random per example; the trainer gives a held-out
task a fresh router row during adaptation.

Examples carry ``inputs``, ``targets`` (tokenized), ``answer_choices`` (strings, padded with "")
``num_choices`` and ``label`` (the gold choice), and ``task_id`` for training tasks.
"""
from __future__ import annotations

import difflib
import functools
import logging
from typing import Callable, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from tensorpoly_jax.data import embedded

class _InMemorySourceFilter(logging.Filter):
  """seqio warns on every read that an uncached FunctionDataSource shuffles poorly on restart;
  ours are in-memory lists that seqio shuffles per example, and resumes skip to the exact batch."""

  def filter(self, record):
    return "uncached FunctionDataset" not in record.getMessage()


logging.getLogger("absl").addFilter(_InMemorySourceFilter())

EMBEDDED_TRAIN = "embedded_train"
EMBEDDED_HELDOUT = "embedded_heldout"
NO_TASK_ID = -1
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
      TASK_FEATURE: np.full((len(rows), 1), task_id, np.int32),
  }


def examples_source(rows_fn: Callable[[str], Sequence[Mapping]], splits: Sequence[str],
                    task_id: int = NO_TASK_ID) -> seqio.DataSource:
  """A seqio source over prompted rows produced in Python by ``rows_fn(split)``."""
  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # one in-memory shard; seqio shuffles examples
    return tf.data.Dataset.from_tensor_slices(_columns(rows_fn(split), task_id))

  return seqio.FunctionDataSource(dataset_fn, splits=list(splits))


# Python-side reads of a registered task (rows, rank-classification arrays), reused by the many
# few-shot runs over one task; dropped when the task is registered again.
_READ_CACHE: dict[str, dict] = {}


def cached_read(name: str, key, read: Callable[[], object]):
  """``read()`` once per registered task ``name`` and ``key``."""
  entries = _READ_CACHE.setdefault(name, {})
  if key not in entries:
    entries[key] = read()
  return entries[key]


def add_task(name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary,
             inputs_eos: bool = True) -> seqio.Task:
  """Registers (or re-registers) a task with tokenized inputs/targets."""
  _READ_CACHE.pop(name, None)
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source, output_features=output_features(vocabulary, inputs_eos),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos])


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

  Mixtures: ``embedded_train`` (every training (task, template) pair, equal rates) and
  ``embedded_heldout`` (the held-out tasks, random template per example).
  """
  vocabulary = byte_vocabulary()
  suite = lambda: _embedded_suite(seed, sizes)
  names = {embedded_train_task(t, k): (t, k) for t in embedded.TRAIN_TASKS
           for k in range(len(embedded.TEMPLATES))}
  ids = routing_ids(list(names))
  for name, (task, template) in names.items():
    rows_fn = lambda split, task=task, template=template: [
        r for r in suite()[task][split] if r["template"] == template]
    add_task(name, examples_source(rows_fn, embedded.TRAIN_SPLITS, ids[name]), vocabulary)
  add_mixture(EMBEDDED_TRAIN, [(name, 1.0) for name in sorted(names)])
  for task in embedded.HELDOUT_TASKS:
    rows_fn = lambda split, task=task: suite()[task][split]
    add_task(embedded_heldout_task(task), examples_source(rows_fn, embedded.HELDOUT_SPLITS),
             vocabulary)
  add_mixture(EMBEDDED_HELDOUT, [(embedded_heldout_task(t), 1.0) for t in sorted(embedded.HELDOUT_TASKS)])
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
  ds = provider.get_dataset(lengths, split=split, shuffle=shuffle, seed=seed,
                            shard_info=shard_info, num_epochs=num_epochs)
  return feature_converter()(ds.map(lambda ex: {k: ex[k] for k in lengths}), lengths)
