"""LoRA: one ``A: [d_in, r]``, ``B: [r, d_out]`` pair shared by every example."""
from __future__ import annotations

import dataclasses

from flax import linen as nn

from tensorpoly_jax import methods, param_roles
from tensorpoly_jax.adapters.base import Adapter, kaiming_bound
from tensorpoly_jax.routing import uniform_init

param_roles.declare(lora_a="lora", lora_b="lora")


class LoRA(Adapter):
  """``A`` kaiming-uniform, ``B`` zeros."""

  caches_factors = False

  @nn.compact
  def factors(self, d_in, task_ids, routing_weights, deterministic):
    lora_a = self._param("lora_a", uniform_init(kaiming_bound(d_in)), (d_in, self.lora_rank),
                         (self.in_axis, "lora_rank"))
    lora_b = self._param("lora_b", nn.initializers.zeros, (self.lora_rank, self.features),
                         ("lora_rank", self.out_axis))
    return lora_a, lora_b


@methods.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig(methods.AdapterConfig):
  method = "lora"
  module = LoRA
