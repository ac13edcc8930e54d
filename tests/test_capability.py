"""The capability penalty (align --capability) and sgn end to end through Aligner, on the tiny model."""

import json
import math

import numpy as np
import pytest
import torch

from culturalign import CulturalignError, load_target
from culturalign.alignment.config import AlignConfig
from culturalign.alignment.run import Aligner
from culturalign.heldout.perplexity import perplexity
from culturalign.alignment.objective import CapabilityPenalty

TEXT = "The river runs past the old mill and under a stone bridge before it reaches the sea."


def test_penalty_is_the_perplexity_ratio_past_the_bound(tiny_lm):
    torch.manual_seed(0)
    soft = torch.randn(2, 3, tiny_lm.hidden_size) * 5
    ref = perplexity(tiny_lm, TEXT, [None, soft[0], soft[1]])  # the held-out check's own definition
    ratios = [r["perplexity"] / ref[0]["perplexity"] for r in ref[1:]]
    cap = CapabilityPenalty(tiny_lm, max_ratio=1.0 + 1e-9, weight=2.0, text=TEXT)
    pen = cap(soft).tolist()
    for p, ratio in zip(pen, ratios):
        assert p == pytest.approx(2.0 * max(0.0, math.log(ratio)), abs=1e-4)
    loose = CapabilityPenalty(tiny_lm, max_ratio=max(ratios) * 1.01, text=TEXT)
    assert loose(soft).tolist() == [0.0, 0.0]


def test_penalty_is_differentiable(tiny_lm):
    soft = (torch.randn(1, 2, tiny_lm.hidden_size) * 5).requires_grad_(True)
    CapabilityPenalty(tiny_lm, max_ratio=1.0 + 1e-9, text=TEXT)(soft).sum().backward()
    assert soft.grad is not None and torch.isfinite(soft.grad).all() and soft.grad.abs().sum() > 0


def test_method_defaults_and_checks():
    assert (AlignConfig(optimizer="de").capability, AlignConfig(optimizer="de").mass_floor) == (0.0, 0.5)
    sgn = AlignConfig(optimizer="sgn")
    assert (sgn.capability, sgn.mass_floor, sgn.mass_weight) == (1.5, 0.8, 1000.0)
    assert AlignConfig(optimizer="sgn", capability=0, mass_floor=0.5).capability == 0  # explicit values win
    with pytest.raises(CulturalignError, match="^capability must be 0 .off. or a perplexity ratio > 1, got 0.5"):
        AlignConfig(optimizer="de", capability=0.5)


def test_sgn_align_run_resumes_bit_identically(tiny_lm, vsm, tmp_path):
    """sgn through Aligner with the capability penalty on: an interrupted run resumes to the same soft prompt."""
    target = load_target("CN")
    cfg = lambda: AlignConfig(optimizer="sgn", budget=23, tokens=2, probes=4, sgn_steps=2, window=8)  # noqa: E731
    whole = Aligner(tiny_lm, vsm, target, cfg(), tmp_path / "a").run()

    class Stop(KeyboardInterrupt):
        pass

    def stop(info):
        if info["evaluations"] >= 11:
            raise Stop

    with pytest.raises(Stop):
        Aligner(tiny_lm, vsm, target, cfg(), tmp_path / "b", progress=stop).run()
    rest = Aligner(tiny_lm, vsm, target, cfg(), tmp_path / "b", resume=True).run()
    drop = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert drop(rest["history"]) == drop(whole["history"])
    a = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    assert whole["settings"]["capability"] == 1.5 and whole["settings"]["optimizer"] == "sgn"
    assert whole["best_loss"] <= whole["history"][0]["best_loss"]


def test_contrast_term_is_minus_the_mean_l1_to_the_other_cultures():
    from culturalign.alignment.objective import ContrastTerm
    from culturalign.measure.targets import Target

    dims = ["A", "B", "C"]
    others = [Target("x", {"A": 10.0, "B": 20.0, "C": 0.0}), Target("y", {"A": 0.0, "B": 0.0, "C": 50.0}),
              Target("z", {"A": 5.0})]  # z lacks B: left out
    mask = torch.tensor([True, True, False])  # the target publishes A and B only
    term = ContrastTerm(mask, others, dims, weight=0.5)
    ind = torch.tensor([[0.0, 0.0, 99.0], [10.0, 20.0, 0.0]])
    # row 0: L1 to x = 30, to y = 0 -> mean 15; row 1: to x = 0, to y = 30 -> mean 15
    assert term(ind).tolist() == [-7.5, -7.5]
    with pytest.raises(CulturalignError, match="--contrast needs other cultures"):
        ContrastTerm(mask, [others[2]], dims)


def test_contrast_enters_the_align_loss(tiny_lm, vsm, tmp_path):
    target = load_target("CN")
    plain = Aligner(tiny_lm, vsm, target, AlignConfig(optimizer="de", budget=12, popsize=6, tokens=2, dim=4), tmp_path / "a").run()
    con = Aligner(tiny_lm, vsm, target, AlignConfig(optimizer="de", budget=12, popsize=6, tokens=2, dim=4, contrast=0.5),
                  tmp_path / "b").run()
    assert con["history"][0]["best_l1"] == plain["history"][0]["best_l1"]  # same candidates, same L1
    assert con["best_loss"] < plain["best_loss"] - 10  # minus half the mean L1 to 110 other cultures
