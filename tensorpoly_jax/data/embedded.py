"""The embedded benchmark ("mini-T0"): a small multi-task suite generated offline from a seed.

It is not T0. It exists so that the whole pipeline of the paper (backbone, multi-task adapter
pretraining, few-shot adaptation of held-out tasks, rank classification) runs here end to end
with no download, on a problem where skill sharing matters.

Every example is a list of five digits (``"4 7 1 9 2"``). A **skill** reads one fact from it:

====== ======================== ======
skill  value                    name
====== ======================== ======
0      first digit              first
1      second digit             second
2      third digit              third
3      last digit               last
4      largest digit            max
5      smallest digit           min
6      number of even digits    evens
7      number of digits above 4 bigs
====== ======================== ======

A **task** composes two skills and answers with both facts as named fields in skill order,
``"max=9 min=1"``. Each task has an opaque name (``"alder"``) that its prompts mention, and three
prompt templates; every (task, template) pair of a training task is one routing task.

Training tasks (12): alder {first, max}, birch {second, min}, cedar {third, evens},
dogwood {last, bigs}, elm {first, second}, fir {max, min}, hazel {third, last},
juniper {evens, bigs}, larch {first, evens}, maple {second, bigs}, oak {max, third},
pine {min, last}.

Held-out tasks (4), new compositions of skills that training tasks use:
willow {first, min}, yew {second, last}, rowan {max, evens}, aspen {third, bigs}.

A second, harder held-out suite (4 tasks) composes three skills, no two of which any training
task composes together, and always asks among 4 choices: cypress {first, third, min},
hemlock {second, last, evens}, linden {last, max, evens}, poplar {first, min, bigs}. Its
answers have a third field no training answer has. Adding it left the first suite's examples
unchanged (every task draws from its own seed).

Training tasks have ``train`` and ``validation`` splits. A held-out task has a ``train`` split,
the pool its few shots are drawn from; a ``validation`` split, the only one that choosing settings
(a sweep) reads; and a ``test`` split, the only one a report reads.

Answers are scored by rank classification over 2 to 4 choices: the gold answer; the same fields
with one value off (tests the skill); and the same values with one field swapped for another
skill's (tests which skills the task composes). A held-out task's name is new, so a model must
learn from its few shots which two skills it composes. Routing should help: the skill modules
pretrained on the training tasks already compute each fact, and a held-out task only has to
learn a new routing row that selects its two skills, instead of fitting a whole new adapter from
a handful of examples.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

NUM_DIGITS = 5
SKILLS = ("first", "second", "third", "last", "max", "min", "evens", "bigs")
TRAIN_TASKS = {
    "alder": (0, 4), "birch": (1, 5), "cedar": (2, 6), "dogwood": (3, 7), "elm": (0, 1),
    "fir": (4, 5), "hazel": (2, 3), "juniper": (6, 7), "larch": (0, 6), "maple": (1, 7),
    "oak": (2, 4), "pine": (3, 5),
}
HELDOUT_TASKS = {"willow": (0, 5), "yew": (1, 3), "rowan": (4, 6), "aspen": (2, 7)}
THREE_SKILL_TASKS = {"cypress": (0, 2, 5), "hemlock": (1, 3, 6), "linden": (3, 4, 6),
                     "poplar": (0, 5, 7)}
EVALUATED_TASKS = {**HELDOUT_TASKS, **THREE_SKILL_TASKS}  # each has the held-out splits
TEMPLATES = (
    "{task}: {digits} ->",
    "task {task}. input {digits}. answer:",
    "what does {task} say about {digits}?",
)
# Choices per task (2 to 4), so that the evaluation mixes binary and 4-way questions.
NUM_CHOICES = {
    **{name: 2 + i % 3 for i, name in enumerate(sorted({**TRAIN_TASKS, **HELDOUT_TASKS}))},
    **dict.fromkeys(THREE_SKILL_TASKS, 4)}
TRAIN_SPLITS = ("train", "validation")
HELDOUT_SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Examples per task and split: training tasks per template, held-out tasks in all."""

  train_per_template: int = 400
  validation_per_template: int = 40
  heldout_train: int = 200
  heldout_validation: int = 200
  heldout_test: int = 200


_SKILL_FNS = (lambda d: d[0], lambda d: d[1], lambda d: d[2], lambda d: d[-1], max, min,
              lambda d: sum(x % 2 == 0 for x in d), lambda d: sum(x > 4 for x in d))


def skill_value(skill: int, digits: np.ndarray) -> int:
  # Only the asked skill, on Python ints: generating the suite calls this over 100,000 times.
  return int(_SKILL_FNS[skill](digits.tolist()))


def render_answer(skills: tuple[int, ...], values: tuple[int, ...]) -> str:
  return " ".join(f"{SKILLS[s]}={v}" for s, v in sorted(zip(skills, values)))


def _choices(task: str, skills, digits, rng) -> tuple[list[str], int]:
  """Gold answer plus distractors: one value off, or one skill swapped; shuffled."""
  values = tuple(skill_value(s, digits) for s in skills)
  gold = render_answer(skills, values)
  candidates = []
  for i in range(len(skills)):
    wrong = list(values)
    wrong[i] = (values[i] + int(rng.integers(1, 5))) % 10
    candidates.append(render_answer(skills, tuple(wrong)))
    others = [s for s in range(len(SKILLS)) if s not in skills]
    swapped = list(skills)
    swapped[i] = int(rng.choice(others))
    candidates.append(render_answer(tuple(swapped), tuple(skill_value(s, digits) for s in swapped)))
  distractors = list(dict.fromkeys(c for c in candidates if c != gold))
  rng.shuffle(distractors)
  choices = [gold] + distractors[:NUM_CHOICES[task] - 1]
  order = rng.permutation(len(choices))
  return [choices[i] for i in order], int(np.argmax(order == 0))


def make_example(task: str, template: int, rng) -> dict:
  skills = {**TRAIN_TASKS, **EVALUATED_TASKS}[task]
  digits = rng.integers(0, 10, NUM_DIGITS)
  choices, label = _choices(task, skills, digits, rng)
  return {
      "inputs": TEMPLATES[template].format(task=task, digits=" ".join(map(str, digits))),
      "targets": choices[label],
      "answer_choices": choices,
      "label": label,
      "template": template,
  }


def generate(seed: int = 0, sizes: Sizes = Sizes()) -> dict[str, dict[str, list[dict]]]:
  """``{task: {split: [example, ...]}}``, byte-identical for the same seed and sizes.

  Training tasks have every template at equal counts; held-out examples (both suites) draw a
  template at random per example (as the T0 evaluation does with its prompts).
  """
  suite = {}
  order = sorted(TRAIN_TASKS) + sorted(HELDOUT_TASKS) + sorted(THREE_SKILL_TASKS)
  for index, task in enumerate(order):
    rng = np.random.default_rng([seed, index])
    heldout = task in EVALUATED_TASKS
    suite[task] = {}
    # Held-out tasks draw their test split last: the other splits stay as they were without it.
    for split in HELDOUT_SPLITS if heldout else TRAIN_SPLITS:
      if heldout:
        count = getattr(sizes, f"heldout_{split}")
        templates = rng.integers(0, len(TEMPLATES), count)
      else:
        per = sizes.train_per_template if split == "train" else sizes.validation_per_template
        templates = np.repeat(np.arange(len(TEMPLATES)), per)
      suite[task][split] = [make_example(task, int(t), rng) for t in templates]
  return suite


def check_compositions() -> None:
  """Held-out compositions are new, every skill they use is trained, and no two skills of a
  three-skill task are a training composition (asserted at import)."""
  train_sets = {frozenset(s) for s in TRAIN_TASKS.values()}
  trained_skills = {s for skills in TRAIN_TASKS.values() for s in skills}
  for task, skills in EVALUATED_TASKS.items():
    if frozenset(skills) in train_sets:
      raise AssertionError(f"held-out task {task} repeats a training composition {skills}")
    if not set(skills) <= trained_skills:
      raise AssertionError(f"held-out task {task} uses untrained skills {set(skills) - trained_skills}")
  for task, skills in THREE_SKILL_TASKS.items():
    trained_pairs = [p for p in itertools.combinations(skills, 2) if frozenset(p) in train_sets]
    if len(set(skills)) != 3 or trained_pairs:
      raise AssertionError(f"three-skill task {task} {skills}: trained pairs {trained_pairs}")


check_compositions()
