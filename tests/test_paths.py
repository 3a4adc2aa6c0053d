"""Remote model directories go through etils.epath: a gs:// run writes through the gs filesystem
(here a fake one mapped onto a temporary folder), never into a local folder named ``gs:``; a
scheme no filesystem serves fails before any work."""
import os

import numpy as np
import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing

from tensorpoly_jax import checkpoints, commands, paths


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
  commands._write_json("gs://bucket/run/results.json", {"accuracy": 0.5})
  assert (fake_gcs / "bucket" / "run" / "results.json").read_text().startswith("{")
  params = {"encoder": {"layers_0": {"mlp": {"wo": {"adapter": {"lora_a": np.ones((4, 2),
                                                                                  np.float32)}}}}}}
  export = checkpoints.export_adapter("gs://bucket/run", "adapter", params, {"stage": "test"})
  assert export == "gs://bucket/run/adapter"
  loaded, meta = checkpoints.load_adapter(export)
  np.testing.assert_array_equal(
      loaded["encoder"]["layers_0"]["mlp"]["wo"]["adapter"]["lora_a"], np.ones((4, 2)))
  assert meta == {"stage": "test"}


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
