"""One config object picks an adapter method, builds its layers and counts its parameters."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax.numpy as jnp

from tensorpoly_jax import adapters
from tensorpoly_jax import entangle as ent

METHODS = {
    "lora": adapters.LoRA,
    "tlora": adapters.TLoRA,
    "poly": adapters.Poly,
    "mhr": adapters.MHR,
    "tensorpoly_i": adapters.TensorPolyI,
    "tensorpoly_ii": adapters.TensorPolyII,
}
ROUTED = ("poly", "mhr", "tensorpoly_i", "tensorpoly_ii")
TENSOR = ("tlora", "tensorpoly_i", "tensorpoly_ii")
# The reference adapts self-/cross-attention q, k, v, o and the FFN (T5X layer names).
DEFAULT_TARGETS = r".*(attention|mlp)/(query|key|value|out|wi_0|wi_1|wi|wo)"


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Which adapter to put on which layers, with its sizes.

  ``n_skills`` is the skill inventory S, which is the tensor rank R for the tensor methods;
  ``n_splits`` is MHR's routing heads H; ``order`` is the tensor order N.
  ``train_pair_norm`` makes the pair LayerNorms' affines trainable; the reference's released
  configs (``*_lora_sota.json``) and the paper's parameter counts keep them frozen for every
  method, which is the default. ``pair_norm_epsilon`` is the pair LayerNorm's eps (the reference's
  1e-5 by default; ``entangle.entangle`` says why it matters at small widths).
  ``shared_router`` routes every layer with one router (the reference has one per layer).
  """

  method: str = "lora"
  lora_rank: int = 16
  n_tasks: int = 1
  n_skills: int = 8
  n_splits: int = 1
  order: int = 2
  pair_norm: str = "layernorm"
  train_pair_norm: bool = False
  pair_norm_epsilon: float = ent.PAIR_NORM_EPSILON
  relaxed_bernoulli: bool = False
  shared_router: bool = False
  targets: str = DEFAULT_TARGETS

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"adapter method {self.method!r} is unknown; choose one of {sorted(METHODS)}.")
    ent.check_positive(lora_rank=self.lora_rank, n_tasks=self.n_tasks, n_skills=self.n_skills,
                       n_splits=self.n_splits, order=self.order)
    if self.method == "mhr" and self.n_splits < 2:
      raise ValueError(f"mhr needs n_splits >= 2 routing heads, got {self.n_splits}; use poly for 1.")
    if self.method in ("lora", "poly") and self.n_splits != 1:
      raise ValueError(f"{self.method} has one routing head; n_splits={self.n_splits} is for mhr.")
    if self.method in TENSOR:
      ent.check_pair_norm(self.pair_norm, self.order)
      if not self.pair_norm_epsilon > 0:
        raise ValueError(f"pair_norm_epsilon must be > 0, got {self.pair_norm_epsilon}.")
    try:
      re.compile(self.targets)
    except re.error as err:
      raise ValueError(f"targets={self.targets!r} is not a valid regex: {err}") from None

  @property
  def routed(self) -> bool:
    return self.method in ROUTED

  @property
  def routing_heads(self) -> int:
    return {"mhr": self.n_splits, "tensorpoly_ii": self.order}.get(self.method, 1)

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.targets, path) is not None

  def build(self, features: int, in_axis: str = "embed", out_axis: str = "embed",
            dtype: Any = jnp.float32, name: str | None = None):
    """The adapter module for one layer with ``features`` outputs."""
    kwargs = dict(features=features, lora_rank=self.lora_rank, in_axis=in_axis,
                  out_axis=out_axis, dtype=dtype, name=name)
    if self.method != "lora":
      kwargs.update(n_tasks=self.n_tasks, n_skills=self.n_skills,
                    relaxed_bernoulli=self.relaxed_bernoulli)
    if self.method == "mhr":
      kwargs.update(n_splits=self.n_splits)
    if self.method in TENSOR:
      kwargs.update(order=self.order, pair_norm=self.pair_norm,
                    train_pair_norm=self.train_pair_norm,
                    pair_norm_epsilon=self.pair_norm_epsilon)
    return METHODS[self.method](**kwargs)

  def dense_delta(self, inputs, contracted_axes: tuple[int, ...], outputs_shape: tuple[int, ...],
                  kernel_axes: tuple[str, ...] = (), dtype: Any = jnp.float32, task_ids=None,
                  routing_weights=None, deterministic: bool = True):
    """The adapter's ``delta`` (shaped like the projection's outputs) for a dense projection that
    contracts ``inputs`` over ``contracted_axes``; call it inside that projection's module, where
    it creates the adapter as a submodule named ``adapter``.

    ``inputs: [kept..., contracted...]`` is flattened to ``[kept..., d_in]``; ``delta:
    [kept..., d_out]`` is reshaped to ``outputs_shape`` (``kept + features``). ``kernel_axes``
    (the kernel's logical axes, T5X style) give the adapter params' in and out axis names.
    """
    kept = [ax for ax in range(inputs.ndim) if ax not in contracted_axes]
    flat_inputs = jnp.transpose(inputs, kept + list(contracted_axes)).reshape(
        *(inputs.shape[ax] for ax in kept), -1)
    d_out = math.prod(outputs_shape[len(kept):])
    in_axis, out_axis = (kernel_axes[0], kernel_axes[-1]) if kernel_axes else ("embed", "embed")
    delta = self.build(d_out, in_axis, out_axis, dtype, name="adapter")(
        flat_inputs, task_ids, routing_weights=routing_weights, deterministic=deterministic)
    return delta.reshape(outputs_shape)

  def router_param_count(self) -> int:
    """One router's skill logits, ``T·H·S`` (per layer, or once when ``shared_router``)."""
    return self.n_tasks * self.routing_heads * self.n_skills if self.routed else 0

  def param_count(self, d_in: int, d_out: int) -> dict[str, int]:
    """Trainable parameters of one adapted ``d_in -> d_out`` layer, by SPEC's formulas."""
    r, s, n = self.lora_rank, self.n_skills, self.order
    counts = {"adapter": 0, "router": 0, "pair_norm": 0}
    if self.method == "lora":
      counts["adapter"] = r * (d_in + d_out)
    elif self.method in ("poly", "mhr"):
      counts["adapter"] = s * r * (d_in + d_out)
    else:
      q_in, q_out = ent.leaf_size(d_in, n), ent.leaf_size(d_out, n)
      counts["adapter"] = n * s * r * (q_in + q_out)
      if self.pair_norm == "layernorm" and self.train_pair_norm:
        positions = ent.num_pairs(n) if self.method == "tensorpoly_ii" else 1
        counts["pair_norm"] = 2 * r * (q_in**2 + q_out**2) * positions
    if self.routed and not self.shared_router:
      counts["router"] = self.router_param_count()
    counts["total"] = sum(counts.values())
    return counts
