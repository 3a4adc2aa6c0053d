"""Cost of one adapted dense layer against the frozen layer alone, measured in the same process.

For each method: the median time (and spread; every row is timed once per round) of a jitted
forward + backward (gradients for the adapter and router params and for the input, as inside a
network) over an adapted ``DenseGeneral`` with a mixed-task batch, next to the same step for the
frozen layer alone (gradient for the input).
Prints a table and writes JSON. ``--quick`` is a smaller size for smoke tests.

  python benchmarks/adapter_layer.py [--quick] [--output benchmarks/results/adapter_layer.json]
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

from tensorpoly_jax.t5.layers import DenseGeneral  # noqa: E402

METHODS = {name: common.paper_adapter(name, targets=".*") for name in common.PAPER_ADAPTERS}


def step_for(layer, params, trainable_key):
  def loss(trainable, x, task_ids):
    merged = {**params, **({trainable_key: trainable} if trainable_key else {})}
    return jnp.mean(jnp.square(layer.apply({"params": merged}, x, task_ids)))

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def measure(batch, tokens, d_in, d_out, n_tasks, repeats):
  """Every row's step timed once per round (``common.interleaved_seconds``), so a slow spell of
  the machine lands on all of them: medians, min and max over ``repeats`` rounds."""
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, tokens, d_in))
  task_ids = jnp.arange(batch) % n_tasks
  frozen = DenseGeneral(d_out, kernel_axes=("embed", "mlp"))
  frozen_params = frozen.init(jax.random.PRNGKey(1), x)["params"]
  steps = {"frozen": (step_for(frozen, frozen_params, None), ({}, x, task_ids))}
  counts = {"frozen": 0}
  for name, config in METHODS.items():
    layer = DenseGeneral(d_out, kernel_axes=("embed", "mlp"), adapter=config.with_tasks(n_tasks))
    params = layer.init(jax.random.PRNGKey(1), x, task_ids)["params"]
    steps[name] = (step_for(layer, params, "adapter"), (params["adapter"], x, task_ids))
    counts[name] = int(sum(v.size for v in jax.tree_util.tree_leaves(params["adapter"])))
  runs = {name: (lambda step=step, args=args: jax.block_until_ready(step(*args)))
          for name, (step, args) in steps.items()}
  for run in runs.values():
    run()  # compile and warm up
  stats = common.interleaved_seconds(runs, repeats)
  baseline = stats["frozen"]["median_s"]
  return {name: {"seconds": row["median_s"], "min_s": row["min_s"], "max_s": row["max_s"],
                 "ratio": row["median_s"] / baseline, "adapter_params": counts[name]}
          for name, row in stats.items()}


def main():
  args = common.argument_parser(__doc__).parse_args()
  # T5-v1.1-small's FFN input projection (512 -> 1024), batch 8 x 256 tokens, 8 tasks in a batch.
  size = dict(batch=8, tokens=256, d_in=512, d_out=1024, n_tasks=8, repeats=30)
  if args.quick:
    size = dict(batch=4, tokens=32, d_in=64, d_out=128, n_tasks=4, repeats=5)
  rows = measure(**size)
  print(f"adapted DenseGeneral forward+backward, {size}, {jax.devices()[0].device_kind},"
        f" {os.cpu_count()} cores")
  print(f"{'method':<16}{'median ms':>12}{'min-max ms':>16}{'x frozen':>10}{'params':>10}")
  for name, row in rows.items():
    spread = f"{1e3 * row['min_s']:.1f}-{1e3 * row['max_s']:.1f}"
    print(f"{name:<16}{1e3 * row['seconds']:>12.3f}{spread:>16}{row['ratio']:>10.2f}"
          f"{row['adapter_params']:>10,}")
  path = common.write_json("adapter_layer", {"size": size, "rows": rows}, args)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
