"""A user's own tasks: read from JSONL / CSV files with no Python (the ``files`` suite), or
registered by their own Python module (``TASK_MODULE``).

Layout of ``DATA_DIR``::

  manifest.json           {"train": ["qa", {"name": "nli", "rate": 2.0}],
                           "heldout": [{"name": "sentiment", "num_shots": 16}]}
  <task>/<split>.jsonl    one JSON object per line (or <split>.csv with a header row)

A row has ``inputs`` and ``targets`` (strings); a held-out row also has ``choices`` (a list of
strings; in CSV a JSON list in the cell) and may give ``label`` (the gold choice's index; by
default the index of ``targets`` among ``choices``). A training task needs ``train``; a held-out
task needs ``train`` (its few-shot pool) and an evaluation split (``validation``, where settings
are chosen, and/or ``test``, which a report measures). Every file is checked before anything is
registered, and a row that cannot be used is an error naming its file and line: nothing is
skipped or counted away.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import sys
from typing import Iterator

from tensorpoly_jax.data import tasks

FILES_TRAIN = "files_train"
FILES_HELDOUT = "files_heldout"
MANIFEST = "manifest.json"
FORMATS = (".jsonl", ".csv")
TASK_NAME = re.compile(r"[\w.:]+")  # what seqio accepts as a task name
MANIFEST_EXAMPLE = ('{"train": ["task_a", {"name": "task_b", "rate": 2.0}],'
                    ' "heldout": [{"name": "task_c", "num_shots": 16}]}')
ENTRY_KEYS = {"train": ("name", "rate"), "heldout": ("name", "num_shots")}
TEMPLATE = "inputs as written"  # a file's rows are already prompted: one template, the row's own
LISTED_PROBLEMS = 30  # a broken export can fail every row: list this many, count the rest


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One manifest entry: a training task (with its mixing rate) or a held-out task (with its
  few-shot k, when the manifest gives one)."""

  name: str
  heldout: bool
  rate: float = 1.0
  num_shots: int | None = None


class Problems:
  """Every problem found in the files, raised together so that one run shows all the fixes."""

  def __init__(self):
    self.found: list[str] = []

  def add(self, where: str, message: str) -> None:
    self.found.append(f"{where}: {message}")

  def raise_any(self, data_dir: str) -> None:
    if not self.found:
      return
    listed = self.found[:LISTED_PROBLEMS]
    more = len(self.found) - len(listed)
    raise ValueError(f"files suite at {data_dir}: {len(self.found)} problem(s), nothing registered:"
                     "\n  " + "\n  ".join(listed) + (f"\n  ... and {more} more" if more else ""))


def register_files(data_dir: str | None, manifest: str | None = None,
                   vocabulary_dir: str | None = None) -> dict[str, int]:
  """Checks every file, then registers each task and the mixtures ``files_train`` and
  ``files_heldout``; returns the training mixture's routing id map (sorted task names)."""
  if data_dir is None:
    raise ValueError("suite='files' needs DATA_DIR: a folder with manifest.json and one folder"
                     " per task holding <split>.jsonl or <split>.csv (--gin.DATA_DIR='/path').")
  vocabulary = _vocabulary(vocabulary_dir)
  problems = Problems()
  specs = read_manifest(manifest or os.path.join(data_dir, MANIFEST), data_dir, problems)
  problems.raise_any(data_dir)
  splits = {spec.name: read_task(spec, data_dir, problems) for spec in specs}
  problems.raise_any(data_dir)
  training = [spec for spec in specs if not spec.heldout]
  ids = tasks.routing_ids([spec.name for spec in training])
  for spec in specs:
    fields = {"num_shots": spec.num_shots} if spec.heldout else {"task_id": ids[spec.name]}
    tasks.register_task(spec.name, tasks.in_memory(
        _split_reader(spec.name, splits[spec.name]), sorted(splits[spec.name]), vocabulary,
        templates=(TEMPLATE,), **fields))
  tasks.add_mixture(FILES_TRAIN, [(spec.name, spec.rate) for spec in training])
  tasks.add_mixture(FILES_HELDOUT, [(spec.name, 1.0) for spec in specs if spec.heldout])
  return ids


def _split_reader(name: str, rows_by_split: dict[str, list[dict]]):
  """``split -> rows`` of one task; a split it lacks names the file that would give it."""
  def rows(split: str) -> list[dict]:
    if split not in rows_by_split:
      raise ValueError(f"files task {name!r} has no {split!r} split (it has"
                       f" {sorted(rows_by_split)}): add {name}/{split}.jsonl to DATA_DIR, or read"
                       " another split (EVAL_SPLIT, REPORT_SPLIT).")
    return rows_by_split[split]

  return rows


def _vocabulary(vocabulary_dir: str | None):
  """UTF-8 bytes unless a checkpoint folder's SentencePiece model is named."""
  if vocabulary_dir is None:
    return tasks.byte_vocabulary()
  model_file = os.path.join(vocabulary_dir, "spiece.model")
  if not os.path.isfile(model_file):
    raise ValueError(f"VOCABULARY_DIR={vocabulary_dir!r} has no spiece.model; name the checkpoint"
                     " folder that holds it, or set VOCABULARY_DIR = None for the byte vocabulary.")
  return tasks.sentencepiece_vocabulary(model_file)


def read_manifest(path: str, data_dir: str, problems: Problems) -> list[TaskSpec]:
  """The manifest's tasks, training ones first; a missing manifest lists the task folders found."""
  if not os.path.isfile(path):
    found = sorted(entry.name for entry in os.scandir(data_dir)
                   if entry.is_dir()) if os.path.isdir(data_dir) else []
    raise ValueError(f"files suite: no manifest at {path}. Write one naming the training and the"
                     f" held-out tasks (each a folder of DATA_DIR), e.g. {MANIFEST_EXAMPLE}, or set"
                     f" MANIFEST to its path. Task folders found in {data_dir}: {found or 'none'}.")
  try:
    with open(path, encoding="utf-8") as f:
      content = json.load(f)
  except json.JSONDecodeError as err:
    problems.add(f"{path}:{err.lineno}", f"not JSON ({err.msg}); the manifest looks like"
                 f" {MANIFEST_EXAMPLE}.")
    return []
  if not isinstance(content, dict) or set(content) != set(ENTRY_KEYS):
    keys = sorted(content) if isinstance(content, dict) else type(content).__name__
    problems.add(path, f"needs exactly the keys 'train' and 'heldout', got {keys}; e.g."
                 f" {MANIFEST_EXAMPLE}.")
    return []
  specs = [spec for role in ENTRY_KEYS for spec in _entries(content[role], role, path, problems)]
  roles: dict[str, str] = {}
  for spec in specs:
    role = "heldout" if spec.heldout else "train"
    if roles.get(spec.name) == role:
      problems.add(path, f"task {spec.name!r} is listed twice in {role!r}; list it once.")
    elif spec.name in roles:
      problems.add(path, f"task {spec.name!r} is both a training and a held-out task; list it in"
                   " one of them (a held-out task must be new to the pretrained adapters).")
    roles.setdefault(spec.name, role)
  return specs


def _entries(entries, role: str, path: str, problems: Problems) -> Iterator[TaskSpec]:
  """The tasks of one manifest list: each a task name or ``{"name": ..., <option>: ...}``."""
  if not isinstance(entries, list) or not entries:
    problems.add(path, f"{role!r} must be a non-empty list of task names (or objects with"
                 f" {' / '.join(ENTRY_KEYS[role])}), got {entries!r}.")
    return
  for index, entry in enumerate(entries):
    where = f"{path}: {role}[{index}]"
    entry = {"name": entry} if isinstance(entry, str) else entry
    if not (isinstance(entry, dict) and "name" in entry and set(entry) <= set(ENTRY_KEYS[role])):
      problems.add(where, f"{entry!r} is not a task name or an object with keys"
                   f" {ENTRY_KEYS[role]} ('name' required).")
      continue
    name, option = entry["name"], {k: v for k, v in entry.items() if k != "name"}
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
      problems.add(where, f"task name {name!r} must be letters, digits, '_', '.' or ':' (a seqio"
                   " name); rename its folder and this entry.")
    elif "rate" in option and not (_is_number(option["rate"]) and option["rate"] > 0):
      problems.add(where, f"rate {option['rate']!r} must be a positive number (the task's mixing"
                   " rate; default 1.0).")
    elif "num_shots" in option and not (_is_int(option["num_shots"]) and option["num_shots"] > 0):
      problems.add(where, f"num_shots {option['num_shots']!r} must be a positive integer (the"
                   " task's few-shot k when a run sets no NUM_SHOTS).")
    else:
      yield TaskSpec(name, role == "heldout", **option)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_task(spec: TaskSpec, data_dir: str, problems: Problems) -> dict[str, list[dict]]:
  """Every split of a task folder as checked rows (``inputs``, ``targets``, ``answer_choices``,
  ``label``)."""
  folder = os.path.join(data_dir, spec.name)
  if not os.path.isdir(folder):
    problems.add(folder, "no such folder: each task named in the manifest is a folder of DATA_DIR"
                 " holding <split>.jsonl or <split>.csv files.")
    return {}
  files = split_files(folder, problems)
  if tasks.POOL_SPLIT not in files:
    pool = "its few-shot pool" if spec.heldout else "what a training task trains on"
    problems.add(folder, f"no {tasks.POOL_SPLIT} split ({pool}): add {tasks.POOL_SPLIT}.jsonl or"
                 f" {tasks.POOL_SPLIT}.csv.")
  if spec.heldout and not set(files) - {tasks.POOL_SPLIT}:
    problems.add(folder, "no evaluation split: a held-out task is evaluated on validation.jsonl"
                 " (where settings are chosen) and/or test.jsonl (what a report measures).")
  return {split: read_rows(path, spec.heldout, problems) for split, path in files.items()}


def split_files(folder: str, problems: Problems) -> dict[str, str]:
  """``split -> path`` of a task folder's ``<split>.jsonl`` / ``<split>.csv`` files."""
  files: dict[str, str] = {}
  for name in sorted(os.listdir(folder)):
    split, ext = os.path.splitext(name)
    if ext not in FORMATS:
      continue
    if split in files:
      problems.add(folder, f"split {split!r} is in both {os.path.basename(files[split])} and"
                   f" {name}; keep one.")
    files[split] = os.path.join(folder, name)
  return files


def read_rows(path: str, heldout: bool, problems: Problems) -> list[dict]:
  """A split file's rows, each checked; an empty file is a problem."""
  records = _csv_records if path.endswith(".csv") else _jsonl_records
  known = len(problems.found)
  rows = [row for line, record in records(path, problems)
          if (row := check_row(record, f"{path}:{line}", heldout, problems)) is not None]
  if not rows and len(problems.found) == known:
    problems.add(path, "no rows; add rows or remove the file.")
  return rows


def _jsonl_records(path: str, problems: Problems) -> Iterator[tuple[int, object]]:
  with open(path, encoding="utf-8") as f:
    for line, text in enumerate(f, 1):
      if not text.strip():
        continue  # a blank line holds no row
      try:
        yield line, json.loads(text)
      except json.JSONDecodeError as err:
        problems.add(f"{path}:{line}", f"not JSON ({err.msg}); each line is one object like"
                     ' {"inputs": "...", "targets": "..."}.')


def _csv_records(path: str, problems: Problems) -> Iterator[tuple[int, dict]]:
  """Rows as dicts, ``choices`` decoded from JSON and ``label`` from text (empty cells absent)."""
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None:
      return  # an empty file: read_rows names it
    missing = {"inputs", "targets"} - set(reader.fieldnames)
    if missing:
      problems.add(f"{path}:1", f"the header has no column {sorted(missing)} (columns:"
                   f" {reader.fieldnames}); the first row names the fields:"
                   " inputs,targets[,choices,label].")
      return
    end = reader.line_num
    for record in reader:
      line, end = end + 1, reader.line_num
      if None in record or None in record.values():
        problems.add(f"{path}:{line}", f"{len(reader.fieldnames)} cells expected (the header's),"
                     " got another number; quote cells that hold commas.")
        continue
      yield line, _decode_cells(record)


def _decode_cells(record: dict) -> dict:
  """CSV cells are text: ``choices`` holds a JSON list and ``label`` an integer."""
  decoded = {key: value for key, value in record.items()
             if value != "" or key in ("inputs", "targets")}
  if "choices" in decoded:
    try:
      decoded["choices"] = json.loads(decoded["choices"])
    except json.JSONDecodeError:
      pass  # check_row names the field and the fix
  if "label" in decoded and re.fullmatch(r"-?\d+", decoded["label"].strip()):
    decoded["label"] = int(decoded["label"])
  return decoded


def check_row(record, where: str, heldout: bool, problems: Problems) -> dict | None:
  """A row as tasks read it, or None after naming what is wrong with it."""
  if not isinstance(record, dict):
    problems.add(where, f"a row is an object with inputs and targets, got {record!r}.")
    return None
  needed = ("inputs", "targets", "choices") if heldout else ("inputs", "targets")
  missing = [field for field in needed if field not in record]
  if missing:
    purpose = " (a held-out row is scored by ranking its choices)" if "choices" in missing else ""
    problems.add(where, f"missing field(s) {missing}{purpose}; the row has {sorted(record)}.")
    return None
  for field in ("inputs", "targets"):
    if not isinstance(record[field], str):
      problems.add(where, f"field {field!r} must be a string, got {record[field]!r}.")
      return None
  if "label" in record and "choices" not in record:
    problems.add(where, f"field 'label' ({record['label']!r}) indexes 'choices', which the row"
                 " lacks; add choices or drop label.")
    return None
  label = _label(record, where, problems) if "choices" in record else -1  # free text: not ranked
  if label is None:
    return None
  return {"inputs": record["inputs"], "targets": record["targets"],
          "answer_choices": list(record.get("choices", [])), "label": label}


def _label(record: dict, where: str, problems: Problems) -> int | None:
  """The gold choice's index: ``label``, or where ``targets`` is among ``choices``."""
  options, targets = record["choices"], record["targets"]
  if not (isinstance(options, list) and options and all(isinstance(c, str) for c in options)):
    problems.add(where, f"field 'choices' must be a non-empty list of strings (CSV: a JSON list in"
                 f' the cell, e.g. ["yes", "no"]), got {options!r}.')
    return None
  if "label" not in record:
    if targets not in options:
      problems.add(where, f"targets {targets!r} is not among choices {options}; make it one of"
                   " them, or give label (the gold choice's index).")
      return None
    return options.index(targets)
  label = record["label"]
  if not _is_int(label) or not 0 <= label < len(options):
    problems.add(where, f"field 'label' {label!r} must be an integer index into its"
                 f" {len(options)} choices (0..{len(options) - 1}).")
    return None
  if options[label] != targets:
    problems.add(where, f"label {label} names choice {options[label]!r} but targets is"
                 f" {targets!r}; make them agree (or drop label).")
    return None
  return label


def import_task_module(module: str) -> None:
  """Imports a module name or ``.py`` file once per process: its import registers a user's own
  seqio tasks and mixtures (T5X's ``MIXTURE_OR_TASK_MODULE``), so reruns do not register twice."""
  if module.endswith(".py"):
    path = os.path.abspath(module)
    if not os.path.isfile(path):
      raise ValueError(f"TASK_MODULE={module!r}: no such file; give an existing .py file or an"
                       " importable module name (on PYTHONPATH).")
    name = "tensorpoly_task_module_" + re.sub(r"\W", "_", path)
    if name not in sys.modules:
      spec = importlib.util.spec_from_file_location(name, path)
      loaded = importlib.util.module_from_spec(spec)
      sys.modules[name] = loaded
      try:
        spec.loader.exec_module(loaded)
      except BaseException:
        del sys.modules[name]  # a fixed file is read again on the next run
        raise
    return
  try:
    importlib.import_module(module)
  except ModuleNotFoundError as err:
    if err.name is None or not (module == err.name or module.startswith(err.name + ".")):
      raise  # the module exists; something it imports does not
    raise ValueError(f"TASK_MODULE={module!r}: no module {err.name!r} on the path; put its folder"
                     " on PYTHONPATH or give the .py file's path.") from None
