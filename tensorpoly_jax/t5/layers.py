"""T5X-style layers: an adapter-aware DenseGeneral (frozen kernel + optional adapter delta)."""
from __future__ import annotations

import math
from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import partitioning
from jax import lax

from tensorpoly_jax.methods import AdapterConfig

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def _canonicalize_tuple(x):
  return tuple(x) if isinstance(x, Iterable) else (x,)


def _normalize_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
  return tuple(ax if ax >= 0 else ndim + ax for ax in axes)


class DenseGeneral(nn.Module):
  """T5X's DenseGeneral (kernel stored flattened ``(in, out)`` with ``kernel_axes``) plus an adapter.

  The adapter is attached when ``adapter`` is set and its ``targets`` regex matches this module's
  path (``encoder/layers_0/attention/query``), so a model passes one config down to every layer.
  """

  features: int | Iterable[int]
  axis: int | Iterable[int] = -1
  dtype: Any = jnp.float32
  kernel_init: Any = default_kernel_init
  kernel_axes: tuple[str, ...] = ()
  adapter: AdapterConfig | None = None

  @nn.compact
  def __call__(self, inputs, task_ids=None, *, routing_weights=None, deterministic=True):
    features = _canonicalize_tuple(self.features)
    axis = _normalize_axes(_canonicalize_tuple(self.axis), inputs.ndim)
    inputs = jnp.asarray(inputs, self.dtype)
    in_shape = tuple(inputs.shape[ax] for ax in axis)
    kernel = partitioning.param_with_axes(
        "kernel", self.kernel_init, (math.prod(in_shape), math.prod(features)), jnp.float32,
        axes=self.kernel_axes or None)
    kernel = jnp.asarray(kernel, self.dtype).reshape(in_shape + features)
    outputs = lax.dot_general(inputs, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
    if self.adapter is None or not self.adapter.matches("/".join(self.path)):
      return outputs
    kept = [ax for ax in range(inputs.ndim) if ax not in axis]
    flat_inputs = jnp.transpose(inputs, kept + list(axis)).reshape(
        *(inputs.shape[ax] for ax in kept), -1)
    in_axis, out_axis = (self.kernel_axes[0], self.kernel_axes[-1]) if self.kernel_axes else (
        "embed", "embed")
    delta = self.adapter.build(math.prod(features), in_axis, out_axis, self.dtype, name="adapter")(
        flat_inputs, task_ids, routing_weights=routing_weights, deterministic=deterministic)
    return outputs + delta.reshape(outputs.shape)
