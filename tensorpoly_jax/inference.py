"""``tensorpoly infer``: a JSONL file of requests in, one output line per request out, in order.

A request line holds ``"inputs"`` (text, encoded with the backbone's vocabulary, EOS appended as
the training data has it) or ``"input_ids"`` (token ids, used as given), optionally ``"task"``
(a routing task name) or ``"task_id"``, and optionally ``"choices"`` (texts: the request is then
scored by rank classification instead of generated). Its output line is the request plus
``"prediction_ids"`` (the generated ids up to, without, EOS), ``"prediction"`` (their text, where
a vocabulary exists) and, with choices, ``"scores"`` (one per choice) and ``"choice"`` (the
chosen index; ``prediction`` is then that choice).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import numpy as np

from tensorpoly_jax import console, decoding, evaluation, partitioning, paths
from tensorpoly_jax.t5 import convert
from tensorpoly_jax.t5.model import EncoderDecoder
from tensorpoly_jax.t5.seq2seq import Seq2SeqModel

OUTPUT_FIELDS = ("prediction_ids", "prediction", "scores", "choice")
MIN_WIDTH = 8  # inputs and choices are padded to powers of two from here: few compiles


class RequestError(ValueError):
  """A request line that cannot be served, named by its line number."""


@dataclasses.dataclass(frozen=True)
class TaskRouting:
  """How request lines name their tasks: ``names`` maps routing task names to ids below
  ``n_tasks`` (0: the model does not route); ``default`` routes lines that name none (an adapted
  export's own task)."""

  names: dict
  n_tasks: int = 0
  default: int | None = None

  def task_id(self, request: dict, number: int) -> int | None:
    if "task" in request and "task_id" in request:
      raise RequestError(f"line {number}: give \"task\" or \"task_id\", not both.")
    if not self.n_tasks and ("task" in request or "task_id" in request):
      raise RequestError(f"line {number}: names a task, but the model does not route by task"
                         " (no --adapter_dir, or an unrouted LoRA/TLoRA one); drop it.")
    if "task" in request:
      if request["task"] not in self.names:
        known = ", ".join(sorted(self.names)) or "none"
        raise RequestError(f"line {number}: task {request['task']!r} is not one the adapter"
                           f" routes; its tasks: {known}.")
      task_id = self.names[request["task"]]
    else:
      task_id = request.get("task_id", self.default)
    if not self.n_tasks:
      return None
    if task_id is None:
      raise RequestError(f"line {number}: the adapter routes by task: add \"task\" (one of"
                         f" {', '.join(sorted(self.names))}) or \"task_id\".")
    if not isinstance(task_id, int) or isinstance(task_id, bool) or not 0 <= task_id < self.n_tasks:
      raise RequestError(f"line {number}: task_id={task_id!r} is outside the router's"
                         f" [0, {self.n_tasks}).")
    return task_id


@dataclasses.dataclass(frozen=True)
class Request:
  """One parsed line: ``input_ids``, its routing ``task_id`` and its tokenized ``choices``."""

  line: dict
  number: int  # its line in the input file, from 1
  input_ids: tuple[int, ...]
  task_id: int | None
  choices: tuple[tuple[int, ...], ...] | None


def parse_request(text: str, number: int, vocabulary, routing: TaskRouting,
                  vocab_size: int) -> Request:
  """Line ``number`` (from 1) of the input file, checked (token ids below ``vocab_size``)."""
  try:
    line = json.loads(text)
  except json.JSONDecodeError as err:
    raise RequestError(f"line {number} is not JSON: {err}") from None
  if not isinstance(line, dict):
    raise RequestError(f"line {number} is not a JSON object.")
  taken = [name for name in OUTPUT_FIELDS if name in line]
  if taken:
    raise RequestError(f"line {number} already has the output field(s) {taken}; rename them.")
  if ("inputs" in line) == ("input_ids" in line):
    raise RequestError(f"line {number}: give \"inputs\" (text) or \"input_ids\" (token ids),"
                       " exactly one.")
  if "inputs" in line:
    input_ids = (*_encode(vocabulary, line["inputs"], number, "inputs"), decoding.EOS_ID)
  else:
    input_ids = _token_ids(line["input_ids"], number, vocab_size)
  choices = line.get("choices")
  if choices is not None:
    if not isinstance(choices, list) or not choices:
      raise RequestError(f"line {number}: \"choices\" must be a non-empty list of texts.")
    choices = tuple((*_encode(vocabulary, c, number, "choices"), decoding.EOS_ID)
                    for c in choices)
  return Request(line, number, input_ids, routing.task_id(line, number), choices)


def _encode(vocabulary, text, number: int, field: str) -> tuple[int, ...]:
  if not isinstance(text, str):
    raise RequestError(f"line {number}: \"{field}\" must hold text, got {text!r}.")
  if vocabulary is None:
    raise RequestError(f"line {number} has \"{field}\" text, but there is no vocabulary: the"
                       f" backbone folder has no {convert.VOCABULARY_FILE}; pass --vocabulary_dir, or"
                       " give \"input_ids\".")
  return tuple(int(i) for i in vocabulary.encode(text))


def _token_ids(ids, number: int, vocab_size: int) -> tuple[int, ...]:
  if (not isinstance(ids, list) or not ids or not all(
      isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids)):
    raise RequestError(f"line {number}: \"input_ids\" must be a non-empty list of token ids in"
                       f" [0, {vocab_size}), the model's vocabulary.")
  return tuple(ids)


def find_vocabulary(folders):
  """The SentencePiece vocabulary of the first of ``folders`` that has one, or None."""
  from tensorpoly_jax.data import tasks

  for folder in folders:
    if folder and os.path.isfile(os.path.join(folder, convert.VOCABULARY_FILE)):
      return tasks.sentencepiece_vocabulary(os.path.join(folder, convert.VOCABULARY_FILE))
  return None


def completed_lines(output_file: str, requests: list[Request]) -> int:
  """How many requests ``output_file`` already answers (a resumed run skips them); a torn last
  line is cut off. Refuses a file that is not this input's output."""
  if not os.path.exists(output_file):
    return 0
  with open(output_file, "rb") as f:
    data = f.read()
  complete = data[:data.rfind(b"\n") + 1]
  lines = complete.decode().splitlines()
  if len(lines) > len(requests):
    raise ValueError(f"{output_file} has {len(lines)} lines for {len(requests)} requests: it is"
                     " another input's output. Remove it or choose another --output_file.")
  for number, (text, request) in enumerate(zip(lines, requests), 1):
    try:
      answered = json.loads(text)
    except json.JSONDecodeError:
      answered = None
    if (not isinstance(answered, dict) or "prediction_ids" not in answered
        or any(answered.get(k) != v for k, v in request.line.items())):
      raise ValueError(f"{output_file} line {number} is not the answer to the request on input"
                       f" line {request.number}: it is another input's output (or the input"
                       " itself). Remove it or choose another --output_file.")
  if len(complete) < len(data):  # the run stopped mid-line: the line is redone
    paths.atomic_write(output_file, complete)
  return len(lines)


def _width(lengths, limit: int) -> int:
  """The padded width of a batch: a power of two from MIN_WIDTH, at most ``limit``."""
  longest = max(lengths)
  return min(limit, max(MIN_WIDTH, 1 << (longest - 1).bit_length()))


def _pad(rows, width: int) -> np.ndarray:
  out = np.zeros((len(rows), width), np.int32)
  for out_row, ids in zip(out, rows):
    ids = ids[:width]
    out_row[:len(ids)] = ids
  return out


class Server:
  """Serves batches of requests with one model on one mesh: ``generate`` and ``score`` are
  jitted once, compile once per padded batch shape, and return their results replicated."""

  def __init__(self, module: EncoderDecoder, params, mesh, decode_config: decoding.DecodeConfig,
               batch_size: int, inputs_length: int, length_normalize: bool = True):
    data = mesh.shape["data"]
    if batch_size % data:
      raise ValueError(f"BATCH_SIZE={batch_size} must be divisible by the mesh's data axis"
                       f" ({data}); bind a multiple of {data}: --gin.BATCH_SIZE=N.")
    self.vocab_size = module.config.vocab_size
    widest = max(decode_config.top_k, 2 * decode_config.num_beams if decode_config.method == "beam"
                 else 0)
    if widest > self.vocab_size:
      raise ValueError(f"TOP_K={decode_config.top_k} / NUM_BEAMS={decode_config.num_beams} ask for"
                       f" more tokens ({widest}) than the vocabulary has ({self.vocab_size}).")
    self.params, self.mesh = params, mesh
    self.batch_size, self.inputs_length = batch_size, inputs_length
    self.decode_config = decode_config
    replicated = partitioning.replicated(mesh)
    self._generate = jax.jit(functools.partial(decoding.generate, module, config=decode_config),
                             out_shardings=replicated)
    self._score = jax.jit(functools.partial(Seq2SeqModel(module).score_choices,
                                            length_normalize=length_normalize),
                          out_shardings=replicated)

  def _place(self, requests: list[Request], routed: bool):
    """Encoder tokens ``[B, l]`` and task ids ``[B]`` of a batch padded to ``batch_size`` rows
    (the last request repeated), split over ``data``."""
    rows = requests + [requests[-1]] * (self.batch_size - len(requests))
    tokens = _pad([r.input_ids for r in rows],
                  _width([len(r.input_ids) for r in rows], self.inputs_length))
    task_ids = np.array([r.task_id for r in rows], np.int32) if routed else None
    return tokens, task_ids, rows

  def answer(self, requests: list[Request], vocabulary) -> list[dict]:
    """Output lines for up to ``batch_size`` requests, in their order."""
    routed = requests[0].task_id is not None
    answers = [None] * len(requests)
    for scored in (False, True):
      index = [i for i, r in enumerate(requests) if (r.choices is not None) == scored]
      if not index:
        continue
      batch = [requests[i] for i in index]
      tokens, task_ids, rows = self._place(batch, routed)
      sharding = partitioning.batch_sharding(self.mesh)
      placed = jax.device_put((tokens, task_ids), sharding)
      lines = (self._scored(placed, rows, vocabulary) if scored
               else self._generated(placed, vocabulary, batch[0].number))
      for i, line in zip(index, lines):
        answers[i] = {**requests[i].line, **line}
    return answers

  def _generated(self, placed, vocabulary, first: int) -> list[dict]:
    # Sampling draws per request: a resumed file samples what an uninterrupted run would.
    rng = jax.random.fold_in(jax.random.PRNGKey(self.decode_config.seed), first)
    generated = self._generate(self.params, *placed, rng=rng)
    return [_prediction(ids, vocabulary, self.decode_config.eos_id)
            for ids in np.asarray(generated.tokens)]

  def _scored(self, placed, rows, vocabulary) -> list[dict]:
    """One line per row (padding rows too): the choices' scores, the best one's ids and text."""
    widest = max(len(r.choices) for r in rows)
    length = _width([len(c) for r in rows for c in r.choices], 1 << 30)
    choice_tokens = np.stack([_pad(list(r.choices) + [()] * (widest - len(r.choices)), length)
                              for r in rows])
    scores = np.asarray(self._score(
        self.params, placed[0], jax.device_put(choice_tokens, partitioning.batch_sharding(
            self.mesh)), placed[1]))
    evaluation.check_finite(scores, choice_tokens, rows[0].number, rows[0].task_id)
    lines = []
    for request, row in zip(rows, scores):
      own = row[:len(request.choices)]
      choice = int(np.argmax(own))
      lines.append({**_prediction(request.choices[choice], vocabulary, decoding.EOS_ID),
                    "scores": [float(s) for s in own], "choice": choice})
    return lines


def _prediction(ids, vocabulary, eos_id: int) -> dict:
  """``prediction_ids`` up to (without) the first EOS, and their text where a vocabulary exists."""
  ids = [int(i) for i in ids]
  if eos_id in ids:
    ids = ids[:ids.index(eos_id)]
  line = {"prediction_ids": ids}
  if vocabulary is not None:
    line["prediction"] = vocabulary.decode(ids)
  return line


def serve_file(server: Server, input_file: str, output_file: str, vocabulary,
               routing: TaskRouting) -> int:
  """Answers every request of ``input_file`` not yet in ``output_file`` (appended batch by
  batch, by the first process only); returns the number of requests answered now."""
  with open(input_file) as f:
    texts = [(n, t) for n, t in enumerate(f.read().splitlines(), 1) if t.strip()]
  requests = [parse_request(text, number, vocabulary, routing, server.vocab_size)
              for number, text in texts]
  cut = sum(len(r.input_ids) > server.inputs_length for r in requests)
  if cut:
    console.say(f"infer: {cut} request(s) longer than INPUTS_LENGTH={server.inputs_length}"
                " tokens are cut to it (--gin.INPUTS_LENGTH=N keeps more).")
  refused, done = None, 0
  if jax.process_index() == 0:
    try:
      done = completed_lines(output_file, requests)
    except ValueError as err:
      refused, done = err, -1
  done = int(_agreed(done))  # -1: process 0 refused the output file; every process stops
  if refused is not None:
    raise refused
  if done < 0:
    raise ValueError(f"process 0 refused --output_file={output_file} (its error says why).")
  if done:
    console.say(f"infer: {output_file} already answers {done} of {len(requests)} requests;"
                " resuming after them.")
  writer = open(output_file, "a") if jax.process_index() == 0 else None
  try:
    with console.Progress(len(requests), "infer", initial=done, unit="request") as progress:
      for start in range(done, len(requests), server.batch_size):
        answers = server.answer(requests[start:start + server.batch_size], vocabulary)
        if writer is not None:
          writer.write("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers))
          writer.flush()
        progress.advance(len(answers))
      progress.report()
  finally:
    if writer is not None:
      writer.close()
  return len(requests) - done


def _agreed(value: int) -> int:
  """Process 0's ``value`` on every process (one host: itself)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
