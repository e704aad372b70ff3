"""`python -m mlx_distill logits`: re-score verified traces with a local teacher and store its top-M.

    python -m mlx_distill logits --teacher Qwen/Qwen2.5-7B-Instruct --data corpora/gsm8k --top-m 25 --out runs/logits-7b

The teacher reads each example with teacher forcing (one forward pass per batch, no
generation), rendered and tokenised exactly as `train` does (`mlx_distill.data`), and for
every completion position keeps its M most likely next tokens. Everything is keyed by
example id and token position, never by batch index, so any batch size, order or seed of
the student can use the cache, and `TopMStore.check` verifies on load that the student
sees the very token ids the teacher scored.

Folder::

    manifest.json               teacher + tokenizer fingerprints, M, dtypes, config, and per example:
                                shard, rows, first target index, length, prompt_len, sha256 of the tokens,
                                sha256 and length of the completion text (`align.completion_text`)
    vocab.json                  the teacher's token strings by id
    pieces.json                 the bytes each teacher token spells, and its special tokens (alignment)
    shard-00000.safetensors     per completion position: the M ids and log-probs, ``actual``; per scored
                                token: ``tokens``, ``ends`` (format 3: coded, see below)

``actual`` is the teacher's log-probability of the token actually there (row r), ``ends`` the
byte offset where each scored token ends in the completion text: with them a student of
another tokenizer family (and chat template) is aligned on the text (`mlx_distill.teacher.align`).
A format-1 folder (before cross-tokenizer alignment) is refused with the fix.

Store format 3 (the default; `--store-format 2` writes int32 ids + float16 log-probs, ~180 B per
completion token at M = 25 on the demo corpus). The coding (`teacher.codec`) was chosen by
measuring the demo corpus scored by SmolLM2 at M = 25: each shard ranks the ids it holds by
frequency; a position's ranks are sorted and delta-coded in the shard's narrowest byte width (14 B
a position against 19 B for raw ids and 27 B for ids in probability order); log-probs are 16-bit
levels below the position's top value on a 0.039-nat grid down to -12 (error <= 0.02 nats there;
0.5-nat steps below), the top slot carrying a 1e-4-nat correction that keeps the position's mass
(the tail bucket) exact; the actual token's log-prob is the index of its slot when it is in the
top-M (97%); token ids and byte lengths per shard; all in byte planes compressed by LZMA2 in
chunks of whole examples (~1024 positions, one decode per random example). Measured: 46.15 bytes
per completion token in the files (44.4 payload), 3.9x smaller than format 2; ids exact.

`--sampled-k N` writes a sampled store instead (format 3): at each position the distinct ids of
N draws with replacement from softmax(logits / --sampled-temperature), with their counts and
log p_T, the draws keyed by --seed and the example id (the same whatever the batch size or a
--resume). `train --kd` trains on it with the unbiased forward-KL estimator of "Sparse Logit
Sampling" (`losses.sampled_kd_loss`), at that temperature.

Row r of a shard is one target index t of one example (the prediction of token t+1); its
M slots are sorted by decreasing teacher log-probability. The stored values are the
teacher's logits minus their log-sum-exp over the whole vocabulary (log-probabilities at
T = 1): for the renormalised KD loss that is the same as raw logits, and it is what makes
the "rest of vocabulary" bucket (`kd_loss(tail=True)`) computable. ``tokens`` holds the
exact token ids scored for each example.

A teacher too large for this machine can score remotely: ``--teacher api --base-url URL --model NAME
--teacher-tokenizer TOK`` sends each example's token ids to a vLLM server and reads its
``prompt_logprobs`` (`mlx_distill.teacher.remote`); the store is the same.

`--resume` adds the examples not yet stored (a corpus that grew, or a run that was
interrupted): the teacher, tokenizer and M must match, and an example whose tokens changed
since it was scored is an error. Shards and the manifest are written atomically; a crash
loses at most the shard being filled. SIGINT (Ctrl-C) or SIGTERM finishes the batch in hand,
writes what is scored and exits 130 / 143 (a second signal stops at once); `--resume` goes on.
"""

import collections
import sys
import time
from pathlib import Path


from mlx_distill import config, data
from mlx_distill.config import LogitsConfig, TrainConfig
from mlx_distill.interrupts import Interrupts
from mlx_distill.io import InputError, atomic_write_json, read_json, write_manifest
from mlx_distill.progress import Heartbeat
from mlx_distill.teacher import align, codec
from mlx_distill.teacher.base import first_target, tokenizer_fingerprint, tokens_sha, vocab_strings
from mlx_distill.teacher.local import LocalTeacher
from mlx_distill.teacher.store import (DTYPES, DTYPES_COMPACT, MANIFEST, PIECES, VOCAB, StoreWriter,
                                       bytes_per_token)


# ----------------------------------------------------------------------------- the examples
def _data_config(cfg: LogitsConfig) -> TrainConfig:
    """The rendering/tokenisation options of `train`, taken from the logits config."""
    return TrainConfig(data=cfg.data, max_seq_length=cfg.max_seq_length, long_examples=cfg.long_examples,
                       system_prompt=cfg.system_prompt, prompt_template=cfg.prompt_template,
                       mask_prompt=cfg.mask_prompt, think_in_content=cfg.think_in_content)


def load_all_examples(cfg: LogitsConfig, tokenizer) -> list[data.Example]:
    """Every example of the train and valid splits: whatever hold-out the student later uses
    (its --val-fraction and --seed), all its ids are covered."""
    dcfg = _data_config(cfg)
    out, seen = [], set()
    for split in ("train", "valid"):
        if split == "valid" and not data.has_split(cfg.data, "valid"):
            continue
        rep = data.LoadReport(path="")
        try:
            exs = data.load_examples(dcfg, tokenizer, split, rep)
        except InputError:
            if split == "valid" and rep.records and not rep.kept:  # a hash hold-out that caught nothing
                continue
            raise
        for e in exs:
            if e.id not in seen:
                seen.add(e.id)
                out.append(e)
    return out


# ----------------------------------------------------------------------------- the command
def open_teacher(cfg: LogitsConfig):
    """The `Teacher` that scores: a local model (`LocalTeacher`) or a vLLM server (`RemoteTeacher`,
    connected and probed with M before any work)."""
    if not cfg.teacher:
        raise InputError("--teacher is required (a local model folder, a Hugging Face repo id, or api)")
    if cfg.top_m < 1:
        raise InputError(f"--top-m must be >= 1, got {cfg.top_m}")
    if cfg.sampled_k and cfg.store_format != 3:
        raise InputError("--sampled-k writes store format 3; drop --store-format 2")
    if cfg.sampled_k and cfg.teacher == "api":
        raise InputError("--sampled-k draws from the teacher's whole distribution, which a vLLM server does not "
                         "return (its prompt_logprobs are a top-k); use a local --teacher, or a top-M store")
    if cfg.teacher != "api":
        return LocalTeacher(cfg.teacher, cfg.backend, adapter=cfg.adapter)
    if cfg.adapter:
        raise InputError("--adapter applies to a local teacher; with --teacher api the server applies any "
                         "adapter (vLLM --lora-modules, then --model the adapter's name)")
    from mlx_distill.teacher.remote import RemoteTeacher

    return RemoteTeacher.from_config(cfg)


def extract(cfg: LogitsConfig, quiet: bool = False) -> dict:
    """Score every example not yet stored in cfg.out; return the run summary (``failed`` > 0: a remote
    teacher's requests failed for good for that many examples, the run is incomplete). A signal
    (SIGINT / SIGTERM) stores what is scored, then raises `interrupts.Interrupted`."""
    teacher = open_teacher(cfg)
    try:
        return Extraction(cfg, teacher, quiet).run()
    finally:
        if cfg.teacher == "api":
            teacher.close()


class Extraction:
    """One `logits` run into cfg.out: open (or resume) the store, score what is missing, summarise."""

    def __init__(self, cfg: LogitsConfig, teacher, quiet: bool):
        self.cfg, self.teacher, self.out = cfg, teacher, Path(cfg.out)
        self.mpath = self.out / MANIFEST
        self.say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
        self.quiet = quiet
        self.remote = cfg.teacher == "api"
        self.t_vocab = vocab_strings(teacher.tokenizer)
        self.tok_fp = tokenizer_fingerprint(teacher.tokenizer, self.t_vocab)
        self.t_fp = teacher.fingerprint()
        if cfg.top_m > teacher.vocab_size:
            raise InputError(f"--top-m {cfg.top_m} exceeds the teacher's vocabulary ({teacher.vocab_size})")
        self.man = self._open_manifest()
        self.failed: dict[str, str] = {}  # remote teacher: example id -> why its request failed for good
        self.interrupted = False  # a signal stopped the run (what was scored is stored)
        self.writer = StoreWriter(self.out, self.man, teacher.tokenizer, self.save_manifest)
        self.n_pos = self.n_fwd = self.n_tried = 0
        self.t_model = 0.0

    def _open_manifest(self) -> dict:
        """The stored manifest when resuming (teacher, tokenizer and M must match), else a new one."""
        cfg, mpath = self.cfg, self.mpath
        sampled = ({"n": cfg.sampled_k, "temperature": cfg.sampled_temperature, "seed": cfg.seed}
                   if cfg.sampled_k else None)
        if not mpath.is_file():
            return {"format": cfg.store_format, "examples": {}, "shards": [], "sampled": sampled}
        man = read_json(mpath)
        if not cfg.resume:
            raise InputError(f"{self.out}: already holds teacher logits for {len(man.get('examples', {}))} "
                             "example(s); pass --resume to add the missing ones, or choose another --out")
        if man.get("format") != cfg.store_format:
            raise InputError(f"{mpath}: --resume into a logits folder of format {man.get('format')!r}; this run "
                             f"writes format {cfg.store_format} (--store-format); use another --out")
        for key, have, want in (("top_m", man.get("top_m"), cfg.top_m),
                                ("--sampled-k / --sampled-temperature / --seed", man.get("sampled"), sampled),
                                ("tokenizer fingerprint", man.get("tokenizer", {}).get("fingerprint"), self.tok_fp),
                                ("teacher", man.get("teacher", {}).get("weights"), self.t_fp["weights"])):
            if have != want:
                raise InputError(f"{mpath}: --resume with a different {key} ({have!r} stored, {want!r} now); "
                                 "use another --out")
        return man

    def save_manifest(self) -> None:
        cfg, t = self.cfg, self.teacher
        fmt = self.man["format"]
        write_manifest(self.mpath, "logits", config.to_dict(cfg), format=fmt, teacher=self.t_fp,
                       teacher_vocab_size=t.vocab_size,
                       tokenizer={"fingerprint": self.tok_fp, "size": len(self.t_vocab), "file": VOCAB,
                                  "pieces": PIECES},
                       top_m=cfg.top_m, sampled=self.man.get("sampled"),
                       dtype=DTYPES if fmt == 2 else DTYPES_COMPACT, stats=bytes_per_token(self.man["shards"]),
                       shards=self.man["shards"], examples=self.man["examples"],
                       **({"status": "interrupted" if self.interrupted else "incomplete" if self.failed else
                           "complete", "failures": self.failed,
                           "servers": t.server_stats()} if self.remote else {}))

    def _todo(self) -> tuple[list, list]:
        """(every example, the ones to score now); a stored example that tokenises differently is refused."""
        done = self.man["examples"]
        examples = load_all_examples(self.cfg, self.teacher.tokenizer)
        changed = [e.id for e in examples if e.id in done and done[e.id]["sha256"] != tokens_sha(e.tokens)]
        if changed:
            raise InputError(f"{self.mpath}: {len(changed)} stored example(s) tokenise differently now (e.g. "
                             f"{changed[0]!r}): the corpus text or the rendering options changed; use another --out")
        todo = [e for e in examples if e.id not in done]
        return examples, (todo[: self.cfg.limit] if self.cfg.limit >= 0 else todo)

    def _score_batch(self, todo: list, idx: list) -> None:
        """One teacher call over the examples `idx` of `todo`: their rows go to the writer."""
        b = data.collate(todo, idx, data.pad_id_of(self.teacher.tokenizer))
        tic = time.perf_counter()
        start = min(first_target(todo[i].prompt_len) for i in idx)
        if self.cfg.sampled_k:  # N draws per position, keyed by the seed and each example's id
            rngs = [codec.example_seed(self.cfg.seed, todo[i].id) for i in idx]
            spans = [(first_target(todo[i].prompt_len) - start, len(todo[i].tokens) - 1 - start) for i in idx]
            sc = self.teacher.sample(b.tokens, self.cfg.sampled_k, self.cfg.sampled_temperature, start, rngs,
                                     spans, lengths=b.lengths)
        else:  # the top-M and the log-probability of each actual next token (the span signal across tokenizers)
            sc = self.teacher.score(b.tokens, self.cfg.top_m, start, lengths=b.lengths)
        self.t_model += time.perf_counter() - tic
        lost = self.teacher.failures if self.remote else {}
        for r, i in enumerate(idx):
            e = todo[i]
            if r in lost:
                self.failed[e.id] = lost[r]
                continue
            lo, hi = first_target(e.prompt_len) - start, len(e.tokens) - 1 - start
            self.writer.add(e, sc.ids[r, lo:hi], sc.logprobs[r, lo:hi], sc.token_logprobs[r, lo:hi],
                            sc.counts[r, lo:hi] if self.cfg.sampled_k else None)
            self.n_pos += hi - lo
            self.n_fwd += len(e.tokens) - 1
        self.n_tried += len(idx)

    def run(self) -> dict:
        cfg, teacher, out = self.cfg, self.teacher, self.out
        examples, todo = self._todo()
        out.mkdir(parents=True, exist_ok=True)
        if not (out / VOCAB).is_file():
            atomic_write_json(out / VOCAB, self.t_vocab)
        if not (out / PIECES).is_file():  # the bytes of every teacher token: alignment without its tokenizer
            atomic_write_json(out / PIECES, align.pieces_of(teacher.tokenizer).to_json())
        n_stored = len(self.man["examples"])
        with Interrupts("finishing the examples in hand, then saving them (--resume goes on)") as stop:
            self.say(f"teacher {teacher.path} ({teacher.backend}) | {len(examples)} examples, "
                     f"{len(examples) - len(todo) if cfg.limit < 0 else n_stored} already stored, {len(todo)} to "
                     f"score | M={cfg.top_m} -> {out}")
            # a plain line at least every ~10 s (from a thread: one teacher forward may take longer)
            with Heartbeat("logits", total=len(todo), unit="examples", enabled=not self.quiet) as beat:
                try:
                    self._loop(todo, beat, stop)
                finally:
                    self.writer.flush()
            if not self.man["shards"] or self.remote:
                self.save_manifest()
            if stop.requested:
                self.say(f"interrupted: {len(self.man['examples'])} examples stored in {out}, "
                         f"{len(todo) - self.n_tried} not scored yet; the same command with --resume goes on")
            stop.check("teacher logits saved; re-run with --resume")
        return self._summary(todo)

    def _loop(self, todo: list, beat, stop) -> None:
        # a remote teacher gets one request per example, as many at once as its servers take
        for idx in data.bucket(todo, self.teacher.capacity if self.remote else self.cfg.batch_size):
            self._score_batch(todo, idx)
            beat.update(advance=len(idx), positions=self.n_pos, shards=len(self.man["shards"]))
            if len(self.writer) >= self.cfg.shard_size:
                self.writer.flush()
            if stop.requested:
                self.interrupted = True
                return
            if self.remote and self.teacher.stalled:  # every request failed after its retries: servers unwell
                lost = self.teacher.failures
                self.say(f"every request of the last {len(idx)} failed after its retries (e.g. "
                         f"{next(iter(lost.values()))}); stopping")
                return

    def _summary(self, todo: list) -> dict:
        stats = bytes_per_token(self.man["shards"])
        t = self.t_model
        summary = {"examples": len(self.man["examples"]), "new_examples": len(todo), "new_positions": self.n_pos,
                   "positions": stats["positions"], "payload_bytes_per_token": stats["payload_bytes_per_token"],
                   "file_bytes_per_token": stats["file_bytes_per_token"],
                   "tokens_per_sec": round(self.n_pos / t, 1) if t else None,
                   "forward_tokens_per_sec": round(self.n_fwd / t, 1) if t else None, "out": str(self.out)}
        if self.remote:
            kinds = collections.Counter(w.split(":")[0] for w in self.failed.values())
            if len(todo) > self.n_tried:
                kinds["not tried (stopped)"] = len(todo) - self.n_tried
            summary.update(failed=sum(kinds.values()), failures=dict(kinds), servers=self.teacher.server_stats())
        self.say(f"stored {len(self.man['examples'])} examples, {stats['positions']} completion positions | "
                 f"{stats['payload_bytes_per_token']:.0f} bytes/token (ids + log-probs, format {self.man['format']}"
                 f"{', sampled N=' + str(self.cfg.sampled_k) if self.cfg.sampled_k else ''}; "
                 f"{stats['file_bytes_per_token']:.1f} with the scored token ids and headers) | "
                 f"{summary['tokens_per_sec']} completion tokens/s ({summary['forward_tokens_per_sec']} forward "
                 "tokens/s)")
        return summary


def main(argv=None) -> None:
    cfg = config.from_cli(LogitsConfig, argv, "python -m mlx_distill logits", __doc__)
    summary = extract(cfg)
    if summary.get("failed"):  # a remote teacher's requests failed for good: loud, like `corpus build`
        from mlx_distill.teacher.remote import EXIT_INCOMPLETE

        print(f"error: teacher logits in {cfg.out} are incomplete: {summary['failed']} example(s) could not be "
              f"scored ({', '.join(f'{k}: {v}' for k, v in summary['failures'].items())}; reasons in "
              f"{Path(cfg.out) / MANIFEST} 'failures'); fix the server and re-run with --resume", file=sys.stderr)
        raise SystemExit(EXIT_INCOMPLETE)
