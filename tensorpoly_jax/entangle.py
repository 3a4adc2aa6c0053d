"""Entangled tensors (word2ket): d-dim vectors built as sums of tensor products of small leaves.

A vector of dimension ``d`` is ``f_1 ⊗ f_2 ⊗ … ⊗ f_N`` flattened row-major (``f_1`` is the
slowest index) and cut to its first ``d`` entries; each leaf ``f_n`` has ``q = leaf_size(d, N)``
entries. This one builder serves every tensor adapter (TLoRA, TensorPoly-I, TensorPoly-II).

Einsum letters: ``n`` order, ``s`` tensor rank (skills), ``r`` LoRA rank, ``q`` leaf size.
"""
from __future__ import annotations

import numbers

import jax.numpy as jnp

PAIR_NORMS = ("none", "layernorm")
# PyTorch's LayerNorm default; Flax's 1e-6 would change the starting scale of the adapter.
PAIR_NORM_EPSILON = 1e-5


def leaf_size(dim: int, order: int) -> int:
  """Smallest ``q`` with ``q ** order >= dim`` (exact integer arithmetic, no float roots)."""
  check_positive(dim=dim, order=order)
  q = max(1, int(round(dim ** (1.0 / order))))
  while q**order < dim:
    q += 1
  while q > 1 and (q - 1) ** order >= dim:
    q -= 1
  return q


def check_positive(**values: int) -> None:
  for name, value in values.items():
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def check_pair_norm(pair_norm: str, order: int) -> None:
  if pair_norm not in PAIR_NORMS:
    raise ValueError(f"pair_norm must be one of {PAIR_NORMS}, got {pair_norm!r}.")
  if pair_norm == "layernorm" and order % 2:
    raise ValueError(
        f"pair_norm='layernorm' multiplies leaves in pairs and needs an even order N, got N={order};"
        " use an even ORDER or pair_norm='none'."
    )


def num_pairs(order: int) -> int:
  return order // 2


def _outer(u: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
  """Row-major tensor product of the last axes: [..., i], [..., j] -> [..., i*j]."""
  product = jnp.einsum("...i,...j->...ij", u, v)
  return product.reshape(*product.shape[:-2], -1)


def _layer_norm(pair: jnp.ndarray, scale, bias, epsilon: float) -> jnp.ndarray:
  """LayerNorm over the last two axes ``[r, q*q]`` jointly, as the reference normalizes each skill."""
  mean = pair.mean(axis=(-2, -1), keepdims=True)
  var = jnp.square(pair - mean).mean(axis=(-2, -1), keepdims=True)
  normed = (pair - mean) * jnp.reciprocal(jnp.sqrt(var + epsilon))
  if scale is not None:
    normed = normed * scale
  if bias is not None:
    normed = normed + bias
  return normed


def entangle(
    leaves: jnp.ndarray,
    dim: int,
    pair_norm: str = "none",
    norm_scale: jnp.ndarray | None = None,
    norm_bias: jnp.ndarray | None = None,
    epsilon: float = PAIR_NORM_EPSILON,
) -> jnp.ndarray:
  """Builds one ``dim``-vector per (rank, lora-rank) slot from its order factors.

  Args:
    leaves: ``[..., N, R, r, q]`` order factors (``q ** N >= dim``).
    dim: length of the built vectors; the ``q ** N`` product is cut to its first ``dim`` entries.
    pair_norm: ``"none"`` (the paper's plain product) or ``"layernorm"`` (the reference code:
      adjacent leaves are multiplied in pairs, each pair LayerNorm-ed over ``[r, q*q]``, then the
      normalized pairs multiplied with no norm after the last product).
    norm_scale, norm_bias: ``[P, r, q*q]`` affine per pair position, ``P`` = N/2 or 1 (shared by
      every pair); ``None`` means the identity affine (a frozen LayerNorm at its init).
    epsilon: the pair LayerNorm's eps, which sets its regime: pair products whose variance is far
      below it (T0's widths at init) are scaled by a fixed gain ``1/sqrt(eps)``, so the adapter
      starts small; near or above it they are normalized towards unit variance.

  Returns:
    ``[..., R, r, dim]``.
  """
  order, leaf = leaves.shape[-4], leaves.shape[-1]
  check_pair_norm(pair_norm, order)
  if leaf**order < dim:
    raise ValueError(
        f"leaves of size q={leaf} and order N={order} span {leaf**order} < dim={dim} entries;"
        f" use q >= {leaf_size(dim, order)}."
    )
  factors = [leaves[..., n, :, :, :] for n in range(order)]
  if pair_norm == "layernorm":
    factors = [
        _layer_norm(
            _outer(factors[2 * p], factors[2 * p + 1]),
            _pair_affine(norm_scale, p),
            _pair_affine(norm_bias, p),
            epsilon,
        )
        for p in range(num_pairs(order))
    ]
  vector = factors[0]
  for factor in factors[1:]:
    vector = _outer(vector, factor)
  return vector[..., :dim]


def _pair_affine(affine: jnp.ndarray | None, position: int):
  if affine is None:
    return None
  return affine[position % affine.shape[0]]


def entangled_size(dim: int, order: int, rank: int) -> int:
  """Numbers stored for ``rank`` entangled ``dim``-vectors of order ``order`` (``R·N·q``)."""
  return rank * order * leaf_size(dim, order)
