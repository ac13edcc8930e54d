"""Held-out checks: paraphrase coverage, reversed options, log-likelihoods and perplexity, the MCQ check,
`run_heldout` and the `mcq` / `heldout` commands. Tiny models built in code (conftest); no download."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from culturalign import CulturalignError, load_instrument
from culturalign.measure.instrument import Item, paraphrase_variants
from culturalign.measure.prompts import user_text
from culturalign.measure.survey import Survey
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


def test_any_instrument_file_can_be_reversed(tmp_path):
    f = tmp_path / "three.json"
    f.write_text(json.dumps({
        "schema": "culturalign.instrument/1", "id": "three", "name": "three", "answer_codes": [1, 2, 3],
        "scales": {"s": ["yes", "maybe", "no"]},
        "items": [{"id": 1, "text": "t", "scale": "s"}, {"id": 2, "text": "u", "scale": "s"}],
        "indices": {"A": {"terms": [{"weight": 10, "plus": 1, "minus": 2}]}}}))
    rev = load_instrument(f"{f}-reversed")
    assert rev.id == "three-reversed" and rev.source == f"{f}-reversed"
    assert rev.items[0].presented_options == ("no", "maybe", "yes")
    again = load_instrument(rev.source)  # e.g. on resume
    assert again.id == rev.id and [it.order for it in again.items] == [it.order for it in rev.items]
    assert "1. no\n2. maybe\n3. yes" in user_text(rev.items[0], rev.codes)
    assert rev.to_code_order(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])).tolist() == [[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]


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


# ---- the MCQ check: files ---------------------------------------------------------------------------------------

HEADER = "id,country,question,option_a,option_b,option_c,option_d,answer\n"


def mcq_text(*rows, header=HEADER):
    return header + "".join(r + "\n" for r in rows)


@pytest.mark.parametrize("text,needle", [
    ("", "empty file"),
    ("\n \n", "empty file"),
    (HEADER, "no questions"),
    (mcq_text("q1,China,Q?,a,b,c,d,A", header="id,country,question,option_a,option_b,option_c,option_d\n"),
     "missing column(s) answer"),
    (mcq_text("q1,Q?,a,b,A", header="id,question,option_a,option_b,answer\n"), "missing column(s) country"),
    (mcq_text("q1,China,Q?,a,b,A", header="id,country,question,option_a,option_c,answer\n"), "missing column option_b"),
    (mcq_text("q1,China,Q?,a,A", header="id,country,question,option_a,answer\n"), "fewer than two option columns"),
    (mcq_text("q1,China,Q?,a,b,x,A", header="id,country,question,option_a,option_b,notes,answer\n"), "unknown column(s) 'notes'"),
    (mcq_text("q1,China,Q?,a,b,A", header="id,country,question,option_a,option_b,option_b,answer\n"), "more than once"),
    (mcq_text("q1,China,Q?,a,b,c,d,E"), "row 1 (line 2), column 'answer': answer 'E' is not among the options"),
    (mcq_text("q1,China,Q?,a,b,c,,D"), "column 'answer': answer 'D' is not among the options; expected one letter of A, B, C"),
    (mcq_text("q1,China,Q?,a,b,c,d,1"), "answer '1' is not among the options"),
    (mcq_text("q1,China,Q?,a,b,c,d,AB"), "answer 'AB'"),
    (mcq_text("q1,China,Q?,a,b,c,d,A", "q2,India,R?,a,b,c,d,B", "q1,Japan,S?,a,b,c,d,C"),
     "row 3 (line 4), column 'id': duplicated id 'q1' (first used in row 1)"),
    (mcq_text("q1,China,Q?,a,,,,A"), "column 'option_b': fewer than two options (1)"),
    (mcq_text("q1,China,Q?,a,,c,d,A"), "column 'option_b': empty option between filled ones"),
    (mcq_text("q1,China,Q?,a,A,c,d,A"), "options must be distinct"),
    (mcq_text(",China,Q?,a,b,c,d,A"), "column 'id': empty"),
    (mcq_text("q1,,Q?,a,b,c,d,A"), "column 'country': empty"),
    (mcq_text("q1,China,,a,b,c,d,A"), "column 'question': empty"),
    (mcq_text("q1,China,Q?,a,b,c,A"), "row 1 (line 2): 7 cell(s) but the header has 8"),
    # CulturalBench-Easy column names
    (mcq_text("1,Q?,a,b,c,d,E,China", header="question_idx,prompt_question,prompt_option_a,prompt_option_b,"
                                             "prompt_option_c,prompt_option_d,answer,country\n"), "answer 'E'"),
    (mcq_text("1,Q?,a,b,c,d,China", header="question_idx,prompt_question,prompt_option_a,prompt_option_b,"
                                           "prompt_option_c,prompt_option_d,country\n"), "missing column(s) answer (culturalbench-easy"),
    # CulturalBench-Hard column names
    (mcq_text("0,1,Q?,a,maybe,China", header="data_idx,question_idx,prompt_question,prompt_option,answer,country\n"),
     "column 'answer': expected true or false"),
    (mcq_text("0,1,Q?,a,true", header="data_idx,question_idx,prompt_question,prompt_option,answer\n"),
     "missing column(s) country"),
    (mcq_text("0,1,Q?,a,true,China", header="data_idx,question_idx,prompt_question,prompt_option,answer,country\n"),
     "fewer than two options"),
    (mcq_text("0,1,Q?,a,true,China", "1,1,Q?,b,true,China",
              header="data_idx,question_idx,prompt_question,prompt_option,answer,country\n"), "no question has exactly one true"),
    (mcq_text("0,1,Q?,a,true,China", "1,1,Other?,b,false,China",
              header="data_idx,question_idx,prompt_question,prompt_option,answer,country\n"), "another question"),
])
def test_mcq_file_errors_name_file_row_and_column(text, needle, tmp_path):
    from culturalign.heldout.mcq import load_mcq

    f = tmp_path / "my-questions.csv"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(CulturalignError) as e:
        load_mcq(f)
    msg = str(e.value)
    assert "my-questions.csv" in msg and needle in msg and "\n" not in msg, msg


def test_mcq_file_formats(tmp_path):
    from culturalign.heldout.mcq import load_mcq, parse_mcq

    ours = parse_mcq(mcq_text("q1, China ,Q?,a,b,,,b", "q2,India,R?,x,y,z,w,D"))
    assert ours.format == "culturalign" and [q.answer for q in ours.questions] == [1, 3]
    assert ours.questions[0].options == ("a", "b") and ours.questions[0].country == "China" and ours.max_options == 4
    easy = parse_mcq("data_idx,question_idx,prompt_question,prompt_option_a,prompt_option_b,prompt_option_c,"
                     "prompt_option_d,answer,country\n0,7,Q?,a,b,c,d,C,Peru\n")
    assert easy.format == "culturalbench-easy" and easy.questions[0].id == "7" and easy.questions[0].answer_letter == "C"
    hard = parse_mcq("data_idx,question_idx,prompt_question,prompt_option,answer,country\n"
                     "0,1,Q?,a,False,Peru\n1,1,Q?,b,True,Peru\n2,1,Q?,c,False,Peru\n3,1,Q?,d,False,Peru\n"
                     "4,2,R?,x,True,Chile\n5,2,R?,y,True,Chile\n6,2,R?,z,False,Chile\n")
    assert hard.format == "culturalbench-hard" and len(hard) == 1 and hard.skipped == ["2"]
    assert hard.questions[0].options == ("a", "b", "c", "d") and hard.questions[0].answer_letter == "B"
    (tmp_path / "bom.csv").write_bytes("\ufeff".encode() + mcq_text("q1,China,Q?,a,b,c,d,a").encode())
    assert load_mcq(tmp_path / "bom.csv").questions[0].answer == 0


def test_shipped_mcq_set():
    from collections import Counter

    from culturalign.heldout.mcq import load_mcq

    qs = load_mcq()
    assert len(qs) >= 40 and qs.format == "culturalign" and not qs.skipped
    per = Counter(q.country for q in qs.questions)
    assert all(per[c] >= 5 for c in ("Saudi Arabia", "United States", "China", "India"))
    assert len(set(per) - {"Saudi Arabia", "United States", "China", "India"}) >= 4
    letters = Counter(q.answer_letter for q in qs.questions)
    assert max(letters.values()) / len(qs) < 0.3  # no letter gives a big prior
    assert all(q.topic for q in qs.questions)


# ---- the MCQ check: scoring -------------------------------------------------------------------------------------

def test_mcq_accuracy_on_a_model_that_always_says_b(tiny_tokenizer):
    from culturalign.heldout.mcq import load_mcq, parse_mcq, run_mcq

    says_b = bigram_backend(tiny_tokenizer, "B", after=":", name="says-B")  # the MCQ prompt ends in "Answer:"
    qs = parse_mcq(mcq_text("q1,China,Q?,a,b,c,d,B", "q2,China,Q?,a,b,c,d,A", "q3,India,Q?,a,b,,,B",
                            "q4,India,Q?,a,b,c,,C", "q5,Peru,Q?,a,b,c,d,B"))
    res = run_mcq(says_b, qs)
    w = res["without"]
    assert res["with"] is None and res["questions"] == 5
    assert w["accuracy"] == pytest.approx(3 / 5) and w["correct"] == 3
    assert w["by_country"]["China"] == {"n": 2, "accuracy": 0.5, "mean_p_correct": pytest.approx(0.5, abs=1e-6)}
    assert w["by_country"]["India"]["accuracy"] == 0.5 and w["by_country"]["Peru"]["accuracy"] == 1.0
    assert w["prior_letter"] == "B" and w["prior_accuracy"] == pytest.approx(3 / 5)
    assert w["mean_option_mass"] == pytest.approx(0.75, abs=1e-5)
    assert res["chance"] == pytest.approx(np.mean([1 / 4, 1 / 4, 1 / 2, 1 / 3, 1 / 4]))
    assert [it["without"]["predicted"] for it in res["items"]] == ["B"] * 5
    shipped = run_mcq(says_b, load_mcq())
    n_b = sum(q.answer_letter == "B" for q in load_mcq().questions)
    assert shipped["without"]["correct"] == n_b  # always "B": exactly the questions whose answer is B


def test_mcq_batching_and_rows_match_a_plain_reference(tiny_lm):
    from culturalign.backends.hf import plain_option_distributions
    from culturalign.heldout.mcq import ask, encode_questions, load_mcq, run_mcq
    from culturalign.measure.targets import load_target

    qs = load_mcq()
    qs.questions = qs.questions[:4] + [q for q in qs.questions if q.country == "China" or len(q.options) == 3]
    soft = torch.randn(3, 32, generator=torch.Generator().manual_seed(11)) * 0.3
    both = ask(tiny_lm, qs, [None, soft], batch_size=5)
    alone = ask(tiny_lm, qs, [soft], batch_size=64)
    assert np.allclose(both[1].probs, alone[0].probs, atol=1e-5) and np.allclose(both[1].mass, alone[0].mass, atol=1e-5)
    seqs, option_ids = encode_questions(tiny_lm.tokenizer, qs.questions, "ABCD")
    with torch.no_grad():
        ref = plain_option_distributions(tiny_lm, seqs, option_ids, [None, soft])
    for row in range(2):
        for i, q in enumerate(qs.questions):
            k = len(q.options)
            p = ref.probs[row, i, :k].double().numpy()
            assert np.allclose(both[row].probs[i, :k], p / p.sum(), atol=1e-5)
            assert np.allclose(both[row].probs[i, k:], 0.0)
            assert both[row].mass[i] == pytest.approx(float(ref.mass[row, i]) * p.sum(), abs=1e-5)
    res = run_mcq(tiny_lm, qs, soft, load_target("CN"))
    tc = res["target_country"]
    assert tc["countries"] == ["China"] and tc["n"] == sum(q.country == "China" for q in qs.questions)
    assert tc["without"]["accuracy"] == res["without"]["by_country"]["China"]["accuracy"]
    assert tc["with"]["accuracy"] == res["with"]["by_country"]["China"]["accuracy"]


# ---- run_heldout ------------------------------------------------------------------------------------------------

def test_kept_share_and_its_edge_cases():
    from culturalign.heldout import kept_share

    assert kept_share(100.0, 60.0) == (0.6, None)
    assert kept_share(100.0, -20.0) == (-0.2, None)  # the prompt makes the variant worse
    assert kept_share(50.0, 75.0) == (1.5, None)
    for g in (0.0, -3.0):
        kept, note = kept_share(g, 10.0)
        assert kept is None and "did not lower the L1" in note
    assert kept_share(None, None) == (None, "no soft prompt")


@pytest.fixture(scope="module")
def heldout_result(tiny_lm):
    from culturalign.heldout import run_heldout
    from culturalign.softprompt.prompt import SoftPrompt
    from culturalign.measure.targets import load_target

    sp = SoftPrompt(torch.randn(4, 32, generator=torch.Generator().manual_seed(2)) * 0.5, {"prompt": "naive"})
    stages = []
    res = run_heldout(tiny_lm, sp, load_target("CN"), progress=lambda stage, done, total: stages.append((stage, done, total)))
    return res, stages, sp


def test_run_heldout_result(heldout_result, tiny_lm):
    from culturalign.files import dumps
    from culturalign.heldout.mcq import load_mcq
    from culturalign.measure.targets import load_target

    res, stages, sp = heldout_result
    json.loads(dumps(res))  # JSON-safe and finite
    assert res["schema"] == "culturalign.heldout/1" and res["model"] == "tiny" and res["prompt"] == "naive"
    assert res["target"]["name"] == "China" and res["soft_prompt"] == {"path": None, "n_tokens": 4}
    base = res["survey"]["original"]
    assert base["instrument"] == "vsm2013"
    assert [v["instrument"] for v in res["survey"]["variants"]] == ["vsm2013-para-a", "vsm2013-para-b", "vsm2013-reversed"]
    assert [v["kind"] for v in res["survey"]["variants"]] == ["paraphrase", "paraphrase", "reversed options"]
    # "without" is the plain survey; "with" the same survey with the soft prompt
    for v in [base, *res["survey"]["variants"]]:
        s = Survey(tiny_lm, load_instrument(v["instrument"]), "naive", load_target("CN"))
        assert v["without"]["l1"] == pytest.approx(s.result().l1, abs=1e-9)
        assert v["with"]["l1"] == pytest.approx(s.result(sp.embeddings).l1, abs=1e-9)
        assert v["gain"] == pytest.approx(v["without"]["l1"] - v["with"]["l1"])
        # the uniform floor on each instrument: every item 1/5, C = 0, so the L1 is China's scores summed
        zero = dict.fromkeys(["PDI", "IDV", "MAS", "UAI", "LTO", "IVR"], 0.0)
        assert v["uniform"] == {"l1": 80 + 20 + 66 + 30 + 87 + 24, "indices": zero}
    for v in res["survey"]["variants"]:
        if base["gain"] > 0:
            assert v["kept"] == pytest.approx(v["gain"] / base["gain"]) and v["kept_note"] is None
        else:
            assert v["kept"] is None and "did not lower" in v["kept_note"]
    assert res["mcq"]["questions"] == len(load_mcq()) and "items" not in res["mcq"]
    assert res["mcq"]["with"] is not None and res["mcq"]["target_country"]["countries"] == ["China"]
    p = res["perplexity"]
    assert p["ratio"] == pytest.approx(p["with"] / p["without"]) and p["with"] == pytest.approx(math.exp(p["nll_with"]))
    assert {s for s, *_ in stages} == {"vsm2013", "vsm2013-para-a", "vsm2013-para-b", "vsm2013-reversed", "mcq", "perplexity"}
    assert ("vsm2013", 48, 48) in stages and ("mcq", len(load_mcq()), len(load_mcq())) in stages


def test_heldout_markdown(heldout_result):
    from culturalign.heldout import heldout_markdown

    res = heldout_result[0]
    md = heldout_markdown(res)
    lines = md.splitlines()
    table = [ln for ln in lines if ln.startswith("| ")]
    assert table[0] == "| check | without | with soft prompt | change | gain kept | uniform |"
    assert len(table) == 1 + 4 + 5  # header, 4 L1 rows, MCQ (all, China, P(correct), prior), perplexity
    l1 = res["survey"]["original"]["without"]["l1"]
    assert f"| L1 vsm2013 (aligned on) | {l1:.1f} |" in md
    para_a = res["survey"]["variants"][0]
    kept = f"{para_a['kept']:.2f}" if para_a["kept"] is not None else "n/a"
    assert table[2].startswith("| L1 vsm2013-para-a (paraphrase) |") and table[2].endswith(f"| {kept} | 307.0 |")
    assert table[-1].endswith("|  |  |")  # perplexity: no gain kept, no floor
    assert f"x{res['perplexity']['ratio']:.2f}" in md and "a soft prompt of 4 tokens" in lines[0]


def test_run_heldout_without_a_soft_prompt_and_bad_inputs(tiny_lm, tmp_path):
    from culturalign.heldout import heldout_markdown, run_heldout
    from culturalign.softprompt.prompt import SoftPrompt
    from culturalign.measure.targets import load_target

    res = run_heldout(tiny_lm, None, load_target("US"))
    assert res["soft_prompt"] is None and res["survey"]["original"]["with"] is None
    assert all(v["kept"] is None and v["kept_note"] == "no soft prompt" for v in res["survey"]["variants"])
    assert res["mcq"]["with"] is None and res["perplexity"]["ratio"] is None
    assert "no soft prompt" in heldout_markdown(res)
    with pytest.raises(CulturalignError, match="need a target"):
        run_heldout(tiny_lm, None, None)
    with pytest.raises(CulturalignError, match="another model"):
        run_heldout(tiny_lm, SoftPrompt(torch.zeros(2, 64)), load_target("US"))
    (tmp_path / "q.csv").write_text(mcq_text("q1,China,Q?,a,b,c,d,E"))
    with pytest.raises(CulturalignError, match="q.csv"):
        run_heldout(tiny_lm, None, load_target("US"), mcq_file=tmp_path / "q.csv")


# ---- the commands ------------------------------------------------------------------------------------------------

@pytest.fixture
def saved_prompt(tmp_path, tiny_lm):
    from culturalign.softprompt.prompt import SoftPrompt
    from culturalign.measure.targets import load_target

    folder = tmp_path / "sp"
    emb = torch.randn(3, 32, generator=torch.Generator().manual_seed(4)) * 0.4
    SoftPrompt(emb, {"prompt": "naive", "instrument": "vsm2013", "target": load_target("CN").to_json()}).save(folder, "tiny")
    return folder


def run_cli(argv, capsys):
    from culturalign.cli import run

    capsys.readouterr()
    code = run([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_mcq_command(tiny_dir, saved_prompt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, stdout, stderr = run_cli(["mcq", "--model", tiny_dir, "--json", tmp_path / "m.json"], capsys)
    assert code == 0, stderr
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["questions"] == 59 and data["with"] is None and data["soft_prompt"] is None and len(data["items"]) == 59
    assert "MCQ check" in stdout and "Saudi Arabia" in stdout and "answer prior" in stdout
    f = tmp_path / "q.csv"
    f.write_text(mcq_text("q1,China,Q?,a,b,c,d,B", "q2,Peru,R?,a,b,,,A"))
    code, stdout, stderr = run_cli(["mcq", "--file", f, "--soft-prompt", saved_prompt, "--model", tiny_dir, "--json", "-"],
                                   capsys)
    assert code == 0, stderr
    data = json.loads(stdout)  # standard output holds the JSON alone
    assert data["questions"] == 2 and data["with"] is not None and data["soft_prompt"]["path"] == str(saved_prompt)
    assert data["target_country"]["countries"] == ["China"] and "accuracy with" in stderr


def test_heldout_command(tiny_dir, saved_prompt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, stdout, stderr = run_cli(["heldout", "--soft-prompt", saved_prompt, "--model", tiny_dir,
                                    "--json", tmp_path / "h.json"], capsys)
    assert code == 0, stderr
    data = json.loads((tmp_path / "h.json").read_text())
    assert data["target"]["name"] == "China"  # from the soft prompt's culturalign.json
    assert data["soft_prompt"]["path"] == str(saved_prompt) and data["soft_prompt"]["n_tokens"] == 3
    for label in ("L1 vsm2013 (aligned on)", "vsm2013-para-a (paraphrase)", "vsm2013-reversed (reversed options)",
                  "MCQ accuracy", "perplexity, neutral text", "held-out checks took"):
        assert label in stdout, label
    code, _, stderr = run_cli(["heldout", "--soft-prompt", saved_prompt, "--model", tiny_dir, "--country", "US",
                               "--json", tmp_path / "us.json"], capsys)
    assert code == 0, stderr
    us = json.loads((tmp_path / "us.json").read_text())
    assert us["target"]["name"] == "United States"
    assert us["survey"]["original"]["with"]["indices"] == data["survey"]["original"]["with"]["indices"]
    assert us["survey"]["original"]["with"]["l1"] != data["survey"]["original"]["with"]["l1"]
