"""Importing this registers the embedded mini-T0 suite's seqio tasks and mixtures
(``embedded_train``: 36 routed tasks; ``embedded_heldout``), for T5X's
``MIXTURE_OR_TASK_MODULE``."""
from tensorpoly_jax.data import tasks

ROUTING_IDS = tasks.register_embedded()
