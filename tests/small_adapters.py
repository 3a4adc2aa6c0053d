"""Small adapter configs for any method, for tests parametrized over methods."""
import dataclasses

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
