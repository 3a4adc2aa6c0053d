"""promptsource (P3) templates applied to dataset rows: prompted input, target, answer choices.

The templates are the ones the promptsource package ships (never retyped here). promptsource
0.2.3 declares Python < 3.10 and pins an old streamlit, but its template code runs on 3.11:
``tensorpoly install-templates`` installs it without its app dependencies.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
import re

INSTALL_HINT = ("promptsource is not installed: run `tensorpoly install-templates` (it runs"
                " `pip install --no-deps --ignore-requires-python promptsource==0.2.3`).")
PROMPTSOURCE_VERSION = "0.2.3"
NO_LABEL = "<NO LABEL>"  # t-zero's target for a row whose input renders and target does not


@dataclasses.dataclass(frozen=True)
class Prompted:
  """One prompted example; ``label`` indexes ``answer_choices`` (-1 when the target is free text)."""

  inputs: str
  targets: str
  answer_choices: tuple[str, ...]
  label: int


def dataset_templates(dataset: str, subset: str | None = None):
  """promptsource's ``DatasetTemplates`` for a Hugging Face dataset name and subset."""
  try:
    from promptsource.templates import DatasetTemplates
  except ImportError as err:
    raise ImportError(INSTALL_HINT) from err
  templates = DatasetTemplates(dataset, subset)
  if not templates.all_template_names:
    raise ValueError(f"promptsource {PROMPTSOURCE_VERSION} has no templates for"
                     f" {dataset}{'/' + subset if subset else ''}.")
  return templates


def template_names(dataset: str, subset: str | None = None, original_task_only: bool = False):
  templates = dataset_templates(dataset, subset)
  return [name for name in sorted(templates.all_template_names)
          if not original_task_only or templates[name].metadata.original_task]


@contextlib.contextmanager
def _seeded_choice(seed: int | None):
  """promptsource's Jinja ``choice`` filter (HellaSwag's randomized template) draws from the
  unseeded global ``random``; with a seed, the draw is a function of it."""
  if seed is None:
    yield
    return
  from promptsource import templates

  unseeded = templates.env.filters["choice"]
  templates.env.filters["choice"] = random.Random(seed).choice
  try:
    yield
  finally:
    templates.env.filters["choice"] = unseeded


def apply(template, row: dict, seed: int | None = None, no_label: bool = False) -> Prompted | None:
  """Applies a promptsource template to a row; None when the template does not apply to it.

  ``seed`` fixes the template's own random draws; with ``no_label`` a row whose input renders and
  target does not gets the target ``<NO LABEL>`` (t-zero's training data) instead of None."""
  with _seeded_choice(seed):
    rendered = template.apply(row)
    choices = tuple(c.strip() for c in (template.get_answer_choices_list(row) or ()))
  if len(rendered) != 2 or not rendered[0].strip():
    return None
  inputs, targets = (text.strip() for text in rendered)
  if not targets:
    if not no_label:
      return None
    targets = NO_LABEL
  label = choices.index(targets) if targets in choices else -1
  return Prompted(inputs, targets, choices, label)


def task_name(dataset: str, subset: str | None, template: str) -> str:
  """A seqio-safe name for one (dataset, template) pair: ``super_glue_rte__GPT_3_style``."""
  clean = lambda text: re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_")
  base = clean(dataset) + (f"_{clean(subset)}" if subset else "")
  return f"{base}__{clean(template)}"
