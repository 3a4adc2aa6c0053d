"""Training metrics: progress (``console.Progress``: step, loss, ETA), a JSONL log and TensorBoard
event files, written by process 0 only."""
from __future__ import annotations

import json

import jax

from tensorpoly_jax import console, paths

METRICS_FILE = "metrics.jsonl"


class MetricLogger:
  """``with MetricLogger(model_dir, "pretrain", start, total) as m: m.advance(); m.log(step, metrics)``."""

  def __init__(self, model_dir: str, description: str, start: int, total: int):
    self.enabled = jax.process_index() == 0
    self.description = description
    self._progress = console.Progress(total, description, initial=start)
    self._jsonl = self._writer = None
    if self.enabled:
      directory = paths.resolve(model_dir)
      directory.mkdir(parents=True, exist_ok=True)
      self._jsonl = paths.open_append(directory / METRICS_FILE)
      from tensorboardX import SummaryWriter

      # tensorboardX writes gs:// and s3:// itself (with their client libraries installed).
      self._writer = SummaryWriter(str(directory / "tensorboard"))

  def advance(self) -> None:
    """One step done (progress needs no metric values, so no device sync)."""
    self._progress.advance()

  def log(self, step: int, metrics: dict) -> None:
    """Writes one step's fetched metrics (floats) under stable ``train/<name>`` tags: which run
    they belong to is the folder, so runs overlay in TensorBoard."""
    if not self.enabled:
      return
    self._progress.report(loss=metrics["loss"])
    self._jsonl.write(json.dumps({"stage": self.description, "step": step, **metrics}) + "\n")
    self._jsonl.flush()
    for key, value in metrics.items():
      self._writer.add_scalar(f"train/{key}", value, step)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._progress.close()
    if self.enabled:
      self._jsonl.close()
      self._writer.flush()
      self._writer.close()


def write_eval(model_dir: str, accuracy: float, step: int) -> None:
  """``eval/accuracy`` beside a run's training curves (process 0 only)."""
  if jax.process_index() != 0:
    return
  from tensorboardX import SummaryWriter

  with SummaryWriter(str(paths.resolve(model_dir) / "tensorboard")) as writer:
    writer.add_scalar("eval/accuracy", accuracy, step)
