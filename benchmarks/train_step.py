"""Adapter training step (forward + backward + optimizer, frozen backbone) on a T5-v1.1-shaped
model with random weights, for the six methods, against a frozen-backbone step and against
Hugging Face PEFT's LoRA and Poly (PyTorch) on the same shapes, in the same run.

The JAX configurations run one after another in one worker process sharing the backbone arrays
(memory: XLA's buffer assignment of each compiled step); each PEFT configuration runs before them
in its own process (memory: on a GPU its peak allocation, else its peak RSS growth over the step).
The parent measures the matmul peak of JAX and of PyTorch first (on the GPU where there is one),
then prints a table and writes JSON. The frozen-backbone step trains only the first layer norm of
the encoder and of the decoder: the forward plus the activation backward through every layer, the
floor of any adapter step. MFU is model FLOPs per second over that matmul peak, each framework
counting its own: the JAX program's FLOPs before XLA optimizes it (XLA's count of the compiled
program misses the GPU matmuls it hands to cuBLAS; kept as ``xla_counted_flops``), torch's
FlopCounterMode (matmuls only). Each compiled JAX step's kernels (HLO ops and fusions run per step,
``hlo_counts``) are counted next to the frozen step's: on a GPU each is a launch. Where ours costs
more than 1.3x its frozen step or more than PEFT, one more (warm) step is traced with jax.profiler
and summarized by HLO op group (adapter or backbone, forward or backward).
``--in_block_factors`` adds, for every method whose factors are built, a row ``<method>/in-block``
whose adapted layers build their own factors inside their blocks (``hoist_factors=False``): the
baseline of the stacks' one vectorized build, timed in the same rounds.
``--backbone_dtype bfloat16`` stores the frozen backbone in bf16 (the T0 recipe's converted
checkpoint); PyTorch has no separate storage dtype, so PEFT's whole model, adapters included, is
then cast to bf16 and computes in it.

  python benchmarks/train_step.py [--quick] [--preset t5_1_1_large --dtype bfloat16]
      [--backbone_dtype bfloat16] [--no-peft] [--batch 8] [--no-profile] [--in_block_factors]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# The parent (matmul peaks) and each worker share one accelerator: none may take most of its
# memory up front, as XLA does by default.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

METHODS = tuple(common.PAPER_ADAPTERS)
PEFT_METHODS = ("frozen", "lora", "poly")
N_TASKS = 8
SIZES = {
    "default": dict(preset="t5_1_1_small", batch=8, inputs=256, targets=64, repeats=10),
    "quick": dict(preset="tiny", batch=8, inputs=32, targets=8, repeats=2),
}
SLOWDOWN_TO_PROFILE = 1.3
IN_BLOCK = "/in-block"


def _batch(size, vocab):
  return common.lm_batch(size["batch"], size["inputs"], size["targets"], vocab, N_TASKS)


def run_ours(size: dict, dtype: str, peft_seconds: dict, backbone_dtype: str):
  """Every JAX configuration in this one process (the backbone arrays are shared); yields
  ``(name, result)``. Memory is XLA's buffer assignment of each compiled step. All steps are
  compiled first (``common.compile_steps``), then timed in interleaved rounds; one more step is
  traced with jax.profiler where ours is slower than its frozen step by more than
  ``SLOWDOWN_TO_PROFILE`` or slower than PEFT (``peft_seconds``).
  """
  import jax
  import jax.numpy as jnp

  from tensorpoly_jax.hlo_counts import kernel_counts
  from tensorpoly_jax.t5.model import EncoderDecoder, dtype_named, preset

  trainable = {}
  stored_copies = {}

  def stored(leaf):
    """The backbone array in its stored dtype, cast once however many configurations share it."""
    if id(leaf) not in stored_copies:
      stored_copies[id(leaf)] = leaf.astype(backbone_dtype)
    return stored_copies[id(leaf)]

  # Slowest compiles first (tensor adapters, reversed below), so none starts last.
  names = ("frozen", *size["methods"],
           *(method + IN_BLOCK for method in size["methods"] if size["in_block_factors"]
             and method != "lora"))

  def configs():
    backbone = None
    for name in reversed(names):
      method = name.removesuffix(IN_BLOCK)
      adapter = None if method == "frozen" else common.paper_adapter(method, N_TASKS)
      model = EncoderDecoder(preset(size["preset"], adapter=adapter, dtype=dtype_named(dtype),
                                    hoist_factors=not name.endswith(IN_BLOCK)))
      params = common.random_params(model, backbone=backbone)
      backbone = backbone or params
      step, state, frozen = common.train_step(model, params)
      frozen = jax.tree_util.tree_map(stored, frozen)
      trainable[name] = int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
      batch = {k: jnp.asarray(v) for k, v in _batch(size, model.config.vocab_size).items()}
      yield name, step, state, frozen, batch

  steps = common.compile_steps(configs())
  timings = common.interleaved_seconds({name: steps[name].run for name in names},
                                       size["repeats"])
  for name in names:
    executable, seconds = steps[name].executable, timings[name]["median_s"]
    slow = size["profile"] and (seconds > SLOWDOWN_TO_PROFILE * timings["frozen"]["median_s"]
            or seconds > peft_seconds.get(name, float("inf")))
    yield name, {**timings[name], "compile_s": steps[name].compile_s,
                 "flops": steps[name].model_flops,
                 "xla_counted_flops": common.executable_flops(executable),
                 "trainable_params": trainable[name],
                 "xla_mb": common.xla_step_mb(executable),
                 **{f"hlo_{kind}": n for kind, n in kernel_counts(executable.as_text()).items()},
                 "profile": common.profile_ops(steps[name].run, executable, steps=1)
                            if slow else None}


def run_peft(name: str, size: dict, dtype: str, backbone_dtype: str) -> dict:
  """One PEFT configuration; this process is its own, so its peak RSS growth is its memory."""
  import torch
  import transformers

  from tensorpoly_jax.t5.model import preset

  torch.manual_seed(0)
  shape = preset(size["preset"])
  config = transformers.T5Config(
      vocab_size=shape.vocab_size, d_model=shape.emb_dim, d_kv=shape.head_dim,
      d_ff=shape.mlp_dim, num_layers=shape.num_encoder_layers,
      num_decoder_layers=shape.num_decoder_layers, num_heads=shape.num_heads,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
  device = common.torch_device()
  model = transformers.T5ForConditionalGeneration(config).to(device)
  if "bfloat16" in (dtype, backbone_dtype):
    model = model.to(torch.bfloat16)
  model.train()
  targets = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]  # our default targets, HF names
  if name == "frozen":
    for param in model.parameters():
      param.requires_grad_(False)
    for norm in (model.encoder.block[0].layer[0].layer_norm,
                 model.decoder.block[0].layer[0].layer_norm):
      norm.weight.requires_grad_(True)
  else:
    import peft

    if name == "lora":
      peft_config = peft.LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=targets,
                                     task_type="SEQ_2_SEQ_LM")
    else:
      peft_config = peft.PolyConfig(r=1, n_tasks=N_TASKS, n_skills=8, n_splits=1,
                                    target_modules=targets, task_type="SEQ_2_SEQ_LM")
    model = peft.get_peft_model(model, peft_config)
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
  arrays = _batch(size, shape.vocab_size)
  names = {"input_ids": "encoder_input_tokens", "decoder_input_ids": "decoder_input_tokens",
           "labels": "decoder_target_tokens", **({"task_ids": "task_ids"} if name == "poly" else {})}
  inputs = {key: torch.from_numpy(arrays[ours]).long().to(device) for key, ours in names.items()}

  @common.torch_blocking
  def run():
    optimizer.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()

  rss_before = common.rss_mb()
  from torch.utils.flop_counter import FlopCounterMode

  with FlopCounterMode(display=False) as counter:  # the counted step doubles as the warm-up
    run()
  timing = common.median_seconds(run, size["repeats"], warmup=0)
  memory = ({"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20} if device == "cuda" else
            {"rss_before_mb": rss_before, "peak_rss_mb": common.peak_rss_mb()})
  return {**timing, **memory, "flops": float(counter.get_total_flops()),
          "trainable_params": int(sum(p.numel() for p in trainable)),
          "torch_device": device, "torch_threads": torch.get_num_threads()}


def worker(spec: str, size: dict, dtype: str, peft_seconds: dict, backbone_dtype: str) -> None:
  framework, name = spec.split(":")
  results = (run_ours(size, dtype, peft_seconds, backbone_dtype) if framework == "ours"
             else [(name, run_peft(name, size, dtype, backbone_dtype))])
  for config, result in results:
    print("RESULT " + json.dumps({"method": config, **result}), flush=True)


def spawn(spec: str, args, methods, peft_seconds: dict) -> list[dict]:
  """Runs ``spec`` in a fresh process; one result per configuration it measured."""
  command = [sys.executable, os.path.abspath(__file__), "--worker", spec, "--dtype", args.dtype,
             "--backbone_dtype", args.backbone_dtype,
             "--preset", args.preset or "", *(["--batch", str(args.batch)] if args.batch else []),
             *(["--no-profile"] if args.no_profile else []), "--methods", ",".join(methods),
             *(["--in_block_factors"] if args.in_block_factors else []),
             "--peft-seconds", json.dumps(peft_seconds), *(["--quick"] if args.quick else [])]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
  if done.returncode or not lines:
    raise RuntimeError(f"worker {spec} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
  return [json.loads(line[len("RESULT "):]) for line in lines]


def main():
  parser = common.argument_parser(__doc__)
  parser.add_argument("--preset", default=None, help="model shape (default t5_1_1_small)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype")
  parser.add_argument("--backbone_dtype", default="float32", choices=("float32", "bfloat16"),
                      help="the frozen backbone's stored dtype (adapters stay float32)")
  parser.add_argument("--batch", type=int, default=None, help="examples per step (default 8)")
  parser.add_argument("--no-peft", action="store_true", help="skip the PyTorch/PEFT side")
  parser.add_argument("--no-profile", action="store_true",
                      help="never trace a step with jax.profiler (it only explains a slow one)")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help="comma-separated subset of the methods (the frozen step always runs)")
  parser.add_argument("--in_block_factors", action="store_true",
                      help="add each built method's step with its factors built inside the blocks")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--peft-seconds", default="{}", help=argparse.SUPPRESS)
  args = parser.parse_args()
  size = dict(SIZES["quick" if args.quick else "default"])
  if args.preset:
    size["preset"] = args.preset
  if args.batch:
    size["batch"] = args.batch
  size["profile"] = not args.no_profile
  size["in_block_factors"] = args.in_block_factors
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f"unknown --methods {unknown}; choose from {sorted(METHODS)}")
  if args.worker:
    return worker(args.worker, {**size, "methods": methods}, args.dtype,
                  json.loads(args.peft_seconds), args.backbone_dtype)

  import jax
  import jax.numpy as jnp

  peak = {"jax": common.jax_matmul_peak(dtype=jnp.bfloat16 if args.dtype == "bfloat16" else
                                        jnp.float32)}
  if not args.no_peft:
    peak["torch"] = common.torch_matmul_peak(args.dtype)
  print(f"train step: {size}, {args.dtype}, {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} cores; matmul peak "
        + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items()), flush=True)
  rows = []
  # PEFT first: where ours is slower than PEFT, the JAX worker profiles its step.
  specs = [] if args.no_peft else [f"peft:{name}" for name in PEFT_METHODS
                                   if name == "frozen" or name in methods]
  for spec in (*specs, "ours:all"):
    peft_seconds = {r["method"]: r["median_s"] for r in rows}
    for result in spawn(spec, args, methods, peft_seconds):
      rows.append({"framework": spec.split(":")[0], **result})
      print(f"  {rows[-1]['framework']}:{result['method']:<16} {1e3 * result['median_s']:10.1f} ms",
            flush=True)
  rows.sort(key=lambda row: row["framework"] != "ours")
  _derive(rows, size, peak)
  _report(rows)
  path = common.write_json("train_step", {"size": size, "dtype": args.dtype,
                                         "backbone_dtype": args.backbone_dtype,
                                         "matmul_peak_flops": peak, "rows": rows}, args)
  print(f"wrote {path}")


def _derive(rows, size, peak):
  tokens = size["batch"] * (size["inputs"] + size["targets"])
  frozen = {r["framework"]: r["median_s"] for r in rows if r["method"] == "frozen"}
  frozen_fusions = next(r["hlo_fusions"] for r in rows
                        if r["framework"] == "ours" and r["method"] == "frozen")
  peft = {r["method"]: r["median_s"] for r in rows if r["framework"] == "peft"}
  for row in rows:
    row["tokens_per_s"] = tokens / row["median_s"]
    row["x_frozen"] = row["median_s"] / frozen[row["framework"]]
    if "hlo_fusions" in row:
      row["fusions_x_frozen"] = row["hlo_fusions"] / frozen_fusions
    row["flops_per_s"] = row["flops"] / row["median_s"]
    row["gflops_per_s"] = row["flops_per_s"] / 1e9
    row["mfu"] = row["flops_per_s"] / peak.get("jax" if row["framework"] == "ours" else
                                                   "torch", float("nan"))
    if "peak_rss_mb" in row:
      row["step_mb"] = row["peak_rss_mb"] - row["rss_before_mb"]
    elif "gpu_peak_mb" in row:
      row["step_mb"] = row["gpu_peak_mb"]
    if row["framework"] == "ours" and row["method"] in peft:
      row["ours_over_peft"] = row["median_s"] / peft[row["method"]]


def _report(rows):
  common.print_table(rows, [
      ("framework", "framework", ""), ("method", "method", ""), ("median_s", "median s", ".3f"),
      ("tokens_per_s", "tokens/s", ",.0f"), ("x_frozen", "x frozen", ".2f"),
      ("ours_over_peft", "ours/PEFT", ".2f"), ("gflops_per_s", "GFLOP/s", ".1f"),
      ("mfu", "MFU", ".1%"), ("xla_mb", "XLA MB", ",.0f"),
      ("step_mb", "PyTorch MB", ",.0f"), ("trainable_params", "params", ","),
      ("hlo_ops", "HLO ops", ","), ("hlo_fusions", "fusions", ","),
      ("fusions_x_frozen", "fusions x frozen", ".2f")])
  print("XLA MB: the compiled step's arguments + outputs + temporaries (XLA buffer assignment);"
        " PyTorch MB: on a GPU its peak allocated memory, on a CPU the peak resident memory"
        " growth over the PEFT step's own process. HLO ops, fusions: the kernels one compiled"
        " step runs.")
  for row in rows:
    profile = row.get("profile")
    if profile:
      print(f"\nprofile {row['method']}: {profile['adapter_share']:.1%} of the traced op time is"
            f" in adapter ops ({profile['traced_ms_per_step']:.0f} ms/step traced); top ops:")
      for group in profile["top_groups"][:6]:
        print(f"  {group['share']:6.1%} {group['ms_per_step']:8.1f} ms  {group['group'][:100]}")


if __name__ == "__main__":
  main()
