"""Adapter methods by name: a config class per method, holding only that method's fields, which
builds its flax module and counts its parameters.

A method registers its config with ``@register`` next to its module (``tensorpoly_jax/adapters/``);
``METHODS`` maps names to config classes, which gin binds by their class names.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import traverse_util

from tensorpoly_jax import entangle as ent
from tensorpoly_jax import field_types, param_roles

# The reference adapts self-/cross-attention q, k, v, o and the FFN (T5X layer names).
DEFAULT_TARGETS = r".*(attention|mlp)/(query|key|value|out|wi_0|wi_1|wi|wo)"
METHODS: dict[str, type["AdapterConfig"]] = {}


def register(config_cls):
  """Class decorator: makes ``config_cls.method`` a method name for every stage and gin."""
  if config_cls.method in METHODS:
    raise ValueError(f"adapter method {config_cls.method!r} is registered twice.")
  METHODS[config_cls.method] = config_cls
  return config_cls


def adapter_config(method: str, **fields) -> "AdapterConfig":
  """``method``'s config from its fields (an export's ``adapter`` dict without ``method``)."""
  if method not in METHODS:
    raise ValueError(f"adapter method {method!r} is unknown; choose one of {sorted(METHODS)}.")
  config_cls = METHODS[method]
  known = {f.name for f in dataclasses.fields(config_cls)}
  if set(fields) - known:
    raise ValueError(f"{method} has no field(s) {sorted(set(fields) - known)}; its fields are"
                     f" {sorted(known)}.")
  return config_cls(**fields)


def from_dict(fields: dict) -> "AdapterConfig":
  """Inverse of ``AdapterConfig.to_dict``."""
  return adapter_config(**fields)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
  """Which layers get the adapter (``targets``, a regex over module paths) and its LoRA rank."""

  method: ClassVar[str]
  module: ClassVar[type]  # the flax module one adapted layer builds
  routed: ClassVar[bool] = False

  lora_rank: int = 16
  targets: str = DEFAULT_TARGETS

  def __post_init__(self):
    field_types.check(self)
    ent.check_positive(lora_rank=self.lora_rank)
    try:
      re.compile(self.targets)
    except re.error as err:
      raise ValueError(f"targets={self.targets!r} is not a valid regex: {err}") from None

  def to_dict(self) -> dict:
    """The export schema: ``{"method": name, **fields}``."""
    return {"method": self.method, **dataclasses.asdict(self)}

  @property
  def routes_by_task(self) -> bool:
    """Whether its layers take task ids (a task router; not Arrow's per-token routing)."""
    return False

  def with_tasks(self, n_tasks: int) -> "AdapterConfig":
    """The config whose router knows ``n_tasks`` tasks (unchanged for unrouted methods)."""
    return self

  def module_fields(self) -> dict:
    """The module's fields: the config's, less the ones that place or share it."""
    return {k: v for k, v in dataclasses.asdict(self).items()
            if k not in ("targets", "shared_router")}

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.targets, path) is not None

  def build(self, features: int, in_axis: str = "embed", out_axis: str = "embed",
            dtype: Any = jnp.float32, name: str | None = None):
    """The adapter module for one layer with ``features`` outputs."""
    return self.module(features=features, in_axis=in_axis, out_axis=out_axis, dtype=dtype,
                       name=name, **self.module_fields())

  def dense_delta(self, inputs, contracted_axes: tuple[int, ...], outputs_shape: tuple[int, ...],
                  kernel_axes: tuple[str, ...] = (), dtype: Any = jnp.float32, task_ids=None,
                  routing_weights=None, deterministic: bool = True, decode: bool = False):
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
        flat_inputs, task_ids, routing_weights=routing_weights, deterministic=deterministic,
        decode=decode)
    return delta.reshape(outputs_shape)

  def layer_inputs(self) -> dict:
    """Keyword inputs beyond ``x`` that one layer's adapter takes when counting its params."""
    return {}

  def param_count(self, d_in: int, d_out: int) -> dict[str, int]:
    """Trainable params of one adapted ``d_in -> d_out`` layer by role, and their ``total``, from
    the module's own shapes (``jax.eval_shape``; the tests check them against SPEC's formulas)."""
    module = self.build(d_out)
    shapes = jax.eval_shape(
        lambda key: module.init(key, jnp.zeros((1, 1, d_in)), **self.layer_inputs()),
        jax.random.PRNGKey(0))["params"]
    counts = dict.fromkeys(param_roles.ROLES[1:], 0)
    for path, shape in traverse_util.flatten_dict(shapes).items():
      counts[param_roles.param_role(("adapter", *path))] += math.prod(shape.shape)
    counts["total"] = sum(counts.values())
    return counts


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutedConfig(AdapterConfig):
  """A method that a task router mixes per example: ``n_tasks`` rows of routing logits, one
  router per layer or, with ``shared_router``, one for the whole model. ``arrow_top_k > 0``
  routes each token to that many skills by Arrow's prototypes instead (``arrow``; no task ids)."""

  routed: ClassVar[bool] = True

  n_tasks: int = 1
  relaxed_bernoulli: bool = False
  shared_router: bool = False
  arrow_top_k: int = 0

  def __post_init__(self):
    super().__post_init__()
    ent.check_positive(n_tasks=self.n_tasks)
    if not 0 <= self.arrow_top_k <= self.routed_skills:
      raise ValueError(f"arrow_top_k={self.arrow_top_k} must be in [0, {self.routed_skills}]"
                       f" (0: route by task; else at most the {self.method} adapter's skills).")

  @property
  def routes_by_task(self) -> bool:
    return not self.arrow_top_k

  def with_tasks(self, n_tasks: int) -> "RoutedConfig":
    return dataclasses.replace(self, n_tasks=n_tasks)

  @property
  def routing_heads(self) -> int:
    return 1

  @property
  def routed_skills(self) -> int:
    raise NotImplementedError

  def layer_inputs(self) -> dict:
    task_ids = jnp.zeros((1,), jnp.int32)
    if self.shared_router:  # the layer gets the shared router's weights and has no router
      return {"task_ids": task_ids, "routing_weights": jnp.zeros(
          (1, self.routing_heads, self.routed_skills))}
    return {"task_ids": task_ids}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorFields:
  """The entangled-tensor fields of TLoRA and TensorPoly: tensor rank R, order N, and the pair
  LayerNorm (``entangle.entangle``). The reference's released configs (``*_lora_sota.json``) and
  the paper's counts keep its affines frozen (``train_pair_norm=False``); ``pair_norm_epsilon``
  is its eps (the reference's 1e-5; ``entangle.entangle`` says why it matters at small widths)."""

  tensor_rank: int = 8
  order: int = 2
  pair_norm: str = "layernorm"
  train_pair_norm: bool = False
  pair_norm_epsilon: float = ent.PAIR_NORM_EPSILON

  def __post_init__(self):
    super().__post_init__()
    ent.check_positive(tensor_rank=self.tensor_rank, order=self.order)
    ent.check_pair_norm(self.pair_norm, self.order)
    if not self.pair_norm_epsilon > 0:
      raise ValueError(f"pair_norm_epsilon must be > 0, got {self.pair_norm_epsilon}.")
