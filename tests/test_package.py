"""The README's example runs, and the layers other T5X projects import stay free of the toolchain."""
import ast
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYER_MODULES = ["entangle.py", "routing.py", "param_roles.py", "methods.py", "partitioning.py",
                 "t5/layers.py", *(f"adapters/{name}.py" for name in
                                   ("__init__", "base", "lora", "poly", "tensor"))]
ALLOWED_ROOTS = {"jax", "flax", "numpy", "math", "numbers", "dataclasses", "re", "typing",
                 "__future__", "tensorpoly_jax"}


def test_readme_python_example_runs():
  readme = (ROOT / "README.md").read_text()
  block = re.search(r"## Adapting a Dense layer with TensorPoly-I\n\n```python\n(.*?)```", readme,
                    re.S).group(1)
  out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT,
                       check=True).stdout
  assert "'router': 24" in out and "(6, 10, 64)" in out


def test_example_script_trains_adapter():
  out = subprocess.run([sys.executable, str(ROOT / "examples" / "tensorpoly_dense.py")],
                       capture_output=True, text=True, check=True).stdout
  before, after = map(float, re.search(r"loss (\S+) -> (\S+);", out).groups())
  assert after < 0.1 * before


def test_layer_modules_import_only_jax_and_flax():
  for name in LAYER_MODULES:
    tree = ast.parse((ROOT / "tensorpoly_jax" / name).read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        roots = {alias.name.split(".")[0] for alias in node.names}
      elif isinstance(node, ast.ImportFrom):
        roots = {(node.module or "").split(".")[0]}
      else:
        continue
      assert roots <= ALLOWED_ROOTS, f"{name} imports {roots - ALLOWED_ROOTS}"
      if "tensorpoly_jax" in roots and isinstance(node, ast.ImportFrom):
        assert not re.match(r"tensorpoly_jax\.(data|trainer|evaluation|cli)", node.module), name


@pytest.mark.slow
def test_an_installed_wheel_finds_its_gin_files_from_any_directory(tmp_path):
  """What `pip install .` (not -e) installs: the wheel, unpacked where Python finds it first."""
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
  wheel, = (tmp_path / "dist").glob("tensorpoly_jax-*.whl")
  with zipfile.ZipFile(wheel) as archive:
    archive.extractall(tmp_path / "site")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
  # One process: the package it imports, and a run reading the gin files beside it.
  train = ["train", "--gin_file=models/tiny.gin", "--gin_file=runs/data_embedded.gin",
           "--gin_file=runs/backbone.gin", f"--model_dir={tmp_path / 'run'}",
           "--gin.TRAIN_STEPS=5", "--gin.BATCH_SIZE=8"]
  done = subprocess.run(
      [sys.executable, "-c", "import sys, tensorpoly_jax.cli as c; print('CONFIGS', c.CONFIGS);"
       " sys.exit(c.main())", *train],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
  configs = tmp_path / "site" / "tensorpoly_jax" / "configs"
  assert f"CONFIGS {configs}\n" in done.stdout, done.stdout[:3000]
  # T5X's --gin_search_paths=<that folder> finds the model, run and data files.
  assert all((configs / "t5x" / name).exists() for name in (
      "model.gin", "tensorpoly_ii.gin", "data_embedded.gin", "runs/finetune_adapters.gin"))
  assert done.returncode == 0, done.stderr[-3000:]
  assert (tmp_path / "run" / "backbone" / "t5_config.json").exists()


def test_importing_the_data_pipeline_and_the_t5x_bridge_is_quiet():
  """TensorFlow (seqio's pipelines) prints nothing at import nor at its first op: no CUDA
  probing, no oneDNN notice."""
  modules = "tensorpoly_jax.cli"
  if importlib.util.find_spec("t5x"):
    modules += ", tensorpoly_jax.t5x_bridge"
  env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
  # An eager op initializes TF's devices (where an unhidden GPU probe logs cuInit errors); a
  # tf.data pipeline would add its autotuner's own shutdown warning when the process exits.
  first_op = "import tensorflow as tf; tf.constant(1) + 1"
  done = subprocess.run([sys.executable, "-c", f"import {modules}; {first_op}"], env=env,
                        capture_output=True, text=True, check=True)
  assert done.stderr == ""
