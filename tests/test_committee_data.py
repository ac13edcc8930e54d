"""The committee's shipped data (cultures, queries, paraphrased VSM variants) and the query loader."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources

import numpy as np
import pytest

from culturalign import CulturalignError, load_instrument
from culturalign.committee.queries import Query, load_queries
from culturalign.measure.targets import load_target_set

REGISTRY = ("SA", "US", "CN", "IN", "DE", "BR", "JP", "MA")
HELD_OUT = ("FR", "MX", "KR", "SE", "TR", "ID", "RU", "NG", "EG", "GB", "IT", "AR", "PK", "PH", "VN", "AU")
CUE_KINDS = ("names", "demonyms", "languages", "cities", "other")
# widely shared languages that must not route to any one culture
SHARED_LANGUAGES = ("English", "Spanish", "Arabic", "French", "Portuguese")


def _cultures() -> dict:
    return json.loads(resources.files("culturalign.data.committee").joinpath("cultures.json").read_text("utf-8"))


CULTURES = _cultures()["cultures"]
BY_CODE = {c["code"]: c for c in CULTURES}
QUERIES = load_queries()


def _cues(culture: dict) -> list[str]:
    return [cue for kind in CUE_KINDS for cue in culture["cues"][kind]]


def _hits(cue: str, text: str) -> bool:
    """Case-insensitive whole-word match (lookarounds, so cues that end in punctuation also work)."""
    return re.search(rf"(?<!\w){re.escape(cue)}(?!\w)", text, re.IGNORECASE) is not None


def _cultures_named(text: str) -> set[str]:
    return {c["code"] for c in CULTURES if any(_hits(cue, text) for cue in _cues(c))}


def _group(q: Query) -> str:
    if not q.culture_dependent:
        return "control"
    if q.kind == "open":
        return "open-tagged" if q.culture else "open-untagged"
    return "value-tagged" if q.culture else "value-untagged"


GROUPS = {g: [q for q in QUERIES if _group(q) == g] for g in ("value-tagged", "value-untagged", "open-tagged", "control")}


# ---------------------------------------------------------------- cultures.json

def test_cultures_schema_and_required_codes():
    data = _cultures()
    assert data["schema"] == "culturalign.cultures/1"
    assert data["provenance"].strip()
    codes = [c["code"] for c in CULTURES]
    assert len(codes) == len(set(codes)), "duplicate culture code"
    assert set(REGISTRY + HELD_OUT) <= set(codes)


@pytest.mark.parametrize("target_set", ["hofstede-2015"])
def test_every_culture_code_is_in_the_target_set(target_set):
    iso2 = {t.iso2 for t in load_target_set(target_set).targets if t.iso2}
    missing = [c["code"] for c in CULTURES if c["code"] not in iso2]
    assert not missing, f"codes not in {target_set}: {missing}"


def test_culture_names_match_the_target_set():
    """The readable name is the target set's name or one of its aliases (so a code never points at the wrong row)."""
    by_iso = {t.iso2: t for t in load_target_set("hofstede-2015").targets if t.iso2}
    for c in CULTURES:
        t = by_iso[c["code"]]
        assert c["name"] in (t.name, *t.aliases), (c["code"], c["name"], t.name)


@pytest.mark.parametrize("code", [c["code"] for c in CULTURES])
def test_culture_entry_is_complete(code):
    c = BY_CODE[code]
    assert set(c) == {"code", "name", "region", "description", "cues"}
    assert set(c["cues"]) == set(CUE_KINDS)
    assert c["name"] and c["region"]
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", c["description"].strip()) if s]
    assert 2 <= len(sentences) <= 3, sentences
    assert not re.search(r"\d", c["description"]), "descriptions carry no numbers (no Hofstede scores)"
    cues = c["cues"]
    assert len(cues["names"]) >= 2
    assert cues["demonyms"]
    assert len(cues["cities"]) >= 4
    assert len(cues["other"]) >= 3
    for kind in CUE_KINDS:
        assert all(isinstance(x, str) and x.strip() == x and x for x in cues[kind]), kind
        assert len({x.casefold() for x in cues[kind]}) == len(cues[kind]), f"duplicate cue in {kind}"
    assert not set(cues["languages"]) & set(SHARED_LANGUAGES)


def test_no_cue_routes_to_two_cultures():
    """No cue of one culture matches (as a whole word) inside a cue of another: each cue names one culture."""
    clashes = [
        (a["code"], x, b["code"], y)
        for a in CULTURES for b in CULTURES if a is not b
        for x in _cues(a) for y in _cues(b) if _hits(x, y)
    ]
    assert not clashes


# ---------------------------------------------------------------- queries.jsonl

def test_query_ids_unique_and_total():
    assert len(QUERIES) >= 150
    assert len({q.id for q in QUERIES}) == len(QUERIES)
    assert not [q for q in QUERIES if _group(q) == "open-untagged"], "every culture-dependent open question names a culture"


def test_id_prefix_names_the_group():
    """The documented id prefixes (PROVENANCE.md) agree with the fields that define each group."""
    prefix = {"value-tagged": "val-tag-", "value-untagged": "val-gen-", "open-tagged": "open-tag-", "control": "ctrl-"}
    wrong = [q.id for q in QUERIES if not q.id.startswith(prefix[_group(q)])]
    assert not wrong


@pytest.mark.parametrize("group,minimum", [("value-tagged", 50), ("value-untagged", 30), ("open-tagged", 40), ("control", 30)])
def test_group_sizes(group, minimum):
    assert len(GROUPS[group]) >= minimum


@pytest.mark.parametrize("code", REGISTRY)
def test_tagged_values_cover_registry_culture(code):
    assert sum(q.culture == code for q in GROUPS["value-tagged"]) >= 5


def test_tagged_values_include_held_out_cultures():
    assert len({q.culture for q in GROUPS["value-tagged"]} & set(HELD_OUT)) >= 8


def test_open_questions_cover_ten_cultures_incl_registry():
    cultures = {q.culture for q in GROUPS["open-tagged"]}
    assert len(cultures) >= 10
    assert set(REGISTRY) <= cultures


def test_value_questions_have_options_and_open_ones_do_not():
    for q in GROUPS["value-tagged"] + GROUPS["value-untagged"]:
        assert q.kind in ("likert", "choice") and q.has_options and 2 <= len(q.options) <= 6, q.id
    for q in GROUPS["open-tagged"]:
        assert q.options is None and not q.has_options, q.id


def test_controls_split_between_choice_and_open():
    kinds = Counter(q.kind for q in GROUPS["control"])
    assert set(kinds) == {"choice", "open"}
    assert min(kinds.values()) >= len(GROUPS["control"]) // 3, kinds
    assert all(q.culture is None for q in GROUPS["control"])


@pytest.mark.parametrize("q", QUERIES, ids=lambda q: q.id)
def test_query_is_short_and_topical(q):
    assert len(q.text.split()) < 40
    assert q.topic


@pytest.mark.parametrize("q", [q for q in QUERIES if q.culture], ids=lambda q: q.id)
def test_tagged_query_names_its_culture_and_no_other(q):
    assert q.culture in BY_CODE, f"{q.id}: culture {q.culture} is not in cultures.json"
    assert _cultures_named(q.text) == {q.culture}, q.text


@pytest.mark.parametrize("q", [q for q in QUERIES if q.culture is None], ids=lambda q: q.id)
def test_untagged_query_names_no_culture(q):
    """Neutral controls and untagged value questions contain no cue of any culture."""
    assert _cultures_named(q.text) == set(), q.text


def test_tagged_values_name_cultures_in_varied_ways():
    """Cultures are named through countries, demonyms, cities, languages and customs, not one pattern only."""
    kinds_used = set()
    for q in GROUPS["value-tagged"]:
        for kind in CUE_KINDS:
            if any(_hits(cue, q.text) for cue in BY_CODE[q.culture]["cues"][kind]):
                kinds_used.add(kind)
    assert kinds_used == set(CUE_KINDS)


# ---------------------------------------------------------------- paraphrased instruments

@pytest.mark.parametrize("variant", ["vsm2013-para-a", "vsm2013-para-b"])
def test_paraphrase_scores_exactly_like_vsm2013(variant):
    orig, para = load_instrument("vsm2013"), load_instrument(variant)
    assert para.id == variant
    assert np.array_equal(para.weights, orig.weights)
    assert para.constants() == orig.constants()
    assert para.codes == orig.codes
    assert para.item_ids == orig.item_ids
    assert para.dims == orig.dims
    assert [it.options for it in para.items] == [it.options for it in orig.items]
    assert [it.section is None for it in para.items] == [it.section is None for it in orig.items]
    assert para.citation == orig.citation and para.terms_of_use == orig.terms_of_use


@pytest.mark.parametrize("variant", ["vsm2013-para-a", "vsm2013-para-b"])
def test_paraphrase_file_keeps_structure_and_states_provenance(variant):
    files = resources.files("culturalign.data.instruments")
    orig = json.loads(files.joinpath("vsm2013.json").read_text("utf-8"))
    para = json.loads(files.joinpath(f"{variant}.json").read_text("utf-8"))
    for key in ("schema", "answer_codes", "scales", "indices", "citation", "terms_of_use"):
        assert para[key] == orig[key], key
    assert para["indices"]["MAS"]["terms"][1] == {"weight": 35, "plus": 8, "minus": 10}
    assert set(para["sections"]) == set(orig["sections"])
    assert [(it["id"], it["section"], it["scale"]) for it in para["items"]] == \
        [(it["id"], it["section"], it["scale"]) for it in orig["items"]]
    assert para["variant_of"] == "vsm2013"
    assert "paraphrase" in para["provenance"] and "Hofstede" in para["provenance"]


def _norm(s: str) -> str:
    return " ".join(re.findall(r"\w+", s.casefold()))


def test_paraphrases_differ_from_original_and_each_other():
    inst = {v: load_instrument(v) for v in ("vsm2013", "vsm2013-para-a", "vsm2013-para-b")}
    texts = {v: [_norm(it.text) for it in i.items] for v, i in inst.items()}
    sections = {v: {_norm(it.section) for it in i.items if it.section} for v, i in inst.items()}
    for a, b in (("vsm2013", "vsm2013-para-a"), ("vsm2013", "vsm2013-para-b"), ("vsm2013-para-a", "vsm2013-para-b")):
        same = [k + 1 for k, (x, y) in enumerate(zip(texts[a], texts[b])) if x == y]
        assert not same, f"{a} and {b} share the wording of items {same}"
        assert not sections[a] & sections[b], f"{a} and {b} share a section instruction"
        assert len(sections[b]) == 3


# ---------------------------------------------------------------- loader

GOOD = {"id": "q1", "kind": "choice", "text": "Pick one.", "options": ["a", "b"], "culture": None,
        "culture_dependent": False, "topic": "x"}


def _line(**changes) -> str:
    row = {**GOOD, **changes}
    return json.dumps({k: v for k, v in row.items() if v is not _DROP})


_DROP = object()


def test_user_jsonl_round_trip(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join([
        _line(),
        "",
        _line(id="q2", kind="open", options=_DROP, culture="jp", culture_dependent=True, topic=_DROP),
        "   ",
        _line(id="q3", kind="likert", options=["yes", "maybe", "no"], culture=_DROP),
    ]) + "\n", "utf-8")
    got = load_queries(p)
    assert [q.id for q in got] == ["q1", "q2", "q3"]
    assert got[0] == Query("q1", "choice", "Pick one.", ("a", "b"), None, False, "x")
    assert got[1].culture == "JP" and got[1].options is None and not got[1].has_options and got[1].topic == ""
    assert got[2].options == ("yes", "maybe", "no") and got[2].culture is None


def test_user_csv(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text(
        "id,kind,text,options,culture,culture_dependent,topic\n"
        "c1,likert,\"How important, really?\",high|medium|low,DE,true,work\n"
        "\n"
        "c2,open,What is 2+2?,,,false,arithmetic\n", "utf-8")
    got = load_queries(str(p))
    assert got == [
        Query("c1", "likert", "How important, really?", ("high", "medium", "low"), "DE", True, "work"),
        Query("c2", "open", "What is 2+2?", None, None, False, "arithmetic"),
    ]


BAD_JSONL = {
    "invalid_json": ("line 2", ["{\"id\": \"q2\", "]),
    "not_object": ("line 2", ["[1, 2]"]),
    "missing_id": ("'id'", [_line(id=_DROP)]),
    "empty_id": ("'id'", [_line(id="  ")]),
    "numeric_id": ("'id'", [_line(id=7)]),
    "missing_text": ("'text'", [_line(id="q2", text=_DROP)]),
    "empty_text": ("'text'", [_line(id="q2", text="")]),
    "duplicate_id": ("duplicate", [_line()]),
    "unknown_kind": ("'kind'", [_line(id="q2", kind="rating")]),
    "choice_without_options": ("'options'", [_line(id="q2", options=_DROP)]),
    "likert_null_options": ("'options'", [_line(id="q2", kind="likert", options=None)]),
    "single_option": ("'options'", [_line(id="q2", options=["only"])]),
    "seven_options": ("'options'", [_line(id="q2", options=list("abcdefg"))]),
    "duplicate_options": ("'options'", [_line(id="q2", options=["yes", "Yes"])]),
    "empty_option": ("'options'", [_line(id="q2", options=["yes", " "])]),
    "options_not_list": ("'options'", [_line(id="q2", options="a|b")]),
    "open_with_options": ("'options'", [_line(id="q2", kind="open")]),
    "culture_three_letters": ("'culture'", [_line(id="q2", culture="JPN")]),
    "culture_number": ("'culture'", [_line(id="q2", culture=81)]),
    "culture_dependent_string": ("'culture_dependent'", [_line(id="q2", culture_dependent="yes")]),
    "culture_dependent_missing": ("'culture_dependent'", [_line(id="q2", culture_dependent=_DROP)]),
    "culture_dependent_int": ("'culture_dependent'", [_line(id="q2", culture_dependent=1)]),
    "topic_not_string": ("'topic'", [_line(id="q2", topic=["a"])]),
    "unknown_field": ("'answer'", [json.dumps({**GOOD, "id": "q2", "answer": "a"})]),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_malformed_jsonl_row_is_a_one_line_error_naming_file_and_line(tmp_path, case):
    needle, lines = BAD_JSONL[case]
    p = tmp_path / f"bad-{case}.jsonl"
    p.write_text("\n".join([_line()] + lines) + "\n", "utf-8")
    with pytest.raises(CulturalignError) as e:
        load_queries(p)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg
    assert "line 2" in msg and needle in msg, msg


BAD_CSV = {
    "unknown_column": ("line 1", "id,kind,text,options,culture,culture_dependent,answer\n"),
    "missing_column": ("line 1", "id,kind,text\nq1,open,Hi?\n"),
    "bad_boolean": ("'culture_dependent'", "id,kind,text,options,culture,culture_dependent\nq1,open,Hi?,,,maybe\n"),
    "single_option": ("'options'", "id,kind,text,options,culture,culture_dependent\nq1,choice,Hi?,one,,false\n"),
    "empty_option": ("'options'", "id,kind,text,options,culture,culture_dependent\nq1,choice,Hi?,one|,,false\n"),
    "extra_cells": ("line 2", "id,kind,text,options,culture,culture_dependent\nq1,open,Hi?,,,false,x,y\n"),
    "bad_culture": ("'culture'", "id,kind,text,options,culture,culture_dependent\nq1,open,Hi?,,Japan,true\n"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSV))
def test_malformed_csv_is_a_one_line_error_naming_file(tmp_path, case):
    needle, text = BAD_CSV[case]
    p = tmp_path / f"bad-{case}.csv"
    p.write_text(text, "utf-8")
    with pytest.raises(CulturalignError) as e:
        load_queries(p)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg and needle in msg, msg


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"], ids=["empty", "blank_lines"])
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_empty_file_is_an_error(tmp_path, content, suffix):
    p = tmp_path / f"empty{suffix}"
    p.write_bytes(content)
    with pytest.raises(CulturalignError, match="no queries") as e:
        load_queries(p)
    assert str(p) in str(e.value)


def test_non_utf8_file_is_an_error(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes('{"id": "q1", "kind": "open", "text": "caf\u00e9?", "culture_dependent": false}\n'.encode("latin-1"))
    with pytest.raises(CulturalignError, match="UTF-8") as e:
        load_queries(p)
    assert str(p) in str(e.value)


def test_folder_is_an_error(tmp_path):
    with pytest.raises(CulturalignError, match="folder") as e:
        load_queries(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_missing_file_is_an_error(tmp_path):
    p = tmp_path / "nowhere.jsonl"
    with pytest.raises(CulturalignError, match="not found") as e:
        load_queries(str(p))
    assert "nowhere.jsonl" in str(e.value)


def test_unreadable_file_is_an_error(tmp_path, monkeypatch):
    """A file the user may not read. Reading it is refused by a patched `Path.read_text` rather than by chmod 0,
    which root ignores (and CI runs as root)."""
    import errno
    from pathlib import Path

    p = tmp_path / "locked.jsonl"
    p.write_text(_line() + "\n", "utf-8")
    read_text = Path.read_text

    def refused(self, *args, **kwargs):
        if self == p:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refused)
    with pytest.raises(CulturalignError, match=r"cannot be read \(Permission denied\)") as e:
        load_queries(p)
    assert str(p) in str(e.value)


def test_query_is_frozen():
    q = QUERIES[0]
    with pytest.raises(AttributeError):
        q.text = "changed"  # type: ignore[misc]
