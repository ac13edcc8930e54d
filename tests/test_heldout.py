"""Held-out checks: paraphrase coverage, reversed options, log-likelihoods and perplexity, the MCQ check,
`run_heldout` and the `mcq` / `heldout` commands. Tiny models built in code (conftest); no download."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from culturalign import CulturalignError, load_instrument
from culturalign.instrument import Item, paraphrase_variants
from culturalign.prompts import user_text
from culturalign.survey import Survey
from conftest import bigram_backend


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def answers_1(tiny_tokenizer):
    """A model that (after "Answer: ") always says "1": the first option listed."""
    return bigram_backend(tiny_tokenizer, "1", name="says-1")


# ---- paraphrased items --------------------------------------------------------------------------------------

def test_paraphrase_variants_cover_every_item(vsm):
    assert paraphrase_variants("vsm2013") == ["vsm2013-para-a", "vsm2013-para-b"]
    variants = [load_instrument(v) for v in paraphrase_variants("vsm2013")]
    for v in variants:
        assert v.variant_of == "vsm2013"
        assert v.item_ids == vsm.item_ids  # every item, in the same order
        assert v.weights.tolist() == vsm.weights.tolist() and v.dims == vsm.dims
        for orig, para in zip(vsm.items, v.items):
            assert para.options == orig.options  # same scale: codes keep their meaning
            assert (para.section is None) == (orig.section is None)
            assert para.text.strip() and para.text.casefold() != orig.text.casefold(), para.id
            if orig.section:
                assert para.section != orig.section
    a, b = variants
    assert all(x.text != y.text for x, y in zip(a.items, b.items))  # two different paraphrases of each item


# ---- reversed options -----------------------------------------------------------------------------------------

def test_reversed_instrument_presents_the_options_backwards(vsm):
    rev = load_instrument("vsm2013-reversed")
    assert rev.id == "vsm2013-reversed" and rev.source == "vsm2013-reversed"
    assert rev.codes == vsm.codes and rev.weights.tolist() == vsm.weights.tolist()
    for orig, r in zip(vsm.items, rev.items):
        assert r.options == orig.options  # the code -> label meaning is unchanged
        assert r.presented_options == tuple(reversed(orig.options))
    text = user_text(rev.items[20], rev.codes)  # an agreement item
    assert "1. strongly disagree" in text and "5. strongly agree" in text
    assert "1. strongly agree" in user_text(vsm.items[20], vsm.codes)
    twice = rev.reversed()
    assert twice.id == "vsm2013" and all(it.order is None for it in twice.items)
    assert load_instrument("vsm2013-para-b-reversed").items[0].presented_options == tuple(reversed(vsm.items[0].options))
    with pytest.raises(CulturalignError, match="nope-reversed"):
        load_instrument("nope-reversed")


def test_item_order_must_be_a_permutation():
    with pytest.raises(ValueError, match="permutation"):
        Item(1, "t", ("a", "b", "c"), order=(0, 0, 1))


def test_mapping_back_is_exact_on_a_model_that_always_picks_the_first_option(answers_1, vsm):
    rev = vsm.reversed()
    orig = Survey(answers_1, vsm, "naive").result()
    back = Survey(answers_1, rev, "naive").result()
    for a, b in zip(orig.items, back.items):
        assert a["probs"] == [1.0, 0.0, 0.0, 0.0, 0.0]  # the first option listed is code 1 ...
        assert b["probs"] == [0.0, 0.0, 0.0, 0.0, 1.0]  # ... and, reversed, the mirrored code 5
        assert a["mean"] == 1.0 and b["mean"] == 5.0
        assert a["option_mass"] == pytest.approx(0.75, abs=1e-5) and b["option_mass"] == pytest.approx(0.75, abs=1e-5)
    # indices are W @ means: every item mean mirrored (m -> 6 - m) flips the sign of every index
    for d in vsm.dims:
        assert back.indices[d] == pytest.approx(-orig.indices[d], abs=1e-9)


def test_mapping_back_in_sample_mode(answers_1, vsm):
    res = Survey(answers_1, vsm.reversed(), "naive").sample(n=8, temperature=1.0, seed=0)
    for it in res.items:
        assert it["probs"][:4] == [0.0, 0.0, 0.0, 0.0] and it["probs"][4] == 1.0  # parsed "1" -> code 5
    assert 0 < res.extra["unparsable"] < 24 * 8  # the model's 1/4 of "Answer" answers are counted, not mapped


def test_reversed_distributions_are_the_presented_ones_flipped(tiny_lm, vsm):
    rev = Survey(tiny_lm, vsm.reversed(), "naive")
    raw = tiny_lm.option_distributions(rev.prompts, rev.option_ids)  # per presented position
    mapped = rev.distributions()
    assert torch.equal(mapped.probs, raw.probs.flip(-1)) and torch.equal(mapped.mass, raw.mass)
    assert not torch.allclose(raw.probs, raw.probs.flip(-1))  # a real test: the distributions are not symmetric


def test_to_code_order_any_permutation_numpy_and_torch():
    from dataclasses import replace

    inst = load_instrument("vsm2013")
    inst = replace(inst, items=[replace(it, order=(2, 0, 4, 1, 3)) if i % 2 else it for i, it in enumerate(inst.items)])
    shown = np.random.default_rng(0).dirichlet(np.ones(5), size=(3, 24))  # [P, I, K] per presented position
    codes = inst.to_code_order(shown)
    for i in range(24):
        order = (2, 0, 4, 1, 3) if i % 2 else (0, 1, 2, 3, 4)
        for pos, k in enumerate(order):  # shown at position pos: option k, i.e. code k + 1
            assert codes[:, i, k].tolist() == shown[:, i, pos].tolist()
    assert np.array_equal(inst.to_code_order(torch.tensor(shown)).numpy(), codes)


def test_reversed_survey_is_differentiable(tiny_lm, vsm):
    s = Survey(tiny_lm, vsm.reversed(), "naive", target=None)
    soft = (torch.randn(1, 2, tiny_lm.hidden_size) * 0.1).requires_grad_(True)
    s.indices(s.distributions(soft)).sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
