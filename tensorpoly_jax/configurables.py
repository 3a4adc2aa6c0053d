"""The config classes gin files bind by their plain names (``PolyConfig.n_skills = 8``; every
registered method's config), registered once for the ``tensorpoly`` CLI and for T5X runs that
include ``configs/adapters``."""
import logging

import gin

from tensorpoly_jax import aot
from tensorpoly_jax.methods import METHODS
from tensorpoly_jax.optimizers import OptimizerConfig
from tensorpoly_jax.t5.model import RunOptions
from tensorpoly_jax.trainer import TrainConfig

for _cls in (*METHODS.values(), OptimizerConfig, RunOptions, TrainConfig, aot.StepShapes):
  gin.external_configurable(_cls, module="tensorpoly_jax")


class _SearchPathMissFilter(logging.Filter):
  """gin first looks an ``include 'runs/optimizer.gin'`` up as a Python package resource and logs
  an ERROR when there is no package ``runs``, then finds the file on its search path: a false
  alarm at every run."""

  def filter(self, record):
    return not (record.pathname.endswith("gin/resource_reader.py")
                and record.getMessage().startswith("Path not found"))


logging.getLogger().addFilter(_SearchPathMissFilter())
