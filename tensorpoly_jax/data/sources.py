"""Hugging Face ``datasets`` rows: from a local ``save_to_disk`` copy, else from the hub repository
that holds the dataset today.

``datasets`` >= 4 runs no loading scripts, and the canonical names T0 used (``glue``, ``imdb``, ...)
moved to organisation namespaces. ``HUB_SOURCES`` says, for each T0 dataset, which repository and
config ``datasets`` 4/5 can read: parquet files in the repository itself, or, for a repository that
still holds only a script, the hub's automatic parquet export of that script's output (branch
``refs/convert/parquet``, same columns and ClassLabel names). StoryCloze needs a manual download.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Iterable

import numpy as np

PARQUET_EXPORT = "refs/convert/parquet"


class DataSourceError(RuntimeError):
  """A dataset that cannot be read: names it and how to provide a local copy."""


@dataclasses.dataclass(frozen=True)
class HubSource:
  """Where ``datasets`` >= 4 reads one dataset (and subset) on the hub, or why it cannot."""

  repo: str | None  # None: no copy on the hub that `datasets` can load (``note`` says why)
  config: str | None  # the repo's config, or the export's folder; None: its only one
  splits: tuple[str, ...]
  export: bool = False  # the repo holds only a loading script: read its parquet export
  note: str = ""  # what an error should add: why there is no hub copy, or a doubt about it


TVT = ("train", "validation", "test")
TV = ("train", "validation")
TT = ("train", "test")
ANLI_SPLITS = tuple(f"{kind}_r{r}" for r in (1, 2, 3) for kind in ("train", "dev", "test"))
UNCONFIRMED = "its parquet export is unconfirmed: no public code was seen reading it"
STORY_CLOZE_FORM = "https://cs.rochester.edu/nlp/rocstories/"

# Keys are the names T0 and promptsource use (and the local layout); values are what the hub holds.
HUB_SOURCES: dict[tuple[str, str | None], HubSource] = {
    ("glue", "mrpc"): HubSource("nyu-mll/glue", "mrpc", TVT),
    ("glue", "qqp"): HubSource("nyu-mll/glue", "qqp", TVT),
    ("paws", "labeled_final"): HubSource("google-research-datasets/paws", "labeled_final", TVT),
    ("kilt_tasks", "hotpotqa"): HubSource("facebook/kilt_tasks", "hotpotqa", TVT),
    ("wiki_qa", None): HubSource("microsoft/wiki_qa", None, TVT),
    ("adversarial_qa", "dbidaf"): HubSource("UCLNLP/adversarial_qa", "dbidaf", TVT),
    ("adversarial_qa", "dbert"): HubSource("UCLNLP/adversarial_qa", "dbert", TVT),
    ("adversarial_qa", "droberta"): HubSource("UCLNLP/adversarial_qa", "droberta", TVT),
    ("duorc", "SelfRC"): HubSource("ibm-research/duorc", "SelfRC", TVT),
    ("duorc", "ParaphraseRC"): HubSource("ibm-research/duorc", "ParaphraseRC", TVT),
    ("ropes", None): HubSource("allenai/ropes", None, TVT),
    ("quoref", None): HubSource("allenai/quoref", None, TV, export=True),
    ("cos_e", "v1.11"): HubSource("Salesforce/cos_e", "v1.11", TV),
    ("cosmos_qa", None): HubSource("allenai/cosmos_qa", None, TVT, export=True),
    ("dream", None): HubSource("dataset-org/dream", None, TVT, export=True),
    ("qasc", None): HubSource("allenai/qasc", None, TVT),
    ("quail", None): HubSource("textmachinelab/quail", None, ("train", "validation", "challenge")),
    ("quarel", None): HubSource("allenai/quarel", None, TVT),
    ("quartz", None): HubSource("allenai/quartz", None, TVT),
    ("sciq", None): HubSource("allenai/sciq", None, TVT),
    ("social_i_qa", None): HubSource("allenai/social_i_qa", None, TV, export=True),
    # The export holds both configs (original, masked): name the folder.
    ("wiki_hop", "original"): HubSource("QAngaroo/wiki_hop", "original", TV, export=True),
    ("wiqa", None): HubSource("allenai/wiqa", None, TVT, export=True),
    ("amazon_polarity", None): HubSource("fancyzhx/amazon_polarity", None, TT),
    ("app_reviews", None): HubSource("sealuzh/app_reviews", None, ("train",)),
    ("imdb", None): HubSource("stanfordnlp/imdb", None, ("train", "test", "unsupervised")),
    ("rotten_tomatoes", None): HubSource("cornell-movie-review-data/rotten_tomatoes", None, TVT),
    ("yelp_review_full", None): HubSource("Yelp/yelp_review_full", None, TT),
    ("common_gen", None): HubSource("allenai/common_gen", None, TVT),
    ("wiki_bio", None): HubSource("michaelauli/wiki_bio", None, TVT, export=True, note=UNCONFIRMED),
    ("cnn_dailymail", "3.0.0"): HubSource("abisee/cnn_dailymail", "3.0.0", TVT),
    ("gigaword", None): HubSource("Harvard/gigaword", None, TVT, export=True, note=UNCONFIRMED),
    ("multi_news", None): HubSource("alexfabbri/multi_news", None, TVT, export=True,
                                    note=UNCONFIRMED),
    ("samsum", None): HubSource("Samsung/samsum", None, TVT, export=True, note=UNCONFIRMED),
    ("xsum", None): HubSource("EdinburghNLP/xsum", None, TVT, export=True),
    ("ag_news", None): HubSource("fancyzhx/ag_news", None, TT),
    ("dbpedia_14", None): HubSource("fancyzhx/dbpedia_14", None, TT),
    ("trec", None): HubSource("CogComp/trec", None, TT, export=True),
    # Held-out tasks.
    **{("super_glue", task): HubSource("aps/super_glue", task, TVT)
       for task in ("rte", "cb", "copa", "wic", "wsc.fixed")},
    ("winogrande", "winogrande_xl"): HubSource("allenai/winogrande", "winogrande_xl", TVT),
    ("hellaswag", None): HubSource("Rowan/hellaswag", None, TVT),
    ("story_cloze", "2016"): HubSource(
        None, None, ("validation", "test"),
        note="StoryCloze is a manual download: its hub repo (LSDSem/story_cloze) holds only a"
             " script that read the CSV files from a local folder. Request the files with the form"
             f" at {STORY_CLOZE_FORM}, then convert each split's CSV (validation:"
             " 'cloze_test_val__spring2016 - cloze_test_ALL_val.csv', test: 'cloze_test_test__"
             "spring2016 - cloze_test_ALL_test.csv') with"
             " `tensorpoly_jax.data.sources.story_cloze_from_csv(csv_path, output_dir)`"),
    ("anli", None): HubSource("facebook/anli", None, ANLI_SPLITS),
}

# The official StoryCloze CSV header, and the features the `story_cloze` script gave each column.
STORY_CLOZE_COLUMNS = {
    "InputStoryid": "story_id", "InputSentence1": "input_sentence_1",
    "InputSentence2": "input_sentence_2", "InputSentence3": "input_sentence_3",
    "InputSentence4": "input_sentence_4", "RandomFifthSentenceQuiz1": "sentence_quiz1",
    "RandomFifthSentenceQuiz2": "sentence_quiz2", "AnswerRightEnding": "answer_right_ending",
}


def local_path(data_dir: str, dataset: str, subset: str | None, split: str) -> str:
  """Where a local copy lives: ``data_dir/<dataset>[/<subset>]/<split>`` (``save_to_disk``
  format)."""
  return os.path.join(data_dir, dataset, *([subset] if subset else []), split)


def _name(dataset, subset, split):
  return f"{dataset}{'/' + subset if subset else ''} split {split!r}"


def _hub_call(dataset, subset, split):
  """``datasets.load_dataset`` arguments for one split: the table's repo, else the name as given."""
  source = HUB_SOURCES.get((dataset, subset))
  if source is None:
    return (dataset, subset), {"split": split}
  if source.export:
    folder = source.config or "*"
    return (source.repo,), {"revision": PARQUET_EXPORT, "split": split,
                            "data_files": {split: f"{folder}/{split}/*.parquet"}}
  return (source.repo, source.config), {"split": split}


def _call_text(args, kwargs):
  return "datasets.load_dataset(" + ", ".join(
      [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]) + ")"


def _problem(dataset, subset, split, data_dir) -> str | None:
  """Why a split can be read neither from ``data_dir`` nor from the hub, as far as is seen without
  the network; None when it can."""
  where = local_path(data_dir or "DATA_DIR", dataset, subset, split)
  if data_dir and os.path.isdir(where):
    if os.path.isfile(os.path.join(where, "state.json")):
      return None
    return (f"{_name(dataset, subset, split)}: {where} is not a `Dataset.save_to_disk` copy (it has"
            " no state.json); write it again with save_to_disk.")
  source = HUB_SOURCES.get((dataset, subset))
  if source is None:
    return None  # not a T0 dataset: `datasets` tries the name as given
  if source.repo is None:
    return (f"{_name(dataset, subset, split)} cannot be loaded by name. {source.note}. Put the"
            f" `save_to_disk` copy at {where} and set DATA_DIR (--gin.DATA_DIR=...) to its root.")
  if split not in source.splits:
    return (f"{_name(dataset, subset, split)}: {source.repo} has no split {split!r}; its splits"
            f" are {', '.join(source.splits)}.")
  return None


def check_available(requests: Iterable[tuple[str, str | None, str]],
                    data_dir: str | None) -> list[str]:
  """The problems, one sentence each, that stop ``load_rows`` reading these splits, found without
  the network so that a run refuses before it trains.

  ``requests`` are (dataset, subset, split) triples with the names T0 uses (``("glue", "mrpc",
  "train")``); ``data_dir`` is the root of the local copies (None: none). A split with a local copy
  is fine; one without is fine when ``HUB_SOURCES`` has a hub copy with that split. Reported: a
  dataset with no hub copy (StoryCloze) and no local copy, a split its hub copy lacks, and a local
  folder that is not a ``save_to_disk`` copy. Whether the hub answers is only known when loading.
  """
  problems = (_problem(dataset, subset, split, data_dir)
              for dataset, subset, split in dict.fromkeys(requests))
  return [problem for problem in problems if problem]


def load_rows(dataset: str, subset: str | None, split: str, data_dir: str | None = None,
              limit: int | None = None, seed: int = 0):
  """A ``datasets.Dataset`` of one split, from ``data_dir`` when a copy is there, else the hub copy
  ``HUB_SOURCES`` names; past ``limit`` rows, a seeded random sample of ``limit`` of them (in their
  stored order)."""
  import datasets

  name = _name(dataset, subset, split)
  problem = _problem(dataset, subset, split, data_dir)
  if problem:
    raise DataSourceError(problem)
  copy = local_path(data_dir, dataset, subset, split) if data_dir else None
  if copy and os.path.isdir(copy):
    try:
      rows = datasets.load_from_disk(copy)
    except Exception as err:
      raise DataSourceError(f"the local copy of {name} at {copy} cannot be read ({err});"
                            " write it again with Dataset.save_to_disk.") from err
  else:
    args, kwargs = _hub_call(dataset, subset, split)
    try:
      rows = datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # the hub raises many types (connection, missing file, auth)
      where = local_path(data_dir or "DATA_DIR", dataset, subset, split)
      call = _call_text(args, kwargs)
      source = HUB_SOURCES.get((dataset, subset))
      doubt = f" ({source.note})" if source and source.note else ""
      raise DataSourceError(
          f"could not load {name} from the Hugging Face hub with `{call}`{doubt}. Save a copy"
          f" with `{call}.save_to_disk({where!r})`"
          " where the hub is reachable (or the same rows in those columns from elsewhere), and"
          f" set DATA_DIR (--gin.DATA_DIR=...) to its root. ({type(err).__name__}: {err})") from err
  if len(rows) == 0:
    raise DataSourceError(f"dataset {name} is empty; check DATA_DIR or the split name.")
  if limit is not None and len(rows) > limit:
    # Not the first rows: hub splits are often sorted (imdb's train split by label).
    keep = np.random.default_rng([seed, limit]).choice(len(rows), limit, replace=False)
    rows = rows.select(np.sort(keep))
  return rows


def story_cloze_from_csv(csv_path: str, output_dir: str):
  """Writes one official StoryCloze 2016 CSV (the manual download) as a ``save_to_disk`` split at
  ``output_dir``, in the columns and types the ``story_cloze`` loading script gave it (the names
  promptsource's templates use); returns the ``datasets.Dataset``.

  ``output_dir`` is the split's local folder:
  ``local_path(DATA_DIR, "story_cloze", "2016", split)``.
  """
  import datasets

  with open(csv_path, newline="", encoding="utf-8-sig") as stream:
    reader = csv.DictReader(stream, skipinitialspace=True)
    missing = [column for column in STORY_CLOZE_COLUMNS if column not in (reader.fieldnames or ())]
    if missing:
      raise DataSourceError(f"{csv_path} is not a StoryCloze CSV: it lacks the columns {missing}"
                            f" (expected the header {', '.join(STORY_CLOZE_COLUMNS)}).")
    columns = {feature: [] for feature in STORY_CLOZE_COLUMNS.values()}
    for row in reader:
      answer = (row["AnswerRightEnding"] or "").strip()
      if answer not in ("1", "2"):
        raise DataSourceError(f"{csv_path} line {reader.line_num}: AnswerRightEnding is"
                              f" {answer!r}; it must be 1 or 2 (the right ending's quiz number).")
      for column, feature in STORY_CLOZE_COLUMNS.items():
        columns[feature].append(int(answer) if column == "AnswerRightEnding" else row[column] or "")
  if not columns["story_id"]:
    raise DataSourceError(f"{csv_path} has a header but no stories.")
  features = datasets.Features({feature: datasets.Value("string") for feature in columns}
                               | {"answer_right_ending": datasets.Value("int32")})
  stories = datasets.Dataset.from_dict(columns, features=features)
  stories.save_to_disk(output_dir)
  return stories
