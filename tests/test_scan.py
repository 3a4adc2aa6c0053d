"""Scanned layers (one nn.scan per stack, params stacked on ``layers``) compute what the per-layer
model computes, and params move between the two layouts wherever they are stored."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from tensorpoly_jax import checkpoints, partitioning, pipeline
from tensorpoly_jax.adapters import LoRAConfig, MHRConfig, TensorPolyIIConfig
from tensorpoly_jax.t5 import convert, layers, layout, stack_factors
from tensorpoly_jax.t5.model import EncoderDecoder, RunOptions, abstract_variables, preset
from tests.small_adapters import random_adapter, random_model_params, small_adapter

ADAPTERS = [LoRAConfig(lora_rank=2),
            MHRConfig(lora_rank=2, n_tasks=3, n_skills=4, n_splits=2),
            TensorPolyIIConfig(lora_rank=2, n_tasks=3, tensor_rank=4, order=2)]


def _batch():
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.integers(2, 500, (3, 7)), jnp.int32)
  targets = jnp.asarray(rng.integers(2, 500, (3, 5)), jnp.int32)
  return inputs, targets, jnp.array([0, 2, 1])


def _loss(model, inputs, targets, task_ids):
  def loss(p):
    logits = model.apply({"params": p}, inputs, targets, targets, enable_dropout=False,
                         task_ids=task_ids)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()

  return loss


def _loss_and_grads(model, params, inputs, targets, task_ids):
  loss = _loss(model, inputs, targets, task_ids)
  return jax.jit(jax.value_and_grad(loss))(params)  # one compile, not one per eager op


@pytest.mark.parametrize("adapter,remat", [(ADAPTERS[0], "none"), (ADAPTERS[1], "full"),
                                           (ADAPTERS[2], "dots")],
                         ids=lambda v: getattr(v, "method", v))
def test_scanned_model_equals_per_layer_model(adapter, remat):
  inputs, targets, task_ids = _batch()
  config = preset("tiny", adapter=adapter)
  per_layer = EncoderDecoder(config)
  scanned = EncoderDecoder(config.replace(scan_layers=True, remat=remat))
  params = random_model_params(config)
  stacked = layout.stack_layers(params)
  expected_shapes = jax.tree_util.tree_map(lambda v: v.shape, abstract_variables(scanned)["params"])
  assert jax.tree_util.tree_map(lambda v: v.shape, stacked) == expected_shapes
  loss, grads = _loss_and_grads(per_layer, params, inputs, targets, task_ids)
  scanned_loss, scanned_grads = _loss_and_grads(scanned, stacked, inputs, targets, task_ids)
  # float32 sums in another order: the two agree exactly in float64 (checked when written).
  np.testing.assert_allclose(scanned_loss, loss, rtol=1e-5)
  for path, expected in traverse_util.flatten_dict(layout.stack_layers(grads)).items():
    actual = traverse_util.flatten_dict(scanned_grads)[path]
    np.testing.assert_allclose(actual, expected, atol=2e-3 * np.abs(expected).max() + 1e-9,
                               err_msg="/".join(path))


def _equations(jaxpr, in_scan=False):
  """``(equation, inside a scan body)`` for every equation of ``jaxpr`` and its sub-jaxprs."""
  for eqn in jaxpr.eqns:
    yield eqn, in_scan
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _equations(sub, in_scan or eqn.primitive.name == "scan")


def _casts_to(dtype, jaxpr):
  """``(operand shape, inside a scan body)`` of every float32 -> ``dtype`` conversion."""
  for eqn, in_scan in _equations(jaxpr):
    if (eqn.primitive.name == "convert_element_type" and eqn.params["new_dtype"] == dtype
        and eqn.invars[0].aval.dtype == jnp.float32):
      yield eqn.invars[0].aval.shape, in_scan


@pytest.mark.parametrize("method,scan_layers", [
    ("tlora", False), ("poly", True), ("tensorpoly_ii", False)], ids=str)
def test_factors_built_before_the_blocks_equal_each_layers_own(method, scan_layers):
  """The stack's one vectorized build of every layer's factors (the default) against each
  adapted layer building its own inside its block: same loss and gradients, and the routers run
  once per adapted projection for all layers, outside the scanned body."""
  inputs, targets, task_ids = _batch()
  config = preset("tiny", adapter=small_adapter(method), scan_layers=scan_layers,
                  remat="full" if scan_layers else "none")
  params = random_model_params(config.replace(scan_layers=False))
  params = layout.stack_layers(params) if scan_layers else params

  def step(model):
    """``((loss, grads), (sigmoids inside a scan body, outside))`` of one traced step."""
    traced = jax.jit(jax.value_and_grad(_loss(model, inputs, targets, task_ids))).trace(params)
    routers = [in_scan for eqn, in_scan in _equations(traced.jaxpr.jaxpr)
               if eqn.primitive.name == "logistic"]
    return traced.lower().compile()(params), (routers.count(True), routers.count(False))

  (loss, grads), (hoisted_in_scan, hoisted_outside) = step(EncoderDecoder(config))
  (expected_loss, expected_grads), in_blocks = step(
      EncoderDecoder(config.replace(hoist_factors=False)))
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  expected_grads = traverse_util.flatten_dict(expected_grads)
  for path, grad in traverse_util.flatten_dict(grads).items():
    np.testing.assert_allclose(grad, expected_grads[path],
                               atol=1e-5 * np.abs(expected_grads[path]).max() + 1e-12,
                               err_msg="/".join(path))
  if method == "tlora":  # no router
    return
  assert hoisted_in_scan == 0 and hoisted_outside > 0
  if not scan_layers:  # every projection's router once for all its layers, not once per layer
    assert hoisted_outside * config.num_encoder_layers == sum(in_blocks)


def test_routers_sample_per_layer_when_factors_are_built_before_the_blocks():
  inputs, targets, task_ids = _batch()
  config = preset("tiny", adapter=small_adapter("poly", relaxed_bernoulli=True))
  model, params = EncoderDecoder(config), random_model_params(config)

  @functools.partial(jax.jit, static_argnums=1)
  def logits(seed, enable_dropout=True):
    return model.apply({"params": params}, inputs, targets, targets, enable_dropout=enable_dropout,
                       task_ids=task_ids, rngs={"routing": jax.random.PRNGKey(seed)})

  np.testing.assert_array_equal(logits(0), logits(0))
  assert not np.allclose(logits(0), logits(1))
  np.testing.assert_array_equal(logits(0, False), logits(1, False))  # sigmoid weights in eval
  # Two layers with the same params: equal factors in eval, each its own sample in training.
  layer = params["encoder"]["layers_0"]
  build = jax.jit(functools.partial(stack_factors.per_layer, config.adapter, jnp.float32,
                                    [layer, layer], layers.Routing(task_ids)),
                  static_argnames="deterministic")
  first, second = build(deterministic=True)
  jax.tree_util.tree_map(np.testing.assert_array_equal, first, second)
  first, second = build(deterministic=False, routing_rng=jax.random.PRNGKey(0))
  factor = lambda built: built["mlp"]["wo"]["adapter"]["lora_a"]
  assert factor(first).shape == (3, config.mlp_dim, 2)
  assert not np.allclose(factor(first), factor(second))


def test_scanned_lora_factors_are_cast_to_bf16_once_for_all_layers():
  inputs, targets, task_ids = _batch()
  config = preset("tiny", adapter=ADAPTERS[0], dtype=jnp.bfloat16)
  scanned = EncoderDecoder(config.replace(scan_layers=True, remat="full"))
  stacked = layout.stack_layers(random_model_params(config))
  is_factor = lambda path: path[-1] in ("lora_a", "lora_b")
  # The reference gets its factors in bf16 already: no cast of them anywhere in its step.
  in_bf16 = traverse_util.unflatten_dict({
      path: value.astype(jnp.bfloat16) if is_factor(path) else value
      for path, value in traverse_util.flatten_dict(stacked).items()})
  loss, grads = _loss_and_grads(scanned, stacked, inputs, targets, task_ids)
  expected_loss, expected_grads = _loss_and_grads(scanned, in_bf16, inputs, targets, task_ids)
  assert loss == expected_loss
  expected_grads = traverse_util.flatten_dict(expected_grads)
  for path, grad in traverse_util.flatten_dict(grads).items():
    assert grad.dtype == jnp.float32
    np.testing.assert_array_equal(grad, expected_grads[path].astype(jnp.float32))
  factors = {v.shape for p, v in traverse_util.flatten_dict(stacked).items() if is_factor(p)}
  jaxpr = jax.make_jaxpr(lambda p: _loss_and_grads(scanned, p, inputs, targets, task_ids))(stacked)
  casts = list(_casts_to(jnp.bfloat16, jaxpr.jaxpr))
  assert not [shape for shape, in_scan in casts if in_scan and shape in {f[1:] for f in factors}]
  assert {shape for shape, in_scan in casts if not in_scan} >= factors


def test_layout_round_trip_and_logical_axes():
  config = preset("tiny", adapter=ADAPTERS[2])
  params = random_model_params(config)
  stacked = layout.stack_layers(params)
  assert layout.is_scanned(stacked) and not layout.is_scanned(params)
  assert layout.to_layout(stacked, True) is stacked
  jax.tree_util.tree_map(np.testing.assert_array_equal, layout.unstack_layers(stacked), params)
  specs = traverse_util.flatten_dict(partitioning.logical_specs(
      abstract_variables(EncoderDecoder(config.replace(scan_layers=True)))))
  assert specs[("encoder", "layers", "mlp", "wi_0", "kernel")] == P("layers", "embed", "mlp")
  router = ("decoder", "layers", "mlp", "wo", "adapter", "router", "skill_logits")
  assert specs[router] == P("layers", "tasks", "splits", "skills")
  assert specs[("encoder", "relpos_bias", "rel_embedding")] == P("heads", "relpos_buckets")


def test_scanned_layers_refuse_per_layer_targets():
  with pytest.raises(ValueError, match="name single layers.*scan_layers=False"):
    preset("tiny", scan_layers=True,
           adapter=LoRAConfig(targets=r"encoder/layers_0/attention/query"))
  with pytest.raises(ValueError, match="remat='some'.*choose one of"):
    preset("tiny", remat="some")
  assert preset("t0_3b").scan_layers and not preset("t5_1_1_large").scan_layers


def test_converted_backbone_restores_onto_the_mesh_in_either_layout(tmp_path):
  model = EncoderDecoder(preset("tiny"))
  host = pipeline.init_params(model, 0, adapters_only=False)
  convert.save_converted(str(tmp_path), model.config, host)
  mesh = partitioning.make_mesh(2 if jax.device_count() % 2 == 0 else 1)
  backbone = pipeline.load_backbone(str(tmp_path), RunOptions(scan_layers=True), mesh)
  assert backbone.config.scan_layers
  expected = layout.stack_layers(jax.device_get(host))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                         backbone.params, expected)
  kernel = backbone.params["encoder"]["layers"]["mlp"]["wi_0"]["kernel"]
  assert isinstance(kernel, jax.Array) and kernel.sharding.mesh.shape == mesh.shape
  assert kernel.sharding.spec == P(None, None, "model")  # 'mlp' over the model axis
  # A checkpoint of a newer layout reads back in the old one too.
  convert.save_converted(str(tmp_path / "scanned"), backbone.config, backbone.params)
  config, params = convert.load_converted(str(tmp_path / "scanned"), scan_layers=False)
  assert not config.scan_layers
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, jax.device_get(host))


def test_an_adapter_trained_scanned_is_exported_per_layer(tmp_path):
  config = preset("tiny", adapter=ADAPTERS[1])
  adapter_params = random_adapter(config)
  export = checkpoints.export_adapter(str(tmp_path), "adapter",
                                      layout.stack_layers(adapter_params), {"stage": "test"})
  loaded, _ = checkpoints.load_adapter(export)
  assert not layout.is_scanned(loaded)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, jax.device_get(adapter_params))
