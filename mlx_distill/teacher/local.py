"""A teacher on this machine: `LocalTeacher` (an MLX or torch model, optionally with a frozen
adapter) and `OnlineTeacher`, online KD with a teacher of the student's tokenizer.

`LocalTeacher.score` is the `Teacher` protocol (`teacher.base`): one teacher-forced forward pass
per batch -> the top-K ids and log-probabilities at every position, sorted descending, and the
log-probability of the token actually there. The `logits` command stores it; online and on-policy
KD serve it (with ``score_vocab`` = the student's embedding rows)."""

from pathlib import Path

import numpy as np

from mlx_distill.backends.ops import ops
from mlx_distill.io import InputError
from mlx_distill.teacher.base import (TeacherScores, finish_scores, first_target, model_vocab_rows,
                                      teacher_fingerprint, tokenizer_fingerprint)
from mlx_distill.teacher.plan import alignment_summary


class LocalTeacher:
    """A local model as the `Teacher`: loaded from a folder / Hub id / 'smollm2' (`models.resolve_model`),
    or wrapped around an already loaded MLX model (`from_model`, on-policy KD's scorer)."""

    score_vocab: int | None = None  # ids at or beyond it become empty slots (the student's rows)

    def __init__(self, name: str, backend: str = "auto", flag: str = "--teacher", adapter: str = ""):
        from mlx_distill.models import resolve_model

        self.name = name
        self.path = resolve_model(name, flag=flag)
        self.adapter = str(adapter or "")
        if self.adapter and not (Path(self.adapter) / "adapter_config.json").is_file():
            raise InputError(f"--adapter {self.adapter}: no adapter_config.json there (give a `train` run folder)")
        if backend == "auto":
            from mlx_distill.backends import auto_backend

            backend = auto_backend()
        self.backend = backend
        if self.backend == "mlx":
            from mlx_distill.models import load_mlx

            self.model, self.tokenizer = load_mlx(self.path, adapter_path=self.adapter or None)
        else:  # float32 on CPU, bfloat16 on CUDA (backends/torch.py)
            from mlx_distill.backends.torch import load_model

            self.model, self.tokenizer = load_model(self.path, adapter_path=self.adapter or None)
            self.model.eval()
        self.vocab_size = model_vocab_rows(self.path, self.tokenizer)

    @classmethod
    def from_model(cls, model, name: str, vocab_size: int, tokenizer=None, score_vocab: int | None = None,
                   backend: str = "mlx") -> "LocalTeacher":
        """A model already in memory (no folder, no adapter) as the `Teacher`."""
        t = cls.__new__(cls)
        t.name = t.path = name
        t.adapter, t.backend, t.model, t.tokenizer = "", backend, model, tokenizer
        t.vocab_size, t.score_vocab = int(vocab_size), score_vocab
        return t

    def fingerprint(self) -> dict:
        """The model folder's identity, and the adapter's when one is applied (part of what scored)."""
        fp = teacher_fingerprint(self.path)
        if self.adapter:
            a = teacher_fingerprint(self.adapter)
            fp = {**fp, "adapter": a["path"], "weights": {**fp["weights"], "adapter": a["weights"]}}
        return fp

    def score(self, tokens: np.ndarray, top_k: int, start: int = 0,
              lengths: np.ndarray | None = None) -> TeacherScores:
        """`Teacher.score`: one forward of tokens[:, :-1] (right padding changes nothing before it under
        causal attention, so `lengths` is only used to mark the padded positions unknown)."""
        tokens = np.asarray(tokens, np.int32)
        ids, lps, tok = (self._mlx if self.backend == "mlx" else self._torch)(tokens, int(top_k), int(start))
        if lengths is not None:  # positions t >= length - 1 predict padding
            pad = np.arange(start, tokens.shape[1] - 1)[None, :] >= (np.asarray(lengths)[:, None] - 1)
            tok = np.where(pad, np.nan, tok)
        return finish_scores(ids, lps, tok, self.score_vocab)

    def sample(self, tokens: np.ndarray, n: int, temperature: float, start: int, rngs: list, spans: list,
               lengths: np.ndarray | None = None):
        """A sampled store's rows (`logits --sampled-k`): one forward of tokens[:, :-1], then for row r
        `codec.draw_rows` over its positions spans[r] = (lo, hi) (relative to `start`; n draws from
        softmax(z / temperature) with ``rngs[r]``, so the draws do not depend on the batch) -> a
        namespace of ids, counts, logprobs (log p_T of each drawn id) (B, T, n), empty outside the
        spans, and token_logprobs (B, T) (T = 1, as `score` gives them)."""
        from types import SimpleNamespace

        from mlx_distill.teacher import codec

        tokens = np.asarray(tokens, np.int32)
        if self.backend == "mlx":
            import mlx.core as mx

            z = self.model(mx.array(tokens)[:, :-1])[:, start:].astype(mx.float32)
            z = np.array(z)
        else:
            import torch

            with torch.no_grad():
                x = torch.from_numpy(tokens.astype(np.int64)).to(self.model.device)
                z = self.model(input_ids=x[:, :-1], use_cache=False).logits[:, start:].float().cpu().numpy()
        zz = z.astype(np.float64)
        lse = np.log(np.exp(zz - zz.max(-1, keepdims=True)).sum(-1)) + zz.max(-1)
        tok = (np.take_along_axis(zz, tokens[:, start + 1:, None].astype(np.int64), -1)[..., 0] - lse)
        if lengths is not None:
            pad = np.arange(start, tokens.shape[1] - 1)[None, :] >= (np.asarray(lengths)[:, None] - 1)
            tok = np.where(pad, np.nan, tok)
        B, T = z.shape[:2]
        out = {"ids": np.zeros((B, T, n), np.int32), "counts": np.zeros((B, T, n), np.int32),
               "logprobs": np.full((B, T, n), -np.inf, np.float32)}
        for r, (lo, hi) in enumerate(spans):
            d = codec.draw_rows(z[r, lo:hi], n, temperature, rngs[r])
            for k in out:
                out[k][r, lo:hi] = d[k]
        return SimpleNamespace(**out, token_logprobs=tok.astype(np.float32))

    def _mlx(self, tokens: np.ndarray, k: int, start: int) -> tuple:
        import mlx.core as mx

        x = mx.array(tokens)
        z = self.model(x[:, :-1])[:, start:].astype(mx.float32)
        o = ops(z)  # the losses' log-sum-exp: chunked over long vocabularies for float32 accuracy
        lse = o.logsumexp(z, -1)
        idx = o.topk_idx(z, k)
        val = mx.take_along_axis(z, idx, axis=-1)
        order = mx.argsort(-val, axis=-1)
        idx, val = mx.take_along_axis(idx, order, axis=-1), mx.take_along_axis(val, order, axis=-1) - lse
        tok = (mx.take_along_axis(z, x[:, start + 1:, None], axis=-1) - lse)[..., 0]
        mx.eval(idx, val, tok)
        return np.array(idx), np.array(val), np.array(tok)

    def _torch(self, tokens: np.ndarray, k: int, start: int) -> tuple:
        import torch

        with torch.no_grad():
            x = torch.from_numpy(tokens.astype(np.int64)).to(self.model.device)
            z = self.model(input_ids=x[:, :-1], use_cache=False).logits[:, start:].float()
            val, idx = torch.topk(z, k, dim=-1)  # sorted
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            tok = (torch.gather(z, -1, x[:, start + 1:, None]) - lse)[..., 0]
            return idx.int().cpu().numpy(), (val - lse).cpu().numpy(), tok.cpu().numpy()


class OnlineTeacher:
    """Online KD: the teacher, held in memory beside the student (or a vLLM server), scores every
    batch as it is trained (one extra forward pass per step, no cache on disk). Same batch_arrays
    contract as `store.TopMStore`, for a teacher with the student's tokenizer: the student's token
    ids are the teacher's input; teacher ids beyond the student's embedding rows become empty slots
    (``score_vocab``), as in the offline path. A teacher with another tokenizer is
    `cross.OnlineCrossTeacher`."""

    mode, cross = "exact", False

    def __init__(self, tokenizer, vocab_size: int, teacher, flag: str = "--kd-teacher"):
        self.teacher = teacher
        if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(teacher.tokenizer):
            raise InputError(f"{flag} {teacher.name}: its tokenizer differs from the student's; use "
                             "`kd_setup` (it aligns the two, `OnlineCrossTeacher`)")
        self.vocab_size = vocab_size
        teacher.score_vocab = vocab_size
        self.reports: dict = {}

    def check(self, examples: list, where: str) -> dict:
        n = sum(len(e.tokens) - 1 - first_target(e.prompt_len) for e in examples)
        self.reports[where] = rep = {"split": where, "mode": "exact", "positions": n, "coverage": 1.0,
                                     "classes": {"exact": n, "matched": 0, "spans": 0, "none": 0}}
        return rep

    def alignment_summary(self) -> dict:
        return alignment_summary(self.reports)

    def batch_arrays(self, batch, top_k: int) -> dict:
        sc = self.teacher.score(batch.tokens, top_k, lengths=np.asarray(batch.lengths))
        return {"kd_ids": sc.ids, "kd_logits": sc.logprobs}
