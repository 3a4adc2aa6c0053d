"""The config classes gin files bind by their plain names (``AdapterConfig.method = 'poly'``),
registered once for the ``tensorpoly`` CLI and for T5X runs that include ``configs/adapters``."""
import gin

from tensorpoly_jax import aot
from tensorpoly_jax.methods import AdapterConfig
from tensorpoly_jax.optimizers import OptimizerConfig
from tensorpoly_jax.t5.model import RunOptions
from tensorpoly_jax.trainer import TrainConfig

for _cls in (AdapterConfig, OptimizerConfig, RunOptions, TrainConfig, aot.StepShapes):
  gin.external_configurable(_cls, module="tensorpoly_jax")
