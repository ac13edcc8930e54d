"""The uniform floor (`survey.uniform_result`) and the specificity controls, on known numbers (no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from culturalign import load_instrument, load_target
from culturalign.instrument import parse_instrument
from culturalign.survey import uniform_result
from culturalign.targets import Target

DIMS = ["PDI", "IDV", "MAS", "UAI", "LTO", "IVR"]


# ---- the uniform floor ----------------------------------------------------------------------------------------

def test_uniform_profile_scores_the_constants():
    vsm = load_instrument("vsm2013")
    cn = load_target("CN")
    r = uniform_result(vsm, cn, {"PDI": 50, "ivr": -5})
    assert r.indices == {"PDI": 50.0, "IDV": 0.0, "MAS": 0.0, "UAI": 0.0, "LTO": 0.0, "IVR": -5.0}
    assert r.constants == r.indices
    assert (r.prompt, r.mode, r.model) == ("uniform", "uniform", "uniform")
    assert [it["id"] for it in r.items] == list(range(1, 25))
    assert all(it["probs"] == [0.2] * 5 and it["mean"] == 3.0 and it["option_mass"] == 1.0 for it in r.items)
    assert r.mean_option_mass == 1.0
    assert r.l1 == abs(80 - 50) + 20 + 66 + 30 + 87 + abs(24 + 5) and r.l1_dims == DIMS
    data = json.loads(json.dumps(r.to_json()))  # the survey schema, strict JSON
    assert data["l1"] == r.l1 and data["seconds"] == 0.0 and data["target"] == cn.to_json()
    assert uniform_result(vsm).l1 is None and uniform_result(vsm).indices == {d: 0.0 for d in DIMS}


def test_uniform_profile_goes_through_the_instruments_formulas():
    """A 4-point instrument with its own constant, and a term that is not a difference of two means of one scale:
    the floor is what the formulas give for item means (1+2+3+4)/4, not a hard-coded number."""
    data = {"schema": "culturalign.instrument/1", "id": "four", "name": "four", "answer_codes": [1, 2, 3, 4],
            "scales": {"s": ["a", "b", "c", "d"]},
            "items": [{"id": 1, "text": "x", "scale": "s"}, {"id": 2, "text": "y", "scale": "s"}],
            "indices": {"AB": {"terms": [{"weight": 10, "plus": 1, "minus": 2}], "constant": 7}}}
    inst = parse_instrument(data)
    r = uniform_result(inst, Target("T", {"AB": 10.0}))
    assert r.indices == {"AB": 7.0} and r.l1 == 3.0
    assert all(it["probs"] == [0.25] * 4 and it["mean"] == 2.5 for it in r.items)
    assert uniform_result(inst, constants={"AB": -1}).indices == {"AB": -1.0}
    # and the same as scoring the means directly
    assert r.indices["AB"] == pytest.approx(float(inst.score(np.full(2, 2.5))[0]))
