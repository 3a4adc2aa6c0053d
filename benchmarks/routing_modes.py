"""Routing modes on the embedded suite: the routed methods' pretrained exports of one `tensorpoly
demo` run, each adapted to the held-out tasks in every ``ADAPT_MODE`` (``adaptation``), the
trained modes at every k of ``--shots``, with the demo's adaptation settings (not tuned per mode);
LoRA and TLoRA, which have no router, in ``full`` mode only.

Reports held-out test accuracy as the mean over tasks x few-shot seeds with a bootstrap 95%
interval (cells resampled with replacement); each mode's difference to full adaptation at the
same k (zero-shot modes: at the demo's k), and each pair of methods' difference under full
adaptation at each k, with paired bootstrap intervals; a difference whose interval excludes 0 is
marked. ``--heldout embedded_three_skill`` adapts to the harder suite (three skills per task) with
the same exports. Every run is a ``tensorpoly adapt`` run under ``--work_dir`` (finished runs are
read back). Writes ``benchmarks/results/routing_modes.{json}``, ``routing_modes_params.png`` and
``routing_modes_shots.png``.

  python benchmarks/routing_modes.py --demo_dir runs/demo --work_dir runs/routing_modes
      [--heldout embedded_three_skill --output benchmarks/results/routing_modes_three_skill.json]
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

BOOTSTRAP_SAMPLES = 10_000


def demo_config(demo_dir: str):
  """The ``DemoConfig`` a demo run recorded in its ``evaluation.json``."""
  from tensorpoly_jax import demo
  from tensorpoly_jax.data import embedded
  from tensorpoly_jax.methods import from_dict
  from tensorpoly_jax.optimizers import OptimizerConfig

  with open(os.path.join(demo_dir, demo.EVALUATION_FILE)) as f:
    fields = json.load(f)["config"]
  methods = {name: demo.Method(from_dict(m["adapter"]), m["learning_rate"], m["pretrain_steps"])
             for name, m in fields.pop("methods").items()}
  return demo.DemoConfig(methods=methods, sizes=embedded.Sizes(**fields.pop("sizes")),
                         optimizer=OptimizerConfig(**fields.pop("optimizer")),
                         seeds=tuple(fields.pop("seeds")), **fields)


def cells(accuracy: dict) -> np.ndarray:
  """``{task: {seed: accuracy}}`` -> accuracies in (task, seed) order."""
  return np.array([accuracy[task][seed] for task in sorted(accuracy)
                   for seed in sorted(accuracy[task], key=int)])


def paired_difference(first: dict, second: dict) -> np.ndarray:
  """``first - second`` on the (task, seed) cells both finished."""
  both = {task: {seed: first[task][seed] - second[task][seed]
                 for seed in first[task] if seed in second.get(task, {})} for task in first}
  return cells({task: seeds for task, seeds in both.items() if seeds})


def bootstrap_interval(values: np.ndarray, seed: int = 0, confidence: float = 0.95) -> list[float]:
  draws = np.random.default_rng(seed).integers(0, len(values), (BOOTSTRAP_SAMPLES, len(values)))
  tail = 50 * (1 - confidence)
  return [float(v) for v in np.percentile(values[draws].mean(axis=1), [tail, 100 - tail])]


def targets_length(heldout: list[str], at_least: int) -> int:
  """Tokens that fit every answer choice of ``heldout`` with its EOS (three-skill answers are
  longer than the demo's 24)."""
  from tensorpoly_jax.data import choices, tasks

  infos = [tasks.task_info(name) for name in heldout]
  return max([at_least, *(len(choices.encode_choice(info.vocabulary, choice)) for info in infos
                          for split in info.splits for row in info.read(split).rows
                          for choice in row["answer_choices"])])


def adaptation_runs(routed: bool, modes, shots) -> list[tuple[str, int]]:
  """``(mode, k)`` of each adaptation a method gets: every mode of ``modes`` if it is routed, else
  ``full`` only; the trained modes at every k of ``shots``, the zero-shot ones once, at k = 0."""
  from tensorpoly_jax import adaptation

  return [(mode, k) for mode in (modes if routed else ["full"])
          for k in (shots if adaptation.trains(mode) else [0])]


def run_grid(args, config, heldout: list[str], length: int) -> list[dict]:
  from tensorpoly_jax import pipeline

  backbone = pipeline.load_backbone(os.path.join(args.demo_dir, "backbone", "backbone"))
  rows = []
  for method, settings in config.methods.items():
    adapter_dir = os.path.join(args.demo_dir, method, "adapter")
    train = dataclasses.replace(config.train_config("adapt", method), targets_length=length)
    for mode, k in adaptation_runs(settings.adapter.routed, args.modes, args.shots):
      started = time.time()
      result = pipeline.adapt_heldout(
          os.path.join(args.work_dir, method, mode, f"k{k}"), backbone, adapter_dir, heldout,
          k or None, config.seeds, train, eval_split=config.eval_split, mode=mode,
          arrow_top_k=args.arrow_top_k)
      values = cells(result.accuracy)
      rows.append({"method": method, "mode": mode, "shots": k, "accuracy": result.accuracy,
                   "mean": float(values.mean()), "interval": bootstrap_interval(values),
                   "adaptation_params": result.adaptation_params,
                   "unfinished": result.unfinished, "seconds": round(time.time() - started, 1)})
      print(f"{method} {mode} k={k}: {100 * values.mean():.1f}"
            f" [{100 * rows[-1]['interval'][0]:.1f}, {100 * rows[-1]['interval'][1]:.1f}]",
            flush=True)
  return rows


def differences(rows: list[dict], demo_shots: int) -> list[dict]:
  """Each mode's accuracy minus full adaptation's of the same method, on the same (task, seed)
  cells, at the same k (zero-shot modes: the demo's k), with a paired bootstrap interval."""
  full = {(r["method"], r["shots"]): r for r in rows if r["mode"] == "full"}
  out = []
  for row in rows:
    reference = full.get((row["method"], row["shots"] or demo_shots))
    if row["mode"] == "full" or reference is None:
      continue
    delta = paired_difference(row["accuracy"], reference["accuracy"])
    low, high = bootstrap_interval(delta)
    out.append({"method": row["method"], "mode": row["mode"], "shots": row["shots"],
                "against_full_at_shots": reference["shots"], "difference": float(delta.mean()),
                "interval": [low, high], "exceeds_interval": not low <= 0.0 <= high})
  return out


def method_differences(rows: list[dict]) -> list[dict]:
  """Each pair of methods under full adaptation at each k: the first's accuracy minus the
  second's on the same (task, seed) cells, with a paired bootstrap interval whose confidence is
  Bonferroni-corrected over the k's pairs (familywise 95%: with 15 pairs, 99.67% each), so that
  a marked difference is not one of the many comparisons' chance exclusions."""
  full = [r for r in rows if r["mode"] == "full"]
  pairs = [(first, second) for first in full for second in full
           if first["shots"] == second["shots"] and first["method"] < second["method"]]
  per_k = {k: sum(first["shots"] == k for first, _ in pairs) for k in {r["shots"] for r in full}}
  out = []
  for first, second in pairs:
    delta = paired_difference(first["accuracy"], second["accuracy"])
    confidence = 1 - 0.05 / per_k[first["shots"]]
    low, high = bootstrap_interval(delta, confidence=confidence)
    out.append({"shots": first["shots"], "first": first["method"], "second": second["method"],
                "difference": float(delta.mean()), "interval": [low, high],
                "confidence": confidence, "exceeds_interval": not low <= 0.0 <= high})
  return out


def plot(rows: list[dict], demo_shots: int, suite: str, params_path: str,
         shots_path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = sorted({r["method"] for r in rows})
  markers = dict(zip(sorted({r["mode"] for r in rows}), "os^vDP*X"))
  colors = {m: f"C{i}" for i, m in enumerate(methods)}
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for row in rows:
    if row["shots"] not in (0, demo_shots):
      continue
    y, (low, high) = 100 * row["mean"], (100 * v for v in row["interval"])
    ax.errorbar(max(row["adaptation_params"], 1), y, yerr=[[y - low], [high - y]], capsize=3,
                fmt=markers[row["mode"]], color=colors[row["method"]])
  for method in methods:
    ax.plot([], [], "s", color=colors[method], label=method)
  for mode, marker in markers.items():
    ax.plot([], [], marker, color="gray", label=mode)
  ax.set_xscale("log")
  ax.set_xlabel("trained params per adapted task (zero-shot modes plotted at 1)")
  ax.set_ylabel("held-out test accuracy (%)")
  ax.set_title(f"{suite}, k={demo_shots} (bars: bootstrap 95% over tasks x seeds)", fontsize=9)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(params_path, dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.4), sharey=True)
  for ax, method in zip(np.atleast_1d(axes), methods):
    for mode, marker in markers.items():
      mine = sorted((r for r in rows if r["method"] == method and r["mode"] == mode),
                    key=lambda r: r["shots"])
      if not mine:
        continue
      if mine[0]["shots"] == 0:  # zero-shot: one level for every k
        ax.axhline(100 * mine[0]["mean"], ls="--", lw=1, color=f"C{list(markers).index(mode)}",
                   label=mode)
        continue
      ax.errorbar([r["shots"] for r in mine], [100 * r["mean"] for r in mine],
                  yerr=[[100 * (r["mean"] - r["interval"][0]) for r in mine],
                        [100 * (r["interval"][1] - r["mean"]) for r in mine]],
                  fmt=f"-{marker}", capsize=2, color=f"C{list(markers).index(mode)}", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_title(method, fontsize=9)
    ax.set_xlabel("shots k")
  np.atleast_1d(axes)[0].set_ylabel("held-out test accuracy (%)")
  # One legend for every mode: the first panel may be a method with `full` only.
  labelled = {label: handle for ax in np.atleast_1d(axes)
              for handle, label in zip(*ax.get_legend_handles_labels())}
  np.atleast_1d(axes)[0].legend(labelled.values(), labelled.keys(), fontsize=6)
  fig.tight_layout()
  fig.savefig(shots_path, dpi=110)
  plt.close(fig)


def in_percent(rows: list[dict], key: str) -> list[dict]:
  """``rows`` for printing: ``key`` and its interval (as ``low``, ``high``) in percent."""
  return [{**row, key: 100 * row[key], "low": 100 * row["interval"][0],
           "high": 100 * row["interval"][1]} for row in rows]


def print_tables(rows: list[dict], compared: list[dict], between_methods: list[dict]) -> None:
  """Accuracy per row, each mode minus full, and each pair of methods under full."""
  common.print_table(
      in_percent(rows, "mean"),
      [("method", "method", ""), ("mode", "mode", ""), ("shots", "k", "d"),
       ("mean", "accuracy", ".1f"), ("low", "95% low", ".1f"), ("high", "95% high", ".1f"),
       ("adaptation_params", "params", ",d")])
  common.print_table(
      in_percent(compared, "difference"),
      [("method", "method", ""), ("mode", "mode", ""), ("shots", "k", "d"),
       ("difference", "minus full", "+.1f"), ("low", "95% low", "+.1f"),
       ("high", "95% high", "+.1f"), ("exceeds_interval", "beyond", "")])
  common.print_table(
      in_percent(between_methods, "difference"),
      [("shots", "k", "d"), ("first", "full", ""), ("second", "minus", ""),
       ("difference", "difference", "+.1f"), ("low", "familywise low", "+.1f"),
       ("high", "familywise high", "+.1f"), ("exceeds_interval", "beyond", "")])
  separated = sorted({d["shots"] for d in between_methods if d["exceeds_interval"]})
  print("methods under full adaptation separated beyond the paired familywise interval at k ="
        f" {separated}" if separated else "no two methods under full adaptation differ beyond"
        " the paired familywise interval at any k")


def main() -> None:
  from tensorpoly_jax import adaptation
  from tensorpoly_jax.data import tasks

  parser = common.argument_parser(__doc__)
  parser.add_argument("--demo_dir", required=True, help="a finished `tensorpoly demo` run")
  parser.add_argument("--work_dir", required=True, help="where the adapt runs go")
  parser.add_argument("--heldout", default="embedded_heldout",
                      help="the held-out mixture: embedded_heldout or embedded_three_skill")
  parser.add_argument("--shots", type=int, nargs="+", default=[4, 8, 16, 32])
  parser.add_argument("--modes", nargs="+", default=list(adaptation.MODES))
  parser.add_argument("--arrow_top_k", type=int, default=2)
  parser.add_argument("--methods", nargs="+", default=None, help="default: every routed one")
  parser.add_argument("--router_lr", type=float, default=None,
                      help="the router's peak rate (default: the demo's, ROUTER_LR)")
  args = parser.parse_args()
  config = demo_config(args.demo_dir)
  if args.methods:
    config = dataclasses.replace(config, methods={m: config.methods[m] for m in args.methods})
  if args.router_lr is not None:
    config = dataclasses.replace(config, optimizer=dataclasses.replace(
        config.optimizer, router_learning_rate=args.router_lr))
  started = time.time()
  tasks.register_embedded(config.data_seed, config.sizes)
  heldout = tasks.mixture_task_names(args.heldout)
  length = targets_length(heldout, config.targets_length)
  rows = run_grid(args, config, heldout, length)
  compared = differences(rows, config.shots)
  between_methods = method_differences(rows)
  print_tables(rows, compared, between_methods)
  payload = {"demo_dir": os.path.abspath(args.demo_dir), "heldout": args.heldout,
             "targets_length": length, "shots": args.shots,
             "router_learning_rate": config.optimizer.router_learning_rate,
             "seeds": list(config.seeds), "arrow_top_k": args.arrow_top_k,
             "bootstrap_samples": BOOTSTRAP_SAMPLES, "rows": rows, "differences": compared,
             "method_differences": between_methods,
             "seconds": round(time.time() - started, 1), "commit": common.git_commit()}
  suite = args.heldout.removeprefix("embedded_")
  path = common.write_json("routing_modes" if suite == "heldout" else f"routing_modes_{suite}",
                           payload, args)
  stem = os.path.splitext(path)[0]
  plot(rows, config.shots, args.heldout, f"{stem}_params.png", f"{stem}_shots.png")
  print(f"wrote {path}, {stem}_params.png and {stem}_shots.png")


if __name__ == "__main__":
  main()
