"""`tensorpoly infer`: JSONL requests of a routed adapter answered in order, each as decoding it
alone gives; choices ranked as the scorer ranks them; a torn output resumed; bad lines named."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tensorpoly_jax import checkpoints, cli, decoding, inference, pipeline
from tensorpoly_jax.t5 import convert
from tensorpoly_jax.t5.model import EncoderDecoder, merge_params
from tensorpoly_jax.t5.seq2seq import Seq2SeqModel
from tests.small_adapters import random_adapter, small_adapter
from tests.test_decoding import hf_generator
from tests.test_t0_fixtures import sentencepiece_dir
from tests.test_t5 import save_untied

TEXT = ["the cat sat on the mat", "a dog ran in the park", "is it true or false", "yes no maybe"]
ROUTING_IDS = {"rte": 0, "copa": 1, "wic": 2}
REQUESTS = [
    {"inputs": "the cat sat", "task": "copa", "id": 0},
    {"input_ids": [9, 4, 17, 1], "task_id": 2, "id": 1},
    {"inputs": "is it true", "task": "rte", "choices": ["yes", "no maybe"], "id": 2},
    {"inputs": "a dog ran in the park", "task": "wic", "id": 3},
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """A converted tiny T5 with its SentencePiece vocabulary, and a Poly export over 3 tasks."""
  root = tmp_path_factory.mktemp("infer")
  save_untied(hf_generator("gated-gelu", tie_word_embeddings=False), str(root / "hf"))
  sentencepiece_dir(root / "hf", TEXT * 20, vocab_size=60)
  assert cli.main(["convert", f"--checkpoint_dir={root / 'hf'}",
                   f"--output_dir={root / 'backbone'}"]) == 0
  config, backbone = convert.load_converted(str(root / "backbone"))
  config = config.replace(adapter=small_adapter("poly", n_tasks=3))
  adapter_params = random_adapter(config)
  checkpoints.export_adapter(str(root), "adapter", adapter_params,
                             pipeline.run_meta("pretrain", config, ROUTING_IDS))
  return root, config, merge_params(adapter_params, backbone)


def infer(root, requests, output, *flags):
  (root / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
  return cli.main(["infer", f"--backbone_dir={root / 'backbone'}",
                   f"--adapter_dir={root / 'adapter'}", f"--input_file={root / 'requests.jsonl'}",
                   f"--output_file={output}", "--gin.MAX_DECODE_LENGTH=6", *flags])


def test_requests_are_answered_in_order_as_each_alone(served, tmp_path):
  root, config, params = served
  assert infer(root, REQUESTS, tmp_path / "out.jsonl", "--gin.DECODING='beam'",
               "--gin.NUM_BEAMS=3", "--gin.BATCH_SIZE=4") == 0
  answers = [json.loads(line) for line in (tmp_path / "out.jsonl").open()]
  assert [{k: a[k] for k in r} for a, r in zip(answers, REQUESTS)] == REQUESTS
  vocabulary = inference.find_vocabulary([str(root / "backbone")])
  module, beam = EncoderDecoder(config), decoding.DecodeConfig("beam", 6, num_beams=3)
  generate = jax.jit(lambda ids, task: decoding.generate(module, params, ids, task, beam).tokens)
  for request, answer in zip(REQUESTS, answers):
    task = jnp.array([ROUTING_IDS.get(request.get("task"), request.get("task_id"))])
    ids = request.get("input_ids") or [*vocabulary.encode(request["inputs"]), 1]
    if "choices" in request:
      choices = [[*vocabulary.encode(c), 1] for c in request["choices"]]
      tokens = np.zeros((1, 2, max(map(len, choices))), np.int32)
      for row, choice in zip(tokens[0], choices):
        row[:len(choice)] = choice
      scores = np.asarray(Seq2SeqModel(module).score_choices(params, jnp.array([ids]), tokens,
                                                             task))[0]
      np.testing.assert_allclose(answer["scores"], scores, rtol=1e-5)
      assert answer["choice"] == int(np.argmax(scores))
      assert answer["prediction"] == request["choices"][answer["choice"]]
      continue
    padded = np.zeros((1, 32), np.int32)  # one compile; padding is masked
    padded[0, :len(ids)] = ids
    alone = np.asarray(generate(padded, task)[0])
    expected = list(alone[:np.argmax(alone == 1)] if (alone == 1).any() else alone)
    assert answer["prediction_ids"] == [int(i) for i in expected]
    assert answer["prediction"] == vocabulary.decode(expected)


def test_a_torn_output_is_resumed_and_another_inputs_output_refused(served, tmp_path, capsys):
  root, _, _ = served
  output = tmp_path / "out.jsonl"
  assert infer(root, REQUESTS, output, "--gin.BATCH_SIZE=2") == 0
  whole = output.read_text()
  lines = whole.splitlines(keepends=True)
  output.write_text(lines[0] + lines[1][:10])  # stopped while writing line 2
  capsys.readouterr()
  assert infer(root, REQUESTS, output, "--gin.BATCH_SIZE=2") == 0
  assert "already answers 1 of 4 requests" in capsys.readouterr().out
  assert output.read_text() == whole
  with pytest.raises(ValueError, match="line 1 is not the answer to the request on input line 1"):
    infer(root, REQUESTS[::-1], output)
  with pytest.raises(ValueError, match="has 4 lines for 3 requests"):
    infer(root, REQUESTS[1:], output)
  requests = root / "requests.jsonl"  # the input named as the output: refused, left as it is
  before = requests.read_text()
  with pytest.raises(ValueError, match="or the input itself"):
    cli.main(["infer", f"--backbone_dir={root / 'backbone'}", f"--adapter_dir={root / 'adapter'}",
              f"--input_file={requests}", f"--output_file={requests}"])
  assert requests.read_text() == before


@pytest.mark.parametrize("request_line,message", [
    ({"inputs": "x", "task": "boolq"}, "task 'boolq' is not one the adapter routes; its tasks:"
                                       " copa, rte, wic"),
    ({"inputs": "x"}, "the adapter routes by task: add \"task\""),
    ({"input_ids": [3, 1], "task_id": 3}, r"task_id=3 is outside the router's \[0, 3\)"),
    ({"inputs": "x", "input_ids": [3], "task_id": 0}, "exactly one"),
    ({"input_ids": [3, 1], "task_id": 0, "prediction": "y"}, "already has the output field"),
    ({"input_ids": [3, 97], "task_id": 0}, r"token ids in \[0, 97\), the model's vocabulary"),
])
def test_bad_request_lines_are_named(served, tmp_path, request_line, message):
  root, _, _ = served
  with pytest.raises(inference.RequestError, match=f"line 2[: ].*{message}"):
    infer(root, [REQUESTS[1], request_line], tmp_path / "out.jsonl")
