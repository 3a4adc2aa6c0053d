"""The Flax T5 against Hugging Face PyTorch T5 built from tiny random configs, and its adapters."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.torch import save_file

from tensorpoly_jax.adapters import PolyConfig, TensorPolyIIConfig
from tensorpoly_jax.t5 import convert, scoring
from tensorpoly_jax.t5.seq2seq import Seq2SeqModel
from tensorpoly_jax.t5.model import (PRESETS, EncoderDecoder, is_adapter_path, merge_params,
                                     preset, split_params)
from tests.small_adapters import random_adapter, small_adapter

TINY_HF = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
               num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
               dropout_rate=0.0)


def hf_model(feed_forward_proj, seed=0, **kwargs):
  torch.manual_seed(seed)
  config = transformers.T5Config(**TINY_HF, feed_forward_proj=feed_forward_proj, **kwargs)
  return transformers.T5ForConditionalGeneration(config).eval()


def random_batch(seed=0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, 97, size=(3, 11))
  inputs[0, 7:] = 0  # padding
  inputs[1, 9:] = 0
  targets = rng.integers(2, 97, size=(3, 6))
  targets[2, 4:] = 0
  return inputs, targets


def hf_logits(model, inputs, targets):
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(inputs), attention_mask=torch.as_tensor(inputs > 0),
                decoder_input_ids=torch.as_tensor(np.asarray(scoring.shift_right(targets))))
  return out.logits.numpy()


def flax_logits(config, params, inputs, targets, task_ids=None):
  return np.asarray(EncoderDecoder(config).apply(
      {"params": params}, inputs, scoring.shift_right(targets), targets, enable_dropout=False,
      task_ids=task_ids))


def assert_logits_match(ours, theirs, targets):
  valid = targets > 0  # padded target positions are masked differently and never scored
  np.testing.assert_allclose(ours[valid], theirs[valid], rtol=1e-4, atol=1e-4)


def save_untied(model, folder):
  """A real v1.1/T0-style checkpoint: separate lm_head.weight, config says tie_word_embeddings false."""
  with torch.no_grad():
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
  os.makedirs(folder, exist_ok=True)
  save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
            os.path.join(folder, "model.safetensors"))
  hf_config = model.config.to_dict()
  hf_config.pop("scale_decoder_outputs", None)
  hf_config["tie_word_embeddings"] = False
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config, f)


@pytest.mark.parametrize("kind", ["v1_0_relu_tied", "v1_1_gated_untied", "v1_1_saved_tied",
                                  "v1_1_sharded"])
def test_converted_checkpoint_matches_pytorch_logits(kind, tmp_path):
  inputs, targets = random_batch()
  if kind == "v1_0_relu_tied":
    model = hf_model("relu")
    model.save_pretrained(tmp_path)
  elif kind == "v1_1_gated_untied":
    model = hf_model("gated-gelu", tie_word_embeddings=False)
    save_untied(model, str(tmp_path))
  else:  # transformers 5 ties a v1.1 head when it saves, and drops lm_head.weight
    model = hf_model("gated-gelu", tie_word_embeddings=False)
    model.save_pretrained(tmp_path, max_shard_size="20KB" if kind == "v1_1_sharded" else "5GB")
  if kind == "v1_1_sharded":
    assert os.path.exists(tmp_path / convert.SAFETENSORS_INDEX)
  config, params = convert.load_hf_checkpoint(str(tmp_path))
  assert config.logits_via_embedding == (kind == "v1_0_relu_tied")
  assert_logits_match(flax_logits(config, params, inputs, targets), hf_logits(model, inputs, targets),
                      targets)


def converted_tiny(tmp_path, adapter=None):
  model = hf_model("gated-gelu", tie_word_embeddings=False)
  save_untied(model, str(tmp_path))
  config, params = convert.load_hf_checkpoint(str(tmp_path))
  return config.replace(adapter=adapter), params


def with_adapter(config, params, seed=0):
  """Backbone params from the checkpoint plus freshly initialized adapter params."""
  inputs, targets = random_batch()
  variables = EncoderDecoder(config).init(jax.random.PRNGKey(seed), inputs,
                                          scoring.shift_right(targets), targets,
                                          enable_dropout=False, task_ids=jnp.zeros(3, jnp.int32))
  adapter, _ = split_params(variables["params"])
  return merge_params(adapter, params)


@pytest.mark.parametrize("method", ["lora", "poly", "mhr"])
def test_zero_b_adapters_leave_logits_unchanged(method, tmp_path):
  adapter = small_adapter(method, lora_rank=2, n_tasks=3, skills=2)
  config, params = converted_tiny(tmp_path, adapter)
  inputs, targets = random_batch()
  task_ids = jnp.array([0, 1, 2])
  adapted = with_adapter(config, params)
  plain = flax_logits(config.replace(adapter=None), params, inputs, targets)
  np.testing.assert_array_equal(flax_logits(config, adapted, inputs, targets, task_ids), plain)
  bumped = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.05 if "lora_b" in jax.tree_util.keystr(p) else v, adapted)
  assert np.abs(flax_logits(config, bumped, inputs, targets, task_ids) - plain).max() > 1e-3


@pytest.mark.parametrize("method", ["tlora", "tensorpoly_i", "tensorpoly_ii"])
def test_gradients_reach_only_adapter_and_router(method, tmp_path):
  adapter = small_adapter(method, lora_rank=2, n_tasks=3, skills=2, order=2)
  config, backbone = converted_tiny(tmp_path, adapter)
  adapter_params = random_adapter(config)
  inputs, targets = random_batch()
  model = EncoderDecoder(config)

  def loss(trainable, frozen):
    logits = model.apply({"params": merge_params(trainable, frozen)}, inputs,
                         scoring.shift_right(targets), targets, enable_dropout=False,
                         task_ids=jnp.array([0, 1, 2]))
    return -scoring.token_log_likelihoods(logits, targets).sum()

  grads = jax.jit(jax.grad(loss))(adapter_params, backbone)
  flat = traverse_util.flatten_dict(grads)
  assert flat and all(is_adapter_path(path) for path in flat)
  # 4 attention projections x (2 enc + 3 dec self + 3 cross) layers + 3 FFN kernels x 5 layers
  assert len({path[:-2] for path in flat if path[-1] == "leaves"}) == 4 * 8 + 3 * 5
  assert all(float(jnp.abs(g).max()) > 0 for g in flat.values())
  routers = [p for p in flat if "router" in p]
  assert bool(routers) == (method != "tlora")


def test_shared_router_is_one_router_for_all_layers(tmp_path):
  adapter = PolyConfig(lora_rank=2, n_tasks=3, n_skills=2, shared_router=True)
  config, params = converted_tiny(tmp_path, adapter)
  params = with_adapter(config, params)
  flat = traverse_util.flatten_dict(params)
  assert [p for p in flat if "skill_logits" in p] == [("shared_router", "skill_logits")]
  inputs, targets = random_batch()
  assert np.isfinite(flax_logits(config, params, inputs, targets, jnp.array([0, 1, 2]))).all()


def test_reused_encoder_scoring_equals_pairwise(tmp_path):
  config, backbone = converted_tiny(tmp_path, TensorPolyIIConfig(lora_rank=2, n_tasks=3))
  params = merge_params(random_adapter(config), backbone)
  variables, model = {"params": params}, EncoderDecoder(config)
  score_pairs = jax.jit(scoring.score_pairs, static_argnums=(0, 5))
  inputs, _ = random_batch()
  rng = np.random.default_rng(1)
  choices = rng.integers(2, 97, size=(3, 4, 5))
  choices[:, 1, 3:] = 0  # choices of different lengths
  task_ids = jnp.array([2, 0, 1])
  for normalize in (True, False):
    reused = jax.jit(Seq2SeqModel(model).score_choices, static_argnums=4)(
        params, inputs, choices, task_ids, normalize)
    for c in range(4):
      pairwise = score_pairs(model, variables, inputs, choices[:, c], task_ids, normalize)
      np.testing.assert_allclose(reused[:, c], pairwise, rtol=1e-5, atol=1e-5)


def test_remat_and_bf16_options(tmp_path):
  config, params = converted_tiny(tmp_path)
  inputs, targets = random_batch()
  reference = flax_logits(config, params, inputs, targets)
  np.testing.assert_allclose(flax_logits(config.replace(remat="full"), params, inputs, targets),
                             reference, rtol=1e-5, atol=1e-5)
  bf16 = flax_logits(config.replace(dtype=jnp.bfloat16), params, inputs, targets)
  valid = targets > 0
  assert np.abs(bf16[valid] - reference[valid]).max() < 0.1 * np.abs(reference[valid]).max()


def hf_config_for(name):
  cfg = PRESETS[name]
  return transformers.T5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.emb_dim, d_kv=cfg.head_dim, d_ff=cfg.mlp_dim,
      num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
      num_heads=cfg.num_heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_count_matches_transformers(name):
  shapes = convert.expected_shapes(PRESETS[name])
  ours = sum(math.prod(s) for s in shapes.values())
  with torch.device("meta"):
    model = transformers.T5ForConditionalGeneration(hf_config_for(name))
  # transformers 5 ties lm_head to the embedding; the real v1.1/T0 head is a separate matrix.
  theirs = sum(p.numel() for p in model.parameters()) + model.lm_head.weight.numel()
  assert ours == theirs


def test_t0_3b_preset_has_the_t0_shapes():
  cfg = preset("t0_3b")
  assert (cfg.emb_dim, cfg.mlp_dim, cfg.num_encoder_layers, cfg.num_decoder_layers) == (2048, 5120, 24, 24)
  assert (cfg.num_heads, cfg.head_dim, cfg.vocab_size) == (32, 64, 32128)
  assert cfg.mlp_activations == ("gelu", "linear") and not cfg.logits_via_embedding
  with pytest.raises(ValueError, match="unknown model preset 't0_3'"):
    preset("t0_3")


# ---------------------------------------------------------------- broken checkpoints


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path):
  model = hf_model("relu")
  state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  config = model.config.to_dict()

  def write(tensors, name):
    folder = tmp_path / name
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)

  missing = dict(state)
  del missing["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
  with pytest.raises(convert.CheckpointError, match="missing 1 tensors.*decoder/layers_1/mlp/wo/kernel"):
    convert.load_hf_checkpoint(write(missing, "missing"))
  extra = dict(state, **{"encoder.block.0.layer.0.SelfAttention.q.bias": torch.zeros(32)})
  with pytest.raises(convert.CheckpointError, match="unexpected tensor 'encoder.block.0.layer.0.SelfAttention.q.bias'"):
    convert.load_hf_checkpoint(write(extra, "extra"))
  untied = dict(state, **{"lm_head.weight": torch.ones_like(state["shared.weight"])})
  with pytest.raises(convert.CheckpointError, match="lm_head.weight that differs from shared.weight"):
    convert.load_hf_checkpoint(write(untied, "untied_head_tied_config"))
  bad = dict(state, **{"encoder.block.1.layer.0.SelfAttention.k.weight": torch.zeros(16, 32)})
  with pytest.raises(convert.CheckpointError, match=r"'encoder.block.1.layer.0.SelfAttention.k.weight' has shape \(16, 32\); the config expects \(32, 32\)"):
    convert.load_hf_checkpoint(write(bad, "misshaped"))


def test_pickles_only_behind_flag(tmp_path):
  model = hf_model("relu")
  torch.save({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
  with pytest.raises(convert.CheckpointError, match="pickled weights.*--allow_pickle"):
    convert.load_hf_checkpoint(str(tmp_path))
  config, params = convert.load_hf_checkpoint(str(tmp_path), allow_pickle=True)
  inputs, targets = random_batch()
  assert_logits_match(flax_logits(config, params, inputs, targets), hf_logits(model, inputs, targets),
                      targets)


def test_missing_checkpoint_folder_says_what_it_looked_for(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(hf_model("relu").config.to_dict()))
  with pytest.raises(convert.CheckpointError, match="no model.safetensors"):
    convert.load_hf_checkpoint(str(tmp_path))


def test_convert_command_writes_restorable_params(tmp_path, monkeypatch):
  from tensorpoly_jax import cli

  model = hf_model("gated-gelu", tie_word_embeddings=False)
  save_untied(model, str(tmp_path / "hf"))
  assert cli.main(["convert", "--checkpoint_dir", str(tmp_path / "hf"),
                   "--output_dir", str(tmp_path / "flax")]) == 0
  config, params = convert.load_converted(str(tmp_path / "flax"))
  inputs, targets = random_batch()
  assert_logits_match(flax_logits(config, params, inputs, targets), hf_logits(model, inputs, targets),
                      targets)
  # A hub id is downloaded where the hub is reachable (here: served from the folder above) ...
  import huggingface_hub

  asked = []
  monkeypatch.setattr(huggingface_hub, "snapshot_download",
                      lambda repo, allow_patterns: asked.append(repo) or str(tmp_path / "hf"))
  assert cli.main(["convert", "--checkpoint_dir", "someone/tiny-t5", "--output_dir",
                   str(tmp_path / "hub"), "--scan_layers"]) == 0
  assert asked == ["someone/tiny-t5"]
  config, scanned = convert.load_converted(str(tmp_path / "hub"), scan_layers=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, scanned, params)
  assert convert.load_converted(str(tmp_path / "hub"))[0].scan_layers  # stored stacked


def test_convert_of_an_unreachable_hub_id_says_how_to_pass_a_folder(tmp_path):
  # Tests run offline (HF_HUB_OFFLINE=1): the hub answers at once that it cannot be reached.
  with pytest.raises(convert.CheckpointError,
                     match=r"could not download 'bigscience/T0_3B'.*--checkpoint_dir=DIR"):
    convert.checkpoint_folder("bigscience/T0_3B")
  with pytest.raises(convert.CheckpointError, match="is not a folder"):
    convert.checkpoint_folder(str(tmp_path / "missing" / "dir"))
