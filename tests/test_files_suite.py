"""The files suite (a user's own JSONL / CSV tasks, no Python) and the TASK_MODULE hook."""
import json

import numpy as np
import pytest
import seqio

from tensorpoly_jax import checkpoints, cli, commands
from tensorpoly_jax.data import choices, fewshot, files, tasks

WORDS = ("oak", "elm", "fir", "ash", "yew", "bay", "box", "gum", "tea", "fig", "nut", "ivy")
TRAIN = {  # three training tasks, each a different map of a word
    "copy": lambda w: (f"copy: {w}", w),
    "upper": lambda w: (f"upper: {w}", w.upper()),
    "reverse": lambda w: (f"reverse: {w}", w[::-1]),
}
MANIFEST = {"train": ["upper", {"name": "copy", "rate": 2.0}, "reverse"],
            "heldout": [{"name": "vowel", "num_shots": 4}]}


def vowel_rows(words):
  """The held-out task: does the word start with a vowel (half the rows give ``label``)."""
  rows = []
  for index, word in enumerate(words):
    answer = "yes" if word[0] in "aeiou" else "no"
    row = {"inputs": f"vowel first? {word}", "targets": answer, "choices": ["yes", "no"]}
    rows.append({**row, "label": ["yes", "no"].index(answer)} if index % 2 else row)
  return rows


def write_jsonl(path, rows) -> None:
  """Rows as JSON lines; a str row is written as it is (a broken line)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
  path.write_text("".join(line + "\n" for line in lines))


@pytest.fixture
def suite_dir(tmp_path):
  """Three JSONL training tasks and one held-out task with train / validation / test splits."""
  root = tmp_path / "suite"
  for name, make in TRAIN.items():
    write_jsonl(root / name / "train.jsonl",
                [dict(zip(("inputs", "targets"), make(w))) for w in WORDS])
  for split, words in (("train", WORDS), ("validation", WORDS[:6]), ("test", WORDS[6:])):
    write_jsonl(root / "vowel" / f"{split}.jsonl", vowel_rows(words))
  (root / "manifest.json").write_text(json.dumps(MANIFEST))
  return root


def test_tasks_routing_ids_and_mixtures(suite_dir):
  ids = files.register_files(str(suite_dir))
  assert ids == {"copy": 0, "reverse": 1, "upper": 2}  # sorted training task names
  assert tasks.mixture_task_names(files.FILES_TRAIN) == ["copy", "reverse", "upper"]
  assert tasks.mixture_task_names(files.FILES_HELDOUT) == ["vowel"]
  rates = {task.name: rate for task, rate in zip(*_mixture(files.FILES_TRAIN))}
  assert rates == {"upper": 1.0, "copy": 2.0, "reverse": 1.0}
  assert [tasks.task_info(name).task_id for name in ids] == [0, 1, 2]
  info = tasks.task_info("vowel")
  assert (info.task_id, info.num_shots, info.splits) == (
      tasks.NO_TASK_ID, 4, ("test", "train", "validation"))
  test_rows = info.read("test", None).rows
  assert [(r["example"], r["template"], r["label"]) for r in test_rows[:3]] == [
      (0, 0, 1), (1, 0, 1), (2, 0, 1)]  # box, gum, tea: label found from targets, given, found
  assert tasks.task_info("copy").read("train", [2]).rows == [
      {"inputs": "copy: fir", "targets": "fir", "answer_choices": [], "label": -1, "template": 0,
       "example": 2}]
  batch = next(tasks.get_dataset(files.FILES_TRAIN, 16, 8, seed=0).as_numpy_iterator())
  assert batch["task_id"].tolist() in ([0], [1], [2])
  with pytest.raises(ValueError, match=r"no 'validation' split \(it has \['train'\]\): add"
                     r" copy/validation.jsonl"):
    tasks.task_info("copy").read("validation", None)


def _mixture(name):
  mixture = seqio.get_mixture_or_task(name)
  return mixture.tasks, [mixture.get_rate(task) for task in mixture.tasks]


def test_fewshot_draws_and_rank_classification_read_a_files_task(suite_dir):
  files.register_files(str(suite_dir))
  shots = fewshot.fewshot_arrays("vowel", fewshot.num_shots("vowel", None), 0, 32, 8)
  assert shots["encoder_input_tokens"].shape == (4, 32)
  assert shots["choice_tokens"].shape == (4, 2, 8)
  arrays = choices.choice_arrays("vowel", "validation", 32, 8)
  assert arrays["example"].tolist() == list(range(6))
  assert arrays["label"].tolist() == [0 if w[0] in "aeiou" else 1 for w in WORDS[:6]]
  yes = tasks.byte_vocabulary().encode("yes") + [choices.EOS_ID]
  assert arrays["choice_tokens"][0, 0, :4].tolist() == yes
  assert np.all(arrays["num_choices"] == 2)


def test_csv_splits_read_like_jsonl(suite_dir):
  (suite_dir / "vowel" / "test.jsonl").unlink()
  (suite_dir / "vowel" / "test.csv").write_text(
      'inputs,targets,choices,label\n"vowel first? oak",yes,"[""yes"", ""no""]",\n'
      '"vowel first? elm, twice",no,"[""yes"", ""no""]",1\n')
  files.register_files(str(suite_dir))
  rows = tasks.task_info("vowel").read("test", None).rows
  assert [(r["inputs"], r["answer_choices"], r["label"]) for r in rows] == [
      ("vowel first? oak", ["yes", "no"], 0), ("vowel first? elm, twice", ["yes", "no"], 1)]
  (suite_dir / "csv_only").mkdir()
  (suite_dir / "csv_only" / "train.csv").write_text("inputs,targets,choices\na,yes,yes|no\n")
  (suite_dir / "manifest.json").write_text(json.dumps({**MANIFEST, "train": ["csv_only"]}))
  with pytest.raises(ValueError, match=r"csv_only/train.csv:2: field 'choices' must be a non-empty"
                     r" list of strings \(CSV: a JSON list in the cell"):
    files.register_files(str(suite_dir))
  assert "csv_only" not in seqio.TaskRegistry.names()  # a problem anywhere registers nothing


BAD_ROWS = {  # (task, split, rows) -> the problem the error names
    "missing field": (("copy", "train", [{"inputs": "a"}]),
                      r"copy/train.jsonl:1: missing field\(s\) \['targets'\]"),
    "wrong type": (("copy", "train", [{"inputs": "a", "targets": 3}]),
                   r"copy/train.jsonl:1: field 'targets' must be a string, got 3"),
    "not JSON": (("copy", "train", [{"inputs": "a", "targets": "b"}, "{inputs: a}"]),
                 r"copy/train.jsonl:2: not JSON"),
    "empty split": (("vowel", "validation", []), r"vowel/validation.jsonl: no rows"),
    "label without choices": (("copy", "train", [{"inputs": "a", "targets": "b", "label": 0}]),
                              r"copy/train.jsonl:1: field 'label' \(0\) indexes 'choices', which"),
    "no choices": (("vowel", "train", [{"inputs": "a", "targets": "yes"}]),
                   r"vowel/train.jsonl:1: missing field\(s\) \['choices'\] \(a held-out row"),
    "label out of range": (
        ("vowel", "test", [{"inputs": "a", "targets": "no", "choices": ["yes", "no"], "label": 2}]),
        r"vowel/test.jsonl:1: field 'label' 2 must be an integer index into its 2 choices"),
    "label disagrees": (
        ("vowel", "test", [{"inputs": "a", "targets": "no", "choices": ["yes", "no"], "label": 0}]),
        r"label 0 names choice 'yes' but targets is 'no'"),
    "target not a choice": (
        ("vowel", "test", [{"inputs": "a", "targets": "maybe", "choices": ["yes", "no"]}]),
        r"vowel/test.jsonl:1: targets 'maybe' is not among choices \['yes', 'no'\]"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_row_that_cannot_be_used_names_its_file_line_and_field(suite_dir, case):
  (task, split, rows), message = BAD_ROWS[case]
  write_jsonl(suite_dir / task / f"{split}.jsonl", rows)
  with pytest.raises(ValueError, match=rf"problem\(s\), nothing registered:\n .*{message}"):
    files.register_files(str(suite_dir))


MANIFEST_PROBLEMS = {
    "duplicate": ({"train": ["copy", "copy"], "heldout": ["vowel"]},
                  r"task 'copy' is listed twice in 'train'"),
    "both roles": ({"train": ["copy", "vowel"], "heldout": ["vowel"]},
                   r"task 'vowel' is both a training and a held-out task"),
    "unknown option": ({"train": [{"name": "copy", "num_shots": 4}], "heldout": ["vowel"]},
                       r"train\[0\]: .* is not a task name or an object with keys"
                       r" \('name', 'rate'\)"),
    "bad rate": ({"train": [{"name": "copy", "rate": 0}], "heldout": ["vowel"]},
                 r"rate 0 must be a positive number"),
    "no folder": ({"train": ["copy", "missing"], "heldout": ["vowel"]},
                  r"suite/missing: no such folder"),
    "no held-out": ({"train": ["copy"]}, r"needs exactly the keys 'train' and 'heldout'"),
}


@pytest.mark.parametrize("case", MANIFEST_PROBLEMS)
def test_manifest_problems_are_named(suite_dir, case):
  manifest, message = MANIFEST_PROBLEMS[case]
  (suite_dir / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match=message):
    files.register_files(str(suite_dir))


def test_heldout_splits_and_a_missing_manifest_say_what_is_needed(suite_dir):
  (suite_dir / "vowel" / "train.jsonl").unlink()
  for split in ("validation", "test"):
    (suite_dir / "vowel" / f"{split}.jsonl").rename(suite_dir / "vowel" / f"{split}.txt")
  with pytest.raises(ValueError, match=r"2 problem\(s\)[^$]*no train split \(its few-shot pool\)"
                     r"[^$]*no evaluation split: a held-out task is evaluated on validation.jsonl"):
    files.register_files(str(suite_dir))
  (suite_dir / "manifest.json").unlink()
  with pytest.raises(ValueError, match=r"no manifest at .*manifest.json. Write one .* Task folders"
                     r" found in .*: \['copy', 'reverse', 'upper', 'vowel'\]"):
    files.register_files(str(suite_dir))
  with pytest.raises(ValueError, match="suite='files' needs DATA_DIR"):
    commands.data_setup("files")


def test_task_module_registers_a_users_own_tasks(suite_dir, tmp_path, monkeypatch):
  for name in ("my_tasks", "named_tasks"):  # one imported by its path, one by its module name
    (tmp_path / f"{name}.py").write_text(
        "from tensorpoly_jax.data import tasks\n"
        "rows = [{'inputs': 'x?', 'targets': 'a', 'answer_choices': ['a', 'b'], 'label': 0}]\n"
        f"tasks.register_task('{name}_task', tasks.in_memory(lambda split: rows, ['train'],\n"
        "                                                    tasks.byte_vocabulary()))\n")
  commands.data_setup("files", data_dir=str(suite_dir), task_module=str(tmp_path / "my_tasks.py"))
  assert tasks.task_info("my_tasks_task").read("train", None).rows[0]["targets"] == "a"
  assert "vowel" in tasks.mixture_task_names(files.FILES_HELDOUT)  # the suite is registered too
  monkeypatch.syspath_prepend(str(tmp_path))
  files.import_task_module("named_tasks")
  assert tasks.task_info("named_tasks_task").num_examples("train") == 1
  with pytest.raises(ValueError, match=r"TASK_MODULE='no_such_tasks': no module 'no_such_tasks'"):
    files.import_task_module("no_such_tasks")
  with pytest.raises(ValueError, match=r"TASK_MODULE='.*missing.py': no such file"):
    commands.data_setup("files", data_dir=str(suite_dir), task_module=str(tmp_path / "missing.py"))
  (tmp_path / "broken_tasks.py").write_text("import not_installed_dependency\n")
  with pytest.raises(ModuleNotFoundError, match="not_installed_dependency"):  # not masked
    files.import_task_module("broken_tasks")


@pytest.mark.slow
def test_train_adapt_eval_commands_on_a_files_suite(suite_dir, tiny_backbone_dir, tmp_path):
  """The acceptance run: 3 JSONL training tasks and 1 held-out task, through the CLI."""
  data = ["--gin_file=runs/data_files.gin", f"--gin.DATA_DIR='{suite_dir}'",
          "--gin.INPUTS_LENGTH=48", "--gin.TARGETS_LENGTH=24"]
  assert cli.main(["data", *data]) == 0
  common = [*data, f"--model_dir={tmp_path}", f"--gin.BACKBONE_DIR='{tiny_backbone_dir}'"]
  assert cli.main(["train", "--gin_file=adapters/lora.gin", "--gin_file=runs/pretrain.gin",
                   *common, "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8"]) == 0
  meta = json.loads((tmp_path / "adapter" / checkpoints.ADAPTER_META).read_text())
  assert meta["routing_ids"] == {"copy": 0, "reverse": 1, "upper": 2}
  assert cli.main(["adapt", "--gin_file=runs/adapt.gin", *common, "--gin.ADAPT_STEPS=2",
                   f"--gin.ADAPTER_DIR='{tmp_path / 'adapter'}'", "--gin.SEEDS=(0,)",
                   "--gin.BATCH_SIZE=8"]) == 0
  adapted = json.loads((tmp_path / "adapt_results.json").read_text())
  assert (adapted["split"], adapted["shots"]) == ("test", {"vowel": 4})  # REPORT_SPLIT, manifest k
  assert 0 <= adapted["accuracy"]["vowel"]["0"] <= 1
  assert cli.main(["eval", "--gin_file=runs/eval.gin", *common, "--gin.EVAL_SPLIT=%SELECTION_SPLIT",
                   f"--gin.ADAPTER_DIR='{tmp_path / 'adapt' / 'vowel_seed0' / 'adapter'}'"]) == 0
  evaluated = json.loads((tmp_path / "eval_results.json").read_text())
  assert evaluated["split"] == "validation" and 0 <= evaluated["accuracy"]["vowel"] <= 1
