"""Numpy batch streams for training; the batch at step ``s`` depends only on (seed, s), so a
resumed run sees exactly the batches an uninterrupted run would."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import seqio

from tensorpoly_jax.data import choices, tasks

CHOICE_KEYS = ("encoder_input_tokens", "choice_tokens", "label")
_TEMPLATE_DRAWS = 1  # a second random stream of (seed, step): the template of each batch row


def lm_batches(name: str, batch_size: int, inputs_length: int, targets_length: int, seed: int,
               start_step: int = 0, shard_info: seqio.ShardInfo | None = None) -> Iterator[dict]:
  """Endless shuffled batches of a task or mixture, resumed at ``start_step``.

  Each process reads its own shard; ``batch_size`` is this process's share of the global batch.
  """
  ds = tasks.get_dataset(name, inputs_length, targets_length, split="train", shuffle=True,
                         seed=seed, shard_info=shard_info, num_epochs=None)
  ds = ds.batch(batch_size, drop_remainder=True).skip(start_step).prefetch(2)
  for step, batch in enumerate(ds.as_numpy_iterator()):
    if step == 0 and (batch["decoder_target_tokens"][:, -1] > 1).all():
      raise ValueError(f"targets_length={targets_length} cuts every target of the first batch of"
                       f" {name!r} (none ends within it); raise TARGETS_LENGTH.")
    batch["task_ids"] = batch.pop("task_id")[:, 0]
    yield batch


def choice_batches(arrays: dict, batch_size: int, seed: int, start_step: int = 0,
                   task_id: int | None = None,
                   shard_info: seqio.ShardInfo | None = None) -> Iterator[dict]:
  """Endless batches of rank-classification arrays, examples reshuffled every epoch; an example
  with several rows (one per template, ``arrays["example"]``) shows a row drawn per step.

  ``batch_size`` is the global batch; with ``shard_info`` each process yields its contiguous
  slice of it (process ``i`` of ``n``: rows ``i·B/n`` to ``(i+1)·B/n``), so the global batch is the
  same however many processes share it.
  """
  shard = shard_info or seqio.ShardInfo(0, 1)
  if batch_size % shard.num_shards:
    raise ValueError(f"batch_size={batch_size} must be divisible by the {shard.num_shards}"
                     " processes.")
  local = batch_size // shard.num_shards
  mine = slice(shard.index * local, (shard.index + 1) * local)
  example_ids = arrays.get("example", np.arange(len(arrays["label"])))
  starts, counts = choices.example_groups(example_ids)
  total = len(starts)
  step = start_step
  while True:
    positions = np.arange(step * batch_size, (step + 1) * batch_size)[mine]
    epochs, offsets = positions // total, positions % total
    picked = np.array([np.random.default_rng([seed, e]).permutation(total)[o]
                       for e, o in zip(epochs, offsets)])
    index = starts[picked]
    if (counts > 1).any():
      draws = np.random.default_rng([seed, step, _TEMPLATE_DRAWS]).random(batch_size)[mine]
      index = index + np.floor(draws * counts[picked]).astype(np.int64)
    batch = {key: arrays[key][index] for key in CHOICE_KEYS}
    if task_id is not None:
      batch["task_ids"] = np.full(local, task_id, np.int32)
    yield batch
    step += 1
