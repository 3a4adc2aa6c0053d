"""The role of every param, decided from its path in one place: what trains, at which rate, what
an adapter export holds, which router rows a new task extends, and what T5X's optimizer sees.

Roles: ``backbone`` (the frozen T5), ``lora`` (``lora_a``/``lora_b`` of LoRA, Poly, MHR),
``leaf`` (tensor leaves of TLoRA and TensorPoly), ``norm`` (trainable pair-LayerNorm affines),
``router`` (task routers' skill logits). The module that creates an adapter param declares its
role (``declare``).
"""
from __future__ import annotations

ADAPTER_MODULES = ("adapter", "shared_router")  # every adapter / router param lives under one
ROLES = ("backbone", "lora", "leaf", "norm", "router")
_ADAPTER_ROLES: dict[str, str] = {}


def declare(**roles: str) -> None:
  """Gives each adapter param name (``lora_a="lora"``) its role."""
  for name, role in roles.items():
    if role not in ROLES[1:]:
      raise ValueError(f"param {name!r}: role {role!r} is not one of {ROLES[1:]}.")
    if _ADAPTER_ROLES.setdefault(name, role) != role:
      raise ValueError(f"param {name!r} is declared {_ADAPTER_ROLES[name]!r} and {role!r}.")


def param_role(path: tuple[str, ...]) -> str:
  """One of ``ROLES`` for a param path such as ``("encoder", "layers_0", "mlp", "wo", "adapter",
  "lora_a")``."""
  if not any(name in ADAPTER_MODULES for name in path):
    return "backbone"
  try:
    return _ADAPTER_ROLES[path[-1]]
  except KeyError:
    raise ValueError(f"adapter param {'/'.join(path)} has no role: declare it with"
                     f" param_roles.declare (known: {sorted(_ADAPTER_ROLES)}).") from None


def is_adapter_path(path: tuple[str, ...]) -> bool:
  """Trained with the backbone frozen, and exported: adapter and router params."""
  return param_role(path) != "backbone"
