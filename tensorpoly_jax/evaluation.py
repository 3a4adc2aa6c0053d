"""Rank classification: score every answer choice by its (length-normalized) target
log-likelihood with the encoder run once per example, predict the best; accuracy; seed medians."""
from __future__ import annotations

import functools

import jax
import numpy as np

from tensorpoly_jax import console, partitioning
from tensorpoly_jax.t5.model import EncoderDecoder
from tensorpoly_jax.t5.seq2seq import Seq2SeqModel


class Scorer:
  """Rank classification by one model on one mesh: ``score(params, encoder_tokens, choice_tokens,
  task_ids) -> [b, c]`` (``Seq2SeqModel.score_choices``) is jitted once and compiles once per batch
  shape, for every task and every params it scores. Params keep the shardings they were placed
  with; the scores come back replicated."""

  def __init__(self, model: EncoderDecoder, mesh, length_normalize: bool = True):
    self.mesh = mesh
    score = functools.partial(Seq2SeqModel(model).score_choices, length_normalize=length_normalize)
    self.score = jax.jit(score, out_shardings=partitioning.replicated(mesh))
    self._score = console.timed_compiles(
        self.score, "compiling the scorer",
        lambda params, inputs, choice_tokens, task_ids: {"encoder_input_tokens": inputs.shape,
                                                         "choice_tokens": choice_tokens.shape})

  def predict(self, params, arrays: dict, task_id: int | None, batch_size: int = 32,
              description: str = "eval") -> np.ndarray:
    """Predicted choice per example. ``params`` should already be on the mesh (placed once by
    the caller); batches are split over its ``data`` axis and padded to one shape. Every process
    passes the same arrays and gets every prediction. Non-finite scores raise ValueError
    (``check_finite``). Progress is shown as ``description``."""
    data = self.mesh.shape["data"]
    if batch_size % data:
      raise ValueError(f"eval batch_size={batch_size} must be divisible by the mesh's data axis"
                       f" ({data}); bind a multiple of {data}: --gin.evaluate.batch_size=N (tensorpoly"
                       " eval) or --gin.adapt.eval_batch_size=N (tensorpoly adapt).")
    sharding = partitioning.batch_sharding(self.mesh)
    total = len(arrays["label"])
    predictions = []
    with console.Progress(total, description, unit="example") as progress:
      for start in range(0, total, batch_size):
        index = np.arange(start, start + batch_size) % total
        ids = None if task_id is None else np.full((batch_size,), task_id, np.int32)
        batch = jax.device_put((arrays["encoder_input_tokens"][index],
                                arrays["choice_tokens"][index], ids), sharding)
        scores = np.asarray(self._score(params, *batch))[:min(batch_size, total - start)]
        check_finite(scores, arrays["choice_tokens"][index[:len(scores)]], start, task_id)
        predictions.append(scores.argmax(-1))
        progress.advance(len(scores))
      progress.report()
    return np.concatenate(predictions)

  def accuracy(self, params, arrays: dict, task_id: int | None = None, batch_size: int = 32,
               description: str = "eval") -> float:
    predictions = self.predict(params, arrays, task_id, batch_size, description)
    return float(np.mean(predictions == arrays["label"]))


def check_finite(scores: np.ndarray, choice_tokens: np.ndarray, start: int,
                 task_id: int | None) -> None:
  """Refuses NaN or inf scores of present choices (absent ones score -inf on purpose): an argmax
  over NaN picks choice 0 and would count as a prediction."""
  present = (choice_tokens > 0).any(-1)
  rows = np.flatnonzero((present & ~np.isfinite(scores)).any(-1))
  if rows.size:
    examples = (start + rows).tolist()
    raise ValueError(
        f"task_id={task_id}: the choice scores of examples {examples[:10]}"
        f"{' ...' if len(examples) > 10 else ''} are not finite (example {examples[0]}:"
        f" {scores[rows[0]].tolist()}); the scored params hold NaN or inf (a diverged run?) or"
        " the model overflows in its dtype. Score other params, or check how these were made.")


def summarize(accuracies: list[float]) -> dict[str, float]:
  """Median (the paper's statistic), mean and interquartile range over seeds."""
  values = np.asarray(accuracies, np.float64)
  q1, q3 = np.percentile(values, [25, 75])
  return {"median": float(np.median(values)), "mean": float(values.mean()),
          "iqr": float(q3 - q1), "n": int(values.size)}
