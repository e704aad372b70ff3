"""Tokenise, render through the chat template, mask the prompt, batch by length.

Accepted records (one JSON object per line):
- mlx-lm chat format: ``{"messages": [{"role": ..., "content": ...}, ...]}``; the last
  message is the completion (it must be the assistant's);
- prompt/completion: ``{"prompt": ..., "completion": ...}``;
- corpus records: ``{"id", "question", "reasoning", "answer"}`` (optional ``thinking``
  for ``<think>`` teachers and ``answer_format``: ``"####"`` (default) or ``"boxed"``).
  The assistant turn is ``[<think>thinking</think>] reasoning + final-answer marker``;
  an empty ``reasoning`` trains answer-only.

Every example's rendered completion is checked to hold the record's reasoning and the text
after it (`check_completion`): a chat template that drops the ``<think>`` part (DeepSeek-R1-
Distill) stops the run with the fix, ``--think-in-content`` (`tokenize_messages`).

Loss positions: the model at position t predicts token t+1, so target index t is in the
loss iff ``prompt_len - 1 <= t < length - 1`` (see `loss_mask`). Examples longer than
``max_seq_length`` are never cut (a cut could remove the final answer): they are skipped
and counted, or rejected, as the config says.
"""

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_distill.tasks.answers import FORMAT_INSTRUCTIONS
from mlx_distill.io import InputError, iter_jsonl
from mlx_distill.paths import prompt_path

MARKERS = {"####": "\n#### {answer}", "boxed": "\n\nThe final answer is $\\boxed{{{answer}}}$."}


@dataclass
class Example:
    id: str
    tokens: np.ndarray  # int32: prompt + completion
    prompt_len: int  # tokens [0, prompt_len) carry no loss


@dataclass
class Batch:
    tokens: np.ndarray  # (B, L) int32, right-padded
    lengths: np.ndarray  # (B,) true lengths
    prompt_lens: np.ndarray  # (B,)
    ids: list = field(default_factory=list)

    @property
    def ntokens(self) -> int:
        """Completion tokens that carry loss."""
        return int(np.sum(self.lengths - self.prompt_lens))


@dataclass
class LoadReport:
    path: str
    records: int = 0
    kept: int = 0
    skipped_long: int = 0
    longest: int = 0


# ----------------------------------------------------------------------------- records -> messages
def render_assistant(rec: dict) -> str:
    fmt = rec.get("answer_format") or "####"
    if fmt not in MARKERS:
        raise ValueError(f"answer_format must be one of {sorted(MARKERS)}, got {fmt!r}")
    reasoning = (rec.get("reasoning") or "").strip()
    answer = str(rec["answer"]).strip()
    has_marker = ("####" in reasoning) if fmt == "####" else ("\\boxed" in reasoning)
    body = reasoning if has_marker else (reasoning + MARKERS[fmt].format(answer=answer)).strip()
    if rec.get("thinking"):
        body = f"<think>\n{rec['thinking'].strip()}\n</think>\n\n{body}"
    return body


def record_to_messages(rec: dict, template: str, system_prompt: str = "") -> list[dict]:
    """Any accepted record -> chat messages whose last entry is the completion."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        if msgs[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's (it is the completion)")
        return msgs
    if "prompt" in rec and "completion" in rec:
        head = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return head + [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]
    missing = [k for k in ("question", "answer") if k not in rec]
    if missing:
        raise ValueError(f"missing field(s) {missing}: expected {{id, question, reasoning, answer}}, "
                         "{messages: [...]} or {prompt, completion}")
    fmt = rec.get("answer_format") or "####"
    user = template.format(question=str(rec["question"]).strip(), format_instruction=FORMAT_INSTRUCTIONS.get(fmt, ""))
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": render_assistant(rec)}]


def record_id(rec: dict, path: Path, line: int) -> str:
    if "id" in rec:
        return str(rec["id"])
    return f"{path.stem}:{line}"


def _apply(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    toks = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                         return_dict=False)
    return list(toks)


_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_SENTINEL = "MLXDISTILLENDOFTURNPROBE"


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def end_of_turn(tokenizer, messages: list[dict]) -> str:
    """The text the chat template writes after an assistant turn's content (ChatML:
    ``<|im_end|>\\n``; DeepSeek-R1: ``<｜end▁of▁sentence｜>``), found by rendering a probe."""
    text = tokenizer.apply_chat_template(messages[:-1] + [{"role": "assistant", "content": _SENTINEL}],
                                         tokenize=False)
    if _SENTINEL not in text:
        raise ValueError("the chat template drops the assistant's content entirely; --think-in-content cannot "
                         "find its end-of-turn text: give the model a plain chat template")
    return text[text.rindex(_SENTINEL) + len(_SENTINEL):]


def tokenize_messages(tokenizer, messages: list[dict], think_in_content: bool = False) -> tuple[list[int], int]:
    """Token ids of the whole conversation and the length of the masked prompt.

    By default the chat template renders the whole conversation. With ``think_in_content``
    only the prompt goes through it (its generation prompt, as at inference): the completion
    follows verbatim, ``<think>…</think>`` included, closed by the template's own end-of-turn
    text (`end_of_turn`). This is for templates that rewrite assistant turns (DeepSeek-R1-Distill
    keeps only the text after ``</think>``); a ``<think>`` the generation prompt already opens
    is not repeated."""
    if think_in_content:
        prompt = _apply(tokenizer, messages[:-1], add_generation_prompt=True)
        head = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        content = messages[-1]["content"]
        if head.rstrip().endswith(_THINK_OPEN) and content.lstrip().startswith(_THINK_OPEN):
            content = content.lstrip()[len(_THINK_OPEN):].lstrip("\n")
        return prompt + _encode(tokenizer, content + end_of_turn(tokenizer, messages)), len(prompt)
    full = _apply(tokenizer, messages)
    prompt = _apply(tokenizer, messages[:-1], add_generation_prompt=True)
    if full[: len(prompt)] != prompt:
        # Some templates render history differently from a generation prompt; mask the
        # longest common prefix so no completion token is ever hidden from the loss.
        n = 0
        while n < min(len(full), len(prompt)) and full[n] == prompt[n]:
            n += 1
        return full, n
    return full, len(prompt)


def _squash(text: str) -> str:
    return "".join(text.split())


def check_completion(tokenizer, messages: list[dict], tokens: list[int], prompt_len: int) -> None:
    """The rendered completion must hold the record's whole assistant text: its reasoning
    inside ``<think>…</think>`` and the rest. Compared after decoding, whitespace ignored, each
    part round-tripped through the tokenizer (so unknown characters do not count as lost).
    Raises ValueError naming the template and the fix when the chat template dropped a part."""
    content = messages[-1]["content"]
    head, sep, tail = content.rpartition(_THINK_CLOSE)
    parts = [("reasoning inside <think>…</think>", head.replace(_THINK_OPEN, "")), ("text after </think>", tail)] \
        if sep else [("completion", content)]
    done = _squash(tokenizer.decode(list(tokens[prompt_len:])))
    for what, text in parts:
        want = _squash(tokenizer.decode(_encode(tokenizer, text))) if text.strip() else ""
        if want and want not in done:
            name = getattr(tokenizer, "name_or_path", "") or "the model"  # mlx-lm's wrapper passes it through
            raise ValueError(
                f"the chat template of {name} (tokenizer_config.json `chat_template`) drops the {what} from the "
                f"assistant turn ({_squash(text)[:40]!r}... is not in the rendered completion), so the student would "
                "never be trained on it; DeepSeek-R1-Distill templates, for one, keep only the text after </think>. "
                "Pass --think-in-content (the completion follows the template's generation prompt verbatim), or give "
                "the model a plain chat template (one that keeps assistant content as it is)")


# ----------------------------------------------------------------------------- files -> examples
def split_files(data: str | Path, split: str, val_fraction: float, seed: int) -> tuple[Path, callable]:
    """Which file holds `split`, and a filter on record ids. A corpus folder with its own
    train.jsonl/valid.jsonl is used as split; a folder with only train.jsonl, or a single
    JSONL file, is split by a stable hash of each id (see `_in_valid`). `seed` is the split
    seed (`TrainConfig.split_seed`), never the training seed: a multi-seed study keeps one
    validation split."""
    p = Path(data)
    if p.is_dir():
        f = p / f"{split}.jsonl"
        if f.is_file() and (split != "train" or (p / "valid.jsonl").is_file()):
            return f, lambda _id: True
        if split in ("train", "valid") and (p / "train.jsonl").is_file():
            p = p / "train.jsonl"
        else:
            raise InputError(f"{p}: no {split}.jsonl in this corpus folder")
    if not p.is_file():
        raise InputError(f"{p}: data not found (give a corpus folder with train.jsonl/valid.jsonl or a JSONL file)")
    if split == "train":
        return p, lambda _id: not _in_valid(_id, val_fraction, seed)
    if split == "valid":
        return p, lambda _id: _in_valid(_id, val_fraction, seed)
    raise InputError(f"{p}: a single JSONL file has no {split!r} split")


def _in_valid(example_id: str, val_fraction: float, seed: int) -> bool:
    """Stable, order-independent hold-out by hashing the id with the split seed (0 gives the
    splits of earlier versions, which hashed with the training seed, default 0)."""
    h = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < val_fraction


def has_split(data: str | Path, split: str) -> bool:
    try:
        split_files(data, split, 0.1, 0)
        return True
    except InputError:
        return False


def load_examples(cfg, tokenizer, split: str = "train", report: LoadReport | None = None) -> list[Example]:
    """Read, render and tokenise one split. `cfg` needs: data, max_seq_length, long_examples,
    val_fraction, split_seed, system_prompt, prompt_template, mask_prompt (think_in_content optional)."""
    path, keep = split_files(cfg.data, split, cfg.val_fraction, cfg.split_seed)
    template = prompt_path(cfg.prompt_template).read_text() if cfg.prompt_template else "{question}"
    rep = report or LoadReport(path="")
    rep.path = str(path)
    out, seen = [], set()
    for line, rec in iter_jsonl(path):
        rep.records += 1
        rid = record_id(rec, path, line)
        if not keep(rid):
            continue
        if rid in seen:
            raise InputError(f"{path}:{line}: duplicate id {rid!r}")
        seen.add(rid)
        try:
            messages = record_to_messages(rec, template, cfg.system_prompt)
            think_in_content = getattr(cfg, "think_in_content", False)
            tokens, plen = tokenize_messages(tokenizer, messages, think_in_content)
            check_completion(tokenizer, messages, tokens, plen)
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}:{line}: {e}") from None
        if not cfg.mask_prompt:
            plen = 0
        rep.longest = max(rep.longest, len(tokens))
        if len(tokens) > cfg.max_seq_length:
            if cfg.long_examples == "error":
                raise InputError(f"{path}:{line}: example {rid!r} has {len(tokens)} tokens > --max-seq-length "
                                 f"{cfg.max_seq_length}; raise the limit or use --long-examples skip")
            rep.skipped_long += 1
            continue
        if len(tokens) - plen < 1:
            raise InputError(f"{path}:{line}: example {rid!r} has an empty completion")
        out.append(Example(rid, np.asarray(tokens, dtype=np.int32), plen))
    if rep.records == 0:
        raise InputError(f"{path}: no records (empty file)")
    rep.kept = len(out)
    if not out:
        raise InputError(f"{path}: no usable {split} examples ({rep.skipped_long} longer than "
                         f"--max-seq-length {cfg.max_seq_length}, longest {rep.longest})")
    return out


# ----------------------------------------------------------------------------- batching
def bucket(examples: list[Example], batch_size: int) -> list[list[int]]:
    """Group example indices of similar length (sorted by length, then id) into batches."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].tokens), examples[i].id))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def epoch_order(n_batches: int, seed: int, epoch: int) -> list[int]:
    """Batch order of one epoch: a pure function of (seed, epoch), so a resumed run sees
    exactly the batches it would have seen."""
    order = list(range(n_batches))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def collate(examples: list[Example], idx: list[int], pad_id: int, pad_multiple: int = 16) -> Batch:
    lengths = np.array([len(examples[i].tokens) for i in idx], dtype=np.int32)
    width = int(-(-lengths.max() // pad_multiple) * pad_multiple)
    toks = np.full((len(idx), width), pad_id, dtype=np.int32)
    for r, i in enumerate(idx):
        toks[r, : lengths[r]] = examples[i].tokens
    return Batch(toks, lengths, np.array([examples[i].prompt_len for i in idx], dtype=np.int32),
                 [examples[i].id for i in idx])


def loss_mask(batch: Batch) -> np.ndarray:
    """(B, L-1) float32: 1 where target index t (predicting token t+1) carries loss."""
    t = np.arange(batch.tokens.shape[1] - 1)[None, :]
    return ((t >= batch.prompt_lens[:, None] - 1) & (t < batch.lengths[:, None] - 1)).astype(np.float32)


def batch_arrays(batch: Batch) -> dict:
    """NumPy inputs/targets/mask for one batch (the backends convert them)."""
    return {"inputs": batch.tokens[:, :-1], "targets": batch.tokens[:, 1:], "mask": loss_mask(batch)}


PER_POSITION = ("targets", "mask", "kd_ids", "kd_logits", "kd_counts", "kd_span_logp", "kd_span_len", "kd_span_in",
                "kd_uld")


def trim_prompt(arrays: dict, batch: Batch, multiple: int = 16) -> dict:
    """Drop the leading target positions that no row of the batch trains on (the shortest
    prompt, rounded down to `multiple` so few distinct shapes reach the compiled step).
    `inputs` stays whole (attention needs the prompt); the objective asks the model for
    logits at the last ``targets.shape[1]`` positions only."""
    start = max(0, int(batch.prompt_lens.min()) - 1) // multiple * multiple
    if start == 0:
        return arrays
    return {k: (v[:, start:] if k in PER_POSITION else v) for k, v in arrays.items()}


class BatchStream:
    """Training batches in a deterministic order; position k (micro-batches consumed) is
    all a checkpoint needs to resume the exact same sequence."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int, pad_multiple: int = 16):
        self.examples, self.seed, self.pad_id, self.pad_multiple = examples, seed, pad_id, pad_multiple
        self.batches = bucket(examples, batch_size)

    def __len__(self):
        return len(self.batches)

    def at(self, k: int) -> Batch:
        epoch, j = divmod(k, len(self.batches))
        idx = self.batches[epoch_order(len(self.batches), self.seed, epoch)[j]]
        return collate(self.examples, idx, self.pad_id, self.pad_multiple)

    def epoch_of(self, k: int) -> float:
        return k / len(self.batches)


def spread_subset(examples: list[Example], n: int) -> list[int]:
    """Indices of `n` examples spread over the whole length range (all when n <= 0 or n >= len).

    The length-sorted list is cut into `n` strata of (nearly) equal size and each gives the
    example with the smallest sha256 of its id: a fixed subset that depends only on the ids
    and lengths (not on --seed, not on the file order), so every validation of a run, and runs
    with different training seeds, see the same examples; never just the shortest ones."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].tokens), examples[i].id))
    if n <= 0 or n >= len(order):
        return order
    key = lambda i: hashlib.sha256(examples[i].id.encode()).digest()  # noqa: E731
    return [min(order[s * len(order) // n: (s + 1) * len(order) // n], key=key) for s in range(n)]


def eval_batches(examples: list[Example], batch_size: int, pad_id: int, limit: int = -1):
    """Validation batches: `limit` batches of a `spread_subset` of ``limit * batch_size``
    examples (bucketed by length), or every example when limit <= 0."""
    sub = [examples[i] for i in spread_subset(examples, limit * batch_size if limit > 0 else 0)]
    for idx in bucket(sub, batch_size):
        yield collate(sub, idx, pad_id)


def pad_id_of(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0
