"""The T5 backbone: T5X-style Flax layers whose dense projections can carry adapters."""
