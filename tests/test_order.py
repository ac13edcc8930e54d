"""Option order (`order` / `--order`): forward (the default, unchanged), reversed, and both orders averaged
in one backend batch, in logprob and sample mode; the align, heldout, experiment and committee settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bigram_backend

from culturalign import CulturalignError, load_instrument, load_target
from culturalign.alignment.config import AlignConfig
from culturalign.alignment.run import Aligner
from culturalign.measure.prompts import encode_items
from culturalign.measure.survey import Survey

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-6


@pytest.fixture(scope="module")
def china():
    return load_target("CN")


@pytest.fixture(scope="module")
def softs(tiny_lm):
    return torch.randn(3, 4, tiny_lm.hidden_size, generator=torch.Generator().manual_seed(7)) * 0.3


@pytest.fixture(scope="module")
def answers_1(tiny_tokenizer):
    """A model that (after "Answer: ") says "1", the first option listed, 3/4 of the time ("Answer" otherwise)."""
    return bigram_backend(tiny_tokenizer, "1", name="says-1")


def dists(survey, soft=None):
    with torch.no_grad():
        return survey.distributions(soft)


def palindromic_instrument(path: Path) -> Path:
    path.write_text(json.dumps({
        "schema": "culturalign.instrument/1", "id": "same", "name": "same", "answer_codes": [1, 2, 3],
        "scales": {"s": ["yes", "maybe", "yes"]},
        "items": [{"id": 1, "text": "t", "scale": "s"}, {"id": 2, "text": "u", "scale": "s"}],
        "indices": {"A": {"terms": [{"weight": 10, "plus": 1, "minus": 2}]}}}))
    return path


# ---- logprob mode ----------------------------------------------------------------------------------------

def test_forward_is_the_default_and_the_code_path_before_the_setting(tiny_lm, vsm, china, softs):
    default, forward = Survey(tiny_lm, vsm, "naive", china), Survey(tiny_lm, vsm, "naive", china, order="forward")
    # what Survey asked before the order setting existed: the items' prompts, their sections as groups
    seqs, option_ids = encode_items(tiny_lm.tokenizer, vsm, "naive", china)
    groups: dict = {}
    for i, it in enumerate(vsm.items):
        if it.section:
            groups.setdefault(it.section, []).append(i)
    assert default.sequences == seqs and forward.sequences == seqs and forward.option_ids == option_ids
    for soft in (None, softs):
        with torch.no_grad():
            ref = tiny_lm.option_distributions(tiny_lm.prompt_set(seqs, list(groups.values())), option_ids, soft)
        for s in (default, forward):
            d = dists(s, soft)
            assert torch.equal(d.probs, ref.probs) and torch.equal(d.mass, ref.mass)  # bit-identical
    r = forward.result()
    assert r.order == "forward" and r.to_json()["order"] == "forward"


def test_reversed_is_the_reversed_instrument(tiny_lm, vsm, china, softs):
    rev, ref = Survey(tiny_lm, vsm, "naive", china, order="reversed"), Survey(tiny_lm, vsm.reversed(), "naive", china)
    for soft in (None, softs):
        a, b = dists(rev, soft), dists(ref, soft)
        assert torch.equal(a.probs, b.probs) and torch.equal(a.mass, b.mass)
    r = rev.result()
    assert r.instrument == "vsm2013" and r.to_json()["order"] == "reversed"  # the codes keep their meaning


def test_both_is_the_mean_of_forward_and_reversed(tiny_lm, vsm, china, softs):
    f, r = Survey(tiny_lm, vsm, "naive", china), Survey(tiny_lm, vsm, "naive", china, order="reversed")
    b = Survey(tiny_lm, vsm, "naive", china, order="both")
    for soft in (None, softs):
        df, dr, db = dists(f, soft), dists(r, soft), dists(b, soft)
        assert db.probs.shape == df.probs.shape and db.mass.shape == df.mass.shape  # [P, 24, 5], [P, 24]
        torch.testing.assert_close(db.probs, (df.probs + dr.probs) / 2, atol=TOL, rtol=0)
        torch.testing.assert_close(db.mass, (df.mass + dr.mass) / 2, atol=TOL, rtol=0)
        assert (df.probs - dr.probs).abs().max() > 0.01  # the orders do differ on this model
    res, rf, rr = b.result(softs[0]), f.result(softs[0]), r.result(softs[0])
    assert res.to_json()["order"] == "both"
    for it, a, c in zip(res.items, rf.items, rr.items):
        assert it["probs"] == pytest.approx([(x + y) / 2 for x, y in zip(a["probs"], c["probs"])], abs=2e-6)
        assert it["option_mass"] == pytest.approx((a["option_mass"] + c["option_mass"]) / 2, abs=2e-6)
    # the loss the optimizer reads is the survey's loss on the averaged distributions
    with torch.no_grad():
        db = b.distributions(softs)
        expected = b.loss(type(db)((df.probs + dr.probs) / 2, (df.mass + dr.mass) / 2), 0.9, 100.0)
        torch.testing.assert_close(b.loss(db, 0.9, 100.0), expected, atol=1e-3, rtol=1e-6)


def test_both_asks_one_prompt_set_in_one_backend_call(tiny_lm, vsm, china, softs, monkeypatch):
    f, r = Survey(tiny_lm, vsm, "naive", china), Survey(tiny_lm, vsm, "naive", china, order="reversed")
    b = Survey(tiny_lm, vsm, "naive", china, order="both")
    assert b.sequences == f.sequences + r.sequences and len(b.prompts) == 48
    # prefix sharing still works: each order's sections are stages of their own, the suffixes stay short
    assert len(b.prompts.stages) == len(f.prompts.stages) + len(r.prompts.stages)
    assert b.prompts.tokens_per_candidate < b.prompts.plain_tokens_per_candidate / 2
    calls = []
    real = type(tiny_lm).option_distributions

    def spy(self, prompts, option_ids, soft=None, progress=None):
        calls.append(len(prompts))
        return real(self, prompts, option_ids, soft, progress=progress)

    monkeypatch.setattr(type(tiny_lm), "option_distributions", spy)
    seen = []
    with torch.no_grad():
        b.distributions(softs, progress=seen.append)
    assert calls == [48]  # one call, both orders of every item
    assert seen and seen[-1] == 24 and seen == sorted(seen)  # progress counts items, not prompts


def test_mapping_back_on_a_model_that_always_picks_the_first_option(answers_1, vsm):
    """Saying "1" is code 1 forward and code 5 reversed: both orders average to half and half."""
    probs = {o: Survey(answers_1, vsm, "naive", order=o).result().items for o in ("forward", "reversed", "both")}
    for f, r, b in zip(probs["forward"], probs["reversed"], probs["both"]):
        assert f["probs"] == pytest.approx([1, 0, 0, 0, 0], abs=1e-6)
        assert r["probs"] == pytest.approx([0, 0, 0, 0, 1], abs=1e-6)
        assert b["probs"] == pytest.approx([0.5, 0, 0, 0, 0.5], abs=1e-6) and b["mean"] == pytest.approx(3.0)
        assert b["option_mass"] == pytest.approx(0.75, abs=1e-4)


# ---- sample mode ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_both_in_sample_mode_is_the_mean_of_the_two_runs(answers_1, vsm, temperature):
    n, seed = 5, 3
    f = Survey(answers_1, vsm, "naive").sample(n, temperature, seed=seed)
    r = Survey(answers_1, vsm, "naive", order="reversed").sample(n, temperature, seed=seed)
    b = Survey(answers_1, vsm, "naive", order="both").sample(n, temperature, seed=seed)
    assert b.mode == "sample" and b.to_json()["order"] == "both" and r.to_json()["order"] == "reversed"
    for x, y, z in zip(f.items, r.items, b.items):
        assert x["probs"] == [1.0, 0.0, 0.0, 0.0, 0.0] and y["probs"] == [0.0, 0.0, 0.0, 0.0, 1.0]
        assert z["probs"] == pytest.approx([(p + q) / 2 for p, q in zip(x["probs"], y["probs"])], abs=TOL)
        assert z["option_mass"] == pytest.approx((x["option_mass"] + y["option_mass"]) / 2, abs=TOL)
        assert z["unparsable"] == x["unparsable"] + y["unparsable"]
        assert len(z.get("unparsable_examples", [])) == min(3, z["unparsable"])
    assert b.extra["unparsable"] == f.extra["unparsable"] + r.extra["unparsable"]
    assert b.indices == pytest.approx({d: (f.indices[d] + r.indices[d]) / 2 for d in vsm.dims}, abs=1e-6)
    if temperature > 0:
        assert 0 < f.extra["unparsable"] < 24 * n  # a real sample: some answers did not parse


def test_sample_mode_forward_is_unchanged(bigram_lm, vsm):
    a = Survey(bigram_lm, vsm, "naive").sample(4, 1.0, seed=1).to_json()
    b = Survey(bigram_lm, vsm, "naive", order="forward").sample(4, 1.0, seed=1).to_json()
    a.pop("seconds"), b.pop("seconds")
    assert a == b and a["order"] == "forward"


def test_sample_mode_names_the_order_without_parsable_answers(tiny_tokenizer, vsm):
    never = bigram_backend(tiny_tokenizer, "7", name="says-7")  # "7" is not an answer code
    with pytest.raises(CulturalignError, match=r"no parsable answer .* \(options in forward order\)"):
        Survey(never, vsm, "naive", order="both").sample(2, 0.0)


# ---- bad settings -----------------------------------------------------------------------------------------

def test_bad_orders_are_one_clear_error(tiny_lm, vsm, tmp_path):
    with pytest.raises(CulturalignError, match=r"--order 'sideways': expected one of forward, reversed, both"):
        Survey(tiny_lm, vsm, order="sideways")
    same = load_instrument(str(palindromic_instrument(tmp_path / "same.json")))
    for order in ("reversed", "both"):
        with pytest.raises(CulturalignError, match=r"'vsm2013-reversed' already presents its options in another order; "
                                                   r"use 'vsm2013' with --order reversed"):
            Survey(tiny_lm, load_instrument("vsm2013-reversed"), order=order)
        with pytest.raises(CulturalignError, match=f"--order {order}: instrument 'same' has no reversed form"):
            Survey(tiny_lm, same, order=order)
    Survey(tiny_lm, load_instrument("vsm2013-reversed"))  # forward: asked as it is presented, as before
    assert vsm.reverse_problem() is None and load_instrument("vsm2013-para-a").reverse_problem() is None


def test_align_config_order():
    assert AlignConfig().order == "forward"
    for order in ("forward", "reversed", "both"):
        AlignConfig(order=order)
    with pytest.raises(CulturalignError, match=r"^order 'Both': expected one of forward, reversed, both$"):
        AlignConfig(order="Both")
    # records compared with later runs leave the default out, so older checkpoints and experiments still match
    assert "order" not in AlignConfig().fingerprint_json()
    assert AlignConfig(order="both").fingerprint_json()["order"] == "both"


# ---- align, survey --soft-prompt, heldout ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def both_run(tiny_lm, vsm, china, tmp_path_factory):
    out = tmp_path_factory.mktemp("order") / "both"
    cfg = AlignConfig(optimizer="de", budget=12, popsize=6, tokens=2, dim=4, sigma=2.0, order="both")
    return out, Aligner(tiny_lm, vsm, china, cfg, out).run()


def test_align_with_both_orders(both_run, tiny_lm, vsm, china):
    from culturalign.softprompt.prompt import SoftPrompt

    out, result = both_run
    assert result["settings"]["order"] == "both"
    meta = json.loads((out / "culturalign.json").read_text())
    assert meta["order"] == "both"
    assert json.loads((out / "checkpoint.json").read_text())["fingerprint"]["config"]["order"] == "both"
    for name in ("naive", "icl", "aligned"):
        assert result["profiles"][name]["order"] == "both"
    sp = SoftPrompt.load(out)
    again = Survey(tiny_lm, vsm, "naive", china, order="both").result(sp.embeddings)
    assert again.l1 == pytest.approx(result["profiles"]["aligned"]["l1"], abs=1e-6)
    assert result["best_l1"] == pytest.approx(again.l1, abs=1e-3)  # the search scored what is reported


def test_align_default_records_forward_and_keeps_the_old_fingerprint(tiny_lm, vsm, china, tmp_path):
    from culturalign.alignment.run import _fingerprint

    cfg = AlignConfig(optimizer="de", budget=12, popsize=6, tokens=2, dim=4, sigma=2.0)
    assert "order" not in _fingerprint(cfg, tiny_lm, china, vsm)["config"]
    aligner = Aligner(tiny_lm, vsm, china, cfg, tmp_path / "f")
    assert aligner.survey.order == "forward" and len(aligner.survey.prompts) == 24


def run_cli(argv, capsys):
    from culturalign.cli import run

    capsys.readouterr()
    code = run([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_survey_and_heldout_reuse_the_saved_order(both_run, tiny_dir, tiny_lm, answers_1, vsm, china, tmp_path, capsys,
                                                  monkeypatch):
    import culturalign.cli.common
    from culturalign.softprompt.prompt import SoftPrompt

    monkeypatch.setattr(culturalign.cli.common, "load_model", lambda model, device: tiny_lm)
    monkeypatch.setenv("COLUMNS", "250")
    out, result = both_run
    emb = SoftPrompt.load(out).embeddings
    code, stdout, stderr = run_cli(["survey", "--model", tiny_dir, "--country", "CN", "--prompt", "naive",
                                    "--soft-prompt", out, "--json", "-"], capsys)
    assert code == 0, stderr
    naive, soft = json.loads(stdout)
    assert naive["order"] == soft["order"] == "both"  # every profile in the order the soft prompt was aligned with
    assert naive["l1"] == pytest.approx(result["profiles"]["naive"]["l1"], abs=1e-6)
    assert soft["l1"] == pytest.approx(result["profiles"]["aligned"]["l1"], abs=1e-6)
    code, stdout, stderr = run_cli(["survey", "--model", tiny_dir, "--country", "CN", "--soft-prompt", out,
                                    "--order", "reversed", "--json", "-"], capsys)
    assert code == 0, stderr
    rev = json.loads(stdout)
    assert rev["order"] == "reversed"
    assert rev["l1"] == pytest.approx(Survey(tiny_lm, vsm, "naive", china, order="reversed").result(emb).l1, abs=1e-6)
    # sample mode through the command: both orders' answers are counted (24 items x 2 orders x 2 samples)
    monkeypatch.setattr(culturalign.cli.common, "load_model", lambda model, device: answers_1)
    code, stdout, stderr = run_cli(["survey", "--model", tiny_dir, "--mode", "sample", "--samples", "2", "--temperature", "0",
                                    "--order", "both", "--json", tmp_path / "s.json"], capsys)
    assert code == 0, stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["order"] == "both" and "unparsable answers: 0 of 96" in stdout
    assert s["items"][0]["probs"] == [0.5, 0.0, 0.0, 0.0, 0.5]

    monkeypatch.setattr(culturalign.cli.common, "load_model", lambda model, device: tiny_lm)
    code, stdout, stderr = run_cli(["heldout", "--soft-prompt", out, "--model", tiny_dir, "--json", tmp_path / "h.json"],
                                   capsys)
    assert code == 0, stderr
    h = json.loads((tmp_path / "h.json").read_text())
    assert h["order"] == "both" and h["survey"]["original"]["order"] == "both"
    assert h["survey"]["original"]["with"]["l1"] == pytest.approx(result["profiles"]["aligned"]["l1"], abs=1e-6)
    assert [v["kind"] for v in h["survey"]["variants"]] == ["paraphrase", "paraphrase"]  # no other order left to check
    flat = " ".join(stdout.split())  # the table's title wraps at its width
    assert "both option orders averaged" in flat and "vsm2013, both orders (aligned on)" in flat


def test_heldout_reversed_checks_the_forward_order(tiny_lm, vsm, china):
    from culturalign.heldout import heldout_markdown, run_heldout
    from culturalign.softprompt.prompt import SoftPrompt

    sp = SoftPrompt(torch.randn(2, 32, generator=torch.Generator().manual_seed(5)) * 0.5, {"prompt": "naive"})
    stages = set()
    res = run_heldout(tiny_lm, sp, china, order="reversed", progress=lambda s, d, t: stages.add(s))
    base, variants = res["survey"]["original"], res["survey"]["variants"]
    assert base["order"] == "reversed" and [v["order"] for v in variants] == ["reversed", "reversed", "forward"]
    assert variants[-1]["kind"] == "reversed options" and variants[-1]["instrument"] == "vsm2013"
    fwd = Survey(tiny_lm, vsm, "naive", china)
    assert variants[-1]["with"]["l1"] == pytest.approx(fwd.result(sp.embeddings).l1, abs=1e-9)
    rev = Survey(tiny_lm, vsm, "naive", china, order="reversed")
    assert base["with"]["l1"] == pytest.approx(rev.result(sp.embeddings).l1, abs=1e-9)
    assert {"vsm2013 (reversed order)", "vsm2013 (forward order)"} <= stages
    md = heldout_markdown(res)
    assert "| L1 vsm2013, reversed order (aligned on) |" in md and "| L1 vsm2013, forward order (reversed options) |" in md


# ---- experiment files and the committee ---------------------------------------------------------------------

GRID = "grid:\n  targets: [CN]\n  optimizers: [de]\n  budget: 12\nsettings: {tokens: 2, dim: 2, sigma: 2.0%s}\n"


def test_experiment_order_setting(tmp_path):
    from culturalign.experiments import load_spec

    f = tmp_path / "g.yaml"
    f.write_text(GRID % "")
    exp = load_spec(f)
    assert exp.cells[0].config.order == "forward" and "order" not in exp.normalised()["cells"]["CN-hofstede-2015-de-s0"]
    f.write_text(GRID % ", order: both")
    exp = load_spec(f)
    assert exp.cells[0].config.order == "both" and exp.normalised()["cells"]["CN-hofstede-2015-de-s0"]["order"] == "both"
    f.write_text(GRID % ", order: upside-down")
    with pytest.raises(CulturalignError, match=r"g.yaml: settings.order: 'upside-down': expected one of"):
        load_spec(f)
    f.write_text("instrument: vsm2013-reversed\n" + GRID % ", order: reversed")
    with pytest.raises(CulturalignError, match=r"g.yaml: settings.order: reversed: instrument 'vsm2013-reversed' already"):
        load_spec(f)


def test_committee_alignment_metric_uses_the_order(tiny_lm, tmp_path):
    from conftest import BagOfWords, make_registry

    from culturalign.committee.compose import CommitteeConfig, load_committee
    from culturalign.committee.metrics import EvalConfig, Evaluator
    from culturalign.committee.router import RouterConfig

    with pytest.raises(CulturalignError, match="--order 'x'"):
        EvalConfig([], [], order="x")
    reg = make_registry(tmp_path / "reg", tiny_lm, codes=("CN",))
    c = load_committee(tiny_lm, str(reg), RouterConfig(gate=False), CommitteeConfig(), encoder=BagOfWords())
    cfg = EvalConfig(registry_cultures=["CN"], heldout_cultures=[], variants=("vsm2013-para-a",), order="both")
    rows = Evaluator(c, [], cfg, {"CN": load_target("CN")}).alignment()
    naive = next(r for r in rows if r["system"] == "naive")
    inst = load_instrument("vsm2013-para-a")
    expected = Survey(tiny_lm, inst, "naive", load_target("CN"), order="both").result()
    assert naive["l1"] == pytest.approx(expected.l1, abs=1e-3)
    assert naive["l1"] != pytest.approx(Survey(tiny_lm, inst, "naive", load_target("CN")).result().l1, abs=1e-3)


def test_resume_checks_the_order(tiny_dir, tiny_lm, tmp_path, capsys, monkeypatch):
    import culturalign.cli.common

    monkeypatch.setattr(culturalign.cli.common, "load_model", lambda model, device: tiny_lm)
    base = ["align", "--model", tiny_dir, "--country", "CN", "--optimizer", "de", "--budget", "12", "--tokens", "2", "--dim", "4",
            "--sigma", "2"]
    code, _, stderr = run_cli([*base, "--out", tmp_path / "f"], capsys)
    assert code == 0, stderr
    assert "order" not in json.loads((tmp_path / "f" / "checkpoint.json").read_text())["fingerprint"]["config"]
    # forward typed again matches a checkpoint that does not name the order (as one written before the setting)
    code, _, stderr = run_cli(["align", "--out", tmp_path / "f", "--resume", "--budget", "18", "--order", "forward"], capsys)
    assert code == 0, stderr
    code, _, stderr = run_cli(["align", "--out", tmp_path / "f", "--resume", "--budget", "24", "--order", "both"], capsys)
    assert code == 2 and "--order 'both' differs from the run's 'forward'" in stderr


def test_resume_with_another_order_names_it(both_run, tiny_lm, vsm, china, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(both_run[0], out)
    cfg = AlignConfig(optimizer="de", budget=18, popsize=6, tokens=2, dim=4, sigma=2.0)  # forward: the order is left out of its record
    with pytest.raises(CulturalignError, match=r"different settings \(order\)"):
        Aligner(tiny_lm, vsm, china, cfg, out, resume=True)
