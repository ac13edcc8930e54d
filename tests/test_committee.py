"""The committee: expert registries, one-batch composition, the four systems, and the evaluation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BagOfWords, make_registry

from culturalign import CulturalignError, load_instrument, load_target
from culturalign.alignment.config import AlignConfig
from culturalign.committee.compose import Committee, CommitteeConfig, load_committee
from culturalign.committee.cultures import load_cultures
from culturalign.committee.experts import MANIFEST, build_experts, load_registry, parse_culture_specs
from culturalign.committee.metrics import alignment_score, mix, mutual_information
from culturalign.committee.router import Router, RouterConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def registry_dir(tiny_lm, tmp_path_factory):
    return make_registry(tmp_path_factory.mktemp("reg") / "experts", tiny_lm)


@pytest.fixture(scope="module")
def committee(tiny_lm, registry_dir):
    """Routing without the gate (the hash encoder is no judge of culture-dependence)."""
    return load_committee(tiny_lm, str(registry_dir), RouterConfig(gate=False), CommitteeConfig(max_new_tokens=6,
                                                                                                compose_max_new_tokens=6),
                          encoder=BagOfWords())


OPTIONS = ["strongly agree", "agree", "undecided", "disagree", "strongly disagree"]


# ---- metrics: the formulas -----------------------------------------------------------------------------

def test_mutual_information_bounds():
    same = np.tile([0.1, 0.2, 0.7], (4, 1))
    assert mutual_information(same) == pytest.approx(0.0, abs=1e-12)  # culture ignored -> 0
    distinct = np.eye(4)
    assert mutual_information(distinct) == pytest.approx(2.0)  # four sure, different answers -> log2(4)
    half = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert mutual_information(half) == pytest.approx(1.0)
    assert 0 < mutual_information(np.array([[0.6, 0.4], [0.4, 0.6]])) < 1


def test_alignment_score():
    scores = {"PDI": 80, "IDV": 20}
    assert alignment_score({"PDI": 80, "IDV": 20, "MAS": 5}, scores) == (1.0, 0.0, ["PDI", "IDV"])
    assert alignment_score({"PDI": 30, "IDV": 70}, scores)[0] == pytest.approx(0.5)
    assert alignment_score({"PDI": -500, "IDV": 900}, scores)[0] == 0.0  # clipped at 0


def test_mix():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert torch.allclose(mix([(0, 0.25), (1, 0.75)], probs), torch.tensor([0.25, 0.75], dtype=torch.float64))


# ---- registries ----------------------------------------------------------------------------------------

def test_load_registry(registry_dir, tiny_lm):
    reg = load_registry(registry_dir, model=tiny_lm.name, hidden_size=tiny_lm.hidden_size)
    assert reg.codes == ["CN", "JP", "US"] and reg["JP"].name == "Japan"
    assert reg["CN"].embeddings.shape == (3, tiny_lm.hidden_size)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage,needle", [
    (lambda d: shutil.rmtree(d / "JP"), "'JP' is missing"),
    (lambda d: (d / "JP" / "adapter_model.safetensors").write_bytes(b"junk"), "safetensors"),
    (lambda d: (d / MANIFEST).write_text("{"), "not valid JSON"),
    (lambda d: (d / MANIFEST).unlink(), "not found"),
    (lambda d: (d / MANIFEST).write_text(json.dumps({"schema": "x"})), "schema"),
    (lambda d: (d / MANIFEST).write_text(json.dumps({"schema": "culturalign.experts/1", "experts": []})), "no experts"),
])
def test_damaged_registry_is_one_error(registry_dir, tmp_path, damage, needle):
    d = _copy(registry_dir, tmp_path / "r")
    damage(d)
    with pytest.raises(CulturalignError, match=needle):
        load_registry(d)


def test_changed_tensor_is_detected(registry_dir, tmp_path, tiny_lm):
    from culturalign.softprompt.prompt import SoftPrompt

    d = _copy(registry_dir, tmp_path / "r")
    SoftPrompt(torch.zeros(3, tiny_lm.hidden_size)).save(d / "CN")
    with pytest.raises(CulturalignError, match="SHA-256"):
        load_registry(d)


def test_registry_for_another_model(registry_dir, tiny_lm, tmp_path):
    with pytest.raises(CulturalignError, match="built for model"):
        load_registry(registry_dir, model="other-model")
    with pytest.raises(CulturalignError, match="hidden size"):
        load_registry(registry_dir, hidden_size=576)
    wide = make_registry(tmp_path / "w", tiny_lm)
    m = json.loads((wide / MANIFEST).read_text())
    m["hidden_size"] = 64
    (wide / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CulturalignError, match="width|another model"):
        load_registry(wide)


def test_parse_culture_specs():
    assert parse_culture_specs("CN, us,SA@hofstede-2023", "hofstede-2015") == [
        ("CN", "hofstede-2015"), ("us", "hofstede-2015"), ("SA", "hofstede-2023")]
    with pytest.raises(CulturalignError, match="more than once"):
        parse_culture_specs("CN,cn", "hofstede-2015")
    with pytest.raises(CulturalignError, match="comma-separated"):
        parse_culture_specs(" , ", "hofstede-2015")


def test_build_experts_resumes_and_keeps_finished(tiny_lm, vsm, tmp_path):
    cfg = AlignConfig(optimizer="de", budget=8, popsize=4, tokens=2, dim=4, sigma=2.0, constants=vsm.constants())
    targets = [load_target("CN"), load_target("JP")]
    seen = []
    reg = build_experts(tiny_lm, vsm, targets[:1], cfg, tmp_path / "reg", progress=lambda c, i: seen.append(c))
    assert reg.codes == ["CN"] and set(seen) == {"CN"}
    entry = reg["CN"].info
    assert entry["optimizer"] == "de" and entry["evaluations"] == 8 and entry["target"]["set"] == "hofstede-2015"
    assert entry["aligned_l1"] <= entry["naive_l1"] + 1e-6 or entry["aligned_l1"] > 0
    before = (tmp_path / "reg" / "CN" / "adapter_model.safetensors").read_bytes()
    seen.clear()
    reg = build_experts(tiny_lm, vsm, targets, cfg, tmp_path / "reg", progress=lambda c, i: seen.append(c))
    assert reg.codes == ["CN", "JP"] and set(seen) == {"JP"}  # CN kept, only JP aligned
    assert (tmp_path / "reg" / "CN" / "adapter_model.safetensors").read_bytes() == before
    # an interrupted expert resumes from its checkpoint
    class Stop(KeyboardInterrupt):
        pass

    def stop(code, info):
        raise Stop

    with pytest.raises(Stop):
        build_experts(tiny_lm, vsm, targets + [load_target("US")], cfg, tmp_path / "reg", progress=stop)
    with pytest.raises(Stop):  # a first build interrupted before any expert finished resumes too
        build_experts(tiny_lm, vsm, targets, cfg, tmp_path / "first", progress=stop)
    assert build_experts(tiny_lm, vsm, targets[:1], cfg, tmp_path / "first").codes == ["CN"]
    assert (tmp_path / "reg" / "runs" / "US" / "checkpoint.json").is_file()
    reg = build_experts(tiny_lm, vsm, targets + [load_target("US")], cfg, tmp_path / "reg")
    assert reg.codes == ["CN", "JP", "US"]


# ---- asking --------------------------------------------------------------------------------------------

def test_options_answer_is_the_weighted_mixture_of_one_batch(committee, tiny_lm):
    a = committee.ask("In Japan and China, elders should be obeyed.", options=OPTIONS)
    codes = [e["code"] for e in a.experts]
    assert set(codes) <= {"CN", "JP", "US"} and codes
    weights = np.array([e["weight"] for e in a.experts])
    assert weights.sum() == pytest.approx(1.0)
    mixed = sum(w * np.array(e["probs"]) for w, e in zip(weights, a.experts))
    assert np.allclose(mixed, a.answer["probs"], atol=1e-5)
    assert a.answer["option"] == OPTIONS[a.answer["choice"] - 1]
    # each expert's distribution equals asking that expert alone
    for e in a.experts:
        alone = committee.ask(f"In Japan and China, elders should be obeyed.", culture=e["code"], options=OPTIONS,
                              system="expert")
        assert alone.experts[0]["code"] == e["code"]
        assert np.allclose(alone.experts[0]["probs"], e["probs"], atol=1e-5)


def test_systems_share_one_path(committee):
    q = "How important is it to respect your elders?"
    naive = committee.ask(q, culture="JP", options=OPTIONS, system="naive")
    persona = committee.ask(q, culture="Japan", options=OPTIONS, system="persona")
    expert = committee.ask(q, culture="jp", options=OPTIONS, system="expert")
    full = committee.ask(q, culture="JP", options=OPTIONS, system="committee")
    assert naive.responses == 0 and naive.experts == [] and naive.routing is None
    assert persona.responses == 1 and persona.cultures == ["JP"] and persona.experts[0]["code"] == "persona"
    assert expert.responses == 1 and expert.experts[0]["code"] == "JP" and expert.culture == "JP"
    assert full.experts[0]["code"] == "JP" and full.experts[0]["weight"] == pytest.approx(1.0)  # explicit culture
    assert not np.allclose(naive.answer["probs"], persona.answer["probs"])
    json.dumps(full.to_json(), allow_nan=False)


def test_open_question_composes_several_answers(committee):
    a = committee.ask("What do people in China and Japan eat at new year?", system="committee")
    assert len(a.experts) >= 2
    assert a.answer["composed"] is True and all(isinstance(e["text"], str) for e in a.experts)
    assert a.tokens["generated"] == sum(e["tokens"] for e in a.experts) + a.answer["tokens"]
    assert all(e["tokens"] <= 6 for e in a.experts)
    one = committee.ask("What do people eat at new year?", culture="US", system="expert")
    assert one.answer["composed"] is False and one.answer["text"] == one.experts[0]["text"]
    again = committee.ask("What do people eat at new year?", culture="US", system="expert")
    assert again.answer["text"] == one.answer["text"]  # greedy: same answer


@pytest.mark.parametrize("kwargs,needle", [
    ({"query": "  "}, "empty"),
    ({"query": "q", "options": ["only"]}, "at least two"),
    ({"query": "q", "options": ["a", ""]}, "empty"),
    ({"query": "q", "options": ["a", "A"]}, "twice"),
    ({"query": "q", "options": [str(i) for i in range(10)]}, "at most 9"),
    ({"query": "q", "culture": "Atlantis"}, "Atlantis"),
    ({"query": "q", "system": "oracle"}, "oracle"),
    ({"query": "word " * 1200}, "context"),
])
def test_bad_asks(committee, kwargs, needle):
    with pytest.raises(CulturalignError, match=needle):
        committee.ask(**kwargs)


def test_gate_sends_arithmetic_to_the_base_model(tiny_lm, registry_dir):
    c = load_committee(tiny_lm, str(registry_dir))  # the real encoder and gate
    a = c.ask("What is 12 x 7?", culture="JP", options=["74", "84", "94"])
    assert a.experts == [] and a.routing["culture_dependent"] is False
    b = c.ask("How should a guest behave at a family dinner in Tokyo?", options=["quietly", "loudly"])
    assert [e["code"] for e in b.experts][0] == "JP"


# ---- evaluation ----------------------------------------------------------------------------------------

def test_committee_eval_on_a_small_query_set(tiny_lm, registry_dir, tmp_path):
    from culturalign.committee.metrics import EvalConfig, Evaluator
    from culturalign.committee.queries import load_queries
    from culturalign.committee.report import write_eval

    qfile = tmp_path / "q.jsonl"
    rows = [
        {"id": "t1", "kind": "likert", "text": "In Tokyo, elders should be obeyed.", "options": OPTIONS[:3], "culture": "JP",
         "culture_dependent": True},
        {"id": "u1", "kind": "likert", "text": "How important is thrift?", "options": OPTIONS, "culture": None,
         "culture_dependent": True},
        {"id": "u2", "kind": "choice", "text": "Who pays at a dinner with friends?", "options": ["host", "split", "eldest"],
         "culture": None, "culture_dependent": True},
        {"id": "n1", "kind": "choice", "text": "What is 2 + 2?", "options": ["3", "4"], "culture": None,
         "culture_dependent": False},
        {"id": "o1", "kind": "open", "text": "What gift suits a dinner in Beijing?", "culture": "CN", "culture_dependent": True},
    ]
    qfile.write_text("\n".join(json.dumps(r) for r in rows))
    c = load_committee(tiny_lm, str(registry_dir), RouterConfig(gate=False), CommitteeConfig(max_new_tokens=4,
                                                                                             compose_max_new_tokens=4),
                       encoder=BagOfWords())
    targets = {code: load_target(code) for code in ("CN", "JP", "US", "FR")}
    cfg = EvalConfig(registry_cultures=["CN", "JP", "US"], heldout_cultures=["FR"], open_limit=1)
    result = Evaluator(c, load_queries(qfile), cfg, targets).run()
    m = result.metrics["per_system"]
    assert m["naive"]["diversity_bits"]["mean"] == pytest.approx(0.0, abs=1e-12)  # ignores the user's culture
    assert m["naive"]["responses_per_query"]["mean"] == 0 and m["persona"]["responses_per_query"]["mean"] == 1
    assert m["committee"]["diversity_bits"]["mean"] > 0
    for s in ("naive", "persona", "expert", "committee"):
        assert 0 <= m[s]["alignment_registry"]["mean"] <= 1 and m[s]["alignment_heldout"]["n"] == 2  # 1 culture x 2 variants
        assert m[s]["queries"] == 5 and m[s]["latency_p50_s"] > 0
    # an explicit registry culture routes to its own expert: expert and committee agree on registry cultures
    reg_rows = {(r["system"], r["culture"], r["variant"]): r["alignment"] for r in result.alignment_rows if r["in_registry"]}
    for (s, cu, v), val in reg_rows.items():
        if s == "committee":
            assert val == pytest.approx(reg_rows[("expert", cu, v)])
    assert result.metrics["router"]["tagged_queries"] == 2
    # the reference systems: the uniform floor (C = 0: alignment 1 - sum of the scores / 600) and the wrong expert
    assert result.metrics["systems"] == ["naive", "persona", "expert", "committee"]
    assert result.metrics["reference_systems"] == ["uniform", "wrong-expert"]
    u = m["uniform"]
    floor = {code: 1 - sum(targets[code].scores.values()) / 600 for code in targets}
    assert u["alignment_registry"]["mean"] == pytest.approx(np.mean([floor[k] for k in ("CN", "JP", "US")]))
    assert u["alignment_heldout"]["mean"] == pytest.approx(floor["FR"]) and u["alignment_heldout"]["n"] == 2
    assert u["diversity_bits"]["mean"] == pytest.approx(0.0, abs=1e-12) and u["diversity_bits"]["n"] == 2  # 2 untagged
    assert u["queries"] == 0
    assert u["completeness"] is None and u["latency_ratio_to_naive"] is None
    spec = result.metrics["specificity"]
    assert spec["experts"] == spec["cultures"] == ["CN", "JP", "US"] and spec["n_cultures"] == 3
    own_rows = {cu: np.mean([val for (s, c2, v), val in reg_rows.items() if s == "expert" and c2 == cu]) for cu in spec["cultures"]}
    for i, cu in enumerate(spec["cultures"]):
        # the diagonal (computed once per expert, scored against every culture) is the expert system's alignment
        assert spec["alignment"][i][i] == pytest.approx(own_rows[cu], abs=1e-9)
        others = [spec["alignment"][i][j] for j in range(3) if j != i]
        per = spec["per_culture"][cu]
        assert per["wrong_mean"] == pytest.approx(np.mean(others))
        assert per["specificity"] == pytest.approx(own_rows[cu] - np.mean(others))
        assert per["own_is_best"] == (own_rows[cu] >= max(others))
        wrong = [r["alignment"] for r in result.alignment_rows if r["system"] == "wrong-expert" and r["culture"] == cu]
        assert len(wrong) == 2 and np.mean(wrong) == pytest.approx(np.mean(others))
    assert m["wrong-expert"]["alignment_registry"]["n"] == 6 and m["wrong-expert"]["alignment_heldout"]["n"] == 0
    assert spec["own_best"] == sum(v["own_is_best"] for v in spec["per_culture"].values())
    # the four systems' rows come first, as before; the references are appended
    systems = [r["system"] for r in result.alignment_rows]
    assert systems[:2 * 4 * 4] == [s for _ in range(2) for _ in range(4) for s in ("naive", "persona", "expert", "committee")]
    assert set(systems[2 * 4 * 4:]) == {"uniform", "wrong-expert"}
    write_eval(tmp_path / "out", result, {"model": "tiny", "registry_cultures": ["CN", "JP", "US"], "heldout_cultures": ["FR"]})
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["alignment.csv", "alignment.png", "diversity.csv", "latency.png", "metrics.json", "report.md", "results.csv",
                     "specificity.csv", "specificity.png"]
    json.loads((tmp_path / "out" / "metrics.json").read_text(), parse_constant=lambda x: pytest.fail(x))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| committee |" in report and "| uniform |" in report and "| wrong-expert |" in report
    assert "## Specificity" in report and f"**{spec['own_best']} of 3**" in report
    lines = (tmp_path / "out" / "specificity.csv").read_text().splitlines()
    assert lines[0] == "culture,CN,JP,US,own,wrong_mean,specificity,best_expert" and len(lines) == 4


def test_committee_eval_command_prints_the_references(tiny_dir, tiny_lm, tmp_path, capsys, monkeypatch):
    from culturalign.cli import run

    monkeypatch.setenv("COLUMNS", "200")
    reg = make_registry(tmp_path / "reg", tiny_lm, model=str(tiny_dir))
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"id": "u1", "kind": "likert", "text": "How important is thrift?", "options": OPTIONS[:3],
                                 "culture": None, "culture_dependent": True}))
    code = run(["committee", "eval", "--out", str(tmp_path / "out"), "--model", str(tiny_dir), "--experts", str(reg),
                "--queries", str(qfile), "--open-limit", "0", "--heldout", "FR"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| uniform |" in out and "| wrong-expert |" in out and "the own expert is the best expert for" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["reference_systems"] == ["uniform", "wrong-expert"] and metrics["specificity"]["n_cultures"] == 3
    assert (tmp_path / "out" / "specificity.png").read_bytes()[:4] == b"\x89PNG"
