"""What the ``tensorpoly`` command line says about itself: each command's help epilog (the run files
it is used with, the macros they MUST set, an example), ``--version``, and ``tensorpoly list``.

The required macros are read from the gin files' ``%gin.REQUIRED`` lines, so the help cannot drift
from the files it describes.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import os
import re

import gin


def _configs_dir() -> str:
  """The gin files: inside an installed package, or the checkout's ``configs/`` (editable)."""
  here = os.path.dirname(os.path.abspath(__file__))
  installed = os.path.join(here, "configs")
  return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(here), "configs")


CONFIGS = _configs_dir()  # also T5X's --gin_search_paths for configs/t5x/*.gin
REQUIRED = "%gin.REQUIRED"
DATA_FILES = ("runs/data_embedded.gin", "runs/data_t0.gin", "runs/data_files.gin")
GIN_BINDINGS = """\
--gin.NAME=VALUE    bind a macro (--gin.TRAIN_STEPS=1000) or a parameter
                    (--gin.TrainConfig.log_every=10) after every --gin_file; strings
                    keep their quotes (--gin.BACKBONE_DIR="'/data/t0_3b'"); repeatable.
                    `tensorpoly list macros --gin_file=...` shows every macro and its value."""
_MACRO_LINE = re.compile(r"([A-Za-z_]\w*) = (.*?)\s*(?:#.*)?$")
_INCLUDE_LINE = re.compile(r"include '([^']+)'")


@dataclasses.dataclass(frozen=True)
class CommandReference:
  """What a command's ``--help`` ends with: the run files it is used with (their required macros
  are listed), whether it also takes a ``runs/data_*.gin``, a note, and an example."""

  example: str
  run_files: tuple[str, ...] = ()
  data_file: bool = False
  note: str = ""


COMMANDS = {
    "train": CommandReference(
        "tensorpoly train --gin_file=models/tiny.gin --gin_file=runs/data_embedded.gin \\\n"
        "  --gin_file=runs/backbone.gin --model_dir=runs/bb\n"
        "tensorpoly train --gin_file=adapters/tensorpoly_i.gin \\\n"
        "  --gin_file=runs/data_embedded.gin --gin_file=runs/pretrain.gin --model_dir=runs/tp1 \\\n"
        "  --gin.BACKBONE_DIR=\"'runs/bb/backbone'\"",
        ("runs/pretrain.gin", "runs/backbone.gin"), data_file=True,
        note="runs/backbone.gin trains a backbone from scratch (with a models/*.gin);"
        "\nruns/pretrain.gin pretrains an adapter (with an adapters/*.gin) on BACKBONE_DIR."),
    "adapt": CommandReference(
        "tensorpoly adapt --gin_file=runs/data_embedded.gin --gin_file=runs/adapt.gin \\\n"
        "  --model_dir=runs/tp1 --gin.BACKBONE_DIR=\"'runs/bb/backbone'\" \\\n"
        "  --gin.ADAPTER_DIR=\"'runs/tp1/adapter'\"",
        ("runs/adapt.gin",), data_file=True),
    "eval": CommandReference(
        "tensorpoly eval --gin_file=runs/data_embedded.gin --gin_file=runs/eval.gin \\\n"
        "  --model_dir=runs/zero_shot --gin.BACKBONE_DIR=\"'runs/bb/backbone'\"",
        ("runs/eval.gin",), data_file=True),
    "data": CommandReference(
        "tensorpoly data --gin_file=runs/data_files.gin --gin.DATA_DIR=\"'/data/my_tasks'\"",
        data_file=True),
    "sweep": CommandReference(
        "tensorpoly sweep --gin_file=adapters/lora.gin --gin_file=runs/data_embedded.gin \\\n"
        "  --gin_file=runs/sweep.gin --model_dir=runs/sweep_lora \\\n"
        "  --gin.BACKBONE_DIR=\"'runs/bb/backbone'\" --sweep LORA_RANK=1,2,4",
        ("runs/sweep.gin", "runs/report.gin"), data_file=True),
    "compile": CommandReference(
        "tensorpoly compile --stage=pretrain --gin_file=models/t0_3b.gin \\\n"
        "  --gin_file=adapters/tensorpoly_i.gin --topology=v4:2x2x4 --gin.MODEL_PARALLEL=4 \\\n"
        "  --json=pretrain.json",
        ("runs/compile.gin",),
        note="runs/compile.gin is read first. compile writes no run directory (no --model_dir):"
        "\n--json=PATH keeps its report."),
    "demo": CommandReference(
        "tensorpoly demo --quick --model_dir=runs/demo_quick",
        ("runs/demo.gin", "runs/demo_quick.gin"),
        note="runs/demo.gin (runs/demo_quick.gin with --quick) is read first."),
    "infer": CommandReference(
        "tensorpoly infer --backbone_dir=/data/t0_3b --adapter_dir=runs/tp1/adapter \\\n"
        "  --input_file=requests.jsonl --output_file=answers.jsonl \\\n"
        "  --gin.DECODING=\"'beam'\" --gin.NUM_BEAMS=4 --gin.MAX_DECODE_LENGTH=32",
        ("runs/infer.gin",),
        note="runs/infer.gin is read first. A request line: {\"inputs\": \"...\", \"task\":"
        " \"super_glue_rte\"};\nwith \"choices\": [...] it is scored by rank classification."),
    "list": CommandReference(
        "tensorpoly list macros --gin_file=runs/data_t0.gin --gin_file=runs/adapt.gin\n"
        "tensorpoly list tasks --gin_file=runs/data_embedded.gin",
        note="methods and presets need no gin file; tasks registers the data file's suite;"
        "\nmacros marks the ones still %gin.REQUIRED."),
    "convert": CommandReference(
        "tensorpoly convert --checkpoint_dir=/data/hf/T0_3B --output_dir=/data/t0_3b \\\n"
        "  --dtype=bfloat16 --scan_layers"),
    "export": CommandReference(
        "tensorpoly export --adapter_dir=runs/tp1/adapt/embedded__yew_seed0/adapter \\\n"
        "  --output_dir=runs/peft_yew"),
    "import": CommandReference(
        "tensorpoly import --peft_dir=/data/peft_lora --backbone_dir=/data/t0_3b \\\n"
        "  --output_dir=runs/imported_lora"),
    "merge": CommandReference(
        "tensorpoly merge --backbone_dir=/data/t0_3b \\\n"
        "  --adapter_dir=runs/tp1/adapt/embedded__yew_seed0/adapter --output_dir=/data/t0_3b_yew\n"
        "tensorpoly merge --backbone_dir=/data/t0_3b --adapter_dir=runs/tp1/adapter --task_id=3 \\\n"
        "  --format=hf --output_dir=/data/hf/t0_3b_task3"),
    "install-templates": CommandReference("tensorpoly install-templates"),
}


def epilog(command: str, model_dir_flag: bool) -> str:
  """The end of ``tensorpoly COMMAND --help``: required macros per run file, a note, examples."""
  reference = COMMANDS[command]
  lines = []
  if reference.run_files or reference.data_file:
    how = "--gin.NAME=VALUE" + ("; MODEL_DIR: --model_dir" if model_dir_flag else "")
    lines.append(f"macros each file MUST set ({how}):")
    lines += _required_rows(reference.run_files)
  if reference.data_file:
    lines.append("with one data file:" if reference.run_files else "data files:")
    lines += _required_rows(DATA_FILES)
  if reference.note:
    lines += ["", reference.note]
  lines += ["", "example:", *("  " + line for line in reference.example.splitlines())]
  return "\n".join(lines)


def _required_rows(gin_files) -> list[str]:
  return [f"  {name:<24}{', '.join(required_macros(name)) or '(none)'}" for name in gin_files]


def required_macros(gin_file: str) -> list[str]:
  """The macros ``gin_file`` (with its includes) leaves ``%gin.REQUIRED``."""
  return [name for name, value in macro_assignments(gin_file).items() if value == REQUIRED]


def macro_assignments(gin_file: str) -> dict[str, str]:
  """Each macro's last assignment in ``gin_file``, includes read where they stand."""
  assignments = {}
  with open(os.path.join(CONFIGS, gin_file), encoding="utf-8") as lines:
    for line in lines:
      if include := _INCLUDE_LINE.match(line):
        assignments.update(macro_assignments(include[1]))
      elif macro := _MACRO_LINE.match(line):
        assignments[macro[1]] = macro[2]
  return assignments


def version() -> str:
  """The installed distribution's version; a checkout run without installing reads setup.py's."""
  try:
    return importlib.metadata.version("tensorpoly-jax")
  except importlib.metadata.PackageNotFoundError:
    setup = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    with open(setup, encoding="utf-8") as text:
      return re.search(r'^\s*version="([^"]+)"', text.read(), re.MULTILINE)[1]


# ------------------------------------------------------------------------------ tensorpoly list


def defined_macros() -> list[str]:
  """Every macro the parsed gin files define (gin's config text lists each as a top-level
  ``NAME = value`` line)."""
  return sorted(set(re.findall(r"^([A-Za-z_]\w*) = ", gin.config_str(), re.MULTILINE)))


def macro_value(name: str):
  return gin.query_parameter(f"{name}/macro.value")


def unset_macros() -> list[str]:
  """The parsed files' macros still ``%gin.REQUIRED`` after every binding."""
  return [name for name in defined_macros() if repr(macro_value(name)) == REQUIRED]


def macro_table() -> str:
  """``NAME = value`` for every parsed macro, gin syntax, the unset required ones marked."""
  names = defined_macros()
  unset = set(unset_macros())
  width = max(map(len, names), default=0)
  return "\n".join(f"{name:<{width}} = {macro_value(name)!r}"
                   + (f"    <- MUST be set: --gin.{name}=VALUE" if name in unset else "")
                   for name in names)


def method_table() -> str:
  """Each adapter method, the gin file that selects it, and what it is (that file's header)."""
  from tensorpoly_jax.methods import METHODS

  return _table((name, f"adapters/{name}.gin", _first_sentence(f"adapters/{name}.gin"))
                for name in METHODS)


def _first_sentence(gin_file: str) -> str:
  """The first sentence of a gin file's header comment, less its ``Adapter:`` kind."""
  with open(os.path.join(CONFIGS, gin_file), encoding="utf-8") as lines:
    header = " ".join(line[1:].strip() for line in itertools.takewhile(
        lambda line: line.startswith("#"), lines))
  return re.match(r"(?:\w+: )?(.*?\.)(?:\s|$)", header)[1]


def preset_table() -> str:
  """Each model preset's shapes and the models/*.gin that selects it."""
  from tensorpoly_jax.t5.model import PRESETS

  rows = []
  for name, config in PRESETS.items():
    gin_file = f"models/{name}.gin"
    shapes = (f"{config.num_encoder_layers}+{config.num_decoder_layers} layers,"
              f" d_model {config.emb_dim}, {config.num_heads} heads, mlp {config.mlp_dim},"
              f" vocab {config.vocab_size}")
    rows.append((name, gin_file if os.path.isfile(os.path.join(CONFIGS, gin_file)) else "-",
                 shapes))
  return _table(rows)


def _table(rows) -> str:
  rows = list(rows)
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
  return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]])
                   for row in rows)


def task_table(routing_ids: dict[str, int], mixture: str, training: list[str],
               heldout: list[str]) -> str:
  """The training mixture's tasks by routing id, then the held-out tasks."""
  by_id = sorted(training, key=lambda task: routing_ids.get(task, len(routing_ids)))
  return "\n".join([
      f"training mixture {mixture!r} (MIXTURE): {len(training)} tasks, by routing id",
      *(f"  {routing_ids.get(task, '-'):>4}  {task}" for task in by_id),
      f"held-out tasks (HELDOUT): {len(heldout)}",
      *(f"  {task}" for task in heldout)])
