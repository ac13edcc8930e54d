"""Target profiles: published Hofstede scores of countries and regions, or a user's own file.

Built-in sets live in `data/targets/<set>.csv` (see PROVENANCE.md there). Look-up accepts ISO 3166
alpha-2 / alpha-3 codes, Hofstede's own codes, names and aliases, case-insensitively. Precedence
when a string means two rows: ISO alpha-2, ISO alpha-3, Hofstede code, name, alias (so `SLV` is
El Salvador's ISO code, not Hofstede's code for Slovenia, which is `SI`/`SVN`/`Slovenia`).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from culturalign.errors import CulturalignError

DIMS = ("PDI", "IDV", "MAS", "UAI", "LTO", "IVR")
BUILTIN_SETS = ("hofstede-2015", "hofstede-2023")
DEFAULT_SET = "hofstede-2015"


@dataclass
class Target:
    name: str
    scores: dict[str, float]  # only the dimensions the source has
    code: str = ""
    iso2: str = ""
    iso3: str = ""
    kind: str = "country"
    aliases: tuple[str, ...] = ()
    source: str = ""
    set_name: str = ""

    def missing(self, dims=DIMS) -> list[str]:
        return [d for d in dims if d not in self.scores]

    @classmethod
    def from_json(cls, data: dict) -> "Target":
        """The inverse of `to_json` (a run's saved target, e.g. for `align --resume`)."""
        return cls(name=data["name"], scores={k: float(v) for k, v in data["scores"].items()}, code=data.get("code", ""),
                   iso2=data.get("iso2", ""), iso3=data.get("iso3", ""), source=data.get("source", ""),
                   set_name=data.get("set", ""))

    def to_json(self) -> dict:
        return {"name": self.name, "set": self.set_name, "code": self.code, "iso2": self.iso2, "iso3": self.iso3,
                "scores": dict(self.scores), "source": self.source}


@dataclass
class TargetSet:
    name: str
    targets: list[Target] = field(default_factory=list)

    def _keys(self):
        order = (
            lambda t: [t.iso2], lambda t: [t.iso3], lambda t: [t.code], lambda t: [t.name], lambda t: list(t.aliases)
        )
        for rank, get in enumerate(order):
            for t in self.targets:
                for k in get(t):
                    if k:
                        yield rank, k.casefold().strip(), t

    def mean_scores(self, dims) -> dict[str, float]:
        """The set's mean score per dimension, over the targets that publish it: the calibrated index constants
        under which a uniform answerer (every index 0 before C) sits at the set's mean."""
        out = {}
        for d in dims:
            vals = [t.scores[d] for t in self.targets if d in t.scores]
            if vals:
                out[d] = float(sum(vals) / len(vals))
        return out

    def find(self, query: str) -> Target:
        q = query.casefold().strip()
        best = None
        for rank, key, t in self._keys():
            if key == q and (best is None or rank < best[0]):
                best = (rank, t)
        if best:
            return best[1]
        labels = {}
        for _, key, t in self._keys():
            labels.setdefault(key, t)
        close = difflib.get_close_matches(q, list(labels), n=8, cutoff=0.5)
        names = list(dict.fromkeys(f"{labels[c].name} ({labels[c].code or labels[c].iso3})" for c in close))[:5]
        hint = f"; closest matches: {', '.join(names)}" if names else ""
        raise CulturalignError(
            f"unknown country or region {query!r} in target set {self.name!r}{hint}. "
            "Run `culturalign countries` for the full list."
        )


MISSING = ("", "#null!", "na", "n/a", "null")  # markers of a score the source does not publish (case-insensitive)


def _number(text: str, where: str) -> float | None:
    text = (text or "").strip()
    if text.casefold() in MISSING:
        return None
    try:
        v = float(text)
    except ValueError:
        raise CulturalignError(f"{where}: expected a number (or an empty cell for a missing score), got {text!r}") from None
    if not math.isfinite(v) or abs(v) > 1000:
        raise CulturalignError(
            f"{where}: expected a finite score (|x| <= 1000; leave the cell empty for a missing score), got {text!r}"
        )
    return v


def _rows_to_set(name: str, rows: list[dict], where: str) -> TargetSet:
    out, seen = TargetSet(name), set()
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise CulturalignError(f"{where}, row {i}: expected an object with 'name' and scores, got {row!r}")
        low = {str(k).strip(): v for k, v in row.items() if k is not None}
        label = str(low.get("name") or "").strip()
        if not label:
            raise CulturalignError(f"{where}, row {i}: field 'name' is missing or empty")
        if label.casefold() in seen:
            raise CulturalignError(f"{where}, row {i}: duplicate name {label!r}")
        seen.add(label.casefold())
        scores = {}
        for key, val in low.items():
            k = key.upper()
            if k in DIMS:
                if isinstance(val, bool) or not (val is None or isinstance(val, (int, float, str))):
                    raise CulturalignError(f"{where}, row {i} ({label}), field {key!r}: expected a number, got {val!r}")
                if isinstance(val, float) and not math.isfinite(val):
                    raise CulturalignError(f"{where}, row {i} ({label}), field {key!r}: expected a finite score, got {val!r}")
                v = _number("" if val is None else str(val),
                            f"{where}, row {i} ({label}), field {key!r}")
                if v is not None:
                    scores[k] = float(v)
        if not scores:
            raise CulturalignError(f"{where}, row {i} ({label}): no scores; expected at least one of {', '.join(DIMS)}")
        aliases = tuple(a.strip() for a in str(low.get("aliases") or "").split("|") if a.strip())
        out.targets.append(
            Target(
                name=label, scores=scores, code=str(low.get("hofstede_code") or "").strip(),
                iso2=str(low.get("iso2") or "").strip(), iso3=str(low.get("iso3") or "").strip(),
                kind=str(low.get("kind") or "country").strip(), aliases=aliases,
                source=str(low.get("source") or where).strip(), set_name=name,
            )
        )
    if not out.targets:
        raise CulturalignError(f"{where}: no rows")
    return out


KNOWN_COLUMNS = {"name", "hofstede_code", "iso2", "iso3", "kind", "aliases", "source", *(d.lower() for d in DIMS)}


def load_target_set(name: str = DEFAULT_SET) -> TargetSet:
    if name not in BUILTIN_SETS:
        raise CulturalignError(f"unknown target set {name!r}; expected one of {', '.join(BUILTIN_SETS)}")
    text = resources.files("culturalign.data.targets").joinpath(f"{name}.csv").read_text("utf-8")
    return _rows_to_set(name, list(csv.DictReader(io.StringIO(text))), name)


def _csv_rows(text: str, p: Path) -> list[dict]:
    """Rows of a CSV with a header; a short or long row, or a repeated column, is an error."""
    try:
        table = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise CulturalignError(f"{p}: not a readable CSV file ({e})") from None
    table = [r for r in table if any(c.strip() for c in r)]  # blank lines
    if not table:
        raise CulturalignError(f"{p}: empty file; expected a CSV header with a 'name' column and any of {', '.join(DIMS)}")
    header = [c.strip().lower() for c in table[0]]
    if "name" not in header:
        raise CulturalignError(f"{p}: expected a CSV header with a 'name' column and any of {', '.join(DIMS)}")
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise CulturalignError(f"{p}: column(s) {', '.join(map(repr, dup))} appear more than once in the header")
    rows = []
    for n, r in enumerate(table[1:], start=1):
        if len(r) != len(header):
            raise CulturalignError(
                f"{p}, row {n}: {len(r)} value(s) but the header has {len(header)} column(s) ({', '.join(header)})"
            )
        rows.append(dict(zip(header, r)))
    return rows


def load_target_file(path: str | Path) -> TargetSet:
    """A user's targets: CSV with a header, or JSON (a list of objects, or {name: {dim: score}})."""
    from culturalign.files import read_text_file

    p = Path(path)
    text = read_text_file(p, "target file", "a CSV or JSON file")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CulturalignError(f"{p}: not valid JSON ({e})") from None
        if isinstance(data, dict):
            data = [{"name": k, **v} if isinstance(v, dict) else {"name": k, "_": v} for k, v in data.items()]
        if not isinstance(data, list):
            raise CulturalignError(f"{p}: expected a list of objects or an object mapping names to scores")
        rows = data
    else:
        rows = _csv_rows(text, p)
    for i, row in enumerate(rows, start=1):
        if isinstance(row, dict):
            unknown = [k for k in row if str(k).strip().lower() not in KNOWN_COLUMNS]
            if unknown:
                raise CulturalignError(
                    f"{p}, row {i}: unknown field(s) {', '.join(map(repr, unknown))}; expected 'name' and any of {', '.join(DIMS)}"
                )
    return _rows_to_set(p.stem, rows, str(p))


def load_target(country: str | None, set_name: str = DEFAULT_SET, target_file: str | Path | None = None) -> Target:
    """Resolve `--country` against a built-in set, or against `--target-file` (its only row if no country)."""
    if country is not None and not country.strip():
        raise CulturalignError("--country '' is empty; expected a country code or name, e.g. CN or China")
    if target_file:
        ts = load_target_file(target_file)
        if country is None:
            if len(ts.targets) == 1:
                return ts.targets[0]
            raise CulturalignError(f"{target_file} has {len(ts.targets)} rows; choose one with --country")
        return ts.find(country)
    if country is None:
        raise CulturalignError("no target: give --country (e.g. CN) or --target-file")
    return load_target_set(set_name).find(country)


def l1(scores: dict[str, float], target: Target | None) -> tuple[float | None, list[str]]:
    """L1 distance over the dimensions the target has (missing ones are left out and not listed)."""
    if target is None:
        return None, []
    dims = [d for d in scores if d in target.scores]
    return float(sum(abs(scores[d] - target.scores[d]) for d in dims)), dims
