"""Task routing: per-task skill logits -> normalized mixing weights over the skill inventory.

Einsum letters: ``b`` batch, ``t`` tasks, ``h`` routing heads (MHR splits / tensor orders),
``s`` skills (tensor rank for TensorPoly).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import partitioning

from tensorpoly_jax import param_roles
from tensorpoly_jax.entangle import check_positive

# Keeps the normalization finite if every sigmoid underflows (matches the reference's EPS).
NORMALIZE_EPSILON = 1e-12
LOGIT_INIT_RANGE = 1e-3
ROUTING_RNG = "routing"
param_roles.declare(skill_logits="router")


def uniform_init(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def check_task_ids(task_ids, n_tasks: int) -> None:
  """Validates concrete task ids where a batch enters (outside jit); tracers pass through."""
  if isinstance(task_ids, jax.core.Tracer):
    return
  ids = np.asarray(task_ids)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"task_ids must be int[B], got dtype {ids.dtype} and shape {ids.shape}.")
  if ids.size and (ids.min() < 0 or ids.max() >= n_tasks):
    bad = ids[(ids < 0) | (ids >= n_tasks)]
    raise ValueError(
        f"task ids {sorted(set(bad.tolist()))[:8]} are outside [0, {n_tasks}): the router knows"
        f" {n_tasks} tasks (set n_tasks / N_TASKS, or add a router row for a new task)."
    )


class Router(nn.Module):
  """Maps ``task_ids: int[B]`` to routing weights ``[B, H, S]`` that sum to 1 over skills.

  ``z = sigmoid(logits)`` (the reference's released T0 runs), or a relaxed Bernoulli sample at
  temperature 1 while training when ``relaxed_bernoulli``; then ``w = z / (Σ_s z + 1e-12)``.
  Task ids outside ``[0, T)`` give NaN weights inside jit instead of a silently clamped row.
  """

  n_tasks: int
  n_heads: int
  n_skills: int
  relaxed_bernoulli: bool = False
  straight_through: bool = False
  l2_norm: bool = False

  def setup(self):
    check_positive(n_tasks=self.n_tasks, n_heads=self.n_heads, n_skills=self.n_skills)
    if self.relaxed_bernoulli and self.straight_through:
      raise ValueError("relaxed_bernoulli and straight_through are exclusive; enable one of them.")
    self.skill_logits = partitioning.param_with_axes(
        "skill_logits",
        uniform_init(LOGIT_INIT_RANGE),
        (self.n_tasks, self.n_heads, self.n_skills),
        axes=("tasks", "splits", "skills"),
    )

  def __call__(self, task_ids: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
    check_task_ids(task_ids, self.n_tasks)
    task_logits = jnp.take(
        self.skill_logits, task_ids, axis=0, mode="fill", fill_value=jnp.nan
    )  # [b, h, s]
    if self.l2_norm:
      return task_logits / jnp.linalg.norm(task_logits, axis=-1, keepdims=True).clip(1e-12)
    if self.relaxed_bernoulli and not deterministic:
      uniform = jax.random.uniform(
          self.make_rng(ROUTING_RNG), task_logits.shape, minval=1e-6, maxval=1.0 - 1e-6
      )
      skill_probs = jax.nn.sigmoid(task_logits + jnp.log(uniform) - jnp.log1p(-uniform))
    else:
      skill_probs = jax.nn.sigmoid(task_logits)
    if self.straight_through:
      skill_probs = skill_probs + jax.lax.stop_gradient(jnp.round(skill_probs) - skill_probs)
    return skill_probs / (skill_probs.sum(axis=-1, keepdims=True) + NORMALIZE_EPSILON)
