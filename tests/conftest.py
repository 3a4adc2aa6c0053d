"""Test-session settings; they must be in the environment before jax is imported."""
import os
import shutil
import tempfile

import pytest

# Eight fake CPU devices for the sharding tests. The tests' tiny programs spend more time in
# XLA:CPU's LLVM passes than running, and level 0 cuts that by about a sixth (the quick demo: 2 min
# 17 s of CPU time against 2 min 40 s, the same accuracies); compiles for TPU topologies do not
# read it (the T0-3B step's memory and FLOPs are the same to the byte).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8"
                      " --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never reach the network: hub look-ups fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests (and the CLI runs they start as subprocesses) compile the same tiny programs: one
# XLA compilation cache, new for each session, so each program is still compiled once per run.
# The xdist workers and every subprocess inherit it from the process that made it.
_CACHE_OWNER = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _CACHE_OWNER:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tensorpoly-xla-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_collection_modifyitems(items):
  # The long end-to-end runs first: with `--dist worksteal` the worker that runs them gives the
  # short ones behind them to the other, and no long run starts last while the other worker idles.
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
  if _CACHE_OWNER and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)



@pytest.fixture(scope="session")
def tiny_backbone_train():
  """How ``tiny_backbone_dir`` was trained: 10 steps of AdamW."""
  from tensorpoly_jax import trainer
  from tensorpoly_jax.optimizers import OptimizerConfig

  return trainer.TrainConfig(steps=10, batch_size=8, inputs_length=48, targets_length=24,
                             checkpoint_every=10, log_every=1,
                             optimizer=OptimizerConfig(name="adamw", learning_rate=1e-2))


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory, tiny_backbone_train):
  """A tiny T5 trained 10 steps on the small embedded suite the pipeline tests register
  (``embedded.Sizes(20, 2, 24, 12)``): the backbone they adapt, built once per xdist worker."""
  from tensorpoly_jax import pipeline
  from tensorpoly_jax.data import embedded, tasks
  from tensorpoly_jax.t5.model import preset

  tasks.register_embedded(0, embedded.Sizes(20, 2, 24, 12))
  return pipeline.train_backbone(str(tmp_path_factory.mktemp("backbone")), preset("tiny"),
                                 tasks.EMBEDDED_TRAIN, tiny_backbone_train)
