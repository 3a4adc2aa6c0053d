"""`tensorpoly merge` against the adapted model it folds in: the merged backbone, with no adapter,
gives the adapted model's logits for the task (every method), and its Hugging Face export gives
them in ``T5ForConditionalGeneration`` (T5 v1.0 and v1.1)."""
import functools

import jax
import numpy as np
import pytest
import transformers

from tensorpoly_jax import checkpoints, cli, merge, peft_bridge, pipeline
from tensorpoly_jax.t5 import convert, layout
from tensorpoly_jax.t5.model import merge_params
from tests.small_adapters import random_adapter, small_adapter
from tests.test_t5 import (assert_logits_match, flax_logits, hf_logits, hf_model, random_batch,
                           save_untied)

SKILLS = {"lora": 1, "tlora": 2, "poly": 4, "mhr": 4, "tensorpoly_i": 2, "tensorpoly_ii": 2}
TOLERANCE = dict(rtol=0, atol=1e-4)  # float32


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  """A random tiny Hugging Face T5 v1.1 (untied head)."""
  folder = str(tmp_path_factory.mktemp("hf"))
  save_untied(hf_model("gated-gelu", tie_word_embeddings=False), folder)
  return folder


@pytest.fixture(scope="module")
def backbone(hf_folder):
  """``(config, params)`` of ``hf_folder``, converted."""
  return convert.load_hf_checkpoint(hf_folder)


@functools.cache
def trained_adapter(config):
  """Trained-looking params of ``config``'s adapter, built once per config (tests share them)."""
  return random_adapter(config)


def adapted(config, method, **fields):
  """``(config with the adapter, its params)``: ``method`` on 3 tasks."""
  config = config.replace(adapter=small_adapter(method, n_tasks=3, skills=SKILLS[method], **fields))
  return config, trained_adapter(config)


def export(tmp_path, backbone_dir, config, adapter_params, **meta):
  """An adapter export recorded as trained on the backbone in ``backbone_dir``."""
  run_meta = pipeline.run_meta("pretrain", config, {}, convert.stored_fingerprint(backbone_dir))
  return checkpoints.export_adapter(str(tmp_path), "adapter", adapter_params, {**run_meta, **meta})


def adapted_logits(config, params, adapter_params, task_id):
  inputs, targets = random_batch()
  return flax_logits(config, merge_params(adapter_params, params), inputs, targets,
                     np.full(len(inputs), task_id))


def plain_logits(config, params):
  return flax_logits(config.replace(adapter=None), params, *random_batch())


@pytest.mark.parametrize("method, shared_router", [*((m, False) for m in sorted(SKILLS)),
                                                   ("tensorpoly_ii", True)])
def test_merged_backbone_gives_the_adapted_logits_of_the_task(method, shared_router, backbone):
  config, params = backbone
  config, adapter_params = adapted(config, method, **({"shared_router": True} if shared_router
                                                      else {}))
  ours = adapted_logits(config, params, adapter_params, task_id=1)
  merged = merge.merged_params(params, adapter_params, pipeline.run_meta("pretrain", config, {}),
                               task_id=1)
  np.testing.assert_allclose(plain_logits(config, merged), ours, **TOLERANCE)
  # The adapter moves the logits: the match is not vacuous.
  assert np.abs(ours - plain_logits(config, params)).max() > 1e-3


@pytest.mark.parametrize("version", ["v1_0_relu_tied", "v1_1_gated_untied"])
def test_hf_export_loads_in_transformers_with_the_adapted_logits(version, hf_folder, tmp_path):
  if version == "v1_0_relu_tied":
    hf_folder = str(tmp_path / "hf")
    hf_model("relu").save_pretrained(hf_folder)
  config, params = convert.load_hf_checkpoint(hf_folder)
  backbone_dir, out = str(tmp_path / "backbone"), tmp_path / "merged_hf"
  convert.save_converted(backbone_dir, config, params)
  (tmp_path / "backbone" / convert.VOCABULARY_FILE).write_bytes(b"sentencepiece model")
  config, adapter_params = adapted(config, "lora")
  merge.merge(backbone_dir, export(tmp_path, backbone_dir, config, adapter_params), str(out),
              output_format="hf")

  served = transformers.T5ForConditionalGeneration.from_pretrained(str(out))
  inputs, targets = random_batch()
  assert_logits_match(adapted_logits(config, params, adapter_params, 0),
                      hf_logits(served, inputs, targets), targets)
  assert (out / convert.VOCABULARY_FILE).read_bytes() == b"sentencepiece model"
  # The writer is load_hf_checkpoint's inverse: config and params read back as written.
  read_config, read_params = convert.load_hf_checkpoint(str(out))
  assert read_config == config.replace(adapter=None)
  jax.tree_util.tree_map(np.testing.assert_array_equal, read_params, merge.merged_params(
      params, adapter_params, pipeline.run_meta("pretrain", config, {}), 0))


def test_merge_command_writes_a_backbone_in_the_sources_layout(backbone, tmp_path, capsys):
  """An adapted export merges its own task into a scanned backbone; the output is a converted
  backbone, scanned too, that other commands read (and refuse the adapter on: it has changed)."""
  config, params = backbone
  backbone_dir, out = str(tmp_path / "backbone"), str(tmp_path / "merged")
  convert.save_converted(backbone_dir, config.replace(scan_layers=True), layout.stack_layers(params))
  (tmp_path / "backbone" / convert.VOCABULARY_FILE).write_bytes(b"sentencepiece model")
  config, adapter_params = adapted(config, "poly")
  adapter_dir = export(tmp_path, backbone_dir, config, adapter_params, task_id=2)
  argv = ["merge", f"--backbone_dir={backbone_dir}", f"--adapter_dir={adapter_dir}"]
  assert cli.main([*argv, f"--output_dir={out}"]) == 0
  with pytest.raises(ValueError, match="is not empty"):  # never over a folder it wrote
    cli.main([*argv, f"--output_dir={out}"])
  assert f"wrote {out}" in capsys.readouterr().out

  assert convert.converted_config(out).scan_layers
  assert convert.stored_source(out) == (
      f"tensorpoly merge of {adapter_dir} (task 2) into {backbone_dir}")
  assert (tmp_path / "merged" / convert.VOCABULARY_FILE).exists()
  merged_config, merged = convert.load_converted(out, scan_layers=False)
  np.testing.assert_allclose(plain_logits(merged_config, merged),
                             adapted_logits(config, params, adapter_params, 2), **TOLERANCE)
  with pytest.raises(checkpoints.CheckpointMismatchError, match="trained on the backbone"):
    cli.main(["merge", f"--backbone_dir={out}", f"--adapter_dir={adapter_dir}",
              f"--output_dir={tmp_path / 'twice'}"])


def test_a_multi_task_export_needs_a_task_id_its_router_has_and_a_backbone_it_fits(backbone, tmp_path):
  config, adapter_params = adapted(backbone[0], "tensorpoly_i")
  argv = ["merge", f"--backbone_dir={tmp_path}/backbone",
          f"--adapter_dir={export(tmp_path, str(tmp_path), config, adapter_params)}",
          f"--output_dir={tmp_path}/merged"]
  with pytest.raises(peft_bridge.TaskIdError, match=r"routes 3 tasks.*pass --task_id=N"):
    cli.main(argv)
  with pytest.raises(peft_bridge.TaskIdError, match="task_id=3 is outside the adapter's 3 tasks"):
    cli.main([*argv, "--task_id=3"])
  with pytest.raises(checkpoints.CheckpointMismatchError, match="trained on another base model"):
    merge.merged_params({}, adapter_params, pipeline.run_meta("pretrain", config, {}), task_id=0)
