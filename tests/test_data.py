"""Prompts, seqio tasks and mixtures, few-shot subsets and the embedded suite."""
import collections
import json

import datasets
import numpy as np
import pytest
import seqio

from tensorpoly_jax.data import choices, embedded, fewshot, prompts, sources, t0, tasks

# Hand-written rows in each dataset's real schema, and what the chosen template must give.
ROWS = {
    ("super_glue", "rte", "GPT-3 style"): (
        dict(premise="The cat sat on the mat.", hypothesis="A cat is sitting.", idx=0, label=0),
        "The cat sat on the mat.\nQuestion: A cat is sitting. True or False?", ("True", "False"), 0),
    ("super_glue", "cb", "GPT-3 style"): (
        dict(premise="It rained all day.", hypothesis="The ground is dry.", idx=0, label=1),
        "It rained all day.\nQuestion: The ground is dry. True, False, or Neither?",
        ("True", "False", "Neither"), 1),
    ("anli", None, "GPT-3 style"): (
        dict(uid="a1", premise="Paris is in France.", hypothesis="Paris is in Italy.", label=2,
             reason=""),
        "Paris is in France.\nQuestion: Paris is in Italy. True, False, or Neither?",
        ("True", "Neither", "False"), 2),
    ("super_glue", "copa", "C1 or C2? premise, so/because…"): (
        dict(premise="The man broke his toe.", choice1="He dropped a hammer on his foot.",
             choice2="He got a hole in his sock.", question="cause", idx=0, label=0),
        '"He dropped a hammer on his foot." or "He got a hole in his sock."? The man broke his toe.'
        "  because", ("He dropped a hammer on his foot.", "He got a hole in his sock."), 0),
    ("hellaswag", None, "Predict ending with hint"): (
        dict(ind=4, activity_label="Removing ice from car", ctx_a="A man is in a car.", ctx_b="he",
             ctx="A man is in a car. he", endings=["drives away.", "eats ice.", "sings.", "sleeps."],
             source_id="x", split="train", split_type="indomain", label="1"),
        "How does this sentence end?\nA man is in a car. he\n\n(a)  drives away.\n\n(b)  eats ice."
        "\n\n(c)  sings.\n\n(d)  sleeps.\n\nHint: the topic of the sentence is Removing ice from car",
        ("drives away.", "eats ice.", "sings.", "sleeps."), 1),
    ("story_cloze", "2016", "Answer Given options"): (
        dict(story_id="s", input_sentence_1="Tom was hungry.", input_sentence_2="He opened the fridge.",
             input_sentence_3="It was empty.", input_sentence_4="He went to the store.",
             sentence_quiz1="He flew to the moon.", sentence_quiz2="He bought food.",
             answer_right_ending=2),
        "Tom was hungry. He opened the fridge. It was empty. He went to the store. What is a possible"
        " continuation for the story given the following options ? - He flew to the moon.\n- He bought"
        " food.", ("He flew to the moon.", "He bought food."), 1),
    ("super_glue", "wsc.fixed", "GPT-3 Style"): (
        dict(text="Mark told Pete lies about himself. Pete should have known better.", span1_index=0,
             span2_index=5, span1_text="Mark", span2_text="himself", idx=0, label=1),
        "Passage: Mark told Pete lies about himself. Pete should have known better. \n\nQuestion: In"
        ' the passage above, does the pronoun "himself" refer to Mark?\n\nAnswer:', ("No", "Yes"), 1),
    ("winogrande", "winogrande_xl", "Replace"): (
        dict(sentence="The trophy does not fit in the suitcase because _ is too big.",
             option1="trophy", option2="suitcase", answer="1"),
        "The trophy does not fit in the suitcase because _ is too big.\nReplace the _ in the above"
        " sentence with the correct option: \n- trophy\n- suitcase", ("trophy", "suitcase"), 0),
    ("super_glue", "wic", "GPT-3-prompt"): (
        dict(word="bank", sentence1="He sat on the river bank.",
             sentence2="She went to the bank to deposit money.", start1=0, start2=0, end1=0, end2=0,
             idx=0, label=0),
        "He sat on the river bank.\nShe went to the bank to deposit money.\nQuestion: Is the word"
        " 'bank' used in the same sense in the two sentences above?", ("No", "Yes"), 0),
    ("glue", "mrpc", "equivalent"): (
        dict(sentence1="The company said profits rose.", sentence2="Profits went up, the company said.",
             label=1, idx=0),
        'Are the following two sentences "equivalent" or "not equivalent"?\nThe company said profits'
        " rose.\nProfits went up, the company said.", ("not equivalent", "equivalent"), 1),
    ("ag_news", None, "classify"): (
        dict(text="Stocks rallied on Wall Street today.", label=2),
        "Stocks rallied on Wall Street today. \nWhat label best describes this news article?",
        ("World politics", "Sports", "Business", "Science and technology"), 2),
    ("imdb", None, "Movie Expressed Sentiment"): (
        dict(text="A wonderful film with great acting.", label=1),
        "A wonderful film with great acting. The sentiment expressed for the movie is",
        ("negative", "positive"), 1),
}


@pytest.mark.parametrize("key", list(ROWS), ids=lambda k: f"{k[0]}/{k[1]}")
def test_promptsource_template_on_a_real_schema_row(key):
  dataset, subset, template = key
  row, inputs, choices, label = ROWS[key]
  row = datasets.Dataset.from_list([row])[0]  # through a datasets.Dataset of the real schema
  prompted = prompts.apply(prompts.dataset_templates(dataset, subset)[template], row)
  assert prompted == prompts.Prompted(inputs, choices[label], choices, label)


def test_heldout_tasks_have_original_task_templates():
  for name in t0.HELDOUT_TASKS:
    spec = t0.heldout(name)
    assert prompts.template_names(spec.dataset, spec.subset, original_task_only=True), name
  assert t0.heldout("anli_r2", anli_eval="dev").eval_split == "dev_r2"
  assert len(t0.TRAIN_DATASETS) == 38


# ---------------------------------------------------------------- T0 tasks over local copies


def save_split(data_dir, dataset, subset, split, rows):
  datasets.Dataset.from_list(rows).save_to_disk(sources.local_path(str(data_dir), dataset, subset, split))


def rte_rows(prefix, n):
  return [dict(premise=f"{prefix} premise number {i}.", hypothesis=f"Hypothesis {i}.", idx=i,
               label=i % 2) for i in range(n)]


@pytest.fixture(scope="module")
def t0_local(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("hf")
  save_split(data_dir, "super_glue", "rte", "train", rte_rows("train", 40))
  save_split(data_dir, "super_glue", "rte", "validation", rte_rows("validation", 12))
  save_split(data_dir, "glue", "mrpc", "train", [
      dict(sentence1=f"Sentence {i}.", sentence2=f"Other {i}.", label=i % 2, idx=i) for i in range(8)])
  save_split(data_dir, "imdb", None, "train", [dict(text=f"Film {i} review.", label=i % 2)
                                               for i in range(6)])
  ids = t0.register_t0(tasks.byte_vocabulary(), str(data_dir),
                       train_datasets=[("glue", "mrpc", 8), ("imdb", None, 6)], heldout_names=["rte"])
  return data_dir, ids


def test_t0_training_mixture_is_one_routing_task_per_template(t0_local):
  _, ids = t0_local
  mrpc = prompts.template_names("glue", "mrpc")
  imdb = prompts.template_names("imdb")
  assert len(ids) == len(mrpc) + len(imdb)
  assert sorted(ids.values()) == list(range(len(ids)))
  assert list(ids) == sorted(ids)  # the map is a pure function of the names: stable across runs
  batch = next(tasks.get_dataset(t0.T0_TRAIN, 64, 16, seed=0).batch(32).as_numpy_iterator())
  assert set(batch["task_id"][:, 0]) <= set(ids.values())
  assert len(set(batch["task_id"][:, 0])) > 3


def source_rows(task_name: str, split: str) -> list[dict]:
  """The prompted rows of a registered task's split, strings decoded."""
  source = tasks.get_task_or_mixture(task_name).source
  decode = lambda v: v.decode() if isinstance(v, bytes) else v
  return [{"inputs": decode(ex["inputs"]), "targets": decode(ex["targets"]),
           "answer_choices": [decode(c) for c in ex["answer_choices"][:int(ex["num_choices"])]],
           "label": int(ex["label"])}
          for ex in source.get_dataset(split=split, shuffle=False).as_numpy_iterator()]


def test_heldout_task_reads_the_eval_split_with_choices(t0_local):
  rows = source_rows("t0__rte", "validation")
  templates = t0.heldout_templates("rte")
  assert len(rows) == 12 * len(templates)  # every example under every template
  assert all(r["answer_choices"][r["label"]] == r["targets"] for r in rows)
  assert any("validation premise number 3." in r["inputs"] for r in rows)


def test_fewshot_subsets_are_deterministic_rows_of_the_pool_and_disjoint_from_eval(t0_local):
  shots = lambda seed: fewshot.fewshot_arrays("t0__rte", 8, seed, 64, 16)
  a, again, other = shots(42), shots(42), shots(1024)
  assert all(np.array_equal(a[key], again[key]) for key in a)
  assert len(np.unique(a["example"])) == 8
  assert not np.array_equal(a["encoder_input_tokens"], other["encoder_input_tokens"])
  pool = choices.choice_arrays("t0__rte", "train", 64, 16)
  index = fewshot.sample_indices(40, 8, 42)
  drawn = np.isin(pool["example"], index)
  for key in a:
    np.testing.assert_array_equal(a[key], pool[key][drawn])
  evaluation = {row.tobytes() for row in
                choices.choice_arrays("t0__rte", "validation", 64, 16)["encoder_input_tokens"]}
  drawn = np.concatenate([a["encoder_input_tokens"], other["encoder_input_tokens"]])
  assert not any(row.tobytes() in evaluation for row in drawn)
  with pytest.raises(ValueError, match=r"few-shot k=41 must be in \[1, 40\]"):
    fewshot.fewshot_arrays("t0__rte", 41, 0, 64, 16)


def test_missing_dataset_names_it_and_the_local_copy(tmp_path):
  with pytest.raises(sources.DataSourceError, match=r"super_glue/cb split 'train'.*save_to_disk"):
    sources.load_rows("super_glue", "cb", "train", str(tmp_path))


def test_a_capped_split_is_a_seeded_sample_not_its_first_rows(tmp_path):
  labels = [0] * 50 + [1] * 50  # sorted by label, as imdb's train split is
  datasets.Dataset.from_dict({"text": [f"review {i}" for i in range(100)], "label": labels}
                             ).save_to_disk(sources.local_path(str(tmp_path), "imdb", None, "train"))
  capped = sources.load_rows("imdb", None, "train", str(tmp_path), limit=10)
  assert len(capped) == 10 and set(capped["label"]) == {0, 1}
  assert capped["text"] == sources.load_rows("imdb", None, "train", str(tmp_path), limit=10)["text"]
  other = sources.load_rows("imdb", None, "train", str(tmp_path), limit=10, seed=1)
  assert other["text"] != capped["text"]
  assert len(sources.load_rows("imdb", None, "train", str(tmp_path), limit=500)) == 100


def test_empty_or_unreadable_datasets_are_errors(tmp_path, monkeypatch):
  corrupt = sources.local_path(str(tmp_path), "imdb", None, "train")
  __import__("os").makedirs(corrupt)
  (tmp_path / "imdb" / "train" / "state.json").write_text("{not json")
  with pytest.raises(sources.DataSourceError, match="local copy of imdb split 'train' at .* cannot be read"):
    sources.load_rows("imdb", None, "train", str(tmp_path))
  monkeypatch.setattr(datasets, "load_dataset",
                      lambda *a, **k: datasets.Dataset.from_dict({"text": [], "label": []}))
  with pytest.raises(sources.DataSourceError, match="imdb split 'test' is empty"):
    sources.load_rows("imdb", None, "test")


# ---------------------------------------------------------------- seqio mixtures and shards


@pytest.fixture(scope="module")
def two_tasks():
  vocab = tasks.byte_vocabulary()
  rows = lambda prefix, n: [dict(inputs=f"{prefix} {i}", targets=f"t{i}", answer_choices=[f"t{i}", "x"],
                                 label=0) for i in range(n)]
  tasks.register_task("test_a", tasks.in_memory(lambda split: rows("a", 60), ["train"], vocab,
                                                task_id=0))
  tasks.register_task("test_b", tasks.in_memory(lambda split: rows("b", 20), ["train"], vocab,
                                                task_id=1))
  tasks.add_mixture("test_ab", [("test_a", 3.0), ("test_b", 1.0)])
  return vocab


def decode_inputs(vocab, batch):
  return [vocab.decode([int(t) for t in row if t > 1]) for row in batch["encoder_input_tokens"]]


def test_mixture_batches_have_model_features_task_ids_and_rates(two_tasks):
  ds = tasks.get_dataset("test_ab", 16, 8, seed=0, num_epochs=None).batch(4000)
  batch = next(ds.as_numpy_iterator())
  assert set(batch) == {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                        "decoder_loss_weights", "task_id"}
  assert batch["encoder_input_tokens"].shape == (4000, 16)
  np.testing.assert_array_equal(batch["decoder_loss_weights"], batch["decoder_target_tokens"] > 0)
  share_a = np.mean(batch["task_id"][:, 0] == 0)
  assert abs(share_a - 0.75) < 0.03  # the 3:1 rates set above
  inputs = decode_inputs(two_tasks, batch)
  assert all(text.startswith("a") == (tid == 0) for text, tid in zip(inputs, batch["task_id"][:, 0]))


@pytest.mark.parametrize("task", ["test_a", "test_b"])
def test_shards_are_disjoint_and_complete(two_tasks, task):
  def examples(shard_info):
    ds = tasks.get_dataset(task, 16, 8, shuffle=False, shard_info=shard_info).batch(1000)
    return decode_inputs(two_tasks, next(ds.as_numpy_iterator()))

  full = examples(None)
  shards = [examples(seqio.ShardInfo(i, 2)) for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(full)


def test_mixture_shards_draw_only_from_their_task_shards(two_tasks):
  def inputs(name, shard):
    ds = tasks.get_dataset(name, 16, 8, shuffle=False, shard_info=seqio.ShardInfo(shard, 2))
    return set(decode_inputs(two_tasks, next(ds.batch(1000).as_numpy_iterator())))

  for shard in range(2):
    assert inputs("test_ab", shard) <= inputs("test_a", shard) | inputs("test_b", shard)
  assert not inputs("test_ab", 0) & inputs("test_ab", 1)


def test_cached_tokenization_leaves_the_mixture_stream_unchanged(two_tasks):
  """Our tasks cache their tokenized rows before seqio repeats and shuffles them: the same
  examples in the same order as a plain seqio task over the same source (several epochs fit in
  seqio's shuffle buffer of 1000)."""
  plain = ["test_a_plain", "test_b_plain"]
  for name, cached_name in zip(plain, ("test_a", "test_b")):
    seqio.TaskRegistry.add(name, tasks.examples_source(tasks.task_info(cached_name)),
                           output_features=tasks.output_features(two_tasks),
                           preprocessors=[seqio.preprocessors.tokenize,
                                          seqio.preprocessors.append_eos])
  assert not seqio.get_mixture_or_task(plain[0]).supports_caching
  tasks.add_mixture("test_ab_plain", [(plain[0], 3.0), (plain[1], 1.0)])
  stream = lambda name: next(tasks.get_dataset(name, 16, 8, seed=3, num_epochs=None)
                             .batch(3000).as_numpy_iterator())
  cached, uncached = stream("test_ab"), stream("test_ab_plain")
  assert cached.keys() == uncached.keys()
  for key in cached:
    np.testing.assert_array_equal(cached[key], uncached[key], err_msg=key)


def test_a_users_task_that_branches_on_tensors_keeps_autograph_in_a_mixture_with_ours(two_tasks):
  """Our tasks' maps are traced without AutoGraph; a user's preprocessor with a Python ``if`` on a
  tensor needs it, and gets it, also in a mixture with our tasks."""
  import tensorflow as tf

  @seqio.map_over_dataset
  def mark_long_inputs(ex):
    if tf.size(ex["inputs"]) > 3:  # AutoGraph turns this into a tf.cond
      return {**ex, "targets": ex["targets"][:1]}
    return ex

  seqio.TaskRegistry.add("test_branching", tasks.examples_source(tasks.task_info("test_b")),
                         output_features=tasks.output_features(two_tasks),
                         preprocessors=[seqio.preprocessors.tokenize, mark_long_inputs,
                                        seqio.preprocessors.append_eos])
  tasks.add_mixture("test_a_branching", [("test_a", 1.0), ("test_branching", 1.0)])
  batch = next(tasks.get_dataset("test_a_branching", 16, 8, seed=0).batch(80).as_numpy_iterator())
  assert set(batch["task_id"][:, 0]) == {0, 1}
  with pytest.raises(tf.errors.OperatorNotAllowedInGraphError):  # the branch needs AutoGraph
    with tasks._autograph_for(seqio.get_mixture_or_task("test_a")):
      seqio.get_mixture_or_task("test_branching").get_dataset({"inputs": 16, "targets": 8})


def test_unknown_name_lists_close_names(two_tasks):
  with pytest.raises(ValueError, match=r"unknown seqio task or mixture 'test_aa'.*'test_a'"):
    tasks.get_task_or_mixture("test_aa")


# ---------------------------------------------------------------- the embedded mini-T0 suite


def test_embedded_suite_is_deterministic():
  small = embedded.Sizes(20, 5, 10, 10)
  first = json.dumps(embedded.generate(3, small)).encode()
  assert first == json.dumps(embedded.generate(3, small)).encode()
  assert first != json.dumps(embedded.generate(4, small)).encode()


def test_embedded_suite_shape_and_compositions():
  assert len(embedded.SKILLS) >= 8
  assert len(embedded.TRAIN_TASKS) >= 12 and len(embedded.HELDOUT_TASKS) >= 4
  assert len(embedded.TEMPLATES) >= 3
  train_sets = {frozenset(s) for s in embedded.TRAIN_TASKS.values()}
  trained = {s for skills in embedded.TRAIN_TASKS.values() for s in skills}
  for skills in embedded.HELDOUT_TASKS.values():
    assert frozenset(skills) not in train_sets
    assert set(skills) <= trained
  suite = embedded.generate(0, embedded.Sizes(30, 5, 10, 10))
  counts = collections.Counter()
  for task, splits in suite.items():
    for row in splits["train"] + splits["validation"]:
      assert 2 <= len(row["answer_choices"]) <= 4
      assert len(set(row["answer_choices"])) == len(row["answer_choices"])
      assert row["answer_choices"][row["label"]] == row["targets"]
      assert task in row["inputs"]
      counts[task, row["template"]] += 1
  assert all(counts[t, k] for t in embedded.TRAIN_TASKS for k in range(len(embedded.TEMPLATES)))


def test_heldout_tasks_have_a_test_split_that_leaves_the_others_unchanged():
  without = embedded.generate(0, embedded.Sizes(10, 2, 12, 8, 0))
  suite = embedded.generate(0, embedded.Sizes(10, 2, 12, 8, 9))
  for task, splits in suite.items():
    heldout = task in embedded.EVALUATED_TASKS
    assert tuple(splits) == (embedded.HELDOUT_SPLITS if heldout else embedded.TRAIN_SPLITS)
    assert all(splits[s] == without[task][s] for s in embedded.TRAIN_SPLITS)
    if heldout:
      assert len(splits["test"]) == 9 and without[task]["test"] == []
      seen = {row["inputs"] for s in embedded.TRAIN_SPLITS for row in splits[s]}
      # Five random digits: a test example may repeat an earlier one by chance, rarely.
      assert sum(row["inputs"] in seen for row in splits["test"]) <= 1


def test_embedded_answers_compute_the_skills():
  row = embedded.make_example("rowan", 0, np.random.default_rng(0))
  digits = np.array([int(d) for d in row["inputs"].split(":")[1].split("->")[0].split()])
  assert row["targets"] == f"max={digits.max()} evens={(digits % 2 == 0).sum()}"


def test_three_skill_suite_composes_untrained_pairs_and_leaves_the_first_suite_unchanged(
    monkeypatch):
  train_pairs = {frozenset(s) for s in embedded.TRAIN_TASKS.values()}
  for task, skills in embedded.THREE_SKILL_TASKS.items():
    assert len(set(skills)) == 3 and task not in {**embedded.TRAIN_TASKS, **embedded.HELDOUT_TASKS}
    assert not any(frozenset((a, b)) in train_pairs for a in skills for b in skills if a != b)
  small = embedded.Sizes(6, 2, 12, 4, 4)
  suite = embedded.generate(0, small)
  reference = {"first": lambda d: d[0], "second": lambda d: d[1], "third": lambda d: d[2],
               "last": lambda d: d[-1], "max": np.max, "min": np.min,
               "evens": lambda d: int((d % 2 == 0).sum()), "bigs": lambda d: int((d > 4).sum())}
  for task in embedded.THREE_SKILL_TASKS:
    for row in suite[task]["test"]:
      digits = np.array([int(c) for c in row["inputs"].split(task)[1] if c.isdigit()])
      fields = dict(field.split("=") for field in row["targets"].split())
      assert len(fields) == 3 and len(row["answer_choices"]) == 4
      assert all(int(value) == reference[name](digits) for name, value in fields.items())
  first_suite = {t: v for t, v in suite.items() if t not in embedded.THREE_SKILL_TASKS}
  monkeypatch.setattr(embedded, "THREE_SKILL_TASKS", {})
  monkeypatch.setattr(embedded, "EVALUATED_TASKS", dict(embedded.HELDOUT_TASKS))
  assert embedded.generate(0, small) == first_suite


def test_embedded_registration_ids_and_heldout(two_tasks):
  ids = tasks.register_embedded(0, embedded.Sizes(10, 2, 20, 8))
  assert len(ids) == len(embedded.TRAIN_TASKS) * len(embedded.TEMPLATES)
  assert tasks.mixture_task_names(tasks.EMBEDDED_HELDOUT) == sorted(
      tasks.embedded_heldout_task(t) for t in embedded.HELDOUT_TASKS)
  assert tasks.mixture_task_names(tasks.EMBEDDED_THREE_SKILL) == sorted(
      tasks.embedded_heldout_task(t) for t in embedded.THREE_SKILL_TASKS)
  rows = source_rows(tasks.embedded_heldout_task("yew"), "validation")
  assert len(rows) == 8 and all("yew" in r["inputs"] for r in rows)


def test_data_check_warns_of_answer_choices_past_the_targets_length(two_tasks):
  from tensorpoly_jax.data import check

  tasks.register_embedded(0, embedded.Sizes(10, 2, 40, 8, 8))  # a pool for the suite's k=32
  name = tasks.embedded_heldout_task("hemlock")  # "second=2 last=6 evens=5": 24 tokens with EOS
  longest = max(len(choice) + 1 for split in ("train", "validation", "test")
                for row in source_rows(name, split) for choice in row["answer_choices"])
  cut = check.report_task(name, heldout=True, targets_length=longest - 1)
  assert len(cut.warnings) == 1 and f"longest {longest} with EOS" in cut.warnings[0]
  assert not cut.problems and "WARNING" in check.format_report(cut, verbose=True)
  assert check.report_task(name, heldout=True, targets_length=longest).warnings == ()
