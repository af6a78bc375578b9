"""``python -m bssl.sweep``: the ``bssl-sweep`` command (bssl/cli/sweep.py)."""

if __name__ == "__main__":
  from bssl.cli import sweep  # (bssl/cli/__init__.py tunes malloc before JAX starts)

  sweep.run()
