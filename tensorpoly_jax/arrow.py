"""Arrow routing (Ostapenko et al. 2024): each token picks skills by how strongly its input
aligns with each skill's prototype, the top singular direction of the skill's ``A B`` in input
space, so a task needs no router row and no labelled example.

A skill is what a routed adapter builds for one-hot routing weights on it (``Routed.skills``):
``A_s: [d, r]``, ``B_s: [r, e]``; with ``h`` routing heads (MHR) the prototype of skill ``s`` in
head ``h`` is that of ``A_s``'s rows in head ``h`` times ``B_s``, and each head routes its slice
of the input. Einsum letters: ``b`` batch, ``t`` tokens, ``h`` heads, ``s`` skills, ``d``/``e``
in/out features (per head where split), ``r`` LoRA rank.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Squarings of the r x r operator: the iteration applies it 2**20 times, enough to separate top
# singular values that differ by 1e-5 relatively.
POWER_SQUARINGS = 20
NORM_EPSILON = 1e-12


def _normalized(x: jnp.ndarray, axes) -> jnp.ndarray:
  return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True)), NORM_EPSILON)


def top_input_direction(lora_a: jnp.ndarray, lora_b: jnp.ndarray) -> jnp.ndarray:
  """Unit top left-singular vector of ``A B`` for ``A: [..., d, r]``, ``B: [..., r, e]`` -> ``[..., d]``
  (sign arbitrary), without forming the ``d x e`` product.

  It lies in A's column space: for ``u = A c``, ``(A B)(A B)ᵀ u = A K c`` with the ``r x r``
  ``K = (B Bᵀ)(Aᵀ A)``; power iteration by repeated squaring of ``K`` leaves a matrix whose
  columns are all along ``K``'s top eigenvector. A zero skill (B = 0) gives a zero prototype.
  """
  gram_a = jnp.einsum("...dr,...dq->...rq", lora_a, lora_a)
  gram_b = jnp.einsum("...re,...qe->...rq", lora_b, lora_b)
  operator = _normalized(gram_b @ gram_a, (-2, -1))

  def square(_, power):
    return _normalized(power @ power, (-2, -1))

  power = jax.lax.fori_loop(0, POWER_SQUARINGS, square, operator)
  # The largest column is the one least disturbed by rounding (a column can be ~0 when the start
  # basis vector is nearly orthogonal to the top eigenvector).
  largest = jnp.argmax(jnp.sum(jnp.square(power), axis=-2), axis=-1)
  coefficients = jnp.take_along_axis(power, largest[..., None, None], axis=-1)[..., 0]  # [..., r]
  return _normalized(jnp.einsum("...dr,...r->...d", lora_a, coefficients), -1)


def prototypes(skill_a: jnp.ndarray, skill_b: jnp.ndarray, heads: int) -> jnp.ndarray:
  """``[h, s, d/h]`` from ``skill_a: [s, d, r]``, ``skill_b: [s, r, e]``."""
  skills, d_in, rank = skill_a.shape
  per_head_a = jnp.swapaxes(skill_a.reshape(skills, heads, d_in // heads, rank), 0, 1)
  return top_input_direction(per_head_a, skill_b[None])


def token_weights(tokens: jnp.ndarray, skill_prototypes: jnp.ndarray, top_k: int) -> jnp.ndarray:
  """``[b, t, h, s]``: softmax over each token's ``top_k`` skills by ``|<x, v_s>|``, 0 elsewhere."""
  heads, skills, _ = skill_prototypes.shape
  if not 1 <= top_k <= skills:
    raise ValueError(f"arrow_top_k={top_k} must be in [1, {skills}] (the adapter's skills).")
  per_head = tokens.reshape(*tokens.shape[:2], heads, -1)
  alignment = jnp.abs(jnp.einsum("bthd,hsd->bths", per_head, skill_prototypes))
  top_alignment, top_skills = jax.lax.top_k(alignment, top_k)  # [b, t, h, k]
  return jnp.einsum("bthk,bthks->bths", jax.nn.softmax(top_alignment, axis=-1),
                    jax.nn.one_hot(top_skills, skills, dtype=alignment.dtype))


def token_routed_delta(tokens: jnp.ndarray, skill_a: jnp.ndarray, skill_b: jnp.ndarray,
                       weights: jnp.ndarray) -> jnp.ndarray:
  """``(x A(w_t) B(w_t)) / r`` per token, the skills' factors mixed by that token's ``weights:
  [b, t, h, s]`` as the task router's weights mix them per example (head ``h``'s weights mix
  the rows of A and the columns of B in that head)."""
  skills, d_in, rank = skill_a.shape
  heads = weights.shape[2]
  per_head_x = tokens.reshape(*tokens.shape[:2], heads, d_in // heads)
  per_head_a = skill_a.reshape(skills, heads, d_in // heads, rank)
  hidden = jnp.einsum("bthd,shdr,bths->btr", per_head_x, per_head_a, weights) / rank
  per_head_b = skill_b.reshape(skills, rank, heads, -1)
  delta = jnp.einsum("btr,srhe,bths->bthe", hidden, per_head_b, weights)
  return delta.reshape(*tokens.shape[:2], -1)
