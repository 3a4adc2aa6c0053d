"""PEFT interop: adapter exports of this project <-> PEFT adapters of Hugging Face T5.

Formats (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, keys named after the
``T5ForConditionalGeneration`` modules):
- ``LORA`` from a LoRA adapter, or from any method for one task: the rank-r ``A``/``B`` that the
  task's routing builds (TLoRA has one for every task). PEFT scales by ``lora_alpha / r`` and this
  project by ``1 / r``, so exports say ``lora_alpha = 1``.
- ``POLY`` from Poly and MHR with their routers (PEFT's Poly with ``n_splits`` heads is MHR).
PEFT has no tensor-product adapter, so TensorPoly-I/II go out one task at a time.
"""
from __future__ import annotations

import json
import math
import re

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tensorpoly_jax import console, paths
from tensorpoly_jax.methods import AdapterConfig, adapter_config, from_dict
from tensorpoly_jax.routing import Router
from tensorpoly_jax.t5 import convert
from tensorpoly_jax.t5.model import T5Config, config_from_dict

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
BASE_MODEL_CLASS = "T5ForConditionalGeneration"
PEFT_TYPES = ("LORA", "POLY")
_KEY = re.compile(r"(?P<module>.+)\.(?P<tensor>lora_A\.weight|lora_B\.weight|poly_lora_A|"
                  r"poly_lora_B|poly_router\.module_logits)")


class PeftFormatError(ValueError):
  """An adapter that has no PEFT form, or a PEFT adapter this project cannot load."""


class TaskIdError(ValueError):
  """A task id that an adapter export's router does not have, or none where one is needed."""


def kernel_shapes(config: T5Config) -> dict[tuple[str, ...], tuple[int, int]]:
  """``(d_in, d_out)`` of every per-layer dense projection, keyed by its module path."""
  return {path[:-1]: shape for path, shape in
          convert.expected_shapes(config.replace(scan_layers=False)).items()
          if path[-1] == "kernel" and path[-2] != "logits_dense"}


def adapted_modules(adapter_params) -> dict[tuple[str, ...], dict]:
  """Per-layer adapter params keyed by their projection's module path."""
  flat = traverse_util.flatten_dict(adapter_params)
  modules: dict[tuple[str, ...], dict] = {}
  for key, value in flat.items():
    if "adapter" in key:
      at = key.index("adapter")
      modules.setdefault(key[:at], {})[key[at + 1:]] = np.asarray(value, np.float32)
  return {path: traverse_util.unflatten_dict(tree) for path, tree in modules.items()}


def task_lora(adapter: AdapterConfig, layer_params, d_in: int, d_out: int, task_id: int,
              routing_weights=None) -> tuple[np.ndarray, np.ndarray]:
  """``A: [d_in, r]``, ``B: [r, d_out]`` that one layer's adapter builds for ``task_id``."""
  lora_a, lora_b = adapter.build(d_out).apply(
      {"params": layer_params}, d_in, jnp.array([task_id]), routing_weights, True,
      method="factors")
  squeeze = lambda x: np.asarray(x[0] if x.ndim == 3 else x, np.float32)
  return squeeze(lora_a), squeeze(lora_b)


def exported_shapes(meta: dict) -> dict[tuple[str, ...], tuple[int, int]]:
  """``kernel_shapes`` of the backbone an adapter export was trained on (its ``model`` config)."""
  from tensorpoly_jax import checkpoints

  if "model" not in meta:
    raise checkpoints.CheckpointMismatchError(
        "the adapter's adapter_config.json has no 'model' config (written by an older"
        " tensorpoly); export it again with this version.")
  return kernel_shapes(config_from_dict(meta["model"]))


def export_task(adapter: AdapterConfig, meta: dict, task_id: int | None) -> int | None:
  """The task whose LoRA an export builds: ``task_id``, else an adapted export's own (its meta's
  ``task_id``); 0 for LoRA and TLoRA, which build one ``A``, ``B`` for every task; None for a
  routed multi-task export given none."""
  if not adapter.routed:
    return 0
  if not adapter.routes_by_task:
    raise TaskIdError(
        f"this {adapter.method} export routes each token to its {adapter.arrow_top_k} skills by"
        " Arrow's prototypes: no one task's LoRA exists to export or merge. Use the pretrained"
        " export with --task_id, or an export adapted in another ADAPT_MODE.")
  task_id = meta.get("task_id") if task_id is None else task_id
  if task_id is not None and not 0 <= task_id < adapter.n_tasks:
    raise TaskIdError(f"task_id={task_id} is outside the adapter's {adapter.n_tasks} tasks:"
                      f" --task_id=N takes 0 <= N < {adapter.n_tasks}, the ids in routing_ids.")
  return task_id


def task_loras(adapter: AdapterConfig, adapter_params, shapes, task_id: int
               ) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
  """Every adapted projection's ``(A: [d_in, r], B: [r, d_out])`` for ``task_id``, keyed by its
  module path; ``shapes`` (``kernel_shapes``) gives each one's ``(d_in, d_out)``."""
  routing_weights = _shared_routing(adapter, adapter_params, task_id)
  return {path: task_lora(adapter, layer_params, *shapes[path], task_id, routing_weights)
          for path, layer_params in adapted_modules(adapter_params).items()}


def _target_modules(module_paths, shapes) -> list[str]:
  """PEFT's ``target_modules``: the projection names (``q``, ``wo``) where they select exactly the
  adapted modules, else every adapted module's full name."""
  leaf = lambda name: name.rsplit(".", 1)[1]
  names = {convert.hf_module_name(path) for path in module_paths}
  leaves = sorted({leaf(name) for name in names})
  covered = {name for name in map(convert.hf_module_name, shapes) if leaf(name) in leaves}
  return leaves if covered == names else sorted(names)


def _peft_config(peft_type: str, module_paths, shapes, base_model: str | None, **fields) -> dict:
  return {"peft_type": peft_type, "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": base_model,
          "target_modules": _target_modules(module_paths, shapes), "inference_mode": True,
          "auto_mapping": {"base_model_class": BASE_MODEL_CLASS,
                           "parent_library": "transformers.models.t5.modeling_t5"}, **fields}


def to_peft(adapter_params, meta: dict, task_id: int | None = None,
            base_model: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
  """``(adapter_config, tensors)`` in PEFT's format for an ``export_adapter`` folder's contents.

  ``task_id`` (default: an adapted export's own task) exports that task's LoRA."""
  adapter = from_dict(meta["adapter"])
  shapes = exported_shapes(meta)
  task_id = export_task(adapter, meta, task_id)
  if task_id is None and adapter.method in ("poly", "mhr"):
    return _to_poly(adapter, adapter_params, adapted_modules(adapter_params), shapes, base_model)
  if task_id is None:
    raise PeftFormatError(
        f"{adapter.method} routes {adapter.n_tasks} tasks through tensor products, which PEFT has"
        " no adapter type for. Export one task as the rank-r LoRA it builds: --task_id=N (0 <="
        f" N < {adapter.n_tasks}, the ids in routing_ids); PEFT formats: LORA (lora, tlora, or"
        " any method for one task) and POLY (poly, mhr).")
  loras = task_loras(adapter, adapter_params, shapes, task_id)
  tensors = {}
  for path, (lora_a, lora_b) in loras.items():
    name = PREFIX + convert.hf_module_name(path)
    tensors[f"{name}.lora_A.weight"] = lora_a.T
    tensors[f"{name}.lora_B.weight"] = lora_b.T
  config = _peft_config("LORA", loras, shapes, base_model, r=adapter.lora_rank, lora_alpha=1,
                        lora_dropout=0.0, bias="none", fan_in_fan_out=False)
  return config, tensors


def _shared_routing(adapter: AdapterConfig, adapter_params, task_id: int):
  if not (adapter.routed and adapter.shared_router):
    return None
  router = Router(adapter.n_tasks, adapter.routing_heads, adapter.routed_skills)
  return router.apply({"params": adapter_params["shared_router"]}, jnp.array([task_id]))


def _to_poly(adapter, adapter_params, modules, shapes, base_model):
  tensors = {}
  shared = adapter_params.get("shared_router") if adapter.shared_router else None
  for path, layer_params in modules.items():
    name = PREFIX + convert.hf_module_name(path)
    logits = (shared or layer_params["router"])["skill_logits"]  # [tasks, heads, skills]
    tensors[f"{name}.poly_lora_A"] = layer_params["lora_a"]
    tensors[f"{name}.poly_lora_B"] = layer_params["lora_b"]
    # PEFT keeps one router per module: a shared router is copied to each.
    tensors[f"{name}.poly_router.module_logits"] = np.asarray(logits, np.float32).reshape(
        adapter.n_tasks, -1)
  config = _peft_config("POLY", modules, shapes, base_model, r=adapter.lora_rank,
                        n_tasks=adapter.n_tasks, n_skills=adapter.n_skills,
                        n_splits=adapter.routing_heads, poly_type="poly")
  return config, tensors


def export(adapter_dir: str, output_dir: str, task_id: int | None = None,
           base_model: str | None = None) -> str:
  """Writes ``adapter_dir`` (an ``export_adapter`` folder) as a PEFT adapter in ``output_dir``."""
  from safetensors.numpy import save

  from tensorpoly_jax import checkpoints

  config, tensors = to_peft(*checkpoints.load_adapter(adapter_dir), task_id, base_model)
  directory = paths.resolve(output_dir)
  # safetensors writes each buffer as if C-ordered: transposed views must be copied first.
  weights = save({name: np.ascontiguousarray(value) for name, value in tensors.items()})
  paths.write_folder(directory, {PEFT_WEIGHTS: weights,
                                 PEFT_CONFIG: json.dumps(config, indent=2, sort_keys=True)})
  return str(directory)


# PEFT options that change what the adapter computes, with the values tensorpoly can represent.
_PLAIN_OPTIONS = {"bias": ("none",), "use_dora": (False,), "fan_in_fan_out": (False,),
                  "lora_bias": (False,), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
                  "modules_to_save": (None, []), "layer_replication": (None,),
                  "poly_type": ("poly",)}


def _check_importable(config: dict) -> None:
  peft_type = config.get("peft_type")
  if peft_type not in PEFT_TYPES:
    raise PeftFormatError(f"peft_type {peft_type!r} has no tensorpoly form; importable: {PEFT_TYPES}.")
  base_class = (config.get("auto_mapping") or {}).get("base_model_class", BASE_MODEL_CLASS)
  if base_class != BASE_MODEL_CLASS:
    raise PeftFormatError(f"the adapter is for a {base_class}; tensorpoly adapts T5 encoder-"
                          f"decoders ({BASE_MODEL_CLASS}).")
  for option, plain in _PLAIN_OPTIONS.items():
    if option in config and config[option] not in plain:
      raise PeftFormatError(f"{option}={config[option]!r} has no tensorpoly equivalent (it needs"
                            f" {plain[0]!r}).")


def _features(lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[int, int]:
  """``(d_in, d_out)`` of LoRA sides ``[d_in, r]``/``[r, d_out]`` or Poly's ``[h, s, d/h, r]``/``[h, s, r, d/h]``."""
  if lora_a.ndim == 4:
    return lora_a.shape[0] * lora_a.shape[2], lora_b.shape[0] * lora_b.shape[3]
  return lora_a.shape[0], lora_b.shape[1]


def from_peft(config: dict, tensors: dict[str, np.ndarray], backbone: T5Config
              ) -> tuple[AdapterConfig, dict]:
  """``(adapter config, per-layer adapter params)`` of a PEFT LoRA / Poly adapter for ``backbone``."""
  _check_importable(config)
  shapes = kernel_shapes(backbone)
  by_module: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    match = _KEY.fullmatch(key.removeprefix(PREFIX))
    target = match and convert.flax_name(match["module"] + ".weight")
    if not target or target[0][:-1] not in shapes:
      raise PeftFormatError(f"{key!r} is not an adapter of a Hugging Face T5 projection; tensorpoly"
                            f" imports LoRA / Poly adapters of {BASE_MODEL_CLASS}.")
    by_module.setdefault(target[0][:-1], {})[match["tensor"]] = np.asarray(value, np.float32)
  rank = config["r"]
  if config["peft_type"] == "LORA":
    scale = config.get("lora_alpha", 8) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    adapter_kwargs = dict(method="lora")
    params = {path: {"lora_a": t["lora_A.weight"].T, "lora_b": t["lora_B.weight"].T * scale * rank}
              for path, t in by_module.items()}
  else:
    n_tasks, n_splits, n_skills = config["n_tasks"], config["n_splits"], config["n_skills"]
    adapter_kwargs = dict(method="poly", n_tasks=n_tasks, n_skills=n_skills)
    if n_splits > 1:
      adapter_kwargs.update(method="mhr", n_splits=n_splits)
    params = {path: {"lora_a": t["poly_lora_A"], "lora_b": t["poly_lora_B"], "router": {
        "skill_logits": t["poly_router.module_logits"].reshape(n_tasks, n_splits, n_skills)}}
              for path, t in by_module.items()}
  for path, layer in params.items():
    d_in, d_out = shapes[path]
    got = _features(layer["lora_a"], layer["lora_b"])
    if got != (d_in, d_out):
      raise PeftFormatError(
          f"{convert.hf_module_name(path)} maps {got[0]} -> {got[1]} features in the adapter but"
          f" {d_in} -> {d_out} in the backbone: the adapter was trained on another base model.")
  targets = "|".join(re.escape("/".join(path)) for path in sorted(params))
  adapter = adapter_config(lora_rank=rank, targets=targets, **adapter_kwargs)
  nested = traverse_util.unflatten_dict(
      {path + ("adapter",) + key: value for path, layer in params.items()
       for key, value in traverse_util.flatten_dict(layer).items()})
  return adapter, nested


def import_(peft_dir: str, backbone_dir: str, output_dir: str,
            check_base_model: bool = True) -> str:
  """Writes a PEFT adapter folder as a tensorpoly adapter export for the converted backbone; with
  ``check_base_model``, refuses one whose base model is not the one the backbone came from
  (``check_same_model``)."""
  from safetensors.numpy import load

  from tensorpoly_jax import checkpoints, pipeline

  source = paths.resolve(peft_dir)
  config = json.loads((source / PEFT_CONFIG).read_text())
  if check_base_model:
    check_same_model(config.get("base_model_name_or_path"), convert.stored_source(backbone_dir),
                     backbone_dir)
  backbone = convert.converted_config(backbone_dir)
  adapter, params = from_peft(config, load((source / PEFT_WEIGHTS).read_bytes()), backbone)
  routing_ids = {f"task_{i}": i for i in range(adapter.n_tasks)} if adapter.routed else {}
  # Recorded as a trained export records it: adapt and eval refuse another backbone.
  meta = pipeline.run_meta(f"import peft {peft_dir}", backbone.replace(adapter=adapter),
                           routing_ids, convert.stored_fingerprint(backbone_dir))
  parent = paths.resolve(output_dir)
  return checkpoints.export_adapter(str(parent.parent), parent.name, params, meta)


def _model_name(model: str) -> str:
  return model.rstrip("/").rsplit("/", 1)[-1].lower()


def check_same_model(base_model: str | None, converted_from: str | None, backbone_dir: str) -> None:
  """Refuses a PEFT adapter whose ``base_model_name_or_path`` names another model than the one
  the backbone was converted from: same-shaped models (T0 and the T5 it started from) pass the
  shape checks and would score silently wrong. Names compare by their last part, so a hub id and
  a local copy agree (``bigscience/T0_3B``, ``/data/hf/T0_3B``). When either name is unknown, only
  the shapes are checked, and the import says so."""
  if not base_model or not converted_from:
    missing = ("the PEFT adapter names no base model" if not base_model else
               f"{backbone_dir} does not record what it was converted from")
    console.say(f"import: {missing}; only the shapes are checked.")
    return
  if _model_name(base_model) != _model_name(converted_from):
    raise PeftFormatError(
        f"the PEFT adapter was trained on {base_model!r} (base_model_name_or_path), but"
        f" {backbone_dir} was converted from {converted_from!r}: convert that model and import"
        " onto it, or pass --skip_base_model_check if they are the same model under two names.")
