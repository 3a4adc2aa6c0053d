"""T5X glue: an ``EncoderDecoderModel`` that routes with the batch's ``task_id`` feature, gin
configurables for the module, and the partitioning / Adafactor rules of the adapter axes.

Needs T5X, which is not on PyPI: ``pip install git+https://github.com/google-research/t5x``.
The adapter layers never import T5X; only this module does. A T5X gin file uses it as::

  from __gin__ import dynamic_registration
  from tensorpoly_jax import t5x_bridge
  MODEL = @t5x_bridge.EncoderDecoderModel()
  t5x_bridge.EncoderDecoderModel.module = @t5x_bridge.t5_module()

(``configs/t5x/<method>.gin`` are complete model files; ``configs/t5x/runs/finetune_adapters.gin``
restores a backbone-only T5X checkpoint into them.)
"""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp

# Before T5X imports TensorFlow: the data package makes it quiet and CPU-only.
from tensorpoly_jax import data  # noqa: F401

try:
  from t5x import adafactor, models, optimizers
  from t5x import decoding as t5x_decoding
except ImportError as err:  # pragma: no cover - depends on the environment
  raise ImportError(
      "tensorpoly_jax.t5x_bridge needs T5X: pip install git+https://github.com/google-research/t5x"
      " (tensorpoly_jax's own trainer and `tensorpoly` CLI do not)."
  ) from err

from tensorpoly_jax import configurables  # noqa: F401 (configs/adapters/*.gin bind the method configs)
from tensorpoly_jax import decoding
from tensorpoly_jax.data.tasks import TASK_FEATURE, RoutedEncDecFeatureConverter
from tensorpoly_jax.methods import AdapterConfig
from tensorpoly_jax.param_roles import ADAPTER_MODULES, is_adapter_path
from tensorpoly_jax.partitioning import DEFAULT_RULES
from tensorpoly_jax.routing import ROUTING_RNG
from tensorpoly_jax.t5.model import EncoderDecoder, dtype_named, preset

ADAPTER_AXES = ("tasks", "splits", "skills", "lora_rank", "order", "leaf")


def adapter_axis_rules():
  """``additional_rules`` for T5X's ``standard_logical_axis_rules``: adapter axes replicated."""
  return tuple(rule for rule in DEFAULT_RULES if rule[0] in ADAPTER_AXES)


def adapter_factor_rules():
  """T5X's Adafactor factor rules plus the adapter axes (every axis of a param needs one).

  Skills, splits and orders are separate matrices (BATCH: never averaged together); a LoRA side
  factors over its ``lora_rank`` (COLUMN) and feature (ROW) axes where T5X marks that feature ROW
  (``embed``) and is left unfactored where both are COLUMN; router logits are unfactored.
  """
  dim = adafactor.FactorDim
  return flax.core.freeze({
      **adafactor.standard_logical_factor_rules(),
      "tasks": dim.NONE, "splits": dim.BATCH, "skills": dim.BATCH, "order": dim.BATCH,
      "lora_rank": dim.COLUMN, "leaf": dim.ROW,
  })


def batch_task_ids(batch) -> jnp.ndarray:
  """``int[B]`` from the converter's ``task_id`` feature (``[B, 1]``)."""
  if TASK_FEATURE not in batch:
    raise KeyError(f"the batch has no {TASK_FEATURE!r} feature; use"
                   " RoutedEncDecFeatureConverter (it passes the routing id through).")
  task_ids = batch[TASK_FEATURE]
  return task_ids[:, 0] if task_ids.ndim == 2 else task_ids


def is_adapter_param(path: str, _value=None) -> bool:
  """For ``optimizers.MultiOptimizer`` traversals: train only adapters and routers."""
  return is_adapter_path(tuple(path.split("/")))


def adapters_only(optimizer: optimizers.OptimizerDef) -> optimizers.MultiOptimizer:
  """``optimizer`` over the adapter and router params; the backbone gets no update and no state."""
  traversal = flax.traverse_util.ModelParamTraversal(is_adapter_param)
  return optimizers.MultiOptimizer([(traversal, optimizer)])


def adapter_assignment_map() -> tuple[tuple[str, None], ...]:
  """``RestoreCheckpointConfig.assignment_map`` for restoring a backbone-only T5X checkpoint:
  adapter and router entries (params and optimizer state) are not read from it; with
  ``fallback_to_scratch`` they start from their initializers."""
  modules = "|".join(ADAPTER_MODULES)
  return ((rf"(.*/)?({modules})(/.*)?", None),)


class EncoderDecoderModel(models.EncoderDecoderModel):
  """T5X's model, with ``task_ids`` and a routing rng passed to tensorpoly's ``EncoderDecoder``.

  Training, scoring (``score_batch``: rank classification) and prediction
  (``predict_batch_with_aux``: T5X's beam search or sampling, ``python -m t5x.infer``) route each
  row by its task id.
  """

  FEATURE_CONVERTER_CLS = RoutedEncDecFeatureConverter

  def get_initial_variables(self, rng, input_shapes, input_types=None):
    del input_types  # token ids are int32 for this module
    encoder_shape = input_shapes["encoder_input_tokens"]
    decoder_shape = input_shapes["decoder_input_tokens"]
    decoder_tokens = jnp.ones(decoder_shape, jnp.int32)
    return flax.core.freeze(self.module.init(
        rng, jnp.ones(encoder_shape, jnp.int32), decoder_tokens, decoder_tokens, decode=False,
        enable_dropout=False, task_ids=jnp.zeros(encoder_shape[:1], jnp.int32)))

  def _compute_logits(self, params, batch, dropout_rng=None, mutable=False,
                      other_variables=None):
    rngs = None
    if dropout_rng is not None:
      dropout, routing = jax.random.split(dropout_rng)
      rngs = {"dropout": dropout, ROUTING_RNG: routing}
    return self.module.apply(
        {"params": params, **(other_variables or {})}, batch["encoder_input_tokens"],
        batch["decoder_input_tokens"], batch["decoder_target_tokens"],
        encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        encoder_positions=batch.get("encoder_positions"),
        decoder_positions=batch.get("decoder_positions"), decode=False,
        enable_dropout=rngs is not None, rngs=rngs, mutable=mutable,
        task_ids=batch_task_ids(batch))

  def predict_batch_with_aux(self, params, batch, rng=None, decoder_params=None,
                             return_all_decodes=None, num_decodes=None,
                             prompt_with_targets=False):
    """T5X's ``decode_fn`` over the module's cached decoding steps, as T5X's own model runs it,
    except that the encoder runs with the batch's task ids and the cache is built from its real
    output (``decoding.init_cache``: cross-attention keys and values, and the adapters' factors
    for each row's task), so that the steps need no task ids. Returns ``(decodes, {"scores"})``
    as T5X's: ``[b, L]`` and ``[b]``, or every decode with ``return_all_decodes``."""
    if prompt_with_targets:
      raise NotImplementedError("prompt_with_targets: decoding from a prompt is not supported by"
                                " tensorpoly's T5 (its cache has no prefill); decode from the"
                                " start token.")
    defaults = self._default_decoder_params
    return_all_decodes = defaults.return_all_decodes if return_all_decodes is None else (
        return_all_decodes)
    num_decodes = defaults.num_decodes if num_decodes is None else num_decodes
    task_ids, encoder_tokens = batch_task_ids(batch), batch["encoder_input_tokens"]
    length = batch["decoder_input_tokens"].shape[1]
    encoded = self.module.apply({"params": params}, encoder_tokens, enable_dropout=False,
                                task_ids=task_ids, method=self.module.encode)
    cache = decoding.init_cache(self.module, params, encoded, encoder_tokens, task_ids, length)
    expand = lambda x: t5x_decoding.flat_batch_beam_expand(x, num_decodes)
    steps = functools.partial(self._compute_logits_from_slice, params=params,
                              encoded_inputs=expand(encoded), raw_inputs=expand(encoder_tokens),
                              max_decode_length=length)
    decoder_params = {"eos_id": self.output_vocabulary.eos_id or 1, **(decoder_params or {})}
    if rng is not None:
      decoder_params["decode_rng"] = rng
    decodes, scores = self._decode_fn(
        inputs=jnp.zeros_like(batch["decoder_input_tokens"]), cache=cache, tokens_to_logits=steps,
        num_decodes=num_decodes, cache_offset=1 if self.module.config.scan_layers else 0,
        **decoder_params)
    if return_all_decodes:
      return decodes, {"scores": scores}
    return decodes[:, -1, :], {"scores": scores[:, -1]}


def t5_module(preset_name: str = "t5_1_1_small", adapter: AdapterConfig | None = None,
              dtype: str = "bfloat16", remat: str = "none", dropout_rate: float = 0.0,
              scan_layers: bool = False) -> EncoderDecoder:
  """tensorpoly's T5 from a preset, with an adapter (T5X's ``network.Transformer`` arguments).

  Per-layer params by default, the layout of T5X's own T5 / T0 checkpoints; ``scan_layers=True``
  stacks them on ``layers`` as T5X's scanned networks do."""
  return EncoderDecoder(preset(preset_name, dtype=dtype_named(dtype), remat=remat,
                               dropout_rate=dropout_rate, scan_layers=scan_layers,
                               adapter=adapter))


def save_t5x_checkpoint(backbone_dir: str, output_dir: str, partitioner=None) -> str:
  """Writes a converted backbone (``tensorpoly convert``) as a T5X checkpoint at step 0, which
  ``configs/t5x/runs/finetune_adapters.gin`` restores (``INITIAL_CHECKPOINT_PATH``); returns its
  ``checkpoint_0`` path. The optimizer state is a fresh Adafactor's (the run makes its own).
  ``partitioner``: T5X's, default ``PjitPartitioner(num_partitions=1)``."""
  import seqio
  from t5x import checkpoints, partitioning, utils

  from tensorpoly_jax.t5 import convert

  config, params = convert.load_converted(backbone_dir, scan_layers=False)
  vocabulary = seqio.PassThroughVocabulary(config.vocab_size)
  model = EncoderDecoderModel(EncoderDecoder(config.replace(adapter=None)), vocabulary,
                              vocabulary, adafactor.Adafactor(
                                  logical_factor_rules=adapter_factor_rules()))
  partitioner = partitioner or partitioning.PjitPartitioner(num_partitions=1)
  shapes = {"encoder_input_tokens": (1, 1), "decoder_input_tokens": (1, 1)}
  state = utils.TrainStateInitializer(model.optimizer_def, model.get_initial_variables, shapes,
                                      partitioner).from_scratch(jax.random.PRNGKey(0))
  placed = jax.tree_util.tree_map(lambda new, old: jax.device_put(new.astype(old.dtype),
                                                                  old.sharding),
                                  params, flax.core.unfreeze(state.params))
  state = state.replace_params(flax.core.freeze(placed))
  checkpoints.Checkpointer(state, partitioner, output_dir).save(state)
  return f"{output_dir.rstrip('/')}/checkpoint_0"
