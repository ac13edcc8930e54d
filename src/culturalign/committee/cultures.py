"""The cultures a committee knows: code, name, region, a short description and textual cues.

A cultures file is JSON with schema `culturalign.cultures/1`:
```
{"schema": "culturalign.cultures/1", "provenance": "...",
 "cultures": [{"code": "CN", "name": "China", "region": "East Asia",
   "description": "2-3 sentences about everyday life, customs, family, work, religion, food, festivals",
   "cues": {"names": [...], "demonyms": [...], "languages": [...], "cities": [...], "other": [...]}}]}
```
The shipped file is `culturalign/data/committee/cultures.json`. The router matches cues in a query
(word-boundary, case-insensitive) and compares queries with descriptions; `find_culture` resolves a
user's culture by code, name, alternative name (`cues.names`) or demonym.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from culturalign.errors import CulturalignError

SCHEMA = "culturalign.cultures/1"
CUE_KINDS = ("names", "demonyms", "languages", "cities", "other")
SHIPPED = "committee/cultures.json"  # inside the culturalign.data package
_CODE = re.compile(r"^[A-Z]{2}$")


@dataclass(frozen=True)
class Culture:
    code: str  # ISO 3166 alpha-2, upper case
    name: str
    region: str
    description: str
    cues: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)  # kind -> cue strings

    def all_cues(self) -> list[tuple[str, str]]:
        """(kind, cue) for every cue, in file order (the name itself counts as a name cue)."""
        out = [("names", self.name)]
        for kind in CUE_KINDS:
            out += [(kind, c) for c in self.cues.get(kind, ())]
        return list(dict.fromkeys(out))

    def to_json(self) -> dict:
        return {"code": self.code, "name": self.name, "region": self.region, "description": self.description,
                "cues": {k: list(v) for k, v in self.cues.items()}}


def _fail(where: str, message: str):
    raise CulturalignError(f"{where}: {message}")


def _text(entry: dict, key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        _fail(where, f"field {key!r} is missing or not a non-empty string (got {value!r})")
    return " ".join(value.split())


def parse_cultures(data, where: str) -> list[Culture]:
    """Validate a decoded cultures document; `where` names it in errors (a file path or 'shipped cultures.json')."""
    if not isinstance(data, dict):
        _fail(where, f"expected a JSON object with 'schema' and 'cultures', got {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        _fail(where, f"field 'schema' must be {SCHEMA!r}, got {data.get('schema')!r}")
    if "provenance" in data and not isinstance(data["provenance"], str):
        _fail(where, f"field 'provenance' must be a string, got {type(data['provenance']).__name__}")
    rows = data.get("cultures")
    if not isinstance(rows, list) or not rows:
        _fail(where, "field 'cultures' must be a non-empty list of culture objects")
    out: list[Culture] = []
    codes: dict[str, int] = {}
    names: dict[str, int] = {}
    for i, entry in enumerate(rows, start=1):
        at = f"{where}, cultures[{i}]"
        if not isinstance(entry, dict):
            _fail(at, f"expected an object with code, name, region, description and cues, got {entry!r}"[:300])
        code = entry.get("code")
        if not isinstance(code, str) or not _CODE.match(code.strip().upper()):
            _fail(at, f"field 'code' must be an ISO 3166 alpha-2 code such as 'CN', got {code!r}")
        code = code.strip().upper()
        at = f"{where}, cultures[{i}] ({code})"
        if code in codes:
            _fail(at, f"duplicate code {code!r} (also cultures[{codes[code]}])")
        codes[code] = i
        name = _text(entry, "name", at)
        if name.casefold() in names:
            _fail(at, f"duplicate name {name!r} (also cultures[{names[name.casefold()]}])")
        names[name.casefold()] = i
        region = _text(entry, "region", at)
        description = _text(entry, "description", at)
        raw = entry.get("cues", {})
        if not isinstance(raw, dict):
            _fail(at, f"field 'cues' must be an object mapping {', '.join(CUE_KINDS)} to lists of strings")
        unknown = [k for k in raw if k not in CUE_KINDS]
        if unknown:
            _fail(at, f"field 'cues' has unknown kind(s) {', '.join(map(repr, unknown))}; expected {', '.join(CUE_KINDS)}")
        cues: dict[str, tuple[str, ...]] = {}
        for kind in CUE_KINDS:
            values = raw.get(kind, [])
            if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
                _fail(at, f"field 'cues.{kind}' must be a list of non-empty strings, got {values!r}"[:300])
            cues[kind] = tuple(dict.fromkeys(" ".join(v.split()) for v in values))
        out.append(Culture(code=code, name=name, region=region, description=description, cues=cues))
    return out


def load_cultures(path: str | Path | None = None) -> list[Culture]:
    """The shipped cultures (`path=None`) or a user's cultures file, validated."""
    if path is None:
        where = f"shipped {SHIPPED}"
        ref = resources.files("culturalign.data").joinpath(*SHIPPED.split("/"))
        try:
            text = ref.read_text("utf-8")
        except (OSError, FileNotFoundError):
            raise CulturalignError(f"{where} is missing from the installed culturalign package; reinstall it") from None
    else:
        from culturalign.files import read_text_file

        where = str(Path(path).expanduser())
        text = read_text_file(path, "cultures file", "a JSON file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CulturalignError(f"{where}: not valid JSON ({e})") from None
    return parse_cultures(data, where)


def _keys(cultures: list[Culture]):
    """(rank, casefolded key, culture): code, name, alternative names, demonyms, in that precedence."""
    order = (lambda c: [c.code], lambda c: [c.name], lambda c: c.cues.get("names", ()),
             lambda c: c.cues.get("demonyms", ()))
    for rank, get in enumerate(order):
        for c in cultures:
            for key in get(c):
                yield rank, key.casefold().strip(), c


def find_culture(cultures: list[Culture], query: str) -> Culture:
    """The culture whose code, name, alternative name or demonym is `query` (case-insensitive).

    Precedence when a string fits two cultures: code, name, alternative name, demonym (first in file
    order within each). Unknown strings raise a CulturalignError that lists close matches.
    """
    if not isinstance(query, str) or not query.strip():
        raise CulturalignError(f"culture must be a code or name such as 'CN' or 'China', got {query!r}")
    q = query.casefold().strip()
    best = None
    for rank, key, c in _keys(cultures):
        if key == q and (best is None or rank < best[0]):
            best = (rank, c)
    if best:
        return best[1]
    labels: dict[str, Culture] = {}
    for _, key, c in _keys(cultures):
        labels.setdefault(key, c)
    close = difflib.get_close_matches(q, list(labels), n=8, cutoff=0.5)
    shown = list(dict.fromkeys(f"{labels[k].name} ({labels[k].code})" for k in close))[:5]
    hint = f"; closest matches: {', '.join(shown)}" if shown else ""
    known = ", ".join(c.code for c in cultures[:30]) + (", ..." if len(cultures) > 30 else "")
    raise CulturalignError(f"unknown culture {query!r}{hint}. Known cultures: {known}")
