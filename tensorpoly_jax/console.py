"""What a run tells its user, from process 0 only: progress bars on a terminal; plain timestamped
lines where stdout is not a terminal (``nohup``, a pod's launcher, CI logs), which carriage-return
bars would fill with redrawn lines."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable

import jax
from tqdm import tqdm


def interactive() -> bool:
  """Bars on a terminal, lines in a log."""
  return sys.stdout.isatty()


def _speaks() -> bool:
  return jax.process_index() == 0


def say(message: str) -> None:
  """One line: above the bars on a terminal, absl-style timestamped in a log."""
  if not _speaks():
    return
  if interactive():
    tqdm.write(message)
  else:
    print(f"I{time.strftime('%m%d %H:%M:%S')} {message}", flush=True)


@contextlib.contextmanager
def timed(what: str):
  """``what...`` now, and how long it took once the block ends (a jit's first call: its compile)."""
  say(f"{what}...")
  started = time.perf_counter()
  yield
  say(f"{what}: done in {time.perf_counter() - started:.1f} s")


def timed_compiles(function, what: str, shapes: Callable[..., dict]):
  """``function`` (jitted), whose first call with each new ``shapes(*args)`` (``{name: shape}`` of
  the inputs whose shapes vary) is announced and timed (``timed``): that call compiles, which can
  take minutes with nothing else to show."""
  seen = set()

  def call(*args):
    signature = shapes(*args)
    key = tuple(sorted(signature.items()))
    if key in seen:
      return function(*args)
    described = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in key)
    with timed(f"{what} for {described}"):
      result = function(*args)
    seen.add(key)
    return result

  return call


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  minutes, seconds = divmod(seconds, 60)
  return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
  """Units of work done out of ``total`` (None: unknown): a tqdm bar on a terminal; in a log, a
  line per ``report`` call (the trainer's: every ``log_every`` steps).

  ``with Progress(total, "pretrain lora", unit="step") as p: p.advance(); p.report(loss=0.5)``
  """

  def __init__(self, total: int | None, description: str, initial: int = 0, unit: str = "step"):
    self.total, self.description, self.unit = total, description, unit
    self.done = initial
    self._clock = None  # (time, done) at the first advance: the rate leaves out what came before
    self._bar = None
    if _speaks() and interactive():
      self._bar = tqdm(total=total, initial=initial, desc=description, unit=f" {unit}s",
                       dynamic_ncols=True, mininterval=1.0)

  def advance(self, count: int = 1) -> None:
    self.done += count
    if self._clock is None:  # a first step's time is mostly its compile
      self._clock = (time.perf_counter(), self.done)
    if self._bar is not None:
      self._bar.update(count)

  def report(self, **values: float) -> None:
    """The bar's postfix on a terminal; in a log, one line with ``values``, the rate and the ETA."""
    if self._bar is not None:
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
      return
    count = self.done if self.total is None else f"{self.done}/{self.total}"
    parts = [f"{self.unit} {count}", *(f"{k} {v:.4g}" for k, v in values.items())]
    if self._clock is not None and self.done > self._clock[1]:
      started, first = self._clock
      rate = (self.done - first) / max(time.perf_counter() - started, 1e-9)
      parts.append(f"{rate:.3g} {self.unit}s/s")
      if self.total is not None and self.done < self.total:
        parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
    say(f"{self.description}: {', '.join(parts)}")

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
