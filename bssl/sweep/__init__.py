"""Sweeps: grids of recipe runs that share every artifact a point does not change.

* :mod:`~bssl.sweep.grid`: the axes (``--sweep``), the seeds, the points and their configs;
* :mod:`~bssl.sweep.share`: a finished stage copied from another point whose record holds
  here (one lock file per stage name between processes);
* :mod:`~bssl.sweep.runner`: a point = one engine run; the grid in one process or several;
* :mod:`~bssl.sweep.workers`: the point processes (``--jobs``), their ``running/`` entries,
  SIGTERM and the parent-death signal;
* :mod:`~bssl.sweep.summary`: ``sweep.json``, ``sweep.md`` and a figure per axis;
* :mod:`~bssl.sweep.compare`: JAX against PyTorch, a sweep over the backend axis
  (``compare.json``, ``compare.md``; :mod:`~bssl.sweep.compare_report`).

The command line is ``bssl/cli/sweep.py`` (``bssl-sweep`` = ``python -m bssl.sweep``) and
``bssl/cli/compare.py``. This file imports nothing: ``python -m bssl.sweep`` (how a point
worker starts) goes straight to the command.
"""
