"""Why one method trains worse than another on the embedded suite: loss curves, per-role gradient
and update norms, and the pair LayerNorm's regime (the pair products' variance against its eps)
over adapter pretraining at the demo's settings.

The variance is measured in a forward pass over one fixed training batch at each checkpoint, at
the LayerNorm itself, so TensorPoly-II's routed leaves are measured as the model builds them. A
ratio far below 1 means the LayerNorm is a fixed gain of ``1/sqrt(eps)`` rather than a
normalization.

  python benchmarks/embedded_diagnosis.py --init_regime    # only the regime at init, by width
  python benchmarks/embedded_diagnosis.py --backbone_dir runs/protocol/backbone/backbone \
      --work_dir runs/diagnosis [--methods lora,tlora,...] [--learning_rate 0.03] \
      [--steps 400] [--pair_norm_epsilon 1e-2]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

from tensorpoly_jax import checkpoints, cli, entangle, pipeline  # noqa: E402
from tensorpoly_jax.data import batches, tasks  # noqa: E402
from tensorpoly_jax.methods import from_dict  # noqa: E402
from tensorpoly_jax.metrics import METRICS_FILE  # noqa: E402
from tensorpoly_jax.t5.model import EncoderDecoder, merge_params  # noqa: E402

SNAPSHOTS = 10  # checkpoints per run at which the pair variance is measured
TENSOR_METHODS = ("tlora", "tensorpoly_i", "tensorpoly_ii")
DEMO = cli.demo_config()


def pretrain(work_dir: str, backbone, method: str, adapter, steps: int | None,
             learning_rate: float | None):
  """The demo's pretraining of ``method`` (its tuned rate and steps unless given)."""
  train = DEMO.train_config("pretrain", method)
  steps = steps or train.steps
  optimizer = train.optimizer if learning_rate is None else dataclasses.replace(
      train.optimizer, adapter_learning_rate=learning_rate, leaf_learning_rate=learning_rate)
  train = dataclasses.replace(train, steps=steps, checkpoint_every=max(1, steps // SNAPSHOTS),
                              keep_checkpoints=SNAPSHOTS + 1, log_every=10, optimizer=optimizer)
  _, export = pipeline.pretrain_adapters(os.path.join(work_dir, method), backbone, adapter,
                                         tasks.EMBEDDED_TRAIN, train)
  return train, from_dict(checkpoints.load_adapter(export)[1]["adapter"])


def curves(run_dir: str) -> dict[str, list]:
  with open(os.path.join(run_dir, METRICS_FILE)) as f:
    records = [json.loads(line) for line in f]
  keys = [k for k in records[-1] if k == "loss" or k.startswith(("grad_norm/", "update_norm/"))]
  return {"step": [r["step"] for r in records], **{k: [r[k] for r in records] for k in keys}}


@contextlib.contextmanager
def recorded_pair_variances():
  """Within the block, every (eager) pair LayerNorm call appends its pairs' ``var / eps`` to the
  yielded list."""
  ratios = []
  original = entangle._layer_norm  # pylint: disable=protected-access

  def recording(pair, scale, bias, epsilon):
    var = np.square(pair - pair.mean(axis=(-2, -1), keepdims=True)).mean(axis=(-2, -1))
    ratios.append(np.asarray(var).ravel() / epsilon)
    return original(pair, scale, bias, epsilon)

  entangle._layer_norm = recording  # pylint: disable=protected-access
  try:
    yield ratios
  finally:
    entangle._layer_norm = original  # pylint: disable=protected-access


def pair_variance_ratios(model, backbone, run_dir: str, batch, seed: int) -> dict[str, list]:
  """At init (step 0, the run's own draw) and at every checkpoint: the median and the largest
  ratio ``var / eps`` over every pair LayerNorm call (every layer, side, pair position, skill and
  example)."""
  import orbax.checkpoint as ocp

  initial = pipeline.init_params(model, seed, adapters_only=True)  # traced: before recording
  mngr = checkpoints.manager(os.path.join(run_dir, "checkpoints"), SNAPSHOTS + 1)
  snapshots = [(0, lambda: initial)] + [
      (step, lambda step=step: mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore()))["state"]["params"]) for step in mngr.all_steps()]
  steps, median, largest = [], [], []
  with recorded_pair_variances() as ratios, contextlib.closing(mngr):
    for step, adapter_params in snapshots:
      params = merge_params(adapter_params(), backbone.params)
      ratios.clear()
      model.apply({"params": params}, batch["encoder_input_tokens"],
                  batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                  task_ids=batch["task_ids"])
      values = np.concatenate(ratios)
      steps.append(step)
      median.append(float(np.median(values)))
      largest.append(float(values.max()))
  return {"step": steps, "median_var_over_eps": median, "max_var_over_eps": largest}


def init_regime(widths=(64, 2048, 5120)) -> dict[str, dict[int, float]]:
  """The median pair ``var / eps`` of each tensor method's initial adapter (the demo's sizes) on
  one ``d x d`` layer, for each width ``d``: the tiny T5's 64, and T0-3B's d_model 2048 and FFN
  width 5120 (no training, no backbone)."""
  import jax
  import jax.numpy as jnp
  from tensorpoly_jax.t5.layers import DenseGeneral

  regime = {}
  for method in TENSOR_METHODS:
    adapter = dataclasses.replace(DEMO.methods[method].adapter, targets=".*").with_tasks(4)
    regime[method] = {}
    for width in widths:
      layer = DenseGeneral(width, kernel_axes=("embed", "mlp"), adapter=adapter)
      x, task_ids = jnp.ones((4, 1, width)), jnp.arange(4)
      variables = jax.jit(layer.init)(jax.random.PRNGKey(0), x, task_ids)
      with recorded_pair_variances() as ratios:
        layer.apply(variables, x, task_ids)
      regime[method][width] = float(np.median(np.concatenate(ratios)))
  return regime


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backbone_dir")
  parser.add_argument("--work_dir")
  parser.add_argument("--methods", default="lora,tlora,poly,tensorpoly_i,tensorpoly_ii")
  parser.add_argument("--steps", type=int, default=None, help="default: the demo's (tuned)")
  parser.add_argument("--learning_rate", type=float, default=None,
                      help="the adapter weights' rate (default: the demo's, tuned per method)")
  parser.add_argument("--pair_norm_epsilon", type=float, default=None,
                      help="the tensor methods' pair LayerNorm eps (default: the reference's)")
  parser.add_argument("--output", default=os.path.join(common.RESULTS, "embedded_diagnosis"))
  parser.add_argument("--init_regime", action="store_true",
                      help="only the pair-norm regime at init, at the tiny and T0-3B widths")
  args = parser.parse_args()
  if args.init_regime:
    regime = init_regime()
    for method, by_width in regime.items():
      print(f"{method:<14} pair var/eps at init: " + "  ".join(
          f"d={width}: {ratio:.2e}" for width, ratio in by_width.items()))
    with open(f"{args.output}_init.json", "w") as f:
      json.dump({"command": " ".join(["python", "benchmarks/embedded_diagnosis.py",
                                      *sys.argv[1:]]),
                 "commit": common.git_commit(), "median_var_over_eps": regime}, f, indent=2)
    return
  if not (args.backbone_dir and args.work_dir):
    parser.error("--backbone_dir and --work_dir are needed (all but --init_regime train runs)")
  started = time.time()
  tasks.register_embedded(DEMO.data_seed, DEMO.sizes)
  backbone = pipeline.load_backbone(args.backbone_dir)
  batch = next(batches.lm_batches(tasks.EMBEDDED_TRAIN, DEMO.batch_size, DEMO.inputs_length,
                                  DEMO.targets_length, seed=123))
  results = {}
  for method in args.methods.split(","):
    adapter = DEMO.methods[method].adapter
    if args.pair_norm_epsilon and method in TENSOR_METHODS:
      adapter = dataclasses.replace(adapter, pair_norm_epsilon=args.pair_norm_epsilon)
    train, trained = pretrain(args.work_dir, backbone, method, adapter, args.steps,
                              args.learning_rate)
    run_dir = os.path.join(args.work_dir, method, "run")
    entry = {"adapter": adapter.to_dict(), "optimizer": dataclasses.asdict(
        train.optimizer), "steps": train.steps, "curves": curves(run_dir)}
    if adapter.method in TENSOR_METHODS and adapter.pair_norm == "layernorm":
      model = EncoderDecoder(backbone.config.replace(adapter=trained))
      entry["pair_norm"] = pair_variance_ratios(model, backbone, run_dir, batch, train.seed)
    results[method] = entry
    print(summary_line(method, entry), flush=True)
  payload = {"command": " ".join(["python", "benchmarks/embedded_diagnosis.py", *sys.argv[1:]]),
             "commit": common.git_commit(), "machine": common.machine(),
             "methods": results,
             "seconds": round(time.time() - started, 1)}
  with open(f"{args.output}.json", "w") as f:
    json.dump(payload, f, indent=2)
  plot(results, f"{args.output}.png")


def summary_line(method: str, entry: dict) -> str:
  c = entry["curves"]
  roles = sorted(k.split("/", 1)[1] for k in c if k.startswith("grad_norm/"))
  norms = " ".join(f"{role}: grad {statistics.median(c[f'grad_norm/{role}']):.2e}"
                   f" update {statistics.median(c[f'update_norm/{role}']):.2e}" for role in roles)
  line = f"{method:<14} loss {c['loss'][0]:.3f} -> {c['loss'][-1]:.3f}  median {norms}"
  if "pair_norm" in entry:
    ratios = entry["pair_norm"]["median_var_over_eps"]
    line += f"  pair var/eps {ratios[0]:.2e} -> {ratios[-1]:.2e}"
  return line


def plot(results: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for method, entry in results.items():
    c = entry["curves"]
    axes[0].plot(c["step"], c["loss"], label=method)
    for key in c:
      if key.startswith("update_norm/") and not key.endswith("router"):
        axes[1].plot(c["step"], c[key], label=f"{method} {key.split('/')[1]}")
    if "pair_norm" in entry:
      p = entry["pair_norm"]
      axes[2].plot(p["step"], p["median_var_over_eps"], marker="o", label=method)
  axes[0].set(title="pretraining loss", xlabel="step", yscale="log")
  axes[1].set(title="update norm per step (adapter weights)", xlabel="step", yscale="log")
  axes[2].axhline(1.0, color="gray", ls="--")
  axes[2].set(title="pair product variance / pair LayerNorm eps (median)", xlabel="step",
              yscale="log")
  for ax in axes:
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
