"""The T0 setting: the training mixture (P3 prompts of T0's 38 BASE datasets) and the 11
held-out evaluation tasks, registered as seqio tasks over Hugging Face datasets."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import seqio

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


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """A held-out task: where its few-shot pool and its evaluation split are, and T-Few's k."""

  dataset: str
  subset: str | None
  eval_split: str
  train_split: str
  k: int


HELDOUT_TASKS = {
    "rte": HeldOut("super_glue", "rte", "validation", "train", 32),
    "cb": HeldOut("super_glue", "cb", "validation", "train", 32),
    "copa": HeldOut("super_glue", "copa", "validation", "train", 32),
    "wic": HeldOut("super_glue", "wic", "validation", "train", 32),
    "wsc": HeldOut("super_glue", "wsc.fixed", "validation", "train", 32),
    "winogrande": HeldOut("winogrande", "winogrande_xl", "validation", "train", 50),
    "hellaswag": HeldOut("hellaswag", None, "validation", "train", 20),
    # StoryCloze ships no training split: its validation split is the few-shot pool.
    "story_cloze": HeldOut("story_cloze", "2016", "test", "validation", 70),
    **{f"anli_{r}": HeldOut("anli", None, f"test_{r}", f"train_{r}", 50) for r in ("r1", "r2", "r3")},
}


def heldout(name: str, anli_eval: str = "test") -> HeldOut:
  """A held-out task by name; ``anli_eval="dev"`` evaluates ANLI on dev_rX as the original T0."""
  if name not in HELDOUT_TASKS:
    raise ValueError(f"unknown held-out task {name!r}; choose from {sorted(HELDOUT_TASKS)}.")
  if anli_eval not in ("test", "dev"):
    raise ValueError(f"anli_eval must be 'test' or 'dev', got {anli_eval!r}.")
  task = HELDOUT_TASKS[name]
  if name.startswith("anli_") and anli_eval == "dev":
    task = dataclasses.replace(task, eval_split=task.eval_split.replace("test", "dev"))
  return task


def _prompted_rows(dataset, subset, split, template_names, data_dir, limit, rng_seed=0):
  """Rows of one split under one template, or a random template per row (held-out tasks)."""
  import numpy as np

  collection = prompts.dataset_templates(dataset, subset)
  rows = sources.load_rows(dataset, subset, split, data_dir, limit)
  pick = np.random.default_rng(rng_seed).integers(0, len(template_names), len(rows))
  prompted = (prompts.apply(collection[template_names[i]], row) for i, row in zip(pick, rows))
  return [dataclasses.asdict(p) for p in prompted if p is not None]


def register_t0(vocabulary: seqio.Vocabulary, data_dir: str | None = None,
                train_datasets: Sequence[tuple[str, str | None, int]] = TRAIN_DATASETS,
                heldout_names: Sequence[str] = tuple(HELDOUT_TASKS),
                examples_per_task: int | None = None, anli_eval: str = "test") -> dict[str, int]:
  """Registers ``t0_train`` (one task per (dataset, template)) and the held-out tasks.

  Mixing rates follow T0: a dataset's examples, capped at 500k divided by its templates.
  ``examples_per_task`` caps each training task (the TensorPoly recipe uses 1,000).
  Returns the training mixture's routing id map.
  """
  entries = {}
  for dataset, subset, size in train_datasets:
    names = [n for n in prompts.template_names(dataset, subset)
             if (dataset, n) not in TEMPLATE_BLACKLIST]
    cap = MAX_EXAMPLES_PER_DATASET // len(names) if size > MAX_EXAMPLES_PER_DATASET else size
    if examples_per_task:
      cap = min(cap, examples_per_task)
    for template in names:
      entries[prompts.task_name(dataset, subset, template)] = (dataset, subset, template, cap)
  ids = tasks.routing_ids(list(entries))
  for name, (dataset, subset, template, cap) in entries.items():
    rows_fn = lambda split, d=dataset, s=subset, t=template, c=cap: _prompted_rows(
        d, s, split, [t], data_dir, c)
    tasks.add_task(name, tasks.examples_source(rows_fn, ["train"], ids[name]), vocabulary,
                   inputs_eos=False)
  tasks.add_mixture(T0_TRAIN, [(name, entries[name][3]) for name in sorted(entries)])
  for name in heldout_names:
    spec = heldout(name, anli_eval)
    originals = prompts.template_names(spec.dataset, spec.subset, original_task_only=True)
    split_map = {"train": spec.train_split, "validation": spec.eval_split}
    rows_fn = lambda split, spec=spec, originals=originals, split_map=split_map: _prompted_rows(
        spec.dataset, spec.subset, split_map[split], originals, data_dir, None)
    tasks.add_task(f"t0__{name}", tasks.examples_source(rows_fn, ["train", "validation"]),
                   vocabulary, inputs_eos=False)
  tasks.add_mixture(T0_HELDOUT, [(f"t0__{n}", 1.0) for n in heldout_names])
  return ids
