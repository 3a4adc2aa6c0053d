"""The embedded tuning protocol's choices (benchmarks/embedded_protocol.py), without its runs."""
import importlib.util
import os

import pytest

from tensorpoly_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "embedded_protocol", os.path.join(ROOT, "benchmarks", "embedded_protocol.py"))
protocol = importlib.util.module_from_spec(spec)
spec.loader.exec_module(protocol)


@pytest.fixture(scope="module")
def demo():
  return cli.demo_config()


@pytest.mark.parametrize("method", list(protocol.METHOD_FLAGS))
def test_protocol_tunes_the_demos_adapters_with_one_grid_size(method, demo):
  import gin

  cli.parse_gin([f"adapters/{method}.gin", "runs/data_embedded.gin", "runs/sweep.gin"],
                [f"--gin.{k}={v}" for k, v in protocol.METHOD_FLAGS[method].items()]
                + ["--gin.BACKBONE_DIR='unused'"], model_dir="unused")
  assert gin.query_parameter("%ADAPTER").scoped_configurable_fn() == demo.methods[method].adapter
  grid = protocol.grid_flags(method)
  assert len(grid) == len(protocol.grid_flags("lora"))  # the same number of points per method
  gin.clear_config()


def test_report_gin_changes_nothing_but_the_split():
  import gin

  def parsed(run_file):
    cli.parse_gin(["adapters/lora.gin", "runs/data_embedded.gin", run_file],
                  ["--gin.BACKBONE_DIR='unused'"], model_dir="unused")
    lines = set(gin.config_str().splitlines())
    gin.clear_config()
    return lines

  sweep, report = parsed("runs/sweep.gin"), parsed("runs/report.gin")
  assert sweep - report == {"pipeline_run.eval_split = %SELECTION_SPLIT"}
  assert report - sweep == {"pipeline_run.eval_split = %REPORT_SPLIT"}
  assert {"SELECTION_SPLIT = 'validation'", "REPORT_SPLIT = 'test'"} <= sweep


def _row(point, accuracy, split="validation"):
  return {"point": point, "mean_accuracy": accuracy, "split": split, "adaptation_params": 10,
          "accuracy": {}}


def test_choice_is_the_best_validation_point_and_never_a_diverged_one():
  rows = [_row({"LR": "1"}, 0.5), {"point": {"LR": "2"}, "mean_accuracy": None, "diverged": "nan"},
          _row({"LR": "3"}, 0.7), _row({"LR": "4"}, 0.7)]
  assert protocol.choose(rows)["point"] == {"LR": "3"}  # a tie keeps grid order
  with pytest.raises(RuntimeError, match="other than validation"):
    protocol.choose([_row({"LR": "1"}, 0.5, split="test")])
  with pytest.raises(RuntimeError, match="every point of the grid diverged"):
    protocol.choose(rows[1:2])


def test_report_summary_is_the_mean_over_tasks_of_few_shot_medians():
  # mean_accuracy: the sweep row's mean over tasks of the few-shot medians (commands.adapt's).
  rows = [{"point": {"PRETRAIN_SEED": "0"}, "adaptation_params": 7, "mean_accuracy": 0.7,
           "accuracy": {"a": {"0": 0.5, "1": 0.9, "2": 0.6}, "b": {"0": 1.0, "1": 0.8, "2": 0.7}}},
          {"point": {"PRETRAIN_SEED": "1"}, "adaptation_params": 7, "mean_accuracy": 0.5,
           "accuracy": {"a": {"0": 0.4, "1": 0.4, "2": 0.4}, "b": {"0": 0.6, "1": 0.6, "2": 0.6}}}]
  summary = protocol.summarize_report(rows)
  first = summary["pretrain_seeds"]["0"]
  assert first["mean_of_medians"] == pytest.approx((0.6 + 0.8) / 2)
  assert first["few_shot_seed_means"] == pytest.approx({"0": 0.75, "1": 0.85, "2": 0.65})
  assert summary["mean_of_medians"] == pytest.approx((0.7 + 0.5) / 2)
  assert summary["pretrain_seed_range"] == pytest.approx([0.5, 0.7])
  assert summary["single_run_range"] == pytest.approx([0.5, 0.85])


def test_demo_runs_each_method_at_the_point_the_protocol_chose(demo):
  import json

  with open(os.path.join(ROOT, "benchmarks", "results", "embedded_protocol.json")) as f:
    results = json.load(f)
  assert list(results["methods"]) == list(demo.methods) == list(protocol.METHOD_FLAGS)
  for method, entry in results["methods"].items():
    point = entry["chosen"]["point"]
    assert demo.methods[method].learning_rate == float(point[protocol.RATE_MACRO[method]]), method
    assert demo.methods[method].pretrain_steps == int(point["PRETRAIN_STEPS"]), method


def test_ablation_table_puts_each_point_in_its_cell():
  rows = [dict(_row({"ORDER": n, "TENSOR_RANK": r}, 0.5 + 0.01 * int(r)), pair_norm=norm)
          for n, norm in (("2", "layernorm"), ("3", "none")) for r in protocol.ABLATION_RANKS]
  rows[-1] = dict(rows[-1], mean_accuracy=None)
  lines = protocol.format_ablation({"tensorpoly_i": rows}).splitlines()
  assert lines[0].split()[-5:] == [f"R={r}" for r in protocol.ABLATION_RANKS]
  assert lines[1].split()[:3] == ["N=2", "(layernorm", "pair"]
  assert lines[1].split()[4::2] == ["51.0", "52.0", "54.0", "58.0", "66.0"]
  assert lines[2].split()[4::2] == ["51.0", "52.0", "54.0", "58.0", "diverged"]


routing_spec = importlib.util.spec_from_file_location(
    "routing_modes", os.path.join(ROOT, "benchmarks", "routing_modes.py"))
routing_modes = importlib.util.module_from_spec(routing_spec)
routing_spec.loader.exec_module(routing_modes)


def test_routing_modes_reads_the_demos_config_back(demo, tmp_path):
  import json

  (tmp_path / "evaluation.json").write_text(json.dumps({"config": demo.to_dict()}))
  assert routing_modes.demo_config(str(tmp_path)) == demo


def test_routing_modes_compares_each_mode_with_full_on_the_same_cells():
  full = {"a": {"0": 0.9, "1": 0.6}, "b": {"0": 0.7, "1": 0.8}}
  shifted = lambda by: {t: {s: v + by for s, v in seeds.items()} for t, seeds in full.items()}
  rows = [{"method": "poly", "mode": "full", "shots": 16, "accuracy": full},
          {"method": "poly", "mode": "router", "shots": 16, "accuracy": shifted(-0.1)},
          {"method": "poly", "mode": "uniform", "shots": 0, "accuracy": full},
          {"method": "poly", "mode": "router", "shots": 4, "accuracy": full}]  # no full at k=4
  compared = {(d["mode"], d["shots"]): d for d in routing_modes.differences(rows, 16)}
  assert compared.keys() == {("router", 16), ("uniform", 0)}
  # Paired cells: a constant shift has no spread, whatever the spread of the cells themselves.
  assert compared["router", 16]["difference"] == pytest.approx(-0.1)
  assert compared["router", 16]["interval"] == pytest.approx([-0.1, -0.1])
  assert compared["router", 16]["exceeds_interval"]
  assert compared["uniform", 0]["against_full_at_shots"] == 16
  assert not compared["uniform", 0]["exceeds_interval"]
  low, high = routing_modes.bootstrap_interval(routing_modes.cells(full))
  assert 0.6 <= low < 0.75 < high <= 0.9


def test_routing_modes_compares_every_pair_of_methods_under_full_adaptation():
  base = {"a": {"0": 0.9, "1": 0.6}, "b": {"0": 0.7, "1": 0.8}}
  shifted = lambda by: {t: {s: v + by for s, v in seeds.items()} for t, seeds in base.items()}
  rows = [{"method": "lora", "mode": "full", "shots": 4, "accuracy": shifted(0.05)},
          {"method": "poly", "mode": "full", "shots": 4, "accuracy": base},
          {"method": "tlora", "mode": "full", "shots": 4, "accuracy": base},
          {"method": "poly", "mode": "full", "shots": 8, "accuracy": base},  # alone at k=8
          {"method": "poly", "mode": "router", "shots": 4, "accuracy": shifted(0.3)}]
  compared = {(d["shots"], d["first"], d["second"]): d
              for d in routing_modes.method_differences(rows)}
  assert compared.keys() == {(4, "lora", "poly"), (4, "lora", "tlora"), (4, "poly", "tlora")}
  assert compared[4, "lora", "poly"]["difference"] == pytest.approx(0.05)
  assert compared[4, "lora", "poly"]["exceeds_interval"]
  assert compared[4, "lora", "poly"]["confidence"] == pytest.approx(1 - 0.05 / 3)  # 3 pairs at k=4
  assert compared[4, "poly", "tlora"]["interval"] == pytest.approx([0.0, 0.0])
  assert not compared[4, "poly", "tlora"]["exceeds_interval"]


def test_routing_modes_pairs_only_the_cells_both_runs_finished():
  done = {"a": {"0": 0.9, "1": 0.6}, "b": {"0": 0.7}}
  other = {"a": {"0": 0.5, "1": 0.4}, "b": {"0": 0.6, "1": 0.1}}  # b, seed 1: only here
  assert routing_modes.paired_difference(done, other) == pytest.approx([0.4, 0.2, 0.1])
  values = routing_modes.cells(other)
  narrow, wide = (routing_modes.bootstrap_interval(values, confidence=c) for c in (0.5, 0.995))
  assert wide[0] < narrow[0] < narrow[1] < wide[1]


modes = protocol.protocol_modes


def test_modes_stage_runs_each_method_at_the_point_the_protocol_chose(demo):
  import json

  with open(os.path.join(ROOT, "benchmarks", "results", "embedded_protocol.json")) as f:
    chosen = protocol.chosen_points(json.load(f), list(protocol.METHOD_FLAGS))
  assert modes.Stage("unused", chosen).config() == demo


def test_modes_stage_chooses_each_modes_setting_by_the_protocols_criterion():
  Job = modes.Job
  spread = {"a": {"0": 0.5, "1": 0.9, "32": 0.6}}  # mean 0.67, median 0.6
  steady = {"a": {"0": 0.7, "1": 0.7, "32": 0.1}}  # mean 0.5, median 0.7
  selected = {
      Job(0, "validation", "poly", "router", 16, router_learning_rate=0.1): {"accuracy": spread},
      Job(0, "validation", "poly", "router", 16, router_learning_rate=1.0): {"accuracy": steady},
      Job(0, "validation", "poly", "arrow", 0, arrow_top_k=1): {"accuracy": steady},
      Job(0, "validation", "poly", "arrow", 0, arrow_top_k=2): {"accuracy": steady}}
  assert modes.choose_settings(selected) == {("poly", "router"): {"router_learning_rate": 1.0},
                                             ("poly", "arrow"): {"arrow_top_k": 1}}  # a tie: first
  diverged = Job(0, "validation", "poly", "router", 16, router_learning_rate=3.0)
  assert modes.choose_settings({diverged: {"accuracy": None}, **selected})[
      "poly", "router"] == {"router_learning_rate": 1.0}  # a diverged point is never chosen
  with pytest.raises(RuntimeError, match="diverged"):
    modes.choose_settings({diverged: {"accuracy": None}})
  with pytest.raises(ValueError, match="validation only"):
    modes.choose_settings({diverged._replace(split="test"): {"accuracy": steady}})


def test_modes_stage_reports_every_mode_at_every_k_and_lora_in_full_only(demo):
  chosen = {m: {"learning_rate": "1e-2", "pretrain_steps": "400"} for m in ("lora", "poly")}
  stage = modes.Stage("work", chosen, replicates=(0, 1), shots=(4, 16))
  settings = {("poly", "router"): {"router_learning_rate": 0.3},
              ("poly", "router_mu"): {"router_learning_rate": 1.0},
              ("poly", "arrow"): {"arrow_top_k": 2}}
  jobs = modes.report_jobs(stage, stage.config(), settings)
  per_replicate = {(j.method, j.mode, j.shots, j.router_learning_rate, j.arrow_top_k)
                   for j in jobs if j.replicate == 0}
  assert per_replicate == {
      ("lora", "full", 4, None, 0), ("lora", "full", 16, None, 0),
      ("poly", "full", 4, None, 0), ("poly", "full", 16, None, 0),
      ("poly", "router", 4, 0.3, 0), ("poly", "router", 16, 0.3, 0),
      ("poly", "router_mu", 4, 1.0, 0), ("poly", "router_mu", 16, 1.0, 0),
      ("poly", "uniform", 0, None, 0), ("poly", "frozen_average", 0, None, 0),
      ("poly", "arrow", 0, None, 2)}
  assert len(jobs) == 2 * len(per_replicate) and {j.split for j in jobs} == {"test"}
  assert len({j.folder("w") for j in jobs}) == len(jobs)
  selection = modes.selection_jobs(stage, ["poly"], 16)
  assert {j.split for j in selection} == {"validation"} and {j.replicate for j in selection} == {0}
  assert len(selection) == 2 * len(stage.router_rates) + len(stage.arrow_top_k)
  assert len({j.folder("w") for j in selection + jobs}) == len(selection) + len(jobs)


def test_modes_stage_pools_replicates_into_cells_that_pair_the_same_replicate():
  Job = modes.Job
  full = {0: {"a": {"0": 0.9, "1": 0.5}}, 1: {"a": {"0": 0.6, "1": 0.7}}}
  reported = {}
  for replicate, accuracy in full.items():
    reported[Job(replicate, "test", "poly", "full", 4)] = {"accuracy": accuracy,
                                                            "adaptation_params": 10}
    reported[Job(replicate, "test", "poly", "router", 4, router_learning_rate=0.3)] = {
        "accuracy": {t: {s: v - 0.1 * (1 + replicate) for s, v in seeds.items()}
                     for t, seeds in accuracy.items()}, "adaptation_params": 2}
  rows = {r["mode"]: r for r in modes.pooled_rows(reported)}
  assert rows["full"]["accuracy"] == {"replicate0/a": full[0]["a"], "replicate1/a": full[1]["a"]}
  assert rows["full"]["mean"] == pytest.approx(0.675)
  assert rows["router"]["router_learning_rate"] == 0.3
  # Paired by replicate, task and seed: replicate 0 lost 0.1 everywhere, replicate 1 lost 0.2.
  (router,) = routing_modes.differences(list(rows.values()), 16)
  assert router["difference"] == pytest.approx(-0.15)
  assert router["interval"] == pytest.approx([-0.2, -0.1])

