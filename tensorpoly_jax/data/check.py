"""What ``tensorpoly data`` reports of a data setup before any accelerator time is spent: per task
its rows per split, templates, dropped rows and why, one rendered example, and what makes it
unusable."""
from __future__ import annotations

import dataclasses

from tensorpoly_jax.data import choices, fewshot, tasks


@dataclasses.dataclass(frozen=True)
class TaskReport:
  name: str
  heldout: bool
  rows: dict[str, int]  # split -> usable rows (a held-out example has one per template)
  examples: dict[str, int]  # split -> source examples
  dropped: dict[str, dict[str, int]]  # split -> reason -> count
  templates: tuple[str, ...]
  num_shots: int | None
  sample: dict | None  # one rendered row of the last split
  problems: tuple[str, ...]  # why the task cannot be used (empty: usable)
  warnings: tuple[str, ...] = ()  # usable, but scored otherwise than the rows say


def report_task(name: str, heldout: bool, targets_length: int | None = None) -> TaskReport:
  """Reads every split of a registered task; a read that fails becomes a problem, not a crash.
  With ``targets_length``, a held-out task's answer choices longer than it (with their EOS) are
  a warning: rank classification scores only their first ``targets_length`` tokens."""
  info = tasks.task_info(name)
  rows, examples, dropped, problems, sample = {}, {}, {}, [], None
  choice_lengths = []
  for split in info.splits:
    try:
      read = info.read(split, None)
    except Exception as err:  # a missing or unreadable dataset: reported for every split
      problems.append(f"{split}: {type(err).__name__}: {err}")
      continue
    rows[split] = len(read.rows)
    examples[split] = len({row["example"] for row in read.rows})
    dropped[split] = dict(read.dropped)
    if not read.rows:
      problems.append(f"{split}: no usable rows")
    else:
      sample = read.rows[0]
    if heldout and targets_length is not None:
      choice_lengths += [len(choices.encode_choice(info.vocabulary, choice)) for row in read.rows
                         for choice in row["answer_choices"]]
  if heldout:
    problems += _heldout_problems(info, examples)
  cut = [n for n in choice_lengths if n > targets_length]
  warnings = (f"{len(cut)} of {len(choice_lengths)} answer choices are longer than"
              f" TARGETS_LENGTH={targets_length} tokens (longest {max(cut)} with EOS) and are"
              f" scored on their first {targets_length}; raise TARGETS_LENGTH",) if cut else ()
  return TaskReport(name, heldout, rows, examples, dropped, info.templates, info.num_shots,
                    sample, tuple(problems), warnings)


def _heldout_problems(info, examples) -> list[str]:
  problems = []
  if len(info.splits) < 2:
    problems.append(f"held-out tasks need a few-shot pool and an evaluation split; it has only"
                    f" {list(info.splits)}")
  if tasks.POOL_SPLIT in examples and info.num_shots is not None:
    try:
      fewshot.sample_indices(examples[tasks.POOL_SPLIT], info.num_shots, 0)
    except ValueError as err:
      problems.append(f"{tasks.POOL_SPLIT}: {err}")
  return problems


def format_report(report: TaskReport, verbose: bool) -> str:
  """One line per task; with ``verbose`` (held-out tasks) its templates and a rendered example."""
  counts = ", ".join(f"{split} {report.rows[split]} rows" +
                     (f" ({report.examples[split]} examples)"
                      if report.examples[split] != report.rows[split] else "")
                     for split in report.rows)
  drops = sum(n for reasons in report.dropped.values() for n in reasons.values())
  shots = f", k={report.num_shots}" if report.heldout and report.num_shots else ""
  lines = [f"{'held-out' if report.heldout else 'training'} {report.name}: {counts or 'no rows'};"
           f" {len(report.templates)} template(s); {drops} dropped{shots}"]
  for split, reasons in report.dropped.items():
    lines += [f"    dropped from {split}: {count} x {reason}" for reason, count in reasons.items()]
  lines += [f"    PROBLEM {problem}" for problem in report.problems]
  lines += [f"    WARNING {warning}" for warning in report.warnings]
  if verbose and report.sample:
    lines.append(f"    templates: {', '.join(report.templates)}")
    lines.append(f"    example inputs:  {report.sample['inputs']!r}")
    lines.append(f"    example targets: {report.sample['targets']!r}")
    if report.sample["answer_choices"]:
      lines.append(f"    answer choices:  {list(report.sample['answer_choices'])}"
                   f" (label {report.sample['label']})")
  return "\n".join(lines)
