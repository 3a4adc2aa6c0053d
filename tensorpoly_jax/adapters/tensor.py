"""TLoRA, TensorPoly-I and TensorPoly-II: adapters whose columns of A and rows of B are entangled
tensors (``entangle.entangle``) built from ``leaves: [n, s, r, q]``."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning

from tensorpoly_jax import entangle as ent
from tensorpoly_jax import methods, param_roles
from tensorpoly_jax.adapters.base import Adapter, Routed, kaiming_bound, xavier_uniform
from tensorpoly_jax.routing import uniform_init

param_roles.declare(leaves="leaf", norm_scale="norm", norm_bias="norm")


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


class _Tensor(Adapter):
  """Fields and leaf construction shared by TLoRA, TensorPoly-I and TensorPoly-II."""

  tensor_rank: int = 8
  order: int = 2
  pair_norm: str = "layernorm"
  train_pair_norm: bool = False
  pair_norm_epsilon: float = ent.PAIR_NORM_EPSILON

  def _side(self, name, dim, leaf_init, pair_positions):
    return _Entangled(dim, self.order, self.tensor_rank, self.lora_rank, leaf_init, self.pair_norm,
                      pair_positions if self.train_pair_norm else 0, self.pair_norm_epsilon,
                      name=name)

  def skill_vectors(self, d_in):
    """``[s, r, d_in]``, ``[s, r, d_out]``: rank-one entangled tensors, both leaf sets
    uniform(±std) (the reference keeps B non-zero); one LayerNorm shared by all pairs of a side."""
    leaf_init = uniform_init(kaiming_bound(d_in))
    return (self._side("a", d_in, leaf_init, 1)(), self._side("b", self.features, leaf_init, 1)())


class TLoRA(_Tensor):
  """LoRA with entangled columns of A and rows of B: ``A = (1/R) Σ_R build(a_leaves)ᵀ`` (no router)."""

  @nn.compact
  def factors(self, d_in, task_ids, routing_weights, deterministic):
    a_vectors, b_vectors = self.skill_vectors(d_in)
    return (jnp.asarray(a_vectors.mean(axis=0).T, self.dtype),
            jnp.asarray(b_vectors.mean(axis=0), self.dtype))


class _RoutedTensor(_Tensor, Routed):
  """A tensor adapter whose router picks over the tensor rank."""

  def routed_skills(self):
    return self.tensor_rank


class TensorPolyI(_RoutedTensor):
  """Routing over tensor rank: skill ``s`` is the rank-one entangled tensor ``s``.

  ``A_b = Σ_s w[b,0,s] build(a_leaves)[s]ᵀ``, likewise B.
  """

  def routing_heads(self):
    return 1

  @nn.compact
  def factors(self, d_in, task_ids, routing_weights, deterministic):
    a_vectors, b_vectors = self.skill_vectors(d_in)
    weights = self.routing(task_ids, routing_weights, deterministic)[:, 0]
    mixed_a = jnp.einsum("bs,srd->bdr", weights, jnp.asarray(a_vectors, self.dtype))
    mixed_b = jnp.einsum("bs,sre->bre", weights, jnp.asarray(b_vectors, self.dtype))
    return mixed_a, mixed_b


class TensorPolyII(_RoutedTensor):
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
    a_vectors = self._side("a", d_in, xavier_uniform, positions)(mix)[:, 0]  # [b, r, d_in]
    b_vectors = self._side("b", self.features, xavier_uniform, positions)(mix)[:, 0]  # [b, r, d_out]
    return jnp.swapaxes(a_vectors, 1, 2), b_vectors


@methods.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class TLoRAConfig(methods.TensorFields, methods.AdapterConfig):
  method = "tlora"
  module = TLoRA


@methods.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorPolyIConfig(methods.TensorFields, methods.RoutedConfig):
  """The router picks over the tensor rank (one routing head)."""

  method = "tensorpoly_i"
  module = TensorPolyI

  @property
  def routed_skills(self) -> int:
    return self.tensor_rank


@methods.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorPolyIIConfig(TensorPolyIConfig):
  """One routing head per tensor order."""

  method = "tensorpoly_ii"
  module = TensorPolyII

  @property
  def routing_heads(self) -> int:
    return self.order
