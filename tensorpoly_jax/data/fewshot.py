"""Deterministic k-shot training subsets of a held-out task, drawn from its training pool only."""
from __future__ import annotations

import numpy as np
import seqio

from tensorpoly_jax.data import tasks

SEEDS = (0, 1, 32, 42, 1024)  # T-Few's few-shot seeds


def sample_indices(pool_size: int, k: int, seed: int) -> np.ndarray:
  """``k`` distinct indices into a pool of ``pool_size`` examples, fixed by ``seed``."""
  if k < 1 or k > pool_size:
    raise ValueError(f"few-shot k={k} must be in [1, {pool_size}] (the training pool holds"
                     f" {pool_size} examples); lower NUM_SHOTS.")
  return np.sort(np.random.default_rng(seed).choice(pool_size, size=k, replace=False))


def task_rows(task_name: str, split: str) -> list[dict]:
  """The prompted rows of a task's split as Python values (strings decoded)."""
  return tasks.cached_read(task_name, ("rows", split), lambda: _read_rows(task_name, split))


def _read_rows(task_name: str, split: str) -> list[dict]:
  task = tasks.get_task_or_mixture(task_name)
  if not isinstance(task, seqio.Task):
    raise ValueError(f"{task_name!r} is a mixture; few-shot subsets are drawn per task.")
  decode = lambda v: v.decode() if isinstance(v, bytes) else v
  rows = []
  for ex in task.source.get_dataset(split=split, shuffle=False).as_numpy_iterator():
    count = int(ex["num_choices"])
    rows.append({"inputs": decode(ex["inputs"]), "targets": decode(ex["targets"]),
                 "answer_choices": [decode(c) for c in ex["answer_choices"][:count]],
                 "label": int(ex["label"])})
  return rows


def fewshot_task_name(task_name: str, k: int, seed: int) -> str:
  return f"{task_name}__k{k}_seed{seed}"


def register_fewshot(task_name: str, k: int, seed: int, train_split: str = "train",
                     eval_split: str = "validation") -> str:
  """Registers ``<task>__k<k>_seed<seed>``: ``train`` is the k-shot subset of ``train_split``,
  ``validation`` is the task's evaluation split untouched."""
  pool = task_rows(task_name, train_split)
  subset = [pool[i] for i in sample_indices(len(pool), k, seed)]
  evaluation = task_rows(task_name, eval_split)
  name = fewshot_task_name(task_name, k, seed)
  rows_fn = lambda split: subset if split == "train" else evaluation
  task = tasks.get_task_or_mixture(task_name)
  tasks.add_task(name, tasks.examples_source(rows_fn, ["train", "validation"]),
                 task.output_features["targets"].vocabulary,
                 inputs_eos=task.output_features["inputs"].add_eos)
  return name
