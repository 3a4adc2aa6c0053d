"""The tests that need a ('data', 'model') mesh of 8 devices (marked `eight_devices`), in a pytest
process of 8 fake CPU devices; the rest of the suite runs on one (tests/conftest.py)."""
import os
import subprocess
import sys

import pytest

from tests import conftest, devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("tests/test_sharding.py", "tests/test_trainer.py", "tests/test_t5x_bridge.py",
         "tests/test_aot.py")


@pytest.mark.slow
def test_the_eight_device_tests_pass_on_eight_devices(tiny_backbone_dir):
  if devices.count() >= 8:
    pytest.skip("this process has 8 devices: the eight_devices tests run in it")
  env = {**os.environ, "XLA_FLAGS": devices.xla_flags(8),
         conftest.BACKBONE_FROM_PARENT: tiny_backbone_dir}
  done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-m", "eight_devices", *FILES], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=1800)
  assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
  summary = done.stdout.strip().splitlines()[-1]
  assert " passed" in summary and "skipped" not in summary, summary
