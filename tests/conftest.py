"""Test-session settings; they must be in the environment before jax is imported."""
import os
import shutil
import tempfile

import pytest

from tests import devices

# One CPU device: the pipeline's end-to-end runs take a third less time than on 8 fake devices (the
# quick demo: 124 s against 187 s, the same table). The tests marked `eight_devices` need a mesh of
# 8; tests/test_eight_devices.py runs them in a process that has 8 (tests/devices.py).
os.environ.setdefault("XLA_FLAGS", devices.xla_flags(1))
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


BACKBONE_FROM_PARENT = "TENSORPOLY_TEST_TINY_BACKBONE_DIR"

# The longest tests, longest first (docs/results/test-suite.md has their times).
LONGEST = ("test_the_eight_device_tests_pass_on_eight_devices",
           "test_demo_quick_end_to_end_then_resumed_in_a_fresh_process",
           "test_preempted_two_process_run_resumes_matches_one_process_and_restores_in_one_process",
           "test_sigkill_then_sigterm_then_resume_ends_where_an_uninterrupted_run_ends")


def pytest_collection_modifyitems(items):
  # The long end-to-end runs first, the longest of them before the others: `--dist load
  # --maxschedchunk 1` hands each worker the next test as it frees up, so the long runs spread over
  # both workers, the short ones fill in behind them, and no long run starts last while the other
  # worker idles.
  rank = lambda item: LONGEST.index(item.name) if item.name in LONGEST else len(LONGEST)
  items.sort(key=lambda item: (item.get_closest_marker("slow") is None, rank(item)))


def pytest_runtest_setup(item):
  if item.get_closest_marker("eight_devices") and devices.count() < 8:
    pytest.skip("needs 8 (fake) devices: tests/test_eight_devices.py runs it in a process of 8")


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
  (``embedded.Sizes(20, 2, 24, 12)``): the backbone they adapt, built once per xdist worker; a
  pytest process started by a test (tests/test_eight_devices.py) reads its parent's."""
  from tensorpoly_jax import pipeline
  from tensorpoly_jax.data import embedded, tasks
  from tensorpoly_jax.t5.model import preset

  tasks.register_embedded(0, embedded.Sizes(20, 2, 24, 12))
  if BACKBONE_FROM_PARENT in os.environ:
    return os.environ[BACKBONE_FROM_PARENT]
  return pipeline.train_backbone(str(tmp_path_factory.mktemp("backbone")), preset("tiny"),
                                 tasks.EMBEDDED_TRAIN, tiny_backbone_train)
