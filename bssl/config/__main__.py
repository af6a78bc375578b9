"""``python -m bssl.config``: prints the config reference (``> docs/config.md`` regenerates
it; tests/unit/test_docs.py fails when that file is not what this prints)."""

from bssl.config.reference import reference_markdown

print(reference_markdown(), end="")
