"""Adapt one frozen Dense layer with TensorPoly-I on three routing tasks (the README example)."""
import jax
import jax.numpy as jnp
import optax

from tensorpoly_jax import TensorPolyIConfig
from tensorpoly_jax.t5.layers import DenseGeneral

config = TensorPolyIConfig(lora_rank=4, n_tasks=3, tensor_rank=8, order=2, targets=".*")
layer = DenseGeneral(64, kernel_axes=("embed", "mlp"), adapter=config)
x = jax.random.normal(jax.random.PRNGKey(0), (6, 10, 32))  # [batch, tokens, d_in]
task_ids = jnp.array([0, 1, 2, 0, 1, 2])  # each example's routing task
params = layer.init(jax.random.PRNGKey(1), x, task_ids)["params"]
shift = jnp.sin(x[..., :1] * (task_ids[:, None, None] + 1.0))  # a different target per task
targets = x @ params["kernel"] + shift


def loss_fn(adapter):  # only the adapter (leaves + router) trains; the kernel stays frozen
  y = layer.apply({"params": {**params, "adapter": adapter}}, x, task_ids)
  return jnp.mean(jnp.square(y - targets))


optimizer = optax.adam(3e-2)


@jax.jit
def train_step(adapter, opt_state):
  loss, grads = jax.value_and_grad(loss_fn)(adapter)
  updates, opt_state = optimizer.update(grads, opt_state)
  return optax.apply_updates(adapter, updates), opt_state, loss


adapter = params["adapter"]
opt_state = optimizer.init(adapter)
for _ in range(200):
  adapter, opt_state, loss = train_step(adapter, opt_state)
print(f"loss {loss_fn(params['adapter']):.3e} -> {loss_fn(adapter):.3e};"
      f" adapter params per layer: {config.param_count(32, 64)}")
