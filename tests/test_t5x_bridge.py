"""The T5X bridge against the real T5X (not on PyPI: installed from its source, as .ci/run does
from ../shared/wheels): task ids and the routing rng reach the module, the gin model file parses
and builds the module, and the factor/axis rules cover every adapter axis."""
import os

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import partitioning as nn_partitioning

from tensorpoly_jax import methods
from tensorpoly_jax.methods import AdapterConfig
from tensorpoly_jax.t5 import scoring

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytest.importorskip("t5x", reason="T5X is not installed: pip install --no-deps"
                    " ../shared/wheels/*.whl plus fiddle chex jaxtyping cached-property"
                    " tensorboard grain (.ci/run does; CI runs these tests)")


@pytest.fixture(scope="module")
def bridge():
  from tensorpoly_jax import t5x_bridge

  return t5x_bridge


def _t5x_model(bridge, adapter):
  """T5X's model class as a T5X gin file builds it: vocabularies and an adapters-only optimizer."""
  import seqio
  from t5x import adafactor, optimizers

  adapters_only = optimizers.MultiOptimizer([(
      flax.traverse_util.ModelParamTraversal(bridge.is_adapter_param),
      adafactor.Adafactor(logical_factor_rules=bridge.adapter_factor_rules()))])
  vocabulary = seqio.PassThroughVocabulary(512)
  return bridge.EncoderDecoderModel(bridge.t5_module("tiny", adapter, dtype="float32"),
                                    vocabulary, vocabulary, adapters_only)


def _batch(task_ids):
  rng = np.random.default_rng(0)
  tokens = lambda length: rng.integers(2, 500, (len(task_ids), length)).astype(np.int32)
  targets = tokens(5)
  return {"encoder_input_tokens": tokens(7), "decoder_target_tokens": targets,
          "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
          "decoder_loss_weights": np.ones_like(targets, np.float32),
          "task_id": np.asarray(task_ids, np.int32)[:, None]}


def test_task_ids_and_routing_rng_reach_the_module(bridge):
  adapter = AdapterConfig("poly", lora_rank=2, n_tasks=3, n_skills=4, relaxed_bernoulli=True)
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
  with pytest.raises(NotImplementedError, match="rank classification"):
    model.predict_batch_with_aux(params, batch)
  with pytest.raises(KeyError, match="RoutedEncDecFeatureConverter"):
    model.score_batch(params, {k: v for k, v in batch.items() if k != "task_id"})
  with pytest.raises(NotImplementedError, match="packed examples"):
    model.score_batch(params, {**batch, "encoder_segment_ids": np.ones((4, 7), np.int32)})


def test_gin_model_file_builds_the_adapted_t0_module(bridge):
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(
        [os.path.join(ROOT, "configs", "t5x", "t0_3b_poly.gin")], ["N_TASKS = 36"])
    module = gin.get_configurable(bridge.t5_module)()
    rules = gin.get_configurable(bridge.adapter_factor_rules)()
  finally:
    gin.clear_config()
  assert module.config.emb_dim == 2048 and module.config.num_encoder_layers == 24
  assert not module.config.scan_layers  # restores T5X's per-layer checkpoints
  assert module.config.adapter == AdapterConfig("poly", lora_rank=1, n_skills=8, n_tasks=36)
  assert module.config.dtype == jnp.bfloat16
  assert "skills" in rules


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_rules_cover_every_adapter_axis(bridge, method):
  from t5x import adafactor, partitioning

  adapter = AdapterConfig(method, lora_rank=2, n_tasks=3, n_skills=4,
                          n_splits=2 if method == "mhr" else 1)
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
