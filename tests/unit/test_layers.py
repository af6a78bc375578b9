"""The habits that keep the house: the layers (import-linter's contracts in pyproject.toml),
imports at module top, and the formatter and the linter, so an upward import, an import
circle, a hidden import or a style drift fails the suite rather than a reviewer's eye."""

import ast
import os
import pathlib
import subprocess
import sys

from bssl import config, stages

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent

# Imported where used: heavy and needed by few paths (a backend, a data format, a storage
# scheme), so `import bssl.engine` and every decode worker process do not pay for them. A
# bssl module that imports one of them at its top (the PyTorch backend) counts as one.
HEAVY_OPTIONAL = {"torch", "torchvision", "av", "gcsfs", "tensorflow", "tensorflow_datasets"}
# Also imported where used, each for its reason:
EXCEPTIONS = {
    # gcsfs's interface: only gs:// paths reach it
    "fsspec",
    # ~2 s to import; only the `digits` data set (tests, examples) loads it
    "sklearn",
    # ~3.5 s (tensorboard's protobufs); only the main process of a training run with a log dir
    "tensorboardX",
    # ~1.5 s; only the report stage draws, and it picks the Agg backend before pyplot loads
    "matplotlib",
    # ~0.3 s; only D-hat's Parquet table (select's publication) writes with it
    "pyarrow",
}


def _run(args) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def _imports(tree):
  """(import node, inside a function or class body) for every import of a module."""
  out = []

  def walk(node, inside):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        out.append((child, inside))
      walk(
          child,
          inside
          or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)),
      )

  walk(tree, False)
  return out


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _names(node, here: str, modules) -> list[str]:
  """The modules an import statement imports (``from a import b``: ``a.b`` when a module)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  base = node.module or ""
  if node.level:  # relative, inside bssl: from the package of ``here`` (or ``here``'s own)
    parts = here.split(".")
    is_package = any(m.startswith(here + ".") for m in modules)
    pkg = parts[: len(parts) - node.level + (1 if is_package else 0)]
    base = ".".join(pkg + ([base] if base else []))
  out = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
  return out or [base]


def _tree():
  """{module name: its AST} of every module of bssl/."""
  return {
      _module_name(p): ast.parse(p.read_text(), str(p))
      for p in sorted((ROOT / "bssl").rglob("*.py"))
  }


def test_import_contracts():
  """The layers of pyproject.toml's [tool.importlinter]: cli -> sweep -> engine -> stages ->
  libraries -> foundations, models / data / selection independent, the record free of data
  formats, no circle. `lint-imports` reads the real graph (every import, wherever it is)."""
  r = _run([str(BIN / "lint-imports"), "--no-cache"])
  assert r.returncode == 0, r.stdout + r.stderr


def test_imports_at_module_top():
  """Every bssl import at module top (the graph is what a reader sees at the head of a
  file); inside functions only the heavy optional dependencies and EXCEPTIONS."""
  trees = _tree()
  heavy = set(HEAVY_OPTIONAL)  # + the bssl modules that import one at their top, or such a module
  grown = True
  while grown:
    grown = False
    for name, tree in trees.items():
      top = [n for node, inside in _imports(tree) if not inside for n in _names(node, name, trees)]
      if name not in heavy and any(n in heavy or n.split(".")[0] in heavy for n in top):
        heavy.add(name)
        grown = True
  hidden = []
  for name, tree in trees.items():
    for node, inside in _imports(tree):
      for imported in _names(node, name, trees) if inside else ():
        root = imported.split(".")[0]
        if imported not in heavy and root not in heavy | EXCEPTIONS:
          hidden.append(f"{name} (line {node.lineno}): {imported}")
  assert not hidden, "imports inside a function or class (move them to the top):\n" + "\n".join(
      hidden
  )


def test_format_and_lint():
  """pyink (2-space indent, line length 100) and ruff, as configured in pyproject.toml, on
  the whole tree."""
  pyink = _run([sys.executable, "-m", "pyink", "--check", "."])
  assert pyink.returncode == 0, "pyink --check .:\n" + pyink.stdout + pyink.stderr
  ruff = _run([sys.executable, "-m", "ruff", "check", "--no-cache", "."])
  assert ruff.returncode == 0, "ruff check .:\n" + ruff.stdout + ruff.stderr


def test_the_stage_table_and_the_config_name_the_same_stages_in_the_same_order():
  """A stage's name lives in two places because the config (a foundation, checked before
  any work) may not import the stage table: adding one to the table and not to
  ``config.names.ALL_STAGES`` (or the other way round) fails here, naming both."""
  assert tuple(stages.TABLE) == config.ALL_STAGES, (
      f"bssl/stages/__init__.py TABLE {tuple(stages.TABLE)} != "
      f"bssl/config/names.py ALL_STAGES {config.ALL_STAGES}"
  )
