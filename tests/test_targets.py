import json

import pytest

from culturalign import CulturalignError, load_target, load_target_set
from culturalign.measure.targets import DIMS, l1, load_target_file

ALL6 = dict(zip(DIMS, range(6)))


def six(*vals):
    return dict(zip(DIMS, map(float, vals)))


@pytest.fixture(scope="module")
def h2015():
    return load_target_set("hofstede-2015")


@pytest.fixture(scope="module")
def h2023():
    return load_target_set("hofstede-2023")


@pytest.mark.parametrize("query", ["SA", "SAU", "Saudi Arabia", "sa", "sau", "saudi arabia", "  SAUDI ARABIA ", "KSA"])
def test_lookup_saudi_arabia(query):
    assert load_target(query).name == "Saudi Arabia"


@pytest.mark.parametrize("query", ["CN", "CHN", "CHI", "China", "cn", "chn", "chi", "CHINA", "PRC"])
def test_lookup_china(query):
    t = load_target(query)
    assert t.name == "China"
    assert (t.iso2, t.iso3, t.code) == ("CN", "CHN", "CHI")


def test_arab_countries_region(h2015):
    t = h2015.find("Arab countries")
    assert t.kind == "region"
    assert t.scores == six(80, 38, 53, 68, 23, 34)
    assert h2015.find("arab countries") is t
    assert h2015.find("ARA") is t


def test_iso_code_takes_precedence_over_hofstede_code(h2015):
    # SLV is El Salvador's ISO alpha-3 and Slovenia's Hofstede code: ISO wins
    assert h2015.find("SLV").name == "El Salvador"
    assert h2015.find("SI").name == "Slovenia"
    assert h2015.find("SVN").name == "Slovenia"
    assert h2015.find("SAL").name == "El Salvador"


def test_hofstede_2015_has_111_rows(h2015):
    assert len(h2015.targets) == 111
    assert len({t.name for t in h2015.targets}) == 111
    # coverage stated in PROVENANCE.md
    count = {d: sum(d in t.scores for t in h2015.targets) for d in DIMS}
    assert count == {"PDI": 78, "IDV": 78, "MAS": 78, "UAI": 78, "LTO": 96, "IVR": 97}
    assert sum(len(t.scores) == 6 for t in h2015.targets) == 65


def test_iso_codes_unique(h2015, h2023):
    for ts in (h2015, h2023):
        iso2 = [t.iso2 for t in ts.targets if t.iso2]
        iso3 = [t.iso3 for t in ts.targets if t.iso3]
        codes = [t.code for t in ts.targets if t.code]
        assert len(iso2) == len(set(iso2))
        assert len(iso3) == len(set(iso3))
        assert len(codes) == len(set(codes))
        assert all(len(c) == 2 and c.isupper() for c in iso2)
        assert all(len(c) == 3 and c.isupper() for c in iso3)
        # ISO codes only for countries
        assert all(t.kind == "country" for t in ts.targets if t.iso2 or t.iso3)


def test_saudi_arabia_2015_only_lto_ivr(h2015):
    t = h2015.find("SA")
    assert t.scores == {"LTO": 36.0, "IVR": 52.0}
    assert t.missing() == ["PDI", "IDV", "MAS", "UAI"]
    scores = six(10, 20, 30, 40, 50, 60)
    dist, dims = l1(scores, t)
    assert dims == ["LTO", "IVR"]
    assert dist == pytest.approx(abs(50 - 36) + abs(60 - 52))


def test_l1_all_dims_and_none():
    t = load_target("CN")
    dist, dims = l1(six(80, 20, 66, 30, 87, 24), t)
    assert dist == 0.0 and dims == list(DIMS)
    dist, dims = l1(six(81, 18, 66, 30, 90, 20), t)
    assert dist == pytest.approx(1 + 2 + 0 + 0 + 3 + 4)
    assert l1(six(0, 0, 0, 0, 0, 0), None) == (None, [])


def test_hofstede_2023_values(h2023):
    assert h2023.find("SA").scores == six(72, 48, 43, 64, 27, 14)
    assert h2023.find("CN").scores == six(80, 43, 66, 30, 77, 24)
    assert load_target("Saudi Arabia", "hofstede-2023").scores == six(72, 48, 43, 64, 27, 14)
    assert len(h2023.targets) == 10
    assert all(len(t.scores) == 6 for t in h2023.targets)


@pytest.mark.parametrize("query,scores", [
    ("USA", six(40, 91, 62, 46, 26, 68)),
    ("US", six(40, 91, 62, 46, 26, 68)),
    ("United States", six(40, 91, 62, 46, 26, 68)),
    ("JPN", six(54, 46, 95, 92, 88, 42)),
    ("JP", six(54, 46, 95, 92, 88, 42)),
    ("China", six(80, 20, 66, 30, 87, 24)),
    ("Dominican Republic", {"LTO": 13.0, "IVR": 54.0}),
    ("DOM", {"LTO": 13.0, "IVR": 54.0}),
    ("Slovakia", six(104, 52, 110, 51, 77, 28)),
])
def test_spot_values_2015(h2015, query, scores):
    assert h2015.find(query).scores == scores


def test_unknown_country_lists_close_matches(h2015):
    with pytest.raises(CulturalignError) as e:
        h2015.find("Chna")
    msg = str(e.value)
    assert "unknown country" in msg and "'Chna'" in msg
    assert "China" in msg
    assert "hofstede-2015" in msg


def test_unknown_country_without_close_matches(h2015):
    with pytest.raises(CulturalignError, match="unknown country") as e:
        h2015.find("qqqqqqqqqqqq")
    assert "closest" not in str(e.value)


def test_unknown_set():
    with pytest.raises(CulturalignError, match="unknown target set") as e:
        load_target_set("hofstede-1980")
    assert "hofstede-2015" in str(e.value)
    with pytest.raises(CulturalignError, match="unknown target set"):
        load_target("CN", "nope")


def test_no_target():
    with pytest.raises(CulturalignError, match="--country"):
        load_target(None)


def test_to_json():
    t = load_target("CN")
    j = t.to_json()
    assert j["name"] == "China" and j["set"] == "hofstede-2015" and j["code"] == "CHI"
    assert j["scores"] == six(80, 20, 66, 30, 87, 24)
    json.dumps(j)


# ---- custom target files --------------------------------------------------------------------------

def test_custom_csv_single_row(tmp_path):
    p = tmp_path / "mine.csv"
    p.write_text("name,PDI,IDV,lto\nTestland,10,20.5,30\n")
    t = load_target(None, target_file=p)
    assert t.name == "Testland"
    assert t.scores == {"PDI": 10.0, "IDV": 20.5, "LTO": 30.0}
    assert t.set_name == "mine"
    assert load_target("testland", target_file=str(p)) .name == "Testland"


def test_custom_csv_blank_cells_and_bom(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffname,PDI,IDV,MAS,UAI,LTO,IVR\nA,1,,,,,6\n".encode("utf-8"))
    t = load_target(None, target_file=p)
    assert t.scores == {"PDI": 1.0, "IVR": 6.0}


def test_custom_json_list_and_mapping(tmp_path):
    p = tmp_path / "list.json"
    p.write_text(json.dumps([{"name": "Aland", "PDI": 1, "ivr": 2}, {"name": "Bland", "UAI": 3.5}]))
    ts = load_target_file(p)
    assert [t.name for t in ts.targets] == ["Aland", "Bland"]
    assert load_target("bland", target_file=p).scores == {"UAI": 3.5}
    assert load_target("Aland", target_file=p).scores == {"PDI": 1.0, "IVR": 2.0}

    q = tmp_path / "map.json"
    q.write_text(json.dumps({"Cland": {"MAS": 50, "LTO": "60"}}))
    t = load_target(None, target_file=q)
    assert t.name == "Cland" and t.scores == {"MAS": 50.0, "LTO": 60.0}


def test_custom_multi_row_needs_country(tmp_path):
    p = tmp_path / "two.csv"
    p.write_text("name,PDI\nA,1\nB,2\n")
    with pytest.raises(CulturalignError, match="--country") as e:
        load_target(None, target_file=p)
    assert "2 rows" in str(e.value)
    assert load_target("B", target_file=p).scores == {"PDI": 2.0}
    with pytest.raises(CulturalignError, match="unknown country"):
        load_target("C", target_file=p)


BAD_FILES = {
    "non_numeric.csv": ("name,PDI,IDV\nA,10,high\n", ["row 1", "IDV", "high"]),
    "second_row.csv": ("name,PDI\nA,10\nB,ten\n", ["row 2", "PDI", "ten"]),
    "missing_name.csv": ("name,PDI\n,10\n", ["row 1", "name"]),
    "unknown_column.csv": ("name,PDI,XYZ\nA,1,2\n", ["row 1", "xyz"]),
    "no_scores.csv": ("name,PDI,IDV\nA,,\n", ["row 1", "no scores"]),
    "duplicate.csv": ("name,PDI\nA,1\na,2\n", ["row 2", "duplicate"]),
    "no_name_column.csv": ("country,PDI\nA,1\n", ["'name'"]),
    "infinite.csv": ("name,PDI\nA,inf\n", ["row 1", "PDI"]),
    "huge.csv": ("name,PDI\nA,5000\n", ["row 1", "PDI"]),
    "bad.json": ("[{\"name\": \"A\", \"PDI\": 1,}", ["not valid JSON"]),
    "scalar.json": ("42", ["expected a list"]),
    "no_name.json": ("[{\"PDI\": 1}]", ["row 1", "name"]),
    "text_score.json": ("[{\"name\": \"A\", \"PDI\": \"lots\"}]", ["row 1", "PDI", "lots"]),
    "unknown_field.json": ("[{\"name\": \"A\", \"PDI\": 1, \"color\": 2}]", ["row 1", "color"]),
    "no_scores.json": ("[{\"name\": \"A\"}]", ["row 1", "no scores"]),
    "bool_score.json": ("[{\"name\": \"A\", \"PDI\": true}]", ["row 1", "PDI"]),
    "empty.json": ("[]", ["no rows"]),
}


@pytest.mark.parametrize("fname", sorted(BAD_FILES))
def test_bad_target_files_name_file_row_field(tmp_path, fname):
    text, needles = BAD_FILES[fname]
    p = tmp_path / fname
    p.write_text(text)
    with pytest.raises(CulturalignError) as e:
        load_target("A", target_file=p)
    msg = str(e.value)
    assert str(p) in msg
    for n in needles:
        assert n.lower() in msg.lower(), (n, msg)


@pytest.mark.parametrize("value", ["NaN", "1e9", "-Infinity"])
def test_json_scores_are_range_checked_like_csv(tmp_path, value):
    """CSV rejects non-finite scores and |x| > 1000; a JSON number must be held to the same rule."""
    p = tmp_path / "t.json"
    p.write_text(f'[{{"name": "A", "PDI": {value}}}]')
    with pytest.raises(CulturalignError) as e:
        load_target("A", target_file=p)
    assert str(p) in str(e.value) and "pdi" in str(e.value).lower()


def test_missing_target_file(tmp_path):
    p = tmp_path / "none.csv"
    with pytest.raises(CulturalignError, match="not found") as e:
        load_target("A", target_file=p)
    assert "none.csv" in str(e.value)
