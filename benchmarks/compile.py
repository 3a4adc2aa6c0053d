"""Compile time, per-device memory and kernel counts of the adapter pretraining step at the
T0-3B width, compiled ahead of time for a TPU v4:2x2x4 slice (libtpu, on this CPU host): method x
depth x scanned or per-layer blocks. Baselines, in the same process: for compile time the
per-layer (unrolled) model at the same depth; for kernels (HLO ops and fusions run per step,
``hlo_counts``) the ``frozen`` step (``tensorpoly compile --stage=frozen``: no adapter, only the
relative position biases train) at the same depth.

  python benchmarks/compile.py [--quick] [--methods frozen,lora,tensorpoly_ii] [--depths 24]
      [--unscanned_depths 2,8]

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

def kernel_group(op_name: str) -> str:
  """Where a fusion comes from, by its JAX op path: the adapter (its router, its factor build, its
  products) or the backbone, forward or backward (remat's recomputation included) or with no
  autodiff mark (the optimizer, norms and checks, and ops XLA moved out of both passes)."""
  direction = ("backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name
               else "unmarked")
  if "/adapter/" not in op_name:
    return f"backbone {direction}" if op_name else "no op path"
  inner = op_name.split("/adapter/", 1)[1]
  part = ("router" if "router" in inner else
          "factor build" if "factors" in inner or "skill_vectors" in inner else "products")
  return f"adapter {part} {direction}"


ADAPTERS = {"frozen": None, **{name: common.paper_adapter(name) for name in common.PAPER_ADAPTERS}}
SIZES = {
    "default": dict(preset="t0_3b", topology="v4:2x2x4", depths=(2, 8, 24), batch=32, length=256),
    "quick": dict(preset="tiny", topology="v4:2x2x4", depths=(1, 2), batch=32, length=32),
}


def main():
  parser = common.argument_parser(__doc__)
  parser.add_argument("--methods", default="frozen,lora,tensorpoly_ii")
  parser.add_argument("--depths", default=None,
                      help="layers per stack, comma-separated (default 2,8,24; quick 1,2)")
  parser.add_argument("--unscanned_depths", default=None,
                      help="depths at which the per-layer baseline is compiled (default: all but"
                      " the deepest)")
  args = parser.parse_args()
  size = dict(SIZES["quick" if args.quick else "default"])
  if args.depths:
    size["depths"] = tuple(int(d) for d in args.depths.split(","))
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
        report = aot.compile_stage("frozen" if method == "frozen" else "pretrain", config,
                                   shapes, size["topology"], kernel_group=kernel_group)
        rows.append({"method": method, "layers": f"{depth}+{depth}", "depth": depth,
                     "scan": scan, "compile_s": report["compile_seconds"],
                     "per_device_gib": report["per_device_bytes"] / 2**30,
                     "temp_gib": report["temp_bytes"] / 2**30, "fits": report["fits"],
                     **{f"hlo_{kind}": n for kind, n in report["kernels"].items()}})
        print(f"{method} {depth}+{depth} scan={scan}: {report['compile_seconds']:.1f} s,"
              f" {rows[-1]['per_device_gib']:.2f} GiB/device", flush=True)
  for row in rows:
    baseline = next((r for r in rows if r["method"] == row["method"] and r["depth"] == row["depth"]
                     and not r["scan"]), None)
    row["x_faster_than_per_layer"] = (baseline["compile_s"] / row["compile_s"]
                                      if baseline and row["scan"] else None)
    floor = next((r for r in rows if r["method"] == "frozen" and r["depth"] == row["depth"]
                  and r["scan"] == row["scan"] and r.get("hlo_fusions")), None)
    row["fusions_x_frozen"] = (row["hlo_fusions"] / floor["hlo_fusions"]
                               if floor and row.get("hlo_fusions") else None)
  print(f"\npretraining step compiled for {size['topology']} ({size['preset']} width, batch"
        f" {size['batch']}, {size['length']}/{size['length']} tokens, bf16, remat=full) on"
        f" {os.cpu_count()} cores")
  common.print_table(rows, [("method", "method", ""), ("layers", "layers", ""),
                            ("scan", "scan", ""), ("compile_s", "compile s", ".1f"),
                            ("x_faster_than_per_layer", "x per-layer", ".1f"),
                            ("per_device_gib", "GiB/device", ".2f"), ("fits", "fits", ""),
                            ("hlo_ops", "HLO ops", ","), ("hlo_fusions", "fusions", ","),
                            ("fusions_x_frozen", "fusions x frozen", ".2f")])
  print("HLO ops, fusions: kernels one step runs (a scanned stack's body once per layer)")
  for row in rows:
    groups = row.get("hlo_fusions_by_group") or {}
    print(f"\n{row['method']} {row['layers']} scan={row['scan']}: fusions by origin")
    for label, count in groups.items():
      print(f"  {count:8,}  {label}")
  path = common.write_json("compile", {"size": {**size, "depths": list(size["depths"])},
                                       "shapes": dataclasses.asdict(shapes),
                                       "unscanned_depths": list(unscanned), "rows": rows}, args)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
