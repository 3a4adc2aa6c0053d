"""The T0 fixtures (tests/t0_fixtures.py) are in the real datasets' schemas, and every template the
project uses renders their rows."""
import functools

import datasets
import pytest

from tensorpoly_jax.data import prompts, sources, t0
from tests import t0_fixtures

# Each dataset's columns as its loading script declares them (huggingface/datasets,
# datasets/<name>/<name>.py; TREC in its 2.0.0 version), written as `describe` prints them: a
# name alone is a string, `:int32` another dtype, `:label` a ClassLabel, `[...]` a list, `{...}` a
# dict (a Sequence of dicts is a dict of lists).
SCHEMAS = {
    ("glue", "mrpc"): "sentence1 sentence2 label:label idx:int32",
    ("glue", "qqp"): "question1 question2 label:label idx:int32",
    ("paws", "labeled_final"): "id:int32 sentence1 sentence2 label:label",
    ("kilt_tasks", "hotpotqa"):
        "id input meta{left_context mention right_context"
        " partial_evidence[{start_paragraph_id:int32 end_paragraph_id:int32 title section"
        " wikipedia_id meta{evidence_span[]}}] obj_surface[] sub_surface[] subj_aliases[]"
        " template_questions[]} output[{answer meta{score:int32}"
        " provenance[{bleu_score:float32 start_character:int32 start_paragraph_id:int32"
        " end_character:int32 end_paragraph_id:int32 meta{fever_page_id fever_sentence_id:int32"
        " annotation_id yes_no_answer evidence_span[]} section title wikipedia_id}]}]",
    ("wiki_qa", None): "question_id question document_title answer label:label",
    **{("adversarial_qa", subset): "id title context question answers{text[] answer_start[:int32]}"
                                   " metadata{split model_in_the_loop}"
       for subset in ("dbidaf", "dbert", "droberta")},
    **{("duorc", subset): "plot_id plot title question_id question answers[] no_answer:bool"
       for subset in ("SelfRC", "ParaphraseRC")},
    ("ropes", None): "id background situation question answers{text[]}",
    ("quoref", None): "id question context title url answers{answer_start[:int32] text[]}",
    ("cos_e", "v1.11"):
        "id question choices[] answer abstractive_explanation extractive_explanation",
    ("cosmos_qa", None): "id context question answer0 answer1 answer2 answer3 label:int32",
    ("dream", None): "id:int32 dialogue_id dialogue[] question choice[] answer",
    ("qasc", None): "id question choices{text[] label[]} answerKey fact1 fact2 combinedfact"
                    " formatted_question",
    ("quail", None): "id context_id question_id domain metadata{author title url} context question"
                     " question_type answers[] correct_answer_id:int32",
    ("quarel", None): "id answer_index:int32 logical_forms[] logical_form_pretty"
                      " world_literals{world1[] world2[]} question",
    ("quartz", None): "id question choices{text[] label[]} answerKey para para_id"
                      " para_anno{effect_prop cause_dir_str effect_dir_str cause_dir_sign"
                      " effect_dir_sign cause_prop} question_anno{more_effect_dir less_effect_dir"
                      " less_cause_prop more_effect_prop less_effect_prop less_cause_dir}",
    ("sciq", None): "question distractor3 distractor1 distractor2 correct_answer support",
    ("social_i_qa", None): "context question answerA answerB answerC label",
    ("wiki_hop", "original"): "id question answer candidates[] supports[] annotations[[]]",
    ("wiqa", None): "question_stem question_para_step[] answer_label answer_label_as_choice"
                    " choices{text[] label[]} metadata_question_id metadata_graph_id"
                    " metadata_para_id metadata_question_type metadata_path_len:int32",
    ("amazon_polarity", None): "label:label title content",
    ("app_reviews", None): "package_name review date star:int8",
    ("imdb", None): "text label:label",
    ("rotten_tomatoes", None): "text label:label",
    ("yelp_review_full", None): "label:label text",
    ("common_gen", None): "concept_set_idx:int32 concepts[] target",
    ("wiki_bio", None):
        "input_text{table{column_header[] row_number[:int16] content[]} context} target_text",
    ("cnn_dailymail", "3.0.0"): "article highlights id",
    ("gigaword", None): "document summary",
    ("multi_news", None): "document summary",
    ("samsum", None): "id dialogue summary",
    ("xsum", None): "document summary id",
    ("ag_news", None): "text label:label",
    ("dbpedia_14", None): "label:label title content",
    ("trec", None): "text coarse_label:label fine_label:label",
    ("super_glue", "rte"): "premise hypothesis idx:int32 label:label",
    ("super_glue", "cb"): "premise hypothesis idx:int32 label:label",
    ("super_glue", "copa"): "premise choice1 choice2 question idx:int32 label:label",
    ("super_glue", "wic"): "word sentence1 sentence2 start1:int32 start2:int32 end1:int32"
                           " end2:int32 idx:int32 label:label",
    ("super_glue", "wsc.fixed"): "text span1_index:int32 span2_index:int32 span1_text span2_text"
                                 " idx:int32 label:label",
    ("winogrande", "winogrande_xl"): "sentence option1 option2 answer",
    ("hellaswag", None): "ind:int32 activity_label ctx_a ctx_b ctx endings[] source_id split"
                         " split_type label",
    ("story_cloze", "2016"): "story_id input_sentence_1 input_sentence_2 input_sentence_3"
                             " input_sentence_4 sentence_quiz1 sentence_quiz2"
                             " answer_right_ending:int32",
    ("anli", None): "uid premise hypothesis label:label reason",
}
# The ClassLabel names of each dataset's label columns.
CLASS_LABELS = {
    ("glue", "mrpc"): {"label": "not_equivalent equivalent".split()},
    ("glue", "qqp"): {"label": "not_duplicate duplicate".split()},
    ("paws", "labeled_final"): {"label": "0 1".split()},
    ("wiki_qa", None): {"label": "0 1".split()},
    ("amazon_polarity", None): {"label": "negative positive".split()},
    ("imdb", None): {"label": "neg pos".split()},
    ("rotten_tomatoes", None): {"label": "neg pos".split()},
    ("yelp_review_full", None): {"label": ["1 star", "2 star", "3 stars", "4 stars", "5 stars"]},
    ("ag_news", None): {"label": "World Sports Business Sci/Tech".split()},
    ("dbpedia_14", None): {"label": "Company EducationalInstitution Artist Athlete OfficeHolder"
                                    " MeanOfTransportation Building NaturalPlace Village Animal"
                                    " Plant Album Film WrittenWork".split()},
    ("trec", None): {
        "coarse_label": "ABBR ENTY DESC HUM LOC NUM".split(),
        "fine_label": "ABBR:abb ABBR:exp ENTY:animal ENTY:body ENTY:color ENTY:cremat ENTY:currency"
                      " ENTY:dismed ENTY:event ENTY:food ENTY:instru ENTY:lang ENTY:letter"
                      " ENTY:other ENTY:plant ENTY:product ENTY:religion ENTY:sport ENTY:substance"
                      " ENTY:symbol ENTY:techmeth ENTY:termeq ENTY:veh ENTY:word DESC:def"
                      " DESC:desc DESC:manner DESC:reason HUM:gr HUM:ind HUM:title HUM:desc"
                      " LOC:city LOC:country LOC:mount LOC:other LOC:state NUM:code NUM:count"
                      " NUM:date NUM:dist NUM:money NUM:ord NUM:other NUM:period NUM:perc"
                      " NUM:speed NUM:temp NUM:volsize NUM:weight".split()},
    ("super_glue", "rte"): {"label": "entailment not_entailment".split()},
    ("super_glue", "cb"): {"label": "entailment contradiction neutral".split()},
    ("super_glue", "copa"): {"label": "choice1 choice2".split()},
    ("super_glue", "wic"): {"label": "False True".split()},
    ("super_glue", "wsc.fixed"): {"label": "False True".split()},
    ("anli", None): {"label": "entailment neutral contradiction".split()},
}
# The values the labels stored as plain values take in the real data (all of them, in the rows).
LABEL_VALUES = {
    ("duorc", "SelfRC"): {"no_answer": {False, True}},
    ("duorc", "ParaphraseRC"): {"no_answer": {False, True}},
    ("cosmos_qa", None): {"label": {0, 1, 2, 3}},
    ("qasc", None): {"answerKey": set("ABCDEFGH")},
    ("quail", None): {"correct_answer_id": {0, 1, 2, 3}},
    ("quarel", None): {"answer_index": {0, 1}},
    ("quartz", None): {"answerKey": {"A", "B"}},
    ("social_i_qa", None): {"label": {"1", "2", "3"}},
    ("wiqa", None): {"answer_label": {"more", "less", "no_effect"},
                     "answer_label_as_choice": {"A", "B", "C"},
                     "metadata_question_type": {"EXOGENOUS_EFFECT", "INPARA_EFFECT",
                                                "OUTOFPARA_DISTRACTOR"}},
    ("app_reviews", None): {"star": {1, 2, 3, 4, 5}},
    ("winogrande", "winogrande_xl"): {"answer": {"1", "2"}},
    ("hellaswag", None): {"label": {"0", "1", "2", "3"}},
    ("story_cloze", "2016"): {"answer_right_ending": {1, 2}},
}
# Training templates that render nothing for some rows, by design: each renders for the rows its
# condition names.
CONDITIONAL_TEMPLATES = {
    ("glue", "mrpc"): {"generate_paraphrase", "generate_sentence"},  # paraphrases (label 1)
    ("paws", "labeled_final"): {"paraphrase-task"},  # paraphrases (label 1)
    ("wiki_qa", None): {  # correct answers (label 1)
        "Direct Answer to Question", "Generate Question from Topic", "Jeopardy style",
        "Topic Prediction - Answer Only", "Topic Prediction - Question Only",
        "Topic Prediction - Question and Answer Pair"},
    **{("duorc", subset): {"build_story_around_qa", "generate_question_by_answer"}  # answerable
       for subset in ("SelfRC", "ParaphraseRC")},
    ("trec", None): {  # one coarse class each
        f"fine_grained_{coarse}{order}" for coarse in ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
        for order in ("", "_context_first") if (coarse, order) != ("ENTY", "_context_first")},
}
# T-Few's label of a held-out row (its dataset readers), which the prompted label must equal.
GOLD_LABEL = {
    "super_glue": lambda row: row["label"],
    "anli": lambda row: row["label"],
    "winogrande": lambda row: int(row["answer"]) - 1,
    "hellaswag": lambda row: int(row["label"]),
    "story_cloze": lambda row: row["answer_right_ending"] - 1,
}
TRAINING = [(dataset, subset) for dataset, subset, _ in t0.TRAIN_DATASETS]
key_id = lambda key: f"{key[0]}/{key[1]}" if key[1] else key[0]


def describe(feature) -> str:
  """A feature's type as SCHEMAS writes it."""
  if isinstance(feature, dict):
    return "{" + " ".join(name + describe(sub) for name, sub in feature.items()) + "}"
  if isinstance(feature, datasets.List):  # what a Sequence or a [feature] is in datasets 4+
    return f"[{describe(feature.feature)}]"
  if isinstance(feature, datasets.ClassLabel):
    return ":label"
  return "" if feature.dtype == "string" else f":{feature.dtype}"


def column_names(feature) -> list[str]:
  """Every column name, nested ones included."""
  if isinstance(feature, dict):
    return [n for name, sub in feature.items() for n in [name, *column_names(sub)]]
  return column_names(feature.feature) if isinstance(feature, datasets.List) else []


@pytest.fixture(scope="module", autouse=True)
def compile_templates_once():
  """promptsource compiles a template's Jinja on every call (milliseconds each); the thousands of
  renders here compile each source once. Jinja folds a `choice` of a constant list at compile
  time, so such a draw repeats across rows here; it decides no template's rendering."""
  from promptsource import templates

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(templates.env, "from_string", functools.cache(templates.env.from_string))
    yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("t0_fixtures"))
  t0_fixtures.build(path)
  return path


def test_fixtures_are_the_t0_datasets():
  heldout = {(task.dataset, task.subset) for task in t0.HELDOUT_TASKS.values()}
  assert set(t0_fixtures.FIXTURES) == set(TRAINING) | heldout == set(SCHEMAS)
  assert len(TRAINING) == 38 and len(heldout) == 9


@pytest.mark.parametrize("key", list(SCHEMAS), ids=key_id)
def test_features_are_the_real_schemas(key):
  features = t0_fixtures.FIXTURES[key].features
  assert describe(features) == "{" + SCHEMAS[key] + "}"
  class_labels = {name: feature.names for name, feature in features.items()
                  if isinstance(feature, datasets.ClassLabel)}
  assert class_labels == CLASS_LABELS.get(key, {})
  # No hyphenated column names, so t-zero's renaming of them (removeHyphen) is not needed.
  assert not [name for name in column_names(features) if "-" in name]


@pytest.mark.parametrize("key", list(SCHEMAS), ids=key_id)
def test_rows_take_every_label_value(key):
  rows = t0_fixtures.rows(*key, "train", 0)
  assert rows == t0_fixtures.rows(*key, "train", 0)  # deterministic
  features = t0_fixtures.FIXTURES[key].features
  for name in CLASS_LABELS.get(key, {}):
    assert {row[name] for row in rows} == set(range(features[name].num_classes)), name
  for name, values in LABEL_VALUES.get(key, {}).items():
    assert {row[name] for row in rows} == values, name


def test_build_writes_every_split_a_t0_run_reads(data_dir):
  needed = {key for anli_eval in ("test", "dev")
            for key in t0.source_splits(t0.TRAIN_DATASETS, list(t0.HELDOUT_TASKS), anli_eval)}
  assert len(needed) == 38 + 8 * 2 + 9  # ANLI: train, dev and test of three rounds
  for dataset, subset, split in needed:
    rows = sources.load_rows(dataset, subset, split, data_dir)
    assert rows.features == t0_fixtures.FIXTURES[(dataset, subset)].features
  for name, task in t0.HELDOUT_TASKS.items():  # a few-shot pool holds T-Few's k and some more
    assert len(sources.load_rows(task.dataset, task.subset, task.train_split, data_dir)) > task.k


def test_training_template_count_is_mttls():
  assert sum(len(t0.training_templates(*key)) for key in TRAINING) == 313


@pytest.mark.parametrize("key", TRAINING, ids=key_id)
def test_every_training_template_renders_the_rows(key, data_dir):
  rows = t0.as_templates_read(sources.load_rows(*key, "train", data_dir))
  collection = prompts.dataset_templates(*key)
  rendered = {name: [prompts.apply(collection[name], row) for row in rows]
              for name in t0.training_templates(*key)}
  assert not [name for name, prompted in rendered.items() if not any(prompted)]
  conditional = {name for name, prompted in rendered.items() if not all(prompted)}
  assert conditional == CONDITIONAL_TEMPLATES.get(key, set())


@pytest.mark.parametrize("name", list(t0.HELDOUT_TASKS))
def test_every_heldout_template_renders_every_row_with_its_label(name, data_dir):
  task = t0.HELDOUT_TASKS[name]
  collection = prompts.dataset_templates(task.dataset, task.subset)
  gold = GOLD_LABEL[task.dataset]
  splits = {task.train_split} | {t0.heldout(name, e).eval_split for e in ("test", "dev")}
  for split in splits:
    for index, row in enumerate(sources.load_rows(task.dataset, task.subset, split, data_dir)):
      for template in t0.heldout_templates(name):
        prompted = prompts.apply(collection[template], row, seed=index)
        assert prompted is not None, (split, index, template)
        assert prompted.label == gold(row), (split, index, template, prompted)
        assert prompted.answer_choices[prompted.label] == prompted.targets


def sentencepiece_dir(path, text, vocab_size=200) -> str:
  """A tiny SentencePiece vocabulary (``spiece.model``) trained on ``text``: T0's vocabulary is a
  download, and `tensorpoly data` only needs one that encodes."""
  import sentencepiece

  with open(f"{path}/spiece.model", "wb") as model:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  return str(path)


def test_tensorpoly_data_reads_every_task_and_drops_no_evaluation_row(data_dir, tmp_path, capsys):
  from tensorpoly_jax import cli

  text = [str(row) for key in SCHEMAS for row in t0_fixtures.rows(*key, "train", 0)]
  vocabulary_dir = sentencepiece_dir(tmp_path, text)
  assert cli.main(["data", "--gin_file=runs/data_t0.gin", f"--gin.VOCABULARY_DIR='{vocabulary_dir}'",
                   f"--gin.DATA_DIR='{data_dir}'"]) == 0
  out = capsys.readouterr().out
  assert "training mixture 't0_train': 313 tasks; routing id map of 313 tasks" in out
  heldout = [line for line in out.splitlines() if line.startswith("held-out t0__")]
  assert len(heldout) == 11
  assert all("; 0 dropped" in line for line in heldout), heldout
  assert "dropped from validation" not in out and "PROBLEM" not in out
  assert "all 313 training and 11 held-out tasks are usable" in out
  assert "held-out t0__copa: train 288 rows (36 examples)," in out  # T-Few's 8 templates each
  # StoryCloze's pool is its validation split: k=70 plus the fixture's 4.
  assert "held-out t0__story_cloze: train 370 rows (74 examples)," in out
