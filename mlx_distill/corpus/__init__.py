"""The corpus wing: problems -> verified chain-of-thought traces (and their length-level rewrites).

- ``build.py``: the ``corpus build`` / ``corpus stats`` commands: settings and their identity,
  the end of a build (``finalize``: verified.jsonl, splits, R* level corpora, manifest.json, all
  derived from the logs alone) and the summary;
- ``jobs.py``: the request loop (solve -> filter -> verify -> rewrite, ``--concurrency`` in flight),
  how a stored attempt is classified, the teacher/judge/rewriter clients and the cost;
- ``agents.py``: the solver, verifier and rewriter over a client from ``mlx_distill.generation``;
- ``filters.py``: the cheap filters (truncated, no final marker, loops, banned phrases, length);
- ``store.py``: the append-only, fsynced attempt logs and the folder's run lock;
- ``synth.py``: the generated arithmetic demo corpus (``corpus synth``).

Interrupts (``mlx_distill.interrupts``): SIGINT/SIGTERM cancel the requests in flight, the records
already appended stay, the build is finalized as "interrupted" and exits 130/143; the same
command asks only what is missing.
"""
