"""Content fingerprints of parameter trees: a backbone's, which every run and adapter export
records, so that a rerun or an adapter read with another backbone of the same shapes is refused.

The checksum runs where the params are (sharded on the mesh, one pass over HBM): each leaf's
bits, as uint32 words weighted by their position, summed with wrap-around; integer sums do not
depend on how the leaf is sharded or reduced, so every mesh gives the same value.
"""
from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# Position weights: distinct odd multipliers, so that swapping two words changes the sum.
_WEIGHT_PERIOD = 65_521


def _words(leaf: jax.Array) -> jax.Array:
  """A leaf's bits as uint32 words (a 16-bit dtype's bits widened, not its values converted)."""
  if leaf.dtype.itemsize == 2:
    return jax.lax.bitcast_convert_type(leaf, jnp.uint16).astype(jnp.uint32).reshape(-1)
  if leaf.dtype.itemsize != 4:  # no param is 1 or 8 bytes wide: their float32 values stand in
    leaf = leaf.astype(jnp.float32)
  return jax.lax.bitcast_convert_type(leaf, jnp.uint32).reshape(-1)


@jax.jit
def _checksums(leaves):
  def checksum(leaf):
    words = _words(leaf)
    weights = (jnp.arange(words.size, dtype=jnp.uint32) % _WEIGHT_PERIOD) * 2 + 1
    return jnp.sum(words * weights, dtype=jnp.uint32)

  return [checksum(leaf) for leaf in leaves]


def params_fingerprint(params) -> str:
  """A short hex digest of a param tree's names, shapes, dtypes and contents."""
  flat = traverse_util.flatten_dict(params)
  names = sorted(flat)
  sums = np.asarray(jax.device_get(_checksums([flat[name] for name in names])), np.uint32)
  described = [["/".join(name), list(flat[name].shape), str(flat[name].dtype), int(total)]
               for name, total in zip(names, sums)]
  return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]
