"""``python -m bssl.compare``: the ``bssl-compare`` command (bssl/cli/compare.py)."""

if __name__ == "__main__":
  from bssl.cli import compare  # (bssl/cli/__init__.py tunes malloc before JAX starts)

  compare.run()
