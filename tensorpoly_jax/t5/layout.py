"""Param trees between the per-layer layout (``encoder/layers_0/...``, HF conversion, T5X's
default, adapter exports) and the scanned one (``encoder/layers/...`` with a leading ``layers``
axis, T5X's ``scan_layers``). Works on any subtree of the model's params: backbone, adapters,
routers, optimizer-free exports; host numpy stays numpy, device arrays stay on device."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

STACKS = ("encoder", "decoder")
SCANNED = "layers"
_LAYER = re.compile(r"layers_(\d+)")


def is_scanned(params) -> bool:
  return any(SCANNED in params.get(stack, {}) for stack in STACKS)


def _layer_indices(stack: dict) -> list[int]:
  return sorted(int(m.group(1)) for m in map(_LAYER.fullmatch, stack) if m)


def _stack(*arrays):
  if all(isinstance(a, np.ndarray) for a in arrays):
    return np.stack(arrays)
  return jnp.stack(arrays)


def stack_layers(params: dict) -> dict:
  """``layers_0..layers_{L-1}`` -> ``layers`` (leaves stacked on a new leading axis)."""
  out = dict(params)
  for stack in STACKS:
    if stack not in params:
      continue
    indices = _layer_indices(params[stack])
    if not indices:
      continue
    if indices != list(range(len(indices))):
      raise ValueError(f"{stack} has layers {indices}; stacking needs layers_0..layers_{{L-1}}.")
    blocks = [params[stack][f"layers_{i}"] for i in indices]
    rest = {k: v for k, v in params[stack].items() if not _LAYER.fullmatch(k)}
    out[stack] = {**rest, SCANNED: jax.tree_util.tree_map(_stack, *blocks)}
  return out


def unstack_layers(params: dict) -> dict:
  """``layers`` (leading ``layers`` axis) -> ``layers_0..layers_{L-1}``."""
  out = dict(params)
  for stack in STACKS:
    if SCANNED not in params.get(stack, {}):
      continue
    stacked = params[stack][SCANNED]
    depth = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in params[stack].items() if k != SCANNED}
    out[stack] = {**rest, **{f"layers_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
                             for i in range(depth)}}
  return out


def to_layout(params: dict, scanned: bool) -> dict:
  """``params`` in the scanned or the per-layer layout, whichever it is in now."""
  if scanned == is_scanned(params):
    return params
  return stack_layers(params) if scanned else unstack_layers(params)
