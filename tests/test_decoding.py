"""Generation against Hugging Face's ``generate`` (greedy and beam search, token for token) and
PEFT's, cached steps against full recomputation, and per-example routing in mixed-task batches."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tensorpoly_jax import checkpoints, cli, decoding, pipeline
from tensorpoly_jax.t5 import convert
from tensorpoly_jax.t5.model import EncoderDecoder, merge_params
from tests.small_adapters import random_adapter, small_adapter
from tests.test_t5 import TINY_HF, save_untied

LENGTH = 10


def hf_generator(feed_forward_proj, eos_scale=1.0, seed=0, **kwargs):
  """A random tiny HF T5 whose EOS logit is scaled by ``eos_scale`` (so that some hypotheses
  end early). HF's generation cache needs as many decoder layers as encoder layers."""
  torch.manual_seed(seed)
  config = transformers.T5Config(**{**TINY_HF, "num_decoder_layers": TINY_HF["num_layers"]},
                                 feed_forward_proj=feed_forward_proj, **kwargs)
  model = transformers.T5ForConditionalGeneration(config).eval()
  with torch.no_grad():
    head = model.shared if config.tie_word_embeddings else model.lm_head
    head.weight[decoding.EOS_ID] *= eos_scale
  return model


def encoder_inputs(seed=0, batch=5):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, TINY_HF["vocab_size"], size=(batch, 11))
  inputs[0, 7:] = 0  # padding
  inputs[1, 9:] = 0
  return inputs


def hf_generate(model, inputs, num_beams=1, length_penalty=1.0, **kwargs):
  """``generate``'s tokens after the start token, cut after the first EOS (HF fills beams that
  ended with EOS, ours with 0)."""
  with torch.no_grad():
    tokens = model.generate(
        input_ids=torch.as_tensor(inputs), attention_mask=torch.as_tensor(inputs > 0),
        max_new_tokens=LENGTH, do_sample=False, num_beams=num_beams, early_stopping=True,
        length_penalty=length_penalty, decoder_start_token_id=0, eos_token_id=decoding.EOS_ID,
        pad_token_id=0, **kwargs).numpy()[:, 1:]
  return cut_after_eos(tokens)


def cut_after_eos(tokens):
  out = np.zeros((tokens.shape[0], LENGTH), np.int64)
  for row, sequence in zip(out, tokens):
    ends = np.flatnonzero(sequence == decoding.EOS_ID)
    kept = sequence[:ends[0] + 1] if ends.size else sequence
    row[:len(kept)] = kept
  return out


@functools.lru_cache(maxsize=None)
def jitted_generate(config, decode_config):
  return jax.jit(lambda p, x, ids: decoding.generate(EncoderDecoder(config), p, x, ids,
                                                     decode_config))


def generated(config, params, inputs, task_ids=None, **decode) -> decoding.Generated:
  run = jitted_generate(config, decoding.DecodeConfig(max_decode_length=LENGTH, **decode))
  ids = None if task_ids is None else jnp.asarray(task_ids)
  return jax.tree_util.tree_map(np.asarray, run(params, jnp.asarray(inputs), ids))


def ours(config, params, inputs, task_ids=None, **decode):
  return generated(config, params, inputs, task_ids, **decode).tokens


@pytest.mark.parametrize("kind,eos_scale", [("v1_0", 1.0), ("v1_1", 1.0), ("v1_1", 2.0)])
def test_greedy_and_beam_search_equal_transformers_generate(kind, eos_scale, tmp_path):
  tied = kind == "v1_0"
  hf = hf_generator("relu" if tied else "gated-gelu", eos_scale, tie_word_embeddings=tied)
  hf.save_pretrained(tmp_path)
  config, params = convert.load_hf_checkpoint(str(tmp_path))
  inputs = encoder_inputs()
  greedy = ours(config, params, inputs)
  np.testing.assert_array_equal(greedy, hf_generate(hf, inputs))
  for length_penalty in ((0.5, 2.0) if eos_scale > 1 else (1.0,)):
    beam = ours(config, params, inputs, method="beam", num_beams=4, length_penalty=length_penalty)
    np.testing.assert_array_equal(beam, hf_generate(hf, inputs, 4, length_penalty))
  if eos_scale > 1:  # the cases exercise hypotheses that end before the last position
    assert ((greedy == decoding.EOS_ID).any(1) & ~(greedy > 0).all(1)).any()


def adapted(method, tmp_path, scan_layers=False, scale=1.0, **adapter_fields):
  """A converted tiny T5 with a trained-looking (non-zero) adapter for 3 tasks, its params
  (router logits aside) times ``scale``."""
  hf = hf_generator("gated-gelu", tie_word_embeddings=False)
  save_untied(hf, str(tmp_path / "hf"))
  config, backbone = convert.load_hf_checkpoint(str(tmp_path / "hf"))
  config = config.replace(adapter=small_adapter(method, n_tasks=3, **adapter_fields))
  adapter_params = jax.tree_util.tree_map_with_path(
      lambda path, x: x if "skill_logits" in jax.tree_util.keystr(path) else x * scale,
      random_adapter(config))
  params = merge_params(adapter_params, backbone)
  if scan_layers:
    from tensorpoly_jax.t5 import layout
    config, params = config.replace(scan_layers=True), layout.stack_layers(params)
  return hf, config, params, adapter_params, backbone


@pytest.mark.parametrize("method,scan_layers,dtype", [
    ("tensorpoly_ii", True, "float32"), ("tlora", False, "bfloat16")])
def test_cached_steps_give_the_logits_of_full_recomputation(method, scan_layers, dtype, tmp_path):
  _, config, params, _, _ = adapted(method, tmp_path, scan_layers)
  config = config.replace(dtype=jnp.dtype(dtype))
  module = EncoderDecoder(config)
  inputs, task_ids = jnp.asarray(encoder_inputs(batch=3)), jnp.array([2, 0, 1])
  tokens = jnp.asarray(np.random.default_rng(1).integers(2, 97, size=(3, LENGTH + 1))).at[:, 0].set(0)
  encoded = module.apply({"params": params}, inputs, enable_dropout=False, task_ids=task_ids,
                         method=EncoderDecoder.encode)

  @functools.partial(jax.jit, static_argnums=0)
  def all_steps(make_steps):
    steps = make_steps(module, params, encoded, inputs, task_ids, LENGTH)
    step = lambda carry, t: steps.step(carry, tokens, t)[::-1]
    return jax.lax.scan(step, steps.carry, jnp.arange(LENGTH))[1]  # [L, b, V]

  tolerance = 2e-5 if dtype == "float32" else 0.1  # bf16: the two sum in other orders
  np.testing.assert_allclose(all_steps(decoding.cached_steps),
                             all_steps(decoding.recomputing_steps), rtol=tolerance, atol=tolerance)


def test_a_mixed_task_batch_decodes_each_example_as_alone(tmp_path):
  _, config, params, _, _ = adapted("tensorpoly_i", tmp_path, scale=10.0)
  inputs, task_ids = encoder_inputs(batch=3), np.array([2, 0, 1])
  for decode in ({}, {"method": "beam", "num_beams": 3}):
    mixed = generated(config, params, inputs, task_ids, **decode)
    for row in range(len(task_ids)):
      alone = generated(config, params, inputs[row:row + 1], task_ids[row:row + 1], **decode)
      np.testing.assert_array_equal(mixed.tokens[row], alone.tokens[0])
      np.testing.assert_allclose(mixed.scores[row], alone.scores[0], rtol=1e-5)
    # the routing matters: the same inputs under other tasks score differently
    rerouted = generated(config, params, inputs, (task_ids + 1) % 3, **decode)
    assert np.abs(rerouted.scores - mixed.scores).min() > 1e-3


@pytest.mark.parametrize("method", ["lora", "poly"])
def test_greedy_equals_peft_generate_on_an_exported_adapter(method, tmp_path):
  peft = pytest.importorskip("peft")
  hf, config, params, adapter_params, _ = adapted(method, tmp_path, skills=4)
  export = checkpoints.export_adapter(str(tmp_path), "adapter", adapter_params,
                                      pipeline.run_meta("pretrain", config, {}))
  assert cli.main(["export", f"--adapter_dir={export}", f"--output_dir={tmp_path}/peft"]) == 0
  served = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
  inputs, task_ids = encoder_inputs(batch=3), np.array([1, 2, 0])
  routed = {"task_ids": torch.as_tensor(task_ids)} if method == "poly" else {}
  np.testing.assert_array_equal(ours(config, params, inputs, task_ids),
                                hf_generate(served, inputs, **routed))


def test_sampling_is_seeded_and_top_k_1_is_greedy(tmp_path):
  _, config, params, _, _ = adapted("tensorpoly_i", tmp_path, scale=10.0)  # as the test above
  inputs, task_ids = encoder_inputs(batch=3), np.array([0, 1, 2])
  sample = lambda **kw: ours(config, params, inputs, task_ids, method="sample", **kw)
  np.testing.assert_array_equal(sample(seed=3, temperature=2.0), sample(seed=3, temperature=2.0))
  assert not np.array_equal(sample(seed=3, temperature=2.0), sample(seed=4, temperature=2.0))
  np.testing.assert_array_equal(sample(top_k=1), ours(config, params, inputs, task_ids))


@pytest.mark.parametrize("fields,message", [
    ({"method": "nucleus"}, "DECODING='nucleus' is unknown"),
    ({"num_beams": 0}, "NUM_BEAMS must be >= 1"),
    ({"temperature": 0.0}, "TEMPERATURE must be > 0"),
    ({"top_k": -1}, "TOP_K must be >= 0"),
])
def test_bad_decode_settings_are_named(fields, message):
  with pytest.raises(ValueError, match=message):
    decoding.DecodeConfig(**fields)


def test_decoding_steps_need_the_cache_built_with_task_ids(tmp_path):
  _, config, params, _, _ = adapted("poly", tmp_path)
  start = jnp.zeros((1, 1), jnp.int32)
  with pytest.raises(ValueError, match="routes per task: pass task_ids"):
    EncoderDecoder(config).apply({"params": params}, jnp.ones((1, 3, TINY_HF["d_model"])),
                                 jnp.ones((1, 3), jnp.int32), start, start + 1, decode=True,
                                 max_decode_length=4, mutable=["cache"],
                                 method=EncoderDecoder.decode)
