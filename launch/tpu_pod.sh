#!/usr/bin/env bash
# Runs bssl on a Cloud TPU VM slice (one process per TPU VM host):
#   1. create the slice (or reuse it with --reuse),
#   2. copy a clean copy of the checkout to every worker,
#   3. install requirements.txt + jax[tpu] (same jax version) in a venv on every worker,
#   4. start `python -m bssl.main ...` on all workers with BSSL_DISTRIBUTED=1 (JAX finds
#      the coordinator, process count and ids from the TPU VM metadata) and stream the logs,
#   5. delete the slice with --teardown.
#
# The job runs detached on the workers (setsid + nohup, output to a log file) and the ssh
# session only follows the log with `tail -F`: a dropped ssh (or Ctrl-C here) does not stop
# the job. A `... | tee log` pipeline would not do: once ssh is gone, tee gets SIGPIPE and
# the job is killed by the next write. See --help for re-attaching and stopping.
#
# Nothing here runs gcloud in --dry_run mode; the commands are printed instead.
set -euo pipefail

readonly PROG="tpu_pod.sh"
readonly REMOTE_DIR="bssl"             # checkout on each worker: ~/bssl
readonly REMOTE_VENV="bssl_venv"       # virtualenv on each worker: ~/bssl_venv
readonly REMOTE_LOGS="bssl_logs"       # logs on each worker: ~/bssl_logs/<run_id>.log

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name NAME --zone ZONE --accelerator_type TYPE [options] \
           -- BSSL_MAIN_ARGS...

Creates (or reuses) a Cloud TPU VM slice, copies this checkout to every worker,
installs the requirements, and runs `python -m bssl.main BSSL_MAIN_ARGS` on all
workers at once with BSSL_DISTRIBUTED=1, streaming the logs.

Required:
  --name NAME              TPU name (lowercase letters, digits, '-'; starts with a letter)
  --zone ZONE              zone, e.g. us-central2-b, europe-west4-a
  --accelerator_type TYPE  slice type, e.g. v4-8, v4-64, v5litepod-16, v5p-128, v6e-64

Options:
  --version VERSION        TPU software version / runtime image (default
                           tpu-ubuntu2204-base; Google suggests v2-alpha-tpuv5-lite for
                           v5e and v2-alpha-tpuv6e for v6e)
  --project PROJECT        GCP project (default: gcloud's configured project)
  --spot                   create a Spot slice (mutually exclusive with --preemptible)
  --preemptible            create a preemptible slice
  --reuse                  reuse the slice if it already exists (checked with
                           `gcloud compute tpus tpu-vm describe`); create it otherwise
  --repo_dir DIR           local checkout to copy (default: this repository's root)
  --remote_python PY       python (>= 3.11) used on the workers to make the venv
                           (default python3.11; installed with apt if missing)
  --skip_install           do not run the install step (venv already set up)
  --teardown               delete the slice when this script exits (also on failure or
                           Ctrl-C -- which then stops the job too)
  --dry_run                print every command (gcloud, staging, remote scripts) and exit
  -h, --help               show this help

The --workdir given to bssl.main must be a gs:// path or a shared filesystem mounted
on every worker (every worker writes to it); a warning is printed otherwise.

Logs and re-attaching: on each worker the job logs to ~/bssl_logs/<run_id>.log
(~/bssl_logs/latest.log points at the latest). The job survives a dropped ssh or a
Ctrl-C here; to follow it again:
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=0 \
      --command='tail -n 100 -F ~/bssl_logs/latest.log'
To stop it (SIGTERM: bssl checkpoints and exits; rerunning resumes from the workdir):
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all \
      --command='kill -TERM $(cat ~/bssl_logs/latest.pid)'

Example:
  launch/tpu_pod.sh --name bssl-v5p --zone us-east5-a --accelerator_type v5p-128 --spot \
      -- --config=configs/resnext.py --workdir=gs://my-bucket/bssl/run1
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  echo "Run 'launch/tpu_pod.sh --help' for usage." >&2
  exit 2
}

warn() { echo "$PROG: warning: $*" >&2; }
log() { echo "$PROG: $*" >&2; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

name=""
zone=""
accelerator_type=""
version="tpu-ubuntu2204-base"
project=""
spot=0
preemptible=0
reuse=0
repo_dir=$(cd "$script_dir/.." && pwd)
remote_python="python3.11"
skip_install=0
teardown=0
dry_run=0

# ---------------------------------------------------------------- arguments
# shellcheck source=_lib.sh
source "$script_dir/_lib.sh"
set_option() {
  case $1 in
    --spot) spot=1 ;;
    --preemptible) preemptible=1 ;;
    --reuse) reuse=1 ;;
    --teardown) teardown=1 ;;
    --skip_install) skip_install=1 ;;
    --dry_run | --dry-run) dry_run=1 ;;
    --name) name=$2 ;;
    --zone) zone=$2 ;;
    --accelerator_type) accelerator_type=$2 ;;
    --version) version=$2 ;;
    --project) project=$2 ;;
    --repo_dir) repo_dir=$2 ;;
    --remote_python) remote_python=$2 ;;
  esac
}
parse_options "--spot --preemptible --reuse --teardown --dry_run --dry-run --skip_install" \
  "--name --zone --accelerator_type --version --project --repo_dir --remote_python" \
  "bssl.main arguments go after '--'" "$@"
prog_args=("${PROGRAM_ARGS[@]}")

# --------------------------------------------------------------- validation
[[ -n $name ]] || die "--name is required: the TPU name (e.g. --name bssl-v4)"
[[ -n $zone ]] || die "--zone is required: a Cloud TPU zone (e.g. --zone us-central2-b)"
[[ -n $accelerator_type ]] ||
  die "--accelerator_type is required: a slice type such as v4-8, v4-64, v5litepod-16, v5p-128 or v6e-64"
[[ $name =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
  die "--name '$name' is not a valid TPU name: 1-63 characters, lowercase letters, digits and '-', starting with a letter and not ending with '-'"
[[ $zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
  die "--zone '$zone' does not look like a zone: expected REGION-LETTER, e.g. us-central2-b, europe-west4-a"
[[ $accelerator_type =~ ^v[2-9][a-z]*-[0-9]+$ ]] ||
  die "--accelerator_type '$accelerator_type' is not a TPU type: expected vGEN[VARIANT]-SIZE, e.g. v4-8, v4-64, v5litepod-16, v5p-128, v6e-64"
[[ $version =~ ^[A-Za-z0-9._-]+$ ]] ||
  die "--version '$version' is not a TPU software version (e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5)"
if [[ -n $project ]]; then
  [[ $project =~ ^[a-z][-a-z0-9.:]*[a-z0-9]$ ]] || die "--project '$project' is not a GCP project id"
fi
((spot + preemptible < 2)) || die "--spot and --preemptible are mutually exclusive"
[[ $remote_python =~ ^[A-Za-z0-9._/-]+$ ]] || die "--remote_python '$remote_python' is not a program name"
[[ -d $repo_dir ]] || die "--repo_dir '$repo_dir' is not a directory"
repo_dir=$(cd "$repo_dir" && pwd)
[[ -f $repo_dir/requirements.txt ]] ||
  die "--repo_dir '$repo_dir' has no requirements.txt (is it the bssl checkout?)"

# jax[tpu] at the version pinned in requirements.txt.
jax_version=$(sed -n 's/^[[:space:]]*jax[[:space:]]*==[[:space:]]*\([^[:space:];#]*\).*/\1/p' \
  "$repo_dir/requirements.txt" | head -n 1)
if [[ -n $jax_version ]]; then
  jax_tpu="jax[tpu]==$jax_version"
else
  warn "no 'jax==VERSION' pin in $repo_dir/requirements.txt; installing an unpinned jax[tpu]"
  jax_tpu="jax[tpu]"
fi

# The workdir is written by every worker: it must be shared.
workdir=""
for ((k = 0; k < ${#prog_args[@]}; k++)); do
  case ${prog_args[k]} in
    --workdir=*) workdir=${prog_args[k]#--workdir=} ;;
    --workdir) workdir=${prog_args[k + 1]:-} ;;
  esac
done
if [[ -z $workdir ]]; then
  warn "no --workdir among the bssl.main arguments; pass a gs:// path or a shared filesystem"
elif [[ $workdir == gs://* ]]; then
  :
elif [[ $workdir != /* ]]; then
  warn "--workdir '$workdir' is a relative path: it would be local to each worker (and" \
    "replaced with the next copy of the checkout); use gs://BUCKET/... or a shared filesystem"
elif ! [[ $workdir =~ ^/(mnt|gcs|shared|nfs|filestore|lustre|data|home/shared)/ ]]; then
  warn "--workdir '$workdir' looks like a local path, but every worker writes to it;" \
    "use gs://BUCKET/... or a filesystem mounted on every worker"
fi

# ---------------------------------------------------------------- commands
gcloud_tpu=(gcloud compute tpus tpu-vm)
common_flags=("--zone=$zone")
[[ -n $project ]] && common_flags+=("--project=$project")

# run CMD...: print it, then run it (only print it in --dry_run mode).
run() {
  if ((dry_run)); then
    quote_cmd "$@"
  else
    echo "+ $(quote_cmd "$@")" >&2
    "$@"
  fi
}

step() { echo "# [$1] $2"; }

ssh_all() { # ssh_all REMOTE_SCRIPT: run a bash script on every worker
  run "${gcloud_tpu[@]}" ssh "$name" "${common_flags[@]}" --worker=all --command="$1"
}

run_id=$(date -u +%Y%m%d-%H%M%S)
quoted_args=""
for a in ${prog_args[@]+"${prog_args[@]}"}; do
  quoted_args+=" $(printf '%q' "$a")"
done

# Remote scripts (bash on the workers). Paths are relative to the worker's $HOME.
pidfile="\$HOME/$REMOTE_LOGS/latest.pid"
prepare_script="set -euo pipefail
if [ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null; then
  echo \"$PROG: a bssl run (pid \$(cat $pidfile)) is still running on \$(hostname); stop it with: kill -TERM \$(cat ~/$REMOTE_LOGS/latest.pid)\" >&2
  exit 1
fi
rm -rf \"\$HOME/$REMOTE_DIR\""

install_script="set -euo pipefail
cd \"\$HOME/$REMOTE_DIR\"
if ! command -v $remote_python >/dev/null 2>&1; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $remote_python $remote_python-venv
fi
[ -x \"\$HOME/$REMOTE_VENV/bin/python\" ] || $remote_python -m venv \"\$HOME/$REMOTE_VENV\"
\"\$HOME/$REMOTE_VENV/bin/python\" -m pip install -q --upgrade pip
\"\$HOME/$REMOTE_VENV/bin/python\" -m pip install -q -r requirements.txt \"$jax_tpu\""

run_script="cd \"\$HOME/$REMOTE_DIR\" && mkdir -p \"\$HOME/$REMOTE_LOGS\" || exit 1
log=\"\$HOME/$REMOTE_LOGS/$run_id.log\"
ln -sfn \"\$log\" \"\$HOME/$REMOTE_LOGS/latest.log\"
BSSL_DISTRIBUTED=1 PYTHONUNBUFFERED=1 setsid nohup \"\$HOME/$REMOTE_VENV/bin/python\" -m bssl.main$quoted_args >\"\$log\" 2>&1 </dev/null &
pid=\$!
echo \"\$pid\" >$pidfile
tail -n +1 -F -s 0.5 --pid=\"\$pid\" \"\$log\" 2>/dev/null | sed -u \"s/^/[\$(hostname)] /\"
wait \"\$pid\""

reattach_hint() {
  local p=""
  [[ -n $project ]] && p=" --project=$project"
  cat >&2 <<EOF
$PROG: the job runs detached on the workers; logs: ~/$REMOTE_LOGS/$run_id.log (also ~/$REMOTE_LOGS/latest.log)
$PROG: re-attach: gcloud compute tpus tpu-vm ssh $name --zone=$zone$p --worker=0 --command='tail -n 100 -F ~/$REMOTE_LOGS/latest.log'
$PROG: stop:      gcloud compute tpus tpu-vm ssh $name --zone=$zone$p --worker=all --command='kill -TERM \$(cat ~/$REMOTE_LOGS/latest.pid)'
EOF
}

# ------------------------------------------------------------------ steps
if ((dry_run)); then
  echo "# $PROG dry run: slice $name ($accelerator_type, $version) in $zone; run id $run_id"
else
  command -v gcloud >/dev/null 2>&1 || die "gcloud not found on PATH (install the Google Cloud SDK)"
fi

delete_slice() {
  step "5/5" "delete the slice (--teardown)"
  run "${gcloud_tpu[@]}" delete "$name" "${common_flags[@]}" --quiet
}
if ((teardown && !dry_run)); then
  trap 'rc=$?; delete_slice || warn "could not delete $name; delete it by hand"; exit $rc' EXIT
fi

create_flags=("--accelerator-type=$accelerator_type" "--version=$version")
((spot)) && create_flags+=(--spot)
((preemptible)) && create_flags+=(--preemptible)

if ((reuse)); then
  step "1/5" "reuse the slice if it exists"
  if ((dry_run)); then
    run "${gcloud_tpu[@]}" describe "$name" "${common_flags[@]}" "--format=value(state)"
    echo "# (if describe finds no slice, it is created as without --reuse)"
  else
    state=""
    if state=$("${gcloud_tpu[@]}" describe "$name" "${common_flags[@]}" "--format=value(state)" 2>/dev/null); then
      [[ $state == READY ]] ||
        die "slice $name exists but is in state '$state', not READY; delete it or wait (gcloud compute tpus tpu-vm delete $name --zone=$zone)"
      log "reusing slice $name (state $state)"
    else
      log "slice $name not found; creating it"
      run "${gcloud_tpu[@]}" create "$name" "${common_flags[@]}" "${create_flags[@]}"
    fi
  fi
else
  step "1/5" "create the slice"
  run "${gcloud_tpu[@]}" create "$name" "${common_flags[@]}" "${create_flags[@]}"
fi

step "2/5" "copy $repo_dir (files tracked or not ignored by git) to ~/$REMOTE_DIR on every worker"
if ((dry_run)); then
  stage="<staging_dir>/$REMOTE_DIR"
  echo "# staging: git -C $(printf '%q' "$repo_dir") ls-files -co --exclude-standard | tar ... into $stage"
else
  stage_root=$(mktemp -d "${TMPDIR:-/tmp}/bssl_stage.XXXXXX")
  stage="$stage_root/$REMOTE_DIR"
  mkdir -p "$stage"
  if git -C "$repo_dir" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$repo_dir" ls-files -z -co --exclude-standard |
      while IFS= read -r -d '' f; do
        if [[ -e $repo_dir/$f ]]; then printf '%s\0' "$f"; fi
      done |
      tar -C "$repo_dir" --null -T - -cf - | tar -C "$stage" -xf -
  else
    tar -C "$repo_dir" --exclude=.git --exclude=__pycache__ --exclude='*.pyc' \
      --exclude=.venv --exclude=venv --exclude=logs -cf - . | tar -C "$stage" -xf -
  fi
  log "staged $(find "$stage" -type f | wc -l | tr -d ' ') files ($(du -sh "$stage" | cut -f1)) in $stage"
fi
ssh_all "$prepare_script"
run "${gcloud_tpu[@]}" scp --recurse "$stage" "$name:" "${common_flags[@]}" --worker=all
if ((!dry_run)); then
  rm -rf "$stage_root"
fi

if ((skip_install)); then
  step "3/5" "install: skipped (--skip_install)"
else
  step "3/5" "install requirements.txt and $jax_tpu in ~/$REMOTE_VENV on every worker"
  ssh_all "$install_script"
fi

step "4/5" "run bssl.main on every worker (BSSL_DISTRIBUTED=1), streaming the logs"
((dry_run)) || reattach_hint
rc=0
ssh_all "$run_script" || rc=$?
if ((!dry_run)); then
  if ((rc == 0)); then
    log "run $run_id finished on all workers"
  else
    log "run $run_id: ssh exited with $rc (the job failed, or the connection dropped)"
    reattach_hint
  fi
fi

if ((teardown && dry_run)); then
  delete_slice
fi
exit "$rc"
