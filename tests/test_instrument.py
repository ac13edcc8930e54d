import copy
import json

import numpy as np
import pytest
import torch

from culturalign import CulturalignError, load_instrument
from culturalign.measure.instrument import parse_instrument

# item means m01..m24 (1-based) for the hand computation below
MEANS = [2.1, 1.8, 2.4, 1.6, 2.0, 1.5, 2.7, 2.2, 2.9, 2.3, 2.6, 3.1,
         1.9, 2.5, 3.2, 2.8, 3.0, 1.7, 2.2, 3.4, 2.4, 1.9, 3.3, 2.6]
# PDI = 35(m07 - m02) + 25(m20 - m23) = 35(2.7 - 1.8) + 25(3.4 - 3.3) = 31.5 + 2.5
# IDV = 35(m04 - m01) + 35(m09 - m06) = 35(1.6 - 2.1) + 35(2.9 - 1.5) = -17.5 + 49.0
# MAS = 35(m05 - m03) + 35(m08 - m10) = 35(2.0 - 2.4) + 35(2.2 - 2.3) = -14.0 - 3.5
# UAI = 40(m18 - m15) + 25(m21 - m24) = 40(1.7 - 3.2) + 25(2.4 - 2.6) = -60.0 - 5.0
# LTO = 40(m13 - m14) + 25(m19 - m22) = 40(1.9 - 2.5) + 25(2.2 - 1.9) = -24.0 + 7.5
# IVR = 35(m12 - m11) + 40(m17 - m16) = 35(3.1 - 2.6) + 40(3.0 - 2.8) = 17.5 + 8.0
EXPECTED = {"PDI": 34.0, "IDV": 31.5, "MAS": -17.5, "UAI": -65.0, "LTO": -16.5, "IVR": 25.5}


def test_builtin_vsm2013_shape(vsm):
    assert vsm.id == "vsm2013"
    assert len(vsm.items) == 24
    assert vsm.item_ids == list(range(1, 25))
    assert vsm.dims == ["PDI", "IDV", "MAS", "UAI", "LTO", "IVR"]
    assert vsm.codes == (1, 2, 3, 4, 5)
    assert all(len(it.options) == 5 for it in vsm.items)
    assert vsm.items[0].section and "ideal job" in vsm.items[0].section
    assert vsm.items[14].section is None  # item 15: no shared instruction


def test_formulas_hand_computed(vsm):
    got = vsm.score_dict(MEANS)
    assert got.keys() == EXPECTED.keys()
    for d, v in EXPECTED.items():
        assert got[d] == pytest.approx(v, abs=1e-9), d


def test_mas_uses_35_not_25(vsm):
    # only m08 differs from m10: MAS moves by 35 per unit
    m = np.full(24, 3.0)
    m[7] = 4.0  # m08
    s = vsm.score_dict(m)
    assert s["MAS"] == pytest.approx(35.0)
    assert all(s[d] == pytest.approx(0.0) for d in ("PDI", "IDV", "UAI", "LTO", "IVR"))


def test_weight_matrix_entries(vsm):
    w = vsm.weights
    assert w.shape == (6, 24)
    expected = {
        "PDI": {7: 35, 2: -35, 20: 25, 23: -25}, "IDV": {4: 35, 1: -35, 9: 35, 6: -35},
        "MAS": {5: 35, 3: -35, 8: 35, 10: -35}, "UAI": {18: 40, 15: -40, 21: 25, 24: -25},
        "LTO": {13: 40, 14: -40, 19: 25, 22: -25}, "IVR": {12: 35, 11: -35, 17: 40, 16: -40},
    }
    for i, d in enumerate(vsm.dims):
        row = np.zeros(24)
        for item, weight in expected[d].items():
            row[item - 1] = weight
        np.testing.assert_array_equal(w[i], row, err_msg=d)


def test_constant_answers_score_constants(vsm):
    for v in (1.0, 3.0, 5.0):
        assert vsm.score_dict(np.full(24, v)) == pytest.approx({d: 0.0 for d in vsm.dims})


def test_constants_default_zero_and_overrides(vsm):
    assert vsm.constants() == {d: 0.0 for d in vsm.dims}
    c = vsm.constants({"pdi": 50, "IVR": -10.5})
    assert c == {"PDI": 50.0, "IDV": 0.0, "MAS": 0.0, "UAI": 0.0, "LTO": 0.0, "IVR": -10.5}
    got = vsm.score_dict(MEANS, {"PDI": 50, "IVR": -10.5})
    assert got["PDI"] == pytest.approx(84.0)
    assert got["IVR"] == pytest.approx(15.0)
    assert got["MAS"] == pytest.approx(-17.5)


def test_unknown_constant_is_error(vsm):
    with pytest.raises(CulturalignError, match="XYZ"):
        vsm.constants({"XYZ": 1})
    with pytest.raises(CulturalignError):
        vsm.score(MEANS, {"PDX": 1})


def test_wrong_number_of_means_is_error(vsm):
    with pytest.raises(CulturalignError, match="24"):
        vsm.score(MEANS[:23])


def test_batched_numpy(vsm):
    batch = np.stack([MEANS, np.full(24, 2.0)])
    out = vsm.score(batch)
    assert out.shape == (2, 6)
    np.testing.assert_allclose(out[0], [EXPECTED[d] for d in vsm.dims])
    np.testing.assert_allclose(out[1], 0.0, atol=1e-12)


def test_item20_scale_runs_never_to_always(vsm):
    it20 = vsm.items[19]
    assert it20.id == 20
    assert it20.options == ("never", "seldom", "sometimes", "usually", "always")
    # item 15 runs the other way
    assert vsm.items[14].options[0] == "always" and vsm.items[14].options[-1] == "never"


def test_torch_scores_are_differentiable(vsm):
    m = torch.tensor([MEANS, MEANS], dtype=torch.float64, requires_grad=True)
    out = vsm.score(m, {"PDI": 1.0})
    assert isinstance(out, torch.Tensor) and out.shape == (2, 6)
    assert out[0, 0].item() == pytest.approx(35.0)
    assert out[1, 2].item() == pytest.approx(-17.5)
    out[:, 0].sum().backward()  # PDI
    g = m.grad[0].numpy()
    expected = np.zeros(24)
    expected[[6, 1, 19, 22]] = [35, -35, 25, -25]
    np.testing.assert_allclose(g, expected)
    np.testing.assert_allclose(m.grad[1].numpy(), expected)


def test_torch_float32(vsm):
    out = vsm.score(torch.tensor(MEANS, dtype=torch.float32))
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), [EXPECTED[d] for d in vsm.dims], atol=1e-4)


# ---- user instrument files ----------------------------------------------------------------------

def _user_instrument() -> dict:
    return {
        "schema": "culturalign.instrument/1",
        "id": "mini",
        "name": "A three-item test instrument",
        "answer_codes": [0, 1, 2, 3],
        "scales": {"agree": ["agree", "somewhat agree", "somewhat disagree", "disagree"]},
        "sections": {"s": "How much do you agree?"},
        "items": [
            {"id": 1, "text": "Rules matter.", "scale": "agree", "section": "s"},
            {"id": 2, "text": "Family first.", "scale": "agree", "section": "s"},
            {"id": 5, "text": "Work is life.", "scale": "agree"},
        ],
        "indices": {
            "abc": {"name": "A-B-C", "terms": [{"weight": 10, "plus": 1, "minus": 2}, {"weight": 3, "plus": 5, "minus": 1}],
                    "constant": 7},
            "XY": {"terms": [{"weight": 2.5, "plus": 5, "minus": 2}]},
        },
    }


def _write(tmp_path, data, name="inst.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_user_instrument_loads_and_scores(tmp_path):
    p = _write(tmp_path, _user_instrument())
    inst = load_instrument(str(p))
    assert inst.id == "mini"
    assert inst.codes == (0, 1, 2, 3)
    assert inst.item_ids == [1, 2, 5]
    assert inst.dims == ["ABC", "XY"]
    assert inst.items[0].section == "How much do you agree?"
    assert inst.items[2].section is None
    assert inst.constants() == {"ABC": 7.0, "XY": 0.0}
    # means m1=1.0, m2=0.5, m5=2.0:  ABC = 10(1.0 - 0.5) + 3(2.0 - 1.0) + 7 = 15;  XY = 2.5(2.0 - 0.5) = 3.75
    assert inst.score_dict([1.0, 0.5, 2.0]) == pytest.approx({"ABC": 15.0, "XY": 3.75})
    assert inst.score_dict([1.0, 0.5, 2.0], {"abc": 0}) == pytest.approx({"ABC": 8.0, "XY": 3.75})


def test_parse_instrument_roundtrip_of_builtin_file():
    from importlib import resources

    data = json.loads(resources.files("culturalign.data.instruments").joinpath("vsm2013.json").read_text("utf-8"))
    inst = parse_instrument(data, "x.json")
    assert inst.score_dict(MEANS) == pytest.approx(EXPECTED)


def _mutate(fn):
    d = _user_instrument()
    fn(d)
    return d


BAD = {
    "missing_items": (lambda d: d.pop("items"), "'items'"),
    "missing_indices": (lambda d: d.pop("indices"), "'indices'"),
    "missing_scales": (lambda d: d.pop("scales"), "'scales'"),
    "bad_scale_length": (lambda d: d["scales"].update(agree=["yes", "no", "maybe"]), "scale 'agree'"),
    "empty_scale_label": (lambda d: d["scales"].update(agree=["a", "", "c", "d"]), "scale 'agree'"),
    "undefined_scale": (lambda d: d["items"][1].update(scale="nope"), "items[1]"),
    "undefined_section": (lambda d: d["items"][2].update(section="zzz"), "items[2]"),
    "term_missing_item": (lambda d: d["indices"]["XY"]["terms"][0].update(plus=99), "XY"),
    "term_missing_weight": (lambda d: d["indices"]["abc"]["terms"][0].pop("weight"), "abc"),
    "duplicate_id": (lambda d: d["items"][2].update(id=2), "duplicate item id 2"),
    "non_int_id": (lambda d: d["items"][0].update(id="1"), "items[0]"),
    "empty_text": (lambda d: d["items"][0].update(text=""), "items[0]"),
    "no_terms": (lambda d: d["indices"]["XY"].update(terms=[]), "XY"),
    "wrong_schema": (lambda d: d.update(schema="other/2"), "schema"),
    "non_consecutive_codes": (lambda d: d.update(answer_codes=[1, 2, 4, 5]), "answer_codes"),
    "no_items": (lambda d: d.update(items=[]), "no items"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_instrument_names_file_and_field(tmp_path, case):
    fn, field = BAD[case]
    p = _write(tmp_path, _mutate(fn), f"{case}.json")
    with pytest.raises(CulturalignError) as e:
        load_instrument(str(p))
    msg = str(e.value)
    assert str(p) in msg
    assert field in msg


def test_not_json(tmp_path):
    p = _write(tmp_path, "{ this is not json", "broken.json")
    with pytest.raises(CulturalignError, match="not valid JSON") as e:
        load_instrument(str(p))
    assert str(p) in str(e.value)


def test_missing_file(tmp_path):
    p = tmp_path / "nowhere.json"
    with pytest.raises(CulturalignError, match="not found") as e:
        load_instrument(str(p))
    assert "nowhere.json" in str(e.value)


def test_unknown_builtin_name():
    with pytest.raises(CulturalignError, match="vsm2013"):
        load_instrument("vsm1994")


@pytest.mark.parametrize("case", ["scales_list", "indices_list", "weight_text", "items_not_list"])
def test_wrongly_typed_fields_are_user_errors(tmp_path, case):
    """A file with a field of the wrong JSON type is a user error (one line naming the file), not a crash."""
    d = _user_instrument()
    if case == "scales_list":
        d["scales"] = [["a", "b", "c", "d"]]
    elif case == "indices_list":
        d["indices"] = [{"terms": [{"weight": 1, "plus": 1, "minus": 2}]}]
    elif case == "weight_text":
        d["indices"]["XY"]["terms"][0]["weight"] = "heavy"
    else:
        d["items"] = 5
    p = _write(tmp_path, d, f"{case}.json")
    with pytest.raises(CulturalignError) as e:
        load_instrument(str(p))
    assert str(p) in str(e.value)


def test_builtin_is_not_shared_mutable_state(vsm):
    a = load_instrument()
    a.defaults["PDI"] = 99.0
    assert load_instrument().constants()["PDI"] == 0.0
    assert copy.deepcopy(vsm).constants()["PDI"] == 0.0
