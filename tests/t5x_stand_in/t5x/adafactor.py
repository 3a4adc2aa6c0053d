"""``t5x.adafactor.FactorDim`` and the logical axis names of its standard factor rules."""
import enum


class FactorDim(enum.Enum):
  NONE = None
  BATCH = 1
  ROW = 2
  COLUMN = 3


def standard_logical_factor_rules():
  dim = FactorDim
  return {"vocab": dim.COLUMN, "embed": dim.ROW, "mlp": dim.COLUMN, "heads": dim.COLUMN,
          "kv": dim.COLUMN, "joined_kv": dim.COLUMN, "relpos_buckets": dim.NONE,
          "layers": dim.BATCH, "stack": dim.BATCH, "mlp_activations": dim.COLUMN}


class Adafactor:
  def __init__(self, learning_rate=None, decay_rate=None, step_offset=0, logical_factor_rules=None,
               **kwargs):
    del learning_rate, decay_rate, step_offset, kwargs
    self.logical_factor_rules = logical_factor_rules
