#!/usr/bin/env bash
# bssl on a Cloud TPU VM slice, one process per TPU VM host (launch/README.md):
#   launch/tpu_pod.sh --name NAME --zone ZONE --accelerator_type TYPE [options] \
#       -- BSSL_MAIN_ARGS...
# Each step is one gcloud command, printed before it runs; gcloud checks its own arguments.
#   1. create the slice (--reuse: `describe` first, create only if it is missing)
#   2. copy the checkout (files git tracks or does not ignore) to ~/bssl on every worker
#   3. pip install requirements.txt and jax[tpu] (requirements.txt's jax) in ~/bssl_venv
#   4. run BSSL_DISTRIBUTED=1 python -m bssl.main BSSL_MAIN_ARGS on every worker (JAX finds
#      the coordinator and process ids itself), detached, following its log
#   5. --teardown: delete the slice when this script exits (also on failure or Ctrl-C)
# Options:
#   --version V         runtime image (default tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite)
#   --project P         GCP project (default: gcloud's)
#   --spot, --preemptible   a Spot / preemptible slice
#   --reuse, --teardown     as above
#   --repo_dir DIR      checkout to copy (default: this one)
#   --remote_python PY  python >= 3.11 for the venv (default python3.11; apt-installed if missing)
#   --skip_install      skip step 3
#   --dry_run           print the commands, run nothing
# --workdir must be gs://... or a filesystem every worker mounts. The job survives a dropped
# ssh or a Ctrl-C here (log: ~/bssl_logs/latest.log on each worker); to re-attach / stop it:
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=0 --command='tail -n 100 -F ~/bssl_logs/latest.log'
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command='kill -TERM $(cat ~/bssl_logs/latest.pid)'
set -euo pipefail

usage() { sed -n '2,/^set /s/^# \{0,1\}//p' "$0"; }
die() { echo "tpu_pod.sh: error: $*" >&2 && exit 2; }
log() { echo "tpu_pod.sh: $*" >&2; }

name="" zone="" accelerator_type="" version=tpu-ubuntu2204-base project="" remote_python=python3.11
spot=0 preemptible=0 reuse=0 skip_install=0 teardown=0 dry_run=0
repo_dir=$(cd "$(dirname "$0")/.." && pwd)
while (($#)); do
  case $1 in
    --) shift && break ;;
    -h | --help) usage && exit 0 ;;
    --spot | --preemptible | --reuse | --skip_install | --teardown | --dry_run) printf -v "${1#--}" 1 ;;
    --name | --zone | --accelerator_type | --version | --project | --repo_dir | --remote_python)
      (($# > 1)) || die "option $1 needs a value"
      printf -v "${1#--}" %s "$2" && shift ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" && continue ;;
    *) die "unknown option '$1' (bssl.main arguments go after '--')" ;;
  esac
  shift
done
[[ -n $name ]] || die "--name is required: the TPU name (e.g. --name bssl-v4)"
[[ -n $zone ]] || die "--zone is required: a Cloud TPU zone (e.g. --zone us-central2-b)"
[[ -n $accelerator_type ]] || die "--accelerator_type is required: e.g. v4-8, v5litepod-16, v5p-128"
[[ -f $repo_dir/requirements.txt ]] || die "--repo_dir '$repo_dir' is not a bssl checkout"
workdir="" prev=""
for a in "$@"; do
  [[ $prev == --workdir ]] && workdir=$a
  [[ $a == --workdir=* ]] && workdir=${a#--workdir=}
  prev=$a
done
case $workdir in
  gs://* | /mnt/* | /gcs/* | /shared/* | /nfs/*) ;;
  *) log "warning: --workdir '$workdir': every worker writes to it; use gs://BUCKET/... or a" \
    "filesystem mounted on every worker" ;;
esac
jax_pin=$(sed -n 's/^jax==\([^[:space:];#]*\).*/\1/p' "$repo_dir/requirements.txt" | head -n 1)
jax_tpu="jax[tpu]${jax_pin:+==$jax_pin}"

q() { # the words, shell-quoted (single quotes, readable for multi-line scripts)
  local w s=""
  for w; do [[ $w =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]] || w="'${w//\'/\'\\\'\'}'" && s+="$w "; done
  echo "${s% }"
}
run() { if ((dry_run)); then q "$@"; else echo "+ $(q "$@")" >&2 && "$@"; fi; }
tpu=(gcloud compute tpus tpu-vm)
at=("--zone=$zone" ${project:+"--project=$project"})
ssh_all() { run "${tpu[@]}" ssh "$name" "${at[@]}" --worker=all --command="$1"; }
run_id=$(date -u +%Y%m%d-%H%M%S)
args=""
(($#)) && args=$(printf ' %q' "$@")
# The job runs detached (setsid nohup): ssh only follows its log, so a dropped ssh does
# not kill it (with `| tee`, the next write after ssh is gone would).
prepare="if kill -0 \"\$(cat ~/bssl_logs/latest.pid 2>/dev/null)\" 2>/dev/null; then
  echo \"a bssl run is still running on \$(hostname): kill -TERM \$(cat ~/bssl_logs/latest.pid)\" >&2; exit 1
fi
rm -rf ~/bssl"
install="set -e; cd ~/bssl
command -v $remote_python >/dev/null || { sudo apt-get update -qq &&
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $remote_python $remote_python-venv; }
[ -x ~/bssl_venv/bin/python ] || $remote_python -m venv ~/bssl_venv
~/bssl_venv/bin/python -m pip install -q --upgrade pip
~/bssl_venv/bin/python -m pip install -q -r requirements.txt '$jax_tpu'"
launch="cd ~/bssl && mkdir -p ~/bssl_logs || exit 1
log=~/bssl_logs/$run_id.log && ln -sfn \$log ~/bssl_logs/latest.log
BSSL_DISTRIBUTED=1 PYTHONUNBUFFERED=1 setsid nohup ~/bssl_venv/bin/python -m bssl.main$args >\$log 2>&1 </dev/null &
echo \$! >~/bssl_logs/latest.pid
tail -n +1 -F -s 0.5 --pid=\$! \$log 2>/dev/null | sed -u \"s/^/[\$(hostname)] /\"
wait \$(cat ~/bssl_logs/latest.pid)"
hint="logs: ~/bssl_logs/$run_id.log on each worker; re-attach: ${tpu[*]} ssh $name ${at[*]} --worker=0
  --command='tail -n 100 -F ~/bssl_logs/latest.log'; stop: ... --worker=all --command='kill -TERM \$(cat ~/bssl_logs/latest.pid)'"

echo "# tpu_pod.sh$( ((dry_run)) && echo " dry run"): slice $name ($accelerator_type, $version) in $zone; run $run_id"
delete() { echo "# [5/5] delete the slice" && run "${tpu[@]}" delete "$name" "${at[@]}" --quiet; }
((teardown && !dry_run)) && trap 'rc=$?; delete || log "could not delete $name"; exit $rc' EXIT
create=("${tpu[@]}" create "$name" "${at[@]}" "--accelerator-type=$accelerator_type" "--version=$version")
((spot)) && create+=(--spot)
((preemptible)) && create+=(--preemptible)
if ((reuse)); then
  echo "# [1/5] reuse the slice if it exists, else create it"
  if ((dry_run)); then
    run "${tpu[@]}" describe "$name" "${at[@]}"
  elif "${tpu[@]}" describe "$name" "${at[@]}" >/dev/null 2>&1; then
    log "reusing slice $name"
  else
    run "${create[@]}"
  fi
else
  echo "# [1/5] create the slice" && run "${create[@]}"
fi

echo "# [2/5] copy $repo_dir (git's files) to ~/bssl on every worker"
stage="<staging_dir>/bssl"
if ((!dry_run)); then
  stage=$(mktemp -d)/bssl && mkdir "$stage"
  if git -C "$repo_dir" rev-parse 2>/dev/null; then
    git -C "$repo_dir" ls-files -z -co --exclude-standard |
      tar -C "$repo_dir" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$stage" -xf -
  else
    tar -C "$repo_dir" --exclude=.git --exclude=.venv --exclude=__pycache__ -cf - . | tar -C "$stage" -xf -
  fi
fi
ssh_all "$prepare"
run "${tpu[@]}" scp --recurse "$stage" "$name:" "${at[@]}" --worker=all
((dry_run)) || rm -rf "$(dirname "$stage")"
if ((!skip_install)); then
  echo "# [3/5] install requirements.txt and $jax_tpu in ~/bssl_venv" && ssh_all "$install"
fi
echo "# [4/5] run bssl.main on every worker (BSSL_DISTRIBUTED=1), following the logs"
((dry_run)) || log "$hint"
rc=0
ssh_all "$launch" || rc=$?
((rc == 0 || dry_run)) || log "ssh exited with $rc (the job failed, or ssh dropped); $hint"
((teardown && dry_run)) && delete
exit "$rc"
