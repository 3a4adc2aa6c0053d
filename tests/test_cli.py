"""The T5X-style commands on the embedded suite, at toy sizes: train -> adapt -> eval -> sweep."""
import json
import logging
import re

import pytest

from tensorpoly_jax import cli
from tensorpoly_jax.methods import adapter_config

pytestmark = pytest.mark.slow
DATA = "--gin_file=runs/data_embedded.gin"


@pytest.fixture
def backbone(tiny_backbone_dir):
  return tiny_backbone_dir


def test_pretrain_adapt_eval_commands(backbone, tmp_path, capsys):
  common = [DATA, f"--model_dir={tmp_path}", f"--gin.BACKBONE_DIR='{backbone}'"]
  assert cli.main(["train", "--gin_file=adapters/tensorpoly_i.gin", "--gin_file=runs/pretrain.gin",
                   *common, "--gin.TRAIN_STEPS=4", "--gin.LORA_RANK=2", "--gin.TENSOR_RANK=3",
                   "--gin.BATCH_SIZE=8", "--gin.TrainConfig.log_every=2"]) == 0
  assert (tmp_path / "adapter" / "adapter.safetensors").exists()
  _check_training_log(capsys.readouterr().out, tmp_path)
  assert cli.main(["adapt", "--gin_file=runs/adapt.gin", *common,
                   f"--gin.ADAPTER_DIR='{tmp_path / 'adapter'}'", "--gin.ADAPT_STEPS=2",
                   "--gin.HELDOUT=['embedded__yew']", "--gin.NUM_SHOTS=8", "--gin.SEEDS=(1,)",
                   "--gin.BATCH_SIZE=8"]) == 0
  results = json.loads((tmp_path / "adapt_results.json").read_text())
  assert results["accuracy"].keys() == {"embedded__yew"}
  assert results["accuracy"]["embedded__yew"].keys() == {"1"}
  out = capsys.readouterr().out
  assert "adapt run 1/1: embedded__yew, seed 1, k=8\n" in out
  split = results["split"]
  assert (f"adapt run 1/1: embedded__yew, seed 1: accuracy"
          f" {results['accuracy']['embedded__yew']['1']:.4f} on {split}\n") in out
  assert f"eval embedded__yew ({split}): example " in out
  import tensorflow as tf

  run = tmp_path / "adapt" / "embedded__yew_seed1"
  tags = {(v.tag, v.simple_value) for path in (run / "tensorboard").glob("events.out.*")
          for event in tf.compat.v1.train.summary_iterator(str(path)) for v in event.summary.value}
  accuracy = [value for tag, value in tags if tag == "eval/accuracy"]
  assert accuracy == [pytest.approx(results["accuracy"]["embedded__yew"]["1"])]
  assert {tag for tag, _ in tags} >= {"train/loss", "train/learning_rate", "eval/accuracy"}
  adapted = run / "adapter"
  assert cli.main(["eval", "--gin_file=runs/eval.gin", *common, "--gin.HELDOUT='embedded__yew'",
                   f"--gin.ADAPTER_DIR='{adapted}'"]) == 0
  evaluated = json.loads((tmp_path / "eval_results.json").read_text())["accuracy"]
  assert evaluated["embedded__yew"] == pytest.approx(results["accuracy"]["embedded__yew"]["1"])
  predictions = [json.loads(line) for line in (tmp_path / "eval_predictions.jsonl").open()]
  assert {p["task"] for p in predictions} == {"embedded__yew"}
  assert [p["example"] for p in predictions] == list(range(len(predictions)))
  assert sum(p["prediction"] == p["label"] for p in predictions) / len(predictions) == (
      pytest.approx(evaluated["embedded__yew"]))
  # The adapted export serves its own task to `tensorpoly infer`, in input order.
  requests = [{"input_ids": [5, 9, 13, 1], "id": "a"}, {"input_ids": [7, 1], "id": "b"}]
  (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
  assert cli.main(["infer", f"--backbone_dir={backbone}", f"--adapter_dir={adapted}",
                   f"--input_file={tmp_path / 'requests.jsonl'}",
                   f"--output_file={tmp_path / 'answers.jsonl'}", "--gin.MAX_DECODE_LENGTH=4",
                   "--gin.BATCH_SIZE=2"]) == 0
  answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").open()]
  assert [a["id"] for a in answers] == ["a", "b"]
  assert all(len(a["prediction_ids"]) <= 4 and 1 not in a["prediction_ids"] for a in answers)
  assert f"eval embedded__yew: accuracy {evaluated['embedded__yew']:.4f} on {split}" in (
      capsys.readouterr().out)
  # The adapted TensorPoly-I export goes to PEFT as the LoRA its task's routing builds.
  assert cli.main(["export", "--format=peft", f"--adapter_dir={adapted}",
                   f"--output_dir={tmp_path / 'peft'}"]) == 0
  peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 2


def _check_training_log(out: str, model_dir) -> None:
  """Captured stdout is not a terminal: the run explains itself in plain lines, no bar redraws."""
  import jax
  from safetensors.numpy import load_file

  assert "\r" not in out
  lines = [line.split(" ", 2)[2] for line in out.splitlines()]  # less the absl-style stamp
  devices = jax.device_count()
  assert (f"pretrain tensorpoly_i: {devices} cpu device(s) in 1 process(es), mesh"
          f" {{'data': {devices}, 'model': 1}}") in lines
  assert any(line.startswith("pretrain tensorpoly_i: T5 2+2 layers, d_model 64") and
             "adapter tensorpoly_i(lora_rank=2" in line for line in lines)
  exported = load_file(model_dir / "adapter" / "adapter.safetensors")
  trained = next(line for line in lines if line.startswith("pretrain tensorpoly_i: trained params"))
  assert f"trained params {sum(v.size for v in exported.values()):,} (" in trained
  routers = sum(v.size for k, v in exported.items() if k.endswith("skill_logits"))
  assert f"router {routers:,}" in trained
  assert (f"pretrain tensorpoly_i: 4 steps, batch 8, from step 0; writes"
          f" {model_dir / 'run'}") in lines
  compiles = [line for line in lines if line.startswith("compiling the train step for ")]
  assert len(compiles) == 2 and compiles[0].endswith("...")  # one batch shape: one compile
  assert re.fullmatch(re.escape(compiles[0][:-3]) + r": done in \d+\.\d s", compiles[1])
  assert "encoder_input_tokens 8x" in compiles[0]
  steps = [line for line in lines if line.startswith("pretrain tensorpoly_i: step ")]
  assert [line.split(",")[0] for line in steps] == [
      "pretrain tensorpoly_i: step 2/4", "pretrain tensorpoly_i: step 4/4"]
  assert "loss " in steps[0] and "ETA " in steps[0] and "ETA" not in steps[1]


def test_heldout_names_expand_mixtures_into_their_tasks_once_each():
  from tensorpoly_jax import commands
  from tensorpoly_jax.data import embedded, tasks

  tasks.register_embedded(0, embedded.Sizes(20, 2, 24, 12))  # the tiny backbone's suite

  assert commands.task_list(["embedded__yew", "embedded_heldout"]) == [
      f"embedded__{t}" for t in ("yew", "aspen", "rowan", "willow")]
  assert commands.task_list("embedded__rowan") == ["embedded__rowan"]


def test_sweep_over_a_grid_of_macros_never_reads_a_test_split(backbone, tmp_path, monkeypatch):
  from tensorpoly_jax.data import choices

  splits = set()
  read = choices.choice_arrays  # every split a run reads, few-shot pools included, goes through it
  monkeypatch.setattr(choices, "choice_arrays", lambda task, split, *a: (
      splits.add(split), read(task, split, *a))[1])
  assert cli.main(["sweep", "--gin_file=adapters/lora.gin", DATA, "--gin_file=runs/sweep.gin",
                   f"--model_dir={tmp_path}", f"--gin.BACKBONE_DIR='{backbone}'",
                   "--gin.PRETRAIN_STEPS=2", "--gin.ADAPT_STEPS=1", "--gin.SEEDS=(0,)",
                   "--gin.NUM_SHOTS=8", "--gin.HELDOUT='embedded__rowan'", "--gin.BATCH_SIZE=8",
                   "--sweep", "LORA_RANK=1,2"]) == 0
  rows = json.loads((tmp_path / "sweep_results.json").read_text())
  assert [r["point"] for r in rows] == [{"LORA_RANK": "1"}, {"LORA_RANK": "2"}]
  assert rows[1]["adaptation_params"] == 2 * rows[0]["adaptation_params"]  # r (d_in + d_out)
  assert (tmp_path / "LORA_RANK=2" / "adapt_results.json").exists()
  assert (tmp_path / "sweep.png").exists()
  assert splits == {"train", "validation"}  # choosing settings never sees the test split


def test_demo_settings_are_gin_and_quick_is_the_same_demo_smaller():
  full, quick = cli.demo_config(), cli.demo_config(cli.DEMO_QUICK_GIN)
  assert list(full.methods) == ["lora", "tlora", "poly", "mhr", "tensorpoly_i", "tensorpoly_ii"]
  assert quick.methods == {m: full.methods[m] for m in ("lora", "tensorpoly_i")}
  assert full.methods["mhr"].adapter == adapter_config("mhr", lora_rank=4, n_skills=8, n_splits=4)
  assert (quick.backbone_steps, quick.pretrain_steps, quick.seeds) == (40, 10, (0, 1))
  assert quick.train_config("pretrain", "lora").steps == 10
  assert full.train_config("pretrain", "lora").steps == full.methods["lora"].pretrain_steps == 1000
  assert cli.demo_config(cli.DEMO_GIN, ["--gin.SEEDS=(3,)"]).seeds == (3,)
  with pytest.raises(ValueError, match="no gin file defines the macro SEED; did you mean"):
    cli.demo_config(cli.DEMO_GIN, ["--gin.SEED=(3,)"])


def test_gin_files_are_found_without_false_errors_and_a_missing_one_is_named(caplog):
  cli.parse_gin(["runs/compile.gin", "models/tiny.gin", "adapters/lora.gin"], [])  # includes
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
  with pytest.raises(ValueError, match=r"--gin_file=models/tny.gin: no such file here or in .*configs"):
    cli.parse_gin(["models/tny.gin"], [])
