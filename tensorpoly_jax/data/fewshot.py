"""Deterministic k-shot training subsets of a held-out task, drawn from its training pool only.

``k`` source examples are drawn by index, and only they are rendered and tokenized (with every
template that renders them: training draws one per example per step), so a draw from a large pool
costs k examples and no task is registered per few-shot run.
"""
from __future__ import annotations

import numpy as np

from tensorpoly_jax.data import choices, tasks

SEEDS = (0, 1, 32, 42, 1024)  # T-Few's few-shot seeds


def sample_indices(pool_size: int, k: int, seed: int) -> np.ndarray:
  """``k`` distinct indices into a pool of ``pool_size`` examples, fixed by ``seed``."""
  if k < 1 or k > pool_size:
    raise ValueError(f"few-shot k={k} must be in [1, {pool_size}] (the training pool holds"
                     f" {pool_size} examples); lower NUM_SHOTS.")
  return np.sort(np.random.default_rng(seed).choice(pool_size, size=k, replace=False))


def num_shots(task_name: str, shots: int | None) -> int:
  """``shots`` when a run sets it, else the task's own k (T-Few's per-task k on T0)."""
  if shots is not None:
    return shots
  k = tasks.task_info(task_name).num_shots
  if k is None:
    raise ValueError(f"task {task_name!r} has no few-shot k of its own; set NUM_SHOTS"
                     " (--gin.NUM_SHOTS=32).")
  return k


def fewshot_arrays(task_name: str, k: int, seed: int, inputs_length: int, targets_length: int,
                   pool_split: str = tasks.POOL_SPLIT) -> dict:
  """The ``k``-shot subset (drawn with ``seed``) of the task's ``pool_split`` as rank-classification
  arrays, its choice axis as wide as its own widest row."""
  info = tasks.task_info(task_name)
  index = sample_indices(info.num_examples(pool_split), k, seed)
  subset = choices.choice_arrays(task_name, pool_split, inputs_length, targets_length, index)
  subset.pop("truncated_choices")
  return subset
