"""A 4x2 ('data', 'model') mesh over 8 fake CPU devices gives the single-device numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tensorpoly_jax import partitioning
from tensorpoly_jax.adapters import PolyConfig
from tensorpoly_jax.t5.layers import DenseGeneral
from tests.small_adapters import small_adapter

pytestmark = pytest.mark.eight_devices


def loss_fn(layer, params, x, task_ids):
  return jnp.mean(jnp.square(layer.apply({"params": params}, x, task_ids)))


@pytest.mark.parametrize("method", ["lora", "mhr", "tensorpoly_ii"])
def test_sharded_forward_and_grad_equal_single_device(method):
  config = small_adapter(method, lora_rank=2, n_tasks=3, skills=8, targets=".*")
  layer = DenseGeneral(16, kernel_axes=("embed", "mlp"), adapter=config)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 12))
  task_ids = jnp.arange(8) % 3
  variables = layer.init(jax.random.PRNGKey(1), x, task_ids)
  params = jax.tree_util.tree_map(  # non-zero B so the gradient reaches every adapter param
      lambda v: v + 0.1, variables["params"])

  def step(params, x, task_ids):
    return jax.value_and_grad(lambda p: loss_fn(layer, p, x, task_ids))(params)

  single_loss, single_grads = jax.jit(step)(params, x, task_ids)

  mesh = partitioning.make_mesh(model_parallel=2)
  assert mesh.shape == {"data": 4, "model": 2}
  shardings = partitioning.param_shardings(variables, mesh)
  batch = partitioning.batch_sharding(mesh)
  sharded_params = jax.device_put(params, shardings)
  sharded_x, sharded_ids = jax.device_put(x, batch), jax.device_put(task_ids, batch)
  sharded_step = jax.jit(step, in_shardings=(shardings, batch, batch),
                         out_shardings=(partitioning.replicated(mesh), shardings))
  loss, grads = sharded_step(sharded_params, sharded_x, sharded_ids)

  np.testing.assert_allclose(loss, single_loss, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         grads, single_grads)
  kernel = sharded_params["kernel"]
  assert kernel.sharding.spec == PartitionSpec(None, "model")
  assert {s.data.shape for s in kernel.addressable_shards} == {(12, 8)}  # really split in two
  assert sharded_x.sharding == NamedSharding(mesh, PartitionSpec("data"))
  assert {s.data.shape[0] for s in sharded_x.addressable_shards} == {2}
  b_param = sharded_params["adapter"]["lora_b"] if method != "tensorpoly_ii" else None
  if b_param is not None:  # the adapter's d_out axis follows the kernel's 'mlp' -> 'model'
    assert b_param.sharding.spec[-1] == "model"
    assert grads["adapter"]["lora_b"].sharding.spec[-1] == "model"


def test_logical_specs_come_from_params_axes():
  config = PolyConfig(lora_rank=2, n_tasks=3, targets=".*")
  layer = DenseGeneral(16, kernel_axes=("embed", "mlp"), adapter=config)
  variables = layer.init(jax.random.PRNGKey(0), jnp.ones((2, 3, 12)), jnp.array([0, 1]))
  specs = partitioning.logical_specs(variables)
  assert specs["kernel"] == PartitionSpec("embed", "mlp")
  assert specs["adapter"]["lora_a"] == PartitionSpec("splits", "skills", "embed", "lora_rank")
  assert specs["adapter"]["router"]["skill_logits"] == PartitionSpec("tasks", "splits", "skills")


def test_model_parallel_must_divide_devices():
  with pytest.raises(ValueError, match="model_parallel=3 must divide the 8 devices"):
    partitioning.make_mesh(model_parallel=3)


def test_sharded_decoding_equals_single_device():
  """Beam decoding (its cache reordered every step) of a routed model with params and batch on
  the 4x2 mesh."""
  from tensorpoly_jax import decoding
  from tensorpoly_jax.t5.model import EncoderDecoder, abstract_variables, preset

  model = EncoderDecoder(preset("tiny", adapter=small_adapter("poly", n_tasks=3)))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype),
                                  abstract_variables(model)["params"])
  tokens = jnp.asarray(rng.integers(2, 512, (8, 12)), jnp.int32).at[:, 9:].set(0)
  task_ids = jnp.arange(8) % 3
  mesh = partitioning.make_mesh(model_parallel=2)
  shardings = partitioning.param_shardings(abstract_variables(model), mesh)
  batch = partitioning.batch_sharding(mesh)
  config = decoding.DecodeConfig("beam", max_decode_length=6, num_beams=2)
  generate = lambda p, x, ids: decoding.generate(model, p, x, ids, config).tokens
  single = jax.jit(generate)(params, tokens, task_ids)
  sharded = jax.jit(generate, in_shardings=(shardings, batch, batch))(
      jax.device_put(params, shardings), jax.device_put(tokens, batch),
      jax.device_put(task_ids, batch))
  np.testing.assert_array_equal(sharded, single)
  assert sharded.sharding.spec[0] == "data"  # the decoded batch stays split over 'data'
