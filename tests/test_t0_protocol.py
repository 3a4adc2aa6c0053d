"""T-Few's protocol on the T0 path, over local copies in the real schemas: per-task k, COPA's 8
templates, a template drawn per example (per step in training, per (example, seed) in evaluation),
EOS on inputs, t-zero's <NO LABEL> targets, seeded randomized prompts, and the split rule."""
import itertools

import datasets
import numpy as np
import pytest

from tensorpoly_jax import commands
from tensorpoly_jax.data import batches, choices, fewshot, prompts, sources, t0, tasks

VOCABULARY = tasks.byte_vocabulary()


def save_split(data_dir, dataset, subset, split, rows):
  datasets.Dataset.from_list(rows).save_to_disk(sources.local_path(str(data_dir), dataset, subset,
                                                                  split))


def rte_rows(prefix, n):
  return [dict(premise=f"{prefix} premise {i}.", hypothesis=f"Hypothesis {i}.", idx=i, label=i % 2)
          for i in range(n)]


def copa_rows(n):
  return [dict(premise=f"Premise {i}.", choice1=f"First {i}.", choice2=f"Second {i}.",
               question=("cause", "effect")[i % 2], idx=i, label=i % 2) for i in range(n)]


def hellaswag_rows(n):
  return [dict(ind=i, activity_label=f"Activity {i}", ctx_a=f"A person does {i}.", ctx_b="they",
               ctx=f"A person does {i}. they", endings=[f"end {i} {j}." for j in range(4)],
               source_id=f"s{i}", split="train", split_type="indomain", label=str(i % 4))
          for i in range(n)]


def register(data_dir, **protocol):
  return t0.register_t0(VOCABULARY, str(data_dir), train_datasets=[("samsum", None, 8)],
                        heldout_names=["rte", "copa", "hellaswag"],
                        protocol=t0.Protocol(**protocol))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  save_split(root, "super_glue", "rte", "train", rte_rows("train", 40))
  save_split(root, "super_glue", "rte", "validation", rte_rows("validation", 12))
  save_split(root, "super_glue", "copa", "train", copa_rows(40))
  save_split(root, "super_glue", "copa", "validation", copa_rows(10))
  save_split(root, "hellaswag", None, "train", hellaswag_rows(24))
  save_split(root, "hellaswag", None, "validation", hellaswag_rows(8))
  # One dialogue without a summary: the summarizing templates render its target empty.
  save_split(root, "samsum", None, "train", [
      dict(id=str(i), dialogue=f"A: hello {i}\nB: hi", summary=f"They greet {i}." if i else "")
      for i in range(8)])
  return root


@pytest.fixture
def t0_tasks(data_dir):
  register(data_dir)
  return data_dir


def test_each_task_has_t_fews_k_unless_a_run_sets_one(t0_tasks):
  assert {name: fewshot.num_shots(t0.heldout_task(name), None)
          for name in ("rte", "copa", "hellaswag")} == {"rte": 32, "copa": 32, "hellaswag": 20}
  assert {name: spec.k for name, spec in t0.HELDOUT_TASKS.items()} == {
      "rte": 32, "cb": 32, "copa": 32, "wic": 32, "wsc": 32, "winogrande": 50, "hellaswag": 20,
      "story_cloze": 70, "anli_r1": 50, "anli_r2": 50, "anli_r3": 50}
  assert fewshot.num_shots("t0__hellaswag", 8) == 8
  assert len(fewshot.fewshot_arrays("t0__hellaswag", 20, 0, 96, 16)["example"]) == 20 * 4
  assert commands.check_heldout("t0_heldout", None) == ["t0__copa", "t0__hellaswag", "t0__rte"]
  with pytest.raises(ValueError, match=r"few-shot k=41 must be in \[1, 40\]"):
    commands.check_heldout(["t0__rte"], 41)


def test_copa_keeps_t_fews_8_templates_which_render_every_row(t0_tasks, data_dir):
  originals = prompts.template_names("super_glue", "copa", original_task_only=True)
  assert len(originals) == 12 and t0.heldout_templates("copa") == originals[:8]
  read = tasks.task_info("t0__copa").read("validation", None)
  assert len(read.rows) == 10 * 8 and read.dropped == {}
  register(data_dir, all_copa_templates=True)
  read = tasks.task_info("t0__copa").read("validation", None)
  # The other 4 render for one question type each: half the rows.
  assert len(read.rows) == 10 * 8 + 10 * 4 // 2
  assert sum(read.dropped.values()) == 10 * 4 // 2


def test_fewshot_training_draws_a_template_per_example_per_step(t0_tasks):
  arrays = fewshot.fewshot_arrays("t0__rte", 8, 42, 96, 16)
  assert len(np.unique(arrays["example"])) == 8 and len(arrays["example"]) == 8 * 10
  stream = lambda start: batches.choice_batches(arrays, 4, seed=42, start_step=start, task_id=3)
  first = list(itertools.islice(stream(0), 40))
  seen = {}
  for batch in first:
    for row in batch["encoder_input_tokens"]:
      index = np.flatnonzero((arrays["encoder_input_tokens"] == row).all(-1))[0]
      seen.setdefault(arrays["example"][index], set()).add(arrays["template"][index])
  assert len(seen) == 8 and all(len(templates) > 1 for templates in seen.values())
  resumed = list(itertools.islice(stream(25), 15))
  for a, b in zip(first[25:], resumed):
    assert all(np.array_equal(a[key], b[key]) for key in a)


def test_evaluation_draws_one_template_per_example_and_seed(t0_tasks):
  by_seed = {seed: choices.evaluation_arrays("t0__rte", "validation", 96, 16, seed)
             for seed in (0, 1)}
  for arrays in by_seed.values():
    assert arrays["example"].tolist() == list(range(12))
  again = choices.evaluation_arrays("t0__rte", "validation", 96, 16, 0)
  assert np.array_equal(again["template"], by_seed[0]["template"])
  assert not np.array_equal(by_seed[0]["template"], by_seed[1]["template"])
  assert len(set(by_seed[0]["template"].tolist())) > 2


def test_inputs_end_with_eos_as_in_t_few_unless_switched_off(t0_tasks, data_dir):
  def last_tokens():
    tokens = choices.choice_arrays("t0__rte", "validation", 512, 16)["encoder_input_tokens"]
    return [row[row > 0][-1] for row in tokens]

  assert set(last_tokens()) == {choices.EOS_ID}
  register(data_dir, inputs_eos=False)
  assert choices.EOS_ID not in last_tokens()


def test_training_rows_with_an_empty_target_are_no_label_as_t_zero(t0_tasks, data_dir):
  name = prompts.task_name("samsum", None, "Summarize:")
  rows = tasks.task_info(name).read("train", None)
  assert len(rows.rows) == 8 and rows.dropped == {}
  assert [row["targets"] for row in rows.rows if row["example"] == 0] == [prompts.NO_LABEL]
  register(data_dir, no_label_targets=False)
  rows = tasks.task_info(name).read("train", None)
  assert len(rows.rows) == 7 and rows.dropped == {"template 'Summarize:' renders nothing": 1}


def test_hellaswag_randomized_prompt_is_seeded():
  template = prompts.dataset_templates("hellaswag")["Randomized prompts template"]
  row = datasets.Dataset.from_list(hellaswag_rows(1))[0]
  assert prompts.apply(template, row, seed=3) == prompts.apply(template, row, seed=3)
  assert len({prompts.apply(template, row, seed=s).inputs for s in range(20)}) > 1


def test_a_sweep_on_a_suite_with_no_selection_split_refuses_before_any_work(tmp_path):
  from tensorpoly_jax import cli

  cli.parse_gin(["adapters/lora.gin", "runs/data_t0.gin", "runs/sweep.gin"],
                ["--gin.VOCABULARY_DIR='unused'", "--gin.BACKBONE_DIR='missing'"], str(tmp_path))
  try:
    with pytest.raises(ValueError, match="no split to choose settings on"):
      cli.CONFIGURED["pipeline_run"]()
  finally:
    import gin

    gin.clear_config()
  assert list(tmp_path.iterdir()) == []
