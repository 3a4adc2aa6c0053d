"""Rank-classification arrays of a seqio task: every example's input once, all its choices.

``encoder_input_tokens: [n, l]``, ``choice_tokens: [n, c, t]`` (each choice tokenized with EOS;
absent choices all padding), ``label: [n]``, ``num_choices: [n]``.
"""
from __future__ import annotations

import numpy as np

from tensorpoly_jax.data import tasks


def _pad(ids, length):
  out = np.zeros(length, np.int32)
  ids = list(ids)[:length]
  out[:len(ids)] = ids
  return out


def choice_arrays(task_name: str, split: str, inputs_length: int, targets_length: int) -> dict:
  """The task's ``split`` as rank-classification arrays (inputs and choices cut to the lengths)."""
  return tasks.cached_read(task_name, ("choices", split, inputs_length, targets_length),
                           lambda: _read(task_name, split, inputs_length, targets_length))


def _read(task_name: str, split: str, inputs_length: int, targets_length: int) -> dict:
  task = tasks.get_task_or_mixture(task_name)
  vocabulary = task.output_features["targets"].vocabulary
  ds = task.get_dataset(tasks.feature_lengths(inputs_length, targets_length), split=split,
                        shuffle=False, num_epochs=1)
  inputs, choices, labels, counts = [], [], [], []
  truncated = 0
  for ex in ds.as_numpy_iterator():
    count = int(ex["num_choices"])
    encoded = [vocabulary.encode(c.decode()) + [1] for c in ex["answer_choices"][:count]]
    truncated += sum(len(e) > targets_length for e in encoded)
    inputs.append(_pad(ex["inputs"], inputs_length))
    choices.append([_pad(e, targets_length) for e in encoded])
    labels.append(int(ex["label"]))
    counts.append(count)
  if not inputs:
    raise ValueError(f"task {task_name!r} split {split!r} has no examples.")
  if truncated == sum(counts):
    raise ValueError(f"targets_length={targets_length} cuts every answer choice of {task_name!r}"
                     f" ({split}); raise TARGETS_LENGTH.")
  width = max(counts)
  padded = np.zeros((len(inputs), width, targets_length), np.int32)
  for i, rows in enumerate(choices):
    padded[i, :len(rows)] = rows
  return {"encoder_input_tokens": np.stack(inputs), "choice_tokens": padded,
          "label": np.asarray(labels, np.int32), "num_choices": np.asarray(counts, np.int32),
          "truncated_choices": truncated}
