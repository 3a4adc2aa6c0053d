"""Two local processes joined by jax.distributed, stopped by one host's SIGTERM and resumed,
train exactly like one process over the same global batches, and their checkpoint restores in a
single-process run."""
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import seqio
from safetensors.numpy import load_file

from tensorpoly_jax import cli, distributed, pipeline
from tensorpoly_jax.data import batches, tasks
from tensorpoly_jax.t5 import convert
from tensorpoly_jax.t5.model import EncoderDecoder, preset
from tests import devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = 2
# One task of the embedded suite: sharding, preemption and resuming show on any data, and each of
# the six runs builds its pipeline in about a second instead of the 36-task mixture's four.
MIXTURE = tasks.embedded_train_task("alder", 0)


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def _pretrain_args(model_dir, backbone_dir):
  return ["train", "--gin_file=adapters/poly.gin", "--gin_file=runs/data_embedded.gin",
          "--gin_file=runs/pretrain.gin", f"--model_dir={model_dir}", f"--gin.MIXTURE='{MIXTURE}'",
          f"--gin.BACKBONE_DIR='{backbone_dir}'", "--gin.TRAIN_STEPS=10", "--gin.BATCH_SIZE=8",
          "--gin.N_SKILLS=4", "--gin.LORA_RANK=2", "--gin.TrainConfig.checkpoint_every=5",
          "--gin.TrainConfig.log_every=1"]


def _adapter(model_dir):
  return load_file(os.path.join(model_dir, "adapter", "adapter.safetensors"))


def _assert_same(actual, expected, **tolerance):
  assert actual.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], err_msg=name, **tolerance)


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("backbone"))
  model = EncoderDecoder(preset("tiny"))
  convert.save_converted(out, model.config, pipeline.init_params(model, 0, adapters_only=False))
  return out


def _run_processes(model_dir, backbone_dir, preempted_process=None, after_step=None):
  """``tensorpoly train`` as 2 processes x 4 CPU devices (a global mesh of 8); optionally one
  process receives SIGTERM after saving ``after_step``. Returns each process's output."""
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": devices.xla_flags(4),
         "JAX_PLATFORMS": "cpu"}

  def command(index):
    if index == preempted_process:
      return [os.path.join(ROOT, "tests", "preempt_one_host.py")], {"PREEMPT_AFTER_STEP":
                                                                     str(after_step)}
    return ["-m", "tensorpoly_jax"], {}

  procs = []
  for index in range(PROCESSES):
    entry, extra_env = command(index)
    procs.append(subprocess.Popen(
        [sys.executable, *entry, *_pretrain_args(model_dir, backbone_dir),
         f"--coordinator_address=localhost:{port}", f"--num_processes={PROCESSES}",
         f"--process_id={index}"], cwd=ROOT, env={**env, **extra_env}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True))
  outputs = []
  for proc in procs:
    try:
      outputs.append(proc.communicate(timeout=420)[0])
    except subprocess.TimeoutExpired:
      for other in procs:
        other.kill()
      raise
  for index, (proc, output) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f"process {index} failed:\n{output[-4000:]}"
  return outputs


@pytest.mark.slow
def test_preempted_two_process_run_resumes_matches_one_process_and_restores_in_one_process(
    backbone_dir, tmp_path, monkeypatch):
  """One two-process run serves three checks (each run of two processes costs a minute here)."""
  two, one = tmp_path / "two", tmp_path / "one"
  # 1. SIGTERM on one host after step 5: every host saves one agreed step and exits 0.
  stopped = _run_processes(two, backbone_dir, preempted_process=1, after_step=5)
  saved = [re.findall(r"every process saved checkpoint step (\d+)", out) for out in stopped]
  assert saved[0] and saved[0] == saved[1], stopped
  step = int(saved[0][0])
  assert 5 < step < 10
  assert sorted(os.listdir(two / "run" / "checkpoints")) == ["5", str(step)]
  # The same command resumes from that step and runs to the end.
  resumed = _run_processes(two, backbone_dir)
  assert "saved checkpoint" not in resumed[0]
  assert "pretrain poly" in resumed[0] and "pretrain poly" not in resumed[1]  # bar: process 0

  # 2. It ends where one process reading both processes' shards side by side ends.
  real_lm_batches = batches.lm_batches

  def both_shards(name, batch_size, inputs_length, targets_length, seed, start, shard_info):
    assert shard_info == seqio.ShardInfo(0, 1)
    streams = [real_lm_batches(name, batch_size // PROCESSES, inputs_length, targets_length, seed,
                               start, seqio.ShardInfo(index, PROCESSES))
               for index in range(PROCESSES)]
    for parts in zip(*streams):
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  with monkeypatch.context() as patch:
    patch.setattr(batches, "lm_batches", both_shards)
    assert cli.main(_pretrain_args(one, backbone_dir)) == 0
  _assert_same(_adapter(two), _adapter(one), rtol=1e-4, atol=1e-6)

  # 3. Its checkpoint restores in one process: with unsharded data, only a restored step-10 state
  # (no steps left to run) re-exports the same adapter.
  exported = _adapter(two)
  os.remove(os.path.join(two, "adapter", "adapter.safetensors"))
  assert cli.main(_pretrain_args(two, backbone_dir)) == 0
  _assert_same(_adapter(two), exported, rtol=0, atol=0)


def test_process_group_from_flags_and_environment():
  env = {"TENSORPOLY_COORDINATOR_ADDRESS": "h:1", "TENSORPOLY_NUM_PROCESSES": "4"}
  group = distributed.ProcessGroup(process_id=3).merged(distributed.ProcessGroup.from_env(env))
  assert group == distributed.ProcessGroup("h:1", 4, 3)
  with pytest.raises(ValueError, match="process_id=4 must be in"):
    distributed.ProcessGroup("h:1", 4, 4).check()
  with pytest.raises(ValueError, match="incomplete: process_id"):
    distributed.initialize(distributed.ProcessGroup("h:1", 2), environ={})
  with pytest.raises(ValueError, match="TENSORPOLY_NUM_PROCESSES='two'"):
    distributed.ProcessGroup.from_env({"TENSORPOLY_NUM_PROCESSES": "two"})
  assert not distributed.initialize(environ={})  # one process: nothing to join
  assert distributed.cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"})
  assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
  assert not distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "w0", "SLURM_NTASKS": "8"})


def test_choice_batch_shards_concatenate_to_the_global_batch():
  arrays = {"encoder_input_tokens": np.arange(20)[:, None], "choice_tokens": np.zeros((20, 2, 3)),
            "label": np.arange(20) % 2}
  whole = batches.choice_batches(arrays, 8, seed=3, start_step=2, task_id=5)
  shards = [batches.choice_batches(arrays, 8, 3, 2, 5, seqio.ShardInfo(i, 2)) for i in range(2)]
  for _ in range(4):  # crosses an epoch boundary (20 examples, 8 per step)
    expected, parts = next(whole), [next(s) for s in shards]
    for key in expected:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])
  with pytest.raises(ValueError, match="divisible by the 3 processes"):
    next(batches.choice_batches(arrays, 8, 0, shard_info=seqio.ShardInfo(0, 3)))
