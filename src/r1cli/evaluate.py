"""`r1 eval MODEL FILE.jsonl`: K samples per problem, decoded together (batch.py), answers extracted and compared
after normalisation; pass@1 averaged over the K samples (with its standard error) and majority-vote accuracy, as
DeepSeek evaluates R1 (temperature 0.6, top-p 0.95, k samples per problem).

Each line of FILE is a JSON object with the problem (`problem`, `question` or `prompt`) and its reference answer
(`answer`). Every finished sample is appended to the results file at once (one JSON line), so Ctrl-C loses at most
the samples still running, and a second run with the same results file does only the samples missing from it.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Callable, TextIO

from .errors import R1Error, UsageError
from .options import ModelOptions

MATH_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."  # DeepSeek's recommendation
PROBLEM_KEYS = ("problem", "question", "prompt")


@dataclass
class Problem:
    line: int  # 1-based line number in FILE: the problem's id in the results
    text: str
    reference: str


def read_problems(path: Path) -> list[Problem]:
    """Every problem of FILE, or an R1Error naming the first malformed line and what is wrong with it."""
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise R1Error(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise R1Error(f"{path} is not UTF-8 text (a JSONL file of problems is)") from None
    problems = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise R1Error(f"{path} line {n} is not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise R1Error(f"{path} line {n} must be a JSON object with 'problem' and 'answer'")
        text = next((obj[k] for k in PROBLEM_KEYS if k in obj), None)
        if not isinstance(text, str) or not text.strip():
            raise R1Error(f"{path} line {n} has no problem: give it as a non-empty string in 'problem' "
                          f"(or 'question', 'prompt')")
        answer = obj.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise R1Error(f"{path} line {n} has no reference answer: give it as a string or number in 'answer'")
        problems.append(Problem(n, text, answer))
    if not problems:
        raise R1Error(f"{path} holds no problems (one JSON object per line)")
    return problems


# --- answers -------------------------------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in text, braces matched; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(text: str, pattern: re.Pattern | None = None) -> str | None:
    """The final answer: the last match of `pattern` (its first group, else the whole match), or the last
    \\boxed{} content."""
    if pattern is not None:
        matches = list(pattern.finditer(text))
        if not matches:
            return None
        m = matches[-1]
        return m.group(1) if m.groups() else m.group(0)
    return last_boxed(text)


_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac(\d)(\d)")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def normalize(answer: str) -> str:
    """A canonical form for comparison: simple LaTeX removed (\\text, \\left/\\right, spacing, $, degrees,
    \\frac{a}{b} -> a/b), spaces and a final period dropped, thousands separators removed, and a plain number
    (integer, decimal, fraction) written as its reduced fraction."""
    s = answer.strip()
    s = _TEXT.sub(r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""),
                     ("$", ""), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("\\dfrac", "\\frac"),
                     ("\\tfrac", "\\frac")):
        s = s.replace(old, new)
    for _ in range(3):
        s = _FRAC.sub(r"(\1)/(\2)", s)
    s = _FRAC_SHORT.sub(r"\1/\2", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[a-zA-Z]=(?=.)", "", s)  # "x=6" answers "6"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    number = _as_number(s)
    return str(number) if number is not None else s


def _as_number(s: str) -> Fraction | None:
    m = re.fullmatch(r"\(?(-?\d+(?:\.\d+)?)\)?/\(?(-?\d+(?:\.\d+)?)\)?", s)
    try:
        if m:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        if re.fullmatch(r"[-+]?\d+(\.\d+)?|[-+]?\.\d+", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def same_answer(got: str | None, reference: str) -> bool:
    return got is not None and normalize(got) == normalize(reference)


# --- the scores ----------------------------------------------------------------------------------------------------


@dataclass
class Score:
    problems: int
    samples: int  # per problem (the fewest any problem has)
    pass_at_1: float  # mean over problems of the fraction of their samples that are correct
    stderr: float  # its standard error over problems
    majority: float  # fraction of problems whose most common extracted answer is correct


def score(records: list[dict], problems: list[Problem]) -> Score:
    by_line: dict[int, list[dict]] = {p.line: [] for p in problems}
    for r in records:
        if r.get("line") in by_line:
            by_line[r["line"]].append(r)
    rates, majority = [], 0
    for p in problems:
        rs = by_line[p.line]
        if not rs:
            continue
        rates.append(sum(r["correct"] for r in rs) / len(rs))
        votes = Counter(normalize(r["answer"]) for r in rs if r["answer"] is not None)
        if votes and votes.most_common(1)[0][0] == normalize(p.reference):
            majority += 1
    n = len(rates)
    mean = sum(rates) / n if n else 0.0
    var = sum((x - mean) ** 2 for x in rates) / (n - 1) if n > 1 else 0.0
    return Score(n, min((len(v) for v in by_line.values()), default=0), mean, math.sqrt(var / n) if n else 0.0,
                 majority / n if n else 0.0)


# --- the run -------------------------------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict]:
    """Records already in the results file (a run to resume). A torn last line (killed mid-write) is dropped."""
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and isinstance(r.get("line"), int) and isinstance(r.get("sample"), int):
            records.append(r)
    return records


def _drop_torn_tail(path: Path) -> None:
    """A run killed mid-write leaves a last line without its newline: cut it, so the next record starts a line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def run_eval(m, problems: list[Problem], params, k: int, results_path: Path, suffix: str = MATH_SUFFIX,
             pattern: str | None = None, parallel: int = 8, err: TextIO | None = None,
             progress: Callable[[int, int], None] | None = None) -> Score:
    """Sample every (problem, sample) pair missing from `results_path`, appending each record as it finishes."""
    from .chat_format import build_prompt
    from .events import Done

    try:
        regex = re.compile(pattern) if pattern else None
    except re.error as e:
        raise UsageError(f"--pattern is not a regular expression: {e}") from None
    records = read_results(results_path)
    _drop_torn_tail(results_path)
    done = {(r["line"], r["sample"]) for r in records}
    engine = m.batch(parallel)
    total = len(problems) * k
    samples = {}  # stream -> (problem, sample index)
    for p in problems:
        text = f"{p.text}\n{suffix}" if suffix else p.text
        prompt = build_prompt(m.tokenizer, [{"role": "user", "content": text}], family=m.family)
        for j in range(k):
            if (p.line, j) in done:
                continue
            seed = None if params.seed is None else params.seed + 1000 * p.line + j
            samples[engine.stream(prompt, replace(params, seed=seed))] = (p, j)
    finished = len(done)
    if progress:
        progress(finished, total)
    with open(results_path, "a", encoding="utf-8") as out:
        while samples:
            for stream, event in engine.events():
                if not isinstance(event, Done):
                    continue
                p, j = samples.pop(stream)
                stats = event.stats
                answer = extract_answer(stats.content, regex)
                record = {"line": p.line, "sample": j, "answer": answer, "reference": p.reference,
                          "correct": same_answer(answer, p.reference), "finish_reason": stats.finish_reason,
                          "completion_tokens": stats.completion_tokens, "content": stats.content}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                records.append(record)
                finished += 1
                if progress:
                    progress(finished, total)
    return score(records, problems)


def format_score(s: Score) -> str:
    return (f"pass@1 {100 * s.pass_at_1:.1f}% ± {100 * s.stderr:.1f} (standard error; averaged over {s.samples} "
            f"samples of each of {s.problems} problems) · majority vote {100 * s.majority:.1f}%")


def stderr_progress(stream: TextIO) -> Callable[[int, int], None]:
    """A one-line progress bar on stderr (redrawn in place on a terminal, a line per 10% otherwise)."""
    tty = stream.isatty()
    shown = {"tenth": -1}

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        bar = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} samples"
        if tty:
            stream.write("\r" + bar + ("\n" if done == total else ""))
        elif 10 * done // max(total, 1) != shown["tenth"] or done == total:
            shown["tenth"] = 10 * done // max(total, 1)
            stream.write(bar + "\n")
        stream.flush()

    return show


def main(model: ModelOptions, file: str, k: int, sampling: dict, out: str | None, suffix: str, pattern: str | None,
         parallel: int, stdout: TextIO | None = None) -> int:
    """`model`: what to open and how (options.ModelOptions, built once by the command line)."""
    from .engine import open_model

    stdout = stdout or sys.stdout
    path = Path(file)
    problems = read_problems(path)  # every line checked before any model loads
    if pattern:
        try:
            re.compile(pattern)
        except re.error as e:
            raise UsageError(f"--pattern is not a regular expression: {e}") from None
    results = Path(out) if out else path.with_name(path.stem + ".results.jsonl")
    m = open_model(model, announce=lambda s: print(s, file=sys.stderr, flush=True))
    params = m.sampling(sampling)
    try:
        s = run_eval(m, problems, params, k, results, suffix, pattern, parallel, progress=stderr_progress(sys.stderr))
    except KeyboardInterrupt:
        print(f"\nr1: interrupted; the finished samples are in {results}: run the same command again to go on",
              file=sys.stderr)
        return 130
    print(format_score(s), file=stdout)
    print(f"per-sample results: {results}", file=sys.stderr)
    return 0
