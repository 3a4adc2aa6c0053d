"""What every benchmark shares: median timing, the machine's measured matmul peak, peak memory,
a jax.profiler trace summary by HLO op, and the JSON record of the machine a result came from."""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import glob
import os
import platform
import re
import resource
import tempfile
import time
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tensorpoly_jax.methods import AdapterConfig, adapter_config

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# The paper's T0 settings: LoRA/Poly/MHR at r=1; the tensor methods at r=16, N=2, R=8
# (TLoRA[r=16] is R=1); S=8 skills, MHR with 8 heads.
PAPER_ADAPTERS = {
    "lora": dict(lora_rank=1),
    "tlora": dict(lora_rank=16, tensor_rank=1, order=2),
    "poly": dict(lora_rank=1, n_skills=8),
    "mhr": dict(lora_rank=1, n_skills=8, n_splits=8),
    "tensorpoly_i": dict(lora_rank=16, tensor_rank=8, order=2),
    "tensorpoly_ii": dict(lora_rank=16, tensor_rank=8, order=2),
}


def paper_adapter(method: str, n_tasks: int = 1, **fields) -> AdapterConfig:
  """``method`` at the paper's settings (``fields`` override them), routing ``n_tasks`` tasks."""
  return adapter_config(method, **{**PAPER_ADAPTERS[method], **fields}).with_tasks(n_tasks)


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
  """``run()`` must block until its work is done. Median and spread of ``repeats`` timed calls."""
  for _ in range(warmup):
    run()
  return interleaved_seconds({"run": run}, repeats)["run"]


class CompiledStep(NamedTuple):
  executable: object
  compile_s: float
  model_flops: float  # the program's own FLOPs, counted before XLA rewrites it
  run: Callable[[], None]  # one blocking step that carries the (donated) state to the next call


def compile_steps(configs: Iterable[tuple], workers: int = 2) -> dict[str, CompiledStep]:
  """Compiles ``configs`` (``(name, jitted_step, state, frozen, batch)``, built lazily) and runs
  each once as its untimed warm-up.

  XLA's CPU compile of a full adapted step takes minutes and grows faster than linearly with the
  number of adapted layers, so each step compiles in a background pool while the next one is
  traced. Nothing is timed here: time the returned steps once this returns (all compiles done).
  """
  def compile_and_warm_up(lowered, state, frozen, batch):
    model_flops = float(_first(lowered.cost_analysis()).get("flops", 0.0))
    start = time.perf_counter()
    executable = lowered.compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run():
      holder["state"], metrics = executable(holder["state"], frozen, batch)
      jax.block_until_ready(metrics)

    run()  # the first call also allocates its buffers
    return CompiledStep(executable, compile_s, model_flops, run)

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = {name: pool.submit(compile_and_warm_up, step.lower(state, frozen, batch), state,
                                 frozen, batch)
               for name, step, state, frozen, batch in configs}
  return {name: future.result() for name, future in futures.items()}


def _first(cost):
  """``cost_analysis()`` answers a dict, or a one-element list of one on some JAX versions."""
  return cost[0] if isinstance(cost, list) else cost


def executable_flops(executable) -> float:
  """FLOPs XLA counts in the compiled program. On a GPU this misses the matmuls it hands to
  cuBLAS (a T5-large step: 2.8e12 of 1.6e13), so utilization uses ``model_flops``."""
  return float(_first(executable.cost_analysis()).get("flops", 0.0))


def interleaved_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
  """Times each of ``runs`` (already warmed up) once per round, ``repeats`` rounds: a slow spell
  of a shared machine then lands on every configuration instead of on whichever ran in it."""
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  return {name: {"median_s": float(np.median(t)), "min_s": float(np.min(t)),
                 "max_s": float(np.max(t)), "repeats": repeats} for name, t in times.items()}


def jax_matmul_peak(size: int | None = None, dtype=jnp.float32, repeats: int = 10) -> float:
  """FLOP/s of a jitted square matmul on the default device (the achievable peak); 2048 on a
  CPU, 8192 on an accelerator, which a smaller one would not fill."""
  size = size or (2048 if jax.default_backend() == "cpu" else 8192)
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  stats = median_seconds(lambda: matmul(a, b).block_until_ready(), repeats)
  return 2 * size**3 / stats["median_s"]


def torch_device() -> str:
  """Where the PyTorch side runs: the GPU when PyTorch sees one, as the JAX side does."""
  import torch

  return "cuda" if torch.cuda.is_available() else "cpu"


def torch_blocking(run: Callable[[], object]) -> Callable[[], None]:
  """``run`` made to wait for its GPU kernels, so that a timer around it times them."""
  import torch

  if torch_device() == "cpu":
    return run

  def blocking():
    run()
    torch.cuda.synchronize()
  return blocking


def torch_matmul_peak(dtype: str = "float32", repeats: int = 10) -> float:
  """As ``jax_matmul_peak``, for PyTorch on ``torch_device()``."""
  import torch

  device = torch_device()
  size = 2048 if device == "cpu" else 8192
  a, b = (torch.randn(size, size, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
  stats = median_seconds(torch_blocking(lambda: torch.mm(a, b)), repeats)
  return 2 * size**3 / stats["median_s"]


def rss_mb() -> float:
  """This process's current resident memory (Linux /proc)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
          "cpu": cpu, "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "date": time.strftime("%Y-%m-%d")}


def git_commit() -> str:
  """The checkout's commit, with ``-dirty`` when tracked files differ from it (a result names the
  code that made it)."""
  import subprocess

  here = os.path.dirname(os.path.abspath(__file__))
  run = lambda *args: subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                                     check=True).stdout.strip()
  return run("rev-parse", "HEAD") + ("-dirty" if run("status", "--porcelain", "-uno") else "")


def argument_parser(doc: str) -> argparse.ArgumentParser:
  """The flags every benchmark takes: ``--quick`` (smoke size) and ``--output`` (its JSON path)."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small size, for smoke tests")
  parser.add_argument("--output", default=None,
                      help="JSON path (default benchmarks/results/<name>[_quick].json)")
  return parser


def write_json(name: str, payload: dict, args: argparse.Namespace) -> str:
  """Writes ``payload`` with the machine it came from to ``args.output`` or the results folder
  (atomically: a run that stops mid-write leaves the previous file)."""
  from tensorpoly_jax import paths

  path = args.output or os.path.join(RESULTS, f"{name}{'_quick' if args.quick else ''}.json")
  paths.write_json(path, {"machine": machine(), **payload})
  return path


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
  """``columns``: (key, header, format spec); a missing value prints as '-'."""
  cells = [[("-" if row.get(key) is None else format(row[key], spec)) for key, _, spec in columns]
           for row in rows]
  widths = [max([len(header)] + [len(line[i]) for line in cells])
            for i, (_, header, _) in enumerate(columns)]
  print("  ".join(f"{header:>{w}}" for (_, header, _), w in zip(columns, widths)))
  for line in cells:
    print("  ".join(f"{cell:>{w}}" for cell, w in zip(line, widths)))


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_op_names(compiled) -> dict[str, str]:
  """HLO instruction name -> the JAX op path it came from (``.../adapter/...``)."""
  names = {}
  for line in compiled.as_text().splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      op = _OP_NAME.search(match.group(2))
      if op:
        names[match.group(1)] = op.group(1)
  return names


def profile_ops(run: Callable[[], object], compiled, steps: int = 2,
                is_adapter: Callable[[str], bool] = lambda op: "/adapter/" in op) -> dict:
  """Traces ``steps`` calls with ``jax.profiler`` and sums the XLA thunk times by HLO op.

  Returns the share of traced op time spent in ops whose JAX op path ``is_adapter`` (the
  adapter's forward, backward and optimizer update), and the top ops with their op paths.
  """
  from jax.profiler import ProfileData

  directory = tempfile.mkdtemp(prefix="tensorpoly_trace_")
  with jax.profiler.trace(directory):
    for _ in range(steps):
      run()
  path = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)[0]
  totals = collections.Counter()
  for plane in ProfileData.from_file(path).planes:
    for line in plane.lines:
      if line.name == "python":
        continue
      for event in line.events:
        if not any(event.name.startswith(skip) for skip in ("Threadpool", "Slinky", "Thunk",
                                                            "end:", "PjRt", "Execute")):
          totals[event.name] += event.duration_ns
  names = hlo_op_names(compiled)
  total_ns = sum(totals.values()) or 1
  groups = collections.Counter()
  for op, ns in totals.items():
    groups[op_group(names.get(op, ""), is_adapter)] += ns
  adapter_ns = sum(ns for group, ns in groups.items() if group.startswith("adapter"))
  top = [{"group": group, "share": ns / total_ns, "ms_per_step": ns / 1e6 / steps}
         for group, ns in groups.most_common(10)]
  return {"adapter_share": adapter_ns / total_ns, "traced_ms_per_step": total_ns / 1e6 / steps,
          "top_groups": top}


def op_group(jax_op: str, is_adapter: Callable[[str], bool]) -> str:
  """``adapter: <what inside the adapter>`` or ``backbone: <primitive>``, over all layers, with
  forward (``jvp``) and backward (``transpose``) kept apart."""
  direction = "bwd" if "transpose(" in jax_op else "fwd"
  if is_adapter(jax_op):
    inner = jax_op.split("/adapter/", 1)[1]
    inner = re.sub(r"adapter\.(factors|skill_vectors)/", "", inner)
    return f"adapter {direction}: {inner}"
  return f"backbone {direction}: {jax_op.rsplit('/', 1)[-1] or '?'}"


def lm_batch(batch: int, inputs: int, targets: int, vocab: int, tasks_in_batch: int) -> dict:
  """A random LM batch (numpy) with ``tasks_in_batch`` distinct task ids."""
  rng = np.random.default_rng(0)
  target_tokens = rng.integers(2, vocab, (batch, targets)).astype(np.int32)
  return {"encoder_input_tokens": rng.integers(2, vocab, (batch, inputs)).astype(np.int32),
          "decoder_target_tokens": target_tokens,
          "decoder_input_tokens": np.pad(target_tokens[:, :-1], ((0, 0), (1, 0))),
          "decoder_loss_weights": np.ones(target_tokens.shape, np.float32),
          "task_ids": (np.arange(batch) % tasks_in_batch).astype(np.int32)}


# The frozen-backbone step trains only these: its backward still runs through every layer.
FIRST_NORMS = (("encoder", "layers_0", "pre_attention_layer_norm", "scale"),
               ("decoder", "layers_0", "pre_self_attention_layer_norm", "scale"))


def random_params(model, seed: int = 0, backbone=None):
  """Random weights of ``model``'s shapes (normal, std 0.05), drawn in numpy: no init compile.
  With ``backbone``, only the adapter params are drawn and the backbone's arrays are reused."""
  from flax import traverse_util

  from tensorpoly_jax.t5.model import abstract_variables, is_adapter_path

  rng = np.random.default_rng(seed)
  shapes = traverse_util.flatten_dict(abstract_variables(model)["params"])
  reused = traverse_util.flatten_dict(backbone) if backbone is not None else {}
  return traverse_util.unflatten_dict({
      path: reused[path] if path in reused and not is_adapter_path(path)
      else jnp.asarray(rng.normal(0.0, 0.05, leaf.shape), leaf.dtype)
      for path, leaf in shapes.items()})


def xla_step_mb(compiled) -> float:
  """The compiled step's buffers by XLA's buffer assignment: arguments + outputs + temporaries
  (donated arguments counted once)."""
  memory = compiled.memory_analysis()
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return total / 2**20


def train_step(model, params):
  """``(jitted step, state, frozen)`` of the trainer's step (AdamW) for ``model``: its adapter
  params train, or, without an adapter, only ``FIRST_NORMS``."""
  from flax import traverse_util

  from tensorpoly_jax import trainer
  from tensorpoly_jax.optimizers import OptimizerConfig, make_optimizer
  from tensorpoly_jax.t5.model import split_params

  if model.config.adapter is None:
    flat = traverse_util.flatten_dict(params)
    trainable = traverse_util.unflatten_dict({k: flat.pop(k) for k in FIRST_NORMS})
    frozen = traverse_util.unflatten_dict(flat)
  else:
    trainable, frozen = split_params(params)
  trainable = jax.tree_util.tree_map(jnp.array, trainable)  # copies: the step donates them
  optimizer = make_optimizer(OptimizerConfig(name="adamw"), trainable, 1000)
  step = jax.jit(trainer.make_train_step(model, optimizer, "lm"), donate_argnums=(0,))
  state = trainer.TrainState(jnp.asarray(0), trainable, optimizer.init(trainable),
                             jax.random.PRNGKey(0))
  return step, state, frozen
