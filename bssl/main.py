"""``python -m bssl.main``: the ``bssl`` command (bssl/cli/run.py)."""

if __name__ == "__main__":
  from bssl.cli import run  # (bssl/cli/__init__.py tunes malloc before JAX starts)

  run.run()
