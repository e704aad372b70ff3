"""Training wing: the one training loop and everything it is made of.

- ``train.py``: the `train` command and the loop (`train.run`: set-up, then optimizer steps with
  their report row, validation and checkpoint, then the result); resume, interrupts, progress.
- ``objectives.py``: the objectives the loop takes as an argument (SFT; SFT + top-K logit KD,
  offline store, online teacher or on-policy mix), the KD schedule (alpha warm-up, the per-step
  KD and SFT scales) and how a report window averages the loss parts.
- ``sources.py``: the batch sources, the loop's other argument (corpus, KD, on-policy rollouts).
- ``kd.py``: `kd_setup`, opening the teacher side of a KD run (a store or an online teacher).
- ``losses.py``: the SFT and KD losses (forward/reverse KL, generalized JSD, tail bucket, spans).
- ``hidden.py``: feature (hidden-state) distillation.
- ``selection.py``: --select-by accuracy; ``preflight.py``: the memory estimate; ``trackers.py``:
  W&B / TensorBoard; ``flops.py``: compute accounting.

May import: teacher (the store and teachers a KD run reads), generation, backends, tasks, data,
config, io, paths, progress, plots, interrupts, models. Imported by: cli (the `train` command),
pipeline, evaluation (study trains its cells; eval reports to the trackers) and parity. Never
imported by teacher, backends or anything below them (docs/ARCHITECTURE.md, the import rule).
"""
