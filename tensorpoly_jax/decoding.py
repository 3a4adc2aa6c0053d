"""Text generation with the encoder-decoder: greedy, beam search and sampling, each example routed
by its own task id, the encoder run once and (by default) the decoder's keys, values and adapter
factors cached (``EncoderDecoder.decode(decode=True)``).

Beam search keeps Hugging Face's ``generate(num_beams=K, early_stopping=True)`` rules, so that
results compare one to one with transformers / PEFT runs: each step takes the best ``2K``
continuations of the ``K`` running beams; those among the first ``K`` that end (EOS, or the last
position) become finished hypotheses scored ``sum log p / length ** length_penalty``; the best
``K`` that do not end run on; an example stops when ``K`` hypotheses have finished or no running
beam can beat its worst one. ``beam_scoring="t5x"`` divides by T5X's brevity penalty
``((5 + length) / 6) ** length_penalty`` instead.

Shapes: ``b`` examples, ``k`` beams, ``n`` decoded rows (``b`` or ``b * k``, beams of an example
adjacent), ``L`` the decode length, ``V`` the vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct, traverse_util
from flax.core import unfreeze

from tensorpoly_jax import field_types
from tensorpoly_jax.t5.model import EncoderDecoder

METHODS = ("greedy", "beam", "sample")
BEAM_SCORINGS = ("hf", "t5x")
EOS_ID = 1
NEG_INF = -1.0e9  # Hugging Face's mask value: keeps its beam orderings where it stacks them


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How to decode (gin: ``DECODING``, ``MAX_DECODE_LENGTH``, ``NUM_BEAMS``, ...).

  ``max_decode_length`` counts generated tokens, EOS included (Hugging Face's
  ``max_new_tokens``). ``top_k = 0`` samples from the whole vocabulary. ``use_cache=False``
  recomputes the decoder over the whole prefix at every step (for comparison only).
  """

  method: str = "greedy"
  max_decode_length: int = 64
  num_beams: int = 4
  length_penalty: float = 1.0
  beam_scoring: str = "hf"
  temperature: float = 1.0
  top_k: int = 0
  seed: int = 0
  eos_id: int = EOS_ID
  use_cache: bool = True

  def __post_init__(self):
    field_types.check(self)
    if self.method not in METHODS:
      raise ValueError(f"DECODING={self.method!r} is unknown; choose one of {METHODS}.")
    if self.beam_scoring not in BEAM_SCORINGS:
      raise ValueError(f"beam_scoring={self.beam_scoring!r} is unknown; choose one of"
                       f" {BEAM_SCORINGS}.")
    for name in ("max_decode_length", "num_beams"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name.upper()} must be >= 1, got {getattr(self, name)}.")
    if self.top_k < 0:
      raise ValueError(f"TOP_K must be >= 0 (0: the whole vocabulary), got {self.top_k}.")
    if not self.temperature > 0:
      raise ValueError(f"TEMPERATURE must be > 0, got {self.temperature}; use DECODING='greedy'"
                       " for the argmax.")


@dataclasses.dataclass(frozen=True)
class Steps:
  """One batch's decoding steps: ``(carry, tokens [n, L + 1], t) -> (log_probs [n, V], carry)``,
  where ``tokens[:, t]`` is step ``t``'s input (column 0 the start token), and ``reorder(carry,
  rows [n])`` for beam search."""

  step: Callable
  reorder: Callable
  carry: object


def _decoder(module: EncoderDecoder, length: int):
  return functools.partial(module.apply, method=EncoderDecoder.decode, enable_dropout=False,
                           decode=True, max_decode_length=length, mutable=["cache"])


def init_cache(module: EncoderDecoder, params, encoded, encoder_tokens, task_ids, length: int):
  """The decoder's ``cache`` for ``length`` steps, holding the cross-attention keys and values of
  ``encoded`` and each adapted layer's factors for ``task_ids``; nothing written yet."""
  start = jnp.zeros((encoded.shape[0], 1), jnp.int32)
  _, variables = _decoder(module, length)({"params": params}, encoded, encoder_tokens, start,
                                          start + 1, task_ids=task_ids)
  return variables["cache"]


def cached_steps(module: EncoderDecoder, params, encoded, encoder_tokens, task_ids,
                 length: int) -> Steps:
  """Steps that feed one token at a time to the decoder with its ``cache`` (``init_cache``)."""
  decode = _decoder(module, length)
  batch_axis = 1 if module.config.scan_layers else 0  # scanned caches lead with "layers"

  def step(cache, tokens, t):
    token = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
    logits, variables = decode({"params": params, "cache": cache}, encoded, encoder_tokens, token,
                               jnp.ones_like(token))
    return jax.nn.log_softmax(jnp.asarray(logits[:, 0], jnp.float32)), variables["cache"]

  def reorder(cache, rows):
    flat = traverse_util.flatten_dict(unfreeze(cache))
    return traverse_util.unflatten_dict({
        path: value if path[-1] == "cache_index" else jnp.take(value, rows, axis=batch_axis)
        for path, value in flat.items()})

  return Steps(step, reorder, init_cache(module, params, encoded, encoder_tokens, task_ids, length))


def recomputing_steps(module: EncoderDecoder, params, encoded, encoder_tokens, task_ids,
                      length: int) -> Steps:
  """Steps that run the decoder over the whole (fixed-length, causal) prefix each time."""

  def step(carry, tokens, t):
    inputs = tokens[:, :length]
    logits = module.apply({"params": params}, encoded, encoder_tokens, inputs,
                          jnp.ones_like(inputs), enable_dropout=False, task_ids=task_ids,
                          method=EncoderDecoder.decode)
    row = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)
    return jax.nn.log_softmax(jnp.asarray(row, jnp.float32)), carry

  return Steps(step, lambda carry, rows: carry, None)


@struct.dataclass
class Generated:
  """``tokens: [b, L]`` (0 after EOS) and ``scores: [b]``: the sum of the tokens' log-probs
  (beam search: the hypothesis' length-normalized score)."""

  tokens: jnp.ndarray
  scores: jnp.ndarray


def generate(module: EncoderDecoder, params, encoder_tokens, task_ids=None,
             config: DecodeConfig = DecodeConfig(), rng=None) -> Generated:
  """Decodes ``encoder_tokens: [b, l]`` (0 = padding) for tasks ``task_ids: [b]``; jit it with
  ``config`` static. ``params`` placed on a mesh and a batch sharded over ``data`` keep the
  decoding data-parallel. Sampling draws from ``rng`` (default: ``PRNGKey(config.seed)``)."""
  encoded = module.apply({"params": params}, encoder_tokens, enable_dropout=False,
                         task_ids=task_ids, method=EncoderDecoder.encode)
  beams = config.num_beams if config.method == "beam" else 1
  repeat = lambda x: None if x is None else jnp.repeat(x, beams, axis=0)
  make_steps = cached_steps if config.use_cache else recomputing_steps
  steps = make_steps(module, params, repeat(encoded), repeat(encoder_tokens), repeat(task_ids),
                     config.max_decode_length)
  if config.method == "beam":
    return beam_search(steps, encoder_tokens.shape[0], config)
  return _one_path(steps, encoder_tokens.shape[0], config,
                   jax.random.PRNGKey(config.seed) if rng is None else rng)


def _choose(config: DecodeConfig, key):
  """``(log_probs [n, V], t) -> tokens [n]``: the argmax, or a draw with ``key`` at
  ``temperature`` from the ``top_k`` most likely tokens."""
  if config.method == "greedy":
    return lambda log_probs, t: jnp.argmax(log_probs, axis=-1)

  def sample(log_probs, t):
    logits = log_probs / config.temperature
    if config.top_k:
      kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(jax.random.fold_in(key, t), logits)

  return sample


def _one_path(steps: Steps, batch: int, config: DecodeConfig, key) -> Generated:
  """Greedy or sampled decoding: one token per row and step until every row has its EOS."""
  length, choose = config.max_decode_length, _choose(config, key)

  def running(state):
    t, _, finished, _, _ = state
    return (t < length) & ~finished.all()

  def advance(state):
    t, tokens, finished, scores, carry = state
    log_probs, carry = steps.step(carry, tokens, t)
    token = jnp.where(finished, 0, choose(log_probs, t))
    scores = scores + jnp.where(finished, 0.0, jnp.take_along_axis(
        log_probs, token[:, None], axis=-1)[:, 0])
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], t + 1, axis=1)
    return t + 1, tokens, finished | (token == config.eos_id), scores, carry

  state = (jnp.int32(0), jnp.zeros((batch, length + 1), jnp.int32), jnp.zeros((batch,), bool),
           jnp.zeros((batch,)), steps.carry)
  _, tokens, _, scores, _ = jax.lax.while_loop(running, advance, state)
  return Generated(tokens[:, 1:], scores)


def _length_penalty(config: DecodeConfig, length):
  if config.beam_scoring == "t5x":
    return ((5.0 + length) / 6.0) ** config.length_penalty
  return jnp.asarray(length, jnp.float32) ** config.length_penalty


def _gather(x, index):
  """``x[i, index[i, j]]`` for ``x: [b, m, ...]``, ``index: [b, j]``."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


@struct.dataclass
class _Beams:
  """Beam-search state: ``running_*`` ``[b, k, ...]`` the live beams, ``finished_*`` the best
  ``k`` ended hypotheses (``-1e9`` scores until there are), ``open: [b]`` whether a running
  beam can still beat the worst finished one."""

  t: jnp.ndarray
  running_tokens: jnp.ndarray
  running_scores: jnp.ndarray
  finished_tokens: jnp.ndarray
  finished_scores: jnp.ndarray
  is_finished: jnp.ndarray
  open: jnp.ndarray
  all_ended: jnp.ndarray
  carry: object


def beam_search(steps: Steps, batch: int, config: DecodeConfig) -> Generated:
  """Hugging Face's beam search (``early_stopping=True``) over ``steps`` of ``batch * k`` rows."""
  beams, length, eos = config.num_beams, config.max_decode_length, config.eos_id
  candidates = 2 * beams  # one EOS id: Hugging Face keeps (1 + #eos) * k, at least 2k
  in_first_k = jnp.arange(candidates) < beams

  def running(s: _Beams):
    return (s.t < length) & s.open.any() & ~s.is_finished.all() & ~s.all_ended

  def advance(s: _Beams) -> _Beams:
    log_probs, carry = steps.step(s.carry, s.running_tokens.reshape(batch * beams, -1), s.t)
    vocab = log_probs.shape[-1]
    totals = (log_probs.reshape(batch, beams, vocab) + s.running_scores[..., None])
    top_scores, top_index = jax.lax.top_k(totals.reshape(batch, beams * vocab), candidates)
    parents, tokens = top_index // vocab, top_index % vocab
    top_tokens = _gather(s.running_tokens, parents).at[:, :, s.t + 1].set(tokens)
    ended = (tokens == eos) | (s.t + 1 >= length)

    live_scores = top_scores + ended * NEG_INF
    keep = jax.lax.top_k(live_scores, beams)[1]
    rows = (jnp.arange(batch)[:, None] * beams + _gather(parents, keep)).reshape(-1)

    just_finished = ended & in_first_k[None]
    full = s.is_finished.all(axis=-1, keepdims=True)
    scored = (top_scores / _length_penalty(config, s.t + 1) + full * NEG_INF
              + ~s.open[:, None] * NEG_INF + ~just_finished * NEG_INF)
    merged_scores = jnp.concatenate([s.finished_scores, scored], axis=1)
    best = jax.lax.top_k(merged_scores, beams)[1]
    finished_scores = _gather(merged_scores, best)
    finished_tokens = _gather(jnp.concatenate([s.finished_tokens, top_tokens], axis=1), best)
    is_finished = _gather(jnp.concatenate([s.is_finished, just_finished], axis=1), best)

    running_scores = _gather(live_scores, keep)
    best_possible = running_scores[:, :1] / _length_penalty(config, s.t + 1)
    worst_finished = jnp.where(is_finished, finished_scores.min(axis=1, keepdims=True), NEG_INF)
    return _Beams(s.t + 1, _gather(top_tokens, keep), running_scores, finished_tokens,
                  finished_scores, is_finished, s.open & (best_possible > worst_finished).any(-1),
                  ended.all(), steps.reorder(carry, rows))

  shape = (batch, beams)
  state = _Beams(
      jnp.int32(0), jnp.zeros((*shape, length + 1), jnp.int32),
      jnp.zeros(shape).at[:, 1:].set(NEG_INF), jnp.zeros((*shape, length + 1), jnp.int32),
      jnp.full(shape, NEG_INF), jnp.zeros(shape, bool), jnp.ones((batch,), bool),
      jnp.array(False), steps.carry)
  final = jax.lax.while_loop(running, advance, state)
  return Generated(final.finished_tokens[:, 0, 1:], final.finished_scores[:, 0])
