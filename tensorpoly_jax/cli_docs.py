"""The generated reference page, ``docs/reference/commands.md``: every command's ``--help`` and
every gin file's macros, as the code and the files give them (a test regenerates it and compares).

``python -m tensorpoly_jax.cli_docs docs/reference/commands.md`` rewrites it.
"""
from __future__ import annotations

import contextlib
import os
import sys

from tensorpoly_jax import cli, cli_reference, paths

HELP_COLUMNS = "100"  # argparse wraps help to the terminal; the page must not depend on one
HEADER = """\
# Commands and macros (generated)

Generated from the code by `python -m tensorpoly_jax.cli_docs docs/reference/commands.md`: do not
edit; a test fails when it differs from what the code prints. The overview with links to the guides
is the [command-line reference](cli.md); the gin files are described in the
[configs reference](configs.md).
"""


@contextlib.contextmanager
def _columns(columns: str):
  saved = os.environ.get("COLUMNS")
  os.environ["COLUMNS"] = columns
  try:
    yield
  finally:
    if saved is None:
      del os.environ["COLUMNS"]
    else:
      os.environ["COLUMNS"] = saved


def _block(text: str) -> str:
  # The configs folder's absolute path differs per install.
  text = text.replace(cli_reference.CONFIGS, "configs/").rstrip()
  return f"```text\n{text}\n```\n"


def page() -> str:
  parser = cli.build_parser()
  sections = [HEADER, "## `tensorpoly --help`\n", _block(_help(parser))]
  for name, command in cli.subcommands(parser).items():
    sections += [f"## `tensorpoly {name}`\n", _block(_help(command))]
  sections += ["## `tensorpoly list methods`\n", _block(cli_reference.method_table()),
               "## `tensorpoly list presets`\n", _block(cli_reference.preset_table()),
               "## Macros of each gin file\n",
               "Each macro's value as the file (and its includes) sets it; `%gin.REQUIRED` ones"
               " must be bound.\n"]
  for gin_file in _gin_files():
    macros = cli_reference.macro_assignments(gin_file)
    rows = [f"| `{name}` | `{value}` |" for name, value in macros.items()]
    sections += [f"### `{gin_file}`\n",
                 "\n".join(["| macro | value |", "|---|---|", *rows]) + "\n" if rows
                 else "(no macros)\n"]
  return "\n".join(sections)


def _help(parser) -> str:
  with _columns(HELP_COLUMNS):
    return parser.format_help()


def _gin_files() -> list[str]:
  names = []
  for folder, _, files in sorted(os.walk(cli_reference.CONFIGS)):
    relative = os.path.relpath(folder, cli_reference.CONFIGS)
    names += sorted(os.path.normpath(os.path.join(relative, name)) for name in files
                    if name.endswith(".gin"))
  return names


if __name__ == "__main__":
  paths.atomic_write(sys.argv[1], page())
