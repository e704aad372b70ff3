"""The evaluation wing: a model's answers to a benchmark, graded, summarised and compared.

- ``evaluate.py``: the ``eval`` command (resumable per-problem records, appended and fsynced)
  and ``grade`` (re-grade saved predictions without a model);
- ``metrics.py``: the summary (accuracy with its Wilson interval, invalid / truncation rates,
  lengths, failure kinds); ``report.py``: report.md, the lengths plot, the terminal summary;
- ``compare.py``: two evaluations of the same problems side by side (paired test);
- ``study.py``: ``study length``, the response-length grid (cells, locks, plan, assembly);
  ``study_report.py``: its table, CSVs, plot and report.md.

Interrupts (``mlx_distill.interrupts``): SIGINT/SIGTERM let the requests in flight finish and be
saved, then exit 130/143; a study stops after the cell in hand, its lock released; the same
command continues.
"""
