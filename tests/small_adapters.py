"""Small adapter configs for any method, for tests parametrized over methods, and adapter params
moved as training moves them."""
import dataclasses

import jax
import numpy as np

from tensorpoly_jax import methods


def small_adapter(method: str, *, lora_rank=2, n_tasks=3, skills=4, order=2, splits=2, **fields):
  """``method`` with each size given to the field it has: ``skills`` is Poly's and MHR's
  ``n_skills`` or a tensor method's ``tensor_rank``, ``splits`` MHR's heads; ``fields`` are set
  as given."""
  config_cls = methods.METHODS[method]
  names = {f.name for f in dataclasses.fields(config_cls)}
  sizes = dict(lora_rank=lora_rank, n_tasks=n_tasks, n_skills=skills, tensor_rank=skills,
               order=order, n_splits=splits)
  return config_cls(**{k: v for k, v in sizes.items() if k in names}, **fields)


def random_adapter(config, seed=0) -> dict:
  """Adapter (and router) params for ``config``'s model as training moves them, drawn in numpy
  from its abstract shapes: LoRA ``A`` at its init's bound, ``B`` small and non-zero,
  tensor leaves at T0 width's regime (their products' variance far below the pair norm's eps: at
  this tiny width it would normalize them to O(1) entries, and float32 rounding of a delta larger
  than the logits would blur comparisons), pair norms at their identity, distinct router rows.
  (The model's own init runs every layer op by op: seconds per tensor adapter.)"""
  from tensorpoly_jax.adapters.base import LORA_GAIN
  from tensorpoly_jax.t5.model import EncoderDecoder, abstract_variables, split_params

  rng = np.random.default_rng(seed)
  uniform = lambda shape, bound: rng.uniform(-bound, bound, shape).astype(np.float32)

  def draw(path, shape):
    name, shape = jax.tree_util.keystr(path), shape.shape
    if "skill_logits" in name:
      return rng.standard_normal(shape, np.float32)
    if "leaves" in name:  # [n, s, r, q]: q ** n ~ d, the kaiming bound 1/sqrt(d) ~ q ** (-n/2)
      return uniform(shape, 0.1 * LORA_GAIN / shape[-1] ** (shape[0] / 2))
    if "norm_scale" in name:
      return np.ones(shape, np.float32)
    if "norm_bias" in name:
      return np.zeros(shape, np.float32)
    if "lora_a" in name:  # [..., d_in, r]
      return uniform(shape, LORA_GAIN / np.sqrt(shape[-2]))
    return 0.02 * rng.standard_normal(shape, np.float32)  # lora_b

  shapes = split_params(abstract_variables(EncoderDecoder(config))["params"])[0]
  return jax.tree_util.tree_map_with_path(draw, shapes)


def random_model_params(config, seed=0) -> dict:
  """Every param of ``config``'s model drawn in numpy from its abstract shapes: the backbone's
  kernels and embeddings at unit-variance outputs, norm scales near 1, and ``random_adapter``'s
  adapter params (jitting the model's init instead costs seconds of XLA compile per model)."""
  from tensorpoly_jax.t5.model import EncoderDecoder, abstract_variables, merge_params, split_params

  rng = np.random.default_rng(seed + 1)

  def draw(path, shape):
    name, shape = jax.tree_util.keystr(path), shape.shape
    if "scale" in name:
      return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = shape[-2] if "kernel" in name and len(shape) >= 2 else 1
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

  backbone = split_params(abstract_variables(EncoderDecoder(config))["params"])[1]
  return merge_params(random_adapter(config, seed), jax.tree_util.tree_map_with_path(draw, backbone))
