"""``tensorpoly compile``: the real T0-3B steps compiled ahead of time for a TPU v4 topology on
this CPU host (libtpu), with their per-device memory; bad targets fail before compiling."""
import json

import jax
import pytest

from tensorpoly_jax import aot, cli

libtpu = pytest.importorskip("libtpu", reason="compiling for TPU topologies needs libtpu:"
                             " pip install 'tensorpoly-jax[tpu]' (.ci/run installs it)")
T0_3B = ["--gin_file=models/t0_3b.gin", "--topology=v4:2x2x4"]


def _compile(tmp_path, *flags):
  out = tmp_path / "compile.json"
  code = cli.main(["compile", *T0_3B, *flags, f"--json={out}"])
  return code, json.loads(out.read_text())


@pytest.mark.slow
def test_t0_3b_pretraining_step_fits_a_v4_core(tmp_path, capsys):
  # One method: each T0-3B compile takes most of a minute here; every method's memory is in
  # benchmarks/results/t0_memory.json (benchmarks/t0_memory.py).
  method = "tensorpoly_i"
  code, report = _compile(tmp_path, "--stage=pretrain", f"--gin_file=adapters/{method}.gin")
  assert code == 0
  assert report["fits"] is True and report["devices"] == 32 and report["mesh"]["data"] == 32
  assert report["model"] == {"layers": [24, 24], "emb_dim": 2048, "scan_layers": True,
                             "remat": "full", "dtype": "bfloat16", "adapter": method}
  assert report["hbm_bytes"] == 16 * 2**30  # a v4 chip's 32 GiB over its two cores
  # The frozen bf16 backbone (2.85B params) is replicated: about 5.3 GiB of arguments.
  assert 5.0 * 2**30 < report["argument_bytes"] < 6.5 * 2**30
  assert 0 < report["per_device_bytes"] < report["hbm_bytes"]
  assert report["compile_seconds"] > 0 and report["flops_per_device"] > 1e10
  assert report["collectives"].get("all-reduce", 0) >= 1  # the data-parallel gradient sum
  assert "fits" in capsys.readouterr().out


@pytest.mark.slow
def test_a_step_over_the_hbm_exits_1_naming_what_to_change(tmp_path, capsys):
  code, report = _compile(tmp_path, "--stage=backbone")  # full fine-tuning, no model parallelism
  assert code == 1 and report["fits"] is False
  assert report["per_device_bytes"] > report["hbm_bytes"]
  assert "--gin.MODEL_PARALLEL=2" in capsys.readouterr().err


def test_bad_targets_fail_before_compiling(monkeypatch):
  def never(*args, **kwargs):
    raise AssertionError("compiled despite bad input")

  monkeypatch.setattr(aot, "lower", never)
  base = ["compile", "--stage=pretrain", "--gin_file=models/t0_3b.gin",
          "--gin_file=adapters/poly.gin"]
  with pytest.raises(ValueError, match="'v9:1x1'.*libtpu could not describe it.*v4:2x2x4"):
    cli.main([*base, "--topology=v9:1x1"])
  with pytest.raises(ValueError, match="'pod-of-4' is not a topology name"):
    cli.main([*base, "--topology=pod-of-4"])
  with pytest.raises(ValueError, match="batch_size=30 cannot be split.*data axis \\(32"):
    cli.main([*base, "--topology=v4:2x2x4", "--gin.BATCH_SIZE=30"])
  with pytest.raises(ValueError, match="model_parallel=3 must divide the 32 devices"):
    cli.main([*base, "--topology=v4:2x2x4", "--gin.MODEL_PARALLEL=3"])
  with pytest.raises(ValueError, match="--stage=pretrain needs an adapter"):
    monkeypatch.undo()
    cli.main(["compile", "--stage=pretrain", "--gin_file=models/tiny.gin", "--topology=local"])


def test_local_compile_of_the_tiny_model_reports_its_memory(tmp_path):
  out = tmp_path / "local.json"
  assert cli.main(["compile", "--stage=adapt", "--gin_file=models/tiny.gin",
                   "--gin_file=adapters/tensorpoly_ii.gin", "--topology=local",
                   "--gin.BATCH_SIZE=8", "--gin.INPUTS_LENGTH=16", "--gin.TARGETS_LENGTH=8",
                   f"--json={out}"]) == 0
  report = json.loads(out.read_text())
  assert report["stage"] == "adapt" and report["mesh"] == {"data": jax.device_count(), "model": 1}
  assert report["per_device_bytes"] > 0 and report["device_kind"] == "cpu"


def test_frozen_stage_trains_only_the_relative_biases(tmp_path):
  from tensorpoly_jax.t5.model import EncoderDecoder, abstract_variables, preset

  for scan in (False, True):  # scanned blocks stack their params; the biases stay outside them
    params = abstract_variables(EncoderDecoder(preset("tiny", scan_layers=scan)))["params"]
    trained, frozen = aot.RelativeBiasParams().split(params)
    assert {k: set(v) for k, v in trained.items()} == {"encoder": {"relpos_bias"},
                                                       "decoder": {"relpos_bias"}}
    assert "relpos_bias" not in frozen["encoder"] and "relpos_bias" not in frozen["decoder"]
    assert aot.RelativeBiasParams().merge(trained, frozen) == params
  out = tmp_path / "frozen.json"
  assert cli.main(["compile", "--stage=frozen", "--gin_file=models/tiny.gin",
                   "--gin_file=adapters/poly.gin", "--topology=local", "--gin.BATCH_SIZE=8",
                   "--gin.INPUTS_LENGTH=16", "--gin.TARGETS_LENGTH=8", f"--json={out}"]) == 0
  report = json.loads(out.read_text())
  assert report["model"]["adapter"] is None  # the adapter in the gin files is left out
  assert 0 < report["kernels"]["fusions"] <= report["kernels"]["ops"]
