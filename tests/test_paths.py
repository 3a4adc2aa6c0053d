"""Remote model directories go through etils.epath: a gs:// run writes through the gs filesystem
(here a fake one mapped onto a temporary folder), never into a local folder named ``gs:``; a
scheme no filesystem serves fails before any work. Every file is written by process 0 only,
whole: a write killed midway leaves the older file or export as it was."""
import json
import os

import jax
import numpy as np
import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing

from tensorpoly_jax import checkpoints, paths, reporting, sweep
from tests.test_sweep import point_results


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """``gs://bucket/...`` served from ``tmp_path/bucket/...``; the test runs in another folder."""
  root = tmp_path / "gcs"

  def local(path):
    return str(path).replace("gs://", f"{root}/", 1)

  def redirect(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def redirect_two(original, src, dst, *args, **kwargs):
    return original(local(src), local(dst), *args, **kwargs)

  work = tmp_path / "cwd"
  work.mkdir()
  monkeypatch.chdir(work)
  # epath picks TensorFlow's gfile for gs:// whenever TF is importable, past mock_epath's backend.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(paths, "_has_module", lambda name: True)  # the GCS client library
  fns = {name: redirect for name in ("exists", "glob", "isdir", "listdir", "makedirs", "mkdir",
                                     "open", "remove", "rmtree", "stat", "walk")}
  with epath_testing.mock_epath(**fns, rename=redirect_two, replace=redirect_two,
                                copy=redirect_two):
    yield root
  assert not any("gs:" in name for name in os.listdir(work))  # nothing local named gs:


def test_a_gs_model_dir_is_written_through_its_filesystem(fake_gcs):
  paths.check_writable("gs://bucket/run")
  assert (fake_gcs / "bucket" / "run").is_dir()
  paths.write_json("gs://bucket/run/results.json", {"accuracy": 0.5})
  assert (fake_gcs / "bucket" / "run" / "results.json").read_text().startswith("{")
  for value in (0.0, 1.0):  # the second export replaces the first
    params = {"encoder": {"layers_0": {"mlp": {"wo": {"adapter": {"lora_a": np.full(
        (4, 2), value, np.float32)}}}}}}
    export = checkpoints.export_adapter("gs://bucket/run", "adapter", params, {"stage": value})
  assert export == "gs://bucket/run/adapter"
  loaded, meta = checkpoints.load_adapter(export)
  np.testing.assert_array_equal(
      loaded["encoder"]["layers_0"]["mlp"]["wo"]["adapter"]["lora_a"], np.ones((4, 2)))
  assert meta == {"stage": 1.0}
  assert sorted(os.listdir(fake_gcs / "bucket" / "run")) == ["adapter", "results.json"]


EVALUATION = {"results": {"lora": {"accuracy": {"embedded__yew": {"0": 0.5, "1": 0.7}},
                                   "adaptation_params": 100}}}


def test_a_gs_sweep_and_report_are_written_through_its_filesystem(fake_gcs):
  rows = sweep.run("gs://bucket/sweep", sweep.parse_grid(["LORA_RANK=1,2"]), point_results)
  root = fake_gcs / "bucket" / "sweep"
  assert json.loads((root / "sweep_results.json").read_text()) == rows
  assert (root / "LORA_RANK=2" / sweep.POINT_RESULT).exists()
  assert (root / "sweep.png").read_bytes().startswith(b"\x89PNG")
  reporting.write_report("gs://bucket/demo", EVALUATION)
  report = fake_gcs / "bucket" / "demo"
  assert json.loads((report / "report.json").read_text())["lora"]["mean"] == 0.6
  assert (report / "report.png").read_bytes().startswith(b"\x89PNG")


def test_only_process_0_writes(tmp_path, monkeypatch):
  """Every process of a multi-host run computes the same results; one writes them."""
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  paths.write_json(tmp_path / "results.json", {"accuracy": 0.5})
  checkpoints.export_adapter(str(tmp_path), "adapter", {"lora_a": np.ones(2, np.float32)}, {})
  rows = sweep.run(str(tmp_path / "sweep"), sweep.parse_grid(["LORA_RANK=1,2"]), point_results)
  reporting.write_report(str(tmp_path / "demo"), EVALUATION)
  assert [row["status"] for row in rows] == ["finished", "finished"]
  assert list(tmp_path.iterdir()) == []


class Killed(BaseException):
  """The process dies here: no handler runs, as under SIGKILL."""


def kill_at(monkeypatch, method: str, name: str) -> None:
  """The process dies when epath's ``method`` (``write_bytes``: after half the bytes; ``rename``)
  is called on the file or folder ``name``."""
  cls = type(paths.resolve("."))
  original = getattr(cls, method)

  def dying(self, *args):
    if self.name == name:
      if method == "write_bytes":
        original(self, args[0][:len(args[0]) // 2])
      raise Killed(f"{method} {name}")
    return original(self, *args)

  monkeypatch.setattr(cls, method, dying)


def lora(value: float) -> dict:
  return {"adapter": {"lora_a": np.full((4, 2), value, np.float32)}}


@pytest.mark.parametrize("method,name", [
    ("write_bytes", "adapter.safetensors"), ("write_bytes", "adapter_config.json"),
    ("rename", "adapter"),  # both files written, the older export not yet moved aside
    ("rename", ".adapter.tmp"),  # the older export moved aside, the new one not yet in place
])
def test_an_export_killed_midway_leaves_the_older_one_whole(tmp_path, monkeypatch, method, name):
  export = checkpoints.export_adapter(str(tmp_path), "adapter", lora(1.0), {"stage": "older"})
  with monkeypatch.context() as patch:
    kill_at(patch, method, name)
    with pytest.raises(Killed):
      checkpoints.export_adapter(str(tmp_path), "adapter", lora(2.0), {"stage": "newer"})
  older = export if os.path.exists(export) else str(tmp_path / ".adapter.replaced")
  params, meta = checkpoints.load_adapter(older)
  np.testing.assert_array_equal(params["adapter"]["lora_a"], lora(1.0)["adapter"]["lora_a"])
  assert meta == {"stage": "older"}
  assert sorted(os.listdir(older)) == [checkpoints.ADAPTER_FILE, checkpoints.ADAPTER_META]
  checkpoints.export_adapter(str(tmp_path), "adapter", lora(3.0), {"stage": "next"})
  assert checkpoints.load_adapter(export)[1] == {"stage": "next"}
  assert os.listdir(tmp_path) == ["adapter"]  # nothing left of the killed write


def test_a_file_write_killed_midway_leaves_the_older_file(tmp_path, monkeypatch):
  paths.write_json(tmp_path / "results.json", {"accuracy": 0.5})
  with monkeypatch.context() as patch:
    kill_at(patch, "write_bytes", ".results.json.tmp")
    with pytest.raises(Killed):
      paths.write_json(tmp_path / "results.json", {"accuracy": 0.75})
  assert json.loads((tmp_path / "results.json").read_text()) == {"accuracy": 0.5}
  paths.write_json(tmp_path / "results.json", {"accuracy": 0.75})
  assert json.loads((tmp_path / "results.json").read_text()) == {"accuracy": 0.75}
  assert os.listdir(tmp_path) == ["results.json"]


def test_unserved_schemes_and_unwritable_dirs_fail_before_any_work(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match=r"'memory://x/run': no filesystem serves memory://"):
    paths.check_writable("memory://x/run")
  # Orbax needs the GCS client library for gs://, and this machine reaches no GCS at all.
  with pytest.raises(ValueError, match=r"'gs://no-bucket/run'.*need google-cloud-storage"):
    paths.check_writable("gs://no-bucket/run")
  with monkeypatch.context() as patch:
    patch.setattr(paths, "_has_module", lambda name: True)
    with pytest.raises(ValueError, match=r"(?s)'gs://no-bucket/run' is not writable.*not reachable"):
      paths.check_writable("gs://no-bucket/run")
  blocked = tmp_path / "file"
  blocked.write_text("not a folder")
  with pytest.raises(ValueError, match=r"is not writable .*choose another --model_dir"):
    paths.check_writable(str(blocked / "run"))
  assert paths.resolve("runs/x") == paths.resolve(os.path.abspath("runs/x"))
