"""The T5X bridge against the real T5X (not on PyPI: installed from its source, as .ci/run does
from ../shared/wheels): task ids and the routing rng reach the module, the gin model file parses
and builds the module, and the factor/axis rules cover every adapter axis."""
import os
import subprocess
import sys

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import partitioning as nn_partitioning

from tensorpoly_jax import methods
from tensorpoly_jax.adapters import PolyConfig
from tensorpoly_jax.t5 import scoring
from tests.small_adapters import small_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


pytest.importorskip("t5x", reason="T5X is not installed: pip install --no-deps"
                    " ../shared/wheels/*.whl plus fiddle chex jaxtyping cached-property"
                    " tensorboard grain (.ci/run does; CI runs these tests)")


@pytest.fixture(scope="module")
def bridge():
  from tensorpoly_jax import t5x_bridge

  return t5x_bridge


def _t5x_model(bridge, adapter, **model_fields):
  """T5X's model class as a T5X gin file builds it: vocabularies and an adapters-only optimizer."""
  import seqio
  from t5x import adafactor, optimizers

  adapters_only = optimizers.MultiOptimizer([(
      flax.traverse_util.ModelParamTraversal(bridge.is_adapter_param),
      adafactor.Adafactor(logical_factor_rules=bridge.adapter_factor_rules()))])
  vocabulary = seqio.PassThroughVocabulary(512)
  return bridge.EncoderDecoderModel(bridge.t5_module("tiny", adapter, dtype="float32"),
                                    vocabulary, vocabulary, adapters_only, **model_fields)


def _batch(task_ids):
  rng = np.random.default_rng(0)
  tokens = lambda length: rng.integers(2, 500, (len(task_ids), length)).astype(np.int32)
  targets = tokens(5)
  return {"encoder_input_tokens": tokens(7), "decoder_target_tokens": targets,
          "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
          "decoder_loss_weights": np.ones_like(targets, np.float32),
          "task_id": np.asarray(task_ids, np.int32)[:, None]}


def _check_prediction(bridge, adapter, params, batch):
  """T5X's greedy sampling (top-k 1) over the bridge's cached steps gives tensorpoly's greedy
  decoding of the same mixed-task batch (T5X's beam search runs in the `python -m t5x.train` and
  `python -m t5x.infer` test below)."""
  from t5x import decoding as t5x_decoding

  from tensorpoly_jax import decoding

  greedy = _t5x_model(bridge, adapter, decode_fn=t5x_decoding.temperature_sample)
  theirs, _ = greedy.predict_batch_with_aux(params, batch, rng=jax.random.PRNGKey(0))
  length = batch["decoder_input_tokens"].shape[1]
  ours = decoding.generate(greedy.module, params, batch["encoder_input_tokens"],
                           jnp.asarray(batch["task_id"][:, 0]),
                           decoding.DecodeConfig(max_decode_length=length, eos_id=1))
  np.testing.assert_array_equal(np.asarray(theirs), np.asarray(ours.tokens))


def test_task_ids_and_routing_rng_reach_the_module(bridge):
  adapter = PolyConfig(lora_rank=2, n_tasks=3, n_skills=4, relaxed_bernoulli=True)
  model = _t5x_model(bridge, adapter)
  variables = model.get_initial_variables(
      jax.random.PRNGKey(0), {"encoder_input_tokens": (8, 7), "decoder_input_tokens": (8, 5)})
  noise = lambda x: 0.5 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape)
  params = jax.tree_util.tree_map_with_path(  # non-zero B and distinct tasks: routing shows
      lambda path, x: x + noise(x) if any(k in jax.tree_util.keystr(path)
                                          for k in ("lora_b", "skill_logits")) else x,
      variables["params"])
  batch = _batch([0, 2, 1, 0])
  scored = model.score_batch(params, batch)  # T5X: summed target log-likelihood per example
  logits = model.module.apply({"params": params}, batch["encoder_input_tokens"],
                              batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                              enable_dropout=False, task_ids=jnp.array([0, 2, 1, 0]))
  targets = jnp.asarray(batch["decoder_target_tokens"])
  direct = scoring.sequence_scores(scoring.token_log_likelihoods(logits, targets), targets, False)
  np.testing.assert_allclose(scored, direct, rtol=1e-5)
  rerouted = model.score_batch(params, _batch([1, 1, 1, 1]))
  assert not np.allclose(rerouted, scored, atol=1e-5)
  # Training: relaxed-Bernoulli routing draws from the routing rng split off T5X's dropout rng.
  deterministic, _ = model.loss_fn(params, batch, None)
  trained, _ = model.loss_fn(params, batch, jax.random.PRNGKey(1))
  np.testing.assert_allclose(deterministic, -scored.sum(), rtol=1e-5)  # summed, no z-loss
  assert not np.allclose(trained, deterministic, atol=1e-5)
  _check_prediction(bridge, adapter, params, batch)
  with pytest.raises(KeyError, match="RoutedEncDecFeatureConverter"):
    model.score_batch(params, {k: v for k, v in batch.items() if k != "task_id"})
  with pytest.raises(NotImplementedError, match="packed examples"):
    model.score_batch(params, {**batch, "encoder_segment_ids": np.ones((4, 7), np.int32)})


def parse_t5x_gin(files, bindings=()):
  """T5X's own gin parsing (search path: tensorpoly's configs), as ``python -m t5x.train`` does."""
  from t5x import gin_utils

  gin.clear_config()
  gin_utils.parse_gin_flags([CONFIGS], list(files), list(bindings))


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_gin_model_file_per_method_builds_the_adapted_t0_module(bridge, method):
  from t5x import optimizers

  try:
    parse_t5x_gin([f"t5x/{method}.gin"], ["N_TASKS = 36"])
    module = gin.get_configurable(bridge.t5_module)()
    optimizer = gin.get_configurable(bridge.adapters_only)()
    rules = gin.get_configurable(bridge.adapter_factor_rules)()
  finally:
    gin.clear_config()
  assert module.config.emb_dim == 2048 and module.config.num_encoder_layers == 24
  assert not module.config.scan_layers  # restores T5X's per-layer checkpoints
  adapter = module.config.adapter
  assert adapter.method == method and (not adapter.routed or adapter.n_tasks == 36)
  assert module.config.dtype == jnp.bfloat16
  assert isinstance(optimizer, optimizers.MultiOptimizer) and "skills" in rules


def t5x_dataset(mixture, batch_size, task_feature_lengths):
  from t5x import utils

  from tensorpoly_jax import t5x_bridge

  config = utils.DatasetConfig(mixture_or_task_name=mixture, split="train", shuffle=True,
                               task_feature_lengths=task_feature_lengths, batch_size=batch_size,
                               seed=0, pack=False, use_cached=False,
                               module="tensorpoly_jax.data.embedded_tasks")
  return utils.get_dataset(config, 0, 1, t5x_bridge.EncoderDecoderModel.FEATURE_CONVERTER_CLS)


def test_mixture_through_t5x_get_dataset_keeps_task_ids(bridge):
  """T5X's data path (no passthrough_features) with T5X's usual lengths (inputs/targets only)."""
  from tensorpoly_jax.data import embedded_tasks

  batch = next(t5x_dataset("embedded_train", 64, {"inputs": 32, "targets": 8}).as_numpy_iterator())
  task_ids = batch["task_id"][:, 0]
  assert batch["task_id"].shape == (64, 1) and batch["encoder_input_tokens"].shape == (64, 32)
  assert set(task_ids) <= set(embedded_tasks.ROUTING_IDS.values()) and len(set(task_ids)) > 5
  with pytest.raises(ValueError, match="pack=False"):
    bridge.EncoderDecoderModel.FEATURE_CONVERTER_CLS(pack=True)


TINY_T5X = ["PRESET = 'tiny'", "ACTIVATION_DTYPE = 'float32'"]


def mesh_of_4x2_partitioner():
  from t5x import partitioning

  class MeshOf4x2(partitioning.PjitPartitioner):
    """T5X's CPU mesh is data 1 x model 8; a pod slice's would be data 4 x model 2."""

    @property
    def mesh(self):
      return jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))

  return MeshOf4x2


@pytest.mark.eight_devices
def test_t5x_trainer_on_a_4x2_mesh_trains_adapters_only(bridge):
  """The shipped model gin, T5X's PjitPartitioner (data 4 x model 2) and Trainer: the backbone
  comes out bit-identical, every adapter side moves."""
  from t5x import partitioning, trainer, utils

  MeshOf4x2 = mesh_of_4x2_partitioner()
  try:
    parse_t5x_gin(["t5x/poly.gin", "t5x/data_embedded.gin"], TINY_T5X)
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    partitioner = MeshOf4x2(num_partitions=2, logical_axis_rules=(
        partitioning.standard_logical_axis_rules(additional_rules=bridge.adapter_axis_rules())))
  finally:
    gin.clear_config()
  assert partitioner.mesh.shape == {"data": 4, "model": 2}
  shapes = {"encoder_input_tokens": (8, 32), "decoder_input_tokens": (8, 8)}
  initializer = utils.TrainStateInitializer(model.optimizer_def, model.get_initial_variables,
                                            shapes, partitioner)
  state = initializer.from_scratch(jax.random.PRNGKey(0))
  before = jax.tree_util.tree_map(np.asarray, flax.traverse_util.flatten_dict(state.params))
  t5x_trainer = trainer.Trainer(model, state, partitioner, eval_names=[], summary_dir=None,
                                train_state_axes=initializer.train_state_axes, rng=jax.random.PRNGKey(1),
                                learning_rate_fn=lambda step: 1e-2, num_microbatches=None)
  batches = t5x_dataset("embedded_train", 8, {"inputs": 32, "targets": 8}).as_numpy_iterator()
  t5x_trainer.train(batches, num_steps=2)
  after = flax.traverse_util.flatten_dict(t5x_trainer.train_state.params)
  assert any("model" in tuple(x.sharding.spec) for x in after.values())  # T5X's 1-D model parallel
  adapter_keys = [k for k in before if bridge.is_adapter_param("/".join(k))]
  assert adapter_keys and len(adapter_keys) < len(before)
  for key, value in before.items():
    moved = not np.array_equal(value, np.asarray(after[key]))
    assert moved == (key in adapter_keys), key  # lora_a, lora_b and every router row move


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_rules_cover_every_adapter_axis(bridge, method):
  from t5x import adafactor, partitioning

  adapter = small_adapter(method, lora_rank=2, n_tasks=3, skills=4)
  module = bridge.t5_module("tiny", adapter, dtype="float32")
  tokens = jnp.ones((2, 4), jnp.int32)
  variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                                                 enable_dropout=False,
                                                 task_ids=jnp.zeros((2,), jnp.int32)))
  axes = jax.tree_util.tree_leaves(nn_partitioning.get_axis_names(variables["params_axes"]),
                                   is_leaf=lambda x: isinstance(x, tuple))
  factor_rules = bridge.adapter_factor_rules()
  axis_rules = dict(partitioning.standard_logical_axis_rules(
      additional_rules=bridge.adapter_axis_rules()))
  dim = adafactor.FactorDim
  for names in axes:
    assert all(name in factor_rules and name in axis_rules for name in names), names
    factors = {factor_rules[name] for name in names}
    # T5X rejects a param factored over ROW and COLUMN with a NONE axis left over.
    assert not {dim.ROW, dim.COLUMN, dim.NONE} <= factors, names


@pytest.mark.slow
@pytest.mark.eight_devices  # the backbone checkpoint is written from a 4x2 mesh
def test_t5x_train_adapts_a_t5x_backbone_checkpoint(bridge, tmp_path):
  """``python -m t5x.train`` with the shipped model, run and data files at the tiny preset,
  restoring a backbone-only T5X checkpoint written from a converted backbone: adapters start from
  scratch and train, the backbone is the converted one, bit for bit."""
  import orbax.checkpoint as ocp

  from tensorpoly_jax import pipeline
  from tensorpoly_jax.t5 import convert
  from tensorpoly_jax.t5.model import EncoderDecoder, preset

  model = EncoderDecoder(preset("tiny"))  # as `tensorpoly convert` would write it
  convert.save_converted(str(tmp_path / "converted"), model.config,
                         pipeline.init_params(model, 0, adapters_only=False))
  checkpoint = bridge.save_t5x_checkpoint(str(tmp_path / "converted"), str(tmp_path / "backbone"),
                                          mesh_of_4x2_partitioner()(num_partitions=2))
  command = [sys.executable, "-m", "t5x.train", f"--gin_search_paths={CONFIGS}",
             "--gin_file=t5x/tensorpoly_i.gin", "--gin_file=t5x/runs/finetune_adapters.gin",
             "--gin_file=t5x/data_embedded.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
             f"--gin.INITIAL_CHECKPOINT_PATH='{checkpoint}'",
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.TRAIN_STEPS=3",
             "--gin.BATCH_SIZE=8", "--gin.SAVE_PERIOD=3", "--gin.LEARNING_RATE=0.01",
             f"--gin.INFER_EVAL_MIXTURE_OR_TASK_NAME='{INFER_TASK}'",
             *(f"--gin.{binding.replace(' ', '')}" for binding in TINY_T5X)]
  # T5X's CPU mesh puts every device on 'model': 2 of them split the tiny preset's 4 heads.
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
  assert run.returncode == 0, run.stderr[-3000:]

  trained = ocp.PyTreeCheckpointer().restore(str(tmp_path / "run" / "checkpoint_3" / "state"))
  assert int(trained["state"]["step"]) == 3
  params = flax.traverse_util.flatten_dict(trained["target"])
  restored = flax.traverse_util.flatten_dict(convert.load_converted(str(tmp_path / "converted"))[1])
  adapters = {k: v for k, v in params.items() if bridge.is_adapter_param("/".join(k))}
  assert set(params) == set(restored) | set(adapters) and adapters
  for key, value in restored.items():
    np.testing.assert_array_equal(np.asarray(params[key]), value, err_msg="/".join(key))
  # TensorPoly-I's routers start uniform(+-1e-3); trained rows move past that.
  router_rows = [np.asarray(v) for k, v in adapters.items() if k[-1] == "skill_logits"]
  assert router_rows and max(np.abs(row).max() for row in router_rows) > 1e-3
  # T5X's inference evaluation ran at step 3, and `python -m t5x.infer` serves the checkpoint.
  assert len(_predictions(tmp_path / "run" / "inference_eval")) == 40
  assert (tmp_path / "run" / "inference_eval" / f"{INFER_TASK}-metrics.jsonl").exists()
  command = [sys.executable, "-m", "t5x.infer", f"--gin_search_paths={CONFIGS}",
             "--gin_file=t5x/tensorpoly_i.gin", "--gin_file=t5x/runs/infer.gin",
             "--gin_file=t5x/data_embedded.gin", f"--gin.CHECKPOINT_PATH='{tmp_path / 'run'}"
             "/checkpoint_3'", f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'infer'}'",
             f"--gin.MIXTURE_OR_TASK_NAME='{INFER_TASK}'", "--gin.BATCH_SIZE=8",
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
             *(f"--gin.{binding.replace(' ', '')}" for binding in TINY_T5X)]
  run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  assert len(_predictions(tmp_path / "infer")) == 40  # the task's validation split


INFER_TASK = "embedded__alder__t0"


def _predictions(folder):
  """The predictions T5X wrote as JSON lines under ``folder`` (one per example)."""
  import json

  written = [path for path in folder.rglob("*.jsonl*")  # t5x.infer shards: *.jsonl-00000-of-...
             if not path.name.endswith(("-metrics.jsonl", ".COMPLETED"))]
  lines = [json.loads(line) for path in written for line in path.open()]
  assert all("prediction" in line for line in lines), lines[:1]
  return lines
