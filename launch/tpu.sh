#!/usr/bin/env bash
# Runs one `tensorpoly` command on every worker of a Cloud TPU VM or pod slice.
#
#   launch/tpu.sh --name NAME --zone ZONE --model-dir gs://BUCKET/PATH [options] -- ARGS...
#
# Creates the TPU VM (or reuses it), ships this checkout (or clones --repo) to every worker,
# installs it with the TPU build of jax, mounts the model_dir bucket with gcsfuse at
# /mnt/gcs/BUCKET, starts `tensorpoly ARGS --model_dir=/mnt/gcs/BUCKET/PATH` on all workers
# (they join one jax.distributed run), streams worker 0's log and, with --delete, deletes the VM.
# See launch/README.md for a worked T0-3B example.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/tpu.sh --name NAME --zone ZONE --model-dir gs://BUCKET/PATH [options] -- ARGS...

Required (flag or environment variable):
  --name NAME               TPU VM name                               (TPU_NAME)
  --zone ZONE               e.g. us-central2-b                        (TPU_ZONE)
  --model-dir gs://B/P      run directory on GCS, shared by workers   (MODEL_DIR)
  -- ARGS...                the tensorpoly command, e.g. -- train --gin_file=...
Options:
  --project PROJECT         GCP project (default: gcloud's)           (TPU_PROJECT)
  --accelerator-type TYPE   default v4-8                              (TPU_ACCELERATOR_TYPE)
  --version VERSION         TPU VM image, default tpu-ubuntu2204-base (TPU_VERSION)
  --repo URL                clone URL instead of copying this checkout (REPO_URL)
  --ref REF                 branch or tag of --repo, default main     (REPO_REF)
  --jax SPEC                pip spec of TPU jax, default 'jax[tpu]'   (JAX_SPEC)
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

NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-v4-8}"
VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
MODEL_DIR="${MODEL_DIR:-}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
SPOT=0
DELETE=0
DRY_RUN=0
ARGS=()

while (($#)); do
  case "$1" in
    --name | --zone | --project | --accelerator-type | --version | --model-dir | --repo | --ref | --jax)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --name) NAME="$2" ;;
        --zone) ZONE="$2" ;;
        --project) PROJECT="$2" ;;
        --accelerator-type) ACCELERATOR_TYPE="$2" ;;
        --version) VERSION="$2" ;;
        --model-dir) MODEL_DIR="$2" ;;
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
[[ -n "$MODEL_DIR" ]] || die "--model-dir (or MODEL_DIR) is required"
[[ "$MODEL_DIR" =~ ^gs://([^/]+)(/.*)?$ ]] ||
  die "--model-dir must be gs://BUCKET/PATH (every worker writes checkpoints there), got '$MODEL_DIR'"
BUCKET="${BASH_REMATCH[1]}"
MOUNT="/mnt/gcs/$BUCKET"
RUN_DIR="$MOUNT${BASH_REMATCH[2]}"
((${#ARGS[@]})) || die "give the tensorpoly command after '--', e.g. -- train --gin_file=..."
case "${ARGS[0]}" in
  train | adapt | eval | sweep) ;;
  *) die "'${ARGS[0]}' is not a command to run on a pod; use train, adapt, eval or sweep" ;;
esac

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

# 3. Install: TPU jax, the project, the templates, and gcsfuse for the shared run directory.
gcsfuse_repo="gcsfuse-\$(lsb_release -c -s)"  # expanded on the worker
on_workers all "set -e; cd $CHECKOUT
python3 -m pip install -q --upgrade pip
python3 -m pip install -q $(printf '%q' "$JAX_SPEC") -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
python3 -m pip install -q -e .
python3 -m tensorpoly_jax install-templates
if ! command -v gcsfuse >/dev/null; then
  echo \"deb https://packages.cloud.google.com/apt $gcsfuse_repo main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT"

# 4. Run on all workers in the background (an ssh drop does not kill the run), then follow
# worker 0's log until its exit status appears.
command_line="$(printf '%q ' python3 -m tensorpoly_jax "${ARGS[@]}" "--model_dir=$RUN_DIR")"
on_workers all "cd $CHECKOUT && rm -f ~/tensorpoly.rc && (TENSORPOLY_MULTIHOST=1 nohup $command_line; echo \$? > ~/tensorpoly.rc) > ~/tensorpoly.log 2>&1 < /dev/null &"
on_workers 0 "tail -n +1 -F ~/tensorpoly.log & while [ ! -f ~/tensorpoly.rc ]; do sleep 10; done; sleep 2; kill %1; exit \$(cat ~/tensorpoly.rc)"
