"""The role of every param, decided from its path in one place: what trains, at which rate, what
an adapter export holds, which router rows a new task extends, and what T5X's optimizer sees.

Roles: ``backbone`` (the frozen T5), ``lora`` (``lora_a``/``lora_b`` of LoRA, Poly, MHR),
``leaf`` (tensor leaves of TLoRA and TensorPoly), ``norm`` (trainable pair-LayerNorm affines),
``router`` (task routers' skill logits).
"""
from __future__ import annotations

ADAPTER_MODULES = ("adapter", "shared_router")  # every adapter / router param lives under one
ROLES = ("backbone", "lora", "leaf", "norm", "router")
_ADAPTER_ROLES = {"lora_a": "lora", "lora_b": "lora", "leaves": "leaf", "norm_scale": "norm",
                  "norm_bias": "norm", "skill_logits": "router"}


def param_role(path: tuple[str, ...]) -> str:
  """One of ``ROLES`` for a param path such as ``("encoder", "layers_0", "mlp", "wo", "adapter",
  "lora_a")``."""
  if not any(name in ADAPTER_MODULES for name in path):
    return "backbone"
  try:
    return _ADAPTER_ROLES[path[-1]]
  except KeyError:
    raise ValueError(f"adapter param {'/'.join(path)} has no role: name it one of"
                     f" {sorted(_ADAPTER_ROLES)} (tensorpoly_jax/param_roles.py).") from None


def is_adapter_path(path: tuple[str, ...]) -> bool:
  """Trained with the backbone frozen, and exported: adapter and router params."""
  return param_role(path) != "backbone"
