"""Training metrics: a progress bar (step, loss, ETA), a JSONL log and TensorBoard event files,
written by process 0 only."""
from __future__ import annotations

import json
import os

import jax
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricLogger:
  """``with MetricLogger(model_dir, "pretrain", start, total) as log: log.step(step, metrics)``."""

  def __init__(self, model_dir: str, description: str, start: int, total: int):
    self.enabled = jax.process_index() == 0
    self.description = description
    self._bar = tqdm(total=total, initial=start, desc=description, disable=not self.enabled,
                     dynamic_ncols=True, mininterval=1.0)
    self._jsonl = self._writer = None
    if self.enabled:
      os.makedirs(model_dir, exist_ok=True)
      self._jsonl = open(os.path.join(model_dir, METRICS_FILE), "a")
      from tensorboardX import SummaryWriter

      self._writer = SummaryWriter(os.path.join(model_dir, "tensorboard"))

  def step(self, step: int, metrics: dict, log: bool) -> None:
    self._bar.update(1)
    if not self.enabled:
      return
    self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
    if log:
      self._jsonl.write(json.dumps({"stage": self.description, "step": step, **metrics}) + "\n")
      self._jsonl.flush()
      for key, value in metrics.items():
        self._writer.add_scalar(f"{self.description}/{key}", value, step)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._bar.close()
    if self.enabled:
      self._jsonl.close()
      self._writer.flush()
      self._writer.close()
