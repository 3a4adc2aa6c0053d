"""Hugging Face ``datasets`` rows by name, or from a local copy in the same schema."""
from __future__ import annotations

import os

import numpy as np


class DataSourceError(RuntimeError):
  """A dataset that cannot be read: names it and how to provide a local copy."""


def local_path(data_dir: str, dataset: str, subset: str | None, split: str) -> str:
  """Where a local copy lives: ``data_dir/<dataset>[/<subset>]/<split>`` (``save_to_disk`` format)."""
  return os.path.join(data_dir, dataset, *([subset] if subset else []), split)


def load_rows(dataset: str, subset: str | None, split: str, data_dir: str | None = None,
              limit: int | None = None, seed: int = 0):
  """A ``datasets.Dataset`` of one split, from ``data_dir`` when a copy is there, else the hub;
  past ``limit`` rows, a seeded random sample of ``limit`` of them (in their stored order)."""
  import datasets

  name = f"{dataset}{'/' + subset if subset else ''} split {split!r}"
  copy = local_path(data_dir, dataset, subset, split) if data_dir else None
  if copy and os.path.isdir(copy):
    try:
      rows = datasets.load_from_disk(copy)
    except Exception as err:
      raise DataSourceError(f"the local copy of {name} at {copy} cannot be read ({err});"
                            " write it again with Dataset.save_to_disk.") from err
  else:
    try:
      rows = datasets.load_dataset(dataset, subset, split=split)
    except Exception as err:  # the hub raises many types (connection, missing script, auth)
      where = local_path(data_dir or "DATA_DIR", dataset, subset, split)
      raise DataSourceError(
          f"could not load Hugging Face dataset {name}: {type(err).__name__}: {err}. With network"
          f" access it downloads by name; without, save a copy with"
          f" `datasets.load_dataset({dataset!r}, {subset!r}, split={split!r}).save_to_disk({where!r})`"
          " and set DATA_DIR (--gin.DATA_DIR=...) to its root.") from err
  if len(rows) == 0:
    raise DataSourceError(f"dataset {name} is empty; check DATA_DIR or the split name.")
  if limit is not None and len(rows) > limit:
    # Not the first rows: hub splits are often sorted (imdb's train split by label).
    keep = np.random.default_rng([seed, limit]).choice(len(rows), limit, replace=False)
    rows = rows.select(np.sort(keep))
  return rows
