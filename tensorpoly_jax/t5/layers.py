"""T5X-style T5 layers (names and logical axes as T5X's ``examples/t5/layers.py``) whose dense
projections can carry an adapter: attention, MLP, RMS norm, embedding, relative position biases."""
from __future__ import annotations

import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct
from flax.linen import partitioning
from jax import lax

from tensorpoly_jax.methods import AdapterConfig

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def canonicalize_tuple(x):
  return tuple(x) if isinstance(x, Iterable) else (x,)


def normalize_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
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
  def __call__(self, inputs, task_ids=None, *, routing_weights=None, deterministic=True,
               decode=False):
    features = canonicalize_tuple(self.features)
    axis = normalize_axes(canonicalize_tuple(self.axis), inputs.ndim)
    inputs = jnp.asarray(inputs, self.dtype)
    in_shape = tuple(inputs.shape[ax] for ax in axis)
    kernel = partitioning.param_with_axes(
        "kernel", self.kernel_init, (math.prod(in_shape), math.prod(features)), jnp.float32,
        axes=self.kernel_axes or None)
    kernel = jnp.asarray(kernel, self.dtype).reshape(in_shape + features)
    outputs = lax.dot_general(inputs, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
    if self.adapter is None or not self.adapter.matches("/".join(self.path)):
      return outputs
    return outputs + self.adapter.dense_delta(inputs, axis, outputs.shape, self.kernel_axes,
                                              self.dtype, task_ids, routing_weights, deterministic,
                                              decode)


@struct.dataclass
class Routing:
  """What adapted layers route on: ``task_ids: int[B]`` and, with a router shared across layers,
  its weights ``[B, H, S]`` (computed once per batch). ``decode``: adapters keep their factors in
  the ``cache`` collection (built on the cache's first call, read at every later step)."""

  task_ids: jnp.ndarray | None = None
  weights: jnp.ndarray | None = None
  decode: bool = struct.field(pytree_node=False, default=False)


def _dense(routing: Routing | None, deterministic: bool, **dense_kwargs):
  """A DenseGeneral applied with the batch's routing."""
  layer = DenseGeneral(**dense_kwargs)
  routing = routing or Routing()
  return lambda x: layer(x, routing.task_ids, routing_weights=routing.weights,
                         deterministic=deterministic, decode=routing.decode)


class LayerNorm(nn.Module):
  """T5's RMS norm (no mean, no bias), computed in float32."""

  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.asarray(x, jnp.float32)
    scale = partitioning.param_with_axes("scale", nn.initializers.ones, (x.shape[-1],),
                                         jnp.float32, axes=("embed",))
    normed = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return jnp.asarray(normed * scale, self.dtype)


class Embed(nn.Module):
  """Token embedding ``[vocab, embed]``; ``attend`` gives logits against it (tied output layer)."""

  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  embedding_init: Any = nn.initializers.normal(stddev=1.0)

  def setup(self):
    self.embedding = partitioning.param_with_axes(
        "embedding", self.embedding_init, (self.num_embeddings, self.features), jnp.float32,
        axes=("vocab", "embed"))

  def __call__(self, tokens):
    return jnp.asarray(jnp.take(self.embedding, tokens, axis=0), self.dtype)

  def attend(self, query):
    return jnp.einsum("bld,vd->blv", query, jnp.asarray(self.embedding, query.dtype))


def relative_position_buckets(query_len: int, key_len: int, bidirectional: bool,
                              num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's log-spaced buckets of ``key - query`` offsets, ``int[q, k]`` (float32 as HF computes it)."""
  relative = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
  buckets = np.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative > 0) * num_buckets
    distance = np.abs(relative)
  else:
    distance = np.maximum(-relative, 0)
  max_exact = num_buckets // 2
  # distance 0 takes the exact branch; clamping keeps log finite there.
  log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
  large = max_exact + (log_ratio / np.float32(math.log(max_distance / max_exact))
                       * np.float32(num_buckets - max_exact)).astype(np.int64).clip(0)
  large = np.minimum(large, num_buckets - 1)
  return buckets + np.where(distance < max_exact, distance, large)


class RelativePositionBiases(nn.Module):
  """Per-head attention bias from bucketed relative positions, ``[1, heads, q, k]``."""

  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Any = jnp.float32
  embedding_init: Any = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")

  @nn.compact
  def __call__(self, query_len: int, key_len: int, bidirectional: bool = True):
    buckets = relative_position_buckets(query_len, key_len, bidirectional, self.num_buckets,
                                        self.max_distance)
    rel_embedding = partitioning.param_with_axes(
        "rel_embedding", self.embedding_init, (self.num_heads, self.num_buckets), jnp.float32,
        axes=("heads", "relpos_buckets"))
    return jnp.asarray(rel_embedding[:, buckets][None], self.dtype)


def make_attention_mask(query_valid, key_valid, dtype=jnp.float32):
  """``[b, q]``, ``[b, k]`` -> ``[b, 1, q, k]`` (1 where both positions are real tokens)."""
  return jnp.asarray(query_valid[:, None, :, None] & key_valid[:, None, None, :], dtype)


def make_decoder_mask(decoder_target_tokens, dtype=jnp.float32):
  """Causal mask combined with the target padding mask, ``[b, 1, t, t]``."""
  length = decoder_target_tokens.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
  valid = decoder_target_tokens > 0
  return jnp.asarray(causal & valid[:, None, :, None] & valid[:, None, None, :], dtype)


# Logical axes of the attention cache's keys and values, ``[b, length, heads, kv]``.
CACHE_AXES = ("batch", "length", "heads", "kv")


class MultiHeadDotProductAttention(nn.Module):
  """T5 attention: no 1/sqrt(d) on logits (folded into the query init), additive mask bias.

  With ``decode``, keys and values live in the ``cache`` collection (T5X's pattern): the call that
  creates the cache sizes it (``cache_length``, else the inputs' length), writes nothing, and
  attends within its inputs under the ``mask`` given (decoding passes none: that call's outputs
  are not used); each later call takes one token, writes its key and value at ``cache_index`` and
  attends to the positions written so far, with row ``cache_index`` of ``bias``. Cross-attention
  (``cross_attention``) caches the projected encoder output whole on the first call instead.
  """

  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  kernel_init: Any = default_kernel_init
  float32_logits: bool = True
  adapter: AdapterConfig | None = None
  cross_attention: bool = False

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, mask=None, bias=None, routing=None, *,
               deterministic=True, decode=False, cache_length=None):
    depth_scaling = math.sqrt(self.head_dim)
    projection = dict(features=(self.num_heads, self.head_dim), kernel_axes=("embed", "joined_kv"),
                      dtype=self.dtype, adapter=self.adapter)
    query = _dense(routing, deterministic, name="query",
                   kernel_init=lambda *a: self.kernel_init(*a) / depth_scaling, **projection)(inputs_q)
    # The encoder output's keys and values are projected once: their adapters keep no factors.
    kv_routing = routing.replace(decode=False) if routing and self.cross_attention else routing
    project = lambda name: _dense(kv_routing, deterministic, name=name,
                                  kernel_init=self.kernel_init, **projection)(inputs_kv)
    if decode and self.cross_attention:
      key, value = (partitioning.variable_with_axes("cache", f"cached_{name}", project, name,
                                                    axes=CACHE_AXES).value
                    for name in ("key", "value"))
    else:
      key, value = project("key"), project("value")
      if decode:
        key, value, mask, bias = self._extend_cache(key, value, mask, bias, cache_length)
    logits_dtype = jnp.float32 if self.float32_logits else self.dtype
    logits = jnp.einsum("bqhd,bkhd->bhqk", jnp.asarray(query, logits_dtype),
                        jnp.asarray(key, logits_dtype))
    if mask is not None:
      logits = logits + jnp.where(mask > 0, 0.0, -1e10).astype(logits_dtype)
    if bias is not None:
      logits = logits + jnp.asarray(bias, logits_dtype)
    weights = jax.nn.softmax(logits).astype(self.dtype)
    if self.dropout_rate > 0.0 and not deterministic:
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout_rate, weights.shape)
      weights = weights * keep / (1.0 - self.dropout_rate)
    context = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return _dense(routing, deterministic, name="out", features=inputs_q.shape[-1], axis=(-2, -1),
                  kernel_axes=("joined_kv", "embed"), kernel_init=self.kernel_init,
                  dtype=self.dtype, adapter=self.adapter)(context)

  def _extend_cache(self, key, value, mask, bias, cache_length):
    """``(keys, values, mask, bias)`` to attend with: the cache's, after writing this step's key
    and value ``[b, 1, h, d]`` at ``cache_index``; the inputs' own on the call that creates it."""
    created = not self.has_variable("cache", "cached_key")
    batch, length = key.shape[0], cache_length or key.shape[1]
    cached_key, cached_value = (partitioning.variable_with_axes(
        "cache", name, jnp.zeros, (batch, length, self.num_heads, self.head_dim), key.dtype,
        axes=CACHE_AXES) for name in ("cached_key", "cached_value"))
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if created:
      steps = key.shape[1]
      return key, value, mask, None if bias is None else bias[..., :steps, :steps]
    if key.shape[1] != 1:
      raise ValueError(f"a decoding step takes one token per example, got {key.shape[1]}.")
    index = cache_index.value
    cached_key.value = lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
    cached_value.value = lax.dynamic_update_slice(cached_value.value, value, (0, index, 0, 0))
    cache_index.value = index + 1
    written = (jnp.arange(cached_key.value.shape[1]) <= index)[None, None, None, :]
    mask = written if mask is None else written & (mask > 0)
    if bias is not None:
      bias = lax.dynamic_slice_in_dim(bias, index, 1, axis=-2)
    return cached_key.value, cached_value.value, mask, bias


class MlpBlock(nn.Module):
  """T5 FFN: ``wi`` (one activation, v1.0 ReLU) or gated ``wi_0``/``wi_1`` (v1.1 gated-GELU), then ``wo``."""

  intermediate_dim: int
  activations: tuple[str, ...] = ("relu",)
  kernel_init: Any = default_kernel_init
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  adapter: AdapterConfig | None = None

  @nn.compact
  def __call__(self, inputs, routing=None, *, deterministic=True):
    hidden = 1.0
    for index, activation in enumerate(self.activations):
      name = "wi" if len(self.activations) == 1 else f"wi_{index}"
      projected = _dense(routing, deterministic, features=self.intermediate_dim,
                         kernel_axes=("embed", "mlp"), kernel_init=self.kernel_init,
                         dtype=self.dtype, adapter=self.adapter, name=name)(inputs)
      hidden = hidden * _activation(activation)(projected)
    hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(hidden, deterministic=deterministic)
    return _dense(routing, deterministic, features=inputs.shape[-1], kernel_axes=("mlp", "embed"),
                  kernel_init=self.kernel_init, dtype=self.dtype, adapter=self.adapter,
                  name="wo")(hidden)


def _activation(name: str):
  if name == "linear":
    return lambda x: x
  if name in ("gelu", "gelu_new"):  # HF T5 v1.1's gelu_new is the tanh approximation
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "relu":
    return jax.nn.relu
  raise ValueError(f"unknown activation {name!r}; use relu, gelu or linear.")
