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
    shard-00000.safetensors     ids (N, M) int32 | logprobs (N, M) float16 | actual (N,) float32 |
                                tokens (n,) int32 | ends (n,) int32

``actual`` is the teacher's log-probability of the token actually there (row r), ``ends`` the
byte offset where each scored token ends in the completion text: with them a student of
another tokenizer family (and chat template) is aligned on the text (`mlx_distill.teacher.align`).
Format 2; a format-1 folder (before cross-tokenizer alignment) is refused with the fix.

Row r of a shard is one target index t of one example (the prediction of token t+1); its
M slots are sorted by decreasing teacher log-probability. The stored values are the
teacher's logits minus their log-sum-exp over the whole vocabulary (log-probabilities at
T = 1): for the renormalised KD loss that is the same as raw logits, and it is what makes
the "rest of vocabulary" bucket (`kd_loss(tail=True)`) computable. ``tokens`` holds the
exact token ids scored for each example. 100 + 50 bytes per completion token for M = 25
(+ 4 for ``actual``, + 4 per scored token for ``ends``).

A teacher too large for this machine can score remotely: ``--teacher api --base-url URL --model NAME
--teacher-tokenizer TOK`` sends each example's token ids to a vLLM server and reads its
``prompt_logprobs`` (`mlx_distill.teacher.remote`); the store is the same.

`--resume` adds the examples not yet stored (a corpus that grew, or a run that was
interrupted): the teacher, tokenizer and M must match, and an example whose tokens changed
since it was scored is an error. Shards and the manifest are written atomically; a crash
loses at most the shard being filled.
"""

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from mlx_distill.teacher import align

from mlx_distill import config, data
from mlx_distill.config import LogitsConfig, TrainConfig
from mlx_distill.teacher.base import tokenizer_fingerprint, vocab_strings
from mlx_distill.io import InputError, atomic_path, atomic_write_json, read_json, write_manifest
from mlx_distill.backends.ops import ops

FORMAT = 2  # 2: + the teacher's completion offsets, text hash and token log-probabilities (cross-tokenizer)
MANIFEST = "manifest.json"
VOCAB = "vocab.json"
PIECES = "pieces.json"


# ----------------------------------------------------------------------------- fingerprints
def tokens_sha(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()


def teacher_fingerprint(path: str | Path) -> dict:
    """Cheap identity of a model folder: config hash, weight file names/sizes and a hash of
    each file's first MiB (hashing 15 GB of weights would cost minutes)."""
    p = Path(path)
    out = {"path": str(p)}
    if (p / "config.json").is_file():
        out["config_sha256"] = hashlib.sha256((p / "config.json").read_bytes()).hexdigest()
    h = hashlib.sha256()
    files = sorted(p.glob("*.safetensors"))
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}:".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    out["weights"] = {"files": len(files), "bytes": sum(f.stat().st_size for f in files), "sha256_heads": h.hexdigest()}
    return out


# ----------------------------------------------------------------------------- the teacher
class Teacher:
    """One forward pass per batch -> top-M ids and log-probabilities at every position."""

    def __init__(self, name: str, backend: str = "auto", flag: str = "--teacher", adapter: str = ""):
        from mlx_distill.models import resolve_model

        self.path = resolve_model(name, flag=flag)
        self.adapter = str(adapter or "")
        if self.adapter and not (Path(self.adapter) / "adapter_config.json").is_file():
            raise InputError(f"--adapter {self.adapter}: no adapter_config.json there (give a `train` run folder)")
        if backend == "auto":
            from mlx_distill.backends import auto_backend

            backend = auto_backend()
        self.backend = backend
        if self.backend == "mlx":
            from mlx_lm import load

            self.model, self.tokenizer = load(self.path, adapter_path=self.adapter or None)
        else:  # float32 on CPU, bfloat16 on CUDA (backends/torch.py)
            from mlx_distill.backends.torch import load_model

            self.model, self.tokenizer = load_model(self.path, adapter_path=self.adapter or None)
            self.model.eval()
        self.vocab_size = self._vocab_rows()

    def _vocab_rows(self) -> int:
        cfg = Path(self.path) / "config.json"
        if cfg.is_file():
            c = json.loads(cfg.read_text())
            v = c.get("vocab_size") or c.get("text_config", {}).get("vocab_size")
            if v:
                return int(v)
        return len(vocab_strings(self.tokenizer))

    def top_m(self, inputs: np.ndarray, m: int, start: int = 0,
              lengths: np.ndarray | None = None, targets: np.ndarray | None = None) -> tuple:
        """inputs (B, L) int32 -> ids (B, L - start, M) int32, logprobs (B, L - start, M) float32,
        sorted descending, for positions start.. (the prompt before `start` needs no top-M).
        `lengths` (each row's real length) is not needed here: right padding changes nothing before
        it under causal attention (`remote_teacher.RemoteTeacher` uses it to send no padding).
        With `targets` (B, L), the tokens actually there (inputs shifted by one), a third array
        (B, L - start) float32 holds their log-probabilities (the span signal across tokenizers)."""
        if self.backend == "mlx":
            import mlx.core as mx

            z = self.model(mx.array(inputs))[:, start:].astype(mx.float32)
            o = ops(z)  # the losses' log-sum-exp: chunked over long vocabularies for float32 accuracy
            lse = o.logsumexp(z, -1)
            idx = o.topk_idx(z, m)
            val = mx.take_along_axis(z, idx, axis=-1)
            order = mx.argsort(-val, axis=-1)
            idx, val = mx.take_along_axis(idx, order, axis=-1), mx.take_along_axis(val, order, axis=-1) - lse
            if targets is None:
                mx.eval(idx, val)
                return np.array(idx), np.array(val)
            tgt = mx.array(np.asarray(targets, np.int32)[:, start:, None])
            tok = (mx.take_along_axis(z, tgt, axis=-1) - lse)[..., 0]
            mx.eval(idx, val, tok)
            return np.array(idx), np.array(val), np.array(tok)
        import torch

        with torch.no_grad():
            x = torch.from_numpy(inputs.astype(np.int64)).to(self.model.device)
            z = self.model(input_ids=x, use_cache=False).logits[:, start:].float()
            val, idx = torch.topk(z, m, dim=-1)  # sorted
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            val = val - lse
            if targets is not None:
                tgt = torch.from_numpy(np.asarray(targets, np.int64)[:, start:, None]).to(z.device)
                tok = (torch.gather(z, -1, tgt) - lse)[..., 0]
                return idx.int().cpu().numpy(), val.cpu().numpy(), tok.cpu().numpy()
        return idx.int().cpu().numpy(), val.cpu().numpy()


# ----------------------------------------------------------------------------- extraction
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


def first_target(prompt_len: int) -> int:
    """First target index in the loss (see `data.loss_mask`)."""
    return max(int(prompt_len) - 1, 0)


def _write_shard(path: Path, arrays: dict) -> int:
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata={"format": f"mlx_distill.teacher.logits/{FORMAT}"})
    return path.stat().st_size


def _bytes_per_token(shards: list) -> dict:
    pos = sum(s["positions"] for s in shards)
    payload = sum(s["payload_bytes"] for s in shards)
    files = sum(s["bytes"] for s in shards)
    return {"positions": pos, "payload_bytes_per_token": round(payload / pos, 2) if pos else 0.0,
            "file_bytes_per_token": round(files / pos, 2) if pos else 0.0}


def extract(cfg: LogitsConfig, quiet: bool = False) -> dict:
    """Score every example not yet stored in cfg.out; return the run summary (``failed`` > 0: a remote
    teacher's requests failed for good for that many examples, the run is incomplete)."""
    if not cfg.teacher:
        raise InputError("--teacher is required (a local model folder, a Hugging Face repo id, or api)")
    if cfg.top_m < 1:
        raise InputError(f"--top-m must be >= 1, got {cfg.top_m}")
    if cfg.teacher == "api":  # a vLLM server (remote_teacher.py): connected and probed with M before any work
        if cfg.adapter:
            raise InputError("--adapter applies to a local teacher; with --teacher api the server applies any "
                             "adapter (vLLM --lora-modules, then --model the adapter's name)")
        from mlx_distill.teacher.remote import RemoteTeacher

        teacher = RemoteTeacher.from_config(cfg)
    else:
        teacher = Teacher(cfg.teacher, cfg.backend, adapter=cfg.adapter)
    try:
        return _extract(cfg, teacher, quiet)
    finally:
        if cfg.teacher == "api":
            teacher.close()


def _extract(cfg: LogitsConfig, teacher, quiet: bool) -> dict:
    out = Path(cfg.out)
    mpath = out / MANIFEST
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    remote = cfg.teacher == "api"
    t_vocab = vocab_strings(teacher.tokenizer)
    tok_fp = tokenizer_fingerprint(teacher.tokenizer, t_vocab)
    t_fp = teacher.fingerprint() if remote else teacher_fingerprint(teacher.path)
    if teacher.adapter:  # a frozen fine-tuned teacher: its adapter is part of what scored the traces
        a_fp = teacher_fingerprint(teacher.adapter)
        t_fp = {**t_fp, "adapter": a_fp["path"], "weights": {**t_fp["weights"], "adapter": a_fp["weights"]}}
    if cfg.top_m > teacher.vocab_size:
        raise InputError(f"--top-m {cfg.top_m} exceeds the teacher's vocabulary ({teacher.vocab_size})")

    if mpath.is_file():
        man = read_json(mpath)
        if not cfg.resume:
            raise InputError(f"{out}: already holds teacher logits for {len(man.get('examples', {}))} example(s); "
                             "pass --resume to add the missing ones, or choose another --out")
        if man.get("format") != FORMAT:
            raise InputError(f"{mpath}: --resume into a logits folder of format {man.get('format')!r}; this version "
                             f"writes format {FORMAT} (with what cross-tokenizer alignment needs); use another --out")
        for key, have, want in (("top_m", man.get("top_m"), cfg.top_m),
                                ("tokenizer fingerprint", man.get("tokenizer", {}).get("fingerprint"), tok_fp),
                                ("teacher", man.get("teacher", {}).get("weights"), t_fp["weights"])):
            if have != want:
                raise InputError(f"{mpath}: --resume with a different {key} ({have!r} stored, {want!r} now); "
                                 "use another --out")
    else:
        man = {"format": FORMAT, "examples": {}, "shards": []}
    shards, done = man["shards"], man["examples"]

    examples = load_all_examples(cfg, teacher.tokenizer)
    changed = [e.id for e in examples if e.id in done and done[e.id]["sha256"] != tokens_sha(e.tokens)]
    if changed:
        raise InputError(f"{mpath}: {len(changed)} stored example(s) tokenise differently now (e.g. {changed[0]!r}): "
                         "the corpus text or the rendering options changed; use another --out")
    todo = [e for e in examples if e.id not in done]
    n_stored = len(examples) - len(todo)
    if cfg.limit >= 0:
        todo = todo[: cfg.limit]
    out.mkdir(parents=True, exist_ok=True)
    if not (out / VOCAB).is_file():
        atomic_write_json(out / VOCAB, t_vocab)
    if not (out / PIECES).is_file():  # the bytes of every teacher token: alignment without its tokenizer
        atomic_write_json(out / PIECES, align.pieces_of(teacher.tokenizer).to_json())

    def save_manifest():
        write_manifest(mpath, "logits", config.to_dict(cfg), format=FORMAT, teacher=t_fp,
                       teacher_vocab_size=teacher.vocab_size,
                       tokenizer={"fingerprint": tok_fp, "size": len(t_vocab),
                                  "file": VOCAB, "pieces": PIECES},
                       top_m=cfg.top_m,
                       dtype={"ids": "int32", "logprobs": "float16", "tokens": "int32", "actual": "float32",
                              "ends": "int32 (byte offsets in the completion text, align.completion_text)",
                              "values": "teacher logit - logsumexp over the teacher vocabulary (T = 1)"},
                       stats=_bytes_per_token(shards), shards=shards, examples=done,
                       **({"status": "incomplete" if failed else "complete", "failures": failed,
                           "servers": teacher.server_stats()} if remote else {}))

    buf: list[tuple[data.Example, np.ndarray, np.ndarray, np.ndarray]] = []
    failed: dict[str, str] = {}  # remote teacher: example id -> why its request failed for good
    n_tried = 0

    def flush():
        if not buf:
            return
        items = buf[:]
        buf.clear()  # taken even if writing fails: the `finally` below must not write them twice
        k = len(shards)
        name = f"shard-{k:05d}.safetensors"
        ids = np.concatenate([b[1] for b in items]).astype(np.int32)
        lps = np.concatenate([b[2] for b in items]).astype(np.float16)
        toks = np.concatenate([b[0].tokens for b in items]).astype(np.int32)
        actual = np.concatenate([b[3] for b in items]).astype(np.float32)
        row = tok = 0
        entries, ends = {}, []
        for e, i, _, _ in items:
            text, e_ends = align.completion_text(teacher.tokenizer, e.tokens[e.prompt_len:])
            ends.append(np.concatenate([np.zeros(e.prompt_len, np.int64), e_ends]))
            entries[e.id] = {"shard": k, "row": row, "n": int(len(i)), "first": first_target(e.prompt_len),
                             "tok": tok, "length": int(len(e.tokens)), "prompt_len": int(e.prompt_len),
                             "sha256": tokens_sha(e.tokens), "text_sha256": align.text_sha(text),
                             "text_bytes": len(text)}
            row, tok = row + len(i), tok + len(e.tokens)
        nbytes = _write_shard(out / name, {"ids": ids, "logprobs": lps, "tokens": toks, "actual": actual,
                                           "ends": np.concatenate(ends).astype(np.int32)})
        shards.append({"file": name, "examples": len(items), "positions": int(len(ids)),
                       "payload_bytes": int(ids.nbytes + lps.nbytes), "bytes": nbytes})
        done.update(entries)
        save_manifest()  # after the shard: a crash in between leaves an unreferenced file, overwritten next time

    pad = data.pad_id_of(teacher.tokenizer)
    n_pos = n_fwd = 0
    t_model = 0.0
    say(f"teacher {teacher.path} ({teacher.backend}) | {len(examples)} examples, {n_stored} already "
        f"stored, {len(todo)} to score | M={cfg.top_m} -> {out}")
    from mlx_distill.progress import Heartbeat

    # a plain line at least every ~10 s (from a thread: one teacher forward may take longer)
    beat = Heartbeat("logits", total=len(todo), unit="examples", enabled=not quiet).__enter__()
    try:
        # a remote teacher gets one request per example, as many at once as its servers take
        for idx in data.bucket(todo, teacher.capacity if remote else cfg.batch_size):
            b = data.collate(todo, idx, pad)
            tic = time.perf_counter()
            start = min(first_target(todo[i].prompt_len) for i in idx)
            # the top-M and the log-probability of each actual next token (the span signal across tokenizers)
            ids, lps, act = teacher.top_m(b.tokens[:, :-1], cfg.top_m, start, lengths=b.lengths - 1,
                                          targets=b.tokens[:, 1:])
            t_model += time.perf_counter() - tic
            lost = teacher.failures if remote else {}
            for r, i in enumerate(idx):
                e = todo[i]
                if r in lost:
                    failed[e.id] = lost[r]
                    continue
                lo, hi = first_target(e.prompt_len) - start, len(e.tokens) - 1 - start
                buf.append((e, ids[r, lo:hi], lps[r, lo:hi], act[r, lo:hi]))
                n_pos += hi - lo
                n_fwd += len(e.tokens) - 1
            beat.update(advance=len(idx), positions=n_pos, shards=len(shards))
            if len(buf) >= cfg.shard_size:
                flush()
            n_tried += len(idx)
            if remote and teacher.stalled:  # every request of the step spent its retries: the servers are unwell
                say(f"every request of the last {len(idx)} failed after its retries (e.g. "
                    f"{next(iter(lost.values()))}); stopping")
                break
    finally:
        beat.__exit__()
        flush()
    if not shards or remote:
        save_manifest()
    stats = _bytes_per_token(shards)
    summary = {"examples": len(done), "new_examples": len(todo), "new_positions": n_pos,
               "positions": stats["positions"], "payload_bytes_per_token": stats["payload_bytes_per_token"],
               "file_bytes_per_token": stats["file_bytes_per_token"],
               "tokens_per_sec": round(n_pos / t_model, 1) if t_model else None,
               "forward_tokens_per_sec": round(n_fwd / t_model, 1) if t_model else None, "out": str(out)}
    if remote:
        import collections

        kinds = collections.Counter(w.split(":")[0] for w in failed.values())
        if len(todo) > n_tried:
            kinds["not tried (stopped)"] = len(todo) - n_tried
        summary.update(failed=sum(kinds.values()), failures=dict(kinds), servers=teacher.server_stats())
    say(f"stored {len(done)} examples, {stats['positions']} completion positions | "
        f"{stats['payload_bytes_per_token']:.0f} bytes/token (ids + float16 log-probs; "
        f"{stats['file_bytes_per_token']:.1f} with the scored token ids and headers) | "
        f"{summary['tokens_per_sec']} completion tokens/s ({summary['forward_tokens_per_sec']} forward tokens/s)")
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


# ----------------------------------------------------------------------------- reading
class TopMStore:
    """Read a logits folder, check it against the student's examples, serve KD batch arrays.

    `check` must see an example before `batch_arrays` serves it; it plans, once per example,
    which teacher row (or span of rows) each student loss position reads, so serving is array
    indexing. The alignment mode (``--kd-align``, `mlx_distill.teacher.align` for the classes):

    - ``exact``: the student's tokenizer has the teacher's fingerprint (same id -> string
      table). The student's token ids of every stored example must equal the scored ones,
      else `check` refuses, naming the example and the first differing token.
    - ``matched`` / ``spans`` / ``uld`` (``auto`` picks ``spans`` when the tokenizers differ):
      alignment on the completion text both sides share (the chat templates may differ). The
      student's completion text must hash to the teacher's (`align.completion_text`; else the
      example is ``text_differs``). Positions whose token spans the same text as a teacher
      token read that teacher row with its ids mapped by their bytes (`align.vocab_map`; ids
      the student cannot spell are dropped into the tail bucket, which cross-tokenizer KD
      always uses, and counted); the rest are spans (the teacher's sequence log-probability
      of the span's text) or, with ``uld``, position pairs compared by sorted probabilities.

    In every mode teacher ids >= the student's vocabulary size are dropped and counted (a
    152064-row teacher vs a 151936-row student), and `check` refuses when the share of the
    student's completion positions with ANY teacher signal is below `min_coverage`.
    """

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        mpath = self.dir / MANIFEST
        if not mpath.is_file():
            raise InputError(f"{self.dir}: no {MANIFEST}; create teacher logits with "
                             "`python -m mlx_distill logits --teacher MODEL --data CORPUS --out DIR`")
        man = read_json(mpath)
        if man.get("stage") != "logits" or man.get("format") != FORMAT:
            old = man.get("stage") == "logits" and isinstance(man.get("format"), int) and man["format"] < FORMAT
            raise InputError(f"{mpath}: not a logits folder of format {FORMAT} (stage {man.get('stage')!r}, format "
                             f"{man.get('format')!r})" + ("; it was written before cross-tokenizer alignment "
                                                         "(format 2 adds the teacher's text offsets and token "
                                                         "log-probabilities)" if old else "")
                             + "; re-extract with this version: `python -m mlx_distill logits ... --out NEW_DIR`")
        self.manifest = man
        self.m = int(man["top_m"])
        self.entries = man["examples"]
        self._shards: dict[int, dict] = {}
        self._plans: dict[str, dict] = {}  # id -> arrays (see _plan_exact / _plan_cross)
        self._remap: np.ndarray | None = None  # teacher id -> student id (-1: none); None = identity
        self.student_vocab: int | None = None
        self.mode = ""  # the resolved --kd-align of the last check
        self.cross = False  # a cross-tokenizer mode: the KD loss uses the tail bucket
        self.report: dict = {}
        self.reports: dict = {}  # split -> report

    # -------------------------------------------------------------- storage
    def shard(self, k: int) -> dict:
        if k not in self._shards:
            from safetensors.numpy import load_file

            f = self.dir / self.manifest["shards"][k]["file"]
            if not f.is_file():
                raise InputError(f"{f}: shard listed in {self.dir / MANIFEST} is missing; re-extract with --resume "
                                 "into a fresh folder")
            self._shards[k] = load_file(str(f))
        return self._shards[k]

    def scored_tokens(self, example_id: str) -> np.ndarray:
        e = self.entries[example_id]
        return self.shard(e["shard"])["tokens"][e["tok"]: e["tok"] + e["length"]]

    def teacher_ends(self, example_id: str) -> np.ndarray:
        """End offset (bytes of the shared completion text) of every scored token."""
        e = self.entries[example_id]
        return self.shard(e["shard"])["ends"][e["tok"]: e["tok"] + e["length"]].astype(np.int64)

    def rows(self, example_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n, M) int32, logprobs (n, M) float16) of one example, target indices first..first+n-1."""
        e = self.entries[example_id]
        s = self.shard(e["shard"])
        return s["ids"][e["row"]: e["row"] + e["n"]], s["logprobs"][e["row"]: e["row"] + e["n"]]

    def token_logprobs(self, example_id: str) -> np.ndarray:
        """(n,) float32: the teacher's log-probability of the token actually there (NaN: unknown)."""
        e = self.entries[example_id]
        return self.shard(e["shard"])["actual"][e["row"]: e["row"] + e["n"]].astype(np.float32)

    def teacher_pieces(self) -> "align.Pieces":
        strings = read_json(self.dir / self.manifest["tokenizer"]["file"])
        return align.Pieces.from_json(read_json(self.dir / PIECES), strings)

    # -------------------------------------------------------------- checking
    def resolve_mode(self, tokenizer, mode: str = "auto") -> str:
        """--kd-align -> the mode used with this student tokenizer (refuses `exact` across tokenizers)."""
        if mode not in align.MODES:
            raise InputError(f"--kd-align must be one of {', '.join(align.MODES)}, got {mode!r}")
        same = tokenizer_fingerprint(tokenizer) == self.manifest["tokenizer"]["fingerprint"]
        if mode == "exact" and not same:
            raise InputError(f"--kd-align exact: the student's tokenizer differs from the teacher's ({self.dir}); "
                             "use --kd-align auto (aligns the two tokenizers on the shared completion text)")
        return ("exact" if same else "spans") if mode == "auto" else mode

    def check(self, examples: list, student_vocab_size: int, tokenizer, min_coverage: float = 0.95,
              where: str = "train", mode: str = "auto") -> dict:
        """Plan how every example's loss positions read the cache; report and enforce coverage."""
        self.student_vocab = int(student_vocab_size)
        mode = self.mode = self.resolve_mode(tokenizer, mode)
        self.cross = mode != "exact"
        if self.cross and self._remap is None:
            self._t_pieces = self.teacher_pieces()
            self._remap = align.vocab_map(self._t_pieces, tokenizer)
        total = missing = text_differs = 0
        classes = dict.fromkeys(("exact", "matched", "spans", "uld", "none"), 0)
        if mode != "uld":
            classes.pop("uld")
        # completion positions left without a teacher, by cause (each cause has its own fix)
        lost = {"not_extracted": 0, "text_differs": 0, "unscored_range": 0, "token_boundaries": 0}
        mismatched, eot_pairs = [], {}
        for ex in examples:
            lo, hi = first_target(ex.prompt_len), len(ex.tokens) - 1
            want = np.arange(lo, hi)
            total += len(want)
            ent = self.entries.get(ex.id)
            if ent is None:
                missing += 1
                lost["not_extracted"] += len(want)
                self._plans[ex.id] = _empty_plan()
                continue
            if not self.cross:
                if ent["sha256"] != tokens_sha(ex.tokens):
                    mismatched.append(ex)
                    continue
                t = want[(want >= ent["first"]) & (want < ent["first"] + ent["n"])]
                lost["unscored_range"] += len(want) - len(t)
                self._plans[ex.id] = plan = {**_empty_plan(), "t": t.astype(np.int64),
                                             "rows": (t - ent["first"]).astype(np.int64)}
                classes["exact"] += len(t)
                continue
            plan = self._plan_cross(ex, ent, want, tokenizer, mode, eot_pairs)
            if plan is None:
                text_differs += 1
                lost["text_differs"] += len(want)
                self._plans[ex.id] = _empty_plan()
                continue
            self._plans[ex.id] = plan
            n_sig = len(plan["t"]) + int(plan["span_len"].sum()) + len(plan["uld_t"])
            classes["matched"] += len(plan["t"])
            classes["spans"] += int(plan["span_len"].sum())
            if mode == "uld":
                classes["uld"] += len(plan["uld_t"])
            lost["token_boundaries"] += len(want) - n_sig
        if mismatched:
            raise InputError(self._mismatch_message(mismatched, len(examples), where))
        if eot_pairs:  # the teacher's end-of-turn marker stands for the student's (another name, another id)
            for a, b in eot_pairs.items():
                if self._remap[a] < 0:
                    self._remap[a] = b
        covered = sum(v for k, v in classes.items() if k != "none")
        classes["none"] = total - covered
        dropped, slots = self._count_dropped(examples)
        cov = covered / total if total else 1.0
        self.report = rep = {
            "split": where, "mode": mode, "examples": len(examples),
            "missing_examples": missing, "text_differs": text_differs, "positions": total,
            "covered_positions": covered, "coverage": round(cov, 4), "classes": classes,
            "dropped_teacher_ids": dropped, "teacher_slots": slots,
            "dropped_fraction": round(dropped / slots, 6) if slots else 0.0, "uncovered_by_cause": lost}
        self.reports[where] = rep
        if cov < min_coverage:
            raise InputError(self._coverage_message(rep, lost, min_coverage))
        return rep

    def _unknown_logprobs(self, example_id: str) -> np.ndarray | None:
        """Cumulative count of rows whose token log-probability is unknown (NaN), length n + 1."""
        return np.concatenate([[0], np.cumsum(np.isnan(self.token_logprobs(example_id)))])

    def _plan_cross(self, ex, ent, want, tokenizer, mode, eot_pairs, s_view=None):
        """Align one example on its completion text; None when the texts differ. `s_view`:
        the student's (text, ends) when already known (a rollout cut to valid UTF-8)."""
        if not len(want):
            return _empty_plan()
        s_plen, t_plen = int(ex.prompt_len), int(ent["prompt_len"])
        s_text, s_ends = s_view or align.completion_text(tokenizer, ex.tokens[s_plen:])
        if align.text_sha(s_text) != ent.get("text_sha256"):
            return None
        t_ends = self.teacher_ends(ex.id)[t_plen:]
        al = align.align(t_ends, s_ends)
        first, n = int(ent["first"]), int(ent["n"])
        k = np.arange(len(al.cls))
        pos = s_plen + k - 1  # the student position predicting completion token k
        ok = (pos >= want[0]) & (pos < want[-1] + 1) if len(want) else np.zeros(len(k), bool)

        def row(i):  # teacher row predicting teacher completion token i (-1: not scored)
            r = t_plen + np.asarray(i, np.int64) - 1 - first
            return np.where((r >= 0) & (r < n), r, -1)

        m = ok & (al.cls == align.MATCHED)
        r = row(al.partner[m])
        t, rows = pos[m][r >= 0], r[r >= 0]
        # end-of-turn: matched pairs of special tokens (after the text) name each other's marker
        if not eot_pairs:
            ti = self.scored_tokens(ex.id)[t_plen + al.partner[m]]
            si = ex.tokens[s_plen + k[m]]
            both = self._t_pieces.special[ti] & align.special_mask(tokenizer)[si]
            eot_pairs.update(zip(ti[both].tolist(), si[both].tolist()))
        plan = {**_empty_plan(), "t": t.astype(np.int64), "rows": rows.astype(np.int64)}
        if mode == "matched" or not len(al.s0):
            return plan
        s_first, s_last = s_plen + al.s0 - 1, s_plen + al.s1 - 1
        r0, r1 = row(al.t0), row(al.t1)
        keep = (s_first >= want[0]) & (s_last <= want[-1]) & (r0 >= 0) & (r1 >= 0)
        if mode == "spans":
            unknown = self._unknown_logprobs(ex.id)  # a teacher that gave no token log-probability there
            if unknown is not None:
                keep &= (unknown[np.maximum(r1, 0) + 1] - unknown[np.maximum(r0, 0)]) == 0
            s_first, s_last, r0, r1 = s_first[keep], s_last[keep], r0[keep], r1[keep]
            plan.update(span_end=s_last.astype(np.int64), span_len=(s_last - s_first + 1).astype(np.int64),
                        span_r0=r0.astype(np.int64), span_r1=r1.astype(np.int64))
            return plan
        # uld: the span's positions paired in order with the teacher's (ULD pairs by position)
        s_first, s_last, r0, r1 = s_first[keep], s_last[keep], r0[keep], r1[keep]
        npair = np.minimum(s_last - s_first, r1 - r0) + 1
        off = np.arange(npair.sum()) - np.repeat(np.cumsum(npair) - npair, npair)
        plan.update(uld_t=(np.repeat(s_first, npair) + off).astype(np.int64),
                    uld_rows=(np.repeat(r0, npair) + off).astype(np.int64))
        return plan

    # the fix for each cause of low coverage, most positions lost first in the message
    _FIXES = {
        "not_extracted": "{n} example(s) of this split were never extracted (their ids are not in the store: "
                         "`logits --limit`, an interrupted run, or a corpus that grew); add them with "
                         "`python -m mlx_distill logits --resume --teacher {teacher} --data {data} --out {dir}`",
        "text_differs": "{n} example(s) have another completion text than the teacher scored (the tokenizers "
                        "differ, so the completions are compared as text, chat-template markers left out: the "
                        "record changed, or --think-in-content / the template rewrites the assistant turn on one "
                        "side only, or --no-mask-prompt on one side: across tokenizers the completion is what "
                        "--mask-prompt leaves in the loss); render them alike, or re-extract",
        "token_boundaries": "the tokenizers differ (--kd-align {mode}): positions whose tokens do not line up with "
                            "the teacher's get no teacher signal{hint}; use a student that shares the teacher's "
                            "tokenizer (same family) for full coverage",
        "unscored_range": "same tokenizer and tokens, but the student trains on positions the teacher did not "
                          "score (e.g. --no-mask-prompt here, not in `logits`); use the same --mask-prompt as "
                          "`logits`, or re-extract with it",
    }

    def _coverage_message(self, rep: dict, lost: dict, min_coverage: float) -> str:
        man = self.manifest.get("config", {})
        causes = [c for c in sorted(lost, key=lost.get, reverse=True) if lost[c]]
        hint = {"matched": " (--kd-align spans gives the rest the span signal)",
                "uld": " (ULD pairs a span's positions in order; the extra ones on the longer side have none)"}
        fixes = []
        for c in causes:
            n = rep["missing_examples"] if c == "not_extracted" else rep["text_differs"]
            fixes.append(f"[{lost[c]} positions] " + self._FIXES[c].format(
                n=n, teacher=man.get("teacher", "TEACHER"), data=man.get("data", "CORPUS"), dir=self.dir,
                mode=rep["mode"], hint=hint.get(rep["mode"], "")))
        by_class = ", ".join(f"{k} {v}" for k, v in rep["classes"].items())
        return (f"{self.dir}: teacher logits cover {rep['coverage']:.1%} of the {rep['positions']} {rep['split']} "
                f"completion positions < --kd-min-coverage {min_coverage:.0%} ({rep['mode']} alignment: "
                f"{'same' if rep['mode'] == 'exact' else 'different'} tokenizer as the teacher; {by_class}). Why: "
                + "; ".join(fixes) + ". Or lower --kd-min-coverage to train with what is covered "
                "(the KD loss is averaged over the covered positions only).")

    def _mismatch_message(self, mismatched: list, n_examples: int, where: str) -> str:
        """Same tokenizer, different token ids: say whether the prompt or the completion moved."""
        ex = mismatched[0]
        scored = self.scored_tokens(ex.id)
        n = min(len(scored), len(ex.tokens))
        diff = next((i for i in range(n) if scored[i] != ex.tokens[i]), n)
        a = int(ex.tokens[diff]) if diff < len(ex.tokens) else "end"
        b = int(scored[diff]) if diff < len(scored) else "end"
        stored_plen = int(self.entries[ex.id]["prompt_len"])
        if diff < min(ex.prompt_len, stored_plen):
            why = ("the prompt differs: render with the same --prompt-template, --system-prompt and chat template "
                   "as `logits` did")
        else:
            why = ("the completion differs: the record's text, or how it is rendered (--think-in-content, the "
                   "chat template), changed since `logits` scored it")
        return (f"{self.dir / MANIFEST}: example {ex.id!r}: same tokenizer as the teacher, but the student's token ids "
                f"differ from the ones the teacher scored (first difference at token {diff}: student {a}, scored "
                f"{b}; {len(mismatched)} of {n_examples} {where} example(s) differ); {why}, or re-extract into a "
                "new --out.")

    def _map_ids(self, ids: np.ndarray) -> np.ndarray:
        """Teacher ids -> student ids; -1 where the student has no such token."""
        ids = ids.astype(np.int64)
        if self._remap is not None:
            ok = ids < len(self._remap)
            ids = np.where(ok, self._remap[np.minimum(ids, len(self._remap) - 1)], -1)
        return np.where(ids < self.student_vocab, ids, -1)

    def _count_dropped(self, examples) -> tuple[int, int]:
        dropped = slots = 0
        for ex in examples:
            p = self._plans.get(ex.id)
            if p is None or not len(p["t"]):
                continue
            ids, _ = self.rows(ex.id)
            mapped = self._map_ids(ids[p["rows"]])
            dropped += int(np.sum(mapped < 0))
            slots += mapped.size
        return dropped, slots

    def alignment_summary(self) -> dict:
        """{split: {mode, positions, classes, coverage}} for the train run's manifest (`kd_alignment`)."""
        return {s: {"mode": r["mode"], "positions": r["positions"], "classes": dict(r["classes"]),
                    "coverage": r["coverage"]} for s, r in self.reports.items()}

    # -------------------------------------------------------------- serving
    def batch_arrays(self, batch, top_k: int | None = None) -> dict:
        """kd_ids (B, L-1, K) int32 and kd_logits (B, L-1, K) float32 aligned with
        `data.loss_mask(batch)`: position t of row b is the teacher's top-K (after dropping
        ids the student lacks) for predicting token t+1; slots without a teacher token hold
        id 0 and logit -inf (an empty slot for `kd_loss`). Across tokenizers also, as
        `losses.kd_loss` reads them: ``spans``: kd_span_logp, kd_span_len (at each span's last
        position) and kd_span_in (B, L-1); ``uld``: kd_uld (B, L-1), its positions holding the
        teacher's sorted top-K log-probabilities with id -1."""
        k = self.m if top_k is None else int(top_k)
        if k > self.m:
            raise InputError(f"--kd-top-k {k} > M={self.m} stored in {self.dir}; lower --kd-top-k or re-extract "
                             f"with --top-m >= {k}")
        if self.student_vocab is None:
            raise RuntimeError("TopMStore.check(...) must run before batch_arrays")
        B, L = batch.tokens.shape
        out_ids = np.zeros((B, L - 1, k), np.int32)
        out_lp = np.full((B, L - 1, k), -np.inf, np.float32)
        spans, uld = self.mode == "spans", self.mode == "uld"
        if spans:
            s_logp, s_len, s_in = np.zeros((B, L - 1), np.float32), np.zeros((B, L - 1), np.int32), \
                np.zeros((B, L - 1), np.float32)
        if uld:
            u_in = np.zeros((B, L - 1), np.float32)
        for r, eid in enumerate(batch.ids):
            if eid not in self._plans:
                raise RuntimeError(f"example {eid!r} was not passed to TopMStore.check")
            p = self._plans[eid]
            lim = batch.lengths[r] - 1
            t, rows = p["t"], p["rows"]
            t_ok = t < lim
            t, rows = t[t_ok], rows[t_ok]
            if len(t):
                ids, lps = self.rows(eid)
                ids, lps = self._map_ids(ids[rows]), lps[rows].astype(np.float32)
                lps = np.where(ids >= 0, lps, -np.inf)
                order = np.argsort(-lps, axis=-1, kind="stable")[:, :k]  # slots are sorted; re-sort after drops
                out_ids[r, t] = np.maximum(np.take_along_axis(ids, order, -1), 0)
                out_lp[r, t] = np.take_along_axis(lps, order, -1)
            if spans and len(p["span_end"]):
                # the teacher's sequence log-probability of each span's text: its tokens' sum
                act = self.token_logprobs(eid).astype(np.float64)
                cs = np.concatenate([[0.0], np.cumsum(act)])
                keep = p["span_end"] < lim
                e, n = p["span_end"][keep], p["span_len"][keep]
                lp = (cs[p["span_r1"][keep] + 1] - cs[p["span_r0"][keep]]).astype(np.float32)
                keep = np.isfinite(lp)
                e, n, lp = e[keep], n[keep], lp[keep]
                s_logp[r, e], s_len[r, e] = lp, n
                inside = np.repeat(e - n + 1, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
                s_in[r, inside] = 1.0
            if uld and len(p["uld_t"]):
                keep = p["uld_t"] < lim
                ut, ur = p["uld_t"][keep], p["uld_rows"][keep]
                _, lps = self.rows(eid)
                out_ids[r, ut] = -1
                out_lp[r, ut] = lps[ur, :k].astype(np.float32)  # stored sorted: the top-K as they are
                u_in[r, ut] = 1.0
        out = {"kd_ids": out_ids, "kd_logits": out_lp}
        if spans:
            out.update(kd_span_logp=s_logp, kd_span_len=s_len, kd_span_in=s_in)
        if uld:
            out["kd_uld"] = u_in
        return out


def _last_in_text(ends: np.ndarray) -> int:
    """Index of the last token that spells part of the text (-1: none)."""
    w = np.nonzero(np.diff(np.concatenate([[0], ends])) > 0)[0]
    return int(w[-1]) if len(w) else -1


def _empty_plan() -> dict:
    z = np.zeros(0, np.int64)
    return {"t": z, "rows": z, "span_end": z, "span_len": z, "span_r0": z, "span_r1": z, "uld_t": z, "uld_rows": z}


class OnlineTeacher:
    """Online KD: the teacher, held in memory beside the student, scores every batch as it is
    trained (one extra forward pass per step, no cache on disk). Same batch_arrays contract as
    `TopMStore`, for a teacher with the student's tokenizer: the student's token ids are the
    teacher's input; teacher ids beyond the student's embedding rows become empty slots, as in
    the offline path. A teacher with another tokenizer is `OnlineCrossTeacher`."""

    mode, cross = "exact", False

    def __init__(self, cfg: TrainConfig, tokenizer, vocab_size: int, teacher: "Teacher | None" = None):
        self.teacher = teacher or Teacher(cfg.kd_teacher, backend=cfg.backend, flag="--kd-teacher")
        mine, theirs = tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(self.teacher.tokenizer)
        if mine != theirs:
            raise InputError(f"--kd-teacher {cfg.kd_teacher}: its tokenizer differs from the student's; use "
                             "`kd_setup` (it aligns the two, `OnlineCrossTeacher`)")
        self.vocab_size = vocab_size
        self.reports: dict = {}

    def check(self, examples: list, where: str) -> dict:
        n = sum(len(e.tokens) - 1 - first_target(e.prompt_len) for e in examples)
        self.reports[where] = rep = {"split": where, "mode": "exact", "positions": n, "coverage": 1.0,
                                     "classes": {"exact": n, "matched": 0, "spans": 0, "none": 0}}
        return rep

    alignment_summary = TopMStore.alignment_summary

    def batch_arrays(self, batch, top_k: int) -> dict:
        ids, lps = self.teacher.top_m(batch.tokens[:, :-1], top_k, lengths=np.asarray(batch.lengths) - 1)
        outside = ids >= self.vocab_size
        return {"kd_ids": np.where(outside, 0, ids).astype(np.int32),
                "kd_logits": np.where(outside, -np.inf, lps).astype(np.float32)}


class OnlineCrossTeacher(TopMStore):
    """Online KD across tokenizers: a `TopMStore` whose rows the teacher computes for each batch.

    The corpus is rendered a second time with the teacher's tokenizer and chat template (the
    same records, ids and options), so every example has the teacher's tokens and completion
    offsets up front: `check` plans the alignment once, exactly as for a stored teacher; each
    `batch_arrays` call runs the teacher on the batch's examples in the teacher's tokens (one
    forward, top-K and the actual tokens' log-probabilities) and serves them through the plans.
    Teacher ids the student cannot spell are counted per batch in `dropped`/`slots`.

    On-policy KD (`sources.OnPolicySource`): `rollout_arrays` scores the student's rollouts. A
    rollout exists only in the student's tokens: its completion text (`align.completion_text`)
    is encoded with the teacher's tokenizer after the teacher's rendering of the same prompt
    (its chat template's generation prompt), followed by the teacher's end-of-turn tokens when
    the rollout ended with one, then planned and served like any example."""

    def __init__(self, cfg: TrainConfig, teacher: "Teacher", teacher_examples: dict, top_k: int):
        self.teacher, self.dir = teacher, Path(cfg.kd_teacher)
        self.m = int(top_k)
        self.vocab_size = None
        self._t_pieces = align.pieces_of(teacher.tokenizer)
        self._ex = teacher_examples
        self.entries, self._ends = {}, {}
        for e in teacher_examples.values():
            text, ends = align.completion_text(teacher.tokenizer, e.tokens[e.prompt_len:])
            first = first_target(e.prompt_len)
            self.entries[e.id] = {"first": first, "n": len(e.tokens) - 1 - first, "prompt_len": int(e.prompt_len),
                                  "length": len(e.tokens), "text_sha256": align.text_sha(text)}
            self._ends[e.id] = np.concatenate([np.zeros(e.prompt_len, np.int64), ends])
        self.manifest = {"tokenizer": {"fingerprint": tokenizer_fingerprint(teacher.tokenizer)},
                         "config": {"teacher": cfg.kd_teacher, "data": cfg.data}}
        self._shards, self._plans, self._remap = {}, {}, None
        self.student_vocab, self.mode, self.cross = None, "", True
        self.report, self.reports = {}, {}
        self._scores: dict = {}
        self.dropped = self.slots = 0
        self._pad = data.pad_id_of(teacher.tokenizer)

    def teacher_pieces(self):
        return self._t_pieces

    def scored_tokens(self, example_id: str) -> np.ndarray:
        return self._ex[example_id].tokens

    def teacher_ends(self, example_id: str) -> np.ndarray:
        return self._ends[example_id]

    def rows(self, example_id: str):
        return self._scores[example_id][:2]

    def token_logprobs(self, example_id: str) -> np.ndarray:
        return self._scores[example_id][2]

    def _unknown_logprobs(self, example_id: str):
        return None  # scored per batch, always with the actual tokens' log-probabilities

    def _count_dropped(self, examples) -> tuple[int, int]:
        return 0, 0  # nothing scored yet: counted per batch

    def check(self, examples: list, student_vocab_size: int, tokenizer, *a, **kw) -> dict:
        self._student_tok = tokenizer
        return super().check(examples, student_vocab_size, tokenizer, *a, **kw)

    def rollout_arrays(self, batch, top_k: int) -> dict:
        """The student's rollouts `batch` (rows: prompt + sampled completion, ids: the source
        examples) scored by the teacher in its own tokens: `batch_arrays`' contract."""
        s_tok, t_tok = self._student_tok, self.teacher.tokenizer
        s_special = align.special_mask(s_tok)
        keys = []
        for r, eid in enumerate(batch.ids):
            key = f"{eid}\x00rollout{r}"
            keys.append(key)
            src = self._ex.get(eid)
            toks = batch.tokens[r, : batch.lengths[r]]
            plen = int(batch.prompt_lens[r])
            ex = data.Example(key, toks, plen)
            if src is None:
                self._plans[key] = _empty_plan()
                continue
            text, s_ends = align.completion_text(s_tok, toks[plen:])
            try:
                text.decode("utf-8")
                cut = False
            except UnicodeDecodeError as err:  # sampled byte pieces that spell no character: align the
                # text before them, up to the last whole student token (the rest of the rollout gets none)
                whole = s_ends[s_ends <= err.start]
                text = text[: int(whole.max()) if len(whole) else 0].rstrip()
                s_ends, cut = np.clip(s_ends, 0, len(text)), True
            t_body = [int(i) for i in t_tok.encode(text.decode("utf-8"), add_special_tokens=False)]
            tail = []
            s_tail = toks[plen + _last_in_text(s_ends) + 1:]
            if not cut and s_special[np.minimum(s_tail, len(s_special) - 1)].any():  # the rollout ended its turn
                _, t_ends = align.completion_text(t_tok, src.tokens[src.prompt_len:])
                tail = src.tokens[src.prompt_len + _last_in_text(t_ends) + 1:].tolist()  # the teacher's end of turn
            t_ex = data.Example(key, np.asarray(src.tokens[: src.prompt_len].tolist() + t_body + tail, np.int32),
                                src.prompt_len)
            self._ex[key] = t_ex
            t_text, t_ends = align.completion_text(t_tok, t_ex.tokens[t_ex.prompt_len:])
            first = first_target(t_ex.prompt_len)
            self.entries[key] = {"first": first, "n": len(t_ex.tokens) - 1 - first, "prompt_len": t_ex.prompt_len,
                                 "length": len(t_ex.tokens), "text_sha256": align.text_sha(t_text)}
            self._ends[key] = np.concatenate([np.zeros(t_ex.prompt_len, np.int64), t_ends])
            want = np.arange(first_target(plen), len(toks) - 1)
            plan = self._plan_cross(ex, self.entries[key], want, s_tok, self.mode, {}, s_view=(text, s_ends))
            self._plans[key] = plan if plan is not None else _empty_plan()
        try:
            return self.batch_arrays(dataclasses.replace(batch, ids=keys), top_k)
        finally:
            for key in keys:
                for d in (self._ex, self.entries, self._ends, self._plans):
                    d.pop(key, None)

    def batch_arrays(self, batch, top_k: int | None = None) -> dict:
        ids = [i for i in batch.ids if i in self._ex]
        self._scores = {}
        if ids:
            exs = [self._ex[i] for i in ids]
            b = data.collate(exs, list(range(len(exs))), self._pad)
            start = min(first_target(e.prompt_len) for e in exs)
            tids, tlps, act = self.teacher.top_m(b.tokens[:, :-1], self.m, start, targets=b.tokens[:, 1:])
            for r, e in enumerate(exs):
                lo, hi = first_target(e.prompt_len) - start, len(e.tokens) - 1 - start
                self._scores[e.id] = (tids[r, lo:hi], tlps[r, lo:hi], act[r, lo:hi])
                p = self._plans.get(e.id)
                if p is not None and len(p["t"]):
                    mapped = self._map_ids(tids[r, lo:hi][p["rows"]])
                    self.dropped += int(np.sum(mapped < 0))
                    self.slots += mapped.size
        empty = [i for i in batch.ids if i not in self._ex]
        for i in empty:  # not rendered for the teacher (e.g. longer than --max-seq-length in its tokens)
            self._plans.setdefault(i, _empty_plan())
        return super().batch_arrays(batch, top_k)
