"""``t5x.models.EncoderDecoderModel``'s constructor and the hooks T5X's trainer calls."""


class EncoderDecoderModel:
  FEATURE_CONVERTER_CLS = None

  def __init__(self, module, input_vocabulary=None, output_vocabulary=None, optimizer_def=None,
               **kwargs):
    del input_vocabulary, output_vocabulary, optimizer_def, kwargs
    self.module = module

  def loss_fn(self, params, batch, dropout_rng):
    """T5X's training loss starts from ``_compute_logits(params, batch, dropout_rng)``."""
    return self._compute_logits(params, batch, dropout_rng)

  def score_batch(self, params, batch, return_intermediates=False):
    del return_intermediates
    return self._compute_logits(params, batch)
