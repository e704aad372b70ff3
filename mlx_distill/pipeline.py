"""`python -m mlx_distill pipeline RECIPE.yaml`: run a recipe's stages in order, skipping finished ones.

    python -m mlx_distill pipeline recipes/demo.yaml --out runs/demo
    python -m mlx_distill pipeline recipes/demo.yaml --out runs/demo --dry-run
    python -m mlx_distill pipeline recipes/000-qwen-gsm8k-kd.yaml --from kd --set kd.kd_alpha=0.5

A recipe is a YAML file (the commands: synth = `corpus synth`, corpus = `corpus build`, train,
logits, eval, study = `study length`, variant = `pipeline variant`, below)::

    root: runs/demo                    # output root (--out overrides); stage outputs default to <root>/<name>
    stages:
      - name: problems                 # unique; other stages refer to its outputs as ${stages.problems.out}
        command: synth                 # synth | corpus | train | logits | eval | study
        args: {n_train: 200}           # the command's own options (its config dataclass; sections allowed)
      - name: sft
        command: train
        args: {data: "${stages.problems.out}", iters: 30}

`${root}` and `${stages.NAME.KEY}` (any option of an earlier stage, defaults included) are
replaced by their values; a reference that is the whole value keeps the referenced value's
type. A reference to a stage's `out` is a dependency (see below); a reference to any other
option only copies its value. Relative paths are relative to the directory the pipeline is started from, as for every
command.

Each stage runs as ``python -m mlx_distill <command> <flags>`` in a subprocess (the command is
printed, and its output goes to the terminal and to ``<root>/logs/<name>.log``). A subprocess
rather than an in-process call: every stage loads its own model, so MLX memory and compiled
state are released between stages; a stage killed by the OS (a Metal out-of-memory error ends
the process) is recorded as failed instead of taking the pipeline down; and what runs is
exactly the command shown, which the user can copy and re-run alone.

A stage is skipped when its output folder holds a manifest.json whose `config` equals the
stage's resolved config (every option, defaults included, except the ones that do not change
the result: see IGNORED), whose status is not running/interrupted, and -- when
``<root>/pipeline.json`` knows the stage -- when the stages it refers to have not been rebuilt
since it ran. A stage re-runs when its config changed, when it never finished, or when a stage
it refers to (directly or through others) re-runs: downstream invalidation follows the
``${stages...}`` references, so in a recipe with three independent train stages a change to
one does not retrain the other two. A stage also re-runs when what it reads changed while its
flags did not (``mlx_distill.fingerprint``): an input file edited in place (its sha256 against
the one pipeline.json recorded, or the ``{path, sha256}`` its own manifest holds), or any part
of a URL (a hash of the whole URL is compared; only the scrubbed URL is ever stored).

An output folder that exists but does not match is moved aside to ``<out>.old-<UTC time>``
(nothing is deleted; remove old folders yourself), because `train`, `logits` and `eval` refuse
a folder that holds other results. Two exceptions use the command's own continue semantics:
a `corpus` folder built with the same request-deciding settings (corpus.build.IDENTITY) is
re-run in place, so every finished (possibly paid) teacher request is reused and only the
filters, splits and levels are redone; and a `synth` folder is rewritten in place.

`pipeline variant` (a stage command of its own, ``python -m mlx_distill pipeline variant --data
CORPUS --mode answer-only|cot|mixed --out DIR``) writes a training variant of a corpus: every
train/valid record without its reasoning, unchanged, or a seeded share of them answer-only
(seed 001's comparison); the test split is copied as it is.

``<root>/pipeline.json`` records each stage's command, resolved-config hash, status and
timing; ``<root>/report.md`` links every stage's outputs and ends with the accuracy table of
every eval stage (dataset, n, accuracy with its 95% interval, mean words).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlx_distill import config as C
from mlx_distill.corpus.variant import variant_main
from mlx_distill.interrupts import Interrupted, Interrupts
from mlx_distill.fingerprint import fingerprint, fingerprint_diff, manifest_inputs_changed
from mlx_distill.io import InputError, atomic_write_json, atomic_write_text, read_json, scrub

# command -> (argv prefix, config dataclass)
COMMANDS: dict[str, tuple[tuple[str, ...], type]] = {
    "synth": (("corpus", "synth"), C.SynthConfig),
    "corpus": (("corpus", "build"), C.CorpusConfig),
    "train": (("train",), C.TrainConfig),
    "logits": (("logits",), C.LogitsConfig),
    "eval": (("eval",), C.EvalConfig),
    "study": (("study", "length"), C.StudyConfig),
    "variant": (("pipeline", "variant"), C.VariantConfig),
}
ALIASES = {"corpus synth": "synth", "corpus build": "corpus", "study length": "study"}
# options that decide how a command runs, not what it writes
IGNORED = {"resume", "overwrite", "progress", "show"}
INCOMPLETE = {"running", "interrupted", "failed"}
REF = re.compile(r"\$\{([^}]*)\}")
RECIPE_KEYS = {"root", "stages", "description"}
STAGE_KEYS = {"name", "command", "args", "note"}


@dataclass
class Stage:
    name: str
    command: str
    args: dict  # as written in the recipe (sections allowed), then with --set applied
    note: str = ""
    # filled by resolve()
    values: dict = field(default_factory=dict)  # flattened args with references replaced
    cfg: Any = None  # the command's config dataclass
    deps: set = field(default_factory=set)  # names of the stages this one refers to

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


@dataclass
class Recipe:
    path: Path
    root: str
    stages: list[Stage]
    description: str = ""

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise InputError(f"{self.path}: no stage named {name!r}; stages: {[s.name for s in self.stages]}")


# ============================================================================= loading
def load(path: str | Path, root: str | None = None, sets: list[str] = ()) -> Recipe:
    """Read, override (--set) and resolve a recipe; every error names the file and stage."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: recipe file not found (recipes/ lists the shipped ones)")
    raw = C.load_yaml(p)
    unknown = sorted(set(raw) - RECIPE_KEYS)
    if unknown:
        raise InputError(f"{p}: unknown top-level key(s) {unknown}; a recipe has {sorted(RECIPE_KEYS)}")
    if not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise InputError(f"{p}: `stages:` must be a non-empty list of {{name, command, args}}")
    stages, seen = [], set()
    for i, s in enumerate(raw["stages"]):
        where = f"{p}: stage {i + 1}"
        if not isinstance(s, dict):
            raise InputError(f"{where}: expected a mapping with name, command, args")
        bad = sorted(set(s) - STAGE_KEYS)
        if bad:
            raise InputError(f"{where} ({s.get('name', '?')}): unknown key(s) {bad}; a stage has {sorted(STAGE_KEYS)} "
                             "(the command's options go under `args:`)")
        name = str(s.get("name") or "")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise InputError(f"{where}: `name:` must be letters, digits, - or _ (got {name!r})")
        if name in seen:
            raise InputError(f"{where}: stage name {name!r} is used twice")
        seen.add(name)
        cmd = ALIASES.get(str(s.get("command", "")), str(s.get("command", "")))
        if cmd not in COMMANDS:
            raise InputError(f"{where} ({name}): command {s.get('command')!r} is not one of {sorted(COMMANDS)}")
        args = s.get("args") or {}
        if not isinstance(args, dict):
            raise InputError(f"{where} ({name}): `args:` must be a mapping of the command's options")
        stages.append(Stage(name, cmd, dict(args), str(s.get("note") or "")))
    if root is None:
        root = raw.get("root")
    if not root:
        raise InputError(f"{p}: no `root:` output folder; add one or pass --out")
    recipe = Recipe(p, str(root), stages, str(raw.get("description") or ""))
    for item in sets:
        apply_set(recipe, item)
    resolve(recipe)
    return recipe


def apply_set(recipe: Recipe, item: str) -> None:
    """``stage.key=value`` (value parsed as YAML; dots in key are sections: kd.alpha = kd_alpha)."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise InputError(f"--set {item!r}: expected STAGE.KEY=VALUE, e.g. --set sft.iters=50")
    lhs, value = item.split("=", 1)
    name, key = lhs.split(".", 1)
    stage = recipe.stage(name)
    try:
        stage.args[key.replace(".", "_").replace("-", "_")] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise InputError(f"--set {item!r}: value is not valid YAML ({e})") from None


def resolve(recipe: Recipe) -> None:
    """Replace references, default each `out` to <root>/<name>, build each stage's config."""
    done: dict[str, Stage] = {}
    for st in recipe.stages:
        cls = COMMANDS[st.command][1]
        names = {f.name for f in dataclasses.fields(cls)}
        flat = C._flatten(st.args, names)
        vals = {k: _substitute(v, recipe, st, k, done) for k, v in flat.items()}
        if "out" not in vals:
            vals["out"] = f"{recipe.root.rstrip('/')}/{st.name}"
        st.values = vals
        st.cfg = C.build(cls, vals, source=f"{recipe.path}: stage {st.name!r} ({st.command})")
        done[st.name] = st
    for st in recipe.stages:  # transitive closure: a stage depends on its references' references
        todo = list(st.deps)
        while todo:
            d = todo.pop()
            for dd in done[d].deps - st.deps:
                st.deps.add(dd)
                todo.append(dd)


def _substitute(v, recipe: Recipe, st: Stage, key: str, done: dict[str, Stage]):
    if isinstance(v, dict):
        return {k: _substitute(x, recipe, st, key, done) for k, x in v.items()}
    if isinstance(v, list):
        return [_substitute(x, recipe, st, key, done) for x in v]
    if not isinstance(v, str) or "${" not in v:
        return v

    def lookup(ref: str):
        ref = ref.strip()
        if ref == "root":
            return recipe.root
        parts = ref.split(".")
        if len(parts) == 3 and parts[0] == "stages":
            other, k = parts[1], parts[2]
            if other in done:
                if not hasattr(done[other].cfg, k):
                    raise InputError(f"{recipe.path}: stage {st.name!r}, key {key!r}: ${{{ref}}}: stage {other!r} "
                                     f"({done[other].command}) has no option {k!r}")
                if k == "out":  # a data dependency; other options are copied values (their change shows
                    st.deps.add(other)  # in this stage's own config)
                return getattr(done[other].cfg, k)
            if any(s.name == other for s in recipe.stages):
                raise InputError(f"{recipe.path}: stage {st.name!r}, key {key!r}: ${{{ref}}} refers to a stage that "
                                 "comes later (or to itself); stages can only use earlier stages' outputs")
        raise InputError(f"{recipe.path}: stage {st.name!r}, key {key!r}: unknown reference ${{{ref}}} (known: "
                         f"${{root}}, ${{stages.NAME.KEY}} for an earlier stage: {sorted(done)})")

    whole = REF.fullmatch(v)
    if whole:
        return lookup(whole.group(1))
    return REF.sub(lambda m: str(lookup(m.group(1))), v)


# ============================================================================= commands
def _scalar(x) -> bool:
    return isinstance(x, (str, int, float, bool)) or x is None


def command_argv(st: Stage, config_file: Path) -> tuple[list[str], dict]:
    """The stage's command line (the options the recipe sets) and what must go through a -c file
    (mappings and lists of mappings cannot be flags)."""
    cls = COMMANDS[st.command][1]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    argv, via_file = list(COMMANDS[st.command][0]), {}
    for k in st.values:
        v = getattr(st.cfg, k)
        if isinstance(v, dict) or (isinstance(v, list) and not all(_scalar(x) for x in v)):
            via_file[k] = v
            continue
        flag = C.flag_name(fields[k])
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, list):
            argv += [flag, *map(str, v)]
        else:
            argv += [flag, str(v)]
    if via_file:
        argv += ["-c", str(config_file)]
    return argv, via_file


def shown(argv: list[str]) -> str:
    return "python -m mlx_distill " + shlex.join(argv)


# ============================================================================= up-to-date checks
def compared_config(st: Stage) -> dict:
    d = {k: v for k, v in C.to_dict(st.cfg).items() if k not in IGNORED}
    return json.loads(json.dumps(scrub(d)))


def config_hash(st: Stage) -> str:
    return hashlib.sha256(json.dumps(compared_config(st), sort_keys=True).encode()).hexdigest()


def manifest_diff(st: Stage) -> tuple[str, list[str]]:
    """('missing' | 'incomplete' | 'differs' | 'match', differing keys) for the stage's output folder."""
    mpath = st.out / "manifest.json"
    if not mpath.is_file():
        return "missing", []
    try:
        man = read_json(mpath)
    except InputError:
        return "differs", ["manifest.json unreadable"]
    if man.get("status") in INCOMPLETE:
        return "incomplete", []
    diff = _config_diff(st, man.get("config") or {})
    return ("differs" if diff else "match"), diff


def _config_diff(st: Stage, have: dict) -> list[str]:
    """Keys whose value in a manifest's `config` differs from the stage's resolved config."""
    defaults = compared_config(dataclasses.replace(st, cfg=COMMANDS[st.command][1]()))
    diff = []
    for k, v in compared_config(st).items():
        if k in have:
            if have[k] != v:
                diff.append(k)
        elif v != defaults.get(k):  # an option added after the stage ran: fine at its default
            diff.append(k)
    return diff


@dataclass
class Decision:
    run: bool
    reason: str


def decide(st: Stage, state: dict, rebuilt: set[str], force: bool, fp: dict | None = None) -> Decision:
    """Run or skip `st`. `fp`: its current `fingerprint`, compared with the one pipeline.json
    recorded when the stage last ran (input files edited in place, a URL changed)."""
    if force:
        return Decision(True, "forced (--force)")
    kind, diff = manifest_diff(st)
    if kind == "missing":
        return Decision(True, f"no output yet ({st.out}/manifest.json)")
    up = sorted(st.deps & rebuilt)
    if up:
        return Decision(True, f"after {', '.join(up)} (re-run upstream)")
    if kind == "incomplete":
        return Decision(True, f"{st.out} holds an unfinished run")
    if kind == "differs":
        return Decision(True, f"config changed: {', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}")
    edited = manifest_inputs_changed(st.out)
    rec = state.get("stages", {}).get(st.name)
    if rec and fp is not None and rec.get("fingerprint") is not None:
        edited = sorted(set(edited) | set(fingerprint_diff(rec["fingerprint"], fp)))
    if edited:
        return Decision(True, f"input changed since this stage ran: {', '.join(edited[:4])}"
                        f"{' ...' if len(edited) > 4 else ''}")
    if rec:
        # the manifest decides whether the config matches (config_hash is a record: it changes when a
        # command gains an option); the record says whether the pipeline saw the stage finish
        if rec.get("status") != "done":
            return Decision(True, f"the last pipeline run of this stage ended {rec.get('status')}")
        now = {d: state["stages"].get(d, {}).get("stamp") for d in sorted(st.deps)}
        if rec.get("inputs", now) != now:
            changed = [d for d in now if (rec.get("inputs") or {}).get(d) != now[d]]
            return Decision(True, f"{', '.join(changed)} rebuilt since this stage ran")
    return Decision(False, "output matches its config")


def move_aside(st: Stage) -> str | None:
    """Make room for a re-run (see the module docstring). Returns where the old folder went."""
    out = st.out
    if not out.exists():
        return None
    man = read_json(out / "manifest.json") if (out / "manifest.json").is_file() else {}
    if (st.command, man.get("stage")) in (("synth", "corpus-synth"), ("variant", "corpus-variant")):
        return None  # these rewrite their own generated folder whole
    if st.command == "corpus" and man.get("stage") == "corpus":
        from mlx_distill.corpus.build import IDENTITY

        now, old = compared_config(st), man.get("config") or {}
        if all(old.get(k) == now.get(k) for k in IDENTITY):
            return None  # same requests: the builder reuses them and redoes filters/splits
    if st.command == "eval" and man.get("status") == "running" and not _config_diff(st, man.get("config") or {}):
        return None  # an interrupted evaluation with the same settings continues where it stopped
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = out.with_name(f"{out.name}.old-{stamp}")
    n = 1
    while dest.exists():
        dest = out.with_name(f"{out.name}.old-{stamp}-{n}")
        n += 1
    os.replace(out, dest)
    return str(dest)


# ============================================================================= running
def _select(recipe: Recipe, start: str | None, until: str | None) -> list[str]:
    names = [s.name for s in recipe.stages]
    for flag, v in (("--from", start), ("--until", until)):
        if v is not None and v not in names:
            raise InputError(f"{flag} {v}: no such stage in {recipe.path}; stages: {names}")
    i = names.index(start) if start else 0
    j = names.index(until) + 1 if until else len(names)
    if i >= j:
        raise InputError(f"--from {start} comes after --until {until} in {recipe.path}")
    return names[i:j]


def load_state(root: Path) -> dict:
    p = root / "pipeline.json"
    if p.is_file():
        try:
            return read_json(p)
        except InputError:
            print(f"warning: {p} is unreadable; deciding from the stage manifests alone", file=sys.stderr)
    return {"stages": {}}


def run_stage(argv: list[str], log: Path, stop: Interrupts | None = None) -> int:
    """Run one command as a subprocess, its output both on our stdout and in `log`. The stage runs
    in a process group of its own, so a terminal's Ctrl-C reaches only the pipeline, which passes
    each SIGINT/SIGTERM on to the stage (`stop`): the first makes the stage save and stop, the
    second stops both at once."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        f.write(f"$ {shown(argv)}\n")
        proc = subprocess.Popen([sys.executable, "-m", "mlx_distill", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, bufsize=1, start_new_session=True)

        def pass_on(signum: int) -> None:
            if proc.poll() is None:
                proc.send_signal(signum)

        if stop is not None:
            stop.on_signal(pass_on)
            if stop.requested:  # it came while the stage was starting
                pass_on(stop.signum)
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                f.write(line)
            return proc.wait()
        except KeyboardInterrupt as e:  # a second signal (or Ctrl-C without the policy): the stage stops at once too
            pass_on(getattr(e, "signum", signal.SIGINT))
            proc.wait()
            raise


def run(recipe: Recipe, dry_run: bool = False, start: str | None = None, until: str | None = None,
        force: bool = False, stop: Interrupts | None = None) -> dict:
    """Run the selected stages in order. `stop` (the interrupt policy, entered by `main`): a
    SIGINT/SIGTERM goes to the running stage, which saves and stops; the pipeline then records it
    as interrupted and raises `Interrupted` (exit 130/143). A re-run continues from that stage."""
    stop = stop or Interrupts(quiet=True)  # not entered: never requested
    root = Path(recipe.root)
    selected = _select(recipe, start, until)
    state = load_state(root)
    state.update(recipe=str(recipe.path), recipe_sha256=hashlib.sha256(recipe.path.read_bytes()).hexdigest(),
                 root=str(root))
    stages_state = state.setdefault("stages", {})
    rebuilt: set[str] = set()
    outputs = {s.out for s in recipe.stages}  # compared by stage stamps, not by content
    fps: dict[str, dict] = {}
    t_all = time.perf_counter()
    lines = []
    for st in recipe.stages:
        cfile = root / ".pipeline" / f"{st.name}.yaml"
        argv, via_file = command_argv(st, cfile)
        if st.name not in selected:
            print(f"[--] {st.name} ({st.command}): not selected (--from/--until)\n     {shown(argv)}")
            continue
        for d in sorted(st.deps):
            dep = recipe.stage(d)
            if d not in selected and manifest_diff(dep)[0] in ("missing", "incomplete"):
                raise InputError(f"stage {st.name!r} needs stage {d!r}, which is outside --from/--until and has no "
                                 f"finished output in {dep.out}; run it first (e.g. without --from)")
        fp = fingerprint(st.cfg, outputs, IGNORED)
        dec = decide(st, state, rebuilt, force, fp)
        tag = "run " if dec.run else "skip"
        print(f"[{tag}] {st.name} ({st.command}): {dec.reason}\n     {shown(argv)}", flush=True)
        if via_file:
            print(f"     {cfile}: {json.dumps(via_file)}")
        fps[st.name] = fp
        if dry_run or not dec.run:
            if dec.run:
                rebuilt.add(st.name)  # so the dry run shows the downstream re-runs too
            lines.append((st, dec))
            continue
        stop.check()  # a signal between stages: the finished ones are recorded, nothing more starts
        moved = move_aside(st)
        if moved:
            print(f"     moved the old {st.out} aside to {moved}")
        if via_file:
            cfile.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cfile, yaml.safe_dump(via_file, sort_keys=False))
        log = root / "logs" / f"{st.name}.log"
        rec = {"command": shown(argv), "config_hash": config_hash(st), "out": str(st.out), "log": str(log),
               "status": "running", "reason": dec.reason, "moved_aside": moved,
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "inputs": {d: stages_state.get(d, {}).get("stamp") for d in sorted(st.deps)}, "fingerprint": fp}
        stages_state[st.name] = rec
        _save_state(root, state)
        t0 = time.perf_counter()
        try:
            rc = run_stage(argv, log, stop)
        except KeyboardInterrupt:
            rec.update(status="interrupted", seconds=round(time.perf_counter() - t0, 1))
            _save_state(root, state)
            raise
        if stop.requested and rc != 0:  # the stage saved its work and stopped (130/143)
            rec.update(status="interrupted", exit_code=rc, seconds=round(time.perf_counter() - t0, 1))
            _save_state(root, state)
            raise Interrupted(stop.signum, f"stage {st.name!r} interrupted; re-run the pipeline to continue it")
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        if rc != 0:
            rec.update(status="failed", exit_code=rc)
            _save_state(root, state)
            write_report(recipe, state)
            if rc == 3 and st.command in ("corpus", "study"):  # EXIT_INCOMPLETE / a PARTIAL study assembly
                why = ("problems whose teacher requests failed for good (the summary above says which kinds); "
                       "re-running the pipeline retries only those, every finished request is reused"
                       if st.command == "corpus" else
                       "cells that are not finished; re-running the pipeline runs only the missing cells")
                print(f"error: stage {st.name!r} ended incomplete (exit 3): {why}. Its output is in {log}; later "
                      "stages were not run.", file=sys.stderr)
            else:
                print(f"error: stage {st.name!r} failed (exit {rc}); its output is in {log}. Fix it and re-run the "
                      "pipeline: finished stages are skipped.", file=sys.stderr)
            raise SystemExit(rc if 0 < rc < 128 else 1)
        finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rec.update(status="done", finished=finished, stamp=f"{rec['config_hash'][:12]}@{finished}")
        rebuilt.add(st.name)
        print(f"[done] {st.name} in {rec['seconds']} s", flush=True)
        _save_state(root, state)
        lines.append((st, dec))
    if dry_run:
        print(f"dry run: nothing was run ({sum(d.run for _, d in lines)} of {len(lines)} selected stage(s) would run)")
        return state
    for st, dec in lines:  # skipped stages are done too (their output matches)
        rec = stages_state.setdefault(st.name, {})
        if not dec.run:
            rec.update(command=shown(command_argv(st, root / ".pipeline" / f"{st.name}.yaml")[0]),
                       config_hash=config_hash(st), out=str(st.out), status="done", last_decision="skipped")
            rec.setdefault("stamp", f"{rec['config_hash'][:12]}@existing")
            rec.setdefault("inputs", {d: stages_state.get(d, {}).get("stamp") for d in sorted(st.deps)})
            rec.setdefault("fingerprint", fps.get(st.name))  # a record from before fingerprints: today's inputs
        else:
            rec["last_decision"] = "ran"
    state["seconds"] = round(time.perf_counter() - t_all, 1)
    _save_state(root, state)
    report = write_report(recipe, state)
    ran = sum(d.run for _, d in lines)
    print(f"pipeline: {ran} stage(s) ran, {len(lines) - ran} skipped in {state['seconds']} s -> {report}")
    return state


def _save_state(root: Path, state: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "pipeline.json", state)


# ============================================================================= report
def _rel(p: str | Path, root: Path) -> str:
    return os.path.relpath(Path(p), root)


def _fmt_pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def write_report(recipe: Recipe, state: dict) -> Path:
    root = Path(recipe.root)
    st_state = state.get("stages", {})
    out = [f"# Pipeline report: {recipe.path.name}", ""]
    if recipe.description:
        out += [recipe.description.strip(), ""]
    out += [f"- recipe: `{recipe.path}` (sha256 {state.get('recipe_sha256', '')[:12]})",
            f"- root: `{root}`", f"- written: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
            "- state: [pipeline.json](pipeline.json)", "", "## Stages", "",
            "| # | stage | command | status | seconds | output |", "|---|---|---|---|---|---|"]
    for i, st in enumerate(recipe.stages, 1):
        rec = st_state.get(st.name, {})
        status = rec.get("status", "not run")
        if status == "done" and rec.get("last_decision") == "skipped":
            status = "done (skipped: output matched)"
        link = f"[{_rel(st.out, root)}]({_rel(st.out, root)})" if st.out.exists() else f"`{st.out}` (missing)"
        out.append(f"| {i} | {st.name} | {st.command} | {status} | {rec.get('seconds', '')} | {link} |")
    out += [""]
    for st in recipe.stages:
        rec = st_state.get(st.name, {})
        out += [f"### {st.name}", ""]
        if st.note:
            out += [st.note.strip(), ""]
        out += ["```", rec.get("command") or shown(command_argv(st, root / ".pipeline" / f"{st.name}.yaml")[0]),
                "```", ""]
        out += _stage_details(st, root, rec)
    rows = _accuracy_rows(recipe, root)
    out += ["## Accuracy", ""]
    if rows:
        out += ["| stage | dataset | model | adapter | n | accuracy | 95% CI | mean words |",
                "|---|---|---|---|---|---|---|---|", *rows]
    else:
        out += ["No eval stage has a summary.json yet."]
    path = root / "report.md"
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(out) + "\n")
    return path


def _stage_details(st: Stage, root: Path, rec: dict) -> list[str]:
    d, lines = st.out, []
    if rec.get("log"):
        lines.append(f"- log: [{_rel(rec['log'], root)}]({_rel(rec['log'], root)})")
    man = {}
    if (d / "manifest.json").is_file():
        try:
            man = read_json(d / "manifest.json")
        except InputError:
            man = {}
        lines.append(f"- manifest: [{_rel(d / 'manifest.json', root)}]({_rel(d / 'manifest.json', root)})")
    if st.command == "train" and man.get("result"):
        r = man["result"]
        vl = r.get("best_val_loss")
        lines.append(f"- best iteration {r.get('best_iter')} (val loss {'—' if vl is None else f'{vl:.4f}'}), "
                     f"{r.get('stop_reason')}: [{_rel(d / 'adapters.safetensors', root)}]"
                     f"({_rel(d / 'adapters.safetensors', root)}), metrics in "
                     f"[{_rel(d / 'metrics.jsonl', root)}]({_rel(d / 'metrics.jsonl', root)})")
    elif st.command == "corpus" and man:
        rej = ", ".join(f"{k} {v}" for k, v in (man.get("rejected_by") or {}).items()) or "none"
        s = man.get("splits") or {}
        lines.append(f"- {man.get('verified_records')} verified records of {man.get('problems')} problems "
                     f"(rejected by: {rej}); splits train {s.get('train')}, valid {s.get('valid')}, "
                     f"test {s.get('test')}; mean words {man.get('mean_words') if man.get('mean_words') is not None else '—'}")
    elif st.command in ("synth", "variant") and man:
        lines.append(f"- records: {man.get('counts')}")
    elif st.command == "logits" and man:
        lines.append(f"- {len(man.get('examples') or {})} examples scored, top-M {man.get('top_m')}, "
                     f"{(man.get('stats') or {}).get('payload_bytes_per_token')} bytes/token")
    elif st.command == "study" and (d / "report.md").is_file():
        lines.append(f"- study report: [{_rel(d / 'report.md', root)}]({_rel(d / 'report.md', root)})")
    elif st.command == "eval" and (d / "report.md").is_file():
        lines.append(f"- eval report: [{_rel(d / 'report.md', root)}]({_rel(d / 'report.md', root)})")
    return lines + [""]


def _accuracy_rows(recipe: Recipe, root: Path) -> list[str]:
    rows = []
    for st in recipe.stages:
        if st.command != "eval" or not (st.out / "summary.json").is_file():
            continue
        try:
            s = read_json(st.out / "summary.json")
        except InputError:
            continue
        ci = s.get("accuracy_ci95") or [None, None]
        words = (s.get("words") or {}).get("mean")
        ds = s.get("dataset") or st.cfg.dataset
        if ds == "corpus" and st.cfg.data:
            ds = f"corpus ({_rel(st.cfg.data, root)} test)"
        adapter = _rel(st.cfg.adapter, root) if st.cfg.adapter else "—"
        rows.append(f"| [{st.name}]({_rel(st.out / 'summary.json', root)}) | {ds} | {st.cfg.model} | {adapter} | "
                    f"{s.get('n')} | {_fmt_pct(s.get('accuracy'))} | {_fmt_pct(ci[0])}–{_fmt_pct(ci[1])} | "
                    f"{'—' if words is None else words} |")
    return rows


# ============================================================================= main
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["variant"]:
        return variant_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m mlx_distill pipeline", description=__doc__.split("\n\n")[0],
                                 epilog="See recipes/README.md for the recipe format and the recipes shipped.")
    ap.add_argument("recipe", help="Recipe YAML file (recipes/*.yaml).")
    ap.add_argument("--out", default=None, help="Root output folder (overrides the recipe's `root:`).")
    ap.add_argument("--dry-run", action="store_true", help="Print each stage's command and whether it would run; "
                    "run nothing.")
    ap.add_argument("--from", dest="start", default=None, metavar="STAGE", help="Start at this stage.")
    ap.add_argument("--until", default=None, metavar="STAGE", help="Stop after this stage.")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="Override a stage option (VALUE parsed as YAML); repeatable.")
    ap.add_argument("--force", action="store_true", help="Re-run the selected stages even when their output matches.")
    a = ap.parse_args(argv)
    recipe = load(a.recipe, a.out, a.sets)
    with Interrupts("the running stage saves its work and stops") as stop:
        run(recipe, dry_run=a.dry_run, start=a.start, until=a.until, force=a.force, stop=stop)
    stop.check()  # a signal after the last stage finished: all saved, the exit status says it came
