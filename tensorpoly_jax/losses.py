"""Training losses: the LM loss, and T-Few's losses over answer choices for few-shot adaptation.

Choice batches: ``choice_tokens: [b, c, t]`` (0 = padding; an all-padding row is an absent
choice), ``label: [b]`` the gold choice. ``token_ll``/``token_probs`` are ``[b, c, t]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_MODES = ("lm", "tfew")
# Keeps log(1 - p) finite when a wrong choice's token probability reaches 1.
UNLIKELIHOOD_EPSILON = 1e-6


def lm_loss(logits, targets, weights):
  """Mean token cross-entropy over the positions where ``weights`` is 1."""
  log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def tfew_losses(token_log_probs, choice_tokens, label):
  """T-Few's three losses from the per-token log-likelihood of every choice.

  - ``lm``: cross-entropy of the gold choice's tokens;
  - ``unlikelihood``: ``-log(1 - p)`` over the tokens of the wrong choices;
  - ``mc``: cross-entropy of a softmax over length-normalized choice scores.
  """
  mask = (choice_tokens > 0).astype(jnp.float32)
  lengths = mask.sum(-1)  # [b, c]
  present = lengths > 0
  gold = jax.nn.one_hot(label, choice_tokens.shape[1])  # [b, c]
  gold_tokens = mask * gold[..., None]
  lm = -(token_log_probs * gold_tokens).sum() / jnp.maximum(gold_tokens.sum(), 1.0)
  wrong_tokens = mask * (1.0 - gold)[..., None]
  probs = jnp.exp(token_log_probs)
  unlikely = -jnp.log(jnp.clip(1.0 - probs, UNLIKELIHOOD_EPSILON, 1.0))
  unlikelihood = (unlikely * wrong_tokens).sum() / jnp.maximum(wrong_tokens.sum(), 1.0)
  scores = jnp.where(present, (token_log_probs * mask).sum(-1) / jnp.maximum(lengths, 1.0), -1e9)
  mc = -(jax.nn.log_softmax(scores) * gold).sum(-1).mean()
  return {"lm": lm, "unlikelihood": unlikelihood, "mc": mc}
