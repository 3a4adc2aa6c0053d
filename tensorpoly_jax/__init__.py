"""tensorpoly-jax: latent-expert adapters (LoRA, TLoRA, Poly, MHR, TensorPoly-I/II) for T5 in JAX."""
from tensorpoly_jax.adapters import MHR, LoRA, Poly, TensorPolyI, TensorPolyII, TLoRA
from tensorpoly_jax.methods import METHODS, AdapterConfig
from tensorpoly_jax.routing import Router, check_task_ids

__version__ = "0.1.0"
__all__ = [
    "AdapterConfig", "LoRA", "METHODS", "MHR", "Poly", "Router", "TLoRA", "TensorPolyI",
    "TensorPolyII", "check_task_ids",
]
