"""Nothing lost under SIGTERM or a damaged checkpoint; bad input fails early and says why."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest

from tensorpoly_jax import checkpoints, pipeline, trainer
from tensorpoly_jax.data import choices, embedded, tasks
from tensorpoly_jax.adapters import LoRAConfig
from tensorpoly_jax.methods import adapter_config
from tensorpoly_jax.optimizers import OptimizerConfig
from tensorpoly_jax.t5 import convert
from tensorpoly_jax.t5.layers import DenseGeneral
from tests.small_adapters import small_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = embedded.Sizes(20, 2, 24, 12)


def small(**changes):
  config = trainer.TrainConfig(steps=20, batch_size=8, inputs_length=48, targets_length=24,
                               checkpoint_every=10, log_every=1,
                               optimizer=OptimizerConfig(name="adamw", learning_rate=1e-3))
  return dataclasses.replace(config, **changes)


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir):
  tasks.register_embedded(0, SIZES)
  return tiny_backbone_dir


def pretrain(model_dir, backbone, config, adapter=None):
  adapter = adapter or LoRAConfig(lora_rank=2)
  loaded = pipeline.load_backbone(backbone, mesh=config.make_mesh())
  return pipeline.pretrain_adapters(str(model_dir), loaded, adapter, tasks.EMBEDDED_TRAIN, config)


def test_damaged_latest_checkpoint_falls_back_and_is_kept(backbone, tmp_path):
  pretrain(tmp_path, backbone, small())
  latest = tmp_path / "run" / "checkpoints" / "20"
  files = sorted((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  damaged = files[-1]
  damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a half-written file
  with pytest.warns(RuntimeWarning, match=r"checkpoint .*checkpoints/20 is unreadable.*falling back"):
    result, _ = pretrain(tmp_path, backbone, small(steps=25))
  assert result.resumed_from == 10
  kept = tmp_path / "run" / "checkpoints_corrupt" / "20"
  assert kept.is_dir() and (kept / damaged.relative_to(latest)).exists()
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["10", "20", "25"]


def test_checkpoint_of_another_configuration_is_refused_before_any_step(backbone, tmp_path):
  pretrain(tmp_path, backbone, small(steps=2, checkpoint_every=2))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"different 'adapter': lora_rank: checkpoint 2 vs run 4"):
    pretrain(tmp_path, backbone, small(steps=4), LoRAConfig(lora_rank=4))
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]


def test_unwritable_model_dir_is_named(backbone, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(ValueError, match=r"model_dir .*file/run' is not writable"):
    pretrain(blocker, backbone, small(steps=1))


def test_export_never_leaves_model_dir(tmp_path):
  (tmp_path / "model").mkdir()
  os.symlink(tmp_path / "elsewhere", tmp_path / "model" / "adapter")
  with pytest.raises(ValueError, match="outside model_dir"):
    checkpoints.export_adapter(str(tmp_path / "model"), "adapter", {}, {})
  with pytest.raises(ValueError, match="outside model_dir"):
    checkpoints.export_adapter(str(tmp_path / "model"), "../escape", {}, {})


def test_export_keeps_transposed_arrays_intact(tmp_path):
  lora_a = np.arange(12, dtype=np.float32).reshape(3, 4).T  # a Fortran-ordered view
  export = checkpoints.export_adapter(str(tmp_path), "adapter", {"adapter": {"lora_a": lora_a}}, {})
  np.testing.assert_array_equal(checkpoints.load_adapter(export)[0]["adapter"]["lora_a"], lora_a)


def test_lengths_that_cut_every_target_are_refused(backbone):
  with pytest.raises(ValueError, match="targets_length=2 cuts every answer choice"):
    choices.choice_arrays(tasks.embedded_heldout_task("yew"), "validation", 48, 2)
  from tensorpoly_jax.data import batches
  with pytest.raises(ValueError, match="targets_length=3 cuts every target"):
    next(batches.lm_batches(tasks.EMBEDDED_TRAIN, 8, 48, 3, 0))


def _logged_steps(metrics) -> list[int]:
  return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if (
      metrics.exists()) else []


def _wait_for(condition, process, what: str) -> None:
  deadline = time.time() + 300
  while not condition():
    assert process.poll() is None, f"the run ended before {what}:\n{process.stdout.read()}"
    assert time.time() < deadline, f"no {what} after 300 s"
    time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_then_sigterm_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
  """Killed (SIGKILL), a run restarts from its last checkpoint; stopped by SIGTERM, it saves the
  step it is at and exits 0; run again, it goes on right after that step and ends with the
  backbone an uninterrupted run ends with."""
  run = lambda model_dir: subprocess.Popen(
      [sys.executable, "-m", "tensorpoly_jax", "train", "--gin_file=models/tiny.gin",
       "--gin_file=runs/data_embedded.gin", "--gin_file=runs/backbone.gin",
       f"--model_dir={model_dir}", "--gin.BATCH_SIZE=8", "--gin.TRAIN_STEPS=90",
       "--gin.TrainConfig.checkpoint_every=30", "--gin.TrainConfig.log_every=1"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  straight = run(tmp_path / "straight")
  assert straight.wait(timeout=600) == 0, straight.stdout.read()
  checkpoints_dir, metrics = tmp_path / "run" / "checkpoints", tmp_path / "run" / "metrics.jsonl"
  killed = run(tmp_path)
  _wait_for((checkpoints_dir / "30").exists, killed, "checkpoint 30")
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert max(_logged_steps(metrics)) < 90, "the run finished before it was killed"
  logged = len(_logged_steps(metrics))
  stopped = run(tmp_path)  # restarts from step 30
  _wait_for(lambda: len(_logged_steps(metrics)) >= logged + 5, stopped, "5 steps after restart")
  stopped.send_signal(signal.SIGTERM)
  output = stopped.communicate(timeout=300)[0]
  assert stopped.returncode == 0, output
  assert _logged_steps(metrics)[logged] == 31
  saved = max(int(d) for d in os.listdir(checkpoints_dir) if d.isdigit())
  assert 35 <= saved < 90 and f"SIGTERM received: saved checkpoint step {saved}" in output
  logged = len(_logged_steps(metrics))
  resumed = run(tmp_path)
  assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
  assert _logged_steps(metrics)[logged:] == list(range(saved + 1, 91))
  _, expected = convert.load_converted(str(tmp_path / "straight" / "backbone"))
  _, actual = convert.load_converted(str(tmp_path / "backbone"))
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                         actual, expected)


# ---------------------------------------------------------------- fuzz: shapes and routing inputs

METHODS = ["lora", "tlora", "poly", "mhr", "tensorpoly_i", "tensorpoly_ii"]
TENSOR = ("tlora", "tensorpoly_i", "tensorpoly_ii")


@st.composite
def valid_layers(draw):
  """A valid adapter config with a layer it fits: every drawn example reaches a forward pass."""
  method = draw(st.sampled_from(METHODS))
  splits = 1
  if method == "mhr":
    splits = draw(st.sampled_from([2, 3, 4]))
  d_in = splits * draw(st.integers(1, 8))
  d_out = splits * draw(st.integers(1, 8))
  pair_norm = draw(st.sampled_from(["none", "layernorm"]))
  order = draw(st.sampled_from([2, 4] if pair_norm == "layernorm" else [1, 2, 3, 5]))
  n_tasks = draw(st.integers(1, 3))
  config = small_adapter(method, lora_rank=draw(st.integers(1, 3)), n_tasks=n_tasks,
                         skills=draw(st.integers(1, 3)), splits=splits, order=order,
                         **({"pair_norm": pair_norm} if method in TENSOR else {}), targets=".*")
  task_ids = draw(st.lists(st.integers(0, n_tasks - 1), min_size=1, max_size=3))
  return config, d_in, d_out, np.asarray(task_ids, np.int32)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(layer=valid_layers(), scale=st.floats(-1e3, 1e3))
def test_valid_adapters_stay_finite_at_any_input_scale(layer, scale):
  config, d_in, d_out, task_ids = layer
  x = scale * np.random.default_rng(0).normal(size=(len(task_ids), 2, d_in)).astype(np.float32)
  dense = DenseGeneral(d_out, adapter=config)
  variables = dense.init(jax.random.PRNGKey(0), x, np.zeros(len(task_ids), np.int32))
  variables = jax.tree_util.tree_map(lambda v: v + 0.1, variables)  # non-zero B
  y = np.asarray(dense.apply(variables, x, task_ids))
  assert y.shape == (len(task_ids), 2, d_out) and np.isfinite(y).all()


@pytest.mark.parametrize("kwargs,d_in,task_ids,match", [
    (dict(method="mhr", n_splits=3), 8, [0], "d_in=8 is not divisible by n_splits=3"),
    (dict(method="poly", n_tasks=2), 6, [2], r"task ids \[2\] are outside \[0, 2\)"),
    (dict(method="tensorpoly_i", n_tasks=2), 6, [-1], r"task ids \[-1\] are outside"),
])
def test_a_layer_the_config_cannot_serve_is_named(kwargs, d_in, task_ids, match):
  config = adapter_config(lora_rank=2, targets=".*", **kwargs)
  dense = DenseGeneral(6, adapter=config)
  x = np.ones((len(task_ids), 2, d_in), np.float32)
  with pytest.raises(ValueError, match=match):
    variables = dense.init(jax.random.PRNGKey(0), x, np.zeros(len(task_ids), np.int32))
    dense.apply(variables, x, np.asarray(task_ids, np.int32))


@pytest.mark.parametrize("field,saved,run,expected", [
    ("routing_ids", {"a": 0, "b": 1}, {"a": 1, "b": 0}, "a: checkpoint 0 vs run 1"),
    ("model", {"emb_dim": 64}, {"emb_dim": 512}, "emb_dim: checkpoint 64 vs run 512"),
    ("stage", "pretrain", "backbone", "checkpoint 'pretrain' vs run 'backbone'"),
])
def test_meta_mismatch_names_the_field(field, saved, run, expected):
  base = {"model": {}, "adapter": None, "routing_ids": {}, "stage": "pretrain"}
  with pytest.raises(checkpoints.CheckpointMismatchError, match=f"different '{field}': {expected}"):
    checkpoints.check_meta({**base, field: saved}, {**base, field: run}, "ckpt/7")
