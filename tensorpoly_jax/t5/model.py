"""T5 encoder-decoder (v1.0, v1.1 / LM-adapted / T0) with adapters injected by module path.

The call signature follows T5X's ``network.Transformer`` plus ``task_ids``, so T5X's
``EncoderDecoderModel`` can drive it; param names and logical axes follow T5X too.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util
from flax.core import unfreeze
from flax.linen import partitioning as nn_partitioning

from tensorpoly_jax import field_types
from tensorpoly_jax.adapters.base import FACTORS
from tensorpoly_jax.methods import AdapterConfig
from tensorpoly_jax.param_roles import is_adapter_path, param_role
from tensorpoly_jax.routing import ROUTING_RNG, Router
from tensorpoly_jax.t5 import layers, stack_factors


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Backbone sizes (T5X ``T5Config`` names) plus the adapter to inject."""

  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  head_dim: int = 64
  mlp_dim: int = 1024
  mlp_activations: tuple[str, ...] = ("gelu", "linear")
  logits_via_embedding: bool = False
  dropout_rate: float = 0.0
  num_buckets: int = 32
  max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dtype: Any = jnp.float32
  remat: str = "none"  # "none", "full" (recompute each block) or "dots" (save matmul outputs)
  scan_layers: bool = False  # one nn.scan over each stack's blocks, params stacked on "layers"
  # Each stack builds every adapted layer's factors before its blocks, one vectorized pass per
  # adapted projection (``stack_factors``); False: each layer builds its own inside its block.
  hoist_factors: bool = True
  adapter: AdapterConfig | None = None

  def __post_init__(self):
    if isinstance(self.remat, bool):  # configs written before remat policies: True was "full"
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r} is unknown; choose one of {sorted(REMAT_POLICIES)}"
                       " (gin: model_config.remat / REMAT).")
    if self.scan_layers and self.adapter is not None and "layers_" in self.adapter.targets:
      raise ValueError(
          f"adapter targets {self.adapter.targets!r} name single layers, but scanned layers share"
          " one module per stack; select modules by name only, or set scan_layers=False.")

  def replace(self, **changes) -> "T5Config":
    return dataclasses.replace(self, **changes)


# What a rematerialized block keeps from its forward pass for the backward pass.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


_V1_1 = dict(vocab_size=32128, head_dim=64, mlp_activations=("gelu", "linear"),
             logits_via_embedding=False)
PRESETS: dict[str, T5Config] = {
    "tiny": T5Config(vocab_size=512, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
                     num_encoder_layers=2, num_decoder_layers=2),
    "t5_1_1_small": T5Config(**_V1_1, emb_dim=512, num_heads=6, mlp_dim=1024,
                             num_encoder_layers=8, num_decoder_layers=8),
    "t5_1_1_base": T5Config(**_V1_1, emb_dim=768, num_heads=12, mlp_dim=2048,
                            num_encoder_layers=12, num_decoder_layers=12),
    "t5_1_1_large": T5Config(**_V1_1, emb_dim=1024, num_heads=16, mlp_dim=2816,
                             num_encoder_layers=24, num_decoder_layers=24),
    # Scanned: compile time and HLO size stay flat in depth at the sizes that run on pods.
    "t5_1_1_xl": T5Config(**_V1_1, emb_dim=2048, num_heads=32, mlp_dim=5120,
                          num_encoder_layers=24, num_decoder_layers=24, scan_layers=True),
    "t5_1_1_xxl": T5Config(**_V1_1, emb_dim=4096, num_heads=64, mlp_dim=10240,
                           num_encoder_layers=24, num_decoder_layers=24, scan_layers=True),
}
# T0 is T5 v1.1 LM-adapted (same shapes as v1.1 xl / xxl), multitask prompted.
PRESETS["t0_3b"] = PRESETS["t5_1_1_xl"]
PRESETS["t0_11b"] = PRESETS["t5_1_1_xxl"]


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def preset(name: str, **overrides) -> T5Config:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
  return PRESETS[name].replace(**overrides)


def dtype_named(name: str):
  if name not in DTYPES:
    raise ValueError(f"dtype {name!r} is unknown; choose one of {sorted(DTYPES)}.")
  return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How a run computes, set by gin over whatever architecture a checkpoint holds: compute dtype,
  rematerialization policy, dropout, and (``None``: as the preset says) scanned layers."""

  dtype: str = "float32"
  remat: str = "none"
  dropout_rate: float = 0.0
  scan_layers: bool | None = None

  def __post_init__(self):
    field_types.check(self)
    dtype_named(self.dtype)
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"RunOptions.remat={self.remat!r} is unknown; choose one of"
                       f" {sorted(REMAT_POLICIES)}.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"RunOptions.dropout_rate must be in [0, 1), got {self.dropout_rate}.")

  def apply(self, config: T5Config) -> T5Config:
    scan = config.scan_layers if self.scan_layers is None else self.scan_layers
    return config.replace(dtype=dtype_named(self.dtype), remat=self.remat,
                          dropout_rate=self.dropout_rate, scan_layers=scan)


class EncoderLayer(nn.Module):
  """One encoder block; returns ``(x, None)`` under scan (a scan body's carry and output)."""

  config: T5Config
  deterministic: bool

  @nn.compact
  def __call__(self, inputs, bias, encoder_mask, routing):
    cfg, deterministic = self.config, self.deterministic
    x = layers.LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_attention_layer_norm")(inputs)
    x = layers.MultiHeadDotProductAttention(
        cfg.num_heads, cfg.head_dim, cfg.dtype, cfg.dropout_rate, adapter=cfg.adapter,
        name="attention")(x, x, encoder_mask, bias, routing, deterministic=deterministic)
    x = _dropout(cfg, x, deterministic) + inputs
    y = layers.LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_mlp_layer_norm")(x)
    y = _mlp(cfg)(y, routing, deterministic=deterministic)
    y = _dropout(cfg, y, deterministic) + x
    return (y, None) if cfg.scan_layers else y


class DecoderLayer(nn.Module):
  """One decoder block; returns ``(y, None)`` under scan. ``decode``: one token per call, with
  keys and values cached (``layers.MultiHeadDotProductAttention``) up to ``cache_length``."""

  config: T5Config
  deterministic: bool
  decode: bool = False
  cache_length: int | None = None

  @nn.compact
  def __call__(self, inputs, encoded, bias, decoder_mask, encoder_decoder_mask, routing):
    cfg, deterministic = self.config, self.deterministic
    x = layers.LayerNorm(cfg.layer_norm_epsilon, cfg.dtype,
                         name="pre_self_attention_layer_norm")(inputs)
    x = layers.MultiHeadDotProductAttention(
        cfg.num_heads, cfg.head_dim, cfg.dtype, cfg.dropout_rate, adapter=cfg.adapter,
        name="self_attention")(x, x, decoder_mask, bias, routing, deterministic=deterministic,
                               decode=self.decode, cache_length=self.cache_length)
    x = _dropout(cfg, x, deterministic) + inputs
    y = layers.LayerNorm(cfg.layer_norm_epsilon, cfg.dtype,
                         name="pre_cross_attention_layer_norm")(x)
    y = layers.MultiHeadDotProductAttention(
        cfg.num_heads, cfg.head_dim, cfg.dtype, cfg.dropout_rate, adapter=cfg.adapter,
        cross_attention=True, name="encoder_decoder_attention")(
            y, encoded, encoder_decoder_mask, None, routing, deterministic=deterministic,
            decode=self.decode)
    y = _dropout(cfg, y, deterministic) + x
    z = layers.LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_mlp_layer_norm")(y)
    z = _mlp(cfg)(z, routing, deterministic=deterministic)
    z = _dropout(cfg, z, deterministic) + y
    return (z, None) if cfg.scan_layers else z


def _mlp(cfg: T5Config):
  return layers.MlpBlock(cfg.mlp_dim, tuple(cfg.mlp_activations), dropout_rate=cfg.dropout_rate,
                         dtype=cfg.dtype, adapter=cfg.adapter, name="mlp")


def _dropout(cfg: T5Config, x, deterministic):
  return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


def _relpos(cfg: T5Config):
  return layers.RelativePositionBiases(cfg.num_buckets, cfg.max_distance, cfg.num_heads,
                                       cfg.dtype, name="relpos_bias")


def _lora_in_compute_dtype(dtype):
  """Casts the LoRA factors (role ``lora``) of a scanned stack's params to ``dtype`` for all
  layers at once. The adapters cast them at use anyway; inside the scanned body that cast would
  run per layer in the forward, its recomputation and the backward. Tensor leaves (role
  ``leaf``) stay as they are: TLoRA and TensorPoly-I build from them in float32."""
  def cast(params):
    flat = traverse_util.flatten_dict(unfreeze(params))
    return traverse_util.unflatten_dict({
        path: jnp.asarray(value, dtype) if param_role(path) == "lora" else value
        for path, value in flat.items()})
  return cast


def _built_factors(stack: nn.Module, num_layers: int, routing: layers.Routing,
                   deterministic: bool, decode: bool = False):
  """The adapters' factors of every block of ``stack`` (an ``Encoder`` or ``Decoder``), built
  before the blocks run (``stack_factors``): stacked on the layers axis when scanned, else one
  ``FACTORS`` collection per block. ``None`` where the blocks build their own: initializing
  (the params do not exist yet), decoding (the factors are cached), ``hoist_factors`` off, or no
  adapter whose factors are built."""
  cfg = stack.config
  if cfg.adapter is None or not cfg.hoist_factors or decode or stack.is_initializing():
    return None
  samples = (getattr(cfg.adapter, "relaxed_bernoulli", False) and not deterministic
             and routing.weights is None)
  routing_rng = stack.make_rng(ROUTING_RNG) if samples else None
  params = stack.variables["params"]
  build = dict(routing=routing, deterministic=deterministic, routing_rng=routing_rng,
               rematerialize=cfg.remat != "none")
  if cfg.scan_layers:
    return stack_factors.stacked(cfg.adapter, cfg.dtype, params["layers"], **build) or None
  factors = stack_factors.per_layer(
      cfg.adapter, cfg.dtype, [params[f"layers_{index}"] for index in range(num_layers)], **build)
  return factors if any(factors) else None


def _reading(block_cls, factors: dict):
  """``block_cls`` whose adapters read ``factors`` (the ``FACTORS`` collection) instead of
  building theirs."""
  return nn.map_variables(block_cls, FACTORS, lambda variables: {**variables, FACTORS: factors})


def _run_blocks(block_cls, cfg: T5Config, num_layers: int, deterministic: bool, x, shared,
                initializing: bool, factors=None, **block_fields):
  """Applies ``num_layers`` blocks to ``x``; ``shared()`` gives the other inputs every block
  takes. As modules ``layers_0..`` or, with ``scan_layers``, as one scanned module ``layers``
  whose params (and decoding cache) carry a leading ``layers`` axis (T5X's ``scan_layers``
  layout). ``factors``: the adapters' factors built before the blocks (``_built_factors``);
  ``block_fields`` are the blocks' own fields beyond the config; ``initializing``: the calling
  module's ``is_initializing()``."""
  decode = block_fields.get("decode", False)
  if cfg.remat != "none" and not decode:
    # Under scan, the loop already keeps XLA from merging recomputation into the forward pass.
    block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[cfg.remat],
                         prevent_cse=not cfg.scan_layers)
  if not cfg.scan_layers:
    for index in range(num_layers):
      block = block_cls if not factors or not factors[index] else _reading(block_cls,
                                                                           factors[index])
      # shared() per block: its bias lookup's gradient then sums per layer in the same order as
      # T5X's per-layer T5 (and this project's results before scan), bit for bit.
      x = block(cfg, deterministic, **block_fields, name=f"layers_{index}")(x, *shared())
    return x
  inputs = shared()
  collections = ("params", "cache") if decode else ("params",)
  variable_axes = dict.fromkeys(collections + ((FACTORS,) if factors else ()), 0)
  scanned = nn_partitioning.scan_with_axes(
      block_cls, variable_axes=variable_axes,
      split_rngs={"params": True, "dropout": True, ROUTING_RNG: True},
      in_axes=(nn.broadcast,) * len(inputs), length=num_layers, axis_name="layers",
      axes_collections=collections)
  if not initializing:
    scanned = nn.map_variables(scanned, "params", _lora_in_compute_dtype(cfg.dtype))
  if factors:
    scanned = _reading(scanned, factors)
  x, _ = scanned(cfg, deterministic, **block_fields, name="layers")(x, *inputs)
  return x


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens, encoder_mask, routing, deterministic):
    cfg = self.config
    relpos = _relpos(cfg)  # one module (its params) shared by every block
    x = _dropout(cfg, self.shared_embedding(tokens.astype("int32")), deterministic)
    length = x.shape[-2]
    x = _run_blocks(EncoderLayer, cfg, cfg.num_encoder_layers, deterministic, x,
                    lambda: (relpos(length, length, True), encoder_mask, routing),
                    self.is_initializing(),
                    _built_factors(self, cfg.num_encoder_layers, routing, deterministic))
    x = layers.LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="encoder_norm")(x)
    return _dropout(cfg, x, deterministic)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded, decoder_input_tokens, decoder_mask, encoder_decoder_mask, routing,
               deterministic, decode=False, max_decode_length=None):
    cfg = self.config
    relpos = _relpos(cfg)
    y = _dropout(cfg, self.shared_embedding(decoder_input_tokens.astype("int32")), deterministic)
    # Decoding steps see one position; their bias rows come from the whole decode length's.
    length = (max_decode_length if decode else None) or y.shape[-2]
    y = _run_blocks(DecoderLayer, cfg, cfg.num_decoder_layers, deterministic, y,
                    lambda: (encoded, relpos(length, length, False), decoder_mask,
                             encoder_decoder_mask, routing), self.is_initializing(),
                    _built_factors(self, cfg.num_decoder_layers, routing, deterministic, decode),
                    decode=decode, cache_length=length)
    y = layers.LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="decoder_norm")(y)
    y = _dropout(cfg, y, deterministic)
    if cfg.logits_via_embedding:  # v1.0: tied output layer, rescaled as T5 does
      return self.shared_embedding.attend(y) / jnp.sqrt(jnp.asarray(y.shape[-1], y.dtype))
    return layers.DenseGeneral(cfg.vocab_size, dtype=jnp.float32, kernel_axes=("embed", "vocab"),
                               name="logits_dense")(y)


class EncoderDecoder(nn.Module):
  """T5 with adapters: ``__call__`` takes T5X's arguments plus ``task_ids: int[B]``."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype, name="token_embedder")
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)
    adapter = cfg.adapter
    shared = adapter is not None and adapter.routed and adapter.shared_router
    self.shared_router = Router(adapter.n_tasks, adapter.routing_heads, adapter.routed_skills,
                                relaxed_bernoulli=adapter.relaxed_bernoulli) if shared else None

  def routing(self, task_ids, deterministic=True) -> layers.Routing:
    """Routing for the batch; a shared router's weights are computed here, once."""
    if self.shared_router is None or task_ids is None:
      return layers.Routing(task_ids)
    return layers.Routing(task_ids, self.shared_router(task_ids, deterministic=deterministic))

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, enable_dropout=True,
             task_ids=None, routing=None):
    _check_unpacked(encoder_segment_ids=encoder_segment_ids)
    valid = encoder_input_tokens > 0
    mask = layers.make_attention_mask(valid, valid, self.config.dtype)
    routing = routing or self.routing(task_ids, not enable_dropout)
    return self.encoder(encoder_input_tokens, mask, routing, not enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
             encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None,
             enable_dropout=True, decode=False, max_decode_length=None, task_ids=None,
             routing=None):
    """Decoder logits ``[b, t, vocab]``.

    ``decode``: incremental decoding with the ``cache`` collection mutable. The call without a
    cache creates it for ``max_decode_length`` positions (default: the inputs' length), caching
    ``encoded``'s cross-attention keys and values and each adapted layer's factors for the
    batch's ``task_ids`` (so pass the real encoder output and task ids to that call); every later
    call takes one token per example, ``[b, 1]``, and needs no task ids.
    """
    _check_unpacked(encoder_segment_ids=encoder_segment_ids,
                    decoder_segment_ids=decoder_segment_ids, decoder_positions=decoder_positions)
    dtype = self.config.dtype
    # Decoding attends to every position written so far: generated tokens are never padding.
    query_valid = jnp.ones_like(decoder_target_tokens, bool) if decode else decoder_target_tokens > 0
    decoder_mask = None if decode else layers.make_decoder_mask(decoder_target_tokens, dtype)
    cross_mask = layers.make_attention_mask(query_valid, encoder_input_tokens > 0, dtype)
    routing = (routing or self.routing(task_ids, not enable_dropout)).replace(decode=decode)
    return self.decoder(encoded, decoder_input_tokens, decoder_mask, cross_mask, routing,
                        not enable_dropout, decode, max_decode_length)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, *, enable_dropout: bool = True, decode: bool = False,
               task_ids=None):
    _check_unpacked(encoder_segment_ids=encoder_segment_ids,
                    decoder_segment_ids=decoder_segment_ids, encoder_positions=encoder_positions,
                    decoder_positions=decoder_positions)
    routing = self.routing(task_ids, not enable_dropout)
    encoded = self.encode(encoder_input_tokens, enable_dropout=enable_dropout, routing=routing)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                       enable_dropout=enable_dropout, decode=decode, routing=routing)


def _check_unpacked(**packing_features) -> None:
  """T5X passes these for packed batches; this model attends within one example per row."""
  given = [name for name, value in packing_features.items() if value is not None]
  if given:
    raise NotImplementedError(
        f"packed examples are not supported ({', '.join(given)} given); feed unpacked batches"
        " (seqio feature converter pack=False, T5X DatasetConfig.pack = False).")


@functools.lru_cache(maxsize=32)
def abstract_variables(model: EncoderDecoder):
  """Shapes and logical axes of every variable, with no memory allocated (cached per model)."""
  tokens = jnp.ones((1, 4), jnp.int32)
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False,
      task_ids=jnp.zeros((1,), jnp.int32)))


def split_params(params, trained: Callable[[tuple[str, ...]], bool] = is_adapter_path
                 ) -> tuple[dict, dict]:
  """``(params whose path is trained, the others)``, by default ``(adapter params, frozen
  backbone params)``, as two flat-path dicts' nested forms."""
  flat = traverse_util.flatten_dict(unfreeze(params))
  return (traverse_util.unflatten_dict({k: v for k, v in flat.items() if trained(k)}),
          traverse_util.unflatten_dict({k: v for k, v in flat.items() if not trained(k)}))


def merge_params(adapter, backbone) -> dict:
  flat = traverse_util.flatten_dict(unfreeze(backbone))
  flat.update(traverse_util.flatten_dict(unfreeze(adapter)))
  return traverse_util.unflatten_dict(flat)


# Run options, not architecture: a checkpoint neither records nor imposes them.
RUN_FIELDS = ("adapter", "dtype", "remat", "dropout_rate", "hoist_factors")


def describe(config: T5Config) -> str:
  """One line for a run's start: sizes, compute, layout, and the adapter's settings."""
  layout = ", scanned" if config.scan_layers else ""
  remat = "" if config.remat == "none" else f", remat {config.remat}"
  line = (f"T5 {config.num_encoder_layers}+{config.num_decoder_layers} layers, d_model"
          f" {config.emb_dim}, {config.num_heads} heads x {config.head_dim}, mlp {config.mlp_dim},"
          f" vocab {config.vocab_size}, {jnp.dtype(config.dtype).name}{layout}{remat}")
  if config.adapter is None:
    return line
  fields = {k: v for k, v in config.adapter.to_dict().items() if k not in ("method", "targets")}
  settings = ", ".join(f"{k}={v}" for k, v in fields.items())
  return f"{line}; adapter {config.adapter.method}({settings}) on {config.adapter.targets!r}"


def config_to_dict(config: T5Config) -> dict:
  """The architecture fields of a config as JSON values (``scan_layers`` included: it is the
  params' layout)."""
  fields = dataclasses.asdict(config.replace(adapter=None))
  for name in RUN_FIELDS:
    fields.pop(name)
  fields["mlp_activations"] = list(fields["mlp_activations"])
  return fields


def config_from_dict(fields: dict, **overrides) -> T5Config:
  fields = dict(fields, mlp_activations=tuple(fields["mlp_activations"]))
  return T5Config(**fields).replace(**overrides)
