"""Tests of the launchers in launch/: --help, --dry_run output, argument validation, a real
2-process CPU run of local.sh (bssl/cli/local.py, bssl/launcher.py), and the non-dry paths of
tpu_pod.sh / gpu_slurm.sbatch with fake `gcloud` / `srun` executables on PATH (nothing leaves
this machine)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path
from unittest import mock

import pytest

from bssl.cli import local as local_cli

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
LOCAL = LAUNCH / "local.sh"
TPU = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "gpu_slurm.sbatch"

TPU_REQUIRED = ["--name", "bssl-test", "--zone", "us-central2-b", "--accelerator_type", "v4-64"]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "BSSL_"))}
  env.update(extra)
  return env


def run(script, *args, env=None, timeout=60, cwd=None):
  return subprocess.run(
      ["bash", str(script), *map(str, args)],
      capture_output=True,
      text=True,
      env=env or _env(),
      timeout=timeout,
      cwd=cwd,
  )


def run_local(*args, env=None):
  """``launch/local.sh ARGS`` for a dry run or an argument error, in this process: what
  local.sh execs (``bssl.cli.local.main``), without an interpreter start per case."""
  out, err = StringIO(), StringIO()
  with mock.patch.dict(os.environ, env or _env(), clear=True):
    with redirect_stdout(out), redirect_stderr(err):
      try:
        rc = local_cli.main(["local.sh", *map(str, args)])
      except SystemExit as e:
        rc = e.code
  return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def commands(stdout):
  """The non-comment lines of a dry run, each split like the shell would."""
  out, buf = [], ""
  for line in stdout.splitlines():
    if not buf and (not line.strip() or line.startswith("#")):
      continue
    buf = f"{buf}\n{line}" if buf else line
    try:
      out.append(shlex.split(buf))
      buf = ""
    except ValueError:  # an open quote: the command goes on on the next line
      pass
  assert not buf, f"unterminated command in dry run output: {buf!r}"
  return out


def env_of(cmd):
  assert cmd[0] == "env", cmd
  env = {}
  for word in cmd[1:]:
    if "=" not in word:
      break
    k, v = word.split("=", 1)
    env[k] = v
  return env, cmd[1 + len(env) :]


# ------------------------------------------------------------------- --help


@pytest.mark.parametrize(
    "script,options",
    [
        (
            LOCAL,
            [
                "--num_processes",
                "--devices_per_process",
                "--port",
                "--log_dir",
                "--module",
                "--python_script",
                "--dry_run",
            ],
        ),
        (
            TPU,
            [
                "--name",
                "--zone",
                "--accelerator_type",
                "--version",
                "--project",
                "--spot",
                "--preemptible",
                "--reuse",
                "--repo_dir",
                "--teardown",
                "--dry_run",
                "re-attach",
            ],
        ),
        (SLURM, ["--dry_run", "--python", "--module", "sbatch", "BSSL_LOCAL_DEVICE_IDS"]),
    ],
)
def test_help(script, options):
  for flag in ("--help", "-h"):
    r = run(script, flag)
    assert r.returncode == 0, r.stderr
    for opt in options:
      assert opt in r.stdout, (script.name, opt)


def test_scripts_are_strict_bash():
  for script in (LOCAL, TPU, SLURM):
    text = script.read_text()
    assert text.startswith("#!"), script
    assert "set -euo pipefail" in text, script
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
  r = subprocess.run(
      [
          "shellcheck",
          "-x",
          "-P",
          str(LAUNCH),
          str(LOCAL),
          str(TPU),
          str(SLURM),
      ],
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ local.sh


def test_local_dry_run_three_processes(tmp_path):
  workdir = tmp_path / "run"
  r = run_local(
      "--num_processes",
      3,
      "--devices_per_process",
      4,
      "--dry_run",
      "--",
      "--config=configs/demo.py:tiny",
      f"--workdir={workdir}",
      "--config.name=a b",
  )
  assert r.returncode == 0, r.stderr
  assert not workdir.exists(), "a dry run must not create anything"
  cmds = commands(r.stdout)
  assert len(cmds) == 3
  coordinators = set()
  for i, cmd in enumerate(cmds):
    env, argv = env_of(cmd)
    assert env["BSSL_DISTRIBUTED"] == "1"
    assert env["BSSL_PROCESS_ID"] == str(i)
    assert env["BSSL_NUM_PROCESSES"] == "3"
    assert env["JAX_PLATFORMS"] == "cpu"
    assert "--xla_force_host_platform_device_count=4" in env["XLA_FLAGS"].split()
    assert str(REPO) in env["PYTHONPATH"].split(":")
    coordinators.add(env["BSSL_COORDINATOR_ADDRESS"])
    assert argv[1:] == [
        "-m",
        "bssl.main",
        "--config=configs/demo.py:tiny",
        f"--workdir={workdir}",
        "--config.name=a b",
    ]
    assert f"{workdir}/logs/process_{i}.log" in r.stdout
  (coordinator,) = coordinators
  host, port = coordinator.rsplit(":", 1)
  assert host == "127.0.0.1" and 0 < int(port) < 65536


def test_local_dry_run_options(tmp_path):
  r = run_local(
      "--dry_run",
      "--port=12345",
      "--module",
      "bssl.other",
      "--log_dir",
      tmp_path,
      "--python",
      sys.executable,
      "--",
      "--workdir",
      "gs://bucket/x",
  )
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  assert len(cmds) == 2  # default --num_processes
  for i, cmd in enumerate(cmds):
    env, argv = env_of(cmd)
    assert env["BSSL_COORDINATOR_ADDRESS"] == "127.0.0.1:12345"
    assert "--xla_force_host_platform_device_count=1" in env["XLA_FLAGS"]
    assert argv == [sys.executable, "-m", "bssl.other", "--workdir", "gs://bucket/x"]
    assert f"{tmp_path}/process_{i}.log" in r.stdout
  # Default log dir is ./logs when the workdir is not local.
  r = run_local("--dry_run", "--", "--workdir=gs://bucket/x")
  assert "./logs/process_0.log" in r.stdout


def test_local_dry_run_keeps_other_xla_flags():
  r = run_local(
      "--dry_run",
      "--devices_per_process",
      8,
      env=_env(XLA_FLAGS="--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2"),
  )
  env, _ = env_of(commands(r.stdout)[0])
  assert env["XLA_FLAGS"].split() == [
      "--xla_dump_to=/tmp/d",
      "--xla_force_host_platform_device_count=8",
  ]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--num_processes", "0"], "'0'"),
        (["--num_processes", "two"], "'two'"),
        (["--devices_per_process", "-1"], "'-1'"),
        (["--port", "70000"], "'70000'"),
        (["--module", "not a module"], "'not a module'"),
        (["--python_script", "/nonexistent/x.py"], "/nonexistent/x.py"),
        (["--module", "a.b", "--python_script", __file__], "mutually exclusive"),
        (["--bogus"], "'--bogus'"),
        (["--num_processes"], "--num_processes needs a value"),
        (["--python", "/nonexistent/python"], "/nonexistent/python"),
    ],
)
def test_local_invalid_arguments(args, needle):
  r = run_local(*args, "--dry_run")
  assert r.returncode != 0
  assert needle in r.stderr, r.stderr
  assert r.stdout == ""


ALLGATHER = """
import os, sys
sys.path.insert(0, REPO)
import jax
from bssl import parallel
assert os.environ.get("BSSL_DISTRIBUTED") == "1"
jax.distributed.initialize(**parallel.distributed_kwargs_from_env(), initialization_timeout=60)
import numpy as np
from jax.experimental import multihost_utils
me = jax.process_index()
values = multihost_utils.process_allgather(np.array([10.0 ** me]))
print(f"RESULT process={me} of={jax.process_count()} local_devices={jax.local_device_count()} "
      f"devices={jax.device_count()} total={float(np.sum(values))} args={sys.argv[1:]}", flush=True)
"""


def test_local_real_run_cross_process_sum(tmp_path):
  script = tmp_path / "allgather.py"
  script.write_text(ALLGATHER.replace("REPO", repr(str(REPO))))
  logs = tmp_path / "logs"
  args = (
      "--num_processes",
      2,
      "--devices_per_process",
      2,
      "--log_dir",
      logs,
      "--python",
      sys.executable,
      "--python_script",
      script,
      "--",
      "hello",
      "a b",
  )
  # gloo's CPU collectives very rarely hang after the allgather on a loaded CI machine
  # (process 0 prints its RESULT, the shutdown barrier never completes): one retry, with both
  # processes' logs in the failure message if it hangs twice.
  for attempt in range(2):
    try:
      r = run(LOCAL, *args, timeout=90)
      break
    except subprocess.TimeoutExpired as e:
      subprocess.run(["pkill", "-KILL", "-f", str(script)], check=False)
      if attempt:
        got = "".join(f"\n--- {p.name}:\n{p.read_text()}" for p in sorted(logs.glob("*.log")))
        pytest.fail(f"local.sh hung twice; {e}{got}")
  assert r.returncode == 0, r.stdout + r.stderr
  expected = "of=2 local_devices=2 devices=4 total=11.0 args=['hello', 'a b']"
  # Process 0 is streamed; both log to their files.
  assert f"RESULT process=0 {expected}" in r.stdout
  for i in range(2):
    assert f"RESULT process={i} {expected}" in (logs / f"process_{i}.log").read_text()


FAIL_ONE = """
import os, signal, sys, time
me = int(os.environ["BSSL_PROCESS_ID"])
def on_term(*_):
  print(f"process {me}: SIGTERM, checkpointing", flush=True)
  sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
print(f"process {me}: started", flush=True)
if me == int(os.environ.get("FAIL_ID", "-1")):
  # fail only once the others have installed their SIGTERM handler (slow starts under load)
  logs, n = os.environ["LOG_DIR"], int(os.environ["BSSL_NUM_PROCESSES"])
  deadline = time.monotonic() + 20
  others = [os.path.join(logs, f"process_{i}.log") for i in range(n) if i != me]
  while time.monotonic() < deadline and not all(
      os.path.exists(p) and "started" in open(p).read() for p in others):
    time.sleep(0.05)
  time.sleep(0.2)
  print(f"process {me}: something broke", flush=True)
  sys.exit(3)
time.sleep(60)
"""


def test_local_failing_process_stops_the_others(tmp_path):
  script = tmp_path / "fail_one.py"
  script.write_text(FAIL_ONE)
  logs = tmp_path / "logs"
  t0 = time.monotonic()
  r = run(
      LOCAL,
      "--num_processes",
      3,
      "--log_dir",
      logs,
      "--python",
      sys.executable,
      "--python_script",
      script,
      env=_env(FAIL_ID="1", LOG_DIR=str(logs)),
      timeout=60,
  )
  assert time.monotonic() - t0 < 30
  assert r.returncode == 3, r.stdout + r.stderr
  assert f"process 1 failed with exit code 3; log: {logs}/process_1.log" in r.stderr
  assert "something broke" in r.stderr  # the tail of the failing log is shown
  for i in (0, 2):  # the others got SIGTERM
    assert "SIGTERM, checkpointing" in (logs / f"process_{i}.log").read_text()


def test_local_forwards_sigterm(tmp_path):
  script = tmp_path / "wait.py"
  script.write_text(FAIL_ONE)
  logs = tmp_path / "logs"
  p = subprocess.Popen(
      [
          "bash",
          str(LOCAL),
          "--log_dir",
          str(logs),
          "--python",
          sys.executable,
          "--python_script",
          str(script),
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=_env(),
  )
  try:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
      if all(
          (logs / f"process_{i}.log").exists()
          and "started" in (logs / f"process_{i}.log").read_text()
          for i in range(2)
      ):
        break
      time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 143, out + err
  for i in range(2):
    assert "SIGTERM, checkpointing" in (logs / f"process_{i}.log").read_text()


# --------------------------------------------------------------- tpu_pod.sh


def _gcloud_cmds(stdout):
  return [c for c in commands(stdout) if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]


def _verb(cmds, verb):
  return [c for c in cmds if c[4] == verb]


def _command_of(cmd):
  (c,) = [w for w in cmd if w.startswith("--command=")]
  return c[len("--command=") :]


def test_tpu_dry_run_full(tmp_path):
  r = run(
      TPU,
      *TPU_REQUIRED,
      "--spot",
      "--project",
      "my-proj",
      "--dry_run",
      "--",
      "--config=configs/resnext.py",
      "--workdir=gs://bucket/run1",
      "--config.note=a b",
  )
  assert r.returncode == 0, r.stderr
  assert "warning" not in r.stderr
  cmds = _gcloud_cmds(r.stdout)
  assert [c[4] for c in cmds] == ["create", "ssh", "scp", "ssh", "ssh"]
  for c in cmds:
    assert "bssl-test" in c[5:7] or "bssl-test:" in c
    assert "--zone=us-central2-b" in c and "--project=my-proj" in c
  (create,) = _verb(cmds, "create")
  assert create[5] == "bssl-test"
  assert "--accelerator-type=v4-64" in create
  assert "--version=tpu-ubuntu2204-base" in create
  assert "--spot" in create and "--preemptible" not in create
  (scp,) = _verb(cmds, "scp")
  assert "--recurse" in scp and "--worker=all" in scp and "bssl-test:" in scp
  prepare, install, launch = _verb(cmds, "ssh")
  for c in (prepare, install, launch):
    assert "--worker=all" in c
  jax_pin = re.search(r"^jax==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
  install_script = _command_of(install)
  assert "pip install" in install_script and "-r requirements.txt" in install_script
  assert f"jax[tpu]=={jax_pin}" in install_script
  script = _command_of(launch)
  assert "BSSL_DISTRIBUTED=1" in script and "nohup" in script and "tail" in script
  # The program arguments reach bssl.main intact through the remote shell.
  (line,) = [l for l in script.splitlines() if "bssl.main" in l]
  argv = shlex.split(line.split(" -m bssl.main", 1)[1].split(">", 1)[0])
  assert argv == ["--config=configs/resnext.py", "--workdir=gs://bucket/run1", "--config.note=a b"]
  assert not _verb(cmds, "delete")


def test_tpu_dry_run_teardown_reuse_preemptible():
  r = run(
      TPU,
      *TPU_REQUIRED,
      "--teardown",
      "--reuse",
      "--preemptible",
      "--version=v2-alpha-tpuv5",
      "--dry_run",
      "--",
      "--config=c.py",
      "--workdir=gs://b/r",
  )
  assert r.returncode == 0, r.stderr
  cmds = _gcloud_cmds(r.stdout)
  assert [c[4] for c in cmds] == ["describe", "ssh", "scp", "ssh", "ssh", "delete"]
  assert not _verb(cmds, "create")
  (delete,) = _verb(cmds, "delete")
  assert delete[5] == "bssl-test" and "--zone=us-central2-b" in delete and "--quiet" in delete
  r = run(
      TPU,
      *TPU_REQUIRED,
      "--preemptible",
      "--version=v2-alpha-tpuv5",
      "--skip_install",
      "--dry_run",
      "--",
      "--workdir=gs://b/r",
  )
  cmds = _gcloud_cmds(r.stdout)
  (create,) = _verb(cmds, "create")
  assert "--preemptible" in create and "--version=v2-alpha-tpuv5" in create
  assert len(_verb(cmds, "ssh")) == 2  # prepare + run, no install


@pytest.mark.parametrize(
    "workdir,warned",
    [
        ("gs://bucket/run", False),
        ("/mnt/shared/run", False),
        ("/tmp/run", True),
        ("relative/run", True),
        (None, True),
    ],
)
def test_tpu_workdir_warning(workdir, warned):
  args = [f"--workdir={workdir}"] if workdir else []
  r = run(TPU, *TPU_REQUIRED, "--dry_run", "--", "--config=c.py", *args)
  assert r.returncode == 0
  assert ("warning" in r.stderr) == warned, r.stderr
  if warned and workdir:
    assert workdir in r.stderr


@pytest.mark.parametrize(
    "args,needles",
    [
        (TPU_REQUIRED[2:], ["--name is required"]),
        (TPU_REQUIRED[:2] + TPU_REQUIRED[4:], ["--zone is required", "us-central2-b"]),
        (TPU_REQUIRED[:4], ["--accelerator_type is required", "v5p-128"]),
        # (the name's, zone's and type's spelling, --spot with --preemptible: gcloud's checks)
        (TPU_REQUIRED + ["--repo_dir", "/nonexistent"], ["/nonexistent"]),
        (TPU_REQUIRED + ["--frobnicate"], ["'--frobnicate'"]),
    ],
)
def test_tpu_invalid_arguments(args, needles):
  r = run(TPU, *args, "--dry_run", "--", "--workdir=gs://b/r")
  assert r.returncode != 0
  for needle in needles:
    assert needle in r.stderr, r.stderr


def test_tpu_accepts_known_types():
  for t in ("v2-8", "v4-8", "v5litepod-16", "v5p-128", "v6e-64"):
    r = run(
        TPU,
        "--name",
        "x",
        "--zone",
        "europe-west4-a",
        "--accelerator_type",
        t,
        "--dry_run",
        "--",
        "--workdir=gs://b/r",
    )
    assert r.returncode == 0, (t, r.stderr)


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Fake gcloud: logs argv as JSON; `ssh` runs --command with bash in one fake worker's $HOME;
# `scp --recurse DIR NAME:` copies DIR there.
"$FAKE_PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >>"$FAKE_LOG"
verb=$4
case $verb in
  describe) [[ -n ${FAKE_EXISTS:-} ]] || { echo "ERROR: NOT_FOUND" >&2; exit 1; }; echo READY ;;
  scp) for a in "$@"; do if [[ -d $a ]]; then cp -R "$a" "$FAKE_HOME/"; fi; done ;;
  ssh)
    for a in "$@"; do
      if [[ $a == --command=* ]]; then HOME=$FAKE_HOME exec bash -c "${a#--command=}"; fi
    done ;;
esac
exit 0
"""

FAKE_MAIN = """
import os, sys
print(f"fake main: distributed={os.environ.get('BSSL_DISTRIBUTED')} args={sys.argv[1:]}",
      flush=True)
sys.exit(int(os.environ.get("FAKE_MAIN_RC", "0")))
"""


@pytest.mark.skipif(
    not all(shutil.which(t) for t in ("setsid", "nohup", "tail", "sed")),
    reason="needs setsid/nohup/tail/sed",
)
@pytest.mark.parametrize("exists,main_rc", [(False, 0), (True, 5)])
def test_tpu_real_run_with_fake_gcloud(tmp_path, exists, main_rc):
  # A tiny "checkout" with a fake bssl.main, a fake worker home with a venv python.
  repo = tmp_path / "repo"
  (repo / "bssl").mkdir(parents=True)
  (repo / "bssl" / "__init__.py").write_text("")
  (repo / "bssl" / "main.py").write_text(FAKE_MAIN)
  (repo / "requirements.txt").write_text("numpy\njax==0.10.2\n")
  home = tmp_path / "home"
  (home / "bssl_venv" / "bin").mkdir(parents=True)
  (home / "bssl_venv" / "bin" / "python").symlink_to(sys.executable)
  (home / "bssl").mkdir()
  (home / "bssl" / "stale.txt").write_text("from an older copy")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  log = tmp_path / "gcloud.log"
  env = _env(
      PATH=f"{bin_dir}:{os.environ['PATH']}",
      FAKE_LOG=str(log),
      FAKE_HOME=str(home),
      FAKE_PYTHON=sys.executable,
      FAKE_MAIN_RC=str(main_rc),
  )
  if exists:
    env["FAKE_EXISTS"] = "1"
  r = run(
      TPU,
      *TPU_REQUIRED,
      "--reuse",
      "--teardown",
      "--skip_install",
      "--repo_dir",
      repo,
      "--",
      "--config=c.py",
      "--workdir=gs://b/r",
      "--x=a b",
      env=env,
      timeout=60,
  )
  assert r.returncode == main_rc, r.stdout + r.stderr
  verbs = [json.loads(l)[3] for l in log.read_text().splitlines()]
  assert verbs == ["describe"] + ([] if exists else ["create"]) + ["ssh", "scp", "ssh", "delete"]
  # The job ran with the protocol and the arguments, its output streamed with a host prefix.
  assert re.search(
      r"^\[[^]]+\] fake main: distributed=1 args=\['--config=c.py', "
      r"'--workdir=gs://b/r', '--x=a b'\]$",
      r.stdout,
      re.M,
  ), r.stdout
  assert "fake main" in (home / "bssl_logs" / "latest.log").read_text()
  assert not (home / "bssl" / "stale.txt").exists()  # the old copy was replaced
  assert (home / "bssl" / "bssl" / "main.py").exists()
  assert "re-attach" in r.stderr


# --------------------------------------------------------- gpu_slurm.sbatch


def test_slurm_header():
  text = SLURM.read_text()
  header = text.split("set -euo pipefail")[0]
  for option in (
      "--nodes=8",
      "--ntasks-per-node=8",
      "--gpus-per-node=8",
      "--cpus-per-task=",
      "--signal=TERM@",
      "--requeue",
  ):
    assert re.search(rf"^#SBATCH {re.escape(option)}", header, re.M), option


def test_slurm_dry_run_outside_slurm():
  r = run(
      SLURM,
      "--dry_run",
      "--",
      "--config=configs/resnext.py",
      "--workdir=/shared/run1",
      "--config.note=a b",
  )
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  assert ["export", "BSSL_DISTRIBUTED=1"] in cmds
  assert any(c[:1] == ["export"] and c[1].startswith(f"PYTHONPATH={REPO}") for c in cmds)
  (srun,) = [c for c in cmds if c[0] == "srun"]
  assert "--kill-on-bad-exit=1" in srun
  i = srun.index("bash")
  assert srun[i + 1] == "-c" and "BSSL_LOCAL_DEVICE_IDS=$SLURM_LOCALID" in srun[i + 2]
  py = os.environ.get("PYTHON", "python3")  # conftest: this interpreter (the venv's)
  assert srun[i + 4 :] == [
      py,
      "-u",
      "-m",
      "bssl.main",
      "--config=configs/resnext.py",
      "--workdir=/shared/run1",
      "--config.note=a b",
  ]
  # Without `--`, the first non-launcher argument starts the program arguments.
  r2 = run(
      SLURM,
      "--dry_run",
      "--config=configs/resnext.py",
      "--workdir=/shared/run1",
      "--config.note=a b",
  )
  assert r2.stdout == r.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--", "--config=c.py", "--workdir=/shared/r"], "sbatch"),  # not in SLURM, not a dry run
        (["--dry_run", "--", "--workdir=/shared/r"], "--config"),
        (["--dry_run", "--", "--config=c.py"], "--workdir"),
        (["--dry_run", "--module", "no way", "--", "x"], "'no way'"),
        (["--dry_run", "--python_script", "/nonexistent.py"], "/nonexistent.py"),
        (["--dry_run", "--python"], "--python needs a value"),
    ],
)
def test_slurm_invalid(args, needle):
  r = run(SLURM, *args)
  assert r.returncode != 0
  assert needle in r.stderr, r.stderr


FAKE_SRUN = r"""#!/usr/bin/env bash
# Fake srun: logs its argv, then runs the task command as 2 local tasks (SLURM_LOCALID 0, 1).
"$FAKE_PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >>"$FAKE_LOG"
while [[ $1 == --* ]]; do shift; done
rc=0
for i in 0 1; do
  SLURM_LOCALID=$i SLURM_PROCID=$i "$@" || rc=$?
done
exit $rc
"""

TASK = """
import os, sys
print(f"task {os.environ['SLURM_PROCID']}: distributed={os.environ['BSSL_DISTRIBUTED']} "
      f"local_device_ids={os.environ['BSSL_LOCAL_DEVICE_IDS']} args={sys.argv[1:]}", flush=True)
"""


@pytest.mark.parametrize(
    "visible,expected", [(None, ["0", "1"]), ("0,1,2,3,4,5,6,7", ["0", "1"]), ("5", ["0", "0"])]
)
def test_slurm_inside_job_with_fake_srun(tmp_path, visible, expected):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(FAKE_SRUN)
  (bin_dir / "srun").chmod(0o755)
  task = tmp_path / "task.py"
  task.write_text(TASK)
  log = tmp_path / "srun.log"
  env = _env(
      PATH=f"{bin_dir}:{os.environ['PATH']}",
      FAKE_LOG=str(log),
      FAKE_PYTHON=sys.executable,
      SLURM_JOB_ID="4242",
      SLURM_NTASKS="2",
      SLURM_SUBMIT_DIR=str(REPO),
  )
  if visible is not None:
    env["CUDA_VISIBLE_DEVICES"] = visible
  r = run(
      SLURM,
      "--python",
      sys.executable,
      "--python_script",
      task,
      "--",
      "--a=1",
      "b c",
      env=env,
      cwd=tmp_path,
  )
  assert r.returncode == 0, r.stdout + r.stderr
  for i, ids in enumerate(expected):
    assert f"task {i}: distributed=1 local_device_ids={ids} args=['--a=1', 'b c']" in r.stdout
  (argv,) = [json.loads(l) for l in log.read_text().splitlines()]
  assert argv[0] == "--kill-on-bad-exit=1"
  assert "job 4242" in r.stderr
