"""PEFT round trips against PEFT itself on the Hugging Face PyTorch T5 that our backbone is
converted from: an export loads with ``PeftModel.from_pretrained`` and gives our logits, and a
PEFT adapter imported here gives PEFT's logits."""
import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

from tensorpoly_jax import checkpoints, cli, methods, peft_bridge, pipeline
from tensorpoly_jax.adapters import TensorPolyIIConfig
from tensorpoly_jax.t5 import convert, scoring
from tensorpoly_jax.t5.model import merge_params, split_params
from tests.test_t5 import (assert_logits_match, flax_logits, hf_model, random_batch, save_untied,
                           with_adapter)
from tests.small_adapters import random_adapter, small_adapter

peft = pytest.importorskip("peft")

SKILLS = {"lora": 1, "tlora": 2, "poly": 4, "mhr": 4, "tensorpoly_i": 2, "tensorpoly_ii": 2}
TASK_IDS = np.array([0, 2, 1])


def torch_logits(model, inputs, targets, **kwargs):
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(inputs), attention_mask=torch.as_tensor(inputs > 0),
                decoder_input_ids=torch.as_tensor(np.asarray(scoring.shift_right(targets))),
                **kwargs)
  return out.logits.numpy()


@pytest.fixture
def converted(tmp_path):
  """A random tiny HF T5 (v1.1 shapes) and its conversion, saved as `tensorpoly convert` does."""
  hf = hf_model("gated-gelu", tie_word_embeddings=False)
  save_untied(hf, str(tmp_path / "hf"))
  config, backbone = convert.load_hf_checkpoint(str(tmp_path / "hf"))
  convert.save_converted(str(tmp_path / "backbone"), config, backbone)
  return hf, config, backbone


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_export_loads_in_peft_with_our_logits(method, converted, tmp_path):
  hf, config, backbone = converted
  config = config.replace(adapter=small_adapter(method, n_tasks=3, skills=SKILLS[method]))
  adapter_params = random_adapter(config)
  params = merge_params(adapter_params, backbone)
  export = checkpoints.export_adapter(str(tmp_path), "adapter", adapter_params,
                                      pipeline.run_meta("pretrain", config, {}))
  one_task = method.startswith("tensorpoly")  # no PEFT type routes tensor products
  argv = ["export", "--format=peft", f"--adapter_dir={export}", f"--output_dir={tmp_path}/peft"]
  assert cli.main(argv + (["--task_id=1"] if one_task else [])) == 0

  served = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
  inputs, targets = random_batch()
  peft_type = served.peft_config["default"].peft_type
  if method in ("poly", "mhr"):
    assert peft_type == "POLY"
    task_ids = TASK_IDS
    theirs = torch_logits(served, inputs, targets, task_ids=torch.as_tensor(task_ids))
  else:
    assert peft_type == "LORA" and served.peft_config["default"].lora_alpha == 1
    task_ids = np.ones(3, np.int32) if one_task else TASK_IDS
    theirs = torch_logits(served, inputs, targets)
  ours = flax_logits(config, params, inputs, targets, task_ids=task_ids)
  assert_logits_match(ours, theirs, targets)
  assert not np.allclose(ours, flax_logits(config, merge_params(
      jax.tree_util.tree_map(np.zeros_like, adapter_params), backbone), inputs, targets,
      task_ids=task_ids), atol=1e-3)  # the adapter moves the logits: the match is not vacuous


def peft_adapter(hf, peft_config, seed=1):
  """A PEFT adapter of ``hf`` with every adapter tensor random (B and routers included)."""
  model = peft.get_peft_model(hf, peft_config)
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if param.requires_grad:
        param.copy_(0.05 * torch.randn_like(param))
  return model.eval()


@pytest.mark.parametrize("kind", ["lora", "rslora", "poly", "mhr"])
def test_peft_adapter_imports_with_peft_logits(kind, converted, tmp_path):
  hf, config, backbone = converted
  targets_ = ["q", "v", "o", "wi_0", "wo"]
  if kind in ("lora", "rslora"):
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets_,
                                  use_rslora=kind == "rslora", task_type="SEQ_2_SEQ_LM")
  else:
    peft_config = peft.PolyConfig(r=2, n_tasks=3, n_skills=4, n_splits=2 if kind == "mhr" else 1,
                                  target_modules=targets_, task_type="SEQ_2_SEQ_LM")
  served = peft_adapter(hf, peft_config)
  served.save_pretrained(str(tmp_path / "peft"))
  argv = ["import", "--format=peft", f"--peft_dir={tmp_path}/peft",
          f"--backbone_dir={tmp_path}/backbone", f"--output_dir={tmp_path}/imported"]
  assert cli.main(argv) == 0

  adapter_params, meta = checkpoints.load_adapter(str(tmp_path / "imported"))
  adapter = methods.from_dict(meta["adapter"])
  assert adapter.method == {"lora": "lora", "rslora": "lora", "poly": "poly", "mhr": "mhr"}[kind]
  adapted = [p for p in traverse_util.flatten_dict(adapter_params) if "lora_a" in p]
  assert len(adapted) == 2 * (3 + 2) + 3 * (3 + 3 + 2)  # q, v, o per attention; wi_0, wo per MLP
  inputs, targets = random_batch()
  kwargs = {"task_ids": torch.as_tensor(TASK_IDS)} if adapter.routed else {}
  theirs = torch_logits(served, inputs, targets, **kwargs)
  ours = flax_logits(config.replace(adapter=adapter), merge_params(adapter_params, backbone),
                     inputs, targets, task_ids=TASK_IDS)
  assert_logits_match(ours, theirs, targets)


def test_multi_task_tensor_adapter_names_the_peft_formats(converted, tmp_path):
  _, config, backbone = converted
  config = config.replace(adapter=TensorPolyIIConfig(lora_rank=2, n_tasks=3, tensor_rank=2))
  adapter_params = split_params(with_adapter(config, backbone))[0]
  meta = pipeline.run_meta("pretrain", config, {})
  with pytest.raises(peft_bridge.PeftFormatError, match=r"--task_id=N.*LORA.*POLY"):
    peft_bridge.to_peft(adapter_params, meta)
  with pytest.raises(peft_bridge.TaskIdError, match="outside the adapter's 3 tasks"):
    peft_bridge.to_peft(adapter_params, meta, task_id=3)


def test_adapters_of_other_base_models_are_refused(converted, tmp_path):
  hf, config, backbone = converted
  lora = peft.LoraConfig(r=2, target_modules=["q"])
  served = peft_adapter(hf, lora)
  tensors = {k: v.detach().numpy() for k, v in
             peft.get_peft_model_state_dict(served).items()}
  plain = lora.to_dict()
  plain["peft_type"] = "LORA"
  llama_keys = {k.replace("encoder.block", "model.layers"): v for k, v in tensors.items()}
  with pytest.raises(peft_bridge.PeftFormatError, match="not an adapter of a Hugging Face T5"):
    peft_bridge.from_peft(plain, llama_keys, config)
  with pytest.raises(peft_bridge.PeftFormatError, match="for a LlamaForCausalLM"):
    peft_bridge.from_peft({**plain, "auto_mapping": {"base_model_class": "LlamaForCausalLM"}},
                          tensors, config)
  with pytest.raises(peft_bridge.PeftFormatError, match="another base model"):
    peft_bridge.from_peft(plain, tensors, config.replace(emb_dim=2 * config.emb_dim))
  with pytest.raises(peft_bridge.PeftFormatError, match="use_dora"):
    peft_bridge.from_peft({**plain, "use_dora": True}, tensors, config)
  with pytest.raises(peft_bridge.PeftFormatError, match="'IA3'"):
    peft_bridge.from_peft({**plain, "peft_type": "IA3"}, tensors, config)


def test_an_adapter_of_another_same_shaped_model_is_refused_by_name(converted, tmp_path):
  """T0 and the T5 it started from have the same shapes: the import compares the adapter's
  base_model_name_or_path with what `tensorpoly convert` read (a hub id and a local copy agree)."""
  import json

  hf, _, _ = converted
  assert cli.main(["convert", f"--checkpoint_dir={tmp_path / 'hf'}/",
                   f"--output_dir={tmp_path / 'from_hf'}"]) == 0
  assert convert.stored_source(str(tmp_path / "from_hf")) == f"{tmp_path / 'hf'}/"
  peft_adapter(hf, peft.LoraConfig(r=2, target_modules=["q"])).save_pretrained(
      str(tmp_path / "peft"))
  config_path = tmp_path / "peft" / peft_bridge.PEFT_CONFIG
  argv = ["import", "--format=peft", f"--peft_dir={tmp_path}/peft",
          f"--backbone_dir={tmp_path}/from_hf", f"--output_dir={tmp_path}/imported"]
  for base_model, accepted in (("bigscience/T0_3B", False), ("someone/HF", True)):
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "base_model_name_or_path": base_model}))
    if accepted:
      assert cli.main(argv) == 0
      _, meta = checkpoints.load_adapter(str(tmp_path / "imported"))
      assert meta["backbone"] == convert.stored_fingerprint(str(tmp_path / "from_hf")) is not None
      continue
    with pytest.raises(peft_bridge.PeftFormatError,
                       match=rf"trained on 'bigscience/T0_3B'.*converted from '{tmp_path}/hf/'"):
      cli.main(argv)
    assert cli.main([*argv, "--skip_base_model_check"]) == 0
