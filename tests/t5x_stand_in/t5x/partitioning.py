"""``t5x.partitioning.standard_logical_axis_rules`` (1-D model parallelism, its default)."""


def standard_logical_axis_rules(activation_partitioning_dims=1, parameter_partitioning_dims=1,
                                additional_rules=None):
  del activation_partitioning_dims, parameter_partitioning_dims
  rules = [("batch", "data"), ("vocab", "model"), ("embed", None), ("mlp", "model"),
           ("heads", "model"), ("kv", None), ("joined_kv", "model"), ("relpos_buckets", None),
           ("abspos_buckets", None), ("length", None), ("layers", None), ("stack", None),
           ("mlp_activations", None)]
  return rules + list(additional_rules or ())
