"""The documentation that is generated or checked: docs/config.md is what
``python -m bssl.config`` prints (regenerate it when a field changes), the README stays
a reference of modest size whose two set-up commands are the ones CI runs, and code that
points to a README section names one it has."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_config_reference_is_up_to_date():
  from bssl import config

  want = config.reference_markdown()
  with open(os.path.join(ROOT, "docs", "config.md")) as f:
    got = f.read()
  assert got == want, (
      "docs/config.md is out of date: run " "`python -m bssl.config > docs/config.md`"
  )
  for field in config.all_fields():  # every field is documented
    name = field.name
    for s in config.TRAIN_SECTIONS:
      if name.startswith(s + "."):
        name = "<stage>." + name[len(s) + 1 :]
    assert f"| `{name}` |" in got, name


def test_config_reference_command_prints_it():
  r = subprocess.run(
      [sys.executable, "-m", "bssl.config"], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert r.returncode == 0 and r.stdout.startswith("# Config reference")


def test_readme_is_a_reference_and_ci_runs_its_test_command():
  readme = open(os.path.join(ROOT, "README.md")).read()
  assert len(readme.encode()) < 12_000, len(readme.encode())  # issue 22: under 12 KB
  test_cmd = "bash setup.sh --dev && .venv/bin/python -m pytest -q tests"
  assert test_cmd in readme.split("\n\n")[1]  # among the opening two commands
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert ci.strip().splitlines()[-1] == test_cmd
  for link in (
      "docs/config.md",
      "docs/reproduction.md",
      "docs/demo.md",
      "docs/performance.md",
      "docs/video.md",
  ):
    assert link in readme and os.path.exists(os.path.join(ROOT, link)), link
  video_doc = open(os.path.join(ROOT, "docs", "video.md")).read()
  assert "figures/video_dhat.png" in video_doc
  assert os.path.exists(os.path.join(ROOT, "docs", "figures", "video_dhat.png"))


def test_pointers_to_readme_sections_name_sections_it_has():
  """Messages and comments that send users to a README section (``README "X"``, ``README,
  "X"``) name a section the README has: sections that moved to docs/ are pointed to there."""
  import re

  readme = open(os.path.join(ROOT, "README.md")).read()
  sections = {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", readme, re.M)}
  bad = []
  for folder in ("bssl", "launch", "benchmarks", "tools"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
      for name in files:
        if not name.endswith((".py", ".sh", ".sbatch")):
          continue
        path = os.path.join(dirpath, name)
        text = " ".join(open(path, encoding="utf-8").read().replace("#", " ").split())
        for m in re.finditer(r"""README,? (["'])(.+?)\1""", text):
          if m.group(2) not in sections:
            bad.append(f"{os.path.relpath(path, ROOT)}: README {m.group(2)!r}")
  assert not bad, bad
