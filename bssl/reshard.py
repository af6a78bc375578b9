"""``python -m bssl.reshard``: the ``bssl-reshard`` command (bssl/cli/reshard.py)."""

if __name__ == "__main__":
  from bssl.cli import reshard

  reshard.run()
