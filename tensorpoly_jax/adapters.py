"""Low-rank adapters with latent experts: each maps ``(x, routing weights) -> delta``.

``delta = (x A B) / r`` with ``A: [d_in, r]`` and ``B: [r, d_out]``, either shared by the batch
(LoRA, TLoRA) or mixed per example from a skill inventory by a task router (Poly, MHR,
TensorPoly-I, TensorPoly-II). Tensor adapters build the columns of A and rows of B as entangled
tensors (``entangle.entangle``).

Einsum letters: ``b`` batch, ``t`` tokens, ``d``/``e`` in/out features, ``r`` LoRA rank,
``h`` routing heads (MHR splits), ``n`` tensor order, ``s`` skills (tensor rank), ``q`` leaf size.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning

from tensorpoly_jax import entangle as ent
from tensorpoly_jax.routing import Router, uniform_init

# kaiming_uniform(a=sqrt(5)) as in torch.nn.Linear / the reference LoRA init.
LORA_GAIN = math.sqrt(2.0 / (1.0 + 5.0))


def kaiming_bound(fan_in: int) -> float:
  return LORA_GAIN / math.sqrt(fan_in)


def xavier_bound(shape: tuple[int, ...]) -> float:
  """torch.nn.init.xavier_uniform_ bound: fan_in = dim1·receptive, fan_out = dim0·receptive."""
  receptive = math.prod(shape[2:])
  return math.sqrt(6.0 / (shape[1] * receptive + shape[0] * receptive))


def low_rank_delta(x: jnp.ndarray, lora_a: jnp.ndarray, lora_b: jnp.ndarray) -> jnp.ndarray:
  """``(x A B) / r`` for ``x: [b, t, d]``, with A/B shared (``[d, r]``) or per example (``[b, d, r]``)."""
  rank = lora_a.shape[-1]
  batched = "b" if lora_a.ndim == 3 else ""
  # Scaling the rank-sized hidden rather than the [b, t, d_out] delta keeps the scale off the
  # activation-sized tensor (forward and backward).
  hidden = jnp.einsum(f"btd,{batched}dr->btr", x, lora_a) / rank
  return jnp.einsum(f"btr,{batched}re->bte", hidden, lora_b)


class _Adapter(nn.Module):
  """Fields shared by every adapter; ``in_axis``/``out_axis`` are the frozen kernel's axis names."""

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

  def __call__(self, x, task_ids=None, *, routing_weights=None, deterministic=True):
    ent.check_positive(features=self.features, lora_rank=self.lora_rank)
    tokens = self._flatten_tokens(x)
    lora_a, lora_b = self.factors(tokens.shape[-1], task_ids, routing_weights, deterministic)
    # float32 pair norms would otherwise promote the delta, and the block, out of bf16 compute.
    delta = low_rank_delta(tokens, jnp.asarray(lora_a, self.dtype), jnp.asarray(lora_b, self.dtype))
    return delta.reshape(*x.shape[:-1], self.features)


class _Routed(_Adapter):
  """An adapter whose A and B are mixed per example by a task router (one per layer by default)."""

  n_tasks: int = 1
  n_skills: int = 8
  relaxed_bernoulli: bool = False

  def routing_heads(self) -> int:
    raise NotImplementedError

  def routing(self, task_ids, routing_weights, deterministic):
    """Routing weights ``[b, h, s]``: given (a router shared across layers) or from this layer's."""
    if routing_weights is not None:
      expected = (self.routing_heads(), self.n_skills)
      if routing_weights.shape[1:] != expected:
        raise ValueError(
            f"routing_weights have shape {routing_weights.shape}, expected [B, {expected[0]},"
            f" {expected[1]}] (heads, skills) for {type(self).__name__}."
        )
      return routing_weights
    if task_ids is None:
      raise ValueError(f"{type(self).__name__} routes per task: pass task_ids (int[B]).")
    router = Router(self.n_tasks, self.routing_heads(), self.n_skills,
                    relaxed_bernoulli=self.relaxed_bernoulli, name="router")
    return jnp.asarray(router(task_ids, deterministic=deterministic), self.dtype)


class LoRA(_Adapter):
  """``A: [d_in, r]`` kaiming-uniform, ``B: [r, d_out]`` zeros."""

  @nn.compact
  def factors(self, d_in, task_ids, routing_weights, deterministic):
    lora_a = self._param("lora_a", uniform_init(kaiming_bound(d_in)), (d_in, self.lora_rank),
                         (self.in_axis, "lora_rank"))
    lora_b = self._param("lora_b", nn.initializers.zeros, (self.lora_rank, self.features),
                         ("lora_rank", self.out_axis))
    return lora_a, lora_b


class Poly(_Routed):
  """Poly (``n_splits = 1``) and MHR (``n_splits > 1``): a routed inventory of LoRA skills.

  ``lora_a: [h, s, d_in/h, r]``, ``lora_b: [h, s, r, d_out/h]``; heads split d_in and d_out.
  """

  n_splits: int = 1

  def routing_heads(self):
    return self.n_splits

  @nn.compact
  def factors(self, d_in, task_ids, routing_weights, deterministic):
    ent.check_positive(n_splits=self.n_splits, n_skills=self.n_skills)
    for name, dim in (("d_in", d_in), ("d_out", self.features)):
      if dim % self.n_splits:
        raise ValueError(
            f"{name}={dim} is not divisible by n_splits={self.n_splits}; choose N_SPLITS among"
            f" the divisors of {dim}."
        )
    heads, skills, rank = self.n_splits, self.n_skills, self.lora_rank
    lora_a = self._param("lora_a", uniform_init(kaiming_bound(d_in)),
                         (heads, skills, d_in // heads, rank),
                         ("splits", "skills", self.in_axis, "lora_rank"))
    lora_b = self._param("lora_b", nn.initializers.zeros,
                         (heads, skills, rank, self.features // heads),
                         ("splits", "skills", "lora_rank", self.out_axis))
    weights = self.routing(task_ids, routing_weights, deterministic)
    batch = weights.shape[0]
    mixed_a = jnp.einsum("bhs,hsdr->bhdr", weights, lora_a).reshape(batch, d_in, rank)
    mixed_b = jnp.einsum("bhs,hsre->brhe", weights, lora_b).reshape(batch, rank, self.features)
    return mixed_a, mixed_b


class MHR(Poly):
  """Multi-Head Routing: Poly with ``n_splits`` routing heads."""

  n_splits: int = 4


class _Entangled(nn.Module):
  """The leaves and pair norms of one side (A or B) of a tensor adapter, built into vectors.

  ``leaves: [n, s, r, q]``; ``__call__(routed_leaves=None)`` builds ``[..., s, r, dim]`` from the
  stored leaves or, for TensorPoly-II, from leaves already mixed per example.
  """

  dim: int
  order: int
  tensor_rank: int
  lora_rank: int
  leaf_init: Any
  pair_norm: str
  norm_positions: int  # 0: identity affine (frozen LayerNorm); 1: shared; N/2: one per pair.
  norm_epsilon: float

  def setup(self):
    ent.check_positive(order=self.order, tensor_rank=self.tensor_rank, lora_rank=self.lora_rank)
    ent.check_pair_norm(self.pair_norm, self.order)
    q = ent.leaf_size(self.dim, self.order)
    self.leaves = partitioning.param_with_axes(
        "leaves", self.leaf_init, (self.order, self.tensor_rank, self.lora_rank, q),
        axes=("order", "skills", "lora_rank", "leaf"))
    self.norm_scale = self.norm_bias = None
    if self.pair_norm == "layernorm" and self.norm_positions:
      shape = (self.norm_positions, self.lora_rank, q * q)
      axes = ("order", "lora_rank", "leaf")
      self.norm_scale = partitioning.param_with_axes("norm_scale", nn.initializers.ones, shape,
                                                     axes=axes)
      self.norm_bias = partitioning.param_with_axes("norm_bias", nn.initializers.zeros, shape,
                                                    axes=axes)

  def __call__(self, mix=None):
    """``mix(leaves) -> [..., n, s', r, q]`` routes the leaves before the build (TensorPoly-II)."""
    leaves = self.leaves if mix is None else mix(self.leaves)
    return ent.entangle(leaves, self.dim, self.pair_norm, self.norm_scale, self.norm_bias,
                        self.norm_epsilon)


class _Tensor(_Routed):
  """Fields and leaf construction shared by TLoRA, TensorPoly-I and TensorPoly-II."""

  order: int = 2
  pair_norm: str = "layernorm"
  train_pair_norm: bool = False
  pair_norm_epsilon: float = ent.PAIR_NORM_EPSILON

  def _side(self, name, dim, leaf_init, pair_positions):
    return _Entangled(dim, self.order, self.n_skills, self.lora_rank, leaf_init, self.pair_norm,
                      pair_positions if self.train_pair_norm else 0, self.pair_norm_epsilon,
                      name=name)


class TensorPolyI(_Tensor):
  """Routing over tensor rank: skill ``s`` is the rank-one entangled tensor ``s``.

  ``A_b = Σ_s w[b,0,s] build(a_leaves)[s]ᵀ``, likewise B; one LayerNorm shared by all pairs of a side.
  """

  def routing_heads(self):
    return 1

  def skill_vectors(self, d_in):
    """``[s, r, d_in]``, ``[s, r, d_out]``; both leaf sets uniform(±std) (the reference keeps B non-zero)."""
    leaf_init = uniform_init(kaiming_bound(d_in))
    return (self._side("a", d_in, leaf_init, 1)(), self._side("b", self.features, leaf_init, 1)())

  @nn.compact
  def factors(self, d_in, task_ids, routing_weights, deterministic):
    a_vectors, b_vectors = self.skill_vectors(d_in)
    weights = self.routing(task_ids, routing_weights, deterministic)[:, 0]
    mixed_a = jnp.einsum("bs,srd->bdr", weights, jnp.asarray(a_vectors, self.dtype))
    mixed_b = jnp.einsum("bs,sre->bre", weights, jnp.asarray(b_vectors, self.dtype))
    return mixed_a, mixed_b


class TLoRA(TensorPolyI):
  """LoRA with entangled columns of A and rows of B: ``A = (1/R) Σ_R build(a_leaves)ᵀ`` (no router).

  ``n_skills`` is the tensor rank R here.
  """

  @nn.compact
  def factors(self, d_in, task_ids, routing_weights, deterministic):
    a_vectors, b_vectors = self.skill_vectors(d_in)
    return (jnp.asarray(a_vectors.mean(axis=0).T, self.dtype),
            jnp.asarray(b_vectors.mean(axis=0), self.dtype))


class TensorPolyII(_Tensor):
  """Routing over rank and order: one routing head per order ``n`` mixes that order's leaves.

  ``g_n = Σ_s w[b,n,s] leaves[n,s]`` (times ``Σ_s w[b,n,s]`` when ``scale_by_weight_sum``, the
  reference's first line), then the vector is the tensor product of the routed ``g_n``: a
  non-linear merge of skills. One LayerNorm per pair position (affines frozen unless
  ``train_pair_norm``).
  """

  scale_by_weight_sum: bool = True

  def routing_heads(self):
    return self.order

  @nn.compact
  def factors(self, d_in, task_ids, routing_weights, deterministic):
    weights = self.routing(task_ids, routing_weights, deterministic)  # [b, n, s]

    def mix(leaves):
      routed = jnp.einsum("bns,nsrq->bnrq", weights, jnp.asarray(leaves, self.dtype))
      if self.scale_by_weight_sum:
        routed = routed * weights.sum(axis=-1)[:, :, None, None]
      return routed[:, :, None]  # one rank slot: [b, n, 1, r, q]

    positions = max(1, ent.num_pairs(self.order))
    a_vectors = self._side("a", d_in, _xavier_uniform, positions)(mix)[:, 0]  # [b, r, d_in]
    b_vectors = self._side("b", self.features, _xavier_uniform, positions)(mix)[:, 0]  # [b, r, d_out]
    return jnp.swapaxes(a_vectors, 1, 2), b_vectors


def _xavier_uniform(key, shape, dtype=jnp.float32):
  bound = xavier_bound(shape)
  return jax.random.uniform(key, shape, dtype, -bound, bound)
