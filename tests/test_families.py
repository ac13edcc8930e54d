"""Each architecture family on a tiny config built in code: Llama, Gemma 3, Qwen 2 and Mistral.

For each one: the prefix-cached option distributions equal the plain path (inside and past a sliding window), a
`text`-initialised soft prompt equals the same text given as tokens, PEFT loads a saved soft prompt and gives the
same answers, and generation with a soft prompt per row equals each row alone. Regression tests for the three bugs
first seen on Gemma 3 270M: embedding scale, BOS without a chat template, the sliding window.
"""

import copy
import warnings

import numpy as np
import pytest
import torch

from conftest import FAMILIES, WINDOWS
from culturalign import load_target
from culturalign.backends import GenerationRequest, HFBackend, PromptSet, load_backend
from culturalign.backends.hf import plain_option_distributions
from culturalign.backends.loading import FALLBACK_TEMPLATE
from culturalign.softprompt.params import embedding_std, initial_prompt
from culturalign.softprompt.prompt import SoftPrompt
from culturalign.measure.survey import Survey

TOL = 1e-5
TEXT = "You are a typical person from China."
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request, family_lms):
    return family_lms[request.param]


def soft_rows(lm, lengths=(2, None, 5, 3), seed=11):
    """Soft prompts of different lengths (None: no soft prompt) at the scale of the model's own embeddings."""
    g = torch.Generator().manual_seed(seed)
    std = embedding_std(lm)
    return [None if n is None else torch.randn(n, lm.hidden_size, generator=g) * std for n in lengths]


def sections(vsm):
    return [[i for i, it in enumerate(vsm.items) if it.section == sec]
            for sec in dict.fromkeys(it.section for it in vsm.items if it.section)]


def max_diff(a, b) -> float:
    return max(float((a.probs - b.probs).abs().max()), float((a.mass - b.mass).abs().max()))


# ---- the family's facts --------------------------------------------------------------------------------

def test_each_family_is_what_it_says(family_lms):
    from culturalign.backends.hf import attention_window

    types = {"llama": "llama", "gemma3": "gemma3_text", "qwen2": "qwen2", "mistral": "mistral"}
    assert list(family_lms) == list(FAMILIES)
    for family, lm in family_lms.items():
        assert lm.model_info()["model_type"] == types[family]
        assert attention_window(lm.model.config) == WINDOWS[family] == lm.window == lm.model_info()["attention_window"]
    assert "sliding_attention" in family_lms["gemma3"].model.config.layer_types
    assert "full_attention" in family_lms["gemma3"].model.config.layer_types


def test_attention_window_is_read_from_the_config():
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    from culturalign.backends.hf import attention_window

    assert attention_window(LlamaConfig()) is None
    assert attention_window(MistralConfig(sliding_window=4096)) == 4096
    assert attention_window(MistralConfig(sliding_window=None)) is None
    assert attention_window(Qwen2Config(sliding_window=4096)) is None  # use_sliding_window is off by default
    assert attention_window(Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=0)) == 64
    assert attention_window(Gemma3TextConfig(sliding_window=512)) == 512
    assert attention_window(Gemma3TextConfig(sliding_window=512, layer_types=["full_attention"] * 26)) is None


# ---- bug 1: the embedding scale ------------------------------------------------------------------------

def test_embedding_table_is_in_the_space_embed_returns(lm):
    """Gemma scales its embeddings (sqrt(hidden)); `embedding_table` must be what `embed` gives, not the raw weights."""
    ids = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    table = lm.embedding_table()
    assert table.dtype == torch.float32 and table.device.type == "cpu" and not table.requires_grad
    assert table.shape == (lm.model_info()["vocab_size"], lm.hidden_size)
    assert torch.equal(table[ids], lm.embed(ids).float().cpu())
    raw = lm.model.get_input_embeddings().weight
    scale = float(table.norm() / raw.norm())
    if lm.model_info()["model_type"] == "gemma3_text":
        assert scale == pytest.approx(lm.hidden_size ** 0.5, rel=1e-5)
    else:
        assert torch.equal(table, raw)  # a plain lookup: the weights themselves, not a float changed
    assert embedding_std(lm) == pytest.approx(float(table.std()))


def test_text_soft_prompt_equals_the_text_as_tokens(lm, vsm):
    """A soft prompt initialised from a text answers exactly as that text's tokens at position 0 do."""
    survey = Survey(lm, vsm, "naive", load_target("CN"))
    ids = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    as_tokens = PromptSet([ids + s for s in survey.sequences], sections(vsm))
    soft = initial_prompt(lm, len(ids), "text", TEXT)
    with torch.no_grad():
        tokens = lm.option_distributions(as_tokens, survey.option_ids)
        text = survey.distributions(soft.unsqueeze(0))
        embedded = survey.distributions(lm.embed(ids).unsqueeze(0))
        none = survey.distributions()
    assert max_diff(text, tokens) < TOL
    assert max_diff(embedded, tokens) < TOL
    assert max_diff(none, tokens) > 0.01  # the text matters, so the comparison has teeth
    vocab = initial_prompt(lm, 6, "vocab", seed=3)
    table = lm.embedding_table()
    assert all(any(torch.equal(row, t) for t in table) for row in vocab)
    random = initial_prompt(lm, 256, "random", seed=0)
    assert float(random.std()) == pytest.approx(embedding_std(lm), rel=0.1)


# ---- bug 2: BOS without a chat template -------------------------------------------------------------------

def test_fallback_template_starts_with_bos_when_the_tokenizer_adds_one(tiny_gemma_dir, vsm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load_backend(str(tiny_gemma_dir), device="cpu")
    tok = lm.tokenizer
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds BOS to a text
    s = Survey(lm, vsm, "persona", load_target("CN"))
    for seq in s.sequences:
        assert seq[0] == tok.bos_token_id and seq.count(tok.bos_token_id) == 1
    text = tok.decode(s.sequences[0])
    assert text.startswith("<bos>You are a typical person from China.")
    assert "\n\nUser: " in text and text.endswith("Assistant: Answer: ")


def test_fallback_template_has_no_bos_when_the_tokenizer_adds_none(tiny_dir, tmp_path):
    """The tiny Llama's tokenizer has no BOS: the plain fallback, unchanged."""
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load_backend(str(folder), device="cpu")
    assert lm.tokenizer.chat_template == FALLBACK_TEMPLATE


def test_no_chat_template_warning_is_one_line(tiny_gemma_dir):
    """The warning names the model and the template; it does not print a line of source code under it."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        load_backend(str(tiny_gemma_dir), device="cpu")
    (msg,) = [x for x in w if "no chat template" in str(x.message)]
    shown = warnings.formatwarning(msg.message, msg.category, msg.filename, msg.lineno, msg.line)
    assert shown.strip().count("\n") == 0, shown
    assert str(tiny_gemma_dir) in shown and "User:/Assistant:" in shown


# ---- bug 3: the sliding window --------------------------------------------------------------------------

def test_cached_equals_plain_on_the_survey(lm, vsm):
    """Survey prompts (longer than the tiny window), grouped by section, four rows with their own soft prompts."""
    survey = Survey(lm, vsm, "persona", load_target("SA"))
    prompts = lm.prompt_set(survey.sequences, sections(vsm))
    rows = soft_rows(lm)
    with torch.no_grad():
        d = lm.option_distributions(prompts, survey.option_ids, rows)
        plain = plain_option_distributions(lm, prompts, survey.option_ids, rows)
    assert d.probs.shape == (4, 24, 5)
    assert max_diff(d, plain) < TOL
    for a in range(4):  # every row gets its own answers
        for b in range(a):
            assert (d.probs[a] - d.probs[b]).abs().max() > 0.01


def short_prompts(lm, vsm, total: int) -> PromptSet:
    """Four prompts with a shared root, two sections and suffixes of different lengths, the longest `total` tokens
    (cut from the tokens of an ICL survey prompt)."""
    ids = Survey(lm, vsm, "icl", load_target("CN")).sequences[0]
    assert len(ids) >= total
    root = ids[:3]
    seqs = [root + ids[3:total], root + ids[5:total - 1], root + ids[4:total - 3], root + ids[7:total - 2]]
    return PromptSet(seqs, [[0, 1], [2, 3]])


@pytest.mark.parametrize("soft_len", [0, 3])
def test_cached_equals_plain_around_the_window(lm, vsm, soft_len):
    """Rows of every length from 4 positions inside the window to 4 past it: the cached path must equal the plain
    one everywhere. Past the window the sliding families must not take the cache as it was (that is the bug)."""
    option_ids = Survey(lm, vsm, "naive", None).option_ids
    rows = soft_rows(lm, (soft_len, None, 1)) if soft_len else None
    old = HFBackend(lm.model, lm.tokenizer, name=lm.name, device=lm.device)
    old.window = None  # the cache everywhere, as before the fix
    worst_old = 0.0
    window = lm.window or 16
    for n in range(window - 4, window + 5):
        prompts = short_prompts(lm, vsm, n - soft_len)
        with torch.no_grad():
            d = lm.option_distributions(prompts, option_ids, rows)
            plain = plain_option_distributions(lm, prompts, option_ids, rows)
            assert max_diff(d, plain) < TOL, n
            if n <= window or lm.window is None:  # inside the window the cache is exact
                assert max_diff(old.option_distributions(prompts, option_ids, rows), plain) < TOL, n
            else:
                worst_old = max(worst_old, max_diff(old.option_distributions(prompts, option_ids, rows), plain))
    if lm.window is not None:
        assert worst_old > 1e-3  # past the window the cache as it was is wrong: the test can see the bug


def test_cached_path_is_taken_inside_the_window_and_left_past_it(family_lms, vsm, monkeypatch):
    from culturalign.backends import hf

    lm = family_lms["gemma3"]
    option_ids = Survey(lm, vsm, "naive", None).option_ids
    calls = []
    monkeypatch.setattr(hf, "_unshared_option_distributions",
                        lambda *a, **k: calls.append(1) or plain_option_distributions(lm, a[1], a[2], a[3]))
    with torch.no_grad():
        lm.option_distributions(short_prompts(lm, vsm, lm.window), option_ids)
        lm.option_distributions(short_prompts(lm, vsm, lm.window - 3), option_ids, [torch.zeros(3, lm.hidden_size), None])
        assert calls == []
        lm.option_distributions(short_prompts(lm, vsm, lm.window - 2), option_ids, [torch.zeros(3, lm.hidden_size), None])
        assert calls == [1]


def test_fallback_reports_progress_and_keeps_gradients(family_lms, vsm):
    lm = family_lms["gemma3"]
    survey = Survey(lm, vsm, "naive", load_target("CN"))
    rows = [t.requires_grad_(True) if t is not None else None for t in soft_rows(lm, (2, None, 3))]
    seen = []
    d = lm.option_distributions(survey.prompts, survey.option_ids, rows, progress=seen.append)
    assert seen and seen[-1] == 24 and seen == sorted(seen)
    survey.loss(d).sum().backward()
    refs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in rows]
    survey.loss(plain_option_distributions(lm, survey.sequences, survey.option_ids, refs)).sum().backward()
    for row, ref in zip(rows, refs):
        if row is not None:
            assert row.grad.abs().sum() > 0
            torch.testing.assert_close(row.grad, ref.grad, atol=1e-4, rtol=1e-3)


# ---- PEFT and generation ----------------------------------------------------------------------------------

def test_peft_round_trips_the_saved_soft_prompt(lm, vsm, tmp_path):
    from peft import PeftModel

    prompt = initial_prompt(lm, 5, "random", seed=7)
    folder = SoftPrompt(prompt, {"prompt": "persona"}).save(tmp_path / "sp", backend=lm)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(lm.model), str(folder)).eval()
    survey = Survey(lm, vsm, "persona", load_target("SA"))
    result, plain = survey.result(SoftPrompt.load(folder, lm.hidden_size).embeddings), survey.result()
    differs = 0.0
    for i in range(0, 24, 3):
        with torch.no_grad():
            logits = peft_model(input_ids=torch.tensor([survey.sequences[i]])).logits[0, -1]
        opt = torch.softmax(logits.double(), -1)[survey.option_ids]
        probs = (opt / opt.sum()).numpy()
        np.testing.assert_allclose(probs, result.items[i]["probs"], atol=TOL)
        assert float(opt.sum()) == pytest.approx(result.items[i]["option_mass"], abs=TOL)
        differs = max(differs, float(np.abs(probs - plain.items[i]["probs"]).max()))
    assert differs > 0.01


def test_generation_with_a_soft_prompt_per_row(lm, vsm):
    """Full survey prompts and their last 12 tokens (inside every window; the generation then crosses the tiny ones),
    each row with its own soft prompt or none, in one batch: each row as it would be alone."""
    survey = Survey(lm, vsm, "naive", None)
    rows = soft_rows(lm) * 2
    items = (0, 5, 19, 23)
    reqs = [GenerationRequest(survey.sequences[i], s) for i, s in zip(items, rows)]
    reqs += [GenerationRequest(survey.sequences[i][-12:], s) for i, s in zip(items, rows[4:])]
    batch = lm.generate(reqs, max_new_tokens=5)
    for req, (g,) in zip(reqs, batch):
        (single,) = lm.generate([req], max_new_tokens=5)[0]
        assert g.token_ids == single.token_ids and g.text == single.text
        assert g.prompt_tokens == len(req.ids) + (0 if req.soft is None else req.soft.shape[0])
        assert 1 <= g.new_tokens <= 5
    same = [GenerationRequest(survey.sequences[0][-12:], s) for s in rows[:4]]
    assert len({tuple(r[0].token_ids) for r in lm.generate(same, max_new_tokens=5)}) > 1  # the soft prompts matter
