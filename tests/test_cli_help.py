"""What the `tensorpoly` command line tells a user: --help (gin bindings, required macros, an
example that parses), --version, `tensorpoly list`, and errors: a user's as one line and exit 2,
a bug's with its traceback, an unknown flag refused."""
import argparse
import glob
import importlib.metadata
import os
import re
import shlex
import sys
from pathlib import Path

import gin
import pytest

from tensorpoly_jax import cli, cli_reference
from tensorpoly_jax.data import embedded
from tensorpoly_jax.methods import METHODS
from tensorpoly_jax.t5.model import PRESETS

EMBEDDED_BACKBONE = ["--gin_file=runs/data_embedded.gin", "--gin_file=runs/backbone.gin",
                     "--gin_file=models/tiny.gin"]


@pytest.fixture(autouse=True)
def clean_gin():
  yield
  gin.clear_config()  # a parse leaves gin locked


def _subcommands() -> dict[str, argparse.ArgumentParser]:
  return cli.subcommands(cli.build_parser())


def _console(monkeypatch, *argv) -> int:
  """``tensorpoly ARGV`` as the program runs it (``main()`` reads sys.argv)."""
  monkeypatch.setattr(sys, "argv", ["tensorpoly", *argv])
  return cli.main()


def test_each_gin_command_help_shows_bindings_required_macros_and_an_example():
  commands = _subcommands()
  for name, command in commands.items():
    text = command.format_help()
    assert f"example:\n  tensorpoly {name}" in text, name
    if "--gin_file" not in text:
      continue
    assert "--gin.NAME=VALUE    bind a macro" in text, name
    for gin_file in cli_reference.COMMANDS[name].run_files:
      macros = ", ".join(cli_reference.required_macros(gin_file)) or "(none)"
      assert f"  {gin_file:<24}{macros}\n" in text, (name, gin_file)
  train = commands["train"].format_help()
  assert "runs/pretrain.gin       MODEL_DIR, BACKBONE_DIR\n" in train
  assert "runs/data_t0.gin        VOCABULARY_DIR\n" in train
  assert "MODEL_DIR: --model_dir" in train and "MODEL_DIR: --model_dir" not in commands[
      "compile"].format_help()


@pytest.mark.parametrize("gin_file", sorted(
    os.path.relpath(path, cli.CONFIGS) for path in glob.glob(f"{cli.CONFIGS}/runs/*.gin")))
def test_required_macros_read_from_the_text_are_the_ones_gin_leaves_unset(gin_file):
  cli._read_gin([gin_file], [])
  assert sorted(cli_reference.required_macros(gin_file)) == cli_reference.unset_macros()


def test_every_flag_has_help():
  missing = []

  def walk(parser, path):
    for action in parser._actions:
      if not action.help:
        missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
      if isinstance(action, argparse._SubParsersAction):
        for name, command in action.choices.items():
          walk(command, f"{path} {name}")

  walk(cli.build_parser(), "tensorpoly")
  assert not missing


def test_each_example_parses_and_sets_every_required_macro():
  for name, reference in cli_reference.COMMANDS.items():
    for line in reference.example.replace("\\\n", " ").splitlines():
      args = cli.parse_args(shlex.split(line)[1:])
      assert args.command == name
      if hasattr(args, "gin_file") and name != "list":  # list macros shows unset ones
        cli.parse_command_gin(args)


def test_version(capsys):
  with pytest.raises(SystemExit) as exited:
    cli.main(["--version"])
  assert exited.value.code == 0
  assert capsys.readouterr().out == f"tensorpoly {importlib.metadata.version('tensorpoly-jax')}\n"


def test_list_methods_presets_tasks_and_macros(capsys):
  assert cli.main(["list", "methods"]) == 0
  rows = capsys.readouterr().out.splitlines()
  assert [row.split()[:2] for row in rows] == [[m, f"adapters/{m}.gin"] for m in METHODS]
  assert rows[0].endswith("LoRA, y = xW + xAB/r (A kaiming-uniform, B zeros).")
  assert cli.main(["list", "presets"]) == 0
  rows = capsys.readouterr().out.splitlines()
  assert [row.split()[:2] for row in rows] == [[p, f"models/{p}.gin"] for p in PRESETS]
  assert "24+24 layers, d_model 2048, 32 heads, mlp 5120" in rows[list(PRESETS).index("t0_3b")]
  assert cli.main(["list", "tasks", "--gin_file=runs/data_embedded.gin"]) == 0
  out = capsys.readouterr().out
  assert "training mixture 'embedded_train' (MIXTURE): 36 tasks, by routing id" in out
  assert "     0  embedded__alder__t0\n" in out
  assert out.endswith(f"held-out tasks (HELDOUT): {len(embedded.HELDOUT_TASKS)}\n"
                      + "".join(f"  embedded__{t}\n" for t in sorted(embedded.HELDOUT_TASKS)))
  assert cli.main(["list", "macros", "--gin_file=runs/data_embedded.gin",
                   "--gin_file=runs/pretrain.gin", "--gin.TRAIN_STEPS=7"]) == 0
  macros = dict(row.split(None, 1) for row in capsys.readouterr().out.splitlines())
  assert macros["BACKBONE_DIR"] == "= %gin.REQUIRED    <- MUST be set: --gin.BACKBONE_DIR=VALUE"
  assert macros["TRAIN_STEPS"] == "= 7" and macros["MIXTURE"] == "= 'embedded_train'"
  assert macros["MODEL_DIR"].endswith("<- MUST be set: --gin.MODEL_DIR=VALUE")
  with pytest.raises(ValueError, match="list tasks reads gin files: give a data file"):
    cli.main(["list", "tasks"])
  with pytest.raises(ValueError, match="list presets reads no gin file"):
    cli.main(["list", "presets", "--gin_file=runs/data_embedded.gin"])


@pytest.mark.parametrize("flags, message", [
    (["--model_dir=x", "--gin.NOT_A_MACRO=1"],
     "--gin.NOT_A_MACRO: no gin file defines the macro NOT_A_MACRO. Known macros: ADAPTER_LR,"),
    (["--gin_file=runs/nope.gin"], "--gin_file=runs/nope.gin: no such file here or in"),
    ([], "MODEL_DIR must be set (the gin files leave it %gin.REQUIRED): add --model_dir=DIR."),
])
def test_a_user_error_is_one_line_and_exit_2_with_the_traceback_under_debug(
    monkeypatch, capsys, flags, message):
  assert _console(monkeypatch, "train", *EMBEDDED_BACKBONE, *flags) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"tensorpoly: error: {message}") and err.count("\n") == 1, err
  assert _console(monkeypatch, "train", *EMBEDDED_BACKBONE, *flags, "--debug") == 2
  err = capsys.readouterr().err
  assert err.startswith("Traceback") and err.splitlines()[-1].startswith(
      f"tensorpoly: error: {message}")
  with pytest.raises(ValueError, match=re.escape(message)):  # a caller's argv: the exception
    cli.main(["train", *EMBEDDED_BACKBONE, *flags])


def test_an_error_inside_a_command_drops_gins_call_context(monkeypatch, capsys, tmp_path):
  assert _console(monkeypatch, "eval", "--gin_file=runs/data_embedded.gin",
                  "--gin_file=runs/eval.gin", f"--model_dir={tmp_path}",
                  f"--gin.BACKBONE_DIR='{tmp_path / 'missing'}'") == 2
  err = capsys.readouterr().err
  assert err == f"tensorpoly: error: {tmp_path / 'missing'} holds no converted backbone" \
                " (t5_config.json and params/): set BACKBONE_DIR to a `tensorpoly convert` output" \
                " or to a backbone run's MODEL_DIR/backbone.\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
  def broken():
    raise RuntimeError("a bug")

  monkeypatch.setattr(cli_reference, "method_table", broken)
  with pytest.raises(RuntimeError, match="a bug"):  # the interpreter prints it and exits 1
    _console(monkeypatch, "list", "methods")


@pytest.mark.parametrize("argv, named", [
    (["train", *EMBEDDED_BACKBONE, "--model_dir=x", "--bogus=1"], "--bogus=1"),
    (["compile", "--gin_file=models/tiny.gin", "--model_dir=x"], "--model_dir=x"),
    (["data", "--gin_file=runs/data_embedded.gin", "--model_dir=x"], "--model_dir=x"),
    (["convert", "--checkpoint_dir=a", "--output_dir=b", "--gin.DTYPE=1"], "--gin.DTYPE=1"),
])
def test_unknown_flags_are_refused_by_name(capsys, argv, named):
  with pytest.raises(SystemExit) as exited:
    cli.main(argv)
  assert exited.value.code == 2
  assert (f"tensorpoly: error: {argv[0]}: unrecognized arguments: {named}"
          f" (`tensorpoly {argv[0]} --help` lists its flags)") in capsys.readouterr().err


def test_the_generated_reference_page_is_what_the_code_prints():
  from tensorpoly_jax import cli_docs

  page = (Path(__file__).parents[1] / "docs" / "reference" / "commands.md").read_text()
  assert page == cli_docs.page(), (
      "docs/reference/commands.md is stale: python -m tensorpoly_jax.cli_docs"
      " docs/reference/commands.md")
