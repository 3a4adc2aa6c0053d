"""The README and docs/ hold together: links and anchors resolve inside the repository, the README
stays a short front page without lab-notebook references, and every command and import they show
names something that exists."""
import argparse
import ast
import importlib
import pathlib
import re
import shlex
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
CONFIGS = ROOT / "configs"
README_MAX_LINES = 200

FENCE = re.compile(r"^(```+|~~~+)[ \t]*([\w+-]*)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...
# A commit hash as notes cite one: 7 to 40 hex digits with at least one digit and one letter.
COMMIT = re.compile(r"(?<![\w./-])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w-])")
ISO_DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
# Only CI's test command may name the wheels folder beside the checkout.
SHARED_ALLOWED = "../shared/wheels"


def _rel(page: pathlib.Path) -> str:
  return str(page.relative_to(ROOT))


def _code_blocks(text: str, languages=None) -> list[str]:
  return [m.group(3) for m in FENCE.finditer(text)
          if languages is None or m.group(2).lower() in languages]


def _prose(text: str) -> str:
  """The text outside fenced code blocks and inline code spans."""
  return INLINE_CODE.sub("", FENCE.sub("", text))


def _links(text: str) -> list[str]:
  prose = _prose(text)
  return [*MD_LINK.findall(prose), *HTML_LINK.findall(prose)]


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped (letters,
  digits, '_', '-' and spaces kept), spaces as hyphens."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
  text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
  text = "".join(ch for ch in text.lower() if ch.isalnum() or ch in " _-")
  return text.replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
  seen: dict[str, int] = {}
  anchors = set()
  for _, heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
    slug = _slug(heading)
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    anchors.add(slug if count == 0 else f"{slug}-{count}")
  return anchors


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve_inside_the_repository(page):
  problems = []
  for target in _links(page.read_text(encoding="utf-8")):
    if EXTERNAL.match(target):
      continue
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    try:
      resolved.relative_to(ROOT)
    except ValueError:
      problems.append(f"{target}: leaves the repository ({resolved})")
      continue
    if not resolved.is_file():
      problems.append(f"{target}: no such file ({resolved.relative_to(ROOT)})")
      continue
    if anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
      problems.append(f"{target}: {resolved.relative_to(ROOT)} has no heading #{anchor}")
  assert not problems, f"{_rel(page)}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_page_points_outside_the_repository(page):
  """Users have the repository, not the workspace around it: no ``../shared/SPEC.md`` and the
  like, in links or in text (CI's wheels folder, in the test command, is the one exception)."""
  text = page.read_text(encoding="utf-8")
  outside = [m.group(0) for m in re.finditer(r"(?:\.\./)+shared/[\w./*-]*", text)
             if not m.group(0).startswith(SHARED_ALLOWED)]
  if page != README and "docs" in page.parts:
    outside += [m.group(0) for m in re.finditer(r"\b(?:SPEC|DESIGN|STYLE)\.md\b", text)]
  assert not outside, f"{_rel(page)} points outside the repository: {outside}"


def test_readme_is_a_short_front_page():
  text = README.read_text(encoding="utf-8")
  lines = text.count("\n") + (not text.endswith("\n"))
  assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"
  assert not COMMIT.findall(text), f"README.md cites commits: {COMMIT.findall(text)}"
  assert not ISO_DATE.findall(text), f"README.md holds dates: {ISO_DATE.findall(text)}"


def test_readme_links_the_paper_the_license_and_the_guides_on_its_first_screen():
  text = README.read_text(encoding="utf-8")
  assert "https://arxiv.org/abs/2405.16671" in text and "@misc{" in text  # link and BibTeX
  assert "(LICENSE)" in text
  license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
  assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
  assert "END OF TERMS AND CONDITIONS" in license_text
  first_screen = set(_links("\n".join(text.splitlines()[:40])))
  for guide in ("docs/README.md", "docs/getting-started/install.md",
                "docs/getting-started/first-run.md", "docs/guides/own-tasks.md",
                "docs/guides/train-adapt-eval.md", "docs/guides/peft.md",
                "docs/guides/tpu-pods.md"):
    assert guide in first_screen, f"README.md's first screen does not link {guide}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
  from tensorpoly_jax import cli

  parser = cli.build_parser()
  action, = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
  return dict(action.choices)


def _shell_commands(block: str):
  """Each simple command of a bash block as its words (continuations joined, comments and
  ``VAR=value`` prefixes dropped, split at ``&&``, ``||``, ``;`` and ``|``)."""
  for line in block.replace("\\\n", " ").splitlines():
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
      tokens = list(lexer)
    except ValueError as err:  # an unclosed quote
      raise AssertionError(f"cannot parse the shell line {line!r}: {err}") from None
    command: list[str] = []
    for token in [*tokens, ";"]:
      if token in ("&&", "||", ";", "|", "&"):
        if command:
          yield command
        command = []
      elif command or not re.fullmatch(r"[A-Za-z_]\w*=.*", token):
        command.append(token)


def _tensorpoly_args(words: list[str]) -> list[str] | None:
  """The arguments after ``tensorpoly`` / ``python -m tensorpoly_jax``, or None."""
  while words and words[0] in ("time", "srun", "sudo", "exec"):
    words = words[1:]
  if words[:1] == ["tensorpoly"]:
    return words[1:]
  if len(words) >= 3 and re.fullmatch(r"python[\d.]*", words[0]) and words[1:3] == [
      "-m", "tensorpoly_jax"]:
    return words[3:]
  return None


def _documented_commands():
  for page in PAGES:
    for block in _code_blocks(page.read_text(encoding="utf-8"), {"bash", "sh", "shell"}):
      for words in _shell_commands(block):
        args = _tensorpoly_args(words)
        if args is not None:
          yield page, args


def test_docs_show_tensorpoly_commands():
  assert len(list(_documented_commands())) > 20


def test_every_documented_tensorpoly_command_names_a_real_subcommand_and_gin_files():
  subcommands = _subcommands()
  problems = []
  for page, args in _documented_commands():
    where = f"{_rel(page)}: tensorpoly {' '.join(args)[:80]}"
    if not args or args[0] in ("-h", "--help", "--version"):
      continue
    name = args[0]
    if name not in subcommands:
      problems.append(f"{where}: no subcommand {name!r} (known: {sorted(subcommands)})")
      continue
    if "--gin_file" not in subcommands[name]._option_string_actions:
      continue
    if any(arg.startswith("--gin_search_paths") for arg in args):
      continue  # the user's own gin files, found in their folders
    files = [arg.split("=", 1)[1] for arg in args if arg.startswith("--gin_file=")]
    files += [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--gin_file"]
    for gin_file in files:
      if "$" not in gin_file and not (CONFIGS / gin_file).is_file():
        problems.append(f"{where}: --gin_file={gin_file} is not a file under configs/")
  assert not problems, "\n".join(problems)


def _python_blocks():
  for page in PAGES:
    for index, block in enumerate(_code_blocks(page.read_text(encoding="utf-8"), {"python"})):
      yield pytest.param(page, block, id=f"{_rel(page)}[{index}]")


@pytest.mark.parametrize("page, block", list(_python_blocks()))
def test_python_examples_use_names_that_exist(page, block):
  """Every ``tensorpoly_jax`` import of an example resolves, and every attribute it reads from an
  imported module (``pipeline.load_backbone``) exists."""
  tree = ast.parse(block)
  modules: dict[str, types.ModuleType] = {}
  problems = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "tensorpoly_jax":
          module = importlib.import_module(alias.name)
          modules[alias.asname or alias.name.split(".")[0]] = (
              module if alias.asname else importlib.import_module("tensorpoly_jax"))
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tensorpoly_jax":
      module = importlib.import_module(node.module)
      for alias in node.names:
        if hasattr(module, alias.name):
          value = getattr(module, alias.name)
        else:
          try:
            value = importlib.import_module(f"{node.module}.{alias.name}")
          except ModuleNotFoundError:
            problems.append(f"from {node.module} import {alias.name}: no such name")
            continue
        if isinstance(value, types.ModuleType):
          modules[alias.asname or alias.name] = value
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in modules and not hasattr(modules[node.value.id], node.attr)):
      problems.append(f"{node.value.id}.{node.attr}: {modules[node.value.id].__name__} has no"
                      f" {node.attr!r}")
  assert not problems, f"{_rel(page)}:\n  " + "\n  ".join(problems)
