"""What every adapter module shares: ``(x, routing weights) -> delta``.

``delta = (x A B) / r`` with ``A: [d_in, r]`` and ``B: [r, d_out]``, either shared by the batch
(LoRA, TLoRA) or mixed per example from a skill inventory by a task router (Poly, MHR,
TensorPoly-I, TensorPoly-II).

Einsum letters: ``b`` batch, ``t`` tokens, ``d``/``e`` in/out features, ``r`` LoRA rank,
``h`` routing heads (MHR splits), ``n`` tensor order, ``s`` skills (tensor rank), ``q`` leaf size.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning

from tensorpoly_jax import arrow
from tensorpoly_jax import entangle as ent
from tensorpoly_jax.routing import Router

# The collection a model puts an adapter's factors in when it builds them before the layer runs
# (``tensorpoly_jax.t5.stack_factors``); the adapter reads them from it instead of building them.
FACTORS = "adapter_factors"

# kaiming_uniform(a=sqrt(5)) as in torch.nn.Linear / the reference LoRA init.
LORA_GAIN = math.sqrt(2.0 / (1.0 + 5.0))


def kaiming_bound(fan_in: int) -> float:
  return LORA_GAIN / math.sqrt(fan_in)


def xavier_uniform(key, shape, dtype=jnp.float32):
  """torch.nn.init.xavier_uniform_: fan_in = dim1·receptive, fan_out = dim0·receptive."""
  receptive = math.prod(shape[2:])
  bound = math.sqrt(6.0 / (shape[1] * receptive + shape[0] * receptive))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def low_rank_delta(x: jnp.ndarray, lora_a: jnp.ndarray, lora_b: jnp.ndarray) -> jnp.ndarray:
  """``(x A B) / r`` for ``x: [b, t, d]``, with A/B shared (``[d, r]``) or per example (``[b, d, r]``)."""
  rank = lora_a.shape[-1]
  # Scaling the rank-sized hidden rather than the [b, t, d_out] delta keeps the scale off the
  # activation-sized tensor (forward and backward).
  if lora_a.ndim == 2:
    # Shared factors contract [b·t, d] tokens as one matrix: XLA:CPU runs the 3-D "btd,dr" and
    # its weight gradient (a contraction over both b and t) at about half the speed (one LoRA
    # layer's step, T5-small's FFN shape: 1.6x the frozen layer's time 3-D, 1.15x flat).
    tokens = x.reshape(-1, x.shape[-1])
    hidden = (tokens @ lora_a) / rank
    return (hidden @ lora_b).reshape(*x.shape[:-1], lora_b.shape[-1])
  hidden = jnp.einsum("btd,bdr->btr", x, lora_a) / rank
  return jnp.einsum("btr,bre->bte", hidden, lora_b)


class Adapter(nn.Module):
  """Fields shared by every adapter; ``in_axis``/``out_axis`` are the frozen kernel's axis names.

  Subclasses implement ``factors(d_in, task_ids, routing_weights, deterministic) -> (A, B)``;
  where the collection ``FACTORS`` holds ``lora_a``/``lora_b`` (built by the model for every
  layer at once), the adapter uses those instead.
  ``decode``: the factors are built once, for the batch's tasks, on the call that creates the
  ``cache`` collection, and read from it at every later decoding step (``caches_factors``).
  """

  # Off where the factors are the params themselves (LoRA): a cached or prebuilt copy would cost
  # memory only.
  caches_factors: ClassVar[bool] = True

  features: int
  lora_rank: int = 16
  in_axis: str = "embed"
  out_axis: str = "embed"
  dtype: Any = jnp.float32

  def _param(self, name, init, shape, axes):
    return jnp.asarray(partitioning.param_with_axes(name, init, shape, axes=axes), self.dtype)

  def _flatten_tokens(self, x):
    """[b, ..., d] -> [b, t, d]; the leading axis is the batch that task ids index."""
    return jnp.asarray(x, self.dtype).reshape(x.shape[0], -1, x.shape[-1])

  def __call__(self, x, task_ids=None, *, routing_weights=None, deterministic=True, decode=False):
    ent.check_positive(features=self.features, lora_rank=self.lora_rank)
    tokens = self._flatten_tokens(x)
    if self.has_variable(FACTORS, "lora_a"):
      lora_a, lora_b = self.get_variable(FACTORS, "lora_a"), self.get_variable(FACTORS, "lora_b")
    elif decode and self.caches_factors:
      lora_a, lora_b = self._decoding_factors(tokens, task_ids, routing_weights)
    else:
      lora_a, lora_b = self.factors(tokens.shape[-1], task_ids, routing_weights, deterministic)
    # float32 pair norms would otherwise promote the delta, and the block, out of bf16 compute.
    delta = low_rank_delta(tokens, jnp.asarray(lora_a, self.dtype), jnp.asarray(lora_b, self.dtype))
    return delta.reshape(*x.shape[:-1], self.features)

  def _decoding_factors(self, tokens, task_ids, routing_weights):
    """Per-example ``A: [b, d_in, r]``, ``B: [b, r, d_out]`` from the ``cache`` collection, where
    they are put on its first call (per example so that beam search can reorder them)."""
    if self.has_variable("cache", "lora_a"):
      return self.get_variable("cache", "lora_a"), self.get_variable("cache", "lora_b")
    batch = tokens.shape[0]
    per_example = lambda factor: (factor if factor.ndim == 3
                                  else jnp.broadcast_to(factor, (batch, *factor.shape)))
    lora_a, lora_b = (per_example(f) for f in self.factors(tokens.shape[-1], task_ids,
                                                           routing_weights, True))
    self.put_variable("cache", "lora_a", lora_a)
    self.put_variable("cache", "lora_b", lora_b)
    return lora_a, lora_b


class Routed(Adapter):
  """An adapter whose A and B are mixed per example by a task router (one per layer by default).

  Subclasses say how many routing heads and skills the router has. ``arrow_top_k > 0`` routes
  each token instead, to its ``arrow_top_k`` skills by Arrow's prototypes (``arrow``): task ids
  and routing weights are then ignored, and the router's rows are kept in the params only so that
  an Arrow model reads the task-routed model's params.
  """

  n_tasks: int = 1
  relaxed_bernoulli: bool = False
  arrow_top_k: int = 0

  def __call__(self, x, task_ids=None, *, routing_weights=None, deterministic=True, decode=False):
    if not self.arrow_top_k:
      return super().__call__(x, task_ids, routing_weights=routing_weights,
                              deterministic=deterministic, decode=decode)
    if self.is_initializing():  # declares every param of the task-routed adapter, router included
      super().__call__(x, task_ids, routing_weights=routing_weights, deterministic=deterministic)
    tokens = self._flatten_tokens(x)
    skill_a, skill_b = (jnp.asarray(f, self.dtype) for f in self.skills(tokens.shape[-1]))
    weights = arrow.token_weights(
        tokens, arrow.prototypes(skill_a, skill_b, self.routing_heads()), self.arrow_top_k)
    delta = arrow.token_routed_delta(tokens, skill_a, skill_b, weights)
    return delta.reshape(*x.shape[:-1], self.features)

  def skills(self, d_in):
    """Each skill's factors, ``A_s: [s, d_in, r]`` and ``B_s: [s, r, d_out]``: what the adapter
    builds for routing weights one-hot on skill ``s`` in every head."""
    one_hot = jnp.broadcast_to(jnp.eye(self.routed_skills())[:, None, :],
                               (self.routed_skills(), self.routing_heads(), self.routed_skills()))
    return self.factors(d_in, None, one_hot, True)

  def routing_heads(self) -> int:
    raise NotImplementedError

  def routed_skills(self) -> int:
    raise NotImplementedError

  def routing(self, task_ids, routing_weights, deterministic):
    """Routing weights ``[b, h, s]``: given (a router shared across layers) or from this layer's."""
    if routing_weights is not None:
      expected = (self.routing_heads(), self.routed_skills())
      if routing_weights.shape[1:] != expected:
        raise ValueError(
            f"routing_weights have shape {routing_weights.shape}, expected [B, {expected[0]},"
            f" {expected[1]}] (heads, skills) for {type(self).__name__}."
        )
      return routing_weights
    if task_ids is None:
      raise ValueError(f"{type(self).__name__} routes per task: pass task_ids (int[B]).")
    router = Router(self.n_tasks, self.routing_heads(), self.routed_skills(),
                    relaxed_bernoulli=self.relaxed_bernoulli, name="router")
    return jnp.asarray(router(task_ids, deterministic=deterministic), self.dtype)
