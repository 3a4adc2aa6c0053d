"""Data: seqio tasks and mixtures (T0 and the embedded mini-T0), prompts, few-shot subsets."""
import contextlib
import os

# TensorFlow only runs seqio's input pipelines: it must leave the GPUs (and their memory) to JAX,
# and keep its C++ logs quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its start-up notice; no TF math runs here


@contextlib.contextmanager
def _stderr_muted():
  """Silences file descriptor 2: TensorFlow's loaders log through absl before any log level
  applies ("Could not find cuda drivers"). Python errors still propagate after it."""
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


with _stderr_muted():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # Hiding the GPUs enumerates them now, where a machine without any logs a cuInit error, rather
  # than at the first pipeline op.
  tf.config.set_visible_devices([], "GPU")
