"""Poly and MHR: a routed inventory of ``S`` LoRA skills, mixed per example by a task router;
MHR splits the features into ``H`` heads, each routed on its own."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import linen as nn

from tensorpoly_jax import entangle as ent
from tensorpoly_jax import methods
from tensorpoly_jax.adapters.base import Routed, kaiming_bound
from tensorpoly_jax.routing import uniform_init


class Poly(Routed):
  """``lora_a: [h, s, d_in/h, r]``, ``lora_b: [h, s, r, d_out/h]``; heads split d_in and d_out
  (``n_splits = 1`` for Poly)."""

  n_skills: int = 8
  n_splits: int = 1

  def routing_heads(self):
    return self.n_splits

  def routed_skills(self):
    return self.n_skills

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


@methods.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class PolyConfig(methods.RoutedConfig):
  """``n_skills`` LoRA skills; one routing head."""

  method = "poly"
  module = Poly

  n_skills: int = 8

  def __post_init__(self):
    super().__post_init__()
    ent.check_positive(n_skills=self.n_skills)

  @property
  def routed_skills(self) -> int:
    return self.n_skills


@methods.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class MHRConfig(PolyConfig):
  """``n_splits >= 2`` routing heads, each over a slice of the features."""

  method = "mhr"
  module = MHR

  n_splits: int = 8

  def __post_init__(self):
    super().__post_init__()
    ent.check_positive(n_splits=self.n_splits)
    if self.n_splits < 2:
      raise ValueError(f"mhr needs n_splits >= 2 routing heads, got {self.n_splits}; use poly for 1.")

  @property
  def routing_heads(self) -> int:
    return self.n_splits
