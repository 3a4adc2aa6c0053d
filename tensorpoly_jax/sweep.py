"""Grids over gin macros (``--sweep ORDER=2,4 --sweep TENSOR_RANK=2,4,8``): one run per point in
its own folder, then a table and a PNG of accuracy against adaptation parameters."""
from __future__ import annotations

import itertools
import json
import os
from typing import Callable


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


def run(model_dir: str, grid: list[dict[str, str]], run_point: Callable[[dict], dict]) -> list[dict]:
  """Runs each point (``run_point`` returns its ``adapt`` results), then writes the summary.

  A point whose training diverges is a result of the grid (its learning rate is too high), not a
  failure of the sweep: its row says so and the other points still run."""
  from tensorpoly_jax.trainer import TrainingDiverged

  rows = []
  for point in grid:
    try:
      result = run_point(point)
    except TrainingDiverged as err:
      print(f"sweep point {point_name(point)} diverged: {err}")
      rows.append({"point": point, "diverged": str(err), "mean_accuracy": None,
                   "adaptation_params": None})
      continue
    rows.append({"point": point, "mean_accuracy": result["mean_of_medians"],
                 "adaptation_params": result["adaptation_params"], "split": result["split"],
                 "accuracy": result["accuracy"]})
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, "sweep_results.json"), "w") as f:
    json.dump(rows, f, indent=2)
  print(format_rows(rows))
  plot(rows, os.path.join(model_dir, "sweep.png"))
  return rows


def format_rows(rows: list[dict]) -> str:
  lines = [f"{'point':<40}{'params':>12}{'accuracy':>10}"]
  for row in rows:
    if row["mean_accuracy"] is None:
      lines.append(f"{point_name(row['point']):<40}{'-':>12}{'diverged':>10}")
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
  fig.savefig(path, dpi=100)
  plt.close(fig)
