"""Nothing lost under SIGTERM or a damaged checkpoint; one run per model_dir; bad input fails
early and says why."""
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental import multihost_utils

from tensorpoly_jax import (checkpoints, evaluation, fingerprint, paths, pipeline, run_lock,
                            trainer)
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
  damaged = _damage(latest, "state/**/d/*", _cut)  # half-written array data (not JSON metadata)
  # tensorstore's status for a cut file: a damaged step, not some other restore error.
  with pytest.warns(RuntimeWarning, match=r"checkpoint .*checkpoints/20 is damaged \(.*OUT_OF_RANGE"
                    r".*falling back"):
    result, _ = pretrain(tmp_path, backbone, small(steps=25, new_schedule=True))
  assert result.resumed_from == 10
  kept = tmp_path / "run" / "checkpoints_corrupt" / "20"
  assert kept.is_dir() and all((kept / path.relative_to(latest)).exists() for path in damaged)
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["10", "20", "25"]


def test_checkpoint_of_another_configuration_is_refused_before_any_step(backbone, tmp_path):
  pretrain(tmp_path, backbone, small(steps=2, checkpoint_every=2))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"written by another run:\n  adapter: lora_rank: checkpoint 2 vs run 4\n"
                           r"  train: steps: checkpoint 2 vs run 4\nUse a new --model_dir"):
    pretrain(tmp_path, backbone, small(steps=4), LoRAConfig(lora_rank=4))
  # With a new schedule allowed, another optimizer gets past the identity: the state's tree
  # tells, and nothing is moved aside.
  adafactor = OptimizerConfig(name="adafactor", learning_rate=1e-3)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"checkpoint .*checkpoints/2 holds a train state of another structure"
                           r" \(\d+ differences: opt_state/.*: checkpoint (float32\[.*\]|absent)"
                           r" vs run (float32\[.*\]|absent).*another optimizer"):
    pretrain(tmp_path, backbone, small(steps=4, optimizer=adafactor, new_schedule=True))
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
  assert not (tmp_path / "run" / "checkpoints_corrupt").exists()


def test_a_rerun_with_other_settings_never_reports_the_finished_runs_results(backbone, tmp_path):
  first, _ = pretrain(tmp_path, backbone, small(steps=2, checkpoint_every=2))
  identity = json.loads((tmp_path / "run" / trainer.IDENTITY_FILE).read_text())
  assert identity["train"]["optimizer"]["learning_rate"] == 1e-3
  assert identity["backbone"] == convert.stored_fingerprint(backbone) is not None
  # The same settings resume (here: nothing left to run); other logging or saving is no change.
  again, _ = pretrain(tmp_path, backbone, small(steps=2, checkpoint_every=1, log_every=2))
  assert again.resumed_from == 2
  faster = small(steps=2, checkpoint_every=2,
                 optimizer=OptimizerConfig(name="adamw", learning_rate=1e-2))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"train: optimizer: checkpoint .*'learning_rate': 0.001.* vs run .*"
                           r"'learning_rate': 0.01.*\nUse a new --model_dir, or the settings that"
                           r" wrote it; or continue this run .* --gin.NEW_SCHEDULE=True"):
    pretrain(tmp_path, backbone, faster)
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"train: steps: checkpoint 2 vs"
                                                                r" run 4\n.*NEW_SCHEDULE=True"):
    pretrain(tmp_path, backbone, small(steps=4, checkpoint_every=2))
  assert json.loads((tmp_path / "run" / trainer.IDENTITY_FILE).read_text()) == identity
  longer, _ = pretrain(tmp_path, backbone, small(steps=4, checkpoint_every=2, new_schedule=True))
  assert longer.resumed_from == 2 and [h["step"] for h in longer.history] == [3, 4]
  assert json.loads((tmp_path / "run" / trainer.IDENTITY_FILE).read_text())["train"]["steps"] == 4
  del first


def test_an_adapter_is_refused_on_another_backbone_of_the_same_shapes(backbone, tmp_path):
  loaded = pipeline.load_backbone(backbone, mesh=small().make_mesh())
  other = dataclasses.replace(loaded, params=jax.tree_util.tree_map(lambda x: x * 1.01,
                                                                     loaded.params))
  other = dataclasses.replace(other, fingerprint=fingerprint.params_fingerprint(other.params))
  assert other.fingerprint != loaded.fingerprint
  _, adapter_dir = pipeline.pretrain_adapters(str(tmp_path), loaded, LoRAConfig(lora_rank=2),
                                              tasks.EMBEDDED_TRAIN, small(steps=1))
  adapt = small(steps=1, loss="tfew")
  pipeline.load_pretrained(loaded, adapter_dir, adapt)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=rf"trained on the backbone with fingerprint {loaded.fingerprint}, but"
                           rf" BACKBONE_DIR holds the backbone {other.fingerprint}"):
    pipeline.load_pretrained(other, adapter_dir, adapt)


# ------------------------------------------- restore errors by kind, on a small state (no model)

def _state(step: int) -> dict:
  return {"step": jnp.asarray(step), "params": {"a": jnp.full((4, 8), float(step)),
                                               "b": jnp.arange(600.0) * step}}


@pytest.fixture
def two_steps(tmp_path):
  """``tmp_path/ck`` with checkpoints 1 and 2 of ``_state(1)`` and ``_state(2)``."""
  mngr = checkpoints.manager(str(tmp_path / "ck"), 3)
  for step in (1, 2):
    checkpoints.save(mngr, step, _state(step), {"stage": "test"})
  mngr.close()
  return tmp_path / "ck"


def _restore(directory, abstract_state=None):
  mngr, state, step = checkpoints.restore_latest(
      str(directory), 3, abstract_state or checkpoints.abstract(_state(0)), {"stage": "test"})
  mngr.close()
  return state, step


def _damage(step_dir, pattern, damage) -> list:
  """Applies ``damage`` to every path of the step matching ``pattern`` (which of several data
  files a restore reads first varies); returns them."""
  matched = sorted(step_dir.glob(pattern))
  assert matched, f"nothing matches {pattern} in {step_dir}"
  for path in matched:
    damage(path)
  return matched


def _cut(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _flip(path):
  data = path.read_bytes()
  middle = len(data) // 2
  path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 16])
                   + data[middle + 16:])


# Each way a finished step's files were found damaged, and what orbax / tensorstore raise for it.
DAMAGE = {
    "data cut": ("state/d/*", _cut, r"ValueError: OUT_OF_RANGE"),
    "data deleted": ("state/d/*", os.remove, r"ValueError: NOT_FOUND"),
    "manifest altered": ("state/manifest.ocdbt", _flip, r"ValueError: DATA_LOSS"),
    "process data cut": ("state/ocdbt.process_0/d/*", _cut, r"ValueError: OUT_OF_RANGE"),
    "tree metadata cut": ("state/_METADATA", _cut, r"JSONDecodeError"),
    "tree metadata deleted": ("state/_METADATA", os.remove,
                              r"FileNotFoundError: .* has no state tree metadata"),
    "meta altered": ("meta/metadata", _flip, r"UnicodeDecodeError"),
    "meta folder deleted": ("meta", shutil.rmtree, r"KeyError: .*Item \"meta\" was not found"),
}


@pytest.mark.parametrize("pattern,damage,raised", DAMAGE.values(), ids=DAMAGE.keys())
def test_each_kind_of_damage_is_moved_aside_and_the_previous_step_restored(two_steps, pattern,
                                                                            damage, raised):
  _damage(two_steps / "2", pattern, damage)
  with pytest.warns(RuntimeWarning,
                    match=rf"ck/2 is damaged \({raised}.*moved it to .*ck_corrupt/2"):
    state, step = _restore(two_steps)
  assert step == 1 and float(state["params"]["a"][0, 0]) == 1.0
  assert os.listdir(two_steps) == ["1"] and os.listdir(f"{two_steps}_corrupt") == ["2"]


def test_every_checkpoint_damaged_never_restarts_from_step_0(two_steps):
  for step in ("1", "2"):
    _damage(two_steps / step, "state/d/*", _cut)
  refusal = (r"every checkpoint in .*ck was damaged and moved to .*ck_corrupt \(steps 1, 2\);"
             r".*does not start over from step 0 on its own\. To start over deliberately, move"
             r" .*ck_corrupt out of the way")
  with pytest.warns(RuntimeWarning, match="is damaged"):
    with pytest.raises(checkpoints.CheckpointsDamagedError, match=refusal):
      _restore(two_steps)
  with pytest.raises(checkpoints.CheckpointsDamagedError, match=refusal):  # and on every rerun
    _restore(two_steps)


@pytest.mark.parametrize("error", [
    MemoryError("out of host memory"),
    ValueError("RESOURCE_EXHAUSTED: Out of memory allocating 4 GiB"),
    PermissionError(13, "Permission denied", "ck/2/state/manifest.ocdbt"),
    ValueError("UNAVAILABLE: the storage service is unreachable"),
], ids=["memory", "resource_exhausted", "permission", "unavailable"])
def test_a_restore_error_that_is_not_damage_propagates_and_moves_nothing(two_steps, monkeypatch,
                                                                         error):
  def fail(*args, **kwargs):
    # orbax raises its read errors with tensorstore's as the cause
    raise Exception("Encountered error while reading array index: ()") from error

  monkeypatch.setattr(ocp.CheckpointManager, "restore", fail)
  with pytest.raises(Exception, match="Encountered error while reading") as raised:
    _restore(two_steps)
  assert raised.value.__cause__ is error
  assert sorted(os.listdir(two_steps)) == ["1", "2"]
  assert not os.path.exists(f"{two_steps}_corrupt")


def test_a_state_of_another_structure_is_refused_naming_what_differs(two_steps):
  other = checkpoints.abstract(_state(0))
  other["params"]["a"] = jax.ShapeDtypeStruct((4, 4), jnp.bfloat16)
  other["params"]["c"] = jax.ShapeDtypeStruct((3,), jnp.float32)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"ck/2 holds a train state of another structure \(2 differences:"
                           r" params/a: checkpoint float32\[4, 8\] vs run bfloat16\[4, 4\];"
                           r" params/c: checkpoint absent vs run float32\[3\]\)"):
    _restore(two_steps, other)
  assert sorted(os.listdir(two_steps)) == ["1", "2"]


@pytest.mark.parametrize("process", [0, 1])
def test_only_process_0_moves_a_damaged_step_and_every_process_waits_for_it(two_steps,
                                                                            monkeypatch, process):
  barriers = []
  monkeypatch.setattr(jax, "process_index", lambda: process)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "sync_global_devices", barriers.append)
  checkpoints.quarantine(str(two_steps), 2)
  assert sorted(os.listdir(two_steps)) == (["1"] if process == 0 else ["1", "2"])
  assert barriers == [f"tensorpoly quarantine {two_steps} 2"]


# ------------------------------------------------------------------ one run per model_dir

def _lock_of(holder: dict, model_dir) -> None:
  model_dir.mkdir(parents=True, exist_ok=True)
  (model_dir / run_lock.LOCK_FILE).write_text(json.dumps(holder))


def test_a_run_holds_its_model_dir_and_lets_go_however_it_ends(tmp_path):
  lock = tmp_path / run_lock.LOCK_FILE
  with run_lock.hold(str(tmp_path)):
    holder = json.loads(lock.read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    assert "T" in holder["started"]
    with pytest.raises(run_lock.ModelDirLocked,
                       match=rf"model_dir .* is in use by another run \(pid {os.getpid()} on host"
                             rf" {socket.gethostname()}, started .*; it is still running on this"
                             r" host\).*remove .*\.lock and run again"):
      with run_lock.hold(str(tmp_path)):
        pass
    assert json.loads(lock.read_text()) == holder  # the refused run leaves the lock alone
  assert not lock.exists()
  with pytest.raises(KeyError):
    with run_lock.hold(str(tmp_path)):
      raise KeyError("a run that fails")
  assert not lock.exists()


def test_a_lock_of_another_host_is_refused_and_never_taken_over(tmp_path):
  holder = {"host": "tpu-worker-7", "pid": 4242, "started": "2026-12-01T10:00:00+00:00"}
  _lock_of(holder, tmp_path)
  with pytest.raises(run_lock.ModelDirLocked,
                     match=r"pid 4242 on host tpu-worker-7, started 2026-12-01T10:00:00\+00:00;"
                           r" whether it still runs cannot be checked from this host"):
    with run_lock.hold(str(tmp_path)):
      pass
  assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text()) == holder


def test_a_lock_left_by_a_dead_run_on_this_host_is_taken_over_with_a_warning(tmp_path):
  finished = subprocess.Popen([sys.executable, "-c", "pass"])
  finished.wait()  # a pid that no longer runs, as after SIGKILL
  _lock_of({"host": socket.gethostname(), "pid": finished.pid, "started": "earlier"}, tmp_path)
  with pytest.warns(RuntimeWarning, match=rf"took over .*\.lock: the run that left it \(pid"
                                          rf" {finished.pid} on host .*\) is no longer alive"):
    with run_lock.hold(str(tmp_path)):
      assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert os.listdir(tmp_path) == []


def test_a_second_run_into_a_held_model_dir_stops_before_any_work(backbone, tmp_path):
  holder = {"host": socket.gethostname(), "pid": os.getppid(), "started": "now"}  # alive
  _lock_of(holder, tmp_path / "run")
  with pytest.raises(run_lock.ModelDirLocked, match=rf"pid {os.getppid()} on host"):
    pretrain(tmp_path, backbone, small(steps=2))
  assert os.listdir(tmp_path / "run") == [run_lock.LOCK_FILE]


def test_write_probes_of_two_processes_never_share_a_name(tmp_path):
  (tmp_path / ".write_probe").mkdir()  # another run's probe (or a fixed name) cannot collide
  paths.check_writable(str(tmp_path))
  assert os.listdir(tmp_path) == [".write_probe"]


def test_non_finite_scores_are_refused_naming_the_examples(backbone):
  from tensorpoly_jax.t5 import convert
  from tensorpoly_jax.t5.model import EncoderDecoder

  config, params = convert.load_converted(backbone)
  arrays = dict(choices.choice_arrays(tasks.embedded_heldout_task("yew"), "validation", 48, 24))
  unused = config.vocab_size - 1
  assert not (arrays["encoder_input_tokens"] == unused).any()
  arrays["encoder_input_tokens"] = arrays["encoder_input_tokens"].copy()
  arrays["encoder_input_tokens"][2, 0] = unused  # a token whose embedding is NaN: example 2 only
  params = jax.tree_util.tree_map(np.asarray, params)
  params["token_embedder"]["embedding"][unused] = np.nan
  scorer = evaluation.Scorer(EncoderDecoder(config), trainer.TrainConfig().make_mesh())
  with pytest.raises(ValueError, match=r"task_id=None: the choice scores of examples \[2\] are not"
                                       r" finite \(example 2: \[nan"):
    scorer.predict(params, arrays, None, batch_size=8)


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


def test_adapt_keeps_every_finished_run_and_redoes_only_the_failed_ones(tmp_path, monkeypatch):
  """A task x seed that fails or diverges is recorded while the others run; the command then
  fails naming it. A rerun reads the finished runs' records, retries the failed one, keeps the
  diverged one (it diverges again with the same settings), and other settings run everything."""
  from tensorpoly_jax import commands, metrics, records
  from tensorpoly_jax.t5.model import EncoderDecoder, preset

  tasks.register_embedded(0, SIZES)
  config = preset("tiny").replace(adapter=LoRAConfig(lora_rank=2))
  params = pipeline.init_params(EncoderDecoder(config), 0, adapters_only=True)
  adapter_dir = checkpoints.export_adapter(str(tmp_path), "adapter", params, pipeline.run_meta(
      "pretrain", config, {"embedded__oak": 0}))
  backbone = pipeline.Backbone(preset("tiny"), {}, small().make_mesh())
  ran, fail = [], {("embedded__yew", 1): OSError("disk full"),
                   ("embedded__rowan", 0): trainer.TrainingDiverged("loss became nan at step 2")}

  def adapt(model_dir, backbone, pretrained, task, k, seed, choice_width):
    ran.append((task, seed))
    if (task, seed) in fail:
      raise fail[task, seed]

  monkeypatch.setattr(pipeline, "load_backbone", lambda *args: backbone)
  monkeypatch.setattr(pipeline, "adapt", adapt)
  monkeypatch.setattr(pipeline, "evaluate_task",
                      lambda *args, choice_width: types.SimpleNamespace(
                          accuracy=0.5 + args[-1] / 10))  # by seed
  monkeypatch.setattr(metrics, "write_eval", lambda *args: None)
  heldout = ["embedded__yew", "embedded__rowan"]
  run = lambda shots=8: commands.adapt(str(tmp_path), "backbone", adapter_dir, heldout,
                                       small(loss="tfew"), shots, seeds=(0, 1))
  with pytest.raises(records.RunsFailed, match=r"(?s)^2 run\(s\) did not finish.*\n  embedded__yew_"
                     r"seed1: failed: OSError: disk full\n  embedded__rowan_seed0: diverged: loss"):
    run()
  assert len(ran) == 4
  results = json.loads((tmp_path / "adapt_results.json").read_text())
  assert results["accuracy"] == {"embedded__yew": {"0": 0.5}, "embedded__rowan": {"1": 0.6}}
  assert results["unfinished"].keys() == {"embedded__yew_seed1", "embedded__rowan_seed0"}
  assert results["mean_of_medians"] == pytest.approx(0.55)
  assert results["adaptation_params"] == pipeline.count_params(params)
  record = json.loads((tmp_path / "adapt" / "embedded__yew_seed0" / "result.json").read_text())
  assert {k: record[k] for k in ("task", "seed", "shots", "split", "status", "accuracy")} == {
      "task": "embedded__yew", "seed": 0, "shots": 8, "split": "validation", "status": "finished",
      "accuracy": 0.5}
  del fail["embedded__yew", 1]
  ran.clear()
  with pytest.raises(trainer.TrainingDiverged, match=r"^1 run\(s\) did not finish"):
    run()
  assert ran == [("embedded__yew", 1)]
  assert json.loads((tmp_path / "adapt_results.json").read_text())["accuracy"] == {
      "embedded__yew": {"0": 0.5, "1": 0.6}, "embedded__rowan": {"1": 0.6}}
  fail.clear()
  ran.clear()
  assert run(shots=4)["unfinished"] == {} and len(ran) == 4  # other settings: every run again


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


# One task of the embedded suite: the runs below test stopping and resuming, which any data shows,
# and each of their processes builds its pipeline in 1 s instead of the 36-task mixture's 4 s.
ONE_TASK = tasks.embedded_train_task("alder", 0)


@pytest.mark.slow
def test_sigkill_then_sigterm_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
  """Killed (SIGKILL), a run restarts from its last checkpoint, taking over the lock it left;
  stopped by SIGTERM, it saves the step it is at and exits 0; run again, it goes on right after
  that step and ends with the backbone an uninterrupted run ends with."""
  run = lambda model_dir: subprocess.Popen(
      [sys.executable, "-m", "tensorpoly_jax", "train", "--gin_file=models/tiny.gin",
       "--gin_file=runs/data_embedded.gin", "--gin_file=runs/backbone.gin",
       f"--model_dir={model_dir}", f"--gin.MIXTURE='{ONE_TASK}'", "--gin.BATCH_SIZE=8",
       "--gin.TRAIN_STEPS=90",
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
  assert re.search(r"took over .*run/\.lock: the run that left it \(pid \d+ .*\) is no longer"
                   r" alive on this host", output), output
  assert _logged_steps(metrics)[logged] == 31
  saved = max(int(d) for d in os.listdir(checkpoints_dir) if d.isdigit())
  assert 35 <= saved < 90 and f"SIGTERM received: saved checkpoint step {saved}" in output
  logged = len(_logged_steps(metrics))
  resumed = run(tmp_path)
  assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
  assert _logged_steps(metrics)[logged:] == list(range(saved + 1, 91))
  assert not (tmp_path / "run" / run_lock.LOCK_FILE).exists()
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


@hypothesis.settings(max_examples=20, deadline=None)
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
    ("routing_ids", {"a": 0, "b": 1}, {"a": 1, "b": 0}, "a: checkpoint 0 vs run 1, b: checkpoint 1"
                                                        " vs run 0"),
    ("model", {"emb_dim": 64}, {"emb_dim": 512}, "emb_dim: checkpoint 64 vs run 512"),
    ("stage", "pretrain", "backbone", "checkpoint 'pretrain' vs run 'backbone'"),
    ("backbone", "0123", "4567", "checkpoint '0123' vs run '4567'"),
    ("train", {"seed": 0}, {"seed": 1}, "seed: checkpoint 0 vs run 1"),
])
def test_meta_mismatch_names_the_field(field, saved, run, expected):
  base = {"model": {}, "adapter": None, "routing_ids": {}, "stage": "pretrain",
          "train": {"steps": 2}, "backbone": "0123"}
  with pytest.raises(checkpoints.CheckpointMismatchError, match=f"\n  {field}: {expected}\n"):
    checkpoints.check_meta({**base, field: saved}, {**base, field: run}, "ckpt/7")
  # A new schedule lets steps and optimizer settings change, and nothing else.
  checkpoints.check_meta({**base, "train": {"steps": 2, "optimizer": {"learning_rate": 1.0}}},
                         {**base, "train": {"steps": 9, "optimizer": {"learning_rate": 2.0}}},
                         "ckpt/7", new_schedule=True)
  with pytest.raises(checkpoints.CheckpointMismatchError, match="train: seed"):
    checkpoints.check_meta({**base, "train": {"seed": 0}}, {**base, "train": {"seed": 1}},
                           "ckpt/7", new_schedule=True)


@pytest.mark.parametrize("flag,match", [
    ("--gin.TRAIN_STEPS=1e3", r"TrainConfig.steps must be an int, got 1000.0 \(float\)"),
    ("--gin.LEARNING_RATE='1e-3'", r"OptimizerConfig.learning_rate must be a float, got '1e-3'"),
    ("--gin.LORA_RANK=2.0", r"LoRAConfig.lora_rank must be an int, got 2.0"),
])
def test_a_gin_value_of_the_wrong_type_is_refused_before_the_backbone_loads(tmp_path, flag, match):
  from tensorpoly_jax import cli

  with pytest.raises(ValueError, match=match):
    cli.main(["train", "--gin_file=adapters/lora.gin", "--gin_file=runs/data_embedded.gin",
              "--gin_file=runs/pretrain.gin", f"--model_dir={tmp_path}",
              f"--gin.BACKBONE_DIR='{tmp_path / 'no_backbone_here'}'", flag])
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,error,match", [
    (["--gin.SEEDS=(0, 1.5)"], ValueError, r"SEEDS=\(0, 1.5\) must be a non-empty tuple of ints"),
    (["--gin.HELDOUT='embedded__oak'"], ValueError, r"unknown seqio task or mixture 'embedded__oak'"),
    (["--gin.NUM_SHOTS=500"], ValueError, r"few-shot k=500 must be in \[1, 200\]"),
    ([], FileNotFoundError, r"no_backbone_here holds no converted backbone .*set BACKBONE_DIR"),
])
def test_adapt_settings_and_dirs_are_checked_before_any_work(tmp_path, flags, error, match):
  from tensorpoly_jax import cli

  with pytest.raises(error, match=match):
    cli.main(["adapt", "--gin_file=runs/data_embedded.gin", "--gin_file=runs/adapt.gin",
              f"--model_dir={tmp_path}", f"--gin.BACKBONE_DIR='{tmp_path / 'no_backbone_here'}'",
              f"--gin.ADAPTER_DIR='{tmp_path / 'no_adapter_here'}'", *flags])
  assert not (tmp_path / "adapt").exists()


def test_a_missing_adapter_export_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"is not an adapter export \(no adapter_config.json"
                                              r" or adapter.safetensors\): set ADAPTER_DIR"):
    checkpoints.load_adapter(str(tmp_path))
