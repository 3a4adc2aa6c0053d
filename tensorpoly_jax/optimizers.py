"""optax optimizers with one learning rate per parameter group; the frozen backbone gets none.

Groups are param roles (``param_roles``): ``router`` (skill logits), ``lora`` (``lora_a``/``lora_b``
of LoRA, Poly, MHR), ``leaf`` and ``norm`` (tensor leaves, trainable pair norms: one rate),
``backbone`` (only when the backbone itself trains). The reference
gave only params named ``lora*`` the adapter rate, so its tensor leaves trained at the base rate:
``leaf_learning_rate=None`` keeps that, and setting it makes the choice explicit.
"""
from __future__ import annotations

import dataclasses

import optax
from flax import traverse_util
from flax.core import unfreeze

from tensorpoly_jax import field_types
from tensorpoly_jax.param_roles import param_role

OPTIMIZERS = ("adafactor", "adamw")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = "adafactor"
  learning_rate: float = 3e-4
  adapter_learning_rate: float = 1e-3
  leaf_learning_rate: float | None = None
  router_learning_rate: float = 0.1
  warmup_fraction: float = 0.06
  grad_clip: float = 1.0
  weight_decay: float = 0.0

  def __post_init__(self):
    field_types.check(self)
    if self.name not in OPTIMIZERS:
      raise ValueError(f"optimizer {self.name!r} is unknown; choose one of {OPTIMIZERS}.")
    if not 0.0 <= self.warmup_fraction < 1.0:
      raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}.")
    rates = (self.learning_rate, self.adapter_learning_rate, self.router_learning_rate,
             self.leaf_learning_rate or self.learning_rate)
    if min(rates) <= 0:
      raise ValueError(f"learning rates must be > 0, got {rates}.")

  def rates(self) -> dict[str, float]:
    """Peak learning rate per param role (pair-norm affines train with the leaves)."""
    leaf = self.leaf_learning_rate or self.learning_rate
    return {"router": self.router_learning_rate, "lora": self.adapter_learning_rate,
            "leaf": leaf, "norm": leaf, "backbone": self.learning_rate}


def group_labels(params):
  """Each param's optimizer group: its role (``param_roles``)."""
  flat = traverse_util.flatten_dict(unfreeze(params))
  return traverse_util.unflatten_dict({path: param_role(path) for path in flat})


def schedule(peak: float, total_steps: int, warmup_fraction: float):
  """Linear warmup over ``warmup_fraction`` of the steps, then linear decay to 0."""
  warmup = max(1, int(round(warmup_fraction * total_steps)))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup),
       optax.linear_schedule(peak, 0.0, max(1, total_steps - warmup))], [warmup])


def make_optimizer(config: OptimizerConfig, params, total_steps: int):
  """Grad-norm clipping, then the chosen optimizer with each group's scheduled rate."""
  def inner(rate):
    lr = schedule(rate, total_steps, config.warmup_fraction)
    if config.name == "adafactor":
      return optax.adafactor(lr, multiply_by_parameter_scale=False, clipping_threshold=None,
                             weight_decay_rate=config.weight_decay or None)
    return optax.adamw(lr, weight_decay=config.weight_decay)

  labels = group_labels(params)
  used = set(traverse_util.flatten_dict(labels).values())
  transforms = {group: inner(rate) for group, rate in config.rates().items() if group in used}
  return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                     optax.multi_transform(transforms, labels))


def logged_learning_rate(config: OptimizerConfig, params, total_steps: int):
  """``step -> rate`` of the main group of ``params`` (the backbone, else LoRA-named adapter
  params, else tensor leaves), for the ``train/learning_rate`` curve; every group follows the same
  schedule shape."""
  used = set(traverse_util.flatten_dict(group_labels(params)).values())
  group = next(g for g in ("backbone", "lora", "leaf", "norm", "router") if g in used)
  peak = config.rates()[group]
  return lambda step: float(schedule(peak, total_steps, config.warmup_fraction)(step))
