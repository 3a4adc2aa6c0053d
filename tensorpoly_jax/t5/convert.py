"""Hugging Face T5 / T0 checkpoints -> Flax params in T5X layout, streamed tensor by tensor, and
back (``hf_checkpoint_files``, for a merged model).

Reads ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Pickled ``pytorch_model.bin`` files are read only with
``allow_pickle=True``, and then with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tensorpoly_jax.t5 import layout
from tensorpoly_jax.t5.model import (EncoderDecoder, T5Config, abstract_variables,
                                     config_from_dict, config_to_dict)

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# HF keeps these as aliases of shared.weight.
TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

_ATTENTION = {"q": "query", "k": "key", "v": "value", "o": "out"}
_ENCODER_SUBLAYERS = {0: ("SelfAttention", "attention", "pre_attention_layer_norm"),
                      1: ("DenseReluDense", "mlp", "pre_mlp_layer_norm")}
_DECODER_SUBLAYERS = {0: ("SelfAttention", "self_attention", "pre_self_attention_layer_norm"),
                      1: ("EncDecAttention", "encoder_decoder_attention",
                          "pre_cross_attention_layer_norm"),
                      2: ("DenseReluDense", "mlp", "pre_mlp_layer_norm")}


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: names the tensor and what was expected."""


def config_from_hf(hf_config: dict, **overrides) -> T5Config:
  """T5Config from a Hugging Face ``config.json`` dict (v1.0 ReLU / v1.1 gated-GELU)."""
  projection = hf_config.get("feed_forward_proj", "relu")
  gated = projection.startswith("gated-")
  activation = projection.split("-")[-1]
  # transformers 5 always ties lm_head and records v1.0's output scaling separately.
  scaled_tied = hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True))
  return T5Config(
      vocab_size=hf_config["vocab_size"], emb_dim=hf_config["d_model"],
      num_heads=hf_config["num_heads"], head_dim=hf_config["d_kv"], mlp_dim=hf_config["d_ff"],
      num_encoder_layers=hf_config["num_layers"],
      num_decoder_layers=hf_config.get("num_decoder_layers") or hf_config["num_layers"],
      mlp_activations=(activation, "linear") if gated else (activation,),
      logits_via_embedding=bool(scaled_tied),
      num_buckets=hf_config.get("relative_attention_num_buckets", 32),
      max_distance=hf_config.get("relative_attention_max_distance", 128),
      layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6),
  ).replace(**overrides)


def config_to_hf(config: T5Config) -> dict:
  """A Hugging Face ``config.json`` dict for ``T5ForConditionalGeneration`` (``config_from_hf``'s
  inverse): v1.0 ties the output layer to the embedding (``tie_word_embeddings``), v1.1 does not."""
  activations = config.mlp_activations
  if len(activations) == 1:
    projection = activations[0]
  elif len(activations) == 2 and activations[1] == "linear":
    projection = f"gated-{activations[0]}"
  else:
    raise CheckpointError(f"mlp_activations={activations} has no Hugging Face T5 form (one"
                          " activation, or an activation and 'linear').")
  return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
          "vocab_size": config.vocab_size, "d_model": config.emb_dim, "d_kv": config.head_dim,
          "d_ff": config.mlp_dim, "num_heads": config.num_heads,
          "num_layers": config.num_encoder_layers, "num_decoder_layers": config.num_decoder_layers,
          "feed_forward_proj": projection, "tie_word_embeddings": config.logits_via_embedding,
          "relative_attention_num_buckets": config.num_buckets,
          "relative_attention_max_distance": config.max_distance,
          "layer_norm_epsilon": config.layer_norm_epsilon, "is_encoder_decoder": True,
          "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}


def flax_name(hf_name: str) -> tuple[tuple[str, ...], bool] | None:
  """``(flax path, transpose)`` for a HF tensor name, or None if the name is not a T5 tensor."""
  if hf_name == "shared.weight":
    return ("token_embedder", "embedding"), False
  if hf_name == "lm_head.weight":
    return ("decoder", "logits_dense", "kernel"), True
  match = re.fullmatch(r"(encoder|decoder)\.final_layer_norm\.weight", hf_name)
  if match:
    stack = match.group(1)
    return (stack, f"{stack}_norm", "scale"), False
  match = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(.+)\.weight", hf_name)
  if not match:
    return None
  stack, block, sublayer, rest = match.group(1), match.group(2), int(match.group(3)), match.group(4)
  table = _ENCODER_SUBLAYERS if stack == "encoder" else _DECODER_SUBLAYERS
  if sublayer not in table:
    return None
  hf_module, module, norm = table[sublayer]
  layer = f"layers_{block}"
  if rest == "layer_norm":
    return (stack, layer, norm, "scale"), False
  if rest == f"{hf_module}.relative_attention_bias":  # shared by the stack in T5X: [heads, buckets]
    return (stack, "relpos_bias", "rel_embedding"), True
  prefix, _, leaf = rest.rpartition(".")
  if prefix != hf_module:
    return None
  if hf_module == "DenseReluDense" and leaf in ("wi", "wi_0", "wi_1", "wo"):
    return (stack, layer, module, leaf, "kernel"), True
  if leaf in _ATTENTION:
    return (stack, layer, module, _ATTENTION[leaf], "kernel"), True
  return None


def _hf_sublayer(stack: str, layer: str, name: str) -> tuple[str, str]:
  """``(HF sublayer, HF module)`` that hold our module or norm ``name`` in block ``layer``, e.g.
  ``("encoder", "layers_0", "mlp")`` -> ``("encoder.block.0.layer.1", "DenseReluDense")``."""
  table = _ENCODER_SUBLAYERS if stack == "encoder" else _DECODER_SUBLAYERS
  index, hf_module = next((index, hf) for index, (hf, module, norm) in table.items()
                          if name in (module, norm))
  return f"{stack}.block.{layer.removeprefix('layers_')}.layer.{index}", hf_module


def hf_module_name(module_path: tuple[str, ...]) -> str:
  """The Hugging Face T5 module of a per-layer dense projection, e.g. ``("encoder", "layers_0",
  "attention", "query")`` -> ``encoder.block.0.layer.0.SelfAttention.q`` (``flax_name``'s inverse)."""
  stack, layer, module, leaf = module_path
  sublayer, hf_module = _hf_sublayer(stack, layer, module)
  hf_leaf = {ours: hf for hf, ours in _ATTENTION.items()}.get(leaf, leaf)
  return f"{sublayer}.{hf_module}.{hf_leaf}"


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """``(HF tensor name, transpose)`` of a per-layer Flax param path (``flax_name``'s inverse)."""
  if path == ("token_embedder", "embedding"):
    return "shared.weight", False
  if path == ("decoder", "logits_dense", "kernel"):
    return "lm_head.weight", True
  stack, *rest = path
  if rest == [f"{stack}_norm", "scale"]:
    return f"{stack}.final_layer_norm.weight", False
  if rest == ["relpos_bias", "rel_embedding"]:  # HF keeps the stack's one bias in its first block
    return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True
  if len(rest) == 4 and rest[-1] == "kernel":
    return f"{hf_module_name(path[:-1])}.weight", True
  if len(rest) == 3 and rest[-1] == "scale":
    sublayer, _ = _hf_sublayer(stack, *rest[:2])
    return f"{sublayer}.layer_norm.weight", False
  raise CheckpointError(f"{'/'.join(path)} is not a param of a T5 encoder-decoder.")


def _tensor_files(checkpoint_dir: str, allow_pickle: bool) -> tuple[list[str], bool]:
  """The weight files of a checkpoint folder, and whether they are pickles."""
  def listed(index_name):
    with open(os.path.join(checkpoint_dir, index_name)) as f:
      return sorted(set(json.load(f)["weight_map"].values()))

  for index, single, pickled in ((SAFETENSORS_INDEX, "model.safetensors", False),
                                 (PICKLE_INDEX, "pytorch_model.bin", True)):
    if os.path.exists(os.path.join(checkpoint_dir, index)):
      files = listed(index)
    elif os.path.exists(os.path.join(checkpoint_dir, single)):
      files = [single]
    else:
      continue
    if pickled and not allow_pickle:
      raise CheckpointError(
          f"{checkpoint_dir} holds only pickled weights ({files[0]}); unpickling can run code."
          " Convert it to safetensors, or pass --allow_pickle (loaded with weights_only=True).")
    missing = [f for f in files if not os.path.exists(os.path.join(checkpoint_dir, f))]
    if missing:
      raise CheckpointError(f"{checkpoint_dir}: shard files {missing} listed in {index} are missing.")
    return [os.path.join(checkpoint_dir, f) for f in files], pickled
  raise CheckpointError(
      f"no model.safetensors, {SAFETENSORS_INDEX} or pytorch_model.bin in {checkpoint_dir}.")


def iter_tensors(checkpoint_dir: str, allow_pickle: bool = False) -> Iterator[tuple[str, np.ndarray]]:
  """Yields ``(name, float32 array)`` one tensor at a time."""
  files, pickled = _tensor_files(checkpoint_dir, allow_pickle)
  for path in files:
    if pickled:
      import torch

      state = torch.load(path, map_location="cpu", weights_only=True)
      for name in list(state):
        yield name, state.pop(name).float().numpy()
      continue
    from safetensors import safe_open

    with safe_open(path, framework="flax") as f:  # the flax reader handles bfloat16
      for name in f.keys():
        yield name, np.asarray(f.get_tensor(name), np.float32)


def expected_shapes(config: T5Config) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Param shapes of the plain backbone, from ``jax.eval_shape`` (no weights are allocated)."""
  tokens = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(
      lambda: EncoderDecoder(config.replace(adapter=None)).init(
          jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False))
  return {k: v.shape for k, v in traverse_util.flatten_dict(shapes["params"]).items()}


# What conversion reads from a hub repository (not its TF / Flax / ONNX copies).
HUB_FILES = ("config.json", "*.safetensors", SAFETENSORS_INDEX, "spiece.model",
             "tokenizer*", "special_tokens_map.json")


def checkpoint_folder(name: str, allow_pickle: bool = False) -> str:
  """``name`` if it is a folder, else a Hugging Face hub id downloaded to the hub cache."""
  if os.path.isdir(name):
    return name
  if os.path.exists(name) or name.count("/") > 1 or name.startswith((".", "/")):
    raise CheckpointError(f"--checkpoint_dir={name!r} is not a folder (nor a hub id like"
                          " bigscience/T0_3B).")
  from huggingface_hub import snapshot_download

  patterns = [*HUB_FILES, *(["pytorch_model*.bin*"] if allow_pickle else [])]
  try:
    return snapshot_download(name, allow_patterns=patterns)
  except Exception as err:  # offline, unknown repo, gated repo: the hub raises many types
    raise CheckpointError(
        f"could not download {name!r} from the Hugging Face hub ({type(err).__name__}: {err})."
        f" Where the hub is reachable, `huggingface-cli download {name} --local-dir DIR` (or"
        " snapshot_download), copy DIR here and pass --checkpoint_dir=DIR.") from err


def load_hf_checkpoint(checkpoint_dir: str, allow_pickle: bool = False,
                       dtype=np.float32, progress: Callable | None = None):
  """Returns ``(T5Config, params)`` for a Hugging Face T5/T0 checkpoint folder.

  Raises CheckpointError naming any missing, unexpected or mis-shaped tensor.
  """
  with open(os.path.join(checkpoint_dir, "config.json")) as f:
    config = config_from_hf(json.load(f))
  expected = expected_shapes(config)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  tied_head = None
  for name, tensor in iter_tensors(checkpoint_dir, allow_pickle):
    if progress is not None:
      progress(name)
    if name in TIED_ALIASES:
      continue
    target = flax_name(name)
    if target is None or (target[0] not in expected and name != "lm_head.weight"):
      raise CheckpointError(f"unexpected tensor {name!r} {tuple(tensor.shape)} in {checkpoint_dir}:"
                            " not part of a T5 encoder-decoder of this config.")
    path, transpose = target
    if name == "lm_head.weight" and config.logits_via_embedding:
      tied_head = tensor  # a tied model may still save its head: it must equal shared.weight
      continue
    value = tensor.T if transpose else tensor
    if value.shape != expected[path]:
      raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}; the config expects"
                            f" {expected[path][::-1] if transpose else expected[path]}.")
    flat[path] = value.astype(dtype)
  embedding = flat.get(("token_embedder", "embedding"))
  if tied_head is not None and embedding is not None and not np.array_equal(tied_head, embedding):
    raise CheckpointError(
        f"{checkpoint_dir} has an lm_head.weight that differs from shared.weight, but its config"
        " ties the output layer (tie_word_embeddings / scale_decoder_outputs): fix config.json.")
  head = ("decoder", "logits_dense", "kernel")
  if head in expected and head not in flat and embedding is not None:
    # transformers 5 ties lm_head to shared.weight when it saves a v1.1 model and drops it.
    flat[head] = embedding.T.copy()
  missing = sorted("/".join(p) for p in expected if p not in flat)
  if missing:
    raise CheckpointError(f"{checkpoint_dir} is missing {len(missing)} tensors for this config,"
                          f" e.g. {missing[:4]}.")
  return config, traverse_util.unflatten_dict(flat)


def hf_checkpoint_files(config: T5Config, params) -> dict[str, bytes]:
  """``config.json`` and ``model.safetensors`` of a Hugging Face T5 checkpoint holding ``params``
  in their dtype (``load_hf_checkpoint``'s inverse). A tied model's head is ``shared.weight``;
  ``T5ForConditionalGeneration`` ties the embedding aliases itself."""
  from safetensors.numpy import save

  flat = traverse_util.flatten_dict(layout.to_layout(params, scanned=False))
  tensors = {}
  for path, value in flat.items():
    name, transpose = hf_name(path)
    # safetensors writes each buffer as if C-ordered: transposed views must be copied first.
    tensors[name] = np.ascontiguousarray(np.asarray(value).T if transpose else value)
  return {"config.json": json.dumps(config_to_hf(config), indent=2).encode(),
          "model.safetensors": save(tensors)}


CONVERTED_CONFIG = "t5_config.json"
CONVERTED_PARAMS = "params"
CONVERTED_FINGERPRINT = "fingerprint.txt"  # the params' content (tensorpoly_jax.fingerprint)
VOCABULARY_FILE = "spiece.model"  # T5's SentencePiece model, kept beside converted weights
CONVERTED_SOURCE = "source.txt"  # the checkpoint folder or hub id it was converted from


def save_converted(output_dir: str, config: T5Config, params, source: str | None = None) -> None:
  """Writes the backbone as an orbax checkpoint plus its T5Config (JSON) for the trainer, its
  content fingerprint, which every run and adapter export on it records, and the ``source`` it
  was converted from (what a PEFT import compares with the adapter's base model).

  In a multi-host run every process calls this (orbax writes each host's shards); process 0
  writes the JSON and the fingerprint."""
  import orbax.checkpoint as ocp

  from tensorpoly_jax import fingerprint, paths

  directory = paths.resolve(output_dir)
  directory.mkdir(parents=True, exist_ok=True)
  paths.write_json(directory / CONVERTED_CONFIG, config_to_dict(config))
  paths.atomic_write(directory / CONVERTED_FINGERPRINT, fingerprint.params_fingerprint(params))
  if source is not None:
    paths.atomic_write(directory / CONVERTED_SOURCE, source)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / CONVERTED_PARAMS, params)
  checkpointer.wait_until_finished()


def has_converted(output_dir: str) -> bool:
  """Whether ``save_converted`` finished writing ``output_dir`` (orbax renames the params folder
  into place only once every shard is written)."""
  from tensorpoly_jax import paths

  directory = paths.resolve(output_dir)
  return (directory / CONVERTED_CONFIG).exists() and (directory / CONVERTED_PARAMS).exists()


def stored_fingerprint(output_dir: str) -> str | None:
  """The fingerprint ``save_converted`` wrote (None for a folder written before it did)."""
  return _stored_text(output_dir, CONVERTED_FINGERPRINT)


def stored_source(output_dir: str) -> str | None:
  """The checkpoint ``save_converted`` was given as the source (None: trained here, or unknown)."""
  return _stored_text(output_dir, CONVERTED_SOURCE)


def _stored_text(output_dir: str, name: str) -> str | None:
  from tensorpoly_jax import paths

  path = paths.resolve(output_dir) / name
  return path.read_text().strip() if path.exists() else None


def converted_config(output_dir: str) -> T5Config:
  """The T5Config of a ``save_converted`` folder (its params are not read)."""
  from tensorpoly_jax import paths

  if not has_converted(output_dir):
    raise FileNotFoundError(
        f"{output_dir} holds no converted backbone ({CONVERTED_CONFIG} and {CONVERTED_PARAMS}/):"
        " set BACKBONE_DIR to a `tensorpoly convert` output or to a backbone run's"
        " MODEL_DIR/backbone.")
  return config_from_dict(json.loads((paths.resolve(output_dir) / CONVERTED_CONFIG).read_text()))


def load_converted(output_dir: str, mesh=None, scan_layers: bool | None = None
                   ) -> tuple[T5Config, dict]:
  """``(config, params)`` of a ``save_converted`` folder.

  Without ``mesh``: host numpy arrays. With ``mesh``: each process restores only its own shards,
  straight into the shardings the logical rules give on that mesh (never a full host copy).
  ``scan_layers`` (``None``: as saved) converts the layout, on device when there is a mesh.
  """
  import orbax.checkpoint as ocp

  from tensorpoly_jax import partitioning, paths

  directory = paths.resolve(output_dir)
  config = converted_config(output_dir)
  checkpointer = ocp.StandardCheckpointer()
  path = directory / CONVERTED_PARAMS
  saved = checkpointer.metadata(path).item_metadata.tree
  target_scan = config.scan_layers if scan_layers is None else scan_layers
  if mesh is None:  # the reader's hosts and mesh may differ from the writer's
    params = checkpointer.restore(path, jax.tree_util.tree_map(
        lambda leaf: np.empty(leaf.shape, leaf.dtype), saved))
    return config.replace(scan_layers=target_scan), layout.to_layout(params, target_scan)
  shardings = partitioning.param_shardings(abstract_variables(EncoderDecoder(config)), mesh)
  params = checkpointer.restore(path, jax.tree_util.tree_map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      saved, shardings))
  if target_scan != config.scan_layers:
    config = config.replace(scan_layers=target_scan)
    target = partitioning.param_shardings(abstract_variables(EncoderDecoder(config)), mesh)
    params = jax.jit(lambda p: layout.to_layout(p, target_scan), out_shardings=target)(params)
  return config, params
