"""Data: seqio tasks and mixtures (T0 and the embedded mini-T0), prompts, few-shot subsets."""
import os

# TensorFlow only runs seqio's input pipelines: it must leave the GPUs (and their memory) to JAX,
# and keep its C++ logs quiet. Enumerating GPUs where there are none logs a cuInit error, so the
# devices are hidden only on a machine that has NVIDIA's device files.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its start-up notice; no TF math runs here

import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

if os.path.exists("/dev/nvidiactl"):
  tf.config.set_visible_devices([], "GPU")
