"""A multiple-choice knowledge check: question files, validation, and scoring through the option letters.

File format (CSV with a header, UTF-8; blank lines skipped). culturalign's own columns:

    id, country, question, option_a, option_b[, option_c, ... option_z], answer[, topic]

- `id`: unique, non-empty; `country`: the culture the question is about (a name such as `Saudi Arabia`,
  or a code such as `SA`), non-empty; `question`: non-empty.
- `option_a`, `option_b`, ...: consecutive letters from `a`. A question has 2 or more options; a row
  may leave its last option cells empty (fewer options than the file has columns), but not a cell
  between two filled ones.
- `answer`: the letter of the correct option (`A`, `b`, ...), which must be one of the row's options.
- `topic`: optional, free text (kept in the results).

CulturalBench files (Chiu et al. 2024, `kellycyy/CulturalBench` on the Hugging Face hub) are read as
they are:
- CulturalBench-Easy: `question_idx, prompt_question, prompt_option_a..d, answer, country` (answer a
  letter), plus `data_idx` if present, ignored.
- CulturalBench-Hard: one row per (question, option) with `question_idx, prompt_question,
  prompt_option, answer, country` (answer `true`/`false`) and `data_idx`. Rows are grouped by
  `question_idx` into one multiple-choice question, options in file order; a question whose options
  are not exactly one `true` is left out and counted in `skipped` (it has no single answer).

Every problem is one `CulturalignError` naming the file, the row (1 = the first row under the header,
with its line in the file) and the column: a missing column, an answer not among the options, a
duplicated id, an empty file, fewer than two options.

Scoring: each question is one user turn (instruction, question, lettered options, "Answer with one
letter"), the assistant turn pre-filled with `Answer:`, as the survey asks its items. The answer is
the next-token distribution over the option letters, renormalised over the question's own letters;
the prediction is the most likely letter. Questions go to `Backend.option_distributions` in batches
that share the prompt's common prefix, every batch once per soft prompt row (with and without the
prompt in one call).

Long because: this docstring defines the question-file formats (culturalign's and CulturalBench's), and the
reader, its per-cell checks and the scoring that rely on those rules sit beside them.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from culturalign.errors import CulturalignError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FORMATS = ("culturalign", "culturalbench-easy", "culturalbench-hard")
BUILTIN_MCQ = "culturalign/data/heldout/mcq.csv"
INSTRUCTION = "Answer the multiple-choice question below with the letter of the correct option."
_OPTION = re.compile(r"(?:prompt_)?option_([a-z])")
_TRUE, _FALSE = {"true", "yes", "1"}, {"false", "no", "0"}


@dataclass(frozen=True)
class Question:
    id: str
    country: str
    question: str
    options: tuple[str, ...]
    answer: int  # index of the correct option
    topic: str = ""

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


@dataclass
class QuestionSet:
    questions: list[Question]
    source: str  # the file's path, or BUILTIN_MCQ
    format: str  # one of FORMATS
    skipped: list[str] = field(default_factory=list)  # CulturalBench-Hard question ids without exactly one true option

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def max_options(self) -> int:
        return max(len(q.options) for q in self.questions)


def _show(value, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def load_mcq(path: str | Path | None = None) -> QuestionSet:
    """The shipped question set (None) or a user's CSV file (our columns, or CulturalBench-Easy/-Hard)."""
    if path is None:
        text = resources.files("culturalign.data.heldout").joinpath("mcq.csv").read_text("utf-8")
        return parse_mcq(text, BUILTIN_MCQ)
    from culturalign.files import read_text_file

    text = read_text_file(path, "MCQ file", "a CSV file of multiple-choice questions")
    return parse_mcq(text, str(path))


def _table(text: str, where: str) -> tuple[list[str], list[tuple[int, int, list[str]]]]:
    """Header (lower-cased, stripped) and non-blank data rows as (row number, line, cells)."""
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    rows = []
    try:
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip().lower() for c in cells]
                dup = sorted({c for c in header if header.count(c) > 1})
                if dup:
                    raise CulturalignError(f"{where}, header: column(s) {', '.join(map(repr, dup))} appear more than once")
                if "" in header:
                    raise CulturalignError(f"{where}, header: column {header.index('') + 1} has no name")
                continue
            rows.append((len(rows) + 1, reader.line_num, cells))
    except csv.Error as e:
        raise CulturalignError(f"{where}: not a readable CSV file ({e})") from None
    if header is None:
        raise CulturalignError(f"{where}: empty file; expected a CSV header with id, country, question, option_a, "
                               "option_b, ..., answer (or a CulturalBench file)")
    if not rows:
        raise CulturalignError(f"{where}: no questions under the header")
    return header, rows


def _rows(header: list[str], rows, where: str):
    """(row number, line, {column: stripped cell}) for each row; a row of another width is an error."""
    for n, line, cells in rows:
        if len(cells) != len(header):
            raise CulturalignError(f"{where}, row {n} (line {line}): {len(cells)} cell(s) but the header has "
                                   f"{len(header)} column(s)")
        yield n, line, {h: c.strip() for h, c in zip(header, cells)}


def _format(header: list[str]) -> str:
    if "prompt_option" in header:
        return "culturalbench-hard"
    if "prompt_question" in header or any(h.startswith("prompt_option_") for h in header):
        return "culturalbench-easy"
    return "culturalign"


def _option_columns(header: list[str], where: str, prefix: str) -> list[str]:
    """The option columns, checked to be consecutive letters from a."""
    letters = sorted(m.group(1) for h in header if (m := _OPTION.fullmatch(h)) and h.startswith(prefix))
    expected = [c.lower() for c in LETTERS[: len(letters)]]
    if letters != expected:
        gap = next(c for c in expected if c not in letters)
        raise CulturalignError(f"{where}, header: missing column {prefix}{gap}; option columns must be consecutive "
                               f"letters from {prefix}a (found {', '.join(prefix + c for c in letters)})")
    if len(letters) < 2:
        raise CulturalignError(f"{where}, header: fewer than two option columns ({prefix}a, {prefix}b, ...); "
                               "a question needs at least two options")
    return [prefix + c for c in letters]


def parse_mcq(text: str, where: str = "<mcq>") -> QuestionSet:
    """Validate a question file's text (any of FORMATS, told apart by the header) and build the set."""
    header, rows = _table(text, where)
    fmt = _format(header)
    if fmt == "culturalbench-hard":
        return _parse_hard(header, rows, where)
    if fmt == "culturalign":
        cols = {"id": "id", "country": "country", "question": "question", "answer": "answer"}
        prefix, optional = "option_", {"topic"}
    else:
        cols = {"id": "question_idx", "country": "country", "question": "prompt_question", "answer": "answer"}
        prefix, optional = "prompt_option_", {"data_idx"}
    missing = [c for c in cols.values() if c not in header]
    if missing:
        raise CulturalignError(f"{where}, header: missing column(s) {', '.join(missing)} ({fmt} format); expected "
                               f"{', '.join(cols.values())} and {prefix}a, {prefix}b, ...")
    option_cols = _option_columns(header, where, prefix)
    unknown = [h for h in header if h not in cols.values() and h not in option_cols and h not in optional]
    if unknown:
        raise CulturalignError(f"{where}, header: unknown column(s) {', '.join(map(_show, unknown))} ({fmt} format); "
                               f"expected {', '.join(cols.values())}, {prefix}a, {prefix}b, ...{' and optional ' + ', '.join(sorted(optional)) if optional else ''}")
    questions, first_row = [], {}
    for n, line, cells in _rows(header, rows, where):
        loc = f"{where}, row {n} (line {line})"

        def fail(col: str, msg: str):
            raise CulturalignError(f"{loc}, column {col!r}: {msg}")

        qid = cells[cols["id"]]
        if not qid:
            fail(cols["id"], "empty; every question needs an id")
        if qid in first_row:
            fail(cols["id"], f"duplicated id {qid!r} (first used in row {first_row[qid]})")
        first_row[qid] = n
        for key in ("country", "question"):
            if not cells[cols[key]]:
                fail(cols[key], f"empty; every question needs a {key}")
        options = [cells[c] for c in option_cols]
        k = len(options)
        while k and not options[k - 1]:
            k -= 1
        if any(not o for o in options[:k]):
            fail(option_cols[options.index("")], "empty option between filled ones; fill the options from "
                                                 f"{option_cols[0]} on without gaps")
        if k < 2:
            fail(option_cols[1], f"fewer than two options ({k}); a question needs at least two")
        options = options[:k]
        if len({o.casefold() for o in options}) != k:
            fail(option_cols[0], f"options must be distinct, got {_show(options)}")
        ans = cells[cols["answer"]].upper()
        letters = LETTERS[:k]
        if len(ans) != 1 or ans not in letters:
            fail(cols["answer"], f"answer {cells[cols['answer']]!r} is not among the options; expected one letter of "
                                 f"{', '.join(letters)}")
        questions.append(Question(qid, cells[cols["country"]], cells[cols["question"]], tuple(options),
                                  letters.index(ans), cells.get("topic", "")))
    return QuestionSet(questions, where, fmt)


def _parse_hard(header: list[str], rows, where: str) -> QuestionSet:
    cols = ("question_idx", "prompt_question", "prompt_option", "answer", "country")
    missing = [c for c in cols if c not in header]
    if missing:
        raise CulturalignError(f"{where}, header: missing column(s) {', '.join(missing)} (culturalbench-hard format); "
                               f"expected {', '.join(cols)} and optional data_idx")
    unknown = [h for h in header if h not in cols and h != "data_idx"]
    if unknown:
        raise CulturalignError(f"{where}, header: unknown column(s) {', '.join(map(_show, unknown))} "
                               f"(culturalbench-hard format); expected {', '.join(cols)} and optional data_idx")
    groups: dict[str, dict] = {}
    for n, line, cells in _rows(header, rows, where):
        loc = f"{where}, row {n} (line {line})"
        for c in cols:
            if not cells[c]:
                raise CulturalignError(f"{loc}, column {c!r}: empty")
        flag = cells["answer"].lower()
        if flag not in _TRUE | _FALSE:
            raise CulturalignError(f"{loc}, column 'answer': expected true or false, got {_show(cells['answer'])}")
        g = groups.setdefault(cells["question_idx"], {"row": n, "question": cells["prompt_question"],
                                                      "country": cells["country"], "options": [], "true": []})
        if (cells["prompt_question"], cells["country"]) != (g["question"], g["country"]):
            raise CulturalignError(f"{loc}, column 'prompt_question': question_idx {cells['question_idx']!r} has another "
                                   f"question or country in row {g['row']}")
        if cells["prompt_option"].casefold() in {o.casefold() for o in g["options"]}:
            raise CulturalignError(f"{loc}, column 'prompt_option': duplicated option {_show(cells['prompt_option'])} "
                                   f"for question_idx {cells['question_idx']!r}")
        if len(g["options"]) == len(LETTERS):
            raise CulturalignError(f"{loc}, column 'prompt_option': more than {len(LETTERS)} options for question_idx "
                                   f"{cells['question_idx']!r}")
        if flag in _TRUE:
            g["true"].append(len(g["options"]))
        g["options"].append(cells["prompt_option"])
    questions, skipped = [], []
    for qid, g in groups.items():
        if len(g["options"]) < 2:
            raise CulturalignError(f"{where}, row {g['row']}, column 'prompt_option': question_idx {qid!r} has fewer "
                                   "than two options; a question needs at least two")
        if len(g["true"]) != 1:
            skipped.append(qid)
            continue
        questions.append(Question(qid, g["country"], g["question"], tuple(g["options"]), g["true"][0]))
    if not questions:
        raise CulturalignError(f"{where}: no question has exactly one true option; nothing to score")
    return QuestionSet(questions, where, "culturalbench-hard", skipped)


# ---- asking -----------------------------------------------------------------------------------------------

def user_text(q: Question) -> str:
    """The question's user turn: instruction first (shared by every question), then the question and options."""
    options = "\n".join(f"{letter}. {o}" for letter, o in zip(q.letters, q.options))
    letters = q.letters
    choice = f"{', '.join(letters[:-1])} or {letters[-1]}"
    return f"{INSTRUCTION}\n\nQuestion: {q.question}\n{options}\nAnswer with one letter: {choice}."


def encode_questions(tokenizer, questions: list[Question], letters: str) -> tuple[list[list[int]], list[int]]:
    """Token ids of each question's prompt (ending where the letter goes) and the ids of `letters` there."""
    from culturalign.measure.prompts import option_token_ids, render

    texts = [render(tokenizer, None, user_text(q)) for q in questions]
    option_ids, tail = option_token_ids(tokenizer, texts[0], tuple(letters))
    return [tokenizer(t + tail, add_special_tokens=False)["input_ids"] for t in texts], option_ids


@dataclass
class Answers:
    probs: np.ndarray  # [Q, L] over the letters A.. of the longest question, each row renormalised over its own letters
    mass: np.ndarray  # [Q] next-token probability on the question's own letters before renormalising


def ask(backend, qs: QuestionSet, softs: list[torch.Tensor | None], batch_size: int = 16,
        progress: Callable[[int], None] | None = None) -> list[Answers]:
    """Every question asked under each soft prompt in `softs` (None = without one): one `Answers` per entry.

    Questions go in batches of `batch_size`, each batch one `option_distributions` call with a row per
    soft prompt (prefix-shared within the batch). `progress(n)` gets the number of questions answered.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    questions = qs.questions
    letters = LETTERS[: qs.max_options]
    seqs, option_ids = encode_questions(backend.tokenizer, questions, letters)
    rows = [None if s is None else (s if s.dim() == 2 else s[0]) for s in softs]
    probs = np.zeros((len(rows), len(questions), len(letters)))
    mass = np.zeros((len(rows), len(questions)))
    with torch.no_grad():
        for b0 in range(0, len(questions), batch_size):
            chunk = slice(b0, min(len(questions), b0 + batch_size))
            d = backend.option_distributions(backend.prompt_set(seqs[chunk]), option_ids, soft=rows)
            probs[:, chunk] = d.probs.double().cpu().numpy()
            mass[:, chunk] = d.mass.double().cpu().numpy()
            if progress is not None:
                progress(chunk.stop)
    out = []
    for r in range(len(rows)):
        p, m = probs[r].copy(), mass[r].copy()
        for i, q in enumerate(questions):  # renormalise over the question's own letters
            k = len(q.options)
            own = p[i, :k].sum()
            m[i] *= own
            p[i, :k] = p[i, :k] / own if own > 0 else 1.0 / k
            p[i, k:] = 0.0
        if not (np.isfinite(p).all() and np.isfinite(m).all()):
            raise CulturalignError("the model's answer probabilities are NaN or infinite on the MCQ check; its inputs "
                                   "(e.g. a soft prompt) or weights are broken")
        out.append(Answers(p, m))
    return out


def summarize(qs: QuestionSet, ans: Answers) -> dict:
    """Accuracy overall and per country, mean probability of the correct answer, and the answer prior.

    The answer prior is the letter the model favours regardless of the question (the largest mean
    probability over all questions); `prior_accuracy` is the accuracy of always answering it, the
    score a model would get from a letter preference alone.
    """
    gold = np.array([q.answer for q in qs.questions])
    prior = int(ans.probs.mean(0).argmax())
    by_country = {c: {"n": int(idx.sum()), **_scores(qs, ans, idx)}
                  for c in dict.fromkeys(q.country for q in qs.questions)
                  for idx in [np.array([q.country == c for q in qs.questions])]}
    return {
        **_scores(qs, ans), "correct": int((ans.probs.argmax(1) == gold).sum()),
        "mean_option_mass": float(ans.mass.mean()), "prior_letter": LETTERS[prior],
        "prior_accuracy": float((gold == prior).mean()), "by_country": by_country,
    }


def _scores(qs: QuestionSet, ans: Answers, idx: np.ndarray | None = None) -> dict:
    """Accuracy and mean probability of the correct answer over the questions `idx` (a mask; None = all)."""
    gold = np.array([q.answer for q in qs.questions])
    p_gold = ans.probs[np.arange(len(gold)), gold]
    correct = ans.probs.argmax(1) == gold
    if idx is not None:
        p_gold, correct = p_gold[idx], correct[idx]
    return {"accuracy": float(correct.mean()), "mean_p_correct": float(p_gold.mean())}


def country_key(country: str) -> str:
    """ISO alpha-2 code of a country name or code in the built-in target set, else the casefolded text."""
    from culturalign.measure.targets import load_target_set

    try:
        t = load_target_set().find(country)
    except CulturalignError:
        return country.casefold().strip()
    return (t.iso2 or t.name).casefold()


def run_mcq(backend, qs: QuestionSet, soft: torch.Tensor | None = None, target=None, batch_size: int = 16,
            progress: Callable[[int], None] | None = None) -> dict:
    """The MCQ check without and (when `soft` is given) with the soft prompt, JSON-safe.

    `target` (a Target) names the questions about the target's own country (`target_country`).
    """
    softs = [None] if soft is None else [None, soft]
    answers = ask(backend, qs, softs, batch_size, progress)
    counts = Counter(len(q.options) for q in qs.questions)
    res = {
        "source": qs.source, "format": qs.format, "questions": len(qs), "skipped": len(qs.skipped),
        "options": {str(k): v for k, v in sorted(counts.items())},
        "chance": float(np.mean([1.0 / len(q.options) for q in qs.questions])),
        "without": summarize(qs, answers[0]),
        "with": summarize(qs, answers[1]) if soft is not None else None,
        "target_country": None,
        "items": [],
    }
    for i, q in enumerate(qs.questions):
        entry = {"id": q.id, "country": q.country, "answer": q.answer_letter}
        for name, a in zip(("without", "with"), answers):
            entry[name] = {"predicted": LETTERS[int(a.probs[i].argmax())], "p_correct": round(float(a.probs[i, q.answer]), 6)}
        res["items"].append(entry)
    if target is not None:
        keys = {k.casefold() for k in (target.iso2, target.iso3, target.code, target.name) if k}
        mine = [c for c in res["without"]["by_country"] if c.casefold() in keys or country_key(c) in keys]
        if mine:
            idx = np.array([q.country in mine for q in qs.questions])
            res["target_country"] = {"countries": mine, "n": int(idx.sum())}
            for name, a in zip(("without", "with"), answers + [None]):
                res["target_country"][name] = None if a is None else _scores(qs, a, idx)
    return res
