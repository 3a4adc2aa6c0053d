"""A stand-in for the parts of T5X that tensorpoly_jax.t5x_bridge touches (T5X is not on PyPI).

It states T5X's interface (names, signatures, the axis names its Adafactor rules cover) and
nothing of its behaviour, so the bridge's tests check the calls the bridge makes, not T5X."""
