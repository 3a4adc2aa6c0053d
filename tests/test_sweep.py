import json

import pytest

from tensorpoly_jax import records, sweep
from tensorpoly_jax.trainer import Preempted, TrainingDiverged


def test_grid_is_the_product_in_order():
  grid = sweep.parse_grid(["ORDER=2,4", "TENSOR_RANK=2,4,8"])
  assert len(grid) == 6 and grid[0] == {"ORDER": "2", "TENSOR_RANK": "2"}
  assert grid[-1] == {"ORDER": "4", "TENSOR_RANK": "8"}
  assert sweep.point_flags(grid[1]) == ["--gin.ORDER=2", "--gin.TENSOR_RANK=4"]
  assert sweep.point_name(grid[1]) == "ORDER=2_TENSOR_RANK=4"


@pytest.mark.parametrize("spec", ["ORDER", "ORDER=", "=2,4"])
def test_bad_sweep_spec_is_named(spec):
  with pytest.raises(ValueError, match="must look like MACRO=v1,v2"):
    sweep.parse_grid([spec])


def point_results(point):
  """What a sweep point's ``adapt`` returns, without training."""
  rank = int(point["LORA_RANK"])
  return {"mean_of_medians": 0.1 * rank, "adaptation_params": 100 * rank, "split": "validation",
          "accuracy": {"embedded__yew": {"0": 0.1 * rank}}}


def recorded(ran, fail=None):
  """A sweep point's run that records which points ran and raises ``fail[rank]`` for its rank."""
  def run_point(point):
    ran.append(point["LORA_RANK"])
    if point["LORA_RANK"] in (fail or {}):
      raise fail[point["LORA_RANK"]]
    return point_results(point)

  return run_point


def test_a_failed_point_is_recorded_the_others_run_and_a_rerun_redoes_only_it(tmp_path):
  grid, ran = sweep.parse_grid(["LORA_RANK=1,2,4,8"]), []
  fail = {"2": OSError("disk full"), "4": TrainingDiverged("loss became nan at step 3")}
  with pytest.raises(records.RunsFailed, match=r"(?s)^1 run\(s\) did not finish.*\n"
                     r"  LORA_RANK=2: failed: OSError: disk full$"):
    sweep.run(str(tmp_path), grid, recorded(ran, fail))
  assert ran == ["1", "2", "4", "8"]
  rows = json.loads((tmp_path / "sweep_results.json").read_text())
  assert [row["status"] for row in rows] == ["finished", "failed", "diverged", "finished"]
  assert rows[2]["diverged"] == "loss became nan at step 3"  # the fields rows had before
  assert rows[1]["mean_accuracy"] is rows[2]["adaptation_params"] is None
  assert rows[3]["mean_accuracy"] == 0.8 and rows[3]["adaptation_params"] == 800
  record = json.loads((tmp_path / "LORA_RANK=1" / sweep.POINT_RESULT).read_text())
  assert record == {**rows[0], "point": {"LORA_RANK": "1"}, "flags": ["--gin.LORA_RANK=1"]}
  ran.clear()
  rows = sweep.run(str(tmp_path), grid, recorded(ran))  # the diverged point diverges again
  assert ran == ["2"]
  assert [row["status"] for row in rows] == ["finished", "finished", "diverged", "finished"]
  assert json.loads((tmp_path / "sweep_results.json").read_text()) == rows
  assert (tmp_path / "sweep.png").exists()


def test_a_preempted_sweep_stops_then_resumes_after_its_finished_points(tmp_path):
  grid, ran = sweep.parse_grid(["LORA_RANK=1,2,4"]), []
  notice = Preempted("SIGTERM received: saved checkpoint step 5 in ckpt; run the same command"
                     " again to resume from it.")
  with pytest.raises(Preempted, match="^sweep point LORA_RANK=2 was preempted with 1 of 3 points"
                     " done: SIGTERM received"):
    sweep.run(str(tmp_path), grid, recorded(ran, {"2": notice}))
  assert ran == ["1", "2"] and not (tmp_path / "LORA_RANK=2" / sweep.POINT_RESULT).exists()
  rows = json.loads((tmp_path / "sweep_results.json").read_text())
  assert [row["point"] for row in rows] == [{"LORA_RANK": "1"}]
  ran.clear()
  rows = sweep.run(str(tmp_path), grid, recorded(ran))
  assert ran == ["2", "4"] and [row["status"] for row in rows] == ["finished"] * 3
