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


# ---- Backend.loglikelihood and perplexity ----------------------------------------------------------------------

def reference_logprobs(lm, context, continuation, soft=None):
    """Plain computation: one unpadded full forward of [soft][context][continuation], full logits."""
    model = lm.model
    x = model.get_input_embeddings()(torch.tensor(context + continuation))
    if soft is not None:
        x = torch.cat([soft, x])
    logits = model(inputs_embeds=x.unsqueeze(0)).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    n0 = (0 if soft is None else soft.shape[0]) + len(context)
    return torch.stack([logp[n0 + i - 1, t] for i, t in enumerate(continuation)])


def _ids(lm, text):
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_loglikelihood_equals_a_plain_forward(tiny_lm):
    from culturalign.backends import LoglikelihoodRequest

    g = torch.Generator().manual_seed(3)
    texts = ["Answer options: strongly agree", "How proud are you to be a citizen of your country?",
             "have a boss you can respect", "moderation: having few desires and keeping time free for fun"]
    softs = [None, torch.randn(3, 32, generator=g) * 0.3, torch.randn(5, 32, generator=g) * 0.3, None]
    contexts = [[2], [2], [], [2, 5]]
    reqs = [LoglikelihoodRequest(c, _ids(tiny_lm, t), s) for c, t, s in zip(contexts, texts, softs)]
    with torch.no_grad():
        got = tiny_lm.loglikelihood(reqs)
        one_by_one = tiny_lm.loglikelihood(reqs, max_logits=1)  # every window its own forward pass
        for r, lp, lp1 in zip(reqs, got, one_by_one):
            ref = reference_logprobs(tiny_lm, r.context, r.continuation, r.soft)
            assert lp.shape == (len(r.continuation),)
            assert torch.allclose(lp, ref, atol=1e-5), (lp - ref).abs().max()
            assert torch.allclose(lp1, ref, atol=1e-5)
    assert not torch.allclose(got[0][:3], tiny_lm.loglikelihood([LoglikelihoodRequest([2], reqs[0].continuation, softs[1])])[0][:3])


def test_loglikelihood_rolling_windows(tiny_lm):
    from culturalign.backends import LoglikelihoodRequest

    ids = _ids(tiny_lm, " ".join(it.text for it in load_instrument().items[:6]))
    assert len(ids) > 40
    soft = torch.randn(3, 32, generator=torch.Generator().manual_seed(5)) * 0.3
    limit, start = 16, [2]
    with torch.no_grad():
        got = tiny_lm.loglikelihood([LoglikelihoodRequest(start, ids, soft)], max_length=limit)[0]
        full = tiny_lm.loglikelihood([LoglikelihoodRequest(start, ids, soft)])[0]
        # the documented windows: disjoint runs of cap = limit - 3 targets, each read after the cap tokens before it
        tokens, cap, expected = start + ids, limit - 3, []
        s = 1
        while s < len(tokens):
            e = min(len(tokens), s + cap)
            a = max(0, e - 1 - cap)
            expected.append(reference_logprobs(tiny_lm, tokens[a:s], tokens[s:e], soft))
            s = e
    expected = torch.cat(expected)
    assert got.shape == (len(ids),) and torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got[:cap], full[:cap], atol=1e-5)  # the first window sees the whole start
    assert not torch.allclose(got, full, atol=1e-3)  # later windows really see less context


def test_loglikelihood_bad_requests_and_gradient(tiny_lm):
    from culturalign.backends import LoglikelihoodRequest

    with pytest.raises(ValueError, match="nothing to be predicted from"):
        tiny_lm.loglikelihood([LoglikelihoodRequest([], [5, 6])])
    with pytest.raises(ValueError, match="no room"):
        tiny_lm.loglikelihood([LoglikelihoodRequest([2], [5], torch.zeros(8, 32))], max_length=8)
    assert tiny_lm.loglikelihood([LoglikelihoodRequest([2], [])])[0].shape == (0,)
    soft = (torch.randn(2, 32) * 0.1).requires_grad_(True)
    tiny_lm.loglikelihood([LoglikelihoodRequest([], [5, 6, 7], soft)])[0].sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0


def test_perplexity_with_and_without_a_soft_prompt(tiny_lm):
    from culturalign.heldout.perplexity import load_text, perplexity, start_token

    text, source = load_text()
    assert source.endswith("neutral.txt") and 250 <= len(text.split()) <= 450
    soft = torch.randn(4, 32, generator=torch.Generator().manual_seed(7)) * 0.3
    ids = _ids(tiny_lm, text)
    res = perplexity(tiny_lm, text, [None, soft])
    with torch.no_grad():
        for r, s in zip(res, [None, soft]):
            ref = reference_logprobs(tiny_lm, [start_token(tiny_lm.tokenizer)], ids, s)
            assert r["tokens"] == len(ids)
            assert r["perplexity"] == pytest.approx(math.exp(-ref.double().mean().item()), rel=1e-5)
    assert res[0]["perplexity"] != pytest.approx(res[1]["perplexity"], rel=1e-3)


def test_perplexity_text_errors(tmp_path):
    from culturalign.heldout.perplexity import load_text, start_token

    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(CulturalignError, match="empty.txt.*empty"):
        load_text(tmp_path / "empty.txt")
    with pytest.raises(CulturalignError, match="missing.txt"):
        load_text(tmp_path / "missing.txt")

    class NoSpecials:
        bos_token_id = eos_token_id = None

    with pytest.raises(CulturalignError, match="neither a BOS nor an EOS"):
        start_token(NoSpecials())
