"""Where each T0 dataset is read from: local copies, the hub table, StoryCloze's manual download."""
import csv
import re

import datasets
import pytest

from tensorpoly_jax.data import sources, t0

STORY_HEADER = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3",
                "InputSentence4", "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2",
                "AnswerRightEnding"]
STORIES = [
    ["b929f263-1dcd-4a0b-b267-5d5ff2fe65bb", "My friends all love to go to the club to dance.",
     "They think it's a lot of fun and always invite.", "I finally decided to tag along.",
     "I danced terribly and broke a friend's toe.", "My friends kept inviting me out.",
     "The next weekend, I was asked to please stay home.", "2"],
    ["7cbbc0af-bcce-4f56-871d-963f0bb1e6b3", "Tom had a test, \"a big one\", on Monday.",
     "He studied all weekend.", "He barely slept.", "He walked in, tired but ready.",
     "Tom aced the test.", "Tom forgot to study.", "1"],
]
EXPORT = "refs/convert/parquet"


@pytest.fixture
def hub_calls(monkeypatch):
  """Replaces the hub: records each load_dataset call and answers with a one-row split."""
  calls = []

  def load_dataset(*args, **kwargs):
    calls.append((args, kwargs))
    return datasets.Dataset.from_dict({"text": ["a row"]})

  monkeypatch.setattr(datasets, "load_dataset", load_dataset)
  return calls


@pytest.fixture
def no_hub(monkeypatch):
  monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub was asked"))


def write_csv(path, rows, header=STORY_HEADER):
  with open(path, "w", newline="", encoding="utf-8") as stream:
    csv.writer(stream, quoting=csv.QUOTE_ALL).writerows([header, *rows])
  return str(path)


def t0_pairs():
  return ({(dataset, subset) for dataset, subset, _ in t0.TRAIN_DATASETS}
          | {(task.dataset, task.subset) for task in t0.HELDOUT_TASKS.values()})


def test_the_table_covers_every_t0_dataset_and_split_it_reads():
  assert len(t0_pairs()) == 38 + 9 and t0_pairs() <= set(sources.HUB_SOURCES)
  for task in t0.HELDOUT_TASKS.values():
    splits = sources.HUB_SOURCES[task.dataset, task.subset].splits
    assert {task.train_split, task.eval_split} <= set(splits), task
  assert "dev_r2" in sources.HUB_SOURCES["anli", None].splits
  assert all("train" in sources.HUB_SOURCES[dataset, subset].splits
             for dataset, subset, _ in t0.TRAIN_DATASETS)
  local_only = [pair for pair, source in sources.HUB_SOURCES.items() if source.repo is None]
  assert local_only == [("story_cloze", "2016")]


@pytest.mark.parametrize("pair, args, kwargs", [
    (("glue", "mrpc"), ("nyu-mll/glue", "mrpc"), {}),
    (("super_glue", "wsc.fixed"), ("aps/super_glue", "wsc.fixed"), {}),
    (("duorc", "ParaphraseRC"), ("ibm-research/duorc", "ParaphraseRC"), {}),
    (("imdb", None), ("stanfordnlp/imdb", None), {}),
    (("trec", None), ("CogComp/trec",),
     {"revision": EXPORT, "data_files": {"train": "*/train/*.parquet"}}),
    (("wiki_hop", "original"), ("QAngaroo/wiki_hop",),
     {"revision": EXPORT, "data_files": {"train": "original/train/*.parquet"}}),
])
def test_hub_loads_use_the_tables_repo_config_and_split(tmp_path, hub_calls, pair, args, kwargs):
  rows = sources.load_rows(*pair, "train", str(tmp_path))
  assert rows["text"] == ["a row"]
  assert hub_calls == [(args, {**kwargs, "split": "train"})]


def test_every_hub_loadable_dataset_is_requested_by_its_table_entry(tmp_path, hub_calls):
  loadable = {pair: source for pair, source in sources.HUB_SOURCES.items() if source.repo}
  for (dataset, subset), source in loadable.items():
    split = source.splits[-1]
    sources.load_rows(dataset, subset, split, str(tmp_path))
    args, kwargs = hub_calls.pop()
    assert kwargs.pop("split") == split
    if source.export:
      assert args == (source.repo,) and kwargs == {
          "revision": EXPORT, "data_files": {split: f"{source.config or '*'}/{split}/*.parquet"}}
    else:
      assert args == (source.repo, source.config) and not kwargs
  assert not hub_calls


def test_a_dataset_outside_the_table_is_loaded_by_its_own_name(hub_calls):
  sources.load_rows("some_org/some_dataset", "a_config", "validation")
  assert hub_calls == [(("some_org/some_dataset", "a_config"), {"split": "validation"})]


def test_a_hub_failure_names_the_repo_and_the_save_to_disk_fix(tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise ConnectionError("Couldn't reach the Hub (OfflineModeIsEnabled)")

  monkeypatch.setattr(datasets, "load_dataset", offline)
  with pytest.raises(sources.DataSourceError) as failure:
    sources.load_rows("social_i_qa", None, "validation", str(tmp_path))
  message = str(failure.value)
  assert "social_i_qa split 'validation'" in message
  assert f"datasets.load_dataset('allenai/social_i_qa', revision='{EXPORT}'" in message
  where = sources.local_path(str(tmp_path), "social_i_qa", None, "validation")
  assert f".save_to_disk({where!r})" in message and "OfflineModeIsEnabled" in message
  with pytest.raises(sources.DataSourceError,
                     match=r"Harvard/gigaword.*\(its parquet export is unconfirmed"):
    sources.load_rows("gigaword", None, "train")


def test_story_cloze_without_a_local_copy_says_where_to_get_it(tmp_path, no_hub):
  where = sources.local_path(str(tmp_path), "story_cloze", "2016", "test")
  with pytest.raises(sources.DataSourceError) as failure:
    sources.load_rows("story_cloze", "2016", "test", str(tmp_path))
  message = str(failure.value)
  for part in ("story_cloze/2016 split 'test'", "manual download",
               "https://cs.rochester.edu/nlp/rocstories/",
               "cloze_test_test__spring2016 - cloze_test_ALL_test.csv", "story_cloze_from_csv",
               where, "DATA_DIR"):
    assert part in message, part
  with pytest.raises(sources.DataSourceError,
                     match=re.escape("story_cloze/2016 split 'validation'")):
    sources.load_rows("story_cloze", "2016", "validation")


def test_check_available_reports_what_cannot_be_read_without_the_network(tmp_path, no_hub):
  requests = [("glue", "mrpc", "train"), ("story_cloze", "2016", "validation"),
              ("story_cloze", "2016", "test"), ("anli", None, "test_r1"), ("anli", None, "test_r1")]
  problems = sources.check_available(requests, str(tmp_path))
  assert [p.split(" cannot")[0] for p in problems] == [
      "story_cloze/2016 split 'validation'", "story_cloze/2016 split 'test'"]
  assert "cloze_test_val__spring2016" in problems[0]
  assert sources.check_available([("story_cloze", "2016", "test")], None)  # no data_dir at all
  (no_such_split,) = sources.check_available([("hellaswag", None, "dev")], None)
  assert ("Rowan/hellaswag has no split 'dev'; its splits are train, validation, test."
          in no_such_split)
  not_a_copy = tmp_path / "imdb" / "train"
  not_a_copy.mkdir(parents=True)
  (not_saved,) = sources.check_available([("imdb", None, "train")], str(tmp_path))
  assert f"{not_a_copy} is not a `Dataset.save_to_disk` copy" in not_saved


def test_every_t0_split_but_story_clozes_is_available_by_name(no_hub):
  requests = [(dataset, subset, "train") for dataset, subset, _ in t0.TRAIN_DATASETS]
  for name in t0.HELDOUT_TASKS:
    task = t0.heldout(name)
    requests += [(task.dataset, task.subset, task.train_split),
                 (task.dataset, task.subset, task.eval_split)]
  problems = sources.check_available(requests, None)
  assert len(problems) == 2 and all(p.startswith("story_cloze/2016") for p in problems)


def test_story_cloze_csv_becomes_a_local_copy_load_rows_reads(tmp_path, no_hub):
  data_dir = str(tmp_path / "data")
  for split in ("validation", "test"):
    csv_path = write_csv(tmp_path / f"{split}.csv", STORIES)
    where = sources.local_path(data_dir, "story_cloze", "2016", split)
    assert len(sources.story_cloze_from_csv(csv_path, where)) == 2
  requests = [("story_cloze", "2016", "validation"), ("story_cloze", "2016", "test")]
  assert sources.check_available(requests, data_dir) == []
  rows = sources.load_rows("story_cloze", "2016", "test", data_dir)
  assert list(rows.features) == list(sources.STORY_CLOZE_COLUMNS.values())
  assert rows.features["answer_right_ending"] == datasets.Value("int32")
  assert all(rows.features[name] == datasets.Value("string") for name in list(rows.features)[:-1])
  assert rows[1] == dict(
      story_id="7cbbc0af-bcce-4f56-871d-963f0bb1e6b3",
      input_sentence_1="Tom had a test, \"a big one\", on Monday.",
      input_sentence_2="He studied all weekend.", input_sentence_3="He barely slept.",
      input_sentence_4="He walked in, tired but ready.", sentence_quiz1="Tom aced the test.",
      sentence_quiz2="Tom forgot to study.", answer_right_ending=1)
  assert [list(row.values()) for row in rows] == [[*s[:-1], int(s[-1])] for s in STORIES]


def test_story_cloze_csv_with_a_byte_order_mark_keeps_its_first_column(tmp_path):
  path = tmp_path / "val.csv"
  path.write_bytes(b"\xef\xbb\xbf" + open(write_csv(path, STORIES[:1]), "rb").read())
  stories = sources.story_cloze_from_csv(str(path), str(tmp_path / "out"))
  assert stories["story_id"] == [STORIES[0][0]] and stories["answer_right_ending"] == [2]


def test_story_cloze_csv_errors_name_the_file_and_the_fix(tmp_path):
  out = str(tmp_path / "out")
  wrong_header = write_csv(tmp_path / "a.csv", STORIES, header=STORY_HEADER[:-1] + ["Answer"])
  with pytest.raises(sources.DataSourceError,
                     match=r"a\.csv is not a StoryCloze CSV: it lacks the columns"
                           r" \['AnswerRightEnding'\]"):
    sources.story_cloze_from_csv(wrong_header, out)
  bad_answer = write_csv(tmp_path / "b.csv", [STORIES[0][:-1] + ["3"]])
  with pytest.raises(sources.DataSourceError,
                     match=r"b\.csv line 2: AnswerRightEnding is '3'; it must be 1 or 2"):
    sources.story_cloze_from_csv(bad_answer, out)
  header_only = write_csv(tmp_path / "c.csv", [])
  with pytest.raises(sources.DataSourceError, match=r"c\.csv has a header but no stories"):
    sources.story_cloze_from_csv(header_only, out)
