"""Problem sources: record shape, stable ids, gold answers, user CSV/JSONL with figure skipping."""

import json

import pytest

from mlx_distill.io import InputError
from mlx_distill import tasks
from mlx_distill.tasks.answers import boxed_content as last_boxed
from mlx_distill.tasks.problems import answer_kind, leakage_index, load_problems, normalize_text


@pytest.mark.parametrize("source,n,first_id,first_answer", [
    ("gsm8k", 7473, "gsm8k-train-00000", "72"),
    ("math", 7500, "math-train/algebra/0", "0"),
    ("math500", 500, "math500-test/precalculus/807", r"\left( 3, \frac{\pi}{2} \right)"),
    ("aime24", 30, "aime24-60", "204"),
    ("amc23", 40, "amc23-0", "27"),  # JSON number 27.0 -> "27"
])
def test_named_sources(shared_data, source, n, first_id, first_answer):
    recs = load_problems(source)
    assert len(recs) == n
    r = recs[0]
    assert set(r) == {"id", "question", "answer", "source", "meta"}
    assert (r["id"], r["answer"], r["source"]) == (first_id, first_answer, source)
    assert len({x["id"] for x in recs}) == n
    assert load_problems(source, limit=3) == recs[:3]  # ids do not depend on --limit


def test_gsm8k_gold_and_split(shared_data):
    test = load_problems("gsm8k", split="test")
    assert len(test) == 1319 and test[0]["id"] == "gsm8k-test-00000" and test[0]["answer"] == "18"
    assert all("," not in r["answer"] for r in test)  # "1,000" -> "1000"
    assert answer_kind("gsm8k") == "gsm8k" and answer_kind("math500") == "math" and answer_kind("openai/gsm8k") == "gsm8k"


def test_math_meta_and_boxed(shared_data):
    m = load_problems("math", limit=5)
    assert m[0]["meta"]["subject"] == "Algebra" and m[0]["meta"]["level"] == 5
    assert last_boxed(r"so \boxed{\frac{1}{2}} then \boxed{x^{2}}.") == "x^{2}"
    assert last_boxed(r"our answer is $\boxed 2$.") == "2"  # MATH train/algebra has two of these
    assert last_boxed("no box") is None and last_boxed(r"\boxed{unclosed") is None
    m5 = load_problems("math500")
    assert {r["meta"]["level"] for r in m5} == {1, 2, 3, 4, 5}


def test_user_csv_skips_figures(tmp_path):
    p = tmp_path / "obryan.csv"
    p.write_text("year,number,problem,answer,figure\n"
                 "2011,1,What is 2+2?,4,\n"
                 "2011,2,Find the shaded area.,12,yes\n"
                 "2012,1,\"Compute 1,000 + 1.\",1001,0\n"
                 "2012,2,A problem with no answer,,\n")
    skipped = []
    recs = load_problems("csv", str(p), skipped=skipped)
    assert [r["id"] for r in recs] == ["obryan-2011-1", "obryan-2012-1"]
    assert recs[1]["question"] == "Compute 1,000 + 1." and recs[1]["meta"]["year"] == "2012"
    assert [(s["id"], s["reason"].split(" (")[0]) for s in skipped] == [
        ("obryan-2011-2", "needs a figure"), ("obryan-2012-2", "no answer")]
    assert answer_kind("csv") == "math"


def test_user_jsonl_ids_stable_and_errors(tmp_path):
    p = tmp_path / "mine.jsonl"
    rows = [{"problem": "Same text", "answer": 3}, {"problem": "Same text", "answer": 3},
            {"question": "Other", "solution": r"so \boxed{5}", "has_figure": False}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = load_problems("jsonl", str(p))
    assert [r["answer"] for r in a] == ["3", "3", "5"]
    assert len({r["id"] for r in a}) == 3 and a == load_problems("jsonl", str(p))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": 1}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1"):
        load_problems("jsonl", str(bad))
    with pytest.raises(InputError, match="needs --data PATH"):
        load_problems("csv")
    with pytest.raises(InputError, match="unknown problem source"):
        load_problems("nope")


def test_leakage_index_covers_all_eval_sets(shared_data):
    ix, loaded, missing = leakage_index()
    assert len(ix) == 1319 + 500 + 30 + 40
    assert loaded == ["gsm8k-test", "math500-test", "aime24-test", "amc23-test"] and missing == {}
    q = load_problems("gsm8k", split="test")[5]["question"]
    assert ix[normalize_text("  " + q.upper() + " ")] == "gsm8k-test-00005"


def test_leakage_index_reports_exactly_what_it_loaded(tmp_path, monkeypatch, shared_data):
    """A data folder with only GSM8K and no Hub: the other sets are named as missing, never as checked."""
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text((shared_data / "gsm8k" / "test.jsonl").read_text())
    monkeypatch.setenv("MLX_DISTILL_DATA", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ix, loaded, missing = leakage_index()
    assert loaded == ["gsm8k-test"] and len(ix) == 1319
    assert set(missing) == {"math500", "aime24", "amc23"}
    assert "math500/test.jsonl (not found)" in missing["math500"] and "HuggingFaceH4/MATH-500" in missing["math500"]


def test_data_resolution_order(tmp_path, monkeypatch, shared_data):
    """--data beats MLX_DISTILL_DATA, which beats the Hub; a data folder given as --data works too."""
    import datasets

    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"question": "Q?", "answer": "so #### 7"}) + "\n")
    prov = {}
    assert load_problems("gsm8k", str(mine), split="test", provenance=prov)[0]["answer"] == "7"
    assert prov == {"kind": "file", "path": str(mine.resolve()), "split": "test"}
    prov = {}
    assert len(load_problems("gsm8k", str(shared_data), split="test", provenance=prov)) == 1319
    assert prov["path"].endswith("gsm8k/test.jsonl")
    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"question": "hub q", "answer": "#### 3"}]
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_problems("gsm8k", split="test")[0]["question"] != "hub q" and not calls  # local data first
    monkeypatch.delenv("MLX_DISTILL_DATA")
    prov = {}
    assert load_problems("gsm8k", split="test", provenance=prov)[0]["question"] == "hub q"
    assert calls == [("openai/gsm8k", "main", "test")] and prov["kind"] == "hub"


def test_registry_is_the_one_definition():
    """Every name the CLI offers is a registry task, and every task knows its kind, format and prompt."""
    from mlx_distill import config
    from mlx_distill.paths import prompt_path

    assert config.EVAL_DATASETS == tasks.NAMES
    for t in tasks.TASKS.values():
        assert t.answer_kind in ("gsm8k", "math") and t.answer_format in ("####", "boxed")
        assert prompt_path(t.prompt).is_file()
        assert t.needs_data or t.local or t.hub
    assert [t.name for t in tasks.leakage_tasks()] == ["gsm8k", "math500", "aime24", "amc23"]
    assert tasks.get("HuggingFaceH4/MATH-500").name == "math500" and tasks.answer_kind("openai/gsm8k") == "gsm8k"
    with pytest.raises(InputError, match="unknown dataset"):
        tasks.get("gsm9k")


def test_hugging_face_names_map_to_the_same_records(monkeypatch):
    """HF datasets are not reachable here: check the mapping with rows shaped like the hub's."""
    import datasets

    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "openai/gsm8k":
            return [{"question": "q?", "answer": "1 + 1 = 2\n#### 2,000"}]
        if name == "EleutherAI/hendrycks_math":
            return [{"problem": f"{config} p", "solution": r"so \boxed{3}", "level": "Level 2", "type": "Algebra"}]
        if name == "HuggingFaceH4/MATH-500":
            return [{"problem": "p", "solution": r"\boxed{4}", "answer": "4", "subject": "Algebra", "level": 1,
                     "unique_id": "test/algebra/1.json"}]
        return [{"problem": "custom", "answer": 7.0}]
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    g = load_problems("openai/gsm8k", split="test")
    assert g[0] == {"id": "gsm8k-test-00000", "question": "q?", "answer": "2000", "source": "gsm8k",
                    "meta": {"split": "test", "index": 0, "solution": "1 + 1 = 2\n#### 2,000"}}
    assert calls[-1] == ("openai/gsm8k", "main", "test")
    m = load_problems("EleutherAI/hendrycks_math")
    assert len(m) == 7 and m[0]["answer"] == "3" and m[0]["meta"]["level"] == 2
    assert load_problems("HuggingFaceH4/MATH-500")[0]["id"] == "math500-test/algebra/1"
    assert load_problems("someone/comp")[0]["answer"] == "7"


def test_a_csv_with_a_byte_that_is_not_utf8_names_file_and_line(tmp_path):
    from mlx_distill.io import InputError
    from mlx_distill.tasks.problems import _read_rows

    bad = tmp_path / "set.csv"
    bad.write_bytes(b"problem,answer\nWhat is 2+2?,4\ncaf\xe9 price?,5\n")
    with pytest.raises(InputError, match=r"set.csv:3: not UTF-8"):
        _read_rows(bad)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfproblem,answer\nWhat is 2+2?,4\n")
    assert _read_rows(bom) == [(f"{bom}:2", {"problem": "What is 2+2?", "answer": "4"})]
