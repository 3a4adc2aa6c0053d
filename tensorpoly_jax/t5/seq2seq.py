"""The encoder-decoder as training and evaluation use it (the role of T5X's ``BaseModel``): the LM
loss, T-Few's losses over answer choices, and rank-classification scores, all over batches.

Choice batches: ``encoder_input_tokens: [b, l]``, ``choice_tokens: [b, c, t]`` (0 = padding; an
all-padding row is an absent choice), ``label: [b]``, ``task_ids: [b]`` (optional).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from tensorpoly_jax import losses
from tensorpoly_jax.t5.model import EncoderDecoder
from tensorpoly_jax.t5.scoring import sequence_scores, shift_right, token_log_likelihoods


@dataclasses.dataclass(frozen=True)
class Seq2SeqModel:
  module: EncoderDecoder

  def choice_log_likelihoods(self, params, encoder_tokens, choice_tokens, task_ids=None, *,
                             enable_dropout: bool = False, rngs=None):
    """``log p`` of every choice token, ``[b, c, t]`` (0 at padding); the encoder runs once per
    example and its output is repeated for the choices."""
    batch, choices, _ = choice_tokens.shape
    variables = {"params": params}
    encoded = self.module.apply(variables, encoder_tokens, enable_dropout=enable_dropout,
                                task_ids=task_ids, rngs=rngs, method=EncoderDecoder.encode)
    flat = choice_tokens.reshape(batch * choices, -1)
    repeat = lambda x: None if x is None else jnp.repeat(x, choices, axis=0)
    logits = self.module.apply(variables, repeat(encoded), repeat(encoder_tokens),
                               shift_right(flat), flat, enable_dropout=enable_dropout,
                               task_ids=repeat(task_ids), rngs=rngs, method=EncoderDecoder.decode)
    return token_log_likelihoods(logits, flat).reshape(choice_tokens.shape)

  def lm_loss(self, params, batch, rngs):
    """``(loss, metrics)``: token cross-entropy of a seqio LM batch, dropout on."""
    logits = self.module.apply({"params": params}, batch["encoder_input_tokens"],
                               batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                               enable_dropout=True, task_ids=batch.get("task_ids"), rngs=rngs)
    loss = losses.lm_loss(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])
    return loss, {"loss": loss}

  def tfew_loss(self, params, batch, rngs, weights=(1.0, 1.0, 1.0)):
    """``(loss, metrics)``: T-Few's LM, unlikelihood and multiple-choice losses of a choice batch,
    weighted by ``weights`` (in that order), dropout on."""
    token_ll = self.choice_log_likelihoods(params, batch["encoder_input_tokens"],
                                           batch["choice_tokens"], batch.get("task_ids"),
                                           enable_dropout=True, rngs=rngs)
    parts = losses.tfew_losses(token_ll, batch["choice_tokens"], batch["label"])
    loss = sum(w * parts[k] for w, k in zip(weights, ("lm", "unlikelihood", "mc")))
    return loss, {"loss": loss, **parts}

  def loss_fn(self, mode: str, tfew_weights=(1.0, 1.0, 1.0)):
    """``(params, batch, rngs) -> (loss, metrics)`` for a ``losses.LOSS_MODES`` mode."""
    if mode == "lm":
      return self.lm_loss
    return lambda params, batch, rngs: self.tfew_loss(params, batch, rngs, tfew_weights)

  def score_choices(self, params, encoder_tokens, choice_tokens, task_ids=None,
                    length_normalize: bool = True):
    """Rank-classification scores ``[b, c]``: each choice's (length-normalized) log-likelihood,
    dropout off; absent choices score -inf so they never win."""
    token_ll = self.choice_log_likelihoods(params, encoder_tokens, choice_tokens, task_ids)
    scores = sequence_scores(token_ll, choice_tokens, length_normalize)
    return jnp.where((choice_tokens > 0).any(-1), scores, -jnp.inf)
