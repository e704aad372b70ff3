"""The teacher wing: what a teacher says about the corpus, and where it is kept.

Data flow: verified corpus -> a `Teacher` scores it (teacher forcing, top-M per position) -> the
`logits` command writes the top-M store -> training reads it back (`TopMStore`) or asks the teacher
online, through a `Planner` that says which teacher row each student loss position reads.

Modules:

- ``base.py``     the one `Teacher` protocol (``score(tokens, top_k, start, lengths) -> TeacherScores``),
                  and the identities stores and teachers are checked by (tokenizer fingerprint, hashes).
- ``local.py``    `LocalTeacher` (an MLX / torch model on this machine) and `OnlineTeacher` (online KD
                  with a teacher of the student's tokenizer).
- ``cross.py``    `OnlineCrossTeacher`: online (and on-policy) KD with a teacher of another tokenizer.
- ``remote.py``   `RemoteTeacher`: a vLLM server's ``prompt_logprobs`` (``--teacher api``).
- ``store.py``    the top-M store: format, shard encoding, `StoreWriter`, the `TopMStore` reader
                  (storage only: never a teacher, never a teacher's base class).
- ``plan.py``     `Planner`: the coverage check and the KD batch arrays over scored rows (the store's
                  or an online teacher's).
- ``align.py``    cross-tokenizer alignment on the completion text.
- ``logits.py``   the `logits` command.

May import: generation, backends, tasks, data, models, config, io, paths, progress, interrupts
(never training, evaluation, corpus or the CLI). Imported by: training (``training.kd`` opens the
store or the online teacher; ``training.sources`` takes a `Teacher`), export, parity, cli.
"""
