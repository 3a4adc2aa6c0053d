"""Deterministic k-shot training subsets of a held-out task, drawn from its training pool only.

The pool's rank-classification arrays are built once per task (``choices.choice_arrays``, cached);
each (k, seed) subset is a row selection of them, so no task is registered per few-shot run.
"""
from __future__ import annotations

import numpy as np

from tensorpoly_jax.data import choices

SEEDS = (0, 1, 32, 42, 1024)  # T-Few's few-shot seeds
_ROW_KEYS = ("encoder_input_tokens", "choice_tokens", "label", "num_choices")


def sample_indices(pool_size: int, k: int, seed: int) -> np.ndarray:
  """``k`` distinct indices into a pool of ``pool_size`` examples, fixed by ``seed``."""
  if k < 1 or k > pool_size:
    raise ValueError(f"few-shot k={k} must be in [1, {pool_size}] (the training pool holds"
                     f" {pool_size} examples); lower NUM_SHOTS.")
  return np.sort(np.random.default_rng(seed).choice(pool_size, size=k, replace=False))


def fewshot_arrays(task_name: str, k: int, seed: int, inputs_length: int, targets_length: int,
                   pool_split: str = "train") -> dict:
  """The ``k``-shot subset (drawn with ``seed``) of the task's ``pool_split`` as rank-classification
  arrays, its choice axis as wide as its own widest example."""
  pool = choices.choice_arrays(task_name, pool_split, inputs_length, targets_length)
  index = sample_indices(len(pool["label"]), k, seed)
  subset = {key: pool[key][index] for key in _ROW_KEYS}
  subset["choice_tokens"] = subset["choice_tokens"][:, :subset["num_choices"].max()]
  return subset
