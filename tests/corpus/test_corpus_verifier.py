"""The verifier agent on real data: every GSM8K test gold solution and every MATH-500 reference
solution is judged correct against its own gold answer; altered answers are judged wrong."""

import asyncio

import pytest

from fault_server import FaultServer
from mlx_distill.corpus.agents import Verifier, load_prompt, parse_score
from mlx_distill.generation.clients import OpenAIClient
from mlx_distill.tasks.problems import load_problems


def run_all(verifier, items, kind):
    async def go():
        return [await verifier.verify(p, text, kind) for p, text in items]
    return asyncio.run(go())


def test_gsm8k_test_gold_and_altered(shared_data):
    probs = load_problems("gsm8k", split="test")
    assert len(probs) == 1319
    v = Verifier()
    gold = run_all(v, [(p, p["meta"]["solution"]) for p in probs], "gsm8k")
    assert sum(r["status"] == "correct" for r in gold) == 1319
    assert all(r["decided_by"] == "programmatic" for r in gold)
    altered = [(p, p["meta"]["solution"].rsplit("####", 1)[0] + f"#### {int(float(p['answer'])) + 1}") for p in probs]
    assert sum(r["status"] == "wrong" for r in run_all(v, altered, "gsm8k")) == 1319


def test_math500_reference_solutions_and_altered(shared_data):
    probs = load_problems("math500")
    assert len(probs) == 500
    v = Verifier()
    ok = run_all(v, [(p, p["meta"]["solution"]) for p in probs], "math")
    assert sum(r["status"] == "correct" for r in ok) == 500, [p["id"] for p, r in zip(probs, ok) if r["status"] != "correct"]
    # replace the final boxed answer with "<gold>+1" (and drop the text after it)
    altered = []
    for p in probs:
        sol = p["meta"]["solution"]
        altered.append((p, sol[:sol.rfind("\\boxed")] + "\\boxed{" + p["answer"] + "+1}"))
    bad = run_all(v, altered, "math")
    assert sum(r["status"] == "wrong" for r in bad) == 500


def test_judge_only_for_unreadable_answers_and_critic():
    script = {"items": {"[J]": {"judge": {"content": "The final answer matches.\n**VERDICT: CORRECT**"}},
                        "[K]": {"judge": {"content": "VERDICT: INCORRECT"}},
                        "[U]": {"judge": {"content": "The answer is not correct."}}},
              "default": {"content": "Reasoning is clear.\nSCORE: 4"}}
    with FaultServer(script) as srv:
        async def go():
            judge = OpenAIClient(srv.base_url, "judge", api_key_env="", backoff_base=0.01)
            v = Verifier(judge, load_prompt("judge_correct", ("question", "gold", "response")),
                         load_prompt("judge_critic", ("question", "response")))
            pj = {"id": "a", "question": "[J] q", "answer": "20"}
            pk = {"id": "b", "question": "[K] q", "answer": "20"}
            a = await v.verify(pj, "#### twenty", "gsm8k")                    # unreadable -> judge
            b = await v.verify(pk, "#### twenty", "gsm8k")
            c = await v.verify(pj, "#### 21", "gsm8k")                        # readable: never the judge
            d = await v.verify(pj, "#### twenty", "gsm8k", allow_judge=False)
            e = await v.critic(pj, "#### 20")
            u = await v.verify({"id": "u", "question": "[U] q", "answer": "20"}, "#### twenty", "gsm8k")
            await judge.aclose()
            return a, b, c, d, e, u
        a, b, c, d, e, u = asyncio.run(go())
        assert srv.counts["ok"] == 4  # three judge calls and one critic call
    assert (a["status"], a["decided_by"], a["method"]) == ("correct", "judge:fault-model-v1", "llm-judge")
    assert (b["status"], b["decided_by"]) == ("wrong", "judge:fault-model-v1")
    assert (c["status"], c["decided_by"]) == ("wrong", "programmatic") and "judge" not in c
    assert (d["status"], d["decided_by"]) == ("invalid", "programmatic")
    assert e["score"] == 4 and e["completion_tokens"] > 0
    # no explicit verdict line: judge unparsable, the trace stays unverified (never "correct")
    assert (u["status"], u["decided_by"], u["reason"]) == ("invalid", "programmatic", "judge unparsable")
    assert u["judge"]["verdict"] is None


def test_parse_score():
    assert parse_score("SCORE: 5") == 5 and parse_score("**Score:** 2") == 2 and parse_score("I give it 3") == 3
    assert parse_score("no idea") is None
