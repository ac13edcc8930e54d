"""Aligner end to end on the tiny model: outputs, reproducibility, PEFT, exact resume after interruption."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import needs_dfols
from culturalign import CulturalignError, load_target
from culturalign.alignment.config import AlignConfig
from culturalign.alignment.run import CHECKPOINT, Aligner
from culturalign.cli import app
from culturalign.softprompt.params import embedding_std
from culturalign.softprompt.prompt import SoftPrompt
from culturalign.measure.survey import Survey

DIMS = ["PDI", "IDV", "MAS", "UAI", "LTO", "IVR"]
PNG = b"\x89PNG\r\n\x1a\n"
POP = 6  # population of the DE runs here (see test_popsize_four for the smallest one)


def config(**kw) -> AlignConfig:
    base = dict(optimizer="de", budget=3 * POP, popsize=POP, tokens=2, dim=8, sigma=2.0)
    base.update(kw)
    return AlignConfig(**base)


def adam_config(**kw) -> AlignConfig:
    return config(**{"optimizer": "adam", "budget": 3, "lr": 0.1, **kw})


class Interrupt(KeyboardInterrupt):
    """Raised by a progress callback to simulate Ctrl-C after a given generation."""


def interrupt_after(k: int):
    seen = []

    def progress(info):
        seen.append(info)
        if info["generation"] >= k:
            raise Interrupt()

    return progress, seen


def read(path) -> dict:
    return json.loads(Path(path).read_text())


def prompt_tensor(out) -> torch.Tensor:
    return load_file(str(Path(out) / "adapter_model.safetensors"))["prompt_embeddings"]


def losses(result):
    return [(h["generation"], h["evaluations"], h["best_loss"], h["mean_loss"]) for h in result["history"]]


def start_loss(lm, vsm, target, cfg, out) -> float:
    """Loss of the initial prompt p0 itself (z = 0), as the search measures it."""
    aligner = Aligner(lm, vsm, target, cfg, out)
    with torch.no_grad():
        sv = aligner.survey
        return float(sv.loss(sv.distributions(aligner._p0().unsqueeze(0)), cfg.mass_floor, cfg.mass_weight)[0])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return load_target("CN")


@pytest.fixture(scope="module")
def de_run(tiny_lm, vsm, target, tmp_path_factory):
    out = tmp_path_factory.mktemp("align") / "de"
    seen = []
    result = Aligner(tiny_lm, vsm, target, config(), out, progress=seen.append).run()
    return out, result, seen


@pytest.fixture(scope="module")
def adam_run(tiny_lm, vsm, target, tmp_path_factory):
    out = tmp_path_factory.mktemp("align") / "adam"
    result = Aligner(tiny_lm, vsm, target, adam_config(), out).run()
    return out, result


# ---- one DE run: what it writes ------------------------------------------------------------------

def check_profile(p, prompt, target):
    assert p["prompt"] == prompt
    assert p["model"] == "tiny" and p["instrument"] == "vsm2013" and p["mode"] == "logprob"
    assert list(p["indices"]) == DIMS and list(p["constants"]) == DIMS
    assert [it["id"] for it in p["items"]] == list(range(1, 25))
    for it in p["items"]:
        assert len(it["probs"]) == 5 and sum(it["probs"]) == pytest.approx(1, abs=1e-5)
        assert 0 < it["option_mass"] <= 1
    assert p["target"] == target.to_json() and p["target"]["set"] == "hofstede-2015"
    assert p["l1"] == pytest.approx(sum(abs(p["indices"][d] - target.scores[d]) for d in p["l1_dims"]), abs=1e-6)


def test_de_run_writes_all_outputs(de_run, tiny_lm, target):
    out, result, seen = de_run
    names = sorted(p.name for p in out.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "checkpoint.json", "convergence.png",
                     "culturalign.json", "radar.png", "report.md", "result.json"]  # no temp files left
    assert read(out / "result.json") == json.loads(json.dumps(result))
    ckpt = read(out / CHECKPOINT)  # kept, marked finished, so that a larger --budget can extend the run
    assert ckpt["finished"] is True and ckpt["history"] == result["history"] and ckpt["budget"] == 3 * POP
    assert ckpt["search_seconds"] == pytest.approx(result["search_seconds"], abs=0.1)

    cfg = read(out / "adapter_config.json")
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["num_virtual_tokens"] == 2 and cfg["token_dim"] == tiny_lm.hidden_size
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"]
    assert tensors["prompt_embeddings"].shape == (2, tiny_lm.hidden_size)
    assert torch.isfinite(tensors["prompt_embeddings"]).all()
    meta = read(out / "culturalign.json")
    assert meta["prompt"] == "naive" and meta["model"] == "tiny" and meta["optimizer"] == "de"
    assert meta["target"]["name"] == target.name
    assert meta["best_loss"] == result["best_loss"]

    for png in ("radar.png", "convergence.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG and len(data) > 1000
    report = (out / "report.md").read_text()
    assert target.name in report and "aligned" in report and "radar.png" in report

    s = result["settings"]
    assert s["model"] == "tiny" and s["instrument"] == "vsm2013"
    assert s["target"]["name"] == target.name and s["target"]["scores"] == target.scores
    assert s["constants"] == {d: 0.0 for d in DIMS}
    assert s["seed"] == 0 and s["projection_seed"] == 0
    assert (s["optimizer"], s["popsize"], s["budget"], s["tokens"], s["dim"], s["sigma"]) == ("de", POP, 3 * POP, 2, 8, 2.0)
    assert s["strategy"] == "best1bin" and s["crossover"] == 0.9 and list(s["mutation"]) == [0.5, 1.0]
    assert s["bound"] == 1.0 and s["init"] == "text" and s["prompt"] == "naive"

    for name in ("naive", "icl", "aligned"):
        check_profile(result["profiles"][name], name, target)
    assert len(seen) == len(result["history"]) and all(i["budget"] == 3 * POP for i in seen)
    # the uniform floor: every item 1/5, scored with the run's constants, compared with the aligned L1 in the report
    assert list(result["profiles"]) == ["naive", "icl", "aligned", "uniform"]
    u = result["profiles"]["uniform"]
    assert (u["prompt"], u["mode"], u["model"]) == ("uniform", "uniform", "uniform")
    assert u["indices"] == s["constants"] and u["mean_option_mass"] == 1.0 and u["target"] == target.to_json()
    assert u["l1"] == sum(target.scores.values())
    a = result["profiles"]["aligned"]
    assert f"aligned / uniform {a['l1'] / u['l1']:.2f}" in report and f"L1 {u['l1']:.1f}" in report
    assert "| dim | target | naive | icl | aligned | uniform |" in report


def test_de_history(de_run, tiny_lm, vsm, target, tmp_path):
    _, result, _ = de_run
    h = result["history"]
    assert [x["generation"] for x in h] == list(range(len(h)))
    assert len(h) == 3  # initial population + 2 generations
    assert [x["evaluations"] for x in h] == [POP * (g + 1) for g in range(len(h))]
    assert result["evaluations"] == POP * len(h) <= result["settings"]["budget"]
    best = [x["best_loss"] for x in h]
    assert all(b <= a for a, b in zip(best, best[1:])), best
    assert all(x["mean_loss"] >= x["best_loss"] for x in h)
    assert all(0 < x["best_option_mass"] <= 1 for x in h)
    assert result["best_loss"] == best[-1]
    # the initial population holds z = 0, i.e. the initial prompt itself
    assert best[0] <= start_loss(tiny_lm, vsm, target, config(), tmp_path / "unused") + 1e-4


def test_aligned_profile_is_the_best_candidate(de_run):
    """The reported aligned profile scores what the search found: its L1 plus the mass penalty is best_loss."""
    _, result, _ = de_run
    a = result["profiles"]["aligned"]
    penalty = 100.0 * np.mean([max(0.0, 0.5 - it["option_mass"]) for it in a["items"]])
    assert a["l1"] + penalty == pytest.approx(result["best_loss"], abs=1e-2)


def test_baseline_profiles_match_survey(de_run, tiny_lm, vsm, target):
    _, result, _ = de_run
    for name in ("naive", "icl"):
        ref = Survey(tiny_lm, vsm, name, target).result()
        for d in DIMS:
            assert result["profiles"][name]["indices"][d] == pytest.approx(ref.indices[d], abs=1e-4)


def test_saved_prompt_reproduces_aligned_profile(de_run, tiny_lm, vsm, target):
    out, result, _ = de_run
    sp = SoftPrompt.load(out, tiny_lm.hidden_size)
    assert sp.meta["prompt"] == "naive"
    res = Survey(tiny_lm, vsm, "naive", target).result(sp.embeddings)
    aligned = result["profiles"]["aligned"]["indices"]
    for d in DIMS:
        assert res.indices[d] == pytest.approx(aligned[d], abs=1e-4), d
    naive = result["profiles"]["naive"]["indices"]
    assert max(abs(aligned[d] - naive[d]) for d in DIMS) > 1e-3  # the prompt does something


def test_cli_survey_reproduces_aligned_profile(de_run, tiny_dir, tmp_path):
    out, result, _ = de_run
    js = tmp_path / "x.json"
    r = CliRunner().invoke(app, ["survey", "--model", str(tiny_dir), "--country", "CN", "--soft-prompt", str(out),
                                 "--json", str(js)])
    assert r.exit_code == 0, r.output
    p = read(js)
    assert p["prompt"] == "soft"
    for d in DIMS:
        assert p["indices"][d] == pytest.approx(result["profiles"]["aligned"]["indices"][d], abs=1e-4), d


def test_peft_round_trip(de_run, tiny_lm, vsm, target):
    from peft import PeftModel

    out, result, _ = de_run
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_lm.model), str(out)).eval()
    survey = Survey(tiny_lm, vsm, "naive", target)
    ours = survey.result(SoftPrompt.load(out).embeddings)
    saved = result["profiles"]["aligned"]["items"]
    for i, seq in enumerate(survey.sequences):
        with torch.no_grad():
            logits = peft_model(input_ids=torch.tensor([seq])).logits[0, -1]
        opt = torch.softmax(logits.double(), -1)[survey.option_ids]
        probs = (opt / opt.sum()).numpy()
        np.testing.assert_allclose(probs, ours.items[i]["probs"], atol=1e-5)
        np.testing.assert_allclose(probs, saved[i]["probs"], atol=1e-5)
        assert float(opt.sum()) == pytest.approx(saved[i]["option_mass"], abs=1e-5)


# ---- reproducibility -------------------------------------------------------------------------------

def test_same_seed_same_result(de_run, tiny_lm, vsm, target, tmp_path):
    out_a, a, _ = de_run
    b = Aligner(tiny_lm, vsm, target, config(), tmp_path / "b").run()
    assert losses(a) == losses(b)
    for name in ("naive", "icl", "aligned"):
        assert a["profiles"][name]["items"] == b["profiles"][name]["items"]
        assert a["profiles"][name]["indices"] == b["profiles"][name]["indices"]
    assert torch.equal(prompt_tensor(out_a), prompt_tensor(tmp_path / "b"))


@pytest.mark.parametrize("kw", [
    {"init": "vocab", "dim": 2 * 32},  # dim == tokens * hidden: no projection
    {"init": "random", "seed": 3},
], ids=["vocab-full-dim", "random"])
def test_inits_and_full_dimension(kw, de_run, tiny_lm, vsm, target, tmp_path):
    cfg = config(budget=2 * POP, **kw)
    out = tmp_path / "run"
    result = Aligner(tiny_lm, vsm, target, cfg, out).run()
    assert result["settings"]["init"] == kw["init"] and result["settings"]["dim"] == kw.get("dim", 8)
    assert [h["evaluations"] for h in result["history"]] == [POP, 2 * POP]
    emb = prompt_tensor(out)
    assert emb.shape == (2, tiny_lm.hidden_size) and torch.isfinite(emb).all()
    assert not torch.equal(emb, prompt_tensor(de_run[0]))
    assert result["history"][0]["best_loss"] <= start_loss(tiny_lm, vsm, target, cfg, tmp_path / "unused") + 1e-4
    if kw.get("dim") == 64:  # identity projection: every coordinate moves at most sigma * std * sqrt(3)
        p0 = Aligner(tiny_lm, vsm, target, cfg, tmp_path / "unused")._p0()
        limit = 2.0 * embedding_std(tiny_lm) * 3 ** 0.5
        assert (emb - p0).abs().max() <= limit * (1 + 1e-5)
    sp = SoftPrompt.load(out)
    res = Survey(tiny_lm, vsm, "naive", target).result(sp.embeddings)
    for d in DIMS:
        assert res.indices[d] == pytest.approx(result["profiles"]["aligned"]["indices"][d], abs=1e-4)


def test_popsize_four(tiny_lm, vsm, target, tmp_path):
    """The smallest population AlignConfig/DEConfig accept must run."""
    result = Aligner(tiny_lm, vsm, target, config(budget=8, popsize=4), tmp_path / "p4").run()
    assert [h["evaluations"] for h in result["history"]] == [4, 8]


# ---- resume ------------------------------------------------------------------------------------------

def test_de_resume_after_interrupt(de_run, tiny_lm, vsm, target, tmp_path):
    out_a, a, _ = de_run
    out = tmp_path / "b"
    progress, seen = interrupt_after(1)
    with pytest.raises(Interrupt):
        Aligner(tiny_lm, vsm, target, config(), out, progress=progress).run()
    assert [i["generation"] for i in seen] == [0, 1]
    assert (out / CHECKPOINT).is_file() and not (out / "result.json").exists()
    ckpt = read(out / CHECKPOINT)
    assert len(ckpt["history"]) == 2 and ckpt["optimizer_state"]["generation"] == 1
    assert [h["best_loss"] for h in ckpt["history"]] == [h["best_loss"] for h in a["history"][:2]]

    # a folder with a checkpoint is not silently overwritten
    with pytest.raises(CulturalignError, match="--resume"):
        Aligner(tiny_lm, vsm, target, config(), out).run()
    # resuming with other settings names them
    with pytest.raises(CulturalignError, match="seed"):
        Aligner(tiny_lm, vsm, target, config(seed=1), out, resume=True).run()
    with pytest.raises(CulturalignError, match="sigma"):
        Aligner(tiny_lm, vsm, target, config(sigma=3.0), out, resume=True).run()
    with pytest.raises(CulturalignError, match="target"):
        Aligner(tiny_lm, vsm, load_target("JP"), config(), out, resume=True).run()
    assert read(out / CHECKPOINT) == ckpt  # refused resumes leave the checkpoint alone

    rest = []
    b = Aligner(tiny_lm, vsm, target, config(), out, resume=True, progress=rest.append).run()
    assert [i["generation"] for i in rest] == [2]  # only the remaining generation is run
    assert read(out / CHECKPOINT)["finished"] is True
    assert losses(read(out / "result.json")) == losses(a)
    assert b["profiles"]["aligned"]["indices"] == a["profiles"]["aligned"]["indices"]
    assert b["profiles"]["aligned"]["items"] == a["profiles"]["aligned"]["items"]
    assert torch.equal(prompt_tensor(out), prompt_tensor(out_a))

    # a finished run is not overwritten; resumed with the same budget there is nothing to do
    with pytest.raises(CulturalignError, match="finished run .* --resume"):
        Aligner(tiny_lm, vsm, target, config(), out).run()
    assert Aligner(tiny_lm, vsm, target, config(), out, resume=True).nothing_to_do
    with pytest.raises(CulturalignError, match="below the"):
        Aligner(tiny_lm, vsm, target, config(budget=2 * POP), out, resume=True)


def test_de_resume_after_initial_population(de_run, tiny_lm, vsm, target, tmp_path):
    """Interrupted right after the initial population (generation 0)."""
    out_a, a, _ = de_run
    out = tmp_path / "b0"
    progress, _ = interrupt_after(0)
    with pytest.raises(Interrupt):
        Aligner(tiny_lm, vsm, target, config(), out, progress=progress).run()
    assert len(read(out / CHECKPOINT)["history"]) == 1
    Aligner(tiny_lm, vsm, target, config(), out, resume=True).run()
    assert losses(read(out / "result.json")) == losses(a)
    assert torch.equal(prompt_tensor(out), prompt_tensor(out_a))


def test_finished_run_extends_to_the_longer_runs_result(de_run, tiny_lm, vsm, target, tmp_path):
    """A finished run resumed with a larger budget ends exactly where a run with that budget from the start ends."""
    import shutil

    out_a, a, _ = de_run
    longer = Aligner(tiny_lm, vsm, target, config(budget=4 * POP), tmp_path / "long").run()
    out = tmp_path / "ext"
    shutil.copytree(out_a, out)
    rest = []
    b = Aligner(tiny_lm, vsm, target, config(budget=4 * POP), out, resume=True, progress=rest.append).run()
    assert [i["generation"] for i in rest] == [3]  # only the new generation runs
    assert losses(b) == losses(longer)
    assert torch.equal(prompt_tensor(out), prompt_tensor(tmp_path / "long"))
    assert read(out / CHECKPOINT)["budget"] == 4 * POP


def test_resume_continues_the_clock(tiny_lm, vsm, target, tmp_path):
    out = tmp_path / "clock"
    progress, _ = interrupt_after(1)
    with pytest.raises(Interrupt):
        Aligner(tiny_lm, vsm, target, config(), out, progress=progress).run()
    before = read(out / CHECKPOINT)
    assert before["search_seconds"] >= before["history"][-1]["seconds"] > 0
    b = Aligner(tiny_lm, vsm, target, config(), out, resume=True).run()
    seconds = [h["seconds"] for h in b["history"]]
    assert seconds == sorted(seconds) and seconds[:2] == [h["seconds"] for h in before["history"]]
    assert seconds[2] > before["search_seconds"]  # the resumed generation counts on from the saved time
    assert b["search_seconds"] >= seconds[-1] - 0.1


@pytest.mark.parametrize("content,needle", [
    ("", "not valid JSON"),
    ('{"fingerprint": {', "not valid JSON"),
    ("[]", "expected a JSON object"),
    ("{}", "'fingerprint' is missing"),
    ('{"fingerprint": {"config": {}, "target": {}}, "optimizer_state": {}, "history": [], "budget": 6}', "no finished generation"),
    ('{"fingerprint": {"config": {}}, "optimizer_state": {}, "history": [{"evaluations": 6}], "budget": 6}', "settings"),
])
def test_damaged_checkpoint_is_one_clear_error(content, needle, tiny_lm, vsm, target, tmp_path):
    out = tmp_path / "damaged"
    out.mkdir()
    (out / CHECKPOINT).write_text(content)
    with pytest.raises(CulturalignError, match=needle) as e:
        Aligner(tiny_lm, vsm, target, config(), out, resume=True).run()
    assert "damaged" in str(e.value) and (out / CHECKPOINT).read_text() == content


def test_damaged_optimizer_state_is_one_clear_error(tiny_lm, vsm, target, tmp_path):
    out = tmp_path / "damaged"
    progress, _ = interrupt_after(0)
    with pytest.raises(Interrupt):
        Aligner(tiny_lm, vsm, target, config(), out, progress=progress).run()
    state = read(out / CHECKPOINT)
    del state["optimizer_state"]["rng"]
    (out / CHECKPOINT).write_text(json.dumps(state))
    with pytest.raises(CulturalignError, match="damaged"):
        Aligner(tiny_lm, vsm, target, config(), out, resume=True).run()


def test_out_with_unrelated_files_is_refused(tiny_lm, vsm, target, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CulturalignError, match="not empty"):
        Aligner(tiny_lm, vsm, target, config(), out).run()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(CulturalignError, match="nothing to resume"):
        Aligner(tiny_lm, vsm, target, config(), out, resume=True).run()


def test_adam_run(adam_run, tiny_lm, vsm, target):
    out, result = adam_run
    h = result["history"]
    assert [x["evaluations"] for x in h] == [1, 2, 3] and result["evaluations"] == 3
    assert [x["generation"] for x in h] == [1, 2, 3]
    best = [x["best_loss"] for x in h]
    assert all(b <= a for a, b in zip(best, best[1:]))
    assert best == list(np.minimum.accumulate([x["mean_loss"] for x in h]))
    assert h[-1]["mean_loss"] < h[0]["mean_loss"]  # gradient steps lower the loss
    assert result["settings"]["optimizer"] == "adam"
    assert read(out / CHECKPOINT)["finished"] is True
    # the saved prompt is the best prompt evaluated
    res = Survey(tiny_lm, vsm, "naive", target).result(SoftPrompt.load(out).embeddings)
    for d in DIMS:
        assert res.indices[d] == pytest.approx(result["profiles"]["aligned"]["indices"][d], abs=1e-4)


def test_adam_resume_after_interrupt(adam_run, tiny_lm, vsm, target, tmp_path):
    out_a, a = adam_run
    out = tmp_path / "b"
    progress, seen = interrupt_after(1)
    with pytest.raises(Interrupt):
        Aligner(tiny_lm, vsm, target, adam_config(), out, progress=progress).run()
    assert (out / CHECKPOINT).is_file() and not (out / "result.json").exists()
    assert len(read(out / CHECKPOINT)["history"]) == 1
    with pytest.raises(CulturalignError, match="lr"):
        Aligner(tiny_lm, vsm, target, adam_config(lr=0.2), out, resume=True).run()
    rest = []
    b = Aligner(tiny_lm, vsm, target, adam_config(), out, resume=True, progress=rest.append).run()
    assert [i["generation"] for i in rest] == [2, 3]
    assert losses(b) == losses(a)
    assert b["profiles"]["aligned"]["indices"] == a["profiles"]["aligned"]["indices"]
    assert torch.equal(prompt_tensor(out), prompt_tensor(out_a))


# ---- errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,needle", [
    ({"optimizer": "sgd"}, "optimizer"),
    ({"init": "zeros"}, "init"),
    ({"budget": 2 * POP - 1}, "budget"),
    ({"budget": 0, "optimizer": "adam"}, "budget"),
    ({"tokens": 0}, "tokens"),
    ({"lr": 0.0, "optimizer": "adam"}, "lr"),
    ({"popsize": 3, "budget": 100}, "popsize"),
    ({"strategy": "best2exp"}, "strategy"),
    ({"crossover": 1.5}, "crossover"),
    ({"dim": 0}, "dim"),
    ({"sigma": 0.0}, "sigma"),
    ({"sigma": float("nan")}, "sigma"),
    ({"sigma": float("inf")}, "sigma"),
    ({"lr": float("nan"), "optimizer": "adam"}, "lr"),
    ({"bound": float("inf")}, "bound"),
    ({"mass_floor": float("nan")}, "mass_floor"),
    ({"mass_floor": -1.0}, "mass_floor"),
    ({"mass_floor": 1.5}, "mass_floor"),
    ({"mass_weight": -100.0}, "mass_weight"),
    ({"mass_weight": float("inf")}, "mass_weight"),
    ({"seed": -1}, "seed"),
    ({"projection_seed": -3}, "projection_seed"),
    ({"init_text": "  "}, "init_text"),
])
def test_config_validation(kw, needle):
    from culturalign.alignment.config import flag
    from culturalign.errors import ConfigError

    with pytest.raises(CulturalignError, match=needle) as e:
        config(**kw)
    if isinstance(e.value, ConfigError):  # a setting out of range names its field; the CLI shows the flag
        assert needle in e.value.fields and flag(needle) in e.value.named(flag)


def test_config_valid_for_adam_with_small_budget():
    config(optimizer="adam", budget=1)  # the DE population rule does not apply to adam


def test_bad_projection_is_user_error_and_leaves_no_folder(tiny_lm, vsm, target, tmp_path):
    with pytest.raises(CulturalignError, match="dim"):
        Aligner(tiny_lm, vsm, target, config(dim=2 * 32 + 1), tmp_path / "x").run()
    assert not (tmp_path / "x").exists()  # the folder is created with the first checkpoint, not before


def test_out_is_a_file(tiny_lm, vsm, target, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CulturalignError, match="not a folder"):
        Aligner(tiny_lm, vsm, target, config(), f).run()


def test_finished_folder_is_protected(de_run, tiny_lm, vsm, target):
    out, _, _ = de_run
    before = (out / "result.json").read_bytes()
    with pytest.raises(CulturalignError, match="already holds a finished run"):
        Aligner(tiny_lm, vsm, target, config(seed=5), out).run()
    assert (out / "result.json").read_bytes() == before


# ---- every optimizer through the one loop -------------------------------------------------------------

def method_config(name: str, **kw) -> AlignConfig:
    budgets = {"cmaes": 3 * POP, "random": 3 * POP, "dfols": 12, "adam-subspace": 3}
    return config(optimizer=name, budget=budgets[name], lr=0.1, **kw)


@pytest.mark.parametrize("name", ["cmaes", "random", pytest.param("dfols", marks=needs_dfols), "adam-subspace"])
def test_every_optimizer_aligns_and_resumes_exactly(name, tiny_lm, vsm, target, tmp_path):
    """Each method runs through the loop, writes the same outputs as DE, and an interrupted run resumes
    (natively or by replay) to the bit-identical result of an uninterrupted one."""
    whole = Aligner(tiny_lm, vsm, target, method_config(name), tmp_path / "whole").run()
    h = whole["history"]
    assert whole["evaluations"] == h[-1]["evaluations"] <= whole["settings"]["budget"]
    assert all(a["best_loss"] >= b["best_loss"] for a, b in zip(h, h[1:]))
    assert whole["best_l1"] == h[-1]["best_l1"] and whole["settings"]["optimizer"] == name
    # the saved prompt reproduces the best loss the search recorded
    aligner = Aligner(tiny_lm, vsm, target, method_config(name), tmp_path / "unused")
    sv, cfg = aligner.survey, method_config(name)
    with torch.no_grad():
        again = sv.loss(sv.distributions(prompt_tensor(tmp_path / "whole").unsqueeze(0)), cfg.mass_floor, cfg.mass_weight)
    assert float(again[0]) == pytest.approx(whole["best_loss"], rel=1e-5, abs=1e-4)

    out = tmp_path / "cut"
    progress, _ = interrupt_after(2)
    with pytest.raises(Interrupt):
        Aligner(tiny_lm, vsm, target, method_config(name), out, progress=progress).run()
    rest = Aligner(tiny_lm, vsm, target, method_config(name), out, resume=True).run()
    assert losses(rest) == losses(whole)
    assert torch.equal(prompt_tensor(out), prompt_tensor(tmp_path / "whole"))


def test_history_option_mass_is_the_best_candidates(de_run):
    """best_option_mass follows the best candidate so far: it changes only when best_loss does."""
    _, result, _ = de_run
    h = result["history"]
    for a, b in zip(h, h[1:]):
        if b["best_loss"] == a["best_loss"]:
            assert b["best_option_mass"] == a["best_option_mass"]
    assert h[-1]["best_option_mass"] == pytest.approx(result["profiles"]["aligned"]["mean_option_mass"], abs=1e-5)
