"""Data: seqio tasks and mixtures (T0 and the embedded mini-T0), prompts, few-shot subsets."""
import os

# TensorFlow only runs seqio's input pipelines: its C++ errors on machines without a GPU ("failed
# call to cuInit") are noise here, and it must leave the accelerators to JAX.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

tf.config.set_visible_devices([], "GPU")
