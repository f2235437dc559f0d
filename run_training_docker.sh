#!/usr/bin/env bash
# Fine-tune SAM 2 inside the training container. Run with --help for the variables it reads.
set -euo pipefail

readonly PROG="run_training_docker.sh"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly REPO_DIR

usage() {
  cat <<'EOF'
Usage: ./run_training_docker.sh [--build] [--dry-run] [--dev] [--] [HYDRA_OVERRIDE ...]

Runs `python training/train.py -c $SAM2_CONFIG --use-cluster 0` in the training image, with your
dataset, checkpoints and log folder mounted. Extra arguments are passed to train.py as Hydra
overrides, e.g.  scratch.base_lr=1e-5 scratch.num_epochs=20

Environment variables:
  SAM2_DATASET      host folder with your data (e.g. images/ + masks/), mounted read-only at
                    /workspace/dataset. Required.
  SAM2_CONFIG       training config for -c (default: sam2.1_training/custom_finetune).
  SAM2_CHECKPOINTS  host folder with initial weights (e.g. sam2.1_hiera_base_plus.pt), mounted
                    read-only at /checkpoints. Optional.
  SAM2_LOGS         host folder for sam2_logs/ (checkpoints, TensorBoard, logs); created as you
                    if missing (default: ./sam2_logs).
  SAM2_GPUS         value for `docker run --gpus` (default: all); `none` trains on the CPU.
  SAM2_NUM_GPUS     value for train.py --num-gpus (default: the config's launcher.gpus_per_node;
                    0 when SAM2_GPUS=none).
  SAM2_IMAGE        image tag (default: sam2-training:local).
  SAM2_SHM_SIZE     shared memory for data-loader workers when --ipc=host is not wanted
                    (default: unset, the container shares the host's IPC namespace).
  DOCKER            docker command to use (default: docker).

Options:
  --build     (re)build the image first; it is built automatically when missing.
  --dry-run   print the docker commands instead of running them.
  --dev       mount this checkout over /workspace, so code edits need no rebuild.
  -h, --help  show this help.
EOF
}

die() {
  echo "$PROG: $*" >&2
  exit 2
}

# The value of a `--mount` field, CSV-quoted when the path contains a comma or a quote.
mount_field() {
  local key="$1" value="$2"
  if [[ "$value" == *,* || "$value" == *\"* ]]; then
    printf '"%s=%s"' "$key" "${value//\"/\"\"}"
  else
    printf '%s=%s' "$key" "$value"
  fi
}

# Absolute path of an existing directory named by a variable, or exit 2 naming both.
existing_dir() {
  local var="$1" path="$2"
  [[ -e "$path" ]] || die "$var=$path does not exist; set $var to an existing folder."
  [[ -d "$path" ]] || die "$var=$path is not a folder; set $var to a folder."
  (cd "$path" && pwd)
}

run_or_print() {
  if ((dry_run)); then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

build=0
dry_run=0
dev=0
overrides=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --build) build=1 ;;
    --dry-run) dry_run=1 ;;
    --dev) dev=1 ;;
    --) shift; overrides+=("$@"); break ;;
    *) overrides+=("$1") ;;
  esac
  shift
done

docker_cmd="${DOCKER:-docker}"
config="${SAM2_CONFIG:-sam2.1_training/custom_finetune}"
image="${SAM2_IMAGE:-sam2-training:local}"
gpus="${SAM2_GPUS:-all}"
num_gpus="${SAM2_NUM_GPUS:-}"

[[ -n "${SAM2_DATASET:-}" ]] || die "SAM2_DATASET is not set; point it at your dataset folder (e.g. one with images/ and masks/)."
dataset_dir="$(existing_dir SAM2_DATASET "$SAM2_DATASET")"
checkpoints_dir=""
if [[ -n "${SAM2_CHECKPOINTS:-}" ]]; then
  checkpoints_dir="$(existing_dir SAM2_CHECKPOINTS "$SAM2_CHECKPOINTS")"
fi
logs_path="${SAM2_LOGS:-$PWD/sam2_logs}"
if [[ ! -d "$logs_path" ]]; then
  mkdir -p -- "$logs_path" || die "SAM2_LOGS=$logs_path cannot be created."
fi
logs_dir="$(existing_dir SAM2_LOGS "$logs_path")"

if [[ -n "$num_gpus" && ! "$num_gpus" =~ ^[0-9]+$ ]]; then
  die "SAM2_NUM_GPUS=$num_gpus is not a whole number."
fi
if [[ "$gpus" == "none" ]]; then
  [[ -z "$num_gpus" || "$num_gpus" == 0 ]] || die "SAM2_NUM_GPUS=$num_gpus but SAM2_GPUS=none; set SAM2_GPUS (e.g. all) or SAM2_NUM_GPUS=0."
  num_gpus=0
fi

command -v "$docker_cmd" > /dev/null 2>&1 || die "'$docker_cmd' not found; install Docker (https://docs.docker.com/engine/install/) or set DOCKER."

if [[ "$gpus" != "none" ]]; then
  runtimes="$("$docker_cmd" info --format '{{json .Runtimes}}' 2> /dev/null || true)"
  if [[ "$runtimes" != *nvidia* ]] && ! command -v nvidia-container-cli > /dev/null 2>&1; then
    die "GPUs were asked for (SAM2_GPUS=$gpus) but Docker has no NVIDIA runtime; install the NVIDIA Container Toolkit, or set SAM2_GPUS=none to train on the CPU."
  fi
fi

if ((build)) || ! "$docker_cmd" image inspect "$image" > /dev/null 2>&1; then
  run_or_print "$docker_cmd" build -f "$REPO_DIR/Dockerfile.training" \
    --build-arg "USER_UID=$(id -u)" --build-arg "USER_GID=$(id -g)" -t "$image" "$REPO_DIR"
fi

# Data-loader workers pass batches through /dev/shm; Docker's default 64 MB is far too small.
shm_opt="--ipc=host"
if [[ -n "${SAM2_SHM_SIZE:-}" ]]; then
  shm_opt="--shm-size=$SAM2_SHM_SIZE"
fi
run_args=(run --rm --init "$shm_opt" --ulimit memlock=-1 --ulimit stack=67108864 --user "$(id -u):$(id -g)")
if [[ -t 0 && -t 1 ]]; then
  run_args+=(-it)
fi
if [[ "$gpus" != "none" ]]; then
  run_args+=(--gpus "$gpus")
fi
if ((dev)); then
  run_args+=(--mount "type=bind,$(mount_field source "$REPO_DIR"),target=/workspace")
fi
run_args+=(--mount "type=bind,$(mount_field source "$dataset_dir"),target=/workspace/dataset,readonly")
if [[ -n "$checkpoints_dir" ]]; then
  run_args+=(--mount "type=bind,$(mount_field source "$checkpoints_dir"),target=/checkpoints,readonly")
fi
run_args+=(--mount "type=bind,$(mount_field source "$logs_dir"),target=/workspace/sam2_logs")
run_args+=(--env "SAM2_CONFIG=$config" "$image" -c "$config" --use-cluster 0)
if [[ -n "$num_gpus" ]]; then
  run_args+=(--num-gpus "$num_gpus")
fi
run_args+=("${overrides[@]}")

if ((dry_run)); then
  run_or_print "$docker_cmd" "${run_args[@]}"
  exit 0
fi
# exec: the container's exit status and Ctrl-C reach the caller directly.
exec "$docker_cmd" "${run_args[@]}"
