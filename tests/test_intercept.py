"""inject_adapters: adapters added at call time to our T5 and to a Flax model written here."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from tensorpoly_jax.adapters import LoRAConfig, PolyConfig
from tensorpoly_jax.intercept import inject_adapters
from tensorpoly_jax.t5.model import EncoderDecoder, preset
from tests.small_adapters import small_adapter


def _tokens(seed, shape):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 1, 512)


@pytest.mark.parametrize("method", ["poly", "tensorpoly_ii"])
def test_injected_t5_equals_t5_built_with_the_adapter(method):
  adapter = small_adapter(method, lora_rank=2, n_tasks=3, skills=4, order=2)
  small = dict(num_encoder_layers=1, num_decoder_layers=1)
  built = EncoderDecoder(preset("tiny", adapter=adapter, **small))
  plain = EncoderDecoder(preset("tiny", **small))
  inputs, targets = _tokens(0, (4, 12)), _tokens(1, (4, 6))
  task_ids = jnp.array([0, 2, 1, 2])

  def run(model, inject):
    def init_and_apply(rng):
      variables = model.init(rng, inputs, targets, targets, enable_dropout=False,
                             task_ids=task_ids)
      # Non-zero B (init is zero) so the adapters change the logits.
      params = jax.tree_util.tree_map_with_path(
          lambda path, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(path) else x,
          variables["params"])
      logits = model.apply({"params": params}, inputs, targets, targets, enable_dropout=False,
                           task_ids=task_ids)
      return params, logits

    if not inject:
      return init_and_apply(jax.random.PRNGKey(0))
    with inject_adapters(adapter, task_ids):
      return init_and_apply(jax.random.PRNGKey(0))

  built_params, built_logits = run(built, inject=False)
  injected_params, injected_logits = run(plain, inject=True)
  flat_built = traverse_util.flatten_dict(built_params)
  flat_injected = traverse_util.flatten_dict(injected_params)
  assert flat_injected.keys() == flat_built.keys()
  assert sum("adapter" in k for k in flat_injected) >= 18  # 7 encoder + 11 decoder projections
  for key, value in flat_built.items():
    np.testing.assert_array_equal(flat_injected[key], value, err_msg="/".join(key))
  np.testing.assert_allclose(injected_logits, built_logits, rtol=1e-6, atol=1e-6)
  backbone = {k: v for k, v in flat_built.items() if "adapter" not in k}
  no_adapter = plain.apply({"params": traverse_util.unflatten_dict(backbone)}, inputs, targets,
                           targets, enable_dropout=False)
  assert not np.allclose(no_adapter, built_logits, atol=1e-4)


class Tower(nn.Module):
  """A Flax model with no adapter support: multi-axis DenseGeneral projections and a Dense head."""

  @nn.compact
  def __call__(self, x):  # [b, t, 6]
    heads = nn.relu(nn.DenseGeneral((2, 4), name="split")(x))  # [b, t, 2, 4]
    merged = nn.DenseGeneral(5, axis=(-2, -1), name="merge")(heads)  # [b, t, 5]
    return nn.Dense(3, name="head")(merged)


def test_lora_injected_into_a_flax_model_matches_numpy():
  adapter = LoRAConfig(lora_rank=2, targets=r"split|merge")
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (2, 3, 6)))
  with inject_adapters(adapter):
    params = Tower().init(jax.random.PRNGKey(0), x)["params"]
  assert set(params["split"]) == {"kernel", "bias", "adapter"}
  assert set(params["head"]) == {"kernel", "bias"}  # not a target
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda v: np.asarray(v) + rng.normal(0, 0.1, v.shape), params)
  with inject_adapters(adapter):
    ours = Tower().apply({"params": params}, x)

  def dense(p, inputs):  # inputs [..., d_in] with the kernel flattened to [d_in, d_out]
    kernel = p["kernel"].reshape(inputs.shape[-1], -1)
    out = inputs @ kernel + p["bias"].reshape(-1)
    if "adapter" in p:
      out = out + inputs @ p["adapter"]["lora_a"] @ p["adapter"]["lora_b"] / 2  # rank 2
    return out

  heads = np.maximum(dense(params["split"], x), 0)  # flat [b, t, 8] == [b, t, 2, 4] row-major
  expected = dense(params["head"], dense(params["merge"], heads))
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_routed_adapter_needs_task_ids_and_a_plain_model():
  x = jnp.ones((2, 3, 6))
  with pytest.raises(ValueError, match="pass task_ids"):
    with inject_adapters(PolyConfig(n_tasks=2, targets="split")):
      Tower().init(jax.random.PRNGKey(0), x)
  adapter = LoRAConfig(lora_rank=2, targets=".*attention/query")
  model = EncoderDecoder(preset("tiny", adapter=adapter))
  tokens = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="already carries an adapter"):
    with inject_adapters(adapter):
      jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                                        enable_dropout=False))
