"""The benchmark scripts run end to end at their --quick size and write the JSON they describe
(smoke tests: no timing is asserted). They run in the test's process, as ``__main__``: a fresh
interpreter would add its imports to each."""
import importlib.util
import json
import os
import runpy
import sys

import pytest

pytestmark = pytest.mark.slow
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def run_benchmark(monkeypatch, capsys):
  def run(script, output, *args):
    monkeypatch.setattr(sys, "argv", [script, "--quick", "--output", str(output), *args])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ first
    runpy.run_path(os.path.join(BENCHMARKS, script), run_name="__main__")
    return json.loads(output.read_text()), capsys.readouterr().out

  return run


def test_train_step_against_frozen_and_peft(run_benchmark, tmp_path):
  result, stdout = run_benchmark("train_step.py", tmp_path / "train_step.json", "--methods", "poly",
                                 "--in_block_factors")
  rows = {(r["framework"], r["method"]): r for r in result["rows"]}
  assert set(rows) == {("ours", "frozen"), ("ours", "poly"), ("ours", "poly/in-block"),
                       ("peft", "frozen"), ("peft", "poly")}
  # The baseline builds each layer's factors in its block: the same params, more kernels.
  in_block = rows["ours", "poly/in-block"]
  assert in_block["trainable_params"] == rows["ours", "poly"]["trainable_params"]
  assert in_block["hlo_fusions"] > rows["ours", "poly"]["hlo_fusions"]
  assert rows["ours", "frozen"]["x_frozen"] == 1.0
  assert rows["ours", "poly"]["ours_over_peft"] > 0
  # Same adapter size as PEFT's Poly on the same targets (router rows included).
  assert rows["ours", "poly"]["trainable_params"] == rows["peft", "poly"]["trainable_params"]
  assert result["matmul_peak_flops"]["jax"] > 0 and rows["ours", "poly"]["flops"] > 0
  # The router and the per-example mix are kernels the frozen step does not run.
  assert rows["ours", "poly"]["hlo_fusions"] > rows["ours", "frozen"]["hlo_fusions"] > 0
  assert rows["ours", "poly"]["fusions_x_frozen"] == pytest.approx(
      rows["ours", "poly"]["hlo_fusions"] / rows["ours", "frozen"]["hlo_fusions"])
  for row in rows.values():  # profiled exactly where slower than 1.3x frozen or than PEFT
    slow = row["x_frozen"] > 1.3 or row.get("ours_over_peft", 0) > 1.0
    assert (row.get("profile") is not None) == (row["framework"] == "ours" and slow), row
    assert not row.get("profile") or 0 <= row["profile"]["adapter_share"] <= 1
  assert "x frozen" in stdout and "ours/PEFT" in stdout


def test_eval_throughput_cost_growth_and_adapter_layer(run_benchmark, tmp_path):
  result, stdout = run_benchmark("eval_throughput.py", tmp_path / "eval.json")
  assert [r["scorer"].split()[0] for r in result["rows"]] == ["naive", "evaluator"]
  assert "scores checked equal" in stdout
  result, _ = run_benchmark("cost_growth.py", tmp_path / "growth.json")
  assert [r["value"] for r in result["rows"]] == [2, 4]
  assert (tmp_path / "growth.png").exists()
  payload, _ = run_benchmark("adapter_layer.py", tmp_path / "layer.json")
  rows, size = payload["rows"], payload["size"]
  assert set(rows) == {"frozen", "lora", "tlora", "poly", "mhr", "tensorpoly_i", "tensorpoly_ii"}
  spec = importlib.util.spec_from_file_location("adapter_layer",
                                                os.path.join(BENCHMARKS, "adapter_layer.py"))
  adapter_layer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(adapter_layer)  # the configs it measured
  for name, row in rows.items():
    assert row["seconds"] > 0
    assert row["ratio"] == pytest.approx(row["seconds"] / rows["frozen"]["seconds"])
    if name != "frozen":  # the params of the layer it timed
      config = adapter_layer.METHODS[name].with_tasks(size["n_tasks"])
      assert row["adapter_params"] == config.param_count(size["d_in"], size["d_out"])["total"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install 'tensorpoly-jax[tpu]'; .ci/run installs it)")
def test_compile_benchmark_compares_scanned_with_per_layer(run_benchmark, tmp_path):
  result, stdout = run_benchmark("compile.py", tmp_path / "compile.json", "--methods",
                                 "frozen,lora", "--depths", "1,2", "--unscanned_depths", "1")
  rows = {(r["method"], r["depth"], r["scan"]): r for r in result["rows"]}
  assert set(rows) == {(m, *key) for m in ("frozen", "lora")
                       for key in ((1, False), (1, True), (2, True))}
  for (method, depth, scan), row in rows.items():
    assert row["compile_s"] > 0 and 0 < row["per_device_gib"] < 16 and row["fits"] is True
    assert (row["x_faster_than_per_layer"] is not None) == (scan and depth == 1)
    floor = rows["frozen", depth, scan]
    assert row["fusions_x_frozen"] == pytest.approx(row["hlo_fusions"] / floor["hlo_fusions"])
    assert row["hlo_unknown_trip_counts"] == 0
    assert sum(row["hlo_fusions_by_group"].values()) == row["hlo_fusions"]
    assert any(label.startswith("adapter") for label in row["hlo_fusions_by_group"]) == (
        method == "lora")
    assert (row["fusions_x_frozen"] > 1) == (method == "lora")
  # A scanned stack's body runs once per layer: one more layer, more kernels.
  assert rows["frozen", 2, True]["hlo_ops"] > rows["frozen", 1, True]["hlo_ops"]
  assert "x per-layer" in stdout and "fusions x frozen" in stdout and "fusions by origin" in stdout


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install 'tensorpoly-jax[tpu]'; .ci/run installs it)")
def test_t0_memory_table_against_a_float32_backbone(run_benchmark, tmp_path):
  result, stdout = run_benchmark("t0_memory.py", tmp_path / "t0.json")
  baseline, evaluation = result["rows"]
  assert (baseline["param_dtype"], baseline["stage"], baseline["x_f32_baseline"]) == (
      "float32", "pretrain", 1.0)
  assert baseline["fits"] is False  # a float32 T0-3B backbone does not fit a v4 core
  assert evaluation["stage"] == "eval" and evaluation["param_dtype"] == "bfloat16"
  assert evaluation["fits"] is True and evaluation["x_f32_baseline"] < 0.5
  assert "DOES NOT FIT" in stdout and "x f32 bb" in stdout


def test_decode_benchmark_against_recompute_and_transformers(run_benchmark, tmp_path):
  result, stdout = run_benchmark("decode.py", tmp_path / "decode.json")
  assert "greedy tokens checked equal to transformers' generate" in stdout
  rows = {(r["framework"], r["method"], r["mode"]): r for r in result["rows"]}
  assert set(rows) == {("ours", "greedy", "cached"), ("ours", "greedy", "recompute"),
                       ("ours", "beam 4", "cached"), ("hf", "greedy", "cached"),
                       ("hf", "beam 4", "cached"), ("ours+tensorpoly_i", "greedy", "one task"),
                       ("ours+tensorpoly_i", "greedy", "mixed tasks")}
  size = result["size"]
  for row in rows.values():
    assert row["tokens_per_s"] == pytest.approx(
        size["batch"] * size["new_tokens"] / row["median_s"])
  assert result["summary"]["ours_over_hf_greedy"] == pytest.approx(
      rows["ours", "greedy", "cached"]["tokens_per_s"] / rows["hf", "greedy", "cached"]["tokens_per_s"])
