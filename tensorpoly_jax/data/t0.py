"""The T0 setting: the training mixture (P3 prompts of T0's 38 BASE datasets) and the 11
held-out evaluation tasks, registered as seqio tasks over Hugging Face datasets.

T-Few's protocol is the default (``Protocol``): per-task k, COPA's 8 unconditional templates, a
template drawn per example (per step in few-shot training, per (example, seed) in evaluation),
EOS on inputs, ``<NO LABEL>`` training targets as t-zero, seeded randomized prompts, ANLI on
test_rX. Held-out tasks have two splits: ``train`` (the few-shot pool) and ``validation`` (the
split T-Few reports on, e.g. StoryCloze's test); there is no split to choose settings on.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import seqio

from tensorpoly_jax import field_types
from tensorpoly_jax.data import prompts, sources, tasks

MAX_EXAMPLES_PER_DATASET = 500_000
T0_TRAIN = "t0_train"
T0_HELDOUT = "t0_heldout"

# (Hugging Face name, subset, training examples): T0's "BASE" training datasets.
TRAIN_DATASETS: tuple[tuple[str, str | None, int], ...] = (
    ("glue", "mrpc", 3668), ("glue", "qqp", 363846), ("paws", "labeled_final", 49401),
    ("kilt_tasks", "hotpotqa", 88869), ("wiki_qa", None, 20360),
    ("adversarial_qa", "dbidaf", 10000), ("adversarial_qa", "dbert", 10000),
    ("adversarial_qa", "droberta", 10000), ("duorc", "SelfRC", 60721),
    ("duorc", "ParaphraseRC", 69524), ("ropes", None, 10924), ("quoref", None, 19399),
    ("cos_e", "v1.11", 9741), ("cosmos_qa", None, 25262), ("dream", None, 6116),
    ("qasc", None, 8134), ("quail", None, 10246), ("quarel", None, 1941), ("quartz", None, 2696),
    ("sciq", None, 11679), ("social_i_qa", None, 33410), ("wiki_hop", "original", 43738),
    ("wiqa", None, 29808), ("amazon_polarity", None, 3600000), ("app_reviews", None, 288065),
    ("imdb", None, 25000), ("rotten_tomatoes", None, 8530), ("yelp_review_full", None, 650000),
    ("common_gen", None, 67389), ("wiki_bio", None, 582659), ("cnn_dailymail", "3.0.0", 287113),
    ("gigaword", None, 3803957), ("multi_news", None, 44972), ("samsum", None, 14732),
    ("xsum", None, 204045), ("ag_news", None, 120000), ("dbpedia_14", None, 560000),
    ("trec", None, 5452),
)
# Templates T0 left out of training (by dataset and template name).
TEMPLATE_BLACKLIST = {("gigaword", "summarize_")}
# promptsource's TREC templates read TREC 1.x's label columns, in its class order (t-zero renamed
# 1.x's `label-coarse` / `label-fine` with underscores); TREC 2.0 has coarse_label / fine_label.
TREC_V1_COARSE = ("DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC")
TREC_V1_FINE = (
    "manner", "cremat", "animal", "exp", "ind", "gr", "title", "def", "date", "reason", "event",
    "state", "desc", "count", "other", "letter", "religion", "food", "country", "color", "termeq",
    "city", "body", "dismed", "mount", "money", "product", "period", "substance", "sport", "plant",
    "techmeth", "volsize", "instru", "abb", "speed", "word", "lang", "perc", "code", "dist", "temp",
    "symbol", "ord", "veh", "weight", "currency")


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """A held-out task: where its few-shot pool and its evaluation split are, T-Few's k, and how
  many of its sorted ``original_task`` templates T-Few keeps (None: all)."""

  dataset: str
  subset: str | None
  eval_split: str
  train_split: str
  k: int
  max_templates: int | None = None


HELDOUT_TASKS = {
    "rte": HeldOut("super_glue", "rte", "validation", "train", 32),
    "cb": HeldOut("super_glue", "cb", "validation", "train", 32),
    # The first 8 are the unconditional ones; 4 of the other 4 render only for one question type.
    "copa": HeldOut("super_glue", "copa", "validation", "train", 32, max_templates=8),
    "wic": HeldOut("super_glue", "wic", "validation", "train", 32),
    "wsc": HeldOut("super_glue", "wsc.fixed", "validation", "train", 32),
    "winogrande": HeldOut("winogrande", "winogrande_xl", "validation", "train", 50),
    "hellaswag": HeldOut("hellaswag", None, "validation", "train", 20),
    # StoryCloze ships no training split: its validation split is the few-shot pool.
    "story_cloze": HeldOut("story_cloze", "2016", "test", "validation", 70),
    **{f"anli_{r}": HeldOut("anli", None, f"test_{r}", f"train_{r}", 50) for r in ("r1", "r2", "r3")},
}
# A held-out task's splits as its seqio task names them: the few-shot pool and the split T-Few
# reports on (each task's own eval_split above).
POOL_SPLIT, REPORT_SPLIT = tasks.POOL_SPLIT, "validation"


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How a T0 run reads its data. The defaults are T-Few's protocol; each field departs from it."""

  inputs_eos: bool = True  # T-Few and mttl end every input with EOS
  no_label_targets: bool = True  # t-zero trains on a row whose target renders empty as <NO LABEL>
  all_copa_templates: bool = False  # T-Few keeps COPA's first 8 templates of 12
  anli_eval: str = "test"  # T-Few evaluates ANLI on test_rX; 'dev': dev_rX, as the original T0

  def __post_init__(self):
    field_types.check(self)
    if self.anli_eval not in ("test", "dev"):
      raise ValueError(f"anli_eval must be 'test' or 'dev', got {self.anli_eval!r} (ANLI_EVAL).")


def heldout(name: str, anli_eval: str = "test") -> HeldOut:
  """A held-out task by name; ``anli_eval="dev"`` evaluates ANLI on dev_rX as the original T0."""
  if name not in HELDOUT_TASKS:
    raise ValueError(f"unknown held-out task {name!r}; choose from {sorted(HELDOUT_TASKS)}.")
  task = HELDOUT_TASKS[name]
  if name.startswith("anli_") and Protocol(anli_eval=anli_eval).anli_eval == "dev":
    task = dataclasses.replace(task, eval_split=task.eval_split.replace("test", "dev"))
  return task


def training_templates(dataset: str, subset: str | None) -> list[str]:
  """The promptsource templates T0 trained on for a dataset: all of them but T0's blacklist."""
  return [name for name in prompts.template_names(dataset, subset)
          if (dataset, name) not in TEMPLATE_BLACKLIST]


def heldout_templates(name: str, protocol: Protocol = Protocol()) -> list[str]:
  """A held-out task's evaluation templates: its sorted ``original_task`` ones, as many as T-Few
  keeps."""
  spec = heldout(name)
  names = prompts.template_names(spec.dataset, spec.subset, original_task_only=True)
  keep = None if protocol.all_copa_templates else spec.max_templates
  return names[:keep]


def _render_seed(example: int, template: int) -> int:
  """The seed of a template's own random draws (HellaSwag's randomized prompt) for one example."""
  return example * 1000 + template


def _render(template_names, collection, rows, example_ids, training=False, no_label=False):
  """Every template applied to every row: ``tasks.Rows``, with the reasons renders were dropped.

  A training row needs no answer choices (with ``no_label``, a target that renders empty is
  ``<NO LABEL>``, as t-zero trains); a held-out render needs its target among its choices."""
  rendered, dropped = [], collections.Counter()
  for example, row in zip(example_ids, rows):
    usable = 0
    for index, name in enumerate(template_names):
      prompted = prompts.apply(collection[name], row, _render_seed(example, index), no_label)
      if prompted is None:
        dropped[f"template {name!r} renders nothing"] += 1
      elif prompted.label < 0 and not training:
        dropped[f"template {name!r}: target not among the answer choices"] += 1
      else:
        rendered.append({**dataclasses.asdict(prompted), "example": int(example),
                         "template": index})
        usable += 1
    if not usable and not training:
      dropped["example that no template renders"] += 1
  return tasks.Rows(rendered, dict(dropped))


def as_templates_read(rows):
  """A split's columns as promptsource's templates name them: hyphens as underscores (t-zero's
  ``removeHyphen``), and TREC 2.0's labels as TREC 1.x's."""
  rows = rows.rename_columns({c: c.replace("-", "_") for c in rows.column_names if "-" in c})
  if "coarse_label" not in rows.column_names or "fine_label" not in rows.column_names:
    return rows
  coarse, fine = rows.features["coarse_label"].names, rows.features["fine_label"].names
  return rows.map(lambda row: {
      "label_coarse": TREC_V1_COARSE.index(coarse[row["coarse_label"]]),
      "label_fine": TREC_V1_FINE.index(fine[row["fine_label"]].split(":")[-1])})


def _training_info(dataset, subset, template, cap, data_dir, vocabulary, task_id, protocol):
  collection = prompts.dataset_templates(dataset, subset)

  def rows_fn(split):
    rows = as_templates_read(sources.load_rows(dataset, subset, split, data_dir, cap))
    return _render([template], collection, rows, range(len(rows)), training=True,
                   no_label=protocol.no_label_targets)

  return tasks.in_memory(rows_fn, ["train"], vocabulary, inputs_eos=protocol.inputs_eos,
                         task_id=task_id, templates=(template,))


def _heldout_info(name, data_dir, vocabulary, protocol):
  """A held-out task read lazily: a few-shot draw renders only the examples it draws."""
  spec = heldout(name, protocol.anli_eval)
  names = heldout_templates(name, protocol)
  collection = prompts.dataset_templates(spec.dataset, spec.subset)
  hf_split = {POOL_SPLIT: spec.train_split, REPORT_SPLIT: spec.eval_split}
  source = functools.cache(
      lambda split: sources.load_rows(spec.dataset, spec.subset, hf_split[split], data_dir))

  def read(split, examples=None):
    if examples is None:
      return whole(split)
    index = [int(e) for e in examples]
    return _render(names, collection, source(split).select(index), index)

  whole = functools.cache(lambda split: _render(names, collection, source(split),
                                                range(len(source(split)))))
  return tasks.TaskInfo(read, lambda split: len(source(split)), (POOL_SPLIT, REPORT_SPLIT),
                        vocabulary, protocol.inputs_eos, templates=tuple(names), num_shots=spec.k)


def source_splits(train_datasets, heldout_names, anli_eval: str = "test"):
  """Every (dataset, subset, split) a T0 run reads."""
  needed = [(dataset, subset, "train") for dataset, subset, _ in train_datasets]
  for name in heldout_names:
    spec = heldout(name, anli_eval)
    needed += [(spec.dataset, spec.subset, spec.train_split),
               (spec.dataset, spec.subset, spec.eval_split)]
  return needed


def register_t0(vocabulary: seqio.Vocabulary, data_dir: str | None = None,
                train_datasets: Sequence[tuple[str, str | None, int]] = TRAIN_DATASETS,
                heldout_names: Sequence[str] = tuple(HELDOUT_TASKS),
                examples_per_task: int | None = None,
                protocol: Protocol = Protocol()) -> dict[str, int]:
  """Registers ``t0_train`` (one task per (dataset, template)) and the held-out tasks ``t0__<name>``
  (mixture ``t0_heldout``), after checking that every split can be read.

  Mixing rates follow T0: a dataset's examples, capped at 500k divided by its templates.
  ``examples_per_task`` caps each training task (the TensorPoly recipe uses 1,000).
  Returns the training mixture's routing id map.
  """
  problems = sources.check_available(source_splits(train_datasets, heldout_names,
                                                   protocol.anli_eval), data_dir)
  if problems:
    raise sources.DataSourceError("the T0 suite cannot read every split it needs:\n- "
                                  + "\n- ".join(problems))
  entries = {}
  for dataset, subset, size in train_datasets:
    names = training_templates(dataset, subset)
    cap = MAX_EXAMPLES_PER_DATASET // len(names) if size > MAX_EXAMPLES_PER_DATASET else size
    if examples_per_task:
      cap = min(cap, examples_per_task)
    for template in names:
      entries[prompts.task_name(dataset, subset, template)] = (dataset, subset, template, cap)
  ids = tasks.routing_ids(list(entries))
  for name, (dataset, subset, template, cap) in entries.items():
    tasks.register_task(name, _training_info(dataset, subset, template, cap, data_dir, vocabulary,
                                             ids[name], protocol))
  tasks.add_mixture(T0_TRAIN, [(name, entries[name][3]) for name in sorted(entries)])
  for name in heldout_names:
    tasks.register_task(heldout_task(name), _heldout_info(name, data_dir, vocabulary, protocol))
  tasks.add_mixture(T0_HELDOUT, [(heldout_task(n), 1.0) for n in heldout_names])
  return ids


def heldout_task(name: str) -> str:
  return f"t0__{name}"
