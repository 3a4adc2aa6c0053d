#!/usr/bin/env bash
# Runs one `tensorpoly` command on a Cloud TPU VM or pod slice.
#
#   launch/tpu.sh --name NAME --zone ZONE [--model_dir gs://BUCKET/PATH] [options] -- COMMAND ...
#
# Creates the TPU VM (or reuses it), ships this checkout (or clones --repo) to every worker,
# installs it with the TPU build of jax that setup.py pins, mounts the bucket of --model_dir (or
# --bucket) with gcsfuse at /mnt/gcs/BUCKET, runs the command, streams worker 0's log and, with
# --delete, deletes the VM. Commands that run JAX work on the pod (train, adapt, eval, sweep, demo,
# compile) start on every worker as one jax.distributed run, and those with a run directory get
# --model_dir=/mnt/gcs/BUCKET/PATH; the others (convert, data, export, import, list,
# install-templates) need no TPU and run on worker 0 alone, on its CPU.
# See launch/README.md for a worked T0-3B example.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/tpu.sh --name NAME --zone ZONE [--model_dir gs://B/PATH] [options] -- COMMAND ARGS...

Required (flag or environment variable):
  --name NAME               TPU VM name                               (TPU_NAME)
  --zone ZONE               e.g. us-central2-b                        (TPU_ZONE)
  --model_dir gs://B/P      run directory on GCS, shared by workers: train, adapt, eval, sweep
                            and demo need it, the other commands take none (MODEL_DIR;
                            also spelled --model-dir)
  -- COMMAND ARGS...        the tensorpoly command, e.g. -- train --gin_file=...
Options:
  --bucket gs://BUCKET      a bucket to mount at /mnt/gcs/BUCKET for a command without a run
                            directory (convert --output_dir, compile --json, ...) (TPU_BUCKET)
  --project PROJECT         GCP project (default: gcloud's)           (TPU_PROJECT)
  --accelerator-type TYPE   default v4-8                              (TPU_ACCELERATOR_TYPE)
  --version VERSION         TPU VM image, default tpu-ubuntu2204-base (TPU_VERSION)
  --repo URL                clone URL instead of copying this checkout (REPO_URL)
  --ref REF                 branch or tag of --repo, default main     (REPO_REF)
  --jax SPEC                pip spec of TPU jax (JAX_SPEC); default: the installed checkout's
                            pin, setup.py's tpu extra (jax[tpu]==JAX_VERSION)
  --spot                    create a Spot VM (preemptible; runs resume from checkpoints)
  --delete                  delete the VM when the run ends (success or failure)
  --dry-run                 print the commands instead of running them
  -h, --help                this message
USAGE
}

die() {
  echo "tpu.sh: $*" >&2
  echo >&2
  usage >&2
  exit 2
}

# tensorpoly's commands: those that run JAX work on every worker, and of them those that write a
# run directory; every other command runs on worker 0.
POD_COMMANDS=" train adapt eval sweep demo compile "
RUN_DIR_COMMANDS=" train adapt eval sweep demo "
WORKER_0_COMMANDS=" convert data export import list install-templates "

NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-v4-8}"
VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
MODEL_DIR="${MODEL_DIR:-}"
BUCKET_URL="${TPU_BUCKET:-}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
JAX_SPEC="${JAX_SPEC:-}"
SPOT=0
DELETE=0
DRY_RUN=0
ARGS=()

while (($#)); do
  case "$1" in
    --name | --zone | --project | --accelerator-type | --version | --model_dir | --model-dir | \
      --bucket | --repo | --ref | --jax)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --name) NAME="$2" ;;
        --zone) ZONE="$2" ;;
        --project) PROJECT="$2" ;;
        --accelerator-type) ACCELERATOR_TYPE="$2" ;;
        --version) VERSION="$2" ;;
        --model_dir | --model-dir) MODEL_DIR="$2" ;;
        --bucket) BUCKET_URL="$2" ;;
        --repo) REPO_URL="$2" ;;
        --ref) REPO_REF="$2" ;;
        --jax) JAX_SPEC="$2" ;;
      esac
      shift 2
      ;;
    --spot) SPOT=1; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; ARGS=("$@"); break ;;
    *) die "unknown option '$1'" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name (or TPU_NAME) is required"
[[ -n "$ZONE" ]] || die "--zone (or TPU_ZONE) is required"
((${#ARGS[@]})) || die "give the tensorpoly command after '--', e.g. -- train --gin_file=..."
COMMAND="${ARGS[0]}"
[[ "$POD_COMMANDS$WORKER_0_COMMANDS" == *" $COMMAND "* ]] ||
  die "'$COMMAND' is not a tensorpoly command; use one of:$POD_COMMANDS${WORKER_0_COMMANDS% }"
if [[ "$RUN_DIR_COMMANDS" == *" $COMMAND "* ]]; then
  [[ -n "$MODEL_DIR" ]] || die "$COMMAND needs --model_dir gs://BUCKET/PATH (or MODEL_DIR)"
  [[ -z "$BUCKET_URL" ]] ||
    die "give --model_dir or --bucket (TPU_BUCKET), not both: --model_dir mounts its bucket"
  [[ "$MODEL_DIR" =~ ^gs://([^/]+)(/.*)?$ ]] ||
    die "--model_dir must be gs://BUCKET/PATH (the workers share it), got '$MODEL_DIR'"
  BUCKET="${BASH_REMATCH[1]}"
  RUN_DIR_FLAG=("--model_dir=/mnt/gcs/$BUCKET${BASH_REMATCH[2]}")
else
  [[ -z "$MODEL_DIR" ]] ||
    die "$COMMAND writes no run directory: drop --model_dir (and unset MODEL_DIR);" \
      "--bucket gs://BUCKET mounts a bucket for its paths"
  BUCKET=""
  RUN_DIR_FLAG=()
  if [[ -n "$BUCKET_URL" ]]; then
    [[ "$BUCKET_URL" =~ ^gs://([^/]+)/?$ ]] || die "--bucket must be gs://BUCKET, got '$BUCKET_URL'"
    BUCKET="${BASH_REMATCH[1]}"
  fi
fi
MOUNT="/mnt/gcs/$BUCKET"

TPU=(compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")
CHECKOUT=tensorpoly-jax  # relative to the remote home, where ssh commands start

# Prints a command (shell-quoted) and, unless --dry-run, runs it.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  ((DRY_RUN)) || "$@"
}

on_workers() {  # on_workers WORKER REMOTE_COMMAND
  run gcloud "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$1" --command "$2"
}

if ((DELETE)); then
  delete_vm() { run gcloud "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet; }
  trap delete_vm EXIT
fi

# 1. The VM: reuse it when it exists.
if ((!DRY_RUN)) && gcloud "${TPU[@]}" describe "$NAME" "${WHERE[@]}" >/dev/null 2>&1; then
  echo "tpu.sh: reusing TPU VM $NAME"
else
  create=(gcloud "${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$ACCELERATOR_TYPE"
    --version "$VERSION")
  ((SPOT)) && create+=(--spot)
  run "${create[@]}"
fi

# 2. The code on every worker: a clone of --repo, or this checkout (with uncommitted changes to
# tracked files) as a tarball.
if [[ -n "$REPO_URL" ]]; then
  on_workers all "rm -rf $CHECKOUT && git clone --depth 1 --branch $(printf '%q' "$REPO_REF") $(printf '%q' "$REPO_URL") $CHECKOUT"
else
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  tarball="$(mktemp -d)/tensorpoly-jax.tar.gz"
  snapshot="$(git -C "$root" stash create || true)"
  run git -C "$root" archive --format=tar.gz --prefix=tensorpoly-jax/ -o "$tarball" "${snapshot:-HEAD}"
  run gcloud "${TPU[@]}" scp "$tarball" "$NAME:~/" "${WHERE[@]}" --worker=all
  on_workers all "rm -rf $CHECKOUT && tar xzf tensorpoly-jax.tar.gz"
fi

# 3. Install: the project with the TPU jax it pins (setup.py's tpu extra, read by pip on the
# worker from the checkout it installs) or --jax, the templates, and gcsfuse with the bucket.
if [[ -n "$JAX_SPEC" ]]; then
  packages=". $(printf '%q' "$JAX_SPEC")"
else
  packages="'.[tpu]'"
fi
mount_bucket=""
if [[ -n "$BUCKET" ]]; then
  gcsfuse_repo="gcsfuse-\$(lsb_release -c -s)"  # expanded on the worker
  mount_bucket="
if ! command -v gcsfuse >/dev/null; then
  echo \"deb https://packages.cloud.google.com/apt $gcsfuse_repo main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT"
fi
on_workers all "set -e; cd $CHECKOUT
python3 -m pip install -q --upgrade pip
python3 -m pip install -q -e $packages -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
python3 -m tensorpoly_jax install-templates$mount_bucket"

# 4. Run in the background (an ssh drop does not kill the run), then follow worker 0's log until
# its exit status appears. A pod command joins one jax.distributed run of every worker; any other
# runs on worker 0's CPU (a TPU backend on one host of a multi-host slice waits for the others).
if [[ "$POD_COMMANDS" == *" $COMMAND "* ]]; then
  workers=all
  environment=TENSORPOLY_MULTIHOST=1
else
  workers=0
  environment=JAX_PLATFORMS=cpu
fi
command_line="$(printf '%q ' python3 -m tensorpoly_jax "${ARGS[@]}" "${RUN_DIR_FLAG[@]}")"
on_workers "$workers" "cd $CHECKOUT && rm -f ~/tensorpoly.rc && ($environment nohup $command_line; echo \$? > ~/tensorpoly.rc) > ~/tensorpoly.log 2>&1 < /dev/null &"
on_workers 0 "tail -n +1 -F ~/tensorpoly.log & while [ ! -f ~/tensorpoly.rc ]; do sleep 10; done; sleep 2; kill %1; exit \$(cat ~/tensorpoly.rc)"
