"""The embedded suite's tuning protocol: every method gets the same budget of choices, made on
validation, and is reported on test.

1. backbone: the demo's tiny T5, trained on the embedded training tasks.
2. select: per method, ``tensorpoly sweep`` (``runs/sweep.gin``: validation only) over the same
   number of points: its trained weights' learning rate (``ADAPTER_LR`` for LoRA-named weights,
   ``LEAF_LR`` for tensor leaves) x ``PRETRAIN_STEPS``. The chosen point has the best mean
   validation accuracy (the mean over tasks of the median over few-shot seeds).
3. report: the chosen point again with ``runs/report.gin`` (the test split) for every pretraining
   seed, each adapted with every few-shot seed.
4. variants: each departure from the reference in ``VARIANTS``, for the tensor methods at their
   chosen point (not tuned again, so the comparison favours the reference if anything): its
   validation accuracy, then its test report as in 3.
5. ablation: TensorPoly-I and -II at their chosen point over R x N (validation): even N with the
   reference's pair LayerNorm, N=3 with the plain product (the LayerNorm multiplies leaves in
   pairs, so it needs an even N).
6. modes: every routed method at its chosen point in every ``ADAPT_MODE``, each mode's setting
   chosen on validation, reported on test at k in {4, 8, 16, 32} over replicates of the backbone
   and pretraining seeds, with bootstrap intervals (``protocol_modes``). ``--only_modes`` runs
   this stage alone at the chosen points of the existing ``--output`` JSON and adds it there.
Writes ``benchmarks/results/embedded_protocol.{json,png}``, ``embedded_ablation.png`` and
``embedded_protocol_modes_{params,shots}.png``. Every stage resumes: finished sweeps and runs are
read back, unfinished runs continue from their checkpoints.

  python benchmarks/embedded_protocol.py --work_dir runs/protocol [--jobs 2] [--only_modes]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position
import protocol_modes  # noqa: E402  pylint: disable=wrong-import-position

from tensorpoly_jax import paths  # noqa: E402

# The demo's adapter sizes (tests check that these flags build demo.METHODS).
METHOD_FLAGS = {
    "lora": {"LORA_RANK": "4"},
    "tlora": {"LORA_RANK": "4", "TENSOR_RANK": "2", "ORDER": "2"},
    "poly": {"LORA_RANK": "4", "N_SKILLS": "8"},
    "mhr": {"LORA_RANK": "4", "N_SKILLS": "8", "N_SPLITS": "4"},
    "tensorpoly_i": {"LORA_RANK": "4", "TENSOR_RANK": "8", "ORDER": "2"},
    "tensorpoly_ii": {"LORA_RANK": "4", "TENSOR_RANK": "8", "ORDER": "2"},
}
RATE_MACRO = {"lora": "ADAPTER_LR", "poly": "ADAPTER_LR", "mhr": "ADAPTER_LR",
              "tlora": "LEAF_LR", "tensorpoly_i": "LEAF_LR", "tensorpoly_ii": "LEAF_LR"}
RATES = ("3e-4", "1e-3", "3e-3", "1e-2", "3e-2")
PRETRAIN_STEPS = ("400", "1000")
PRETRAIN_SEEDS = ("0", "1")
ABLATION_RANKS = ("1", "2", "4", "8", "16")
ABLATION = {"even": ("2,4", "'layernorm'"), "odd": ("3", "'none'")}  # ORDER values, PAIR_NORM
TENSOR_METHODS = ("tlora", "tensorpoly_i", "tensorpoly_ii")
# Departures from the reference, each run at the tensor methods' chosen points.
VARIANTS = {
    "pair_norm_eps_1e-2": (
        {"PAIR_NORM_EPS": "1e-2"},
        "the pair LayerNorm's eps scaled by (2048/64)^2 ~ 1e3 from T0-3B's width to the tiny"
        " T5's, so that the pair products start as far below it as at T0-3B (a fixed gain, a"
        " small starting adapter) instead of being normalized from the first step"),
}
DATA = ("--gin_file=runs/data_embedded.gin",)


def grid_flags(method: str) -> list[str]:
  """The method's selection grid, as ``tensorpoly sweep`` flags (the same size for every method)."""
  return ["--sweep", f"{RATE_MACRO[method]}={','.join(RATES)}",
          "--sweep", f"PRETRAIN_STEPS={','.join(PRETRAIN_STEPS)}"]


class Sweep(NamedTuple):
  model_dir: str
  command: list[str]


def sweep_command(method: str, run_file: str, backbone_dir: str, model_dir: str,
                  macros: dict[str, str], sweep_flags: list[str]) -> Sweep:
  gin = {**METHOD_FLAGS[method], **macros, "BACKBONE_DIR": repr(backbone_dir)}
  return Sweep(model_dir, [
      sys.executable, "-m", "tensorpoly_jax", "sweep", f"--gin_file=adapters/{method}.gin", *DATA,
      f"--gin_file={run_file}", f"--model_dir={model_dir}",
      *(f"--gin.{k}={v}" for k, v in gin.items()), *sweep_flags])


def run_sweeps(sweeps: dict[str, Sweep], log_dir: str, jobs: int) -> dict[str, list[dict]]:
  """Runs each sweep unless its results exist, ``jobs`` at a time; returns each one's
  ``sweep_results.json`` rows."""
  os.makedirs(log_dir, exist_ok=True)

  def run(name):
    model_dir, command = sweeps[name]
    results_path = os.path.join(model_dir, "sweep_results.json")
    if not os.path.exists(results_path):
      started = time.time()
      with open(os.path.join(log_dir, f"{name}.log"), "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
      print(f"  {name}: {time.time() - started:.0f} s", flush=True)
    with open(results_path) as f:
      return name, json.load(f)

  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    return dict(pool.map(run, sweeps))


def choose(rows: list[dict]) -> dict:
  """The row with the best mean validation accuracy (the first in grid order on a tie); diverged
  points are never chosen."""
  finished = [r for r in rows if r["mean_accuracy"] is not None]
  if not finished:
    raise RuntimeError("every point of the grid diverged; lower the learning rates.")
  if any(r["split"] != "validation" for r in finished):
    raise RuntimeError("a selection sweep read a split other than validation.")
  return max(finished, key=lambda r: r["mean_accuracy"])


def summarize_report(rows: list[dict]) -> dict:
  """Test accuracy of one method's chosen point: per pretraining seed, the sweep row's mean over
  tasks of the median over few-shot seeds, and the mean over tasks for each single few-shot seed
  (the spread)."""
  by_pretrain_seed = {}
  for row in rows:
    accuracy = row["accuracy"]  # {task: {few-shot seed: accuracy}}
    few_shot_seeds = sorted(next(iter(accuracy.values())))
    by_pretrain_seed[row["point"]["PRETRAIN_SEED"]] = {
        "mean_of_medians": row["mean_accuracy"],
        "few_shot_seed_means": {seed: statistics.fmean(s[seed] for s in accuracy.values())
                                for seed in few_shot_seeds},
        "accuracy": accuracy,
    }
  medians = [s["mean_of_medians"] for s in by_pretrain_seed.values()]
  single_runs = [a for s in by_pretrain_seed.values() for a in s["few_shot_seed_means"].values()]
  return {"mean_of_medians": statistics.fmean(medians), "pretrain_seed_range": [min(medians),
                                                                               max(medians)],
          "single_run_range": [min(single_runs), max(single_runs)],
          "adaptation_params": rows[0]["adaptation_params"], "pretrain_seeds": by_pretrain_seed}


def tune(methods: list[str], work: str, backbone: str, macros: dict[str, str], logs: str,
         jobs: int, prefix: str = "", grids_flags: dict[str, list[str]] | None = None) -> dict:
  """Each method's grid (``grid_flags`` unless given) on validation, then its chosen point on
  test for every pretraining seed:
  ``{method: {"grid": rows, "chosen": {"point", "validation_accuracy"}, "test": summary}}``."""
  grids_flags = grids_flags or {m: grid_flags(m) for m in methods}
  print(f"{prefix}select (validation)", flush=True)
  grids = run_sweeps({f"{prefix}{m}": sweep_command(
      m, "runs/sweep.gin", backbone, f"{work}/select/{m}", macros, grids_flags[m])
      for m in methods}, logs, jobs)
  chosen = {m: choose(grids[f"{prefix}{m}"]) for m in methods}
  print(f"{prefix}report (test)", flush=True)
  reports = run_sweeps({f"{prefix}report_{m}": sweep_command(
      m, "runs/report.gin", backbone, f"{work}/report/{m}", {**macros, **chosen[m]["point"]},
      ["--sweep", f"PRETRAIN_SEED={','.join(PRETRAIN_SEEDS)}"]) for m in methods}, logs, jobs)
  return {m: {"grid": grids[f"{prefix}{m}"],
              "chosen": {"point": chosen[m]["point"],
                         "validation_accuracy": chosen[m]["mean_accuracy"]},
              "test": summarize_report(reports[f"{prefix}report_{m}"])} for m in methods}


def train_backbone(work_dir: str) -> str:
  from tensorpoly_jax import cli, pipeline
  from tensorpoly_jax.data import tasks
  from tensorpoly_jax.t5.model import preset

  config = cli.demo_config()
  tasks.register_embedded(config.data_seed, config.sizes)
  return pipeline.train_backbone(os.path.join(work_dir, "backbone"), preset("tiny"),
                                 tasks.EMBEDDED_TRAIN, config.train_config("backbone"))


def zero_shot(backbone_dir: str, work_dir: str) -> dict:
  from tensorpoly_jax import cli, commands

  config = cli.demo_config()
  accuracy = commands.evaluate(os.path.join(work_dir, "zero_shot"), backbone_dir,
                               "embedded_heldout", split="test",
                               inputs_length=config.inputs_length,
                               targets_length=config.targets_length)
  return {"accuracy": accuracy, "mean": statistics.fmean(accuracy.values())}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work_dir", required=True, help="every run's folder (resumable)")
  parser.add_argument("--jobs", type=int, default=2, help="sweeps run at once")
  parser.add_argument("--methods", default=",".join(METHOD_FLAGS))
  parser.add_argument("--no-ablation", action="store_true")
  parser.add_argument("--no-modes", action="store_true")
  parser.add_argument("--only_modes", action="store_true",
                      help="run the modes stage alone, at the chosen points of the --output JSON")
  parser.add_argument("--output", default=os.path.join(common.RESULTS, "embedded_protocol"))
  args = parser.parse_args()
  if args.only_modes and args.no_modes:
    parser.error("--only_modes and --no-modes contradict each other; pass one.")
  methods = args.methods.split(",")
  started = time.time()
  work = os.path.abspath(args.work_dir)
  if args.only_modes:
    with open(f"{args.output}.json") as f:
      results = json.load(f)
    add_modes(results, methods, work, args)
    return
  logs = os.path.join(work, "logs")
  print("backbone", flush=True)
  backbone = train_backbone(work)
  tuned = tune(methods, work, backbone, {}, logs, args.jobs)
  chosen = {m: tuned[m]["chosen"] for m in methods}
  variants = {}
  for name, (macros, why) in VARIANTS.items():
    print(f"variant {name}", flush=True)
    varied = [m for m in methods if m in TENSOR_METHODS]
    at_chosen = {m: [f for k, v in chosen[m]["point"].items() for f in ("--sweep", f"{k}={v}")]
                 for m in varied}
    variants[name] = {"macros": macros, "why": why, "grid": "each method's chosen point",
                      "methods": tune(varied, os.path.join(work, f"variant_{name}"), backbone,
                                      macros, logs, args.jobs, f"{name}_", at_chosen)}
  ablation = {}
  if not args.no_ablation:
    print("ablation (validation)", flush=True)
    ablated = [m for m in ("tensorpoly_i", "tensorpoly_ii") if m in methods]
    rows = run_sweeps({f"ablation_{m}_{parity}": sweep_command(
        m, "runs/sweep.gin", backbone, f"{work}/ablation/{m}_{parity}",
        {**chosen[m]["point"], "PAIR_NORM": pair_norm},
        ["--sweep", f"ORDER={orders}", "--sweep", f"TENSOR_RANK={','.join(ABLATION_RANKS)}"])
        for m in ablated for parity, (orders, pair_norm) in ABLATION.items()}, logs, args.jobs)
    ablation = {m: [dict(r, pair_norm=ABLATION[p][1].strip("'")) for p in ABLATION
                    for r in rows[f"ablation_{m}_{p}"]] for m in ablated}
  results = {
      "command": " ".join(["python", "benchmarks/embedded_protocol.py", *sys.argv[1:]]),
      "commit": common.git_commit(),
      "machine": common.machine(),
      "protocol": {"grid": {m: grid_flags(m) for m in methods}, "method_flags": METHOD_FLAGS,
                   "pretrain_seeds": PRETRAIN_SEEDS, "fixed": "configs/runs/sweep.gin",
                   "selection": "best mean validation accuracy (mean over tasks of the median"
                                " over few-shot seeds)"},
      "zero_shot_test": zero_shot(backbone, work),
      "methods": tuned,
      "ablation": ablation,
      "variants": variants,
      "seconds": round(time.time() - started, 1),
  }
  paths.write_json(f"{args.output}.json", results)
  print(format_table(results))
  plot_accuracy_vs_params(results, f"{args.output}.png")
  if ablation:
    print(format_ablation(ablation))
    plot_ablation(ablation, os.path.join(os.path.dirname(args.output), "embedded_ablation.png"))
  if not args.no_modes:
    add_modes(results, methods, work, args)


def chosen_points(results: dict, methods: list[str]) -> dict[str, dict]:
  """Each method's chosen rate and pretraining steps, as ``protocol_modes`` takes them."""
  return {m: {"learning_rate": results["methods"][m]["chosen"]["point"][RATE_MACRO[m]],
              "pretrain_steps": results["methods"][m]["chosen"]["point"]["PRETRAIN_STEPS"]}
          for m in methods}


def add_modes(results: dict, methods: list[str], work: str, args) -> None:
  """Runs the modes stage and writes it into ``results``' JSON, with its own command, commit,
  machine and time (it may run on another day than the stages before it)."""
  print("modes", flush=True)
  started = time.time()
  commit = common.git_commit()
  modes = protocol_modes.run(
      protocol_modes.Stage(os.path.join(work, "modes"), chosen_points(results, methods)),
      args.jobs)
  results["modes"] = {
      "command": " ".join(["python", "benchmarks/embedded_protocol.py", *sys.argv[1:]]),
      "commit": commit, "machine": common.machine(), **modes,
      "seconds": round(time.time() - started, 1)}
  paths.write_json(f"{args.output}.json", results)
  protocol_modes.report(results["modes"], f"{args.output}_modes")


def tuned_rows(results: dict) -> list[tuple[str, dict]]:
  """``(label, tuned result)`` for every method, then every variant's methods."""
  return list(results["methods"].items()) + [
      (f"{method} {name}", result) for name, variant in results["variants"].items()
      for method, result in variant["methods"].items()]


def format_table(results: dict) -> str:
  lines = [f"{'method':<34}{'chosen point (validation)':<42}{'val':>6}{'params':>9}{'test':>7}"
           f"{'pretrain seeds':>17}{'single runs':>15}",
           f"{'zero-shot':<34}{'':<42}{'':>6}{0:>9}{100 * results['zero_shot_test']['mean']:>7.1f}"]
  for label, result in tuned_rows(results):
    test = result["test"]
    point = " ".join(f"{k}={v}" for k, v in result["chosen"]["point"].items())
    low, high = test["pretrain_seed_range"]
    run_low, run_high = test["single_run_range"]
    lines.append(f"{label:<34}{point:<42}{100 * result['chosen']['validation_accuracy']:>6.1f}"
                 f"{test['adaptation_params']:>9,}{100 * test['mean_of_medians']:>7.1f}"
                 f"{f'{100 * low:.1f}-{100 * high:.1f}':>17}"
                 f"{f'{100 * run_low:.1f}-{100 * run_high:.1f}':>15}")
  lines.append("val: mean validation accuracy of the chosen point; test: mean over tasks of the"
               " median over few-shot seeds, averaged over pretraining seeds; ranges: over"
               " pretraining seeds, and over single (pretraining x few-shot seed) runs")
  return "\n".join(lines)


def plot_accuracy_vs_params(results: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for label, result in tuned_rows(results):
    test = result["test"]
    y = 100 * test["mean_of_medians"]
    low, high = (100 * v for v in test["single_run_range"])
    ax.errorbar(test["adaptation_params"], y, yerr=[[y - low], [high - y]], capsize=3,
                fmt="s" if " " in label else "o", label=label)
  ax.axhline(100 * results["zero_shot_test"]["mean"], color="gray", ls="--", label="zero-shot")
  ax.set_xscale("log")
  ax.set_xlabel("trainable adaptation parameters (one held-out task)")
  ax.set_ylabel("held-out test accuracy (%)")
  ax.set_title("embedded suite: chosen point per method\n(bars: range over pretraining x few-shot"
               " seeds)", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def format_ablation(ablation: dict) -> str:
  """Validation accuracy (%) and adaptation params per (N, R), one block per method."""
  def cell_text(row):
    accuracy = row["mean_accuracy"]
    return (f"{'diverged' if accuracy is None else f'{100 * accuracy:.1f}':>9}"
            f"{row['adaptation_params']:>9,}")

  lines = []
  for method, rows in ablation.items():
    cell = {(r["point"]["ORDER"], r["point"]["TENSOR_RANK"]): r for r in rows}
    lines.append(f"{method + ' (validation %, params)':<38}"
                 + "".join(f"{'R=' + rank:>18}" for rank in ABLATION_RANKS))
    for order in sorted({n for n, _ in cell}):
      label = f"N={order} ({cell[order, ABLATION_RANKS[0]]['pair_norm']} pair norm)"
      lines.append(f"{label:<38}" + "".join(cell_text(cell[order, rank])
                                           for rank in ABLATION_RANKS))
  return "\n".join(lines)


def plot_ablation(ablation: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  ranks = [int(r) for r in ABLATION_RANKS]
  orders = sorted({int(r["point"]["ORDER"]) for rows in ablation.values() for r in rows})
  fig, axes = plt.subplots(len(ablation), 2, figsize=(9, 3.2 * len(ablation)), squeeze=False)
  for row_axes, (method, rows) in zip(axes, ablation.items()):
    cell = {(int(r["point"]["ORDER"]), int(r["point"]["TENSOR_RANK"])): r for r in rows}
    for ax, key, title, fmt in ((row_axes[0], "mean_accuracy", "validation accuracy (%)", "{:.1f}"),
                                (row_axes[1], "adaptation_params", "adaptation params", "{:,}")):
      values = np.array([[np.nan if cell[(n, r)][key] is None else cell[(n, r)][key]
                          for r in ranks] for n in orders], float)
      shown = 100 * values if key == "mean_accuracy" else np.log10(values)
      ax.imshow(shown, cmap="viridis", aspect="auto")
      for i, n in enumerate(orders):
        for j, r in enumerate(ranks):
          value = values[i, j]
          text = "diverged" if np.isnan(value) else fmt.format(
              100 * value if key == "mean_accuracy" else int(value))
          ax.text(j, i, text, ha="center", va="center", fontsize=7,
                  color="k" if np.isnan(value) else "w")
      ax.set_xticks(range(len(ranks)), ranks)
      ax.set_yticks(range(len(orders)), [f"N={n}" + (" (plain)" if n % 2 else "") for n in orders])
      ax.set_xlabel("tensor rank R")
      ax.set_title(f"{method}: {title}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
