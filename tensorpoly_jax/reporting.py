"""Table-1-style reports computed from an evaluation JSON: per-task median over seeds, mean over
tasks, adaptation parameters; printed, written as JSON and drawn as a PNG bar chart."""
from __future__ import annotations

import os

import numpy as np

from tensorpoly_jax import paths
from tensorpoly_jax.evaluation import summarize


def table(evaluation: dict) -> dict:
  """``{method: {"tasks": {task: summary}, "mean": ..., "adaptation_params": ...}}``."""
  rows = {}
  for method, result in evaluation["results"].items():
    per_task = {task: summarize(list(seeds.values())) for task, seeds in result["accuracy"].items()}
    rows[method] = {"tasks": per_task,
                    "mean": float(np.mean([s["median"] for s in per_task.values()])),
                    "adaptation_params": result["adaptation_params"]}
  return rows


def format_table(rows: dict) -> str:
  tasks = sorted(next(iter(rows.values()))["tasks"])
  short = [t.split("__")[-1] for t in tasks]
  header = f"{'method':<20}{'params':>10}" + "".join(f"{s:>10}" for s in short) + f"{'mean':>8}"
  lines = [header, "-" * len(header)]
  for method, row in rows.items():
    cells = "".join(f"{100 * row['tasks'][t]['median']:>10.1f}" for t in tasks)
    lines.append(f"{method:<20}{row['adaptation_params']:>10,}{cells}{100 * row['mean']:>8.1f}")
  lines.append("accuracy (%) = median over few-shot seeds; mean = mean over held-out tasks")
  return "\n".join(lines)


def plot(rows: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = list(rows)
  means = [100 * rows[m]["mean"] for m in methods]
  fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2, 4))
  bars = ax.bar(methods, means, color="tab:blue")
  ax.bar_label(bars, labels=[f"{v:.1f}" for v in means])
  ax.set_ylabel("mean held-out accuracy (%)")
  ax.set_ylim(0, 100)
  ax.tick_params(axis="x", rotation=30)
  fig.tight_layout()
  paths.write_figure(path, fig)
  plt.close(fig)


def write_report(model_dir: str, evaluation: dict) -> dict:
  """Prints the table of an evaluation (as its JSON holds it), writes ``report.json`` and
  ``report.png``. It takes the evaluation itself, not its file: only process 0 writes that file,
  and every process prints the table."""
  rows = table(evaluation)
  print(format_table(rows))
  paths.write_json(os.path.join(model_dir, "report.json"), rows)
  plot(rows, os.path.join(model_dir, "report.png"))
  print(f"wrote report.json and report.png in {model_dir}")
  return rows
