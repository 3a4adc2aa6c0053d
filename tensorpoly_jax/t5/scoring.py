"""Target log-likelihoods under the encoder-decoder (``Seq2SeqModel.score_choices`` scores
answer choices with the encoder run once per example; ``score_pairs`` is the plain pass)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tensorpoly_jax.t5.model import EncoderDecoder


def shift_right(targets: jnp.ndarray) -> jnp.ndarray:
  """Decoder inputs: the targets delayed by one step, starting from token 0 (T5's start token)."""
  return jnp.pad(targets, [(0, 0)] * (targets.ndim - 1) + [(1, 0)])[..., :-1]


def token_log_likelihoods(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """``log p(targets[..., t])`` for every position, ``[..., T]``; padding (0) gives 0."""
  log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
  picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return jnp.where(targets > 0, picked, 0.0)


def sequence_scores(token_ll: jnp.ndarray, targets: jnp.ndarray, length_normalize: bool):
  """Sum of token log-likelihoods, divided by the target length when ``length_normalize``."""
  total = token_ll.sum(-1)
  if not length_normalize:
    return total
  return total / jnp.maximum((targets > 0).sum(-1), 1)


def score_pairs(model: EncoderDecoder, variables, encoder_tokens, target_tokens, task_ids=None,
                length_normalize: bool = True) -> jnp.ndarray:
  """Scores ``[b]`` of one target per input, running the full model on each pair."""
  logits = model.apply(variables, encoder_tokens, shift_right(target_tokens), target_tokens,
                       enable_dropout=False, task_ids=task_ids)
  return sequence_scores(token_log_likelihoods(logits, target_tokens), target_tokens,
                         length_normalize)
