import copy

import numpy as np
import pytest
import torch

from culturalign import CulturalignError, load_target
from culturalign.backends import HFBackend
from culturalign.backends.base import common_prefix_len
from culturalign.backends.hf import plain_option_distributions
from culturalign.measure.prompts import encode_items, level, option_token_ids, render, system_text, user_text
from culturalign.measure.survey import Survey, parse_answer, sample_answers

TOL = 1e-5


@pytest.fixture(scope="module")
def china():
    return load_target("CN")


@pytest.fixture(scope="module")
def naive(tiny_lm, vsm, china):
    return Survey(tiny_lm, vsm, "naive", china)


@pytest.fixture(scope="module")
def softs(tiny_lm):
    g = torch.Generator().manual_seed(123)
    return torch.randn(3, 4, tiny_lm.hidden_size, generator=g) * 0.2


def _reference(lm, seq, option_ids, soft=None):
    """One unpadded sequence: [soft prompt][item tokens], last-position logits, options renormalized."""
    emb = lm.model.get_input_embeddings()
    x = emb(torch.tensor(seq))
    if soft is not None:
        x = torch.cat([soft, x], 0)
    with torch.no_grad():
        logits = lm.model(inputs_embeds=x.unsqueeze(0)).logits[0, -1]
    full = torch.softmax(logits.double(), -1)
    opt = full[option_ids]
    return opt / opt.sum(), opt.sum()


# ---- prompts ----------------------------------------------------------------------------------------

def test_items_end_where_the_answer_code_goes(naive, tiny_lm):
    tok = tiny_lm.tokenizer
    assert len(naive.sequences) == 24
    assert [tok.decode([i]) for i in naive.option_ids] == ["1", "2", "3", "4", "5"]
    for seq in naive.sequences:
        assert tok.decode(seq).endswith("<|im_start|>assistant\nAnswer: ")
    text = tok.decode(naive.sequences[19])
    assert "1. never" in text and "5. always" in text  # item 20's own scale
    assert text.index("Answer options:") < text.index("How often, in your experience")
    assert "<|im_start|>system" not in text  # naive: no system turn


def test_profiles_system_text(china):
    assert system_text("naive", china) is None
    p = system_text("persona", china)
    assert "typical person from China" in p
    assert "80" not in p
    icl = system_text("icl", china)
    assert icl.startswith(p)
    assert "power distance 80 (high)" in icl and "individualism 20 (low)" in icl
    sa = system_text("icl", load_target("SA"))
    assert "long-term orientation 36 (moderate)" in sa and "power distance" not in sa
    with pytest.raises(CulturalignError, match="needs a target"):
        system_text("persona", None)
    with pytest.raises(CulturalignError, match="unknown prompt"):
        system_text("cat", china)


def test_level_boundaries():
    assert [level(x) for x in (0, 34.9, 35, 65, 65.1, 110)] == ["low", "low", "moderate", "moderate", "high", "high"]


def test_persona_prompt_encodes(tiny_lm, vsm, china):
    seqs, ids = encode_items(tiny_lm.tokenizer, vsm, "persona", china)
    text = tiny_lm.tokenizer.decode(seqs[0])
    assert text.startswith("<|im_start|>system\nYou are a typical person from China.")
    assert text.endswith("Answer: ")


def test_render_folds_system_into_user_when_template_rejects_it(tiny_lm):
    tok = copy.deepcopy(tiny_lm.tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    text = render(tok, "SYS TEXT", "USER TEXT")
    assert text == "<|im_start|>user\nSYS TEXT\n\nUSER TEXT<|im_end|>\n<|im_start|>assistant\nAnswer:"


def test_option_tokens_must_be_single(tiny_lm, vsm):
    tok = tiny_lm.tokenizer
    text = render(tok, None, user_text(vsm.items[0], vsm.codes))
    ids, tail = option_token_ids(tok, text, (1, 2, 3, 4, 5))
    assert tail == " "
    with pytest.raises(CulturalignError, match="single tokens"):
        option_token_ids(tok, text, (9, 10, 11))  # "10" is two digit tokens


# ---- evaluator vs references --------------------------------------------------------------------------

def test_common_prefix_len():
    assert common_prefix_len([]) == 0
    assert common_prefix_len([[1, 2, 3]]) == 3
    assert common_prefix_len([[1, 2, 3], [1, 2, 4]]) == 2
    assert common_prefix_len([[1, 2], [1, 2, 3]]) == 2
    assert common_prefix_len([[1, 2, 3], [1, 2, 3, 4], [1, 9]]) == 1
    assert common_prefix_len([[5], [6]]) == 0
    assert common_prefix_len([[1, 2], []]) == 0


def test_evaluator_structure(naive):
    ev = naive.prompts
    covered = sorted(i for items, _, _ in ev.stages for i in items)
    assert covered == list(range(24))
    for items, shared, suffixes in ev.stages:
        for i, suf in zip(items, suffixes):
            assert ev.root + shared + suf == naive.sequences[i]
            assert len(suf) >= 1
    assert 0 < ev.tokens_per_candidate < ev.plain_tokens_per_candidate


@pytest.mark.parametrize("profile", ["naive", "icl"])
def test_evaluator_equals_plain_without_soft_prompt(tiny_lm, vsm, china, profile):
    s = Survey(tiny_lm, vsm, profile, china)
    with torch.no_grad():
        d = s.distributions()
        ref = plain_option_distributions(tiny_lm, s.sequences, s.option_ids)
    assert d.probs.shape == (1, 24, 5) and d.mass.shape == (1, 24)
    torch.testing.assert_close(d.probs, ref.probs, atol=TOL, rtol=0)
    torch.testing.assert_close(d.mass, ref.mass, atol=TOL, rtol=1e-4)
    # items really differ (the comparison is not between constants)
    assert d.probs.std(dim=1).max() > 0.05


def test_evaluator_equals_plain_with_soft_prompts(naive, tiny_lm, softs):
    with torch.no_grad():
        d = naive.distributions(softs)
        ref = plain_option_distributions(tiny_lm, naive.sequences, naive.option_ids, softs)
    assert d.probs.shape == (3, 24, 5)
    torch.testing.assert_close(d.probs, ref.probs, atol=TOL, rtol=0)
    torch.testing.assert_close(d.mass, ref.mass, atol=TOL, rtol=1e-4)
    # the soft prompt matters, and each candidate gets its own answers
    assert (d.probs[0] - d.probs[1]).abs().max() > 0.05
    assert (d.probs[0] - naive.distributions().probs[0]).abs().max() > 0.05


@pytest.mark.parametrize("max_rows,groups", [(1, "sections"), (5, "sections"), (7, None), (1000, "all")])
def test_evaluator_chunking_and_grouping(naive, tiny_lm, vsm, softs, max_rows, groups):
    if groups == "sections":
        g = [[i for i, it in enumerate(vsm.items) if it.section == sec] for sec in dict.fromkeys(
            it.section for it in vsm.items if it.section)]
    elif groups == "all":
        g = [list(range(24))]
    else:
        g = None
    backend = HFBackend(tiny_lm.model, tiny_lm.tokenizer, name="tiny", device=tiny_lm.device, max_rows=max_rows)
    with torch.no_grad():
        d = backend.option_distributions(backend.prompt_set(naive.sequences, g), naive.option_ids, softs)
        ref = naive.distributions(softs)
    torch.testing.assert_close(d.probs, ref.probs, atol=TOL, rtol=0)
    torch.testing.assert_close(d.mass, ref.mass, atol=TOL, rtol=1e-4)


def test_evaluator_equals_unpadded_single_sequences(naive, tiny_lm, softs):
    with torch.no_grad():
        plain = naive.distributions()
        soft = naive.distributions(softs)
    for i, seq in enumerate(naive.sequences):
        p, m = _reference(tiny_lm, seq, naive.option_ids)
        np.testing.assert_allclose(plain.probs[0, i].double().numpy(), p.numpy(), atol=TOL)
        np.testing.assert_allclose(plain.mass[0, i].item(), m.item(), rtol=1e-4, atol=1e-7)
        for c in (0, 2):
            p, m = _reference(tiny_lm, seq, naive.option_ids, softs[c])
            np.testing.assert_allclose(soft.probs[c, i].double().numpy(), p.numpy(), atol=TOL)
            np.testing.assert_allclose(soft.mass[c, i].item(), m.item(), rtol=1e-4, atol=1e-7)


def test_probabilities_are_distributions(naive, softs):
    with torch.no_grad():
        for d in (naive.distributions(), naive.distributions(softs)):
            torch.testing.assert_close(d.probs.sum(-1), torch.ones(d.probs.shape[:2]), atol=1e-5, rtol=0)
            assert (d.probs >= 0).all()
            assert ((d.mass > 0) & (d.mass <= 1 + 1e-6)).all()


def test_bigram_model_answers_three_with_mass_three_quarters(bigram_lm, vsm):
    s = Survey(bigram_lm, vsm, "naive", load_target("CN"))
    r = s.result()
    for it in r.items:
        assert it["probs"] == pytest.approx([0, 0, 1, 0, 0], abs=1e-6)
        assert it["mean"] == pytest.approx(3.0)
        assert it["option_mass"] == pytest.approx(0.75, abs=1e-4)
    assert r.indices == pytest.approx({d: 0.0 for d in vsm.dims}, abs=1e-4)
    assert r.l1 == pytest.approx(80 + 20 + 66 + 30 + 87 + 24, abs=1e-3)


def test_gradient_flows_to_soft_prompt(naive, tiny_lm, softs):
    soft = softs.clone().requires_grad_(True)
    loss = naive.loss(naive.distributions(soft))
    assert loss.shape == (3,)
    loss.sum().backward()
    g = soft.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # same gradient as the plain reference path
    soft2 = softs.clone().requires_grad_(True)
    naive.loss(plain_option_distributions(tiny_lm, naive.sequences, naive.option_ids, soft2)).sum().backward()
    torch.testing.assert_close(g, soft2.grad, atol=1e-4, rtol=1e-3)
    # the frozen model gets no gradient
    assert all(p.grad is None for p in tiny_lm.model.parameters())


def test_no_grad_without_requires_grad(naive, softs):
    d = naive.distributions(softs)
    assert not d.probs.requires_grad


def test_indices_and_loss(naive, vsm, china, softs):
    with torch.no_grad():
        d = naive.distributions(softs)
        ind = naive.indices(d)
        loss = naive.loss(d)
    means = (d.probs.double() @ torch.arange(1, 6, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ind.numpy(), vsm.score(means), atol=1e-3)
    target = np.array([china.scores[x] for x in vsm.dims])
    np.testing.assert_allclose(loss.numpy(), np.abs(ind.numpy() - target).sum(-1), rtol=1e-5)
    # option-mass penalty: mass_weight * mean(relu(floor - mass)); with floor 1 every item is below it
    with torch.no_grad():
        pen = naive.loss(d, mass_floor=1.0, mass_weight=10.0) - loss
    np.testing.assert_allclose(pen.numpy(), 10 * (1 - d.mass.double().numpy()).mean(-1), rtol=1e-4)


def test_loss_uses_only_target_dims(tiny_lm, vsm):
    sa = load_target("SA")  # 2015: LTO and IVR only
    s = Survey(tiny_lm, vsm, "naive", sa)
    with torch.no_grad():
        d = s.distributions()
        ind = s.indices(d)[0]
        loss = s.loss(d)[0]
    lto, ivr = vsm.dims.index("LTO"), vsm.dims.index("IVR")
    assert loss.item() == pytest.approx(abs(ind[lto].item() - 36) + abs(ind[ivr].item() - 52), rel=1e-5)
    r = s.result()
    assert r.l1_dims == ["LTO", "IVR"] and r.missing_dims == ["PDI", "IDV", "MAS", "UAI"]
    assert r.l1 == pytest.approx(loss.item(), abs=1e-3)


def test_loss_without_target_is_error(tiny_lm, vsm):
    s = Survey(tiny_lm, vsm, "naive", None)
    with pytest.raises(CulturalignError, match="target"):
        s.loss(s.distributions())


def test_result_matches_distributions(naive, softs, vsm):
    with torch.no_grad():
        d = naive.distributions(softs[1:2])
    r = naive.result(softs[1], label="soft")  # [n, H] is accepted
    assert r.prompt == "soft" and r.mode == "logprob"
    probs = np.array([it["probs"] for it in r.items])
    np.testing.assert_allclose(probs, d.probs[0].numpy(), atol=2e-6)
    np.testing.assert_allclose([it["option_mass"] for it in r.items], d.mass[0].numpy(), atol=2e-6)
    means = np.array([it["mean"] for it in r.items])
    np.testing.assert_allclose(means, probs @ np.arange(1, 6), atol=1e-5)
    np.testing.assert_allclose([r.indices[x] for x in vsm.dims], vsm.score(means), atol=1e-3)
    j = r.to_json()
    assert j["target"] == load_target("CN").to_json() and j["target"]["set"] == "hofstede-2015"
    assert j["mean_option_mass"] == pytest.approx(float(d.mass.mean()), abs=1e-5)


def test_survey_constants(tiny_lm, vsm):
    s = Survey(tiny_lm, vsm, "naive", None, constants={"PDI": 20})
    s0 = Survey(tiny_lm, vsm, "naive", None)
    r, r0 = s.result(), s0.result()
    assert r.constants["PDI"] == 20.0
    assert r.indices["PDI"] == pytest.approx(r0.indices["PDI"] + 20)
    assert r.indices["IDV"] == pytest.approx(r0.indices["IDV"])
    assert r.l1 is None and r.l1_dims == []


def test_target_without_instrument_dims_is_error(tiny_lm, vsm):
    from culturalign.measure.targets import Target

    with pytest.raises(CulturalignError, match="none of the instrument"):
        Survey(tiny_lm, vsm, "naive", Target("Nowhere", {"XYZ": 1.0}))


# ---- sample mode ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("3", 3), (" 4.", 4), ("(2)", 2), ("( 5 )", 5), ("\n1 - of utmost importance", 1), ("1", 1),
    ("7", None), ("0", None), ("abc", None), ("12", None), ("", None), ("three", None), ("A 3", None),
])
def test_parse_answer(text, expected):
    assert parse_answer(text, (1, 2, 3, 4, 5)) == expected


def test_sample_random_model_counts_unparsable(tiny_lm, vsm, monkeypatch):
    """A random tiny model mostly babbles: every answer is either counted or counted as unparsable."""
    import culturalign.measure.survey as survey_mod

    seen = []

    def spy(*args, **kwargs):  # records what Survey.sample got from sample_answers, changes nothing
        seen.append(sample_answers(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(survey_mod, "sample_answers", spy)
    s = Survey(tiny_lm, vsm, "naive", None)
    n = 2
    try:
        r, err = s.sample(n, seed=0), None
    except CulturalignError as e:
        r, err = None, str(e)
    (smp,) = seen
    assert smp.counts.shape == (24, 5) and smp.unparsable.shape == (24,)
    assert int(smp.counts.sum() + smp.unparsable.sum()) == n * 24
    assert (smp.counts.sum(1) + smp.unparsable == n).all()
    for ex, bad in zip(smp.examples, smp.unparsable):
        assert len(ex) == min(3, bad)
        assert all(parse_answer(t, vsm.codes) is None for t in ex)
    parsed = smp.counts.sum(1)
    if (parsed == 0).any():  # Survey.sample must refuse, naming the items without a parsable answer
        missing = [int(i) + 1 for i in np.flatnonzero(parsed == 0)]
        assert err is not None and "no parsable answer" in err and str(missing) in err
    else:
        assert err is None
        assert [it["unparsable"] for it in r.items] == smp.unparsable.tolist()
        assert r.extra["unparsable"] == int(smp.unparsable.sum())


def test_sample_bigram_model(bigram_lm, vsm):
    s = Survey(bigram_lm, vsm, "naive", load_target("CN"))
    n = 6
    r = s.sample(n, seed=0)
    assert r.mode == "sample" and r.extra["samples_per_item"] == n
    total_bad = 0
    for it in r.items:
        assert it["probs"] == [0.0, 0.0, 1.0, 0.0, 0.0]
        assert it["mean"] == 3.0
        assert it["option_mass"] == pytest.approx((n - it["unparsable"]) / n, abs=1e-6)
        assert len(it.get("unparsable_examples", [])) == min(3, it["unparsable"])
        assert all(ex.startswith("Answer") for ex in it.get("unparsable_examples", []))
        total_bad += it["unparsable"]
    assert r.extra["unparsable"] == total_bad
    assert 0.05 < total_bad / (24 * n) < 0.45  # the model says "Answer" a quarter of the time
    assert r.indices == pytest.approx({d: 0.0 for d in vsm.dims})


def test_sample_with_soft_prompt(bigram_lm, vsm):
    s = Survey(bigram_lm, vsm, "naive", None)
    soft = torch.randn(2, bigram_lm.hidden_size, generator=torch.Generator().manual_seed(3)) * 0.02
    smp = sample_answers(bigram_lm, s.sequences[:4], vsm.codes, n=3, soft=soft.unsqueeze(0), seed=1)
    assert (smp.counts.sum(1) + smp.unparsable == 3).all()
    assert smp.counts[:, [0, 1, 3, 4]].sum() == 0


def test_sample_greedy(bigram_lm, vsm):
    """Temperature 0 is greedy: the bigram model always says 3."""
    s = Survey(bigram_lm, vsm, "naive", None)
    r = s.sample(1, temperature=0)
    assert all(it["probs"] == [0.0, 0.0, 1.0, 0.0, 0.0] and it["unparsable"] == 0 for it in r.items)


def test_sample_greedy_several_samples(bigram_lm, vsm):
    """`--temperature 0 --samples 2` must give two (identical) greedy answers or a one-line user error."""
    s = Survey(bigram_lm, vsm, "naive", None)
    try:
        r = s.sample(2, temperature=0)
    except CulturalignError:
        return
    assert all(it["probs"] == [0.0, 0.0, 1.0, 0.0, 0.0] and it["unparsable"] == 0 for it in r.items)


def test_sample_needs_one_sample(naive):
    with pytest.raises(CulturalignError, match="at least 1"):
        naive.sample(0)
