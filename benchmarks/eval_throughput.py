"""Rank-classification throughput: the evaluator's scorer (encoder once per example, decoder over
all its answer choices) against a naive scorer that runs the whole model once per choice, on a
T5-v1.1-small-shaped model with random weights and a Poly adapter, in the same process.

Both scorers' choice scores are checked equal before timing. Prints a table, writes JSON.

  python benchmarks/eval_throughput.py [--quick]
"""
from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

from tensorpoly_jax.adapters import PolyConfig  # noqa: E402
from tensorpoly_jax.t5 import scoring  # noqa: E402
from tensorpoly_jax.t5.model import EncoderDecoder, preset  # noqa: E402
from tensorpoly_jax.t5.seq2seq import Seq2SeqModel  # noqa: E402

SIZES = {
    "default": dict(preset="t5_1_1_small", examples=32, choices=4, inputs=256, targets=8,
                    repeats=5),
    "quick": dict(preset="tiny", examples=8, choices=3, inputs=32, targets=4, repeats=2),
}


@functools.partial(jax.jit, static_argnums=0)
def evaluator_scores(model, params, encoder_tokens, choice_tokens, task_ids):
  return Seq2SeqModel(model).score_choices(params, encoder_tokens, choice_tokens, task_ids)


@functools.partial(jax.jit, static_argnums=0)
def naive_scores(model, params, encoder_tokens, choice_tokens, task_ids):
  """One full encoder-decoder pass per (example, choice) pair."""
  batch, choices, length = choice_tokens.shape
  repeat = lambda x: jnp.repeat(x, choices, axis=0)
  scores = scoring.score_pairs(model, {"params": params}, repeat(encoder_tokens),
                               choice_tokens.reshape(batch * choices, length), repeat(task_ids))
  return scores.reshape(batch, choices)


def main():
  args = common.argument_parser(__doc__).parse_args()
  size = SIZES["quick" if args.quick else "default"]
  adapter = PolyConfig(lora_rank=1, n_skills=8, n_tasks=8)
  model = EncoderDecoder(preset(size["preset"], adapter=adapter))
  params = common.random_params(model)
  rng = np.random.default_rng(0)
  vocab = model.config.vocab_size
  encoder_tokens = jnp.asarray(rng.integers(2, vocab, (size["examples"], size["inputs"])), jnp.int32)
  choice_tokens = jnp.asarray(
      rng.integers(2, vocab, (size["examples"], size["choices"], size["targets"])), jnp.int32)
  task_ids = jnp.asarray(np.arange(size["examples"]) % 8, jnp.int32)
  inputs = (model, params, encoder_tokens, choice_tokens, task_ids)
  np.testing.assert_allclose(evaluator_scores(*inputs), naive_scores(*inputs), rtol=1e-4,
                             atol=1e-4)
  rows = []
  for name, scorer in (("naive (encoder per choice)", naive_scores),
                       ("evaluator (encoder per example)", evaluator_scores)):
    timing = common.median_seconds(lambda: scorer(*inputs).block_until_ready(), size["repeats"])
    rows.append({"scorer": name, **timing, "examples_per_s": size["examples"] / timing["median_s"]})
  for row in rows:
    row["speedup"] = rows[0]["median_s"] / row["median_s"]
  print(f"rank classification: {size}, Poly adapter, {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} cores (scores checked equal)")
  common.print_table(rows, [("scorer", "scorer", ""), ("median_s", "median s", ".3f"),
                            ("examples_per_s", "examples/s", ".1f"),
                            ("speedup", "x naive", ".2f")])
  path = common.write_json("eval_throughput", {"size": size, "rows": rows}, args)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
