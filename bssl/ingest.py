"""``python -m bssl.ingest``: the ``bssl-ingest`` command (bssl/cli/ingest.py)."""

if __name__ == "__main__":
  from bssl.cli import ingest

  ingest.run()
