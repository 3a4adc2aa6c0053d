"""Compile time and per-device memory of the adapter pretraining step at the T0-3B width, compiled
ahead of time for a TPU v4:2x2x4 slice (libtpu, on this CPU host): method x depth x scanned or
per-layer blocks. The per-layer (unrolled) model at the same depth is the baseline, in the same
process.

  python benchmarks/compile.py [--quick] [--methods lora,tensorpoly_ii] [--unscanned_depths 2,8]

Per-layer compiles grow with depth (the issue that asked for scan measured over 15 minutes for
24+24 layers on 2 cores), so they run only at ``--unscanned_depths``.
"""
from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

from tensorpoly_jax import aot  # noqa: E402
from tensorpoly_jax.t5.model import RunOptions, preset  # noqa: E402

ADAPTERS = {name: common.paper_adapter(name) for name in common.PAPER_ADAPTERS}
SIZES = {
    "default": dict(preset="t0_3b", topology="v4:2x2x4", depths=(2, 8, 24), batch=32, length=256),
    "quick": dict(preset="tiny", topology="v4:2x2x4", depths=(1, 2), batch=32, length=32),
}


def main():
  parser = common.argument_parser(__doc__)
  parser.add_argument("--methods", default="lora,tensorpoly_ii")
  parser.add_argument("--unscanned_depths", default=None,
                      help="depths at which the per-layer baseline is compiled (default: all but"
                      " the deepest)")
  args = parser.parse_args()
  size = SIZES["quick" if args.quick else "default"]
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(ADAPTERS))
  if unknown:
    parser.error(f"--methods: unknown {unknown}; choose from {sorted(ADAPTERS)}")
  unscanned = (tuple(int(d) for d in args.unscanned_depths.split(",") if d)
               if args.unscanned_depths is not None else size["depths"][:-1])
  shapes = aot.StepShapes(batch_size=size["batch"], inputs_length=size["length"],
                          targets_length=size["length"], param_dtype="bfloat16")
  options = RunOptions(dtype="bfloat16", remat="full")
  rows = []
  for method in methods:
    for depth in size["depths"]:
      for scan in (False, True):
        if not scan and depth not in unscanned:
          continue
        config = options.apply(preset(size["preset"], num_encoder_layers=depth,
                                      num_decoder_layers=depth)).replace(
                                          scan_layers=scan, adapter=ADAPTERS[method])
        report = aot.compile_stage("pretrain", config, shapes, size["topology"])
        rows.append({"method": method, "layers": f"{depth}+{depth}", "depth": depth,
                     "scan": scan, "compile_s": report["compile_seconds"],
                     "per_device_gib": report["per_device_bytes"] / 2**30,
                     "temp_gib": report["temp_bytes"] / 2**30, "fits": report["fits"]})
        print(f"{method} {depth}+{depth} scan={scan}: {report['compile_seconds']:.1f} s,"
              f" {rows[-1]['per_device_gib']:.2f} GiB/device", flush=True)
  for row in rows:
    baseline = next((r for r in rows if r["method"] == row["method"] and r["depth"] == row["depth"]
                     and not r["scan"]), None)
    row["x_faster_than_per_layer"] = (baseline["compile_s"] / row["compile_s"]
                                      if baseline and row["scan"] else None)
  print(f"\npretraining step compiled for {size['topology']} ({size['preset']} width, batch"
        f" {size['batch']}, {size['length']}/{size['length']} tokens, bf16, remat=full) on"
        f" {os.cpu_count()} cores")
  common.print_table(rows, [("method", "method", ""), ("layers", "layers", ""),
                            ("scan", "scan", ""), ("compile_s", "compile s", ".1f"),
                            ("x_faster_than_per_layer", "x per-layer", ".1f"),
                            ("per_device_gib", "GiB/device", ".2f"), ("fits", "fits", "")])
  path = common.write_json("compile", {"size": {**size, "depths": list(size["depths"])},
                                       "shapes": dataclasses.asdict(shapes),
                                       "unscanned_depths": list(unscanned), "rows": rows}, args)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
