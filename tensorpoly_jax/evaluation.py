"""Rank classification: score every answer choice by its (length-normalized) target
log-likelihood with the encoder run once per example, predict the best; accuracy; seed medians."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tensorpoly_jax.t5 import scoring
from tensorpoly_jax.t5.model import EncoderDecoder


@functools.partial(jax.jit, static_argnames=("model", "length_normalize"))
def _batch_scores(model, params, encoder_tokens, choice_tokens, task_ids, length_normalize):
  scores = scoring.score_choices(model, {"params": params}, encoder_tokens, choice_tokens,
                                 task_ids, length_normalize)
  return jnp.where((choice_tokens > 0).any(-1), scores, -jnp.inf)  # absent choices never win


def predict(model: EncoderDecoder, params, arrays: dict, task_id: int | None,
            batch_size: int = 32, length_normalize: bool = True) -> np.ndarray:
  """Predicted choice per example; batches are padded to one shape so the scorer compiles once."""
  total = len(arrays["label"])
  predictions = []
  for start in range(0, total, batch_size):
    index = np.arange(start, start + batch_size) % total
    ids = None if task_id is None else jnp.full((batch_size,), task_id, jnp.int32)
    scores = _batch_scores(model, params, arrays["encoder_input_tokens"][index],
                           arrays["choice_tokens"][index], ids, length_normalize)
    predictions.append(np.asarray(scores).argmax(-1)[:min(batch_size, total - start)])
  return np.concatenate(predictions)


def accuracy(model, params, arrays, task_id=None, batch_size=32, length_normalize=True) -> float:
  return float(np.mean(predict(model, params, arrays, task_id, batch_size, length_normalize)
                       == arrays["label"]))


def summarize(accuracies: list[float]) -> dict[str, float]:
  """Median (the paper's statistic), mean and interquartile range over seeds."""
  values = np.asarray(accuracies, np.float64)
  q1, q3 = np.percentile(values, [25, 75])
  return {"median": float(np.median(values)), "mean": float(values.mean()),
          "iqr": float(q3 - q1), "n": int(values.size)}
