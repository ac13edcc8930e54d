"""The Backend interface: per-row soft prompts in option distributions and generation; the layering rule."""

import re
from pathlib import Path

import pytest
import torch

from culturalign import load_target
from culturalign.backends import Backend, GenerationRequest, HFBackend, LoglikelihoodRequest, PromptSet, TextStream
from culturalign.backends.hf import plain_option_distributions
from culturalign.measure.survey import Survey

TOL = 1e-5
SRC = Path(__file__).resolve().parents[1] / "src" / "culturalign"


@pytest.fixture(scope="module")
def survey(tiny_lm, vsm):
    return Survey(tiny_lm, vsm, "naive", load_target("CN"))


@pytest.fixture(scope="module")
def sections(vsm):
    return [[i for i, it in enumerate(vsm.items) if it.section == sec]
            for sec in dict.fromkeys(it.section for it in vsm.items if it.section)]


def mixed_rows(hidden: int, requires_grad: bool = False) -> list:
    """Three soft prompts of different lengths and a row without one, the None row between them."""
    g = torch.Generator().manual_seed(11)
    rows = [torch.randn(n, hidden, generator=g) * 0.2 for n in (2, 5, 3)]
    rows = [t.requires_grad_(requires_grad) for t in rows]
    return [rows[0], None, rows[1], rows[2]]


def alone(backend, prompts, option_ids, row):
    return backend.option_distributions(prompts, option_ids, None if row is None else row.unsqueeze(0))


def test_hf_backend_is_a_backend(tiny_lm):
    assert isinstance(tiny_lm, Backend)
    info = tiny_lm.model_info()
    assert info["num_layers"] == 2 and info["num_attention_heads"] == 4
    assert info["hidden_size"] == tiny_lm.hidden_size == 32 and info["max_context"] == 1024
    table = tiny_lm.embedding_table()
    assert table.shape == (len(tiny_lm.tokenizer), 32) and table.dtype == torch.float32
    assert table.device.type == "cpu" and not table.requires_grad
    assert torch.equal(tiny_lm.embed([5, 7]), table[[5, 7]])


# ---- option distributions, a soft prompt per row ------------------------------------------------------

@pytest.mark.parametrize("grouped,max_rows", [(True, 96), (False, 96), (True, 5), (False, 7)])
def test_mixed_soft_prompts_equal_each_row_alone(tiny_lm, survey, sections, grouped, max_rows):
    backend = HFBackend(tiny_lm.model, tiny_lm.tokenizer, name="tiny", device=tiny_lm.device, max_rows=max_rows)
    prompts = backend.prompt_set(survey.sequences, sections if grouped else None)
    rows = mixed_rows(backend.hidden_size)
    with torch.no_grad():
        d = backend.option_distributions(prompts, survey.option_ids, rows)
        plain = plain_option_distributions(backend, prompts, survey.option_ids, rows)
        assert d.probs.shape == (4, 24, 5) and d.mass.shape == (4, 24)
        for p, row in enumerate(rows):
            one = alone(backend, prompts, survey.option_ids, row)
            assert (d.probs[p] - one.probs[0]).abs().max() < TOL
            assert (d.mass[p] - one.mass[0]).abs().max() < TOL
            ref = plain_option_distributions(backend, survey.sequences, survey.option_ids,
                                             None if row is None else row.unsqueeze(0))
            assert (d.probs[p] - ref.probs[0]).abs().max() < TOL
            assert (d.mass[p] - ref.mass[0]).abs().max() < TOL
    assert (d.probs - plain.probs).abs().max() < TOL and (d.mass - plain.mass).abs().max() < TOL
    # every row gets its own answers (the comparison is not between equal rows)
    for a in range(4):
        for b in range(a):
            assert (d.probs[a] - d.probs[b]).abs().max() > 0.05


def test_equal_lengths_take_the_unpadded_path(tiny_lm, survey):
    """A list of same-length prompts is the [P, n, H] tensor; a list of Nones is P rows without one."""
    g = torch.Generator().manual_seed(2)
    soft = torch.randn(3, 4, tiny_lm.hidden_size, generator=g) * 0.2
    with torch.no_grad():
        a = survey.distributions(soft)
        b = survey.distributions(list(soft))
        none = survey.distributions([None, None])
        one = survey.distributions()
    assert torch.equal(a.probs, b.probs) and torch.equal(a.mass, b.mass)
    assert none.probs.shape == (2, 24, 5)
    assert (none.probs - one.probs).abs().max() < TOL  # another batch shape: equal up to rounding


def test_gradients_reach_every_row(tiny_lm, survey):
    rows = mixed_rows(tiny_lm.hidden_size, requires_grad=True)
    d = survey.distributions(rows)
    assert d.probs.requires_grad
    survey.loss(d).sum().backward()
    refs = mixed_rows(tiny_lm.hidden_size, requires_grad=True)
    survey.loss(plain_option_distributions(tiny_lm, survey.sequences, survey.option_ids, refs)).sum().backward()
    for row, ref in zip(rows, refs):
        if row is None:
            continue
        assert row.grad is not None and torch.isfinite(row.grad).all() and row.grad.abs().sum() > 0
        torch.testing.assert_close(row.grad, ref.grad, atol=1e-4, rtol=1e-3)
    assert all(p.grad is None for p in tiny_lm.model.parameters())


def test_bad_soft_prompts_are_rejected(tiny_lm, survey):
    with pytest.raises(ValueError, match=r"\[P, n, H\]"):
        survey.distributions(torch.zeros(4, tiny_lm.hidden_size))
    with pytest.raises(ValueError, match="empty"):
        survey.distributions([])
    with pytest.raises(ValueError, match="at least one token"):
        PromptSet([[1, 2], []])


# ---- generation ----------------------------------------------------------------------------------------

def requests(survey, hidden, items=(0, 5, 19, 23)):
    rows = mixed_rows(hidden)
    return [GenerationRequest(survey.sequences[i], s) for i, s in zip(items, rows)]


def test_greedy_generation_of_a_mixed_batch_equals_each_row_alone(tiny_lm, survey):
    reqs = requests(survey, tiny_lm.hidden_size)
    batch = tiny_lm.generate(reqs, max_new_tokens=6)
    assert len(batch) == 4 and all(len(r) == 1 for r in batch)
    eos = tiny_lm.tokenizer.eos_token_id
    for req, (g,) in zip(reqs, batch):
        (single,) = tiny_lm.generate([req], max_new_tokens=6)[0]
        assert g.token_ids == single.token_ids and g.text == single.text
        assert g.prompt_tokens == len(req.ids) + (0 if req.soft is None else req.soft.shape[0])
        assert g.new_tokens == len(g.token_ids) <= 6
        assert g.finished == (eos in g.token_ids)
        if g.finished:
            assert g.token_ids.index(eos) == len(g.token_ids) - 1
        else:
            assert g.new_tokens == 6
        assert g.text == tiny_lm.tokenizer.decode(g.token_ids, skip_special_tokens=True)
    # the soft prompts matter: one item under each of them, and under none, gives different answers
    same = [GenerationRequest(survey.sequences[0], s) for s in mixed_rows(tiny_lm.hidden_size)]
    assert len({tuple(r[0].token_ids) for r in tiny_lm.generate(same, max_new_tokens=6)}) > 1


def test_generation_stops_at_eos_and_respects_the_limit(bigram_lm, vsm):
    """The bigram model says "3" then EOS whatever comes before (its attention is switched off)."""
    s = Survey(bigram_lm, vsm, "naive", None)
    tok = bigram_lm.tokenizer
    three, eos = tok.convert_tokens_to_ids("3"), tok.eos_token_id
    reqs = requests(s, bigram_lm.hidden_size)
    for g, req in zip((r[0] for r in bigram_lm.generate(reqs, max_new_tokens=5)), reqs):
        assert g.token_ids == [three, eos] and g.text == "3"
        assert g.finished and g.new_tokens == 2
    for g in (r[0] for r in bigram_lm.generate(reqs, max_new_tokens=1)):
        assert g.token_ids == [three] and not g.finished and g.new_tokens == 1


def test_sampling_several_sequences(tiny_lm, survey):
    reqs = requests(survey, tiny_lm.hidden_size)
    a = tiny_lm.generate(reqs, max_new_tokens=3, temperature=1.0, seed=4, num_return_sequences=3)
    b = tiny_lm.generate(reqs, max_new_tokens=3, temperature=1.0, seed=4, num_return_sequences=3)
    assert [len(r) for r in a] == [3, 3, 3, 3]
    assert [[g.token_ids for g in r] for r in a] == [[g.token_ids for g in r] for r in b]  # seeded
    assert all(1 <= g.new_tokens <= 3 for r in a for g in r)
    assert len({tuple(g.token_ids) for r in a for g in r}) > 1
    greedy = tiny_lm.generate(reqs[:2], max_new_tokens=3, num_return_sequences=2)
    assert all(r[0].token_ids == r[1].token_ids for r in greedy)


def test_on_step_hands_out_each_token_as_it_is_decoded(tiny_lm, bigram_lm, survey, vsm):
    """The per-step callback: one call per decode step, each sequence's tokens exactly its result's, None once
    it has ended; and the results are those of a call without the callback (greedy and sampled)."""
    reqs = requests(survey, tiny_lm.hidden_size)
    for lm, rs, kw in ((tiny_lm, reqs, dict(max_new_tokens=6)),
                       (tiny_lm, reqs, dict(max_new_tokens=4, temperature=1.0, seed=4, num_return_sequences=3)),
                       (tiny_lm, reqs[:2], dict(max_new_tokens=3, num_return_sequences=2)),
                       (bigram_lm, requests(Survey(bigram_lm, vsm, "naive", None), bigram_lm.hidden_size),
                        dict(max_new_tokens=5))):
        steps = []
        out = lm.generate(rs, on_step=steps.append, **kw)
        assert [[g.token_ids for g in r] for r in out] == [[g.token_ids for g in r] for r in lm.generate(rs, **kw)]
        assert 1 <= len(steps) <= kw["max_new_tokens"] and max(g.new_tokens for r in out for g in r) == len(steps)
        for i, r in enumerate(out):
            for j, g in enumerate(r):
                seen = [s[i][j] for s in steps]
                assert seen[: g.new_tokens] == g.token_ids and set(seen[g.new_tokens :]) <= {None}
    # the bigram model ends every row after two tokens: "3", EOS, then nothing more is generated
    assert [s[0][0] for s in steps] == [bigram_lm.tokenizer.convert_tokens_to_ids("3"), bigram_lm.tokenizer.eos_token_id]


def test_text_stream_deltas_are_whole_characters(tiny_tokenizer):
    tok = tiny_tokenizer
    for text in ("Tea 中文 is ☕ here, déjà vu 🍵!", "  spaced out  ", "中"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) > len(text.split())  # multi-byte characters take several tokens
        for strip in (False, True):
            s = TextStream(tok, strip=strip)
            deltas = [s.add(t) for t in ids]
            final = tok.decode(ids, skip_special_tokens=True)
            final = final.strip() if strip else final
            assert "".join(deltas) + s.rest(final) == final
            assert not any("\ufffd" in d for d in deltas)
            assert "".join(deltas) == final and s.rest(final) == ""  # every character went out as soon as it was whole
    s = TextStream(tok)
    assert [s.add(t) for t in tok("中", add_special_tokens=False)["input_ids"]][-1] == "中"
    s = TextStream(tok, strip=True)
    assert [s.add(t) for t in tok(" a ", add_special_tokens=False)["input_ids"]] and s.sent == "a"


def test_our_model_calls_raise_no_deprecation_warning(tiny_lm, survey):
    """transformers 5.24 deprecates the forward argument `past_key_values` (removed in 5.40) in favour of `cache`:
    every path that runs the model (shared caches, ragged rows, generation greedy and sampled, streamed, and
    log-likelihoods) runs with FutureWarning and DeprecationWarning as errors."""
    import warnings

    rows = mixed_rows(tiny_lm.hidden_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        survey.distributions(torch.stack([rows[0], rows[0]]))
        tiny_lm.option_distributions(survey.prompts, survey.option_ids, rows)
        tiny_lm.option_distributions(survey.prompts, survey.option_ids, None)
        reqs = requests(survey, tiny_lm.hidden_size)
        tiny_lm.generate(reqs, max_new_tokens=3)
        tiny_lm.generate(reqs, max_new_tokens=3, temperature=1.0, seed=1, num_return_sequences=2, on_step=lambda t: None)
        tiny_lm.loglikelihood([LoglikelihoodRequest([1], [5, 6, 7]), LoglikelihoodRequest([], [5, 6], rows[0])])


# ---- layering --------------------------------------------------------------------------------------------

FORBIDDEN = ("get_input_embeddings", "past_key_values", "DynamicCache", ".generate(", "model.config")


def forbidden_in(text: str) -> list[str]:
    # `backend.generate(` is the interface's own method; any other `.generate(` is a model's loop
    text = re.sub(r"\bbackend\.generate\(", "", text)
    return [word for word in FORBIDDEN if word in text]


def test_only_backends_touch_the_model_internals():
    # the router's sentence encoder (committee/encoder.py) is a model of its own, not the aligned LM
    files = [p for p in SRC.rglob("*.py") if "backends" not in p.relative_to(SRC).parts
             and p != SRC / "committee" / "encoder.py"]
    assert len(files) > 10 and SRC / "measure" / "survey.py" in files
    found = [f"{p.relative_to(SRC)}: {word}" for p in files for word in forbidden_in(p.read_text("utf-8"))]
    assert found == []
    assert "backend.generate(" in (SRC / "measure" / "survey.py").read_text("utf-8")  # sample mode goes through the interface
    assert forbidden_in("self.lm.model.generate(x)") == [".generate("]
    # and the backends package really is where they are
    hf = (SRC / "backends" / "hf.py").read_text("utf-8")
    assert forbidden_in(hf) == list(FORBIDDEN)
    assert not re.search(r"^from culturalign\.(measure|align|cli|softprompt)", hf, re.M)
