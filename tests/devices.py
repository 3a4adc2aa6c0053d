"""The fake CPU devices of a test process, set through XLA_FLAGS before jax is imported."""

# The tests' tiny programs spend more time in XLA:CPU's LLVM passes than running, and level 0 cuts
# that by about a sixth (the quick demo: 2 min 17 s of CPU time against 2 min 40 s, the same
# accuracies); compiles for TPU topologies do not read it (the T0-3B step's memory and FLOPs are
# the same to the byte).
OPTIMIZATION = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  return f"--xla_force_host_platform_device_count={devices} {OPTIMIZATION}"


def count() -> int:
  import jax

  return jax.device_count()
