"""Adapter modules and their method configs, one file per family; importing a family registers
its methods (``methods.METHODS``) and declares the roles of its params (``param_roles``)."""
from tensorpoly_jax.adapters.lora import LoRA, LoRAConfig
from tensorpoly_jax.adapters.poly import MHR, MHRConfig, Poly, PolyConfig
from tensorpoly_jax.adapters.tensor import (TensorPolyI, TensorPolyIConfig, TensorPolyII,
                                            TensorPolyIIConfig, TLoRA, TLoRAConfig)

__all__ = ["LoRA", "LoRAConfig", "MHR", "MHRConfig", "Poly", "PolyConfig", "TLoRA", "TLoRAConfig",
           "TensorPolyI", "TensorPolyIConfig", "TensorPolyII", "TensorPolyIIConfig"]
