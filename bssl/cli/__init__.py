"""The command-line programs: flags -> one library call -> exit code (see common.py).

Importing this package tunes the host allocator (bssl/hostmem.py) before any command
imports JAX, so every program under it (``bssl``, ``bssl-sweep``, ``bssl-compare``, ...)
starts with the same malloc settings as ``python -m bssl.main`` always had.
"""

from bssl import hostmem

hostmem.tune_malloc()  # before JAX starts its threads
