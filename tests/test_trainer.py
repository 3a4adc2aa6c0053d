"""The trainer: sharded == single device, frozen backbone, NaN stop, losses; the quick demo."""
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file

from tensorpoly_jax import checkpoints, losses, pipeline, trainer
from tensorpoly_jax.data import batches, embedded, tasks
from tensorpoly_jax.adapters import LoRAConfig, MHRConfig, TensorPolyIConfig
from tensorpoly_jax.methods import from_dict
from tensorpoly_jax.optimizers import OptimizerConfig
from tensorpoly_jax.t5 import convert
from tensorpoly_jax.t5.model import EncoderDecoder, merge_params, preset, split_params
from tensorpoly_jax.t5.seq2seq import Seq2SeqModel

SIZES = embedded.Sizes(20, 2, 24, 12)


def small_train(**changes):
  config = trainer.TrainConfig(steps=20, batch_size=8, inputs_length=48, targets_length=24,
                               checkpoint_every=10, log_every=1,
                               optimizer=OptimizerConfig(name="adamw", learning_rate=1e-2,
                                                         adapter_learning_rate=1e-2,
                                                         router_learning_rate=0.1))
  return dataclasses.replace(config, **changes)


@pytest.fixture(scope="module")
def backbone_dir(tiny_backbone_dir):
  tasks.register_embedded(0, SIZES)
  return tiny_backbone_dir


def pretrain(model_dir, backbone_dir, config, adapter=None):
  adapter = adapter or TensorPolyIConfig(lora_rank=2, tensor_rank=4, order=2)
  backbone = pipeline.load_backbone(backbone_dir, mesh=config.make_mesh())
  return pipeline.pretrain_adapters(str(model_dir), backbone, adapter, tasks.EMBEDDED_TRAIN,
                                    config)


@pytest.mark.eight_devices
def test_mesh_4x2_matches_one_device(backbone_dir, tmp_path):
  adapter = MHRConfig(lora_rank=2, n_skills=4, n_splits=2)
  one, _ = pretrain(tmp_path / "one", backbone_dir, small_train(num_devices=1), adapter)
  many, _ = pretrain(tmp_path / "many", backbone_dir, small_train(model_parallel=2), adapter)
  np.testing.assert_allclose([h["loss"] for h in many.history], [h["loss"] for h in one.history],
                             rtol=2e-5)
  # Adam divides by sqrt(v): on rarely-routed rows with tiny gradients, summation-order
  # differences of ~1e-7 grow to ~5e-5 over 20 steps at the router's rate of 0.1.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
                         many.params, one.params)
  # The live state is laid out as the rules say: an adapter's 'mlp' output axis over 'model',
  # and the Adam moments of a param sharded like the param itself.
  key = ("decoder", "layers_0", "mlp", "wi_0", "adapter", "lora_b")
  param = traverse_util.flatten_dict(many.state.params)[key]
  assert param.sharding.spec == PartitionSpec(None, None, None, "model")
  assert {s.data.shape for s in param.addressable_shards} == {(2, 4, 2, 32)}  # 64 split in two
  moments = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(many.state.opt_state)[0]
             if tuple(str(getattr(k, "key", "")) for k in path)[-len(key):] == key]
  assert len(moments) == 2 and all(m.sharding.spec == param.sharding.spec for m in moments)


def test_a_finished_backbone_run_resumes_without_rewriting_it(backbone_dir, tiny_backbone_train):
  """Running the backbone stage again (a rerun of the demo) reads back what the first run wrote."""
  written = os.path.join(backbone_dir, convert.CONVERTED_PARAMS)
  before = os.stat(written).st_mtime_ns
  again = pipeline.train_backbone(os.path.dirname(backbone_dir), preset("tiny"),
                                  tasks.EMBEDDED_TRAIN, tiny_backbone_train)
  assert again == backbone_dir and os.stat(written).st_mtime_ns == before


def test_pretraining_keeps_the_backbone_and_exports_an_adapter_a_fresh_backbone_loads(
    backbone_dir, tmp_path):
  """One pretraining run: the backbone stays bit-identical and gets no optimizer state, the
  metrics are logged by role, and the export alone rebuilds the trained model's outputs."""
  config, backbone = convert.load_converted(backbone_dir)
  result, export = pretrain(tmp_path, backbone_dir, small_train(steps=5, checkpoint_every=5))
  trained_adapter, after = split_params(result.params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                         after, backbone)
  mngr = checkpoints.manager(str(tmp_path / "run" / "checkpoints"), 1)
  state = mngr.restore(mngr.latest_step())["state"]
  paths = [tuple(str(getattr(k, "key", k)) for k in p)
           for p, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]]
  array_paths = [p for p in paths if any(part.startswith("layers_") or part == "token_embedder"
                                         for part in p)]
  assert array_paths and all("adapter" in p for p in array_paths)
  assert not any("token_embedder" in p or p[-1] == "kernel" for p in array_paths)
  # TensorBoard: stable tags, the run being the folder; the rate is the leaves' schedule.
  import tensorflow as tf

  scalars = {}
  for path in (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append(value.simple_value)
  roles = ("leaf", "router")  # TensorPoly-I's trained param roles
  assert set(scalars) == {"train/loss", "train/grad_norm", "train/learning_rate",
                          "train/steps_per_second",
                          *(f"train/{kind}/{role}" for kind in ("grad_norm", "update_norm")
                            for role in roles)}
  by_role = np.hypot(scalars["train/grad_norm/leaf"], scalars["train/grad_norm/router"])
  np.testing.assert_allclose(by_role, scalars["train/grad_norm"], rtol=1e-5)
  rates = scalars["train/learning_rate"]
  assert len(rates) == 5 and rates[0] == pytest.approx(1e-2) and rates[-1] == 0.0
  adapter = TensorPolyIConfig(lora_rank=2, tensor_rank=4, order=2, n_tasks=36)
  initial = pipeline.init_params(EncoderDecoder(config.replace(adapter=adapter)), 0, True)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(trained_adapter),
                                                  jax.tree_util.tree_leaves(initial)))
  adapter_params, meta = checkpoints.load_adapter(export)
  adapter_bytes = 4 * sum(v.size for v in jax.tree_util.tree_leaves(adapter_params))
  backbone_bytes = 4 * sum(v.size for v in jax.tree_util.tree_leaves(backbone))
  size = os.path.getsize(os.path.join(export, checkpoints.ADAPTER_FILE))
  assert size < adapter_bytes + 65536 and size < backbone_bytes / 4  # the adapter only
  config = config.replace(adapter=from_dict(meta["adapter"]))
  model = EncoderDecoder(config)
  tokens = jnp.array([[5, 6, 7, 1]])
  run = lambda p: model.apply({"params": p}, tokens, tokens, tokens, enable_dropout=False,
                              task_ids=jnp.array([3]))
  np.testing.assert_allclose(run(merge_params(adapter_params, backbone)), run(result.params),
                             rtol=1e-6)
  assert meta["routing_ids"] == tasks.routing_ids(tasks.mixture_task_names(tasks.EMBEDDED_TRAIN))


def _lora_model(backbone_dir):
  config, backbone = convert.load_converted(backbone_dir)
  model = EncoderDecoder(config.replace(adapter=LoRAConfig(lora_rank=2)))
  return model, merge_params(pipeline.init_params(model, 0, adapters_only=True), backbone)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(backbone_dir, tmp_path, monkeypatch):
  model, params = _lora_model(backbone_dir)

  def stream(start):
    clean = batches.lm_batches(tasks.EMBEDDED_TRAIN, 8, 48, 24, 0, start)
    for step, batch in enumerate(clean, start=start + 1):
      if step >= 13:  # an out-of-vocabulary target makes the log-likelihood NaN
        batch["decoder_target_tokens"] = batch["decoder_target_tokens"].copy()
        batch["decoder_target_tokens"][0, 0] = 10**6
      yield batch

  fetches = []
  fetch = trainer._fetch_finite
  monkeypatch.setattr(trainer, "_fetch_finite", lambda pending, *a: fetches.append(
      [s for s, _ in pending]) or fetch(pending, *a))
  with pytest.raises(trainer.TrainingDiverged,
                     match=r"^loss became non-finite at step 13 \(loss nan, grad_norm \d\.\d+;"
                           r" steps 13-15 were checked.*step 10"):
    trainer.train(model, params, stream, small_train(checkpoint_every=5, log_every=4),
                  str(tmp_path), {"stage": "test"}, pipeline.abstract_variables(model))
  # Metrics reach the host only at log points and before checkpoints, never once per step.
  assert fetches == [[1, 2, 3, 4], [5], [6, 7, 8], [9, 10], [11, 12], [13, 14, 15]]
  mngr = checkpoints.manager(str(tmp_path / "checkpoints"), 3)
  assert mngr.all_steps() == [5, 10]
  assert not (tmp_path / ".lock").exists()  # a failed run lets go of its model_dir


class PoisonableLoss(Seq2SeqModel):
  """A stand-in objective of the params alone (no forward pass: the step compiles in moments), a
  small finite loss for any batch. For a batch with ``poison == 1`` its gradients are NaN: the
  ``0 * sqrt(u)`` term, ``u = 0 * sum(params) + 1 - poison``, is 0 in the forward pass, but the
  backward pass multiplies ``d sqrt(u) / du = inf`` at ``u = 0`` by 0."""

  def loss_fn(self, mode, tfew_weights=(1.0, 1.0, 1.0)):
    def loss(params, batch, rngs):
      total = sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(params))
      value = 1e-6 * total ** 2 + 0.0 * jnp.sqrt(0.0 * total + 1.0 - batch["poison"].max())
      return value, {"loss": value}

    return loss


def _train_poisonable(backbone_dir, model_dir, config, first_poisoned_step, monkeypatch):
  model, params = _lora_model(backbone_dir)
  stream = lambda start: ({"poison": np.full((8,), float(step >= first_poisoned_step), np.float32)}
                          for step in itertools.count(start + 1))
  monkeypatch.setattr(trainer, "Seq2SeqModel", PoisonableLoss)
  return trainer.train(model, params, stream, config, str(model_dir), {"stage": "test"},
                       pipeline.abstract_variables(model))


def test_nan_gradients_with_a_finite_loss_stop_before_a_checkpoint_keeps_them(
    backbone_dir, tmp_path, monkeypatch):
  with pytest.raises(trainer.TrainingDiverged,
                     match=r"^gradients and updated params became non-finite at step 5 \(loss"
                           r" \d\.\d+(e-\d+)?, grad_norm nan;.*checkpoint step 4"):
    _train_poisonable(backbone_dir, tmp_path, small_train(steps=8, checkpoint_every=2,
                                                          log_every=2), 5, monkeypatch)
  mngr = checkpoints.manager(str(tmp_path / "checkpoints"), 3)
  assert mngr.all_steps() == [2, 4]
  kept = mngr.restore(4)["state"]
  assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(kept))


def test_an_infinite_learning_rate_stops_on_the_params_with_finite_gradients(
    backbone_dir, tmp_path, monkeypatch):
  inf = float("inf")
  config = small_train(steps=4, checkpoint_every=2, log_every=2, optimizer=OptimizerConfig(
      name="adamw", learning_rate=inf, adapter_learning_rate=inf, router_learning_rate=inf))
  with pytest.raises(trainer.TrainingDiverged,
                     match=r"^updated params became non-finite at step 1 \(loss \d\.\d+(e-\d+)?,"
                           r" grad_norm \d\.\d+(e-\d+)?;.*no checkpoint is the last good state"):
    _train_poisonable(backbone_dir, tmp_path, config, 99, monkeypatch)
  assert checkpoints.manager(str(tmp_path / "checkpoints"), 3).all_steps() == []


def test_tfew_losses_match_numpy_loops():
  rng = np.random.default_rng(0)
  choices = rng.integers(2, 9, size=(3, 4, 5))
  choices[0, 1, 3:] = 0
  choices[2, 3] = 0  # an absent choice
  token_ll = np.log(rng.uniform(0.05, 0.95, size=(3, 4, 5)))
  label = np.array([1, 0, 2])
  got = losses.tfew_losses(jnp.asarray(token_ll), jnp.asarray(choices), jnp.asarray(label))
  lm_terms, ul_terms, mc_terms = [], [], []
  for b in range(3):
    scores = []
    for c in range(4):
      valid = choices[b, c] > 0
      if not valid.any():
        continue
      scores.append((c, token_ll[b, c][valid].sum() / valid.sum()))
      for t in np.flatnonzero(valid):
        if c == label[b]:
          lm_terms.append(-token_ll[b, c, t])
        else:
          ul_terms.append(-np.log(1 - np.exp(token_ll[b, c, t])))
    values = np.array([s for _, s in scores])
    log_softmax = values - np.log(np.exp(values).sum())
    mc_terms.append(-log_softmax[[c for c, _ in scores].index(label[b])])
  np.testing.assert_allclose(got["lm"], np.mean(lm_terms), rtol=1e-5)
  np.testing.assert_allclose(got["unlikelihood"], np.mean(ul_terms), rtol=1e-5)
  np.testing.assert_allclose(got["mc"], np.mean(mc_terms), rtol=1e-5)


def test_choices_padded_wider_change_no_loss_and_no_score(backbone_dir):
  """A run pads every task's choices to its widest task's (one compile for all): the added absent
  choices move no loss and no present choice's score."""
  from tensorpoly_jax.data import choices

  config, params = convert.load_converted(backbone_dir)
  seq2seq = Seq2SeqModel(EncoderDecoder(config))
  arrays = choices.choice_arrays("embedded__yew", "train", 48, 24)
  assert arrays["choice_tokens"].shape[1] == 2
  narrow = {k: arrays[k][:8] for k in batches.CHOICE_KEYS}
  wide = {k: choices.pad_choices(arrays, 4)[k][:8] for k in batches.CHOICE_KEYS}
  assert wide["choice_tokens"].shape == (8, 4, 24) and not wide["choice_tokens"][:, 2:].any()
  assert choices.pad_choices(arrays, 2) is arrays and choices.pad_choices(arrays, None) is arrays
  loss = lambda batch: seq2seq.tfew_loss(params, batch, None)[1]
  for name, value in loss(narrow).items():
    np.testing.assert_allclose(loss(wide)[name], value, rtol=1e-6, err_msg=name)
  scores = seq2seq.score_choices(params, wide["encoder_input_tokens"], wide["choice_tokens"])
  np.testing.assert_allclose(scores[:, :2], seq2seq.score_choices(
      params, narrow["encoder_input_tokens"], narrow["choice_tokens"]), rtol=1e-6)
  assert np.isneginf(scores[:, 2:]).all()


def test_param_roles_pick_the_optimizer_groups_and_their_rates():
  from tensorpoly_jax.param_roles import ROLES, param_role

  assert param_role(("encoder", "layers_0", "mlp", "wo", "kernel")) == "backbone"
  assert param_role(("x", "query", "adapter", "router", "skill_logits")) == "router"
  assert param_role(("shared_router", "skill_logits")) == "router"
  assert param_role(("x", "query", "adapter", "lora_b")) == "lora"
  assert param_role(("x", "query", "adapter", "a", "leaves")) == "leaf"
  assert param_role(("x", "query", "adapter", "b", "norm_scale")) == "norm"
  with pytest.raises(ValueError, match="adapter/scale has no role"):
    param_role(("x", "adapter", "scale"))
  config = OptimizerConfig(learning_rate=3e-4, adapter_learning_rate=1e-3, router_learning_rate=0.1)
  assert set(config.rates()) == set(ROLES)
  assert config.rates()["leaf"] == config.rates()["norm"] == 3e-4  # the reference's quirk, kept
  with pytest.raises(ValueError, match="optimizer 'sgd' is unknown"):
    OptimizerConfig(name="sgd")


# ---------------------------------------------------------------- the CLI: gin, kill/resume, demo

BACKBONE_FLAGS = ["--gin_file=models/tiny.gin", "--gin_file=runs/data_embedded.gin",
                  "--gin_file=runs/backbone.gin", "--gin.BATCH_SIZE=8",
                  "--gin.TrainConfig.checkpoint_every=10", "--gin.TrainConfig.log_every=1"]


def test_misspelled_gin_binding_fails_before_any_work(tmp_path):
  from tensorpoly_jax import cli as cli_module

  with pytest.raises(ValueError, match="no gin file defines the macro TRAIN_STEPZ; did you mean"
                     " TRAIN_STEPS") as raised:
    cli_module.main(["train", *BACKBONE_FLAGS, f"--model_dir={tmp_path / 'a'}", "--gin.TRAIN_STEPZ=3"])
  known = str(raised.value).split("Known macros: ")[1].rstrip(".").split(", ")
  assert {"BATCH_SIZE", "DATA_SEED", "TRAIN_STEPS"} <= set(known) and "TrainConfig" not in known
  with pytest.raises(ValueError, match="doesn't have a parameter named 'stepz'"):
    cli_module.main(["train", *BACKBONE_FLAGS, f"--model_dir={tmp_path / 'b'}",
                     "--gin.TrainConfig.stepz=3"])
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_demo_quick_end_to_end_then_resumed_in_a_fresh_process(tmp_path, capsys):
  """`tensorpoly demo --quick` (runs/demo_quick.gin) writes the evaluation and its report. The same
  command again, in a fresh process and the same folder, resumes: finished stages are read, not
  rerun; one adaptation run whose folder was removed is redone bit for bit (a routed adapter's new
  task used to get router rows in the order safetensors handed the export back, which differed
  between processes); and it prints the same table, its stages numbered, in plain lines."""
  from tensorpoly_jax import cli as cli_module, demo, reporting

  folder = tmp_path / "demo"
  assert cli_module.main(["demo", "--quick", f"--model_dir={folder}"]) == 0
  compiles = [line for line in capsys.readouterr().out.splitlines()
              if " compiling the " in line and line.endswith("...")]
  quick = cli_module.demo_config(cli_module.DEMO_QUICK_GIN)
  # The held-out tasks have 2 to 4 choices, padded to 4: one train step per stage (the backbone,
  # each method's pretraining and its adaptation) and one scorer per model compile.
  assert sum(" the train step " in line for line in compiles) == 1 + 2 * len(quick.methods)
  assert sum(" the scorer " in line for line in compiles) == 1 + len(quick.methods)
  evaluation = json.load(open(folder / demo.EVALUATION_FILE))
  report = json.load(open(folder / "report.json"))
  assert report == json.loads(json.dumps(reporting.table(evaluation)))
  assert evaluation["config"]["eval_split"] == "test"
  assert evaluation["config"] == json.loads(json.dumps(quick.to_dict()))
  assert list(report) == ["zero_shot_backbone", "lora", "tensorpoly_i"] == [
      "zero_shot_backbone", *quick.methods]
  for method in quick.methods:
    accuracies = evaluation["results"][method]["accuracy"]
    assert len(accuracies) == len(embedded.HELDOUT_TASKS)
    assert all(len(seeds) == len(quick.seeds) for seeds in accuracies.values())
    assert all(0.0 <= a <= 1.0 for seeds in accuracies.values() for a in seeds.values())
  assert (folder / "report.png").stat().st_size > 1000
  results = sorted(folder.glob("*/adapt/*/result.json"))
  assert len(results) == len(quick.methods) * len(embedded.HELDOUT_TASKS) * len(quick.seeds)
  task = sorted(embedded.HELDOUT_TASKS)[0]
  redo = folder / "tensorpoly_i" / "adapt" / f"embedded__{task}_seed{quick.seeds[-1]}"
  adapted = load_file(redo / "adapter" / checkpoints.ADAPTER_FILE)
  shutil.rmtree(redo)
  written = {path: path.stat().st_mtime_ns for path in results if redo not in path.parents}

  again = subprocess.run([sys.executable, "-m", "tensorpoly_jax", "demo", "--quick",
                          f"--model_dir={folder}"], capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.load(open(folder / demo.EVALUATION_FILE))["results"] == evaluation["results"]
  assert reporting.format_table(reporting.table(evaluation)) in again.stdout
  redone = load_file(redo / "adapter" / checkpoints.ADAPTER_FILE)
  assert redone.keys() == adapted.keys()
  assert all(np.array_equal(redone[k], adapted[k]) for k in adapted)
  assert {path: path.stat().st_mtime_ns for path in written} == written  # read, not rerun
  lines = [line.split(" ", 2)[-1] for line in again.stdout.splitlines()]
  stages = [line for line in lines if line.startswith("demo stage ")]
  assert [line.split(":")[0] for line in stages] == [f"demo stage {i}/5" for i in range(1, 6)]
  trained = {line.split(": step ")[0] for line in lines if ": step " in line}
  assert trained == {f"adapt embedded__{task} s{quick.seeds[-1]}"}  # nothing else trains again
  assert "\r" not in again.stdout
