"""``python -m bssl.convert``: the ``bssl-convert`` command (bssl/cli/convert.py)."""

if __name__ == "__main__":
  from bssl.cli import convert

  convert.run()
