"""How the adapter training step's cost grows with the skill count S, tensor rank R, order N and
the number of distinct tasks in a batch, each swept with the others fixed, next to the
frozen-backbone step of the same model, in one process.

The model is T5-v1.1-small's width with 2 encoder + 2 decoder layers (batch 8, 128 input / 32
target tokens), so the whole sweep fits in minutes on 2 CPU cores; ratios to the frozen step are
the figure to read. Every step is compiled first, then all are timed in interleaved rounds
(medians of 3). Prints a table, writes JSON and a PNG plot.

  python benchmarks/cost_growth.py [--quick]
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

from tensorpoly_jax.methods import AdapterConfig, adapter_config  # noqa: E402
from tensorpoly_jax.t5.model import EncoderDecoder, preset  # noqa: E402

N_TASKS = 8
# (axis swept, method, fixed settings, values): the paper's r=1 for Poly, r=16 for the tensor ones.
SWEEPS = (
    ("skills S", "poly", dict(lora_rank=1), "n_skills", (2, 4, 8, 16, 32)),
    ("tensor rank R", "tensorpoly_i", dict(lora_rank=16, order=2), "tensor_rank", (1, 2, 4, 8, 16)),
    ("order N", "tensorpoly_ii", dict(lora_rank=16, tensor_rank=8), "order", (2, 4, 6, 8)),
    ("tasks per batch", "poly", dict(lora_rank=1, n_skills=8), "tasks", (1, 2, 4, 8)),
    ("tasks per batch", "tensorpoly_ii", dict(lora_rank=16, tensor_rank=8, order=2), "tasks",
     (1, 2, 4, 8)),
)
SIZES = {
    "default": dict(layers=2, batch=8, inputs=128, targets=32, repeats=3),
    "quick": dict(layers=1, batch=8, inputs=16, targets=4, repeats=2),
}


FROZEN = ("frozen", "-", 0)


def sweep_points(sweeps) -> dict[tuple, tuple[AdapterConfig | None, int]]:
  """``(axis, method, value) -> (adapter, tasks in the batch)``, the frozen model first."""
  points = {FROZEN: (None, 1)}
  for axis, method, fixed, field, values in sweeps:
    for value in values:
      settings = {**fixed, **({} if field == "tasks" else {field: value})}
      points[axis, method, value] = (adapter_config(method, n_tasks=N_TASKS, **settings),
                                     value if field == "tasks" else N_TASKS)
  return points


def configs(size: dict, points: dict):
  """``(name, jitted step, state, frozen, batch)`` of every point (the backbone arrays are
  shared)."""
  shape = "tiny" if size is SIZES["quick"] else "t5_1_1_small"
  backbone = None
  for name, (adapter, tasks_in_batch) in points.items():
    model = EncoderDecoder(preset(shape, adapter=adapter, num_encoder_layers=size["layers"],
                                  num_decoder_layers=size["layers"]))
    params = common.random_params(model, backbone=backbone)
    backbone = backbone or params
    step, state, frozen = common.train_step(model, params)
    batch = {k: jnp.asarray(v) for k, v in common.lm_batch(
        size["batch"], size["inputs"], size["targets"], model.config.vocab_size,
        tasks_in_batch).items()}
    yield name, step, state, frozen, batch


def main():
  args = common.argument_parser(__doc__).parse_args()
  size = SIZES["quick" if args.quick else "default"]
  sweeps = [(axis, method, fixed, field, values[:2] if args.quick else values)
            for axis, method, fixed, field, values in (SWEEPS[:1] if args.quick else SWEEPS)]
  points = sweep_points(sweeps)
  steps = common.compile_steps(configs(size, points))
  timings = common.interleaved_seconds({name: step.run for name, step in steps.items()},
                                       size["repeats"])
  frozen = timings.pop(FROZEN)["median_s"]
  print(f"cost growth: {size}, {jax.devices()[0].device_kind}, {os.cpu_count()} cores;"
        f" frozen step {1e3 * frozen:.1f} ms", flush=True)
  rows = []
  for (axis, method, value), timing in timings.items():
    adapter, _ = points[axis, method, value]
    rows.append({"axis": axis, "method": method, "value": value, **timing,
                 "x_frozen": timing["median_s"] / frozen,
                 "params": adapter.param_count(512, 512)["total"]})
  common.print_table(rows, [("axis", "swept", ""), ("method", "method", ""),
                            ("value", "value", "d"), ("median_s", "median s", ".4f"),
                            ("x_frozen", "x frozen", ".2f"),
                            ("params", "params/512x512 layer", ",")])
  path = common.write_json("cost_growth", {"size": size, "frozen_s": frozen, "rows": rows}, args)
  plot(rows, os.path.splitext(path)[0] + ".png")
  print(f"wrote {path}")


def plot(rows, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  axes_names = list(dict.fromkeys(r["axis"] for r in rows))
  figure, axes = plt.subplots(1, len(axes_names), figsize=(4 * len(axes_names), 3.2),
                              squeeze=False)
  for ax, name in zip(axes[0], axes_names):
    for method in dict.fromkeys(r["method"] for r in rows if r["axis"] == name):
      points = [(r["value"], r["x_frozen"]) for r in rows if r["axis"] == name
                and r["method"] == method]
      ax.plot(*zip(*points), marker="o", label=method)
    ax.set_xlabel(name)
    ax.set_ylabel("step time / frozen step")
    ax.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


if __name__ == "__main__":
  main()
