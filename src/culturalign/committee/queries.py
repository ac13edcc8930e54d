"""Query sets for the committee: questions to route, answer and score.

A query file is JSON Lines (one object per line, blank lines skipped) with the fields
    id, kind, text, options, culture, culture_dependent, topic
or a CSV with those columns, where `options` are separated by `|`. `kind` is `likert` (ordered
options), `choice` (unordered options) or `open` (free text, no options); `culture` is the ISO 3166
alpha-2 code of the culture the text names, or null; `culture_dependent` says whether a reasonable
answer depends on the culture. The shipped set is `data/committee/queries.jsonl` (see PROVENANCE.md there).
Every problem is a one-line `CulturalignError` naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from culturalign.errors import CulturalignError

FIELDS = ("id", "kind", "text", "options", "culture", "culture_dependent", "topic")
REQUIRED_COLUMNS = ("id", "kind", "text", "culture_dependent")
KINDS = ("likert", "choice", "open")
MIN_OPTIONS, MAX_OPTIONS = 2, 6
BUILTIN_QUERIES = "culturalign/data/committee/queries.jsonl"
_CODE = re.compile(r"[A-Za-z]{2}")
_TRUE, _FALSE = {"true", "yes", "1"}, {"false", "no", "0"}


@dataclass(frozen=True)
class Query:
    id: str
    kind: str
    text: str
    options: tuple[str, ...] | None
    culture: str | None
    culture_dependent: bool
    topic: str = ""

    @property
    def has_options(self) -> bool:
        return self.options is not None


def _show(value, limit: int = 60) -> str:
    """repr on one line, shortened: safe to put in a one-line error message."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def load_queries(path: str | Path | None = None) -> list[Query]:
    """The shipped query set (None), or a user's JSONL file (a `.csv` file is read as CSV)."""
    if path is None:
        text = resources.files("culturalign.data.committee").joinpath("queries.jsonl").read_text("utf-8")
        return _build(_jsonl_rows(text, BUILTIN_QUERIES), BUILTIN_QUERIES)
    from culturalign.files import read_text_file

    p = Path(path)
    text = read_text_file(p, "query file", "a JSONL or CSV file of queries")
    rows = _csv_rows(text, str(p)) if p.suffix.lower() == ".csv" else _jsonl_rows(text, str(p))
    return _build(rows, str(p))


def _jsonl_rows(text: str, where: str):
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CulturalignError(f"{where}, line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise CulturalignError(f"{where}, line {n}: expected a JSON object with fields {', '.join(FIELDS)}; "
                                   f"got {type(obj).__name__} {_show(obj)}")
        yield n, obj


def _csv_rows(text: str, where: str):
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() if isinstance(h, str) else h for h in (reader.fieldnames or [])]
    if not header:
        return
    unknown = [h for h in header if h not in FIELDS]
    if unknown:
        raise CulturalignError(f"{where}, line 1: unknown column(s) {', '.join(map(_show, unknown))}; "
                               f"expected columns {', '.join(FIELDS)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise CulturalignError(f"{where}, line 1: missing column(s) {', '.join(missing)}; expected columns {', '.join(FIELDS)}")
    reader.fieldnames = header
    for raw in reader:
        n = reader.line_num
        if None in raw:
            raise CulturalignError(f"{where}, line {n}: more cells than the {len(header)} header columns")
        cells = {k: (v.strip() if isinstance(v, str) else "") for k, v in raw.items()}
        if not any(cells.values()):
            continue
        obj = {k: v for k, v in cells.items() if k in ("id", "kind", "text", "topic")}
        obj["options"] = [o.strip() for o in cells["options"].split("|")] if cells.get("options") else None
        obj["culture"] = cells.get("culture") or None
        flag = cells.get("culture_dependent", "")
        obj["culture_dependent"] = True if flag.lower() in _TRUE else False if flag.lower() in _FALSE else flag
        yield n, obj


def _build(rows, where: str) -> list[Query]:
    out: list[Query] = []
    first_line: dict[str, int] = {}
    for n, obj in rows:
        loc = f"{where}, line {n}"

        def fail(field: str, msg: str):
            raise CulturalignError(f"{loc}, field {field!r}: {msg}")

        unknown = sorted(set(obj) - set(FIELDS))
        if unknown:
            raise CulturalignError(f"{loc}: unknown field(s) {', '.join(map(_show, unknown))}; expected only {', '.join(FIELDS)}")
        qid = obj.get("id")
        if not isinstance(qid, str) or not qid.strip():
            fail("id", f"expected a non-empty string, got {_show(qid)}")
        qid = qid.strip()
        if qid in first_line:
            fail("id", f"duplicate id {qid!r} (first used on line {first_line[qid]})")
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            fail("text", f"expected a non-empty string, got {_show(text)}")
        kind = obj.get("kind")
        if kind not in KINDS:
            fail("kind", f"expected one of {', '.join(KINDS)}, got {_show(kind)}")
        options = obj.get("options")
        if kind == "open":
            if options is not None:
                fail("options", "an open question takes no options; leave the field out or set it to null")
        else:
            if not isinstance(options, list):
                fail("options", f"a {kind} question needs a list of {MIN_OPTIONS}-{MAX_OPTIONS} options, got {_show(options)}")
            if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
                fail("options", f"a {kind} question needs {MIN_OPTIONS}-{MAX_OPTIONS} options, got {len(options)}")
            if not all(isinstance(o, str) and o.strip() for o in options):
                fail("options", f"every option must be a non-empty string, got {_show(options)}")
            options = [o.strip() for o in options]
            if len({o.casefold() for o in options}) != len(options):
                fail("options", f"options must be distinct, got {_show(options)}")
            options = tuple(options)
        culture = obj.get("culture")
        if culture is not None:
            if not isinstance(culture, str) or not _CODE.fullmatch(culture.strip()):
                fail("culture", f"expected an ISO 3166 alpha-2 code such as 'JP', or null; got {_show(culture)}")
            culture = culture.strip().upper()
        if "culture_dependent" not in obj:
            fail("culture_dependent", "missing; expected true or false")
        dep = obj["culture_dependent"]
        if not isinstance(dep, bool):
            fail("culture_dependent", f"expected true or false, got {_show(dep)}")
        topic = obj.get("topic")
        if topic is not None and not isinstance(topic, str):
            fail("topic", f"expected a string, got {_show(topic)}")
        first_line[qid] = n
        out.append(Query(qid, kind, text.strip(), options, culture, dep, (topic or "").strip()))
    if not out:
        raise CulturalignError(f"{where}: no queries; expected one JSON object per line (or CSV rows under a header)")
    return out
