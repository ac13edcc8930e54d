"""The uniform floor (`survey.uniform_result`) and the specificity controls, on known numbers (no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from culturalign import load_instrument, load_target
from culturalign.measure.instrument import parse_instrument
from culturalign.measure.survey import uniform_result
from culturalign.measure.targets import Target

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


# ---- experiments: the floor and the cross-target matrix ---------------------------------------------------------

def test_rank_and_specificity_by_hand():
    from culturalign.experiments.report import rank_and_specificity

    assert rank_and_specificity("A", {"A": 10.0, "B": 30.0, "C": 50.0}) == (1, 30.0)  # (30 + 50) / 2 - 10
    assert rank_and_specificity("A", {"A": 20.0, "B": 10.0, "C": 30.0}) == (2, 0.0)
    assert rank_and_specificity("B", {"A": 5.0, "B": 40.0, "C": 40.0}) == (2, -17.5)  # a tie shares the better rank
    assert rank_and_specificity("C", {"A": 1.0, "B": 2.0, "C": 3.0}) == (3, -1.5)
    assert rank_and_specificity("A", {"A": 10.0, "B": None, "C": 20.0}) == (1, 10.0)  # no L1: left out
    assert rank_and_specificity("A", {"A": 10.0}) == (1, None)  # no other target
    assert rank_and_specificity("A", {"A": None, "B": 1.0}) == (None, None)


def _state(tmp_path, code, set_name="hofstede-2015", optimizer="de", seed=0):
    from culturalign.alignment.config import AlignConfig
    from culturalign.experiments.runner import CellState
    from culturalign.experiments.spec import Cell

    t = load_target(code, set_name)
    cell = Cell(f"{code}-{set_name}-{optimizer}-s{seed}", code, t, optimizer, seed, AlignConfig(optimizer=optimizer, budget=12))
    return CellState(cell, tmp_path / cell.name, "done", outcome={"status": "finished"})


def _fake_result(target, aligned: dict, constants=None, with_floor=True) -> dict:
    """A result.json as `align` writes it, with given aligned indices (naive/icl: all 10)."""
    from culturalign.measure.targets import l1

    constants = constants or dict.fromkeys(DIMS, 0.0)

    def prof(ind):
        return {"indices": ind, "l1": l1(ind, target)[0], "mean_option_mass": 0.9}

    profiles = {"naive": prof(dict.fromkeys(DIMS, 10.0)), "icl": prof(dict.fromkeys(DIMS, 10.0)), "aligned": prof(aligned)}
    if with_floor:
        profiles["uniform"] = uniform_result(load_instrument("vsm2013"), target, constants).to_json()
    return {"profiles": profiles, "settings": {"constants": constants}, "evaluations": 12, "search_seconds": 1.0,
            "history": [{"evaluations": 12, "best_l1": prof(aligned)["l1"], "best_loss": prof(aligned)["l1"]}]}


def test_cell_row_cross_target_columns_by_hand(tmp_path):
    """A cell whose aligned profile is exactly China's scores: L1 0 to China, rank 1, and the specificity is the
    mean of its L1s to the US and Saudi Arabia (2023), summed here dimension by dimension."""
    from culturalign.experiments.runner import cell_rows, target_key

    cn, us, sa = load_target("CN"), load_target("US"), load_target("SA", "hofstede-2023")
    grid = [cn, us, sa]
    state = _state(tmp_path, "CN")
    aligned = dict(cn.scores)
    row, _ = cell_rows(state, _fake_result(cn, aligned), DIMS, load_instrument("vsm2013"), grid)
    to_us = sum(abs(cn.scores[d] - us.scores[d]) for d in DIMS)
    to_sa = sum(abs(cn.scores[d] - sa.scores[d]) for d in sa.scores)
    assert [target_key(t) for t in grid] == ["CN-hofstede-2015", "US-hofstede-2015", "SA-hofstede-2023"]
    assert row["l1_to_CN-hofstede-2015"] == 0.0 == row["aligned_l1"]
    assert row["l1_to_US-hofstede-2015"] == to_us and row["l1_to_SA-hofstede-2023"] == to_sa
    assert row["own_rank"] == 1 and row["specificity"] == pytest.approx((to_us + to_sa) / 2)
    assert row["uniform_l1"] == sum(cn.scores.values()) and row["ratio_uniform"] == 0.0

    # a US cell whose aligned profile is China's: the US ranks behind China -> rank 2, negative specificity
    row, _ = cell_rows(_state(tmp_path, "US"), _fake_result(us, aligned), DIMS, load_instrument("vsm2013"), grid)
    assert row["aligned_l1"] == to_us == row["l1_to_US-hofstede-2015"]
    assert row["own_rank"] == (2 if to_sa > to_us else 3)
    assert row["specificity"] == pytest.approx((0.0 + to_sa) / 2 - to_us)


def test_cell_row_floor_is_computed_for_an_older_result(tmp_path):
    """A result.json written before the floor was recorded: the floor comes from the instrument and the run's
    constants, and equals what `align` records now."""
    from culturalign.experiments.runner import cell_rows

    cn = load_target("CN")
    constants = {**dict.fromkeys(DIMS, 0.0), "PDI": 50.0}
    new = _fake_result(cn, dict(cn.scores), constants)
    old = _fake_result(cn, dict(cn.scores), constants, with_floor=False)
    inst = load_instrument("vsm2013")
    a, _ = cell_rows(_state(tmp_path, "CN"), new, DIMS, inst, [cn])
    b, _ = cell_rows(_state(tmp_path, "CN"), old, DIMS, inst, [cn])
    assert a["uniform_l1"] == b["uniform_l1"] == abs(80 - 50) + 20 + 66 + 30 + 87 + 24  # the floor scores C = PDI 50
    assert b["own_rank"] == 1 and b["specificity"] is None  # one grid target: no other to compare with
    c, _ = cell_rows(_state(tmp_path, "CN"), old, DIMS)  # without the instrument nothing is made up
    assert c["uniform_l1"] is None and c["own_rank"] is None and "l1_to_CN-hofstede-2015" not in c


def crafted_cross() -> list[dict]:
    """Three targets A, B, C (set s), de with seeds 0 and 1 on A, adam on A and B; L1s chosen by hand."""
    l1s = {("A", "de", 0): (10.0, 30.0, 50.0), ("A", "de", 1): (20.0, 10.0, 30.0), ("B", "de", 0): (5.0, 40.0, 40.0),
           ("C", "de", 0): (60.0, 50.0, 20.0), ("A", "adam", 0): (30.0, 20.0, 10.0), ("B", "adam", 0): (30.0, 20.0, 10.0)}
    rows = []
    for (code, opt, seed), vals in l1s.items():
        own = vals["ABC".index(code)]
        r = {"cell": f"{code}-s-{opt}-s{seed}", "country": f"Land {code}", "code": code, "set": "s", "optimizer": opt,
             "seed": seed, "status": "finished", "aligned_l1": own, "naive_l1": 100.0 + "ABC".index(code),
             "icl_l1": 90.0, "ratio": own / 100, "uniform_l1": 50.0 + "ABC".index(code), "ratio_uniform": own / 50}
        r.update({f"l1_to_{k}-s": v for k, v in zip("ABC", vals)})
        from culturalign.experiments.report import rank_and_specificity

        r["own_rank"], r["specificity"] = rank_and_specificity(f"{code}-s", {f"{k}-s": v for k, v in zip("ABC", vals)})
        rows.append(r)
    return rows


def test_specificity_matrix_summary_and_report_section(tmp_path):
    from culturalign.experiments.report import (_specificity_section, l1_table, specificity_matrix, specificity_plots,
                                                specificity_summary)

    rows = crafted_cross()
    own, cols, m = specificity_matrix(rows, "de")
    assert own == ["A-s", "B-s", "C-s"] and cols == ["A-s", "B-s", "C-s"]
    assert m == [[15.0, 20.0, 40.0], [5.0, 40.0, 40.0], [60.0, 50.0, 20.0]]  # A: the mean of its two seeds
    assert specificity_matrix(rows, "adam")[0] == ["A-s", "B-s"]
    assert specificity_matrix(rows, "uniform") == (["uniform"], cols, [[50.0, 51.0, 52.0]])
    s = specificity_summary(rows)
    # de: A s0 (rank 1, +30), A s1 (rank 2, 0), B (rank 2, -17.5), C (rank 1, +35)
    assert s["de"]["cells"] == 4 and s["de"]["own_first"] == 2 and s["de"]["mean"] == pytest.approx((30 + 0 - 17.5 + 35) / 4)
    # adam: A (rank 3, 15 - 30 = -15), B (rank 2, 20 - 20 = 0)
    assert s["adam"] == {"cells": 2, "mean": -7.5, "std": pytest.approx(10.6066, abs=1e-4), "own_first": 0}
    text = "\n".join(_specificity_section(rows, {"de": "plots/specificity-de.png"}))
    assert "| de | 4 | +11.9 ± 24.9 | 2/4 (50%) |" in text and "| adam | 2 | -7.5 ± 10.6 | 0/2 (0%) |" in text
    assert "| Land A | **15.0** | 20.0 | 40.0 |" in text and "| Land C | 60.0 | 50.0 | **20.0** |" in text
    assert "| *uniform* | 50.0 | 51.0 | 52.0 |" in text and "| *naive* | 100.0 | 101.0 | 102.0 |" in text
    assert "![specificity, de](plots/specificity-de.png)" in text
    paths = specificity_plots(tmp_path / "plots", rows)
    assert paths == {"de": "plots/specificity-de.png", "adam": "plots/specificity-adam.png"}
    assert (tmp_path / "plots" / "specificity-de.png").read_bytes()[:4] == b"\x89PNG"
    # the L1 table gains the floor as its last column, and a row of ratios to it
    table = l1_table(rows)
    assert table[0] == "| target | set | naive | icl | de | adam | uniform |"
    assert "| Land B | s | 101.0 | 90.0 | 40.0 | 20.0 | 51.0 |" in table
    assert table[-1].startswith("| **aligned / uniform**, all targets | |") and table[-1].endswith("| 1.00 |")


# ---- committee: the wrong-expert matrix and specificity ------------------------------------------------------------

def test_wrong_expert_matrix_and_specificity_by_hand():
    """Three cultures on two dimensions; expert C answers differently on the two paraphrase variants."""
    from culturalign.committee.metrics import expert_matrix_rows, specificity, wrong_expert_rows

    targets = {"A": Target("A", {"PDI": 50.0, "IDV": 50.0}), "B": Target("B", {"PDI": 0.0, "IDV": 100.0}),
               "C": Target("C", {"PDI": 100.0, "IDV": 0.0})}
    a, b = {"PDI": 50.0, "IDV": 50.0}, {"PDI": 0.0, "IDV": 100.0}
    indices = {"v1": {"A": a, "B": b, "C": {"PDI": 20.0, "IDV": 80.0}},
               "v2": {"A": a, "B": b, "C": {"PDI": 100.0, "IDV": 0.0}}}
    rows = expert_matrix_rows(indices, targets, ["A", "B", "C"])
    assert len(rows) == 2 * 3 * 3
    got = {(r["variant"], r["culture"], r["expert"]): r["alignment"] for r in rows}
    assert got[("v1", "A", "C")] == pytest.approx(1 - 60 / 200) and got[("v1", "C", "B")] == 0.0
    assert got[("v2", "C", "C")] == 1.0 and got[("v1", "C", "C")] == pytest.approx(0.2)

    spec, csv_rows = specificity(rows)
    assert spec["experts"] == spec["cultures"] == ["A", "B", "C"]
    np.testing.assert_allclose(spec["alignment"], [[1.0, 0.5, 0.6], [0.5, 1.0, 0.4], [0.5, 0.0, 0.6]])
    per = spec["per_culture"]
    assert per["A"]["own"] == 1.0 and per["A"]["wrong_mean"] == pytest.approx(0.55)
    assert per["B"]["specificity"] == pytest.approx(0.55) and per["C"]["specificity"] == pytest.approx(0.35)
    assert per["C"]["best_expert"] == "C" and per["C"]["own_is_best"]  # C ties nobody: 0.6 > 0.5 > 0.0
    assert spec["mean"] == pytest.approx((0.45 + 0.55 + 0.35) / 3) and spec["own_best"] == 3 and spec["n_cultures"] == 3
    assert list(csv_rows[0]) == ["culture", "A", "B", "C", "own", "wrong_mean", "specificity", "best_expert"]

    wrong = {(r["culture"], r["variant"]): r for r in wrong_expert_rows(rows)}
    assert wrong[("A", "v1")]["alignment"] == pytest.approx((0.5 + 0.7) / 2)
    assert wrong[("A", "v2")]["alignment"] == pytest.approx(0.5) and wrong[("C", "v1")]["alignment"] == 0.25
    assert wrong[("C", "v1")]["experts"] == "A|B" and all(r["system"] == "wrong-expert" for r in wrong.values())
    assert wrong[("B", "v1")]["l1"] == pytest.approx((100 + 40) / 2)  # B (0, 100) from A (50, 50) and from C (20, 80)

    # only v1: C's own expert is no longer best (A aligns better with C), so 2 of 3
    spec1, _ = specificity([r for r in rows if r["variant"] == "v1"])
    assert spec1["per_culture"]["C"]["best_expert"] == "A" and not spec1["per_culture"]["C"]["own_is_best"]
    assert spec1["own_best"] == 2 and spec1["mean"] == pytest.approx((0.4 + 0.35 - 0.05) / 3)
