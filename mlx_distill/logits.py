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
                                shard, rows, first target index, length, prompt_len, sha256 of the tokens
    vocab.json                  the teacher's token strings by id (for tokenizer alignment)
    shard-00000.safetensors     ids (N, M) int32 | logprobs (N, M) float16 | tokens (n,) int32

Row r of a shard is one target index t of one example (the prediction of token t+1); its
M slots are sorted by decreasing teacher log-probability. The stored values are the
teacher's logits minus their log-sum-exp over the whole vocabulary (log-probabilities at
T = 1): for the renormalised KD loss that is the same as raw logits, and it is what makes
the "rest of vocabulary" bucket (`kd_loss(tail=True)`) computable. ``tokens`` holds the
exact token ids scored for each example. 100 + 50 bytes per completion token for M = 25.

A teacher too large for this machine can score remotely: ``--teacher api --base-url URL --model NAME
--teacher-tokenizer TOK`` sends each example's token ids to a vLLM server and reads its
``prompt_logprobs`` (`mlx_distill.remote_teacher`); the store is the same.

`--resume` adds the examples not yet stored (a corpus that grew, or a run that was
interrupted): the teacher, tokenizer and M must match, and an example whose tokens changed
since it was scored is an error. Shards and the manifest are written atomically; a crash
loses at most the shard being filled.
"""

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import config, data
from .config import LogitsConfig, TrainConfig
from .io import InputError, atomic_path, atomic_write_json, read_json, write_manifest
from .losses import ops

FORMAT = 1
MANIFEST = "manifest.json"
VOCAB = "vocab.json"


# ----------------------------------------------------------------------------- fingerprints
def _hf(tokenizer):
    """The Hugging Face tokenizer inside mlx-lm's TokenizerWrapper (or the tokenizer itself)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


def vocab_strings(tokenizer) -> list[str]:
    """Token string of every id (added/special tokens included); '' for unused ids."""
    vocab = _hf(tokenizer).get_vocab()
    out = [""] * (max(vocab.values()) + 1)
    for s, i in vocab.items():
        out[i] = s
    return out


def tokenizer_fingerprint(tokenizer, strings: list[str] | None = None) -> str:
    """sha256 of the id -> token-string table: equal fingerprints tokenise identically
    as far as ids go (same vocabulary, same ids)."""
    strings = vocab_strings(tokenizer) if strings is None else strings
    return hashlib.sha256(json.dumps(strings, ensure_ascii=False).encode()).hexdigest()


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
        from .models import resolve_model

        self.path = resolve_model(name, flag=flag)
        self.adapter = str(adapter or "")
        if self.adapter and not (Path(self.adapter) / "adapter_config.json").is_file():
            raise InputError(f"--adapter {self.adapter}: no adapter_config.json there (give a `train` run folder)")
        if backend == "auto":
            from .backends import auto_backend

            backend = auto_backend()
        self.backend = backend
        if self.backend == "mlx":
            from mlx_lm import load

            self.model, self.tokenizer = load(self.path, adapter_path=self.adapter or None)
        else:  # float32 on CPU, bfloat16 on CUDA (backends/torch.py)
            from .backends.torch import load_model

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
              lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """inputs (B, L) int32 -> ids (B, L - start, M) int32, logprobs (B, L - start, M) float32,
        sorted descending, for positions start.. (the prompt before `start` needs no top-M).
        `lengths` (each row's real length) is not needed here: right padding changes nothing before
        it under causal attention (`remote_teacher.RemoteTeacher` uses it to send no padding)."""
        if self.backend == "mlx":
            import mlx.core as mx

            z = self.model(mx.array(inputs))[:, start:].astype(mx.float32)
            o = ops(z)  # the losses' log-sum-exp: chunked over long vocabularies for float32 accuracy
            lse = o.logsumexp(z, -1)
            idx = o.topk_idx(z, m)
            val = mx.take_along_axis(z, idx, axis=-1)
            order = mx.argsort(-val, axis=-1)
            idx, val = mx.take_along_axis(idx, order, axis=-1), mx.take_along_axis(val, order, axis=-1) - lse
            mx.eval(idx, val)
            return np.array(idx), np.array(val)
        import torch

        with torch.no_grad():
            x = torch.from_numpy(inputs.astype(np.int64)).to(self.model.device)
            z = self.model(input_ids=x, use_cache=False).logits[:, start:].float()
            val, idx = torch.topk(z, m, dim=-1)  # sorted
            val = val - torch.logsumexp(z, dim=-1, keepdim=True)
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
        save_file(arrays, str(tmp), metadata={"format": f"mlx_distill.logits/{FORMAT}"})
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
        from .remote_teacher import RemoteTeacher

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

    def save_manifest():
        write_manifest(mpath, "logits", config.to_dict(cfg), format=FORMAT, teacher=t_fp,
                       teacher_vocab_size=teacher.vocab_size,
                       tokenizer={"fingerprint": tok_fp, "size": len(t_vocab),
                                  "file": VOCAB},
                       top_m=cfg.top_m,
                       dtype={"ids": "int32", "logprobs": "float16", "tokens": "int32",
                              "values": "teacher logit - logsumexp over the teacher vocabulary (T = 1)"},
                       stats=_bytes_per_token(shards), shards=shards, examples=done,
                       **({"status": "incomplete" if failed else "complete", "failures": failed,
                           "servers": teacher.server_stats()} if remote else {}))

    buf: list[tuple[data.Example, np.ndarray, np.ndarray]] = []
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
        row = tok = 0
        entries = {}
        for e, i, _ in items:
            entries[e.id] = {"shard": k, "row": row, "n": int(len(i)), "first": first_target(e.prompt_len),
                             "tok": tok, "length": int(len(e.tokens)), "prompt_len": int(e.prompt_len),
                             "sha256": tokens_sha(e.tokens)}
            row, tok = row + len(i), tok + len(e.tokens)
        nbytes = _write_shard(out / name, {"ids": ids, "logprobs": lps, "tokens": toks})
        shards.append({"file": name, "examples": len(items), "positions": int(len(ids)),
                       "payload_bytes": int(ids.nbytes + lps.nbytes), "bytes": nbytes})
        done.update(entries)
        save_manifest()  # after the shard: a crash in between leaves an unreferenced file, overwritten next time

    pad = data.pad_id_of(teacher.tokenizer)
    n_pos = n_fwd = 0
    t_model = 0.0
    say(f"teacher {teacher.path} ({teacher.backend}) | {len(examples)} examples, {n_stored} already "
        f"stored, {len(todo)} to score | M={cfg.top_m} -> {out}")
    from .progress import Heartbeat

    # a plain line at least every ~10 s (from a thread: one teacher forward may take longer)
    beat = Heartbeat("logits", total=len(todo), unit="examples", enabled=not quiet).__enter__()
    try:
        # a remote teacher gets one request per example, as many at once as its servers take
        for idx in data.bucket(todo, teacher.capacity if remote else cfg.batch_size):
            b = data.collate(todo, idx, pad)
            tic = time.perf_counter()
            start = min(first_target(todo[i].prompt_len) for i in idx)
            ids, lps = teacher.top_m(b.tokens[:, :-1], cfg.top_m, start, lengths=b.lengths - 1)
            t_model += time.perf_counter() - tic
            lost = teacher.failures if remote else {}
            for r, i in enumerate(idx):
                e = todo[i]
                if r in lost:
                    failed[e.id] = lost[r]
                    continue
                lo, hi = first_target(e.prompt_len) - start, len(e.tokens) - 1 - start
                buf.append((e, ids[r, lo:hi], lps[r, lo:hi]))
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
        from .remote_teacher import EXIT_INCOMPLETE

        print(f"error: teacher logits in {cfg.out} are incomplete: {summary['failed']} example(s) could not be "
              f"scored ({', '.join(f'{k}: {v}' for k, v in summary['failures'].items())}; reasons in "
              f"{Path(cfg.out) / MANIFEST} 'failures'); fix the server and re-run with --resume", file=sys.stderr)
        raise SystemExit(EXIT_INCOMPLETE)


# ----------------------------------------------------------------------------- reading
class TopMStore:
    """Read a logits folder, check it against the student's examples, serve KD batch arrays.

    `check` must see an example before `batch_arrays` serves it. Two alignment modes:

    - ``exact``: the student's tokenizer has the teacher's fingerprint (same id -> string
      table). The student's token ids of every stored example must equal the scored ones,
      else `check` refuses, naming the example and the first differing token.
    - ``string``: the tokenizers differ. Teacher ids are mapped to student ids through their
      token strings (ids with no student token are dropped), and positions are aligned by
      character offset: a student position t (context = its tokens[:t+1]) receives the
      teacher position whose context ends at the same offset of the concatenated token
      strings. Identical tokenisations align everywhere; different ones only where their
      token boundaries coincide. This needs both tokenizers to spell tokens in one alphabet
      (both byte-level BPE like Qwen2.5/Llama-3/SmolLM2, or both SentencePiece); examples
      whose concatenated token strings differ (another alphabet, chat template or system
      prompt) are not covered. Not implemented: a distribution over teacher tokens that
      span several student tokens is not split into per-token probabilities; such
      positions are simply left without a teacher.

    In both modes teacher ids >= the student's vocabulary size are dropped and counted
    (a 152064-row teacher vs a 151936-row student), and `check` refuses when the covered
    share of the student's completion positions is below `min_coverage`.
    """

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        mpath = self.dir / MANIFEST
        if not mpath.is_file():
            raise InputError(f"{self.dir}: no {MANIFEST}; create teacher logits with "
                             "`python -m mlx_distill logits --teacher MODEL --data CORPUS --out DIR`")
        man = read_json(mpath)
        if man.get("stage") != "logits" or man.get("format") != FORMAT:
            raise InputError(f"{mpath}: not a logits folder of format {FORMAT} (stage {man.get('stage')!r}, "
                             f"format {man.get('format')!r}); re-extract with this version")
        self.manifest = man
        self.m = int(man["top_m"])
        self.entries = man["examples"]
        self._shards: dict[int, dict] = {}
        self._plans: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # id -> (target indices, global rows)
        self._remap: np.ndarray | None = None  # teacher id -> student id (-1: none); None = identity
        self.student_vocab: int | None = None
        self.report: dict = {}

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

    def rows(self, example_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n, M) int32, logprobs (n, M) float16) of one example, target indices first..first+n-1."""
        e = self.entries[example_id]
        s = self.shard(e["shard"])
        return s["ids"][e["row"]: e["row"] + e["n"]], s["logprobs"][e["row"]: e["row"] + e["n"]]

    # -------------------------------------------------------------- checking
    def check(self, examples: list, student_vocab_size: int, tokenizer, min_coverage: float = 0.95,
              where: str = "train") -> dict:
        """Plan how every example's loss positions read the cache; report and enforce coverage."""
        self.student_vocab = int(student_vocab_size)
        s_strings = vocab_strings(tokenizer)
        exact = tokenizer_fingerprint(tokenizer, s_strings) == self.manifest["tokenizer"]["fingerprint"]
        if not exact:
            t_strings = read_json(self.dir / self.manifest["tokenizer"]["file"])
            s_index = {s: i for i, s in enumerate(s_strings) if s}
            self._remap = np.array([s_index.get(s, -1) if s else -1 for s in t_strings], dtype=np.int64)
        total = covered = missing = text_differs = 0
        # completion positions left without a teacher, by cause (each cause has its own fix)
        lost = {"not_extracted": 0, "text_differs": 0, "unscored_range": 0, "token_boundaries": 0}
        mismatched = []
        for ex in examples:
            lo, hi = first_target(ex.prompt_len), len(ex.tokens) - 1
            want = np.arange(lo, hi)
            total += len(want)
            ent = self.entries.get(ex.id)
            if ent is None:
                missing += 1
                lost["not_extracted"] += len(want)
                self._plans[ex.id] = (want[:0], want[:0])
                continue
            if exact:
                if ent["sha256"] != tokens_sha(ex.tokens):
                    mismatched.append(ex)
                    continue
                t = want[(want >= ent["first"]) & (want < ent["first"] + ent["n"])]
                rows = t - ent["first"]
                lost["unscored_range"] += len(want) - len(t)
            else:
                t, rows = self._align_by_offsets(ex, ent, want, t_strings, s_strings)
                if t is None:
                    text_differs += 1
                    lost["text_differs"] += len(want)
                    t = rows = want[:0]
                else:
                    lost["token_boundaries"] += len(want) - len(t)
            self._plans[ex.id] = (t.astype(np.int64), rows.astype(np.int64))
            covered += len(t)
        if mismatched:
            raise InputError(self._mismatch_message(mismatched, len(examples), where))
        dropped, slots = self._count_dropped(examples)
        cov = covered / total if total else 1.0
        self.report = rep = {
            "split": where, "mode": "exact" if exact else "string", "examples": len(examples),
            "missing_examples": missing, "text_differs": text_differs, "positions": total,
            "covered_positions": covered, "coverage": round(cov, 4), "dropped_teacher_ids": dropped,
            "teacher_slots": slots, "dropped_fraction": round(dropped / slots, 6) if slots else 0.0,
            "uncovered_by_cause": lost}
        if cov < min_coverage:
            raise InputError(self._coverage_message(rep, lost, min_coverage))
        return rep

    # the fix for each cause of low coverage, most positions lost first in the message
    _FIXES = {
        "not_extracted": "{n} example(s) of this split were never extracted (their ids are not in the store: "
                         "`logits --limit`, an interrupted run, or a corpus that grew); add them with "
                         "`python -m mlx_distill logits --resume --teacher {teacher} --data {data} --out {dir}`",
        "text_differs": "{n} example(s) render to different text than the teacher scored (the tokenizers differ "
                        "AND so does the rendered string: another chat template, --system-prompt or "
                        "--prompt-template); render them alike, or extract with a teacher whose tokenizer the "
                        "student shares",
        "token_boundaries": "the tokenizers differ (mode string): only positions where both tokenizers end a token "
                            "at the same character get a teacher; use a student that shares the teacher's "
                            "tokenizer (same family) for full coverage",
        "unscored_range": "same tokenizer and tokens, but the student trains on positions the teacher did not "
                          "score (e.g. --no-mask-prompt here, not in `logits`); use the same --mask-prompt as "
                          "`logits`, or re-extract with it",
    }

    def _coverage_message(self, rep: dict, lost: dict, min_coverage: float) -> str:
        man = self.manifest.get("config", {})
        causes = [c for c in sorted(lost, key=lost.get, reverse=True) if lost[c]]
        fixes = []
        for c in causes:
            n = rep["missing_examples"] if c == "not_extracted" else rep["text_differs"]
            fixes.append(f"[{lost[c]} positions] " + self._FIXES[c].format(
                n=n, teacher=man.get("teacher", "TEACHER"), data=man.get("data", "CORPUS"), dir=self.dir))
        return (f"{self.dir}: teacher logits cover {rep['coverage']:.1%} of the {rep['positions']} {rep['split']} "
                f"completion positions < --kd-min-coverage {min_coverage:.0%} ({rep['mode']} alignment: "
                f"{'same' if rep['mode'] == 'exact' else 'different'} tokenizer as the teacher). Why: "
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

    def _align_by_offsets(self, ex, ent, want, t_strings, s_strings):
        scored = self.scored_tokens(ex.id)
        t_tok = [t_strings[i] for i in scored]
        s_tok = [s_strings[i] if i < len(s_strings) else "" for i in ex.tokens]
        if "".join(t_tok) != "".join(s_tok):
            return None, None
        t_end = np.cumsum([len(s) for s in t_tok])  # offset after token j
        s_end = np.cumsum([len(s) for s in s_tok])
        # teacher target u has context tokens[:u+1], i.e. ends at t_end[u]
        u = np.arange(ent["first"], ent["first"] + ent["n"])
        at = {int(t_end[k]): k for k in u}
        pairs = [(t, at[int(s_end[t])]) for t in want if int(s_end[t]) in at]
        if not pairs:
            return want[:0], want[:0]
        t, uu = np.array(pairs).T
        return t, uu - ent["first"]

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
            t, rows = self._plans.get(ex.id, (None, None))
            if t is None or not len(t):
                continue
            ids, _ = self.rows(ex.id)
            mapped = self._map_ids(ids[rows])
            dropped += int(np.sum(mapped < 0))
            slots += mapped.size
        return dropped, slots

    # -------------------------------------------------------------- serving
    def batch_arrays(self, batch, top_k: int | None = None) -> dict:
        """kd_ids (B, L-1, K) int32 and kd_logits (B, L-1, K) float32 aligned with
        `data.loss_mask(batch)`: position t of row b is the teacher's top-K (after dropping
        ids the student lacks) for predicting token t+1; slots without a teacher token hold
        id 0 and logit -inf (an empty slot for `kd_loss`)."""
        k = self.m if top_k is None else int(top_k)
        if k > self.m:
            raise InputError(f"--kd-top-k {k} > M={self.m} stored in {self.dir}; lower --kd-top-k or re-extract "
                             f"with --top-m >= {k}")
        if self.student_vocab is None:
            raise RuntimeError("TopMStore.check(...) must run before batch_arrays")
        B, L = batch.tokens.shape
        out_ids = np.zeros((B, L - 1, k), np.int32)
        out_lp = np.full((B, L - 1, k), -np.inf, np.float32)
        for r, eid in enumerate(batch.ids):
            if eid not in self._plans:
                raise RuntimeError(f"example {eid!r} was not passed to TopMStore.check")
            t, rows = self._plans[eid]
            t_ok = t < batch.lengths[r] - 1
            t, rows = t[t_ok], rows[t_ok]
            if not len(t):
                continue
            ids, lps = self.rows(eid)
            ids, lps = self._map_ids(ids[rows]), lps[rows].astype(np.float32)
            lps = np.where(ids >= 0, lps, -np.inf)
            order = np.argsort(-lps, axis=-1, kind="stable")[:, :k]  # slots are sorted; re-sort after drops
            out_ids[r, t] = np.maximum(np.take_along_axis(ids, order, -1), 0)
            out_lp[r, t] = np.take_along_axis(lps, order, -1)
        return {"kd_ids": out_ids, "kd_logits": out_lp}


# ----------------------------------------------------------------------------- train hook
def student_vocab_size(cfg: TrainConfig, tokenizer) -> int:
    """Embedding rows of the student (config.json), else its tokenizer size."""
    try:
        from .models import resolve_model

        c = json.loads((Path(resolve_model(cfg.model)) / "config.json").read_text())
        v = c.get("vocab_size") or c.get("text_config", {}).get("vocab_size")
        if v:
            return int(v)
    except (OSError, ValueError, InputError):
        pass
    return len(vocab_strings(tokenizer))


class OnlineTeacher:
    """Online KD: the teacher, held in memory beside the student, scores every batch as it is
    trained (one extra forward pass per step, no cache on disk). Same batch_arrays contract as
    `TopMStore`. Needs the student's tokenizer (the student's token ids are the teacher's input);
    teacher ids beyond the student's embedding rows become empty slots, as in the offline path."""

    def __init__(self, cfg: TrainConfig, tokenizer, vocab_size: int):
        self.teacher = Teacher(cfg.kd_teacher, backend=cfg.backend, flag="--kd-teacher")
        mine, theirs = tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(self.teacher.tokenizer)
        if mine != theirs:
            raise InputError(f"--kd-teacher {cfg.kd_teacher}: its tokenizer differs from the student's; online KD "
                             "needs the same vocabulary (extract with `mlx_distill logits` for aligned offline KD)")
        self.vocab_size = vocab_size

    def batch_arrays(self, batch, top_k: int) -> dict:
        ids, lps = self.teacher.top_m(batch.tokens[:, :-1], top_k)
        outside = ids >= self.vocab_size
        return {"kd_ids": np.where(outside, 0, ids).astype(np.int32),
                "kd_logits": np.where(outside, -np.inf, lps).astype(np.float32)}


def kd_setup(cfg: TrainConfig, examples_by_split: dict, tokenizer, vocab_size: int | None = None):
    """Open cfg.kd_dir and check it against the student's examples (called by `train`), or
    load the online teacher (cfg.kd_teacher). Coverage is enforced on the train split; other
    splits are planned and reported."""
    if cfg.kd_dir and cfg.kd_teacher:
        raise InputError("give either --kd (offline top-M logits) or --kd-teacher (online), not both")
    if cfg.kd_top_k < 1:
        raise InputError(f"--kd-top-k must be >= 1, got {cfg.kd_top_k}")
    if cfg.kd_teacher:
        print(f"kd: online teacher {cfg.kd_teacher} (K={cfg.kd_top_k})", file=sys.stderr)
        return OnlineTeacher(cfg, tokenizer, vocab_size or student_vocab_size(cfg, tokenizer))
    store = TopMStore(cfg.kd_dir)
    if cfg.kd_top_k > store.m:
        raise InputError(f"--kd-top-k {cfg.kd_top_k} > M={store.m} stored in {cfg.kd_dir}; lower --kd-top-k "
                         f"or re-extract with --top-m >= {cfg.kd_top_k}")
    v = vocab_size or student_vocab_size(cfg, tokenizer)
    for split, exs in examples_by_split.items():
        rep = store.check(exs, v, tokenizer, cfg.kd_min_coverage if split == "train" else 0.0, where=split)
        print(f"kd {split}: {rep['mode']} alignment, coverage {rep['coverage']:.1%} of {rep['positions']} positions, "
              f"{rep['missing_examples']} example(s) without logits, {rep['dropped_teacher_ids']} teacher id(s) "
              f"dropped ({rep['dropped_fraction']:.3%} of slots) | M={store.m} K={cfg.kd_top_k}", file=sys.stderr)
    return store
