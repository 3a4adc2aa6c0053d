"""tensorpoly-jax: latent-expert adapters (LoRA, TLoRA, Poly, MHR, TensorPoly-I/II) for T5 in JAX."""
from tensorpoly_jax.adapters import (MHR, LoRA, LoRAConfig, MHRConfig, Poly, PolyConfig,
                                     TensorPolyI, TensorPolyIConfig, TensorPolyII,
                                     TensorPolyIIConfig, TLoRA, TLoRAConfig)
from tensorpoly_jax.methods import METHODS, AdapterConfig, adapter_config
from tensorpoly_jax.routing import Router, check_task_ids

__version__ = "0.1.0"
__all__ = [
    "AdapterConfig", "LoRA", "LoRAConfig", "METHODS", "MHR", "MHRConfig", "Poly", "PolyConfig",
    "Router", "TLoRA", "TLoRAConfig", "TensorPolyI", "TensorPolyIConfig", "TensorPolyII",
    "TensorPolyIIConfig", "adapter_config", "check_task_ids",
]
