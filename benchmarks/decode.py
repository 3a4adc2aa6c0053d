"""Generation speed: tensorpoly's decoding with its cache against full recomputation and against
Hugging Face ``generate`` on the same weights (a random T5-v1.1-small-shaped checkpoint converted
with ``tensorpoly convert``), greedy and beam 4, in one process; and a TensorPoly-I adapter
decoding a batch that mixes tasks against a single-task batch.

Every row generates exactly NEW_TOKENS tokens per sequence (EOS never ends one: ours with no EOS
id, Hugging Face's with ``min_new_tokens``), so tokens/s compare like for like. Before timing, our
cached greedy tokens are checked equal to Hugging Face's over the first EOS-free steps.

  python benchmarks/decode.py [--quick]
"""
from __future__ import annotations

import functools
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

from tensorpoly_jax import decoding  # noqa: E402
from tensorpoly_jax.t5 import convert  # noqa: E402
from tensorpoly_jax.t5.model import EncoderDecoder  # noqa: E402

SIZES = {
    "default": dict(hf=dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                            vocab_size=32128), batch=8, inputs=128, new_tokens=64, repeats=5),
    "quick": dict(hf=dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                          vocab_size=512), batch=4, inputs=16, new_tokens=8, repeats=2),
}
N_TASKS = 8
NEVER = -1  # an EOS id no token has: every row runs to NEW_TOKENS


def converted_checkpoint(hf_sizes: dict, folder: str):
  """A random Hugging Face T5 v1.1 (gated-GELU, untied head) and its conversion."""
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.T5Config(**hf_sizes, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False, dropout_rate=0.0)
  hf = transformers.T5ForConditionalGeneration(config).eval()
  hf.save_pretrained(folder)
  return hf, *convert.load_hf_checkpoint(folder)


@functools.lru_cache(maxsize=None)
def _jitted(config, decode_config):
  return jax.jit(lambda params, tokens, task_ids: decoding.generate(
      EncoderDecoder(config), params, tokens, task_ids, decode_config).tokens)


def ours(config, params, tokens, task_ids=None, **decode):
  """A blocking call of our jitted decoding (compiled on its first call)."""
  run = _jitted(config, decoding.DecodeConfig(**decode))
  return lambda: jax.block_until_ready(run(params, tokens, task_ids))


def hugging_face(hf, tokens: np.ndarray, new_tokens: int, num_beams: int):
  import torch

  inputs = torch.as_tensor(tokens)
  kwargs = dict(attention_mask=inputs > 0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                num_beams=num_beams, early_stopping=True, do_sample=False,
                decoder_start_token_id=0, eos_token_id=decoding.EOS_ID, pad_token_id=0)

  def run():
    with torch.no_grad():
      return hf.generate(input_ids=inputs, **kwargs)
  return run


def main():
  args = common.argument_parser(__doc__).parse_args()
  size = SIZES["quick" if args.quick else "default"]
  new_tokens, batch = size["new_tokens"], size["batch"]
  with tempfile.TemporaryDirectory() as folder:
    hf, config, params = converted_checkpoint(size["hf"], folder)
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, config.vocab_size, (batch, size["inputs"])).astype(np.int32)
  tokens[:, -size["inputs"] // 4:] = 0  # padding, as a batch of unequal inputs has

  # Same tokens as Hugging Face's greedy generate while neither has produced its EOS.
  ours_greedy = np.asarray(_jitted(config, decoding.DecodeConfig(max_decode_length=new_tokens))(
      params, jnp.asarray(tokens), None))
  theirs = hugging_face(hf, tokens, new_tokens, 1)().numpy()[:, 1:]
  ended = (ours_greedy == decoding.EOS_ID).cumsum(1) > 0
  if not np.array_equal(np.where(ended, 0, ours_greedy), np.where(ended, 0, theirs)):
    raise AssertionError("our greedy decoding differs from transformers' generate")
  print("greedy tokens checked equal to transformers' generate")

  common_decode = dict(max_decode_length=new_tokens, eos_id=NEVER)
  placed = jnp.asarray(tokens)
  runs = {
      ("ours", "greedy", "cached"): ours(config, params, placed, **common_decode),
      ("ours", "greedy", "recompute"): ours(config, params, placed, use_cache=False,
                                            **common_decode),
      ("ours", "beam 4", "cached"): ours(config, params, placed, method="beam", num_beams=4,
                                         **common_decode),
      ("hf", "greedy", "cached"): hugging_face(hf, tokens, new_tokens, 1),
      ("hf", "beam 4", "cached"): hugging_face(hf, tokens, new_tokens, 4),
  }
  adapted = config.replace(adapter=common.paper_adapter("tensorpoly_i", N_TASKS))
  adapted_params = common.random_params(EncoderDecoder(adapted), backbone=params)
  for name, task_ids in (("one task", np.zeros(batch)), ("mixed tasks", np.arange(batch) % N_TASKS)):
    runs[("ours+tensorpoly_i", "greedy", name)] = ours(
        adapted, adapted_params, placed, jnp.asarray(task_ids, jnp.int32), **common_decode)
  for run in runs.values():  # compile and warm up
    run()
  timed = common.interleaved_seconds({" / ".join(k): v for k, v in runs.items()}, size["repeats"])
  rows = []
  for (framework, method, mode), run in runs.items():
    stats = timed[" / ".join((framework, method, mode))]
    rows.append({"framework": framework, "method": method, "mode": mode, **stats,
                 "tokens_per_s": batch * new_tokens / stats["median_s"]})
  speed = {(r["framework"], r["method"], r["mode"]): r["tokens_per_s"] for r in rows}
  for row in rows:
    key = (row["method"], row["mode"] if row["framework"] != "ours+tensorpoly_i" else "cached")
    row["x_hf"] = (speed[("ours", *key)] / speed[("hf", *key)]
                   if row["framework"] == "ours" and ("hf", *key) in speed else None)
  cached, recompute = speed[("ours", "greedy", "cached")], speed[("ours", "greedy", "recompute")]
  summary = {"cached_over_recompute_greedy": cached / recompute,
             "ours_over_hf_greedy": cached / speed[("hf", "greedy", "cached")],
             "ours_over_hf_beam4": speed[("ours", "beam 4", "cached")]
             / speed[("hf", "beam 4", "cached")],
             "mixed_over_one_task": speed[("ours+tensorpoly_i", "greedy", "mixed tasks")]
             / speed[("ours+tensorpoly_i", "greedy", "one task")]}
  common.print_table(rows, [("framework", "framework", ""), ("method", "decoding", ""),
                            ("mode", "mode", ""), ("tokens_per_s", "tokens/s", ".0f"),
                            ("median_s", "median s", ".3f"), ("min_s", "min s", ".3f"),
                            ("max_s", "max s", ".3f"), ("x_hf", "ours/HF", ".2f")])
  for name, value in summary.items():
    print(f"{name}: {value:.2f}x")
  import torch

  path = common.write_json("decode", {
      "size": size, "torch_threads": torch.get_num_threads(), "commit": common.git_commit(),
      "rows": rows, "summary": summary}, args)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
