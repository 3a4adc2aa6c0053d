"""Adapters for any Flax model, added at call time without forking its code.

``inject_adapters`` intercepts (``flax.linen.intercept_methods``) every ``Dense``/``DenseGeneral``
call whose module path matches the config's ``targets`` and adds the adapter's ``delta`` to its
output. The adapter's params live under ``<dense path>/adapter``, where tensorpoly's own T5 puts
them, so a model with injected adapters and the same model built with ``T5Config.adapter`` have
the same param tree. Works for Flax's ``nn.Dense``/``nn.DenseGeneral`` and T5X-style
``DenseGeneral`` (``features``, ``axis``, ``kernel_axes``); use it inside ``init``/``apply`` and,
under ``jax.jit``, inside the traced function::

  with inject_adapters(PolyConfig(n_tasks=8, targets=r".*/(query|value)"), task_ids):
    variables = model.init(rng, tokens)
"""
from __future__ import annotations

import contextlib

from flax import linen as nn

from tensorpoly_jax.methods import AdapterConfig
from tensorpoly_jax.t5.layers import canonicalize_tuple, normalize_axes

DENSE_CLASSES = ("Dense", "DenseGeneral")


@contextlib.contextmanager
def inject_adapters(adapter: AdapterConfig, task_ids=None, *, routing_weights=None,
                    deterministic: bool = True):
  """Within the block, matching dense layers of any Flax model carry ``adapter``.

  ``task_ids: int[B]`` index the leading axis of every adapted layer's inputs;
  ``routing_weights: [B, H, S]`` are a shared router's weights, if any.
  """
  def interceptor(next_fun, args, kwargs, context):
    outputs = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or type(module).__name__ not in DENSE_CLASSES:
      return outputs
    path = "/".join(module.path)
    if not adapter.matches(path):
      return outputs
    if getattr(module, "adapter", None) is not None:
      raise ValueError(f"{path} already carries an adapter (T5Config.adapter); build the model"
                       " with adapter=None to inject one, or drop inject_adapters.")
    if getattr(module, "batch_dims", ()):
      raise ValueError(f"{path}: DenseGeneral with batch_dims={module.batch_dims} is not"
                       " supported; exclude it from targets.")
    inputs = args[0] if args else kwargs["inputs"]
    axis = normalize_axes(canonicalize_tuple(getattr(module, "axis", -1)), inputs.ndim)
    dtype = getattr(module, "dtype", None) or inputs.dtype
    return outputs + adapter.dense_delta(
        inputs.astype(dtype), axis, outputs.shape, tuple(getattr(module, "kernel_axes", ())),
        dtype, task_ids, routing_weights, deterministic)

  with nn.intercept_methods(interceptor):
    yield
