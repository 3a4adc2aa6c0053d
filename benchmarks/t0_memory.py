"""Per-device memory and compile time of every method's real steps at T0-3B and T0-11B, compiled
ahead of time for TPU slices (libtpu, on this CPU host) with the shipped gin files' settings
(scanned layers, remat=full, bf16 compute and backbone). The baseline, in the same process, is
the same pretraining step with a float32-stored backbone.

  python benchmarks/t0_memory.py [--quick] [--methods=tensorpoly_ii,...]

Each row is what `tensorpoly compile --stage=S --gin_file=models/M.gin
--gin_file=adapters/A.gin --topology=T [--gin.MODEL_PARALLEL=P]` prints.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

from tensorpoly_jax import aot, cli  # noqa: E402

METHODS = tuple(common.PAPER_ADAPTERS)
# (model file, topology, model parallel, stages)
TARGETS = {
    "default": [("t0_3b", "v4:2x2x4", 1, ("pretrain", "adapt", "eval")),
                ("t0_3b", "v5e:4x4", 1, ("pretrain",)),
                ("t0_11b", "v4:2x2x4", 8, ("pretrain",))],
    "quick": [("t0_3b", "v4:2x2x4", 1, ("eval",))],
}


def compile_report(model_file, method, topology, model_parallel, stage, overrides=()) -> dict:
  """Exactly what `tensorpoly compile` runs for these flags (it prints the report too)."""
  cli.parse_gin(["runs/compile.gin", f"models/{model_file}.gin", f"adapters/{method}.gin"],
                [f"--gin.MODEL_PARALLEL={model_parallel}", *overrides])
  try:
    return cli.CONFIGURED["compile_step"](stage, topology)
  except aot.DoesNotFit as err:
    return err.report


def main():
  parser = common.argument_parser(__doc__)
  parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
  args = parser.parse_args()
  targets = TARGETS["quick" if args.quick else "default"]
  methods = ("tensorpoly_ii",) if args.quick else tuple(args.methods.split(","))
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f"--methods: {unknown} are not methods; choose from {METHODS}")
  rows = []

  def run(model_file, method, topology, mp, stage, param_dtype=None):
    overrides = [f"--gin.PARAM_DTYPE='{param_dtype}'"] if param_dtype else []
    report = compile_report(model_file, method, topology, mp, stage, overrides)
    rows.append({"model": model_file, "topology": topology, "model_parallel": mp,
                 "method": method, "stage": stage,
                 "param_dtype": report["shapes"]["param_dtype"],
                 "compile_s": report["compile_seconds"],
                 "args_gib": report["argument_bytes"] / 2**30,
                 "temp_gib": report["temp_bytes"] / 2**30,
                 "per_device_gib": report["per_device_bytes"] / 2**30,
                 "hbm_gib": report["hbm_bytes"] / 2**30, "fits": report["fits"]})
    print(f"{model_file} {topology} mp={mp} {method} {stage} {rows[-1]['param_dtype']}:"
          f" {rows[-1]['per_device_gib']:.2f} GiB, {report['compile_seconds']:.1f} s", flush=True)

  run("t0_3b", "tensorpoly_ii", "v4:2x2x4", 1, "pretrain", param_dtype="float32")  # baseline
  for model_file, topology, mp, stages in targets:
    for stage in stages:
      for method in methods:
        run(model_file, method, topology, mp, stage)
  baseline = rows[0]["per_device_gib"]
  for row in rows:
    row["x_f32_baseline"] = row["per_device_gib"] / baseline
  print("\nper-device memory of the compiled steps (scan, remat=full, bf16; global batch 32,"
        " 256/256 tokens; 4 choices for adapt/eval)")
  common.print_table(rows, [
      ("model", "model", ""), ("topology", "topology", ""), ("model_parallel", "MP", ""),
      ("stage", "stage", ""), ("method", "method", ""), ("param_dtype", "backbone", ""),
      ("args_gib", "args GiB", ".2f"), ("temp_gib", "temp GiB", ".2f"),
      ("per_device_gib", "total GiB", ".2f"), ("hbm_gib", "HBM GiB", ".2f"),
      ("x_f32_baseline", "x f32 bb", ".2f"), ("fits", "fits", ""),
      ("compile_s", "compile s", ".1f")])
  path = common.write_json("t0_memory", {"rows": rows}, args)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
