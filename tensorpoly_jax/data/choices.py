"""Rank-classification arrays of a task: every row's input once, all its choices.

``encoder_input_tokens: [n, l]``, ``choice_tokens: [n, c, t]`` (each choice tokenized with EOS;
absent choices all padding), ``label: [n]``, ``num_choices: [n]``, ``example: [n]`` and
``template: [n]`` (a held-out example has one row per template that renders it).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from tensorpoly_jax.data import tasks

EOS_ID = 1
ROW_KEYS = ("encoder_input_tokens", "choice_tokens", "label", "num_choices", "example", "template")


def _pad(ids, length):
  out = np.zeros(length, np.int32)
  ids = list(ids)[:length]
  out[:len(ids)] = ids
  return out


def choice_arrays(task_name: str, split: str, inputs_length: int, targets_length: int,
                  examples: Sequence[int] | None = None) -> dict:
  """The rows of the task's ``split`` (of ``examples`` only, if given) as rank-classification
  arrays, inputs and choices cut to the lengths; a whole split is read once per task."""
  read = lambda: _arrays(task_name, split, inputs_length, targets_length, examples)
  if examples is not None:
    return read()
  return tasks.cached_read(task_name, ("choices", split, inputs_length, targets_length), read)


def evaluation_arrays(task_name: str, split: str, inputs_length: int, targets_length: int,
                      seed: int) -> dict:
  """One row per example of ``split``, its template drawn with ``seed`` (T-Few draws a template
  per evaluated example)."""
  return one_row_per_example(choice_arrays(task_name, split, inputs_length, targets_length), seed)


def choice_width(task_names: Sequence[str], split: str, inputs_length: int,
                 targets_length: int) -> int:
  """The widest choice axis among the tasks' ``split`` arrays: the width a run over several tasks
  pads them all to (``pad_choices``)."""
  return max(choice_arrays(task, split, inputs_length, targets_length)["choice_tokens"].shape[1]
             for task in task_names)


def pad_choices(arrays: dict, width: int | None) -> dict:
  """``arrays`` with absent choices appended up to ``width`` (None, or already as wide: as they
  are), so that the tasks of one run share a batch shape and their train step and scorer compile
  once. An absent choice is all padding: no loss term and no prediction reads it."""
  tokens = arrays["choice_tokens"]
  if width is None or tokens.shape[1] >= width:
    return arrays
  padded = np.zeros((tokens.shape[0], width, tokens.shape[2]), tokens.dtype)
  padded[:, :tokens.shape[1]] = tokens
  return {**arrays, "choice_tokens": padded}


def one_row_per_example(arrays: dict, seed: int) -> dict:
  """Keeps one row of each example: row ``floor(u·m)`` of its ``m``, ``u`` the example's uniform
  draw with ``seed`` (the only draw, so an example with one row keeps it whatever the seed)."""
  starts, counts = example_groups(arrays["example"])
  if (counts == 1).all():
    return arrays
  draws = np.random.default_rng(seed).random(len(starts))
  keep = starts + np.floor(draws * counts).astype(np.int64)
  return {key: value[keep] if isinstance(value, np.ndarray) else value
          for key, value in arrays.items()}


def encode_choice(vocabulary, choice: str) -> list[int]:
  """An answer choice's tokens as rank classification scores them: with its EOS."""
  return vocabulary.encode(choice) + [EOS_ID]


def example_groups(example_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(starts, counts)`` of the runs of equal example ids (rows of one example are adjacent)."""
  if len(example_ids) == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  starts = np.flatnonzero(np.r_[True, example_ids[1:] != example_ids[:-1]])
  return starts, np.diff(np.r_[starts, len(example_ids)])


def _arrays(task_name: str, split: str, inputs_length: int, targets_length: int,
            examples: Sequence[int] | None) -> dict:
  info = tasks.task_info(task_name)
  read = info.read(split, examples)
  rows = read.rows
  if read.dropped:  # counted where the rows were rendered; said wherever they are scored
    logging.warning("task %r split %r: %d row(s) not used: %s", task_name, split,
                    sum(read.dropped.values()),
                    "; ".join(f"{n} x {reason}" for reason, n in read.dropped.items()))
  if not rows:
    raise ValueError(f"task {task_name!r} split {split!r} has no examples.")
  unlabelled = [row for row in rows if not 0 <= row["label"] < len(row["answer_choices"])]
  if unlabelled:
    row = unlabelled[0]
    raise ValueError(
        f"task {task_name!r} split {split!r}: {len(unlabelled)} row(s) whose target is not one of"
        f" their answer choices, so rank classification cannot score them; the first (example"
        f" {row['example']}, template {row['template']}) has target {row['targets']!r} and choices"
        f" {list(row['answer_choices'])}. Fix the data (label indexes answer_choices).")
  vocabulary = info.vocabulary
  eos = [EOS_ID] if info.inputs_eos else []
  inputs = np.stack([_pad(vocabulary.encode(row["inputs"]) + eos, inputs_length) for row in rows])
  width = max(len(row["answer_choices"]) for row in rows)
  choice_tokens = np.zeros((len(rows), width, targets_length), np.int32)
  truncated = 0
  for i, row in enumerate(rows):
    for j, choice in enumerate(row["answer_choices"]):
      encoded = encode_choice(vocabulary, choice)
      truncated += len(encoded) > targets_length
      choice_tokens[i, j] = _pad(encoded, targets_length)
  counts = np.asarray([len(row["answer_choices"]) for row in rows], np.int32)
  if truncated == counts.sum():
    raise ValueError(f"targets_length={targets_length} cuts every answer choice of {task_name!r}"
                     f" ({split}); raise TARGETS_LENGTH.")
  return {"encoder_input_tokens": inputs, "choice_tokens": choice_tokens,
          "label": np.asarray([row["label"] for row in rows], np.int32), "num_choices": counts,
          "example": np.asarray([row["example"] for row in rows], np.int32),
          "template": np.asarray([row["template"] for row in rows], np.int32),
          "truncated_choices": truncated}
