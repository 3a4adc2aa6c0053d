"""Every adapted layer's factors of a stack, built before its blocks run: one vectorized pass
(``jax.vmap`` over the layers) per adapted projection instead of one build per layer.

Router weights, entangled vectors and the per-example mix do not depend on activations. Built
inside the blocks they are a few dozen small ops per layer in the forward pass, twice that in the
backward, and once more under remat; built here they run once per step for all layers, and the
blocks read the result from the ``FACTORS`` collection (``Adapter.__call__``).

Stacked factors are ``{path in a block: {"lora_a": [L, ...], "lora_b": [L, ...]}}``, the path
ending in the adapter's name.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import unfreeze

from tensorpoly_jax.methods import AdapterConfig
from tensorpoly_jax.routing import ROUTING_RNG

Path = tuple[str, ...]


def _adapter_roots(flat_params: dict[Path, Any]) -> list[Path]:
  """Paths of the adapter modules in a block's flat params, in path order."""
  return sorted({path[:path.index("adapter") + 1] for path in flat_params if "adapter" in path})


def _subtree(flat_params: dict[Path, Any], root: Path) -> dict:
  return traverse_util.unflatten_dict({path[len(root):]: value for path, value in flat_params.items()
                                      if path[:len(root)] == root})


def _build(adapter: AdapterConfig, dtype, root: Path, adapter_params,
           kernel_shape: tuple[int, int], routing, deterministic: bool, layer_keys,
           rematerialize: bool) -> dict | None:
  """``{"lora_a": [L, ...], "lora_b": [L, ...]}`` of the adapter at ``root`` from its params
  stacked over ``L`` layers, or ``None`` where each layer should build its own: the factors are its
  params (LoRA) or it routes per token (Arrow). ``kernel_shape``: the adapted projection's
  ``(d_in, d_out)``; ``layer_keys``: one routing key per layer (``None``: the routers draw
  nothing); ``rematerialize``: the backward pass rebuilds the factors from the params rather than
  keep the build's intermediates (outer products, pair norms: float32, every layer's) from the
  forward pass."""
  d_in, d_out = kernel_shape
  module = adapter.build(d_out, dtype=dtype)
  if not module.caches_factors or getattr(module, "arrow_top_k", 0):
    return None

  def build_one(params, key):
    rngs = None if key is None else {ROUTING_RNG: key}
    return module.apply({"params": params}, d_in, routing.task_ids, routing.weights, deterministic,
                        method="factors", rngs=rngs)

  build = jax.vmap(build_one, in_axes=(0, None if layer_keys is None else 0))
  if rematerialize:
    build = jax.checkpoint(build, policy=jax.checkpoint_policies.nothing_saveable)
  with jax.named_scope("/".join(root)):  # profiles and HLO op paths name the adapter's layer
    lora_a, lora_b = build(adapter_params, layer_keys)
  return {"lora_a": lora_a, "lora_b": lora_b}


def _layer_keys(routing_rng, position: int, layers: int):
  """Distinct routing keys for every layer of every adapter position."""
  if routing_rng is None:
    return None
  return jax.random.split(jax.random.fold_in(routing_rng, position), layers)


def stacked(adapter: AdapterConfig, dtype, stack_params, routing, deterministic: bool,
            routing_rng=None, rematerialize: bool = False) -> dict:
  """The factors of every adapter in a scanned stack's params (leaves ``[L, ...]``), as a block's
  ``FACTORS`` collection with a leading layers axis (arguments: ``_build``'s)."""
  flat = traverse_util.flatten_dict(unfreeze(stack_params))
  factors = {}
  for position, root in enumerate(_adapter_roots(flat)):
    layers, *kernel_shape = flat[root[:-1] + ("kernel",)].shape
    built = _build(adapter, dtype, root, _subtree(flat, root), tuple(kernel_shape), routing,
                   deterministic, _layer_keys(routing_rng, position, layers), rematerialize)
    for name, factor in (built or {}).items():
      factors[root + (name,)] = factor
  return traverse_util.unflatten_dict(factors)


def per_layer(adapter: AdapterConfig, dtype, layer_params: list, routing, deterministic: bool,
              routing_rng=None, rematerialize: bool = False) -> list[dict]:
  """``stacked`` for per-layer params (one tree per block): each adapter position's params are
  stacked over the layers that have it, built at once, and handed back as one ``FACTORS``
  collection per block."""
  flat_layers = [traverse_util.flatten_dict(unfreeze(params)) for params in layer_params]
  per_block = [{} for _ in layer_params]
  roots = sorted({root for flat in flat_layers for root in _adapter_roots(flat)})
  for position, root in enumerate(roots):
    having = [index for index, flat in enumerate(flat_layers)
              if any(path[:len(root)] == root for path in flat)]
    adapter_params = jax.tree_util.tree_map(
        lambda *leaves: jnp.stack(leaves), *(_subtree(flat_layers[index], root) for index in having))
    kernel_shape = flat_layers[having[0]][root[:-1] + ("kernel",)].shape
    built = _build(adapter, dtype, root, adapter_params, kernel_shape, routing, deterministic,
                   _layer_keys(routing_rng, position, len(having)), rematerialize)
    for name, factor in (built or {}).items():
      # One split, whose gradient is one concatenation; indexing each layer would pad every
      # layer's gradient to the stacked shape and sum them.
      for index, layer_factor in zip(having, jnp.split(factor, len(having))):
        per_block[index][root + (name,)] = layer_factor[0]
  return [traverse_util.unflatten_dict(flat) for flat in per_block]
