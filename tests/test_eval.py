"""`r1 eval`: answers extracted and normalised, pass@1 with its standard error and majority vote, per-sample
results that a second run resumes, and a malformed line named by its number. The steered checkpoint answers
"There are *three* pears!" to every prompt, so the scores are known exactly."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from helpers import one_line_error, r1_env, run_r1
from r1cli.cli import app
from r1cli.evaluate import Problem, extract_answer, last_boxed, normalize, same_answer, score

PATTERN = r"\*(\w+)\*"


def test_boxed_and_normalisation():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{6}}.") == r"\frac{1}{6}"
    assert last_boxed("no box") is None and last_boxed(r"\boxed{unclosed") is None
    assert extract_answer("x = *7* or *8*", __import__("re").compile(PATTERN)) == "8"
    for got, ref in [(r"\frac{3}{4}", "0.75"), (r"\dfrac34", "3/4"), ("1,000", "1000"), (r"\text{72}", "72"),
                     (r"720^\circ", "720"), ("x=6", "6"), (r"\left(1,2\right)", "(1, 2)"), ("6.", "6"),
                     ("$-2$", "-2")]:
        assert same_answer(got, ref), (got, ref, normalize(got), normalize(ref))
    for got, ref in [("3/5", "0.75"), ("12", "1,2"), (None, "1")]:
        assert not same_answer(got, ref)


def test_score_against_hand_arithmetic():
    problems = [Problem(1, "a", "1"), Problem(2, "b", "2"), Problem(3, "c", "3")]
    rec = lambda line, ans, ref: {"line": line, "answer": ans, "correct": same_answer(ans, ref)}  # noqa: E731
    records = [rec(1, "1", "1"), rec(1, "1", "1"), rec(1, "5", "1"), rec(1, None, "1"),
               rec(2, "2", "2"), rec(2, "7", "2"), rec(2, "7", "2"), rec(2, "7.0", "2"),
               rec(3, "4", "3"), rec(3, "4", "3"), rec(3, "4", "3"), rec(3, "4", "3")]
    s = score(records, problems)
    rates = [0.5, 0.25, 0.0]
    mean = sum(rates) / 3
    sd = math.sqrt(sum((r - mean) ** 2 for r in rates) / 2)
    assert (s.problems, s.samples) == (3, 4)
    assert math.isclose(s.pass_at_1, mean) and math.isclose(s.stderr, sd / math.sqrt(3))
    assert math.isclose(s.majority, 1 / 3)  # 1: "1" wins 2-1; 2: "7" and "7.0" (one answer) win 3-1


def write_problems(path, answers):
    path.write_text("".join(json.dumps({"problem": f"Question {i}?", "answer": a}) + "\n"
                            for i, a in enumerate(answers)))


def test_eval_scores_resumes_and_keeps_every_sample(steered_dir, tmp_path):
    problems = tmp_path / "p.jsonl"
    write_problems(problems, ["three", "four", "Three"])
    out = tmp_path / "r.jsonl"
    args = ["eval", str(steered_dir), str(problems), "-k", "3", "--pattern", PATTERN, "--out", str(out),
            "--parallel", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("pass@1 33.3% ± 33.3 ")  # rates 1, 0, 0 ("Three" != "three")
    assert "majority vote 33.3%" in result.stdout and "9/9 samples" in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["line"], r["sample"]) for r in records) == [(n, j) for n in (1, 2, 3) for j in range(3)]
    assert all(r["answer"] == "three" and r["finish_reason"] == "stop" for r in records)
    # an interrupted run: two samples missing (and a torn last line); the second run does only those two
    out.write_text("".join(line + "\n" for line in out.read_text().splitlines()[:-2]) + '{"line": 3, "sam')
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("pass@1 33.3% ± 33.3 ")
    assert "7/9 samples" in result.stderr
    assert len(read_records(out)) == 9


def read_records(path):
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


@pytest.mark.slow
def test_malformed_line_is_named_and_nothing_is_lost(steered_dir, tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"problem": "a?", "answer": "1"}\n{"problem": "b?"}\n')
    out = tmp_path / "r.jsonl"
    out.write_text('{"line": 1, "sample": 0, "answer": "1", "correct": true}\n')
    p = run_r1("eval", steered_dir, problems, "--out", out, env=r1_env(tmp_path))
    line = one_line_error(p, 1)
    assert "line 2" in line and "'answer'" in line
    assert out.read_text() == '{"line": 1, "sample": 0, "answer": "1", "correct": true}\n'
    problems.write_text('{"problem": "a?", "answer": "1"}\n{"problem": "b?", "answer": 2,}\n')
    assert "line 2 is not JSON" in one_line_error(run_r1("eval", steered_dir, problems, env=r1_env(tmp_path)), 1)
