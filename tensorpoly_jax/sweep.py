"""Grids over gin macros (``--sweep ORDER=2,4 --sweep TENSOR_RANK=2,4,8``): one run per point in
its own folder, then a table and a PNG of accuracy against adaptation parameters.

Each point writes ``<point>/point_result.json`` when it ends (a ``records`` record: the point, its
flags, its status, and its accuracy or its error), so a rerun of the same sweep skips the finished
points and the table is rebuilt from their records."""
from __future__ import annotations

import itertools
import os
from typing import Callable

from tensorpoly_jax import paths, records
from tensorpoly_jax.trainer import Preempted

POINT_RESULT = "point_result.json"


def parse_grid(specs: list[str]) -> list[dict[str, str]]:
  """``["ORDER=2,4", "TENSOR_RANK=2,8"]`` -> the 4 points of the product, in order."""
  axes = []
  for spec in specs:
    name, sep, values = spec.partition("=")
    if not sep or not name.strip() or not values.strip():
      raise ValueError(f"--sweep {spec!r} must look like MACRO=v1,v2,...")
    axes.append([(name.strip(), v.strip()) for v in values.split(",") if v.strip()])
  return [dict(point) for point in itertools.product(*axes)]


def point_name(point: dict[str, str]) -> str:
  return "_".join(f"{k}={v}" for k, v in point.items())


def point_flags(point: dict[str, str]) -> list[str]:
  return [f"--gin.{k}={v}" for k, v in point.items()]


def run(model_dir: str, grid: list[dict[str, str]], run_point: Callable[[dict], dict],
        describe: Callable[[dict], dict] = lambda point: {}) -> list[dict]:
  """Runs each point not finished by an earlier run with the same settings (``describe(point)``
  resolves the point's settings, which its record keeps; ``run_point`` then runs it and returns
  its ``adapt`` results), rewriting ``sweep_results.json`` after each, then prints the table and
  draws it.

  A point whose training diverges is a result of the grid (its learning rate is too high), not a
  failure of the sweep: its row says so. A point that fails otherwise is recorded with its error
  while the others run, and the sweep raises ``records.RunsFailed`` naming it at the end. A
  preemption stops the sweep (``Preempted`` propagates); the same command resumes it."""
  rows = []
  for point in grid:
    name = point_name(point)
    try:
      record = records.run_once(os.path.join(model_dir, name, POINT_RESULT),
                                {"point": point, "flags": point_flags(point), **describe(point)},
                                lambda: _finished_row(run_point(point)))
    except Preempted as notice:
      raise Preempted(f"sweep point {name} was preempted with {len(rows)} of {len(grid)} points"
                      f" done: {notice}") from notice
    if record["status"] != records.FINISHED:
      print(f"sweep point {name} {record['status']}: {record['error']}")
    rows.append(_row(record))
    paths.write_json(os.path.join(model_dir, "sweep_results.json"), rows)
  print(format_rows(rows))
  plot(rows, os.path.join(model_dir, "sweep.png"))
  records.raise_unfinished({point_name(row["point"]): row for row in rows
                            if row["status"] == records.FAILED})
  return rows


def _finished_row(result: dict) -> dict:
  return {"mean_accuracy": result["mean_of_medians"],
          "adaptation_params": result["adaptation_params"], "split": result["split"],
          "accuracy": result["accuracy"]}


def _row(record: dict) -> dict:
  """A point's row of ``sweep_results.json``: its record, with the fields an unfinished point
  had before records (no accuracy, and a diverged one's message under ``diverged``)."""
  if record["status"] == records.FINISHED:
    return record
  row = {**record, "mean_accuracy": None, "adaptation_params": None}
  if record["status"] == records.DIVERGED:
    row["diverged"] = record["error"]
  return row


def format_rows(rows: list[dict]) -> str:
  lines = [f"{'point':<40}{'params':>12}{'accuracy':>10}"]
  for row in rows:
    if row["mean_accuracy"] is None:
      lines.append(f"{point_name(row['point']):<40}{'-':>12}{row['status']:>10}")
    else:
      lines.append(f"{point_name(row['point']):<40}{row['adaptation_params']:>12,}"
                   f"{100 * row['mean_accuracy']:>10.1f}")
  return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for row in (r for r in rows if r["mean_accuracy"] is not None):
    ax.scatter(row["adaptation_params"], 100 * row["mean_accuracy"])
    ax.annotate(point_name(row["point"]), (row["adaptation_params"], 100 * row["mean_accuracy"]),
                fontsize=7)
  ax.set_xscale("log")
  ax.set_xlabel("adaptation parameters")
  ax.set_ylabel("mean held-out accuracy (%)")
  fig.tight_layout()
  paths.write_figure(path, fig)
  plt.close(fig)
