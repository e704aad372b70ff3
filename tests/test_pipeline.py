"""`python -m mlx_distill pipeline`: recipe loading, references, --set, dry runs of every shipped
recipe, skipping finished stages, downstream re-runs, and report.md."""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from mlx_distill import pipeline
from mlx_distill.config import ConfigError
from mlx_distill.io import InputError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def write_recipe(path: Path, stages: list[dict], root="runs/x", **extra) -> Path:
    path.write_text(yaml.safe_dump({"root": str(root), "stages": stages, **extra}, sort_keys=False))
    return path


def two_stage(tmp_path, **train_args):
    return write_recipe(tmp_path / "r.yaml", [
        {"name": "problems", "command": "synth", "args": {"n_train": 8}},
        {"name": "sft", "command": "train", "args": {"data": "${stages.problems.out}", **train_args}},
    ], root=tmp_path / "root")


# ----------------------------------------------------------------------------- references
def test_references_resolve_to_earlier_stages_outputs(tmp_path):
    r = pipeline.load(write_recipe(tmp_path / "r.yaml", [
        {"name": "problems", "command": "corpus synth", "args": {"n_train": 8}},
        {"name": "sft", "command": "train",
         "args": {"data": "${stages.problems.out}", "iters": "${stages.problems.n_train}",
                  "kd": {"dir": ""}, "prompt_template": "${root}/t-${stages.problems.seed}.txt"}},
    ], root="R"))
    sft = r.stage("sft")
    assert r.stage("problems").cfg.out == "R/problems"  # out defaults to <root>/<name>
    assert sft.cfg.data == "R/problems"
    assert sft.cfg.iters == 8 and isinstance(sft.cfg.iters, int)  # a whole-value reference keeps its type
    assert sft.cfg.prompt_template == "R/t-0.txt"  # inside a string: substituted as text
    assert sft.cfg.kd_dir == ""  # sections are flattened as in -c YAML
    assert sft.deps == {"problems"}  # only `out` references are dependencies (iters copies a value)
    # --out replaces the recipe's root everywhere
    assert pipeline.load(tmp_path / "r.yaml", root="other").stage("sft").cfg.data == "other/problems"


@pytest.mark.parametrize("value, words", [
    ("${stages.nope.out}", ["stage 'sft'", "key 'data'", "${stages.nope.out}"]),
    ("${stages.problems.no_such_key}", ["stage 'sft'", "key 'data'", "has no option 'no_such_key'"]),
    ("${stages.sft.out}", ["stage 'sft'", "key 'data'", "comes later"]),
    ("${rooot}/x", ["stage 'sft'", "key 'data'", "unknown reference ${rooot}"]),
])
def test_bad_reference_is_an_error_naming_stage_and_key(tmp_path, value, words):
    f = write_recipe(tmp_path / "r.yaml", [{"name": "problems", "command": "synth"},
                                           {"name": "sft", "command": "train", "args": {"data": value}}])
    with pytest.raises(InputError) as e:
        pipeline.load(f)
    for w in words:
        assert w in str(e.value)
    assert str(f) in str(e.value)


def test_unknown_option_names_recipe_and_stage(tmp_path):
    f = write_recipe(tmp_path / "r.yaml", [{"name": "sft", "command": "train", "args": {"lora_rnak": 8}}])
    with pytest.raises(ConfigError) as e:
        pipeline.load(f)
    assert str(f) in str(e.value) and "stage 'sft'" in str(e.value) and "lora_rnak" in str(e.value)


@pytest.mark.parametrize("stages, words", [
    ([{"name": "a", "command": "fly"}], ["command 'fly'"]),
    ([{"name": "a", "command": "synth"}, {"name": "a", "command": "synth"}], ["'a' is used twice"]),
    ([{"name": "a b", "command": "synth"}], ["`name:`"]),
    ([{"name": "a", "command": "synth", "n_train": 3}], ["unknown key(s) ['n_train']", "under `args:`"]),
])
def test_malformed_recipes(tmp_path, stages, words):
    f = write_recipe(tmp_path / "r.yaml", stages)
    with pytest.raises(InputError) as e:
        pipeline.load(f)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_set_overrides_are_yaml_parsed(tmp_path, capsys):
    f = two_stage(tmp_path, iters=5)
    r = pipeline.load(f, sets=["sft.iters=7", "sft.lora_keys=[self_attn.q_proj, self_attn.v_proj]",
                               "sft.kd.alpha=0.5", "sft.mask_prompt=false", "problems.n_train=9"])
    sft = r.stage("sft")
    assert sft.cfg.iters == 7 and sft.cfg.kd_alpha == 0.5 and sft.cfg.mask_prompt is False
    assert sft.cfg.lora_keys == ["self_attn.q_proj", "self_attn.v_proj"]
    assert r.stage("problems").cfg.n_train == 9
    argv, _ = pipeline.command_argv(sft, tmp_path / "c.yaml")
    assert argv[:1] == ["train"] and "--no-mask-prompt" in argv
    assert argv[argv.index("--iters") + 1] == "7" and argv[argv.index("--kd-alpha") + 1] == "0.5"
    assert argv[argv.index("--lora-keys") + 1:argv.index("--lora-keys") + 3] == ["self_attn.q_proj",
                                                                                   "self_attn.v_proj"]
    for bad, word in (("sft.iters", "STAGE.KEY=VALUE"), ("nope.iters=3", "no stage named 'nope'"),
                      ("sft.itres=3", "itres")):
        with pytest.raises((InputError, ConfigError)) as e:
            pipeline.load(f, sets=[bad])
        assert word in str(e.value)


def test_dry_run_runs_nothing_and_honours_from_until(tmp_path, capsys):
    f = two_stage(tmp_path)
    pipeline.main([str(f), "--dry-run"])
    out = capsys.readouterr().out
    assert "[run ] problems (synth)" in out and "[run ] sft (train)" in out
    assert "python -m mlx_distill corpus synth --n-train 8 --out " in out
    assert f"python -m mlx_distill train --data {tmp_path}/root/problems --out {tmp_path}/root/sft" in out
    assert not (tmp_path / "root").exists()
    pipeline.main([str(f), "--dry-run", "--until", "problems"])
    out = capsys.readouterr().out
    assert "[run ] problems" in out and "[--] sft (train): not selected" in out
    with pytest.raises(InputError, match="--from nope"):
        pipeline.main([str(f), "--dry-run", "--from", "nope"])


def test_nested_values_go_through_a_config_file(tmp_path):
    r = pipeline.load(write_recipe(tmp_path / "r.yaml", [
        {"name": "study", "command": "study length",
         "args": {"kind": "adapter", "levels": [{"name": "R1", "data": "c/R1"}], "eval": {"dataset": "gsm8k"}}}]))
    argv, via_file = pipeline.command_argv(r.stage("study"), tmp_path / "study.yaml")
    assert argv[:2] == ["study", "length"] and argv[-2:] == ["-c", str(tmp_path / "study.yaml")]
    assert via_file == {"levels": [{"name": "R1", "data": "c/R1"}], "eval": {"dataset": "gsm8k"}}
    assert "--kind" in argv


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_dry_runs(recipe, tmp_path, capsys):
    pipeline.main([str(recipe), "--dry-run", "--out", str(tmp_path / "root")])
    out = capsys.readouterr().out
    assert "dry run: nothing was run" in out
    assert not (tmp_path / "root").exists()
    text = recipe.read_text()
    assert text.startswith("#"), "every recipe opens with a header comment"


def test_recipes_folder_lists_every_recipe():
    assert len(RECIPES) >= 6
    readme = (REPO / "recipes" / "README.md").read_text()
    for p in RECIPES:
        assert p.name in readme, p.name


# ----------------------------------------------------------------------------- running
def cheap_recipe(tmp_path, tiny_model, lr=1e-3) -> Path:
    """synth -> 2-iteration train on the tiny model -> eval of 4 test problems, 8 tokens each."""
    return write_recipe(tmp_path / "cheap.yaml", [
        {"name": "problems", "command": "synth", "args": {"n_train": 16, "n_valid": 4, "n_test": 4, "seed": 3}},
        {"name": "sft", "command": "train",
         "args": {"model": str(tiny_model), "data": "${stages.problems.out}", "iters": 2, "batch_size": 2,
                  "learning_rate": lr, "val_every": 2, "report_every": 1, "save_every": 2, "lora_layers": -1}},
        {"name": "test", "command": "eval",
         "args": {"model": "${stages.sft.model}", "adapter": "${stages.sft.out}", "dataset": "corpus",
                  "data": "${stages.problems.out}", "limit": 4, "max_tokens": 8, "batch_size": 4, "plot": False}},
    ], root=tmp_path / "root", description="A cheap pipeline for the tests.")


def decisions(root: Path) -> dict:
    return {k: v.get("last_decision") for k, v in json.loads((root / "pipeline.json").read_text())["stages"].items()}


@pytest.mark.slow
def test_run_skip_rerun_downstream_and_report(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    f = cheap_recipe(tmp_path, tiny_model)
    root = tmp_path / "root"
    pipeline.main([str(f)])
    assert decisions(root) == {"problems": "ran", "sft": "ran", "test": "ran"}
    state = json.loads((root / "pipeline.json").read_text())
    assert all(s["status"] == "done" for s in state["stages"].values())
    assert (root / "logs" / "sft.log").read_text().startswith("$ python -m mlx_distill train ")
    summary = json.loads((root / "test" / "summary.json").read_text())
    assert summary["n"] == 4

    report = (root / "report.md").read_text()
    assert "A cheap pipeline for the tests." in report
    assert "[problems](problems)" in report and "[sft](sft)" in report and "[test](test)" in report
    assert "| stage | dataset | model | adapter | n | accuracy | 95% CI | mean words |" in report
    lo, hi = summary["accuracy_ci95"]
    row = [ln for ln in report.splitlines() if ln.startswith("| [test](test/summary.json)")]
    assert len(row) == 1 and f"| 4 | {100 * summary['accuracy']:.1f}% | {100 * lo:.1f}%–{100 * hi:.1f}% |" in row[0]

    # the same recipe again: every stage skipped, outputs untouched
    mtime = (root / "sft" / "adapters.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    pipeline.main([str(f)])
    out = capsys.readouterr().out
    assert decisions(root) == {"problems": "skipped", "sft": "skipped", "test": "skipped"}
    assert "0 stage(s) ran, 3 skipped" in out
    assert (root / "sft" / "adapters.safetensors").stat().st_mtime_ns == mtime

    # a changed train stage re-runs, and so does the eval after it; the synth stage is kept
    pipeline.main([str(f), "--set", "sft.learning_rate=5e-4"])
    out = capsys.readouterr().out
    assert decisions(root) == {"problems": "skipped", "sft": "ran", "test": "ran"}
    assert "[run ] sft (train): config changed: learning_rate" in out
    assert "[run ] test (eval): after sft" in out
    aside = sorted(p.name for p in root.glob("sft.old-*"))
    assert len(aside) == 1 and (root / aside[0] / "adapters.safetensors").is_file()  # moved aside, not deleted
    assert json.loads((root / "sft" / "manifest.json").read_text())["config"]["learning_rate"] == 5e-4

    # a stage rebuilt by a partial run (--until) makes the stages after it stale for the next run
    pipeline.main([str(f), "--set", "sft.learning_rate=5e-4", "--from", "sft", "--until", "sft", "--force"])
    capsys.readouterr()
    pipeline.main([str(f), "--set", "sft.learning_rate=5e-4", "--dry-run"])
    out = capsys.readouterr().out
    assert "[skip] sft" in out and "[run ] test (eval): sft rebuilt since this stage ran" in out


def test_failed_stage_stops_the_pipeline_with_its_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    f = write_recipe(tmp_path / "r.yaml", [
        {"name": "problems", "command": "synth", "args": {"n_train": 4, "n_valid": 0, "n_test": 2, "min_ops": 3,
                                                          "max_ops": 2}},
        {"name": "after", "command": "synth", "args": {"n_train": 4, "out": "${stages.problems.out}-2"}},
    ], root=tmp_path / "root")
    with pytest.raises(SystemExit) as e:
        pipeline.main([str(f)])
    assert e.value.code == 2
    state = json.loads((tmp_path / "root" / "pipeline.json").read_text())
    assert state["stages"]["problems"]["status"] == "failed" and "after" not in state["stages"]
    assert "--min-ops" in (tmp_path / "root" / "logs" / "problems.log").read_text()
    assert "stage 'problems' failed (exit 2)" in capsys.readouterr().err


def test_variant_writes_answer_only_and_mixed_copies(tmp_path, capsys):
    from mlx_distill import cli

    cli.main(["corpus", "synth", "--out", str(tmp_path / "c"), "--n-train", "40", "--n-valid", "6", "--n-test", "5"])
    pipeline.main(["variant", "--data", str(tmp_path / "c"), "--mode", "answer-only", "--out", str(tmp_path / "ao")])
    pipeline.main(["variant", "--data", str(tmp_path / "c"), "--mode", "mixed", "--out", str(tmp_path / "mx"),
                   "--seed", "1"])
    read = lambda d, s: [json.loads(x) for x in (tmp_path / d / f"{s}.jsonl").read_text().splitlines()]
    src = read("c", "train")
    assert all(r["reasoning"] == "" for r in read("ao", "train") + read("ao", "valid"))
    assert read("ao", "test") == read("c", "test")  # every variant is evaluated on the same problems
    mixed = read("mx", "train")
    n_ao = sum(r["reasoning"] == "" for r in mixed)
    assert 8 <= n_ao <= 32  # about half of 40
    assert [r["id"] for r in mixed] == [r["id"] for r in src]
    assert all(m["reasoning"] in ("", s["reasoning"]) and m["answer"] == s["answer"] for m, s in zip(mixed, src))
    man = json.loads((tmp_path / "mx" / "manifest.json").read_text())
    assert man["stage"] == "corpus-variant" and man["counts"]["train"]["answer_only"] == n_ao
    with pytest.raises(InputError, match="no train.jsonl"):
        pipeline.main(["variant", "--data", str(tmp_path), "--out", str(tmp_path / "x")])


def test_manifest_decides_and_tolerates_new_options(tmp_path, monkeypatch, capsys):
    """A command that gains an option (at its default) keeps old outputs valid; a changed value re-runs."""
    monkeypatch.chdir(tmp_path)
    f = write_recipe(tmp_path / "r.yaml", [{"name": "problems", "command": "synth", "args": {"n_train": 5}}],
                     root=tmp_path / "root")
    pipeline.main([str(f)])
    man_path, state_path = tmp_path / "root" / "problems" / "manifest.json", tmp_path / "root" / "pipeline.json"
    man, state = json.loads(man_path.read_text()), json.loads(state_path.read_text())
    del man["config"]["min_ops"]  # as if written before the option existed (it is at its default)
    man_path.write_text(json.dumps(man))
    state["stages"]["problems"]["config_hash"] = "0" * 64  # the hash is a record, not the test
    state_path.write_text(json.dumps(state))
    capsys.readouterr()
    pipeline.main([str(f)])
    assert "[skip] problems (synth): output matches its config" in capsys.readouterr().out
    man["config"]["max_ops"] = 2
    man_path.write_text(json.dumps(man))
    pipeline.main([str(f), "--dry-run"])
    assert "[run ] problems (synth): config changed: max_ops" in capsys.readouterr().out


def test_incomplete_corpus_stage_says_a_rerun_retries_only_the_failures(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    f = write_recipe(tmp_path / "r.yaml", [
        {"name": "corpus", "command": "corpus", "args": {"source": "gsm8k", "teacher": "api", "model": "m",
                                                         "base_url": "http://127.0.0.1:9/v1"}},
        {"name": "sft", "command": "train", "args": {"data": "${stages.corpus.out}"}},
    ], root=tmp_path / "root")
    monkeypatch.setattr(pipeline, "run_stage", lambda argv, log, stop=None: 3)  # corpus build's EXIT_INCOMPLETE
    with pytest.raises(SystemExit) as e:
        pipeline.main([str(f)])
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "stage 'corpus' ended incomplete (exit 3)" in err and "retries only those" in err
    state = json.loads((tmp_path / "root" / "pipeline.json").read_text())
    assert state["stages"]["corpus"]["status"] == "failed" and "sft" not in state["stages"]


# ----------------------------------------------------------------------------- input contents (issue 18 item 6)
def variant_recipe(tmp_path, src: Path) -> Path:
    """One cheap stage that reads a folder the recipe does not write (a user's corpus)."""
    return write_recipe(tmp_path / "v.yaml", [
        {"name": "ao", "command": "variant", "args": {"data": str(src), "mode": "answer-only"}},
    ], root=tmp_path / "root")


def test_an_input_file_edited_in_place_reruns_the_stage(tmp_path, monkeypatch, capsys):
    from mlx_distill import cli

    monkeypatch.chdir(tmp_path)
    src = tmp_path / "corpus"
    cli.main(["corpus", "synth", "--out", str(src), "--n-train", "6", "--n-valid", "2", "--n-test", "2"])
    f = variant_recipe(tmp_path, src)
    pipeline.main([str(f)])
    capsys.readouterr()
    pipeline.main([str(f)])  # unchanged: skipped
    assert "[skip] ao (variant): output matches its config" in capsys.readouterr().out
    rows = (src / "train.jsonl").read_text().splitlines()
    first = json.loads(rows[0])
    first["question"] += " (edited)"
    (src / "train.jsonl").write_text("\n".join([json.dumps(first)] + rows[1:]) + "\n")  # same path, same flags
    pipeline.main([str(f)])
    out = capsys.readouterr().out
    assert f"[run ] ao (variant): input changed since this stage ran: {src / 'train.jsonl'}" in out
    ao = [json.loads(x) for x in (tmp_path / "root" / "ao" / "train.jsonl").read_text().splitlines()]
    assert ao[0]["question"].endswith("(edited)")  # the re-run read the new content
    pipeline.main([str(f)])
    assert "[skip] ao (variant)" in capsys.readouterr().out  # and the run after that skips again


def test_a_changed_url_query_reruns_although_only_the_scrubbed_url_is_stored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def stage(url):
        r = pipeline.load(write_recipe(tmp_path / "e.yaml", [
            {"name": "ev", "command": "eval", "args": {"backend": "api", "base_url": url, "model": "m"}}],
            root=tmp_path / "root"))
        return r.stage("ev")

    a, b = stage("http://h:8000/v1?key=one"), stage("http://h:8000/v1?key=two")
    assert pipeline.compared_config(a) == pipeline.compared_config(b)  # the scrub hides the query ...
    fa, fb = pipeline.fingerprint(a.cfg), pipeline.fingerprint(b.cfg)
    assert "one" not in json.dumps(fa) and "two" not in json.dumps(fb)  # ... and only a hash is kept
    # a finished stage (manifest with the scrubbed config) + its pipeline record with the first URL's hash
    a.out.mkdir(parents=True)
    (a.out / "manifest.json").write_text(json.dumps({"stage": "eval", "status": "complete",
                                                     "config": pipeline.compared_config(a)}))
    state = {"stages": {"ev": {"status": "done", "inputs": {}, "fingerprint": fa}}}
    assert not pipeline.decide(a, state, set(), False, fa).run  # unchanged: skipped
    dec = pipeline.decide(b, state, set(), False, fb)
    assert dec.run and dec.reason == "input changed since this stage ran: URL base_url"
