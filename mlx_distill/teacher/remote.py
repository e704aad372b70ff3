"""A remote white-box teacher: top-M log-probabilities from a vLLM server (``logits --teacher api``).

    python -m mlx_distill logits --teacher api --base-url http://gpu-box:8000/v1 \\
        --model Qwen/Qwen2.5-72B-Instruct --teacher-tokenizer Qwen/Qwen2.5-72B-Instruct \\
        --top-m 20 --data corpora/gsm8k --out runs/logits-72b

For a teacher too large for the Mac: the corpus is rendered and tokenised here exactly as for a
local teacher (`teacher.logits`, with the tokenizer of ``--teacher-tokenizer``), and every example
is one ``POST /v1/completions`` whose prompt is its token ids, with ``max_tokens: 1`` and
``prompt_logprobs: M`` (through the ``openai`` package's ``extra_body``). vLLM answers, in
``choices[0].prompt_logprobs``, one entry per prompt token: ``None`` for the first, then for
token t a map ``{"<id>": {"logprob", "rank", "decoded_token"}}`` holding the M most likely ids
at that position *and* the token actually there (so M or M + 1 entries). Entry t + 1 is what
the store keeps for target index t (the prediction of token t + 1), so the store is the one a
local `teacher.local.LocalTeacher` writes: same ids, same values (log-probabilities over the whole
vocabulary at T = 1; vLLM's default ``--logprobs-mode raw_logprobs``), float16, keyed by
example id. Its manifest names the teacher as ``{"api": model, "base_url": [...]}`` (public URLs).

Servers. Only vLLM returns prompt log-probabilities with a top-k (``prompt_logprobs``; checked on
vLLM 0.32). ``mlx_lm server`` answers ``/v1/completions`` with generated-token log-probs only, and
llama.cpp's server has ``n_probs`` for generated tokens only: neither can score a prompt, and the
first request says so (``InputError``). SGLang's ``return_logprob``/``logprob_start_len`` has
another request and response shape and is not supported.

Start-up checks (one probe request per server, before any work):

* The token ids: the probe text is sent as *text* with ``return_token_ids``; the server's
  ``prompt_token_ids`` must equal ``--teacher-tokenizer``'s encoding of it, else the run is
  refused naming the first differing token (another tokenizer would score other tokens).
* The cap on k: vLLM refuses ``prompt_logprobs`` above ``--max-logprobs`` (default 20) with
  "... greater than max allowed: N"; the run is refused with N and both ways out.
* The shape: a server that answers without ``prompt_logprobs`` is not a white-box teacher.

Concurrency and failures: requests go through the project's clients (`generation.clients`): one
URL is an ``OpenAIClient``, several a ``pool.PoolClient`` (least outstanding first, per-server
``--concurrency``, retries, servers marked down and back). Each `score` call sends its batch at
once, each row without its padding; a row longer than the server's ``--max-model-len`` (read from
its ``GET /v1/models`` entry, ``max_model_len``, at the probe) is refused before it is sent; a
request that fails for good (its retries spent, or another 400) marks that row failed
(`failures`), the other rows are stored, and the `logits` command ends the run "incomplete" with
exit code 3 (``EXIT_INCOMPLETE``, as ``corpus build``); ``--resume`` scores what is missing.
Training (`for_training`) refuses a --max-seq-length the server cannot take before it starts.

The same object is the `Teacher` of online and on-policy KD (`score`), so rollouts can be scored
by a server: there the token ids are the student's, so the student's tokenizer must be the
teacher's (or the rollouts are re-rendered in the teacher's tokens: `teacher.cross`).
"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import numpy as np

from mlx_distill.io import InputError, public_url
from mlx_distill.teacher.base import TeacherScores, finish_scores, vocab_strings

EXIT_INCOMPLETE = 3  # the exit code of `corpus build` when work failed for good
# the tokenizer probe: words, digits, punctuation, whitespace runs and non-ASCII, so that two
# different tokenizers (almost) surely split it differently
PROBE_TEXT = ("Ann has 12 apples and buys 7.5 kg more; how many now?  Café naïve, 東京, x² + y² = z²!\n"
              "\tdef f(x):\n        return x ** 2  # <think> 3/4 </think>")
_CAP = re.compile(r"greater than max allowed:\s*(-?\d+)")


def load_tokenizer(name: str, flag: str = "--teacher-tokenizer"):
    """`name` (a local folder, 'smollm2' / 'gemma3-270m', or a Hugging Face id: its tokenizer files only) -> (folder, tokenizer),
    the tokenizer loaded the way mlx-lm loads a model's (the local teacher's rendering)."""
    if not name or not str(name).strip():
        raise InputError(f"--teacher api needs {flag}: a local folder or Hugging Face id holding the teacher's "
                         "tokenizer (the one the server's model uses; no weights needed)")
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    from mlx_distill import embedded, gemma
    from mlx_distill.models import hub_offline, is_hub_id, resolve_model

    name = str(name).strip()
    path = Path(name).expanduser()
    if name.lower() in embedded.NAMES + gemma.NAMES + gemma.NAMES_4BIT and not path.exists():
        path = Path(resolve_model(name, flag))  # a model this package builds offline (smollm2, gemma3-270m)
    if not path.exists():
        if not is_hub_id(name):
            raise InputError(f"{flag} {name}: no such folder, and not a Hugging Face id")
        if hub_offline():  # a cached snapshot is still found by id
            try:
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(name, allow_patterns=["*.json", "tokenizer.model", "*.tiktoken",
                                                                    "*.txt", "*.jinja"], local_files_only=True))
            except Exception:  # noqa: BLE001 - not cached
                raise InputError(f"{flag} {name}: not a local folder, and not in the Hugging Face cache while "
                                 "HF_HUB_OFFLINE=1; download it once (its tokenizer files are enough) or give a "
                                 "folder") from None
    elif not path.is_dir():
        raise InputError(f"{flag} {name}: is a file; give the folder holding tokenizer.json / tokenizer_config.json")
    eos = None
    if path.is_dir() and (path / "config.json").is_file():  # as mlx_lm.load: the model config's eos ids win
        import json

        eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    try:
        tok = mlx_load_tokenizer(path if path.exists() else name, eos_token_ids=eos)
    except Exception as e:  # noqa: BLE001 - no tokenizer files there, a Hub error ...
        raise InputError(f"{flag} {name}: could not load a tokenizer ({type(e).__name__}: {str(e)[:160]}); give "
                         "a folder with tokenizer.json / tokenizer_config.json or the served model's Hub id") from None
    return str(path.resolve() if path.exists() else name), tok


def parse_prompt_logprobs(entries, tokens, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vLLM's ``prompt_logprobs`` for the prompt `tokens` (n ids) -> ids (n-1, k) int32 and logprobs
    (n-1, k) float32 sorted descending, and the log-probability of each actual token (n-1,) float32;
    row t is the prediction of token t + 1 (entry t + 1). Raises ``ValueError`` on another shape."""
    n = len(tokens)
    if not isinstance(entries, list) or len(entries) != n:
        raise ValueError(f"prompt_logprobs has {len(entries) if isinstance(entries, list) else 'no'} entries for "
                         f"a prompt of {n} tokens")
    ids = np.zeros((n - 1, k), np.int32)
    lps = np.zeros((n - 1, k), np.float32)
    tok = np.zeros(n - 1, np.float32)
    for t in range(1, n):
        d = entries[t]
        if not isinstance(d, dict) or len(d) < k:
            raise ValueError(f"prompt_logprobs entry {t} holds {len(d) if isinstance(d, dict) else d!r} "
                             f"token(s), fewer than the {k} asked for")
        items = [(int(key), float(v["logprob"]), v.get("rank") or 0) for key, v in d.items()]
        items.sort(key=lambda x: (-x[1], x[2]))  # by log-probability; vLLM's rank breaks exact ties
        top = items[:k]
        ids[t - 1] = [x[0] for x in top]
        lps[t - 1] = [x[1] for x in top]
        here = d.get(str(int(tokens[t]))) or d.get(int(tokens[t]))
        if here is None:
            raise ValueError(f"prompt_logprobs entry {t} lacks the prompt's own token {int(tokens[t])}")
        tok[t - 1] = float(here["logprob"])
    if n > 1 and np.any(np.logaddexp.reduce(lps.astype(np.float64), axis=-1) > 1e-3):
        raise ValueError("the top-k probabilities sum to more than 1: these are not log-probabilities")
    return ids, lps, tok


class RemoteTeacher:
    """A vLLM server as the `Teacher` (`teacher.base`): `score` for the `logits` command and for KD (module doc)."""

    backend = "api"
    adapter = ""
    raise_on_failure = False  # `logits` records failed rows (incomplete run); training raises instead

    def __init__(self, base_url, model: str = "", tokenizer: str = "", api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, max_retries: int = 6, timeout: float = 600.0, score_vocab: int | None = None):
        from mlx_distill.generation.clients import base_urls
        from mlx_distill.generation import make_client

        if not base_urls(base_url):
            raise InputError("--teacher api needs --base-url: the vLLM server's OpenAI-compatible endpoint, e.g. "
                             "http://127.0.0.1:8000/v1 (several URLs make a pool)")
        self.tokenizer_path, self.tokenizer = load_tokenizer(tokenizer)
        self.vocab_size = len(vocab_strings(self.tokenizer))
        cfg = Path(self.tokenizer_path) / "config.json"
        if cfg.is_file():  # a full model folder: its embedding rows (may exceed the tokenizer's size)
            import json

            c = json.loads(cfg.read_text())
            self.vocab_size = max(self.vocab_size, int(c.get("vocab_size") or c.get("text_config", {}).get(
                "vocab_size") or 0))
        self.score_vocab = score_vocab  # on-policy: ids at or beyond the student's rows become empty slots
        self.client = make_client("api", base_url=base_url, model=model or None, api_key_env=api_key_env,
                                  concurrency=concurrency, max_retries=max_retries, timeout=timeout)
        self.client.check(need_model=True)  # nothing listening / unknown model name: InputError now
        self.model = self.client.describe()["model"]
        self.base_urls = [public_url(u) for u in base_urls(base_url)]
        self.name = self.path = f"api:{self.model}"
        self.failures: dict[int, str] = {}  # rows of the last score call that failed for good
        self.stalled = False  # every row of the last score call failed after its retries (servers down)
        self.cap: int | None = None  # the server's --max-logprobs, when it told us
        self.max_model_len: int | None = None  # the smallest --max-model-len of the servers (GET /v1/models)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def for_training(cls, cfg) -> "RemoteTeacher":
        """`train --kd-teacher api ...` (a TrainConfig): online or on-policy KD scored by the server. A row the
        server cannot score raises (a training step cannot go on without its teacher)."""
        t = cls(cfg.kd_teacher_base_url, cfg.kd_teacher_model, cfg.kd_teacher_tokenizer or cfg.model)
        try:
            t.verify(cfg.kd_top_k)
            if t.too_long(cfg.max_seq_length):
                raise InputError(f"--max-seq-length {cfg.max_seq_length}: a training row of that length (+ 1) does "
                                 f"not fit the server's --max-model-len {t.max_model_len}; lower --max-seq-length to "
                                 f"<= {t.max_model_len - 1}, or restart vLLM with --max-model-len "
                                 f">= {cfg.max_seq_length + 1}")
        except BaseException:
            t.close()
            raise
        t.raise_on_failure = True
        return t

    @classmethod
    def from_config(cls, cfg) -> "RemoteTeacher":
        """`logits --teacher api ...` (a LogitsConfig): connect, then probe every server with M = --top-m."""
        t = cls(cfg.base_url, cfg.model, cfg.teacher_tokenizer, cfg.api_key_env, cfg.concurrency, cfg.max_retries,
                cfg.timeout)
        try:
            t.verify(cfg.top_m)
        except BaseException:
            t.close()
            raise
        return t

    # -------------------------------------------------------------- identity
    @property
    def capacity(self) -> int:
        """Requests in flight at most (servers x --concurrency): the examples one `score` call should carry."""
        return int(getattr(self.client, "capacity", None) or self.client.concurrency)

    def fingerprint(self) -> dict:
        """The manifest's teacher: what scored the store (``weights`` is what --resume compares)."""
        return {"api": self.model, "base_url": self.base_urls, "tokenizer": self.tokenizer_path,
                "weights": {"api": self.model}}

    def server_stats(self) -> dict:
        return self.client.server_stats()

    # -------------------------------------------------------------- the event loop (one per teacher)
    def _run(self, coro):
        """Run `coro` on this teacher's event loop (a background thread: the client and its pool belong to one
        loop, and `score` is called from synchronous code)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="remote-teacher", daemon=True)
            self._thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop is None:
            return
        try:
            self._run(self.client.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            self._loop = self._thread = None

    # -------------------------------------------------------------- start-up checks
    def verify(self, m: int) -> None:
        """One probe per server (text prompt, ``prompt_logprobs: m``, ``return_token_ids``): prompt log-probs
        supported, --top-m within the server's cap, and the server's token ids == --teacher-tokenizer's;
        and each server's --max-model-len (its model list), the smallest kept."""
        members = [x.client for x in getattr(self.client, "members", []) if x.up] or [self.client]
        want = [int(t) for t in self.tokenizer.encode(PROBE_TEXT)]
        for c in members:
            self._verify_one(c, m, want)
            n = self._run(self._served_max_len(c))
            if n is not None:
                self.max_model_len = n if self.max_model_len is None else min(self.max_model_len, n)

    async def _served_max_len(self, client) -> int | None:
        """vLLM lists ``max_model_len`` with each model in ``GET /v1/models``; None when it is not there."""
        try:
            page = await client._client.models.list()
        except Exception:  # noqa: BLE001 - a server without a model list: the server's own 400 will say it
            return None
        for entry in page.data:
            if entry.id == self.model:
                n = getattr(entry, "max_model_len", None) or (getattr(entry, "model_extra", None) or {}).get(
                    "max_model_len")
                return int(n) if isinstance(n, (int, float)) and n > 0 else None
        return None

    def _verify_one(self, client, m: int, want: list[int]) -> None:
        from mlx_distill.generation.clients import ClientError

        where = f"the server at {client.label}"
        try:
            c = self._run(client.complete(PROBE_TEXT, max_tokens=1, temperature=0.0, prompt_logprobs=m,
                                          return_token_ids=True))
        except ClientError as e:
            cap = _CAP.search(str(e))
            if cap:
                self.cap = int(cap.group(1))
                raise InputError(f"--top-m {m}: {where} returns at most {self.cap} log-probabilities per position "
                                 f"(vLLM's --max-logprobs, default 20); lower --top-m to <= {self.cap}, or restart "
                                 f"the server with --max-logprobs {m}") from None
            raise InputError(f"{where} refused a prompt_logprobs request ({e}); a remote teacher needs vLLM's "
                             "/v1/completions with prompt_logprobs (mlx_lm server and llama.cpp cannot score "
                             "a prompt)") from None
        if c.prompt_logprobs is None:
            raise InputError(f"{where} answered /v1/completions without prompt_logprobs: it cannot score a prompt "
                             "(mlx_lm server and llama.cpp return generated-token log-probs only); serve the "
                             "teacher with vLLM")
        if c.prompt_token_ids is None:
            raise InputError(f"{where} did not return prompt_token_ids (vLLM >= 0.10.2 does with "
                             "return_token_ids), so --teacher-tokenizer cannot be checked against it; upgrade vLLM")
        got = [int(t) for t in c.prompt_token_ids]
        if got != want:
            i = next((j for j in range(min(len(got), len(want))) if got[j] != want[j]), min(len(got), len(want)))
            mine = f"{want[i]} {self.tokenizer.decode([want[i]])!r}" if i < len(want) else "end"
            theirs = f"{got[i]}" if i < len(got) else "end"
            raise InputError(f"--teacher-tokenizer {self.tokenizer_path}: tokenises differently from the model "
                             f"{self.model!r} at {client.label} (a probe text: {len(want)} vs {len(got)} tokens, "
                             f"first difference at token {i}: here {mine}, server {theirs}); give the tokenizer "
                             "of the served model (its folder or Hub id)")
        try:
            parse_prompt_logprobs(c.prompt_logprobs, got, m)
        except ValueError as e:
            raise InputError(f"{where}: its prompt_logprobs are not what vLLM returns ({e})") from None

    # -------------------------------------------------------------- scoring
    async def _gather(self, rows: list[list[int]], k: int):
        return await asyncio.gather(*(self.client.complete(r, max_tokens=1, temperature=0.0, prompt_logprobs=k)
                                      for r in rows), return_exceptions=True)

    def score_rows(self, rows: list[list[int]], k: int) -> list:
        """Every row (a prompt of n token ids) scored concurrently -> per row (ids (n-1, k), logprobs (n-1, k),
        token logprobs (n-1,)), or the exception that ended its request (retries spent, a bad answer)."""
        out = []
        for r, res in zip(rows, self._run(self._gather(rows, k))):
            if isinstance(res, BaseException):
                if isinstance(res, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                    raise res
                out.append(res)
                continue
            try:
                out.append(parse_prompt_logprobs(res.prompt_logprobs, r, k))
            except ValueError as e:
                out.append(e)
        return out

    @staticmethod
    def _why(e: BaseException) -> str:
        return f"{getattr(e, 'kind', type(e).__name__)}: {str(e)[:200]}"

    def too_long(self, n: int) -> str | None:
        """Why a prompt of `n` token ids cannot be sent (None: it fits): vLLM needs prompt + max_tokens (1)
        <= its --max-model-len, which the probe read from ``GET /v1/models``."""
        if self.max_model_len is None or n + 1 <= self.max_model_len:
            return None
        return (f"too_long: {n} tokens + 1 > the server's --max-model-len {self.max_model_len} (not sent); restart "
                f"vLLM with --max-model-len >= {n + 1}, or lower --max-seq-length")

    def score(self, tokens: np.ndarray, top_k: int, start: int = 0,
              lengths: np.ndarray | None = None) -> TeacherScores:
        """`Teacher.score` over the server: teacher-forced scores of `tokens` (B, L) at positions start .. L-2.
        Only each row's first `lengths[r]` ids are sent (padding never is; all L without `lengths`): the
        prompt entry of token t + 1 is the prediction at t, and vLLM reports every prompt token's own
        log-probability beside the top-k, so the actual tokens' log-probabilities cost nothing. A row
        longer than the server's --max-model-len is not sent. Positions past a row's length, and rows
        whose request failed for good, are empty slots with NaN token log-probabilities; the failed rows
        are listed in `self.failures` {row: why} (`raise_on_failure`: a `ClientError` instead), and
        `self.stalled` says every row failed after its retries (connections, timeouts, 5xx: the servers
        are unwell, not the prompts)."""
        from mlx_distill.generation.clients import ClientError

        B, L = tokens.shape
        lengths = np.full(B, L) if lengths is None else np.asarray(lengths)
        rows = [np.asarray(tokens[r, : int(lengths[r])]).tolist() for r in range(B)]
        ids = np.zeros((B, L - 1 - start, top_k), np.int32)
        lps = np.full((B, L - 1 - start, top_k), -np.inf, np.float32)
        act = np.full((B, L - 1 - start), np.nan, np.float32)
        refused = {r: self.too_long(len(x)) for r, x in enumerate(rows) if self.too_long(len(x))}
        sent = [r for r in range(B) if r not in refused]
        results = dict(zip(sent, self.score_rows([rows[r] for r in sent], top_k)))
        self.failures = dict(refused)
        self.stalled = bool(results) and all(getattr(x, "retryable", False) for x in results.values())
        for r, res in results.items():
            if isinstance(res, BaseException):
                self.failures[r] = self._why(res)
                continue
            n = len(rows[r]) - 1 - start  # scored positions start .. length - 2
            ids[r, :n], lps[r, :n], act[r, :n] = res[0][start:], res[1][start:], res[2][start:]
        if self.failures and self.raise_on_failure:
            r, why = next(iter(self.failures.items()))
            raise ClientError(f"the remote teacher {self.name} could not score {len(self.failures)} of {B} rows; "
                              f"first: {why}", kind="teacher")
        return finish_scores(ids, lps, act, self.score_vocab)
