"""Shared fixtures: a tiny random Llama with an in-memory BPE tokenizer, its saved folder, the embedded model.

The tiny model is built in code (no download): a byte-level BPE tokenizer trained on the VSM item texts,
answer labels and prompt texts, with digits split one per token so that every answer code "1".."5" is a
single token after the prompt (the logprob mode needs that), and a ChatML-like chat template.
"""

from __future__ import annotations

import math

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _dfols_installed() -> bool:
    from culturalign.search.registry import dfols_missing

    return dfols_missing() is None


# DFO-LS (GPL-3.0-or-later) is an optional extra; `make test` installs it, and its tests run where it is installed.
needs_dfols = pytest.mark.skipif(not _dfols_installed(), reason="DFO-LS is not installed: pip install 'culturalign[dfols]'")


def _corpus() -> list[str]:
    from culturalign import load_instrument
    from culturalign.measure.prompts import ANSWER_PREFIX, system_text, user_text
    from culturalign.measure.targets import load_target_set

    inst = load_instrument()
    texts = [user_text(it, inst.codes) for it in inst.items]
    texts += [o for it in inst.items for o in it.options]
    for t in load_target_set().targets[:30]:
        texts += [system_text("persona", t), system_text("icl", t)]
    texts += [ANSWER_PREFIX, "system", "user", "assistant", "Answer options:", "0 1 2 3 4 5 6 7 8 9"]
    return texts


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    # every digit is its own token, also after a space
    for d in "0123456789":
        assert len(hf(d, add_special_tokens=False)["input_ids"]) == 1
    assert hf("Answer: 12", add_special_tokens=False)["input_ids"][-2:] == [hf.convert_tokens_to_ids("1"), hf.convert_tokens_to_ids("2")]
    return hf


def _config(tokenizer, **kw):
    from transformers import LlamaConfig

    base = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=True,
        # larger than the default 0.02 so that answers depend clearly on the context (sharper tests)
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm(tiny_tokenizer):
    from transformers import LlamaForCausalLM

    from culturalign.backends import HFBackend

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(tiny_tokenizer)).eval().requires_grad_(False)
    return HFBackend(model, tiny_tokenizer, name="tiny", device=torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_dir(tiny_lm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_lm.model.save_pretrained(folder)
    tiny_lm.tokenizer.save_pretrained(folder)
    return folder


def bigram_backend(tok, answer: str = "3", after: str = "Ġ", name: str = "bigram"):
    """A model whose next token depends only on the current token (attention and MLP outputs are zero).

    After the token `after` (by default the space after "Answer:", the survey prompt's last token) it says
    the token `answer` with probability 3/4 and "Answer" (unparsable) with 1/4; after `answer` it says
    the end-of-sequence token.
    """
    from transformers import LlamaForCausalLM

    from culturalign.backends import HFBackend

    torch.manual_seed(1)
    model = LlamaForCausalLM(
        _config(tok, num_hidden_layers=1, tie_word_embeddings=False, initializer_range=0.02)
    ).eval().requires_grad_(False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        space, said, other = (tok.convert_tokens_to_ids(t) for t in (after, answer, "Answer"))
        emb[:, :2] = 0.0
        emb[space] = 0.0
        emb[space, 0] = 1.0
        emb[said] = 0.0
        emb[said, 1] = 1.0
        head.zero_()
        r = math.sqrt(32)  # RMS-normalised one-hot vector: sqrt(hidden) on that coordinate
        head[said, 0] = 10.0
        head[other, 0] = 10.0 - math.log(3) / r
        head[tok.eos_token_id, 1] = 10.0
    return HFBackend(model, tok, name=name, device=torch.device("cpu"))


@pytest.fixture(scope="session")
def bigram_lm(tiny_tokenizer):
    """`bigram_backend` answering "3": in logprob mode every item is answered 3 with option mass 0.75, and
    in sample mode about 3/4 of the answers parse as 3."""
    return bigram_backend(tiny_tokenizer, "3")


@pytest.fixture(scope="session")
def embedded_lm():
    from culturalign.backends import load_backend

    return load_backend()


@pytest.fixture(scope="session")
def vsm():
    from culturalign import load_instrument

    return load_instrument()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (and, via OMP_NUM_THREADS, its subprocesses): the tiny model
    gains nothing from more threads, they thrash on a shared 2-core CPU, and the arithmetic stays identical."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_registry(folder, lm, codes=("CN", "JP", "US"), n_tokens=3, seed=0, model=None):
    """A registry of random soft-prompt experts for `lm` (no alignment run: fast, for committee tests)."""
    import hashlib
    import json
    from pathlib import Path

    from culturalign.committee.experts import MANIFEST, SCHEMA
    from culturalign.softprompt.prompt import SoftPrompt
    from culturalign.measure.targets import load_target

    folder = Path(folder)
    g = torch.Generator().manual_seed(seed)
    entries = []
    for code in codes:
        emb = torch.randn(n_tokens, lm.hidden_size, generator=g)
        SoftPrompt(emb, {"prompt": "naive"}).save(folder / code, lm.name)
        t = load_target(code)
        entries.append({"code": code, "name": t.name, "folder": code, "target": t.to_json(), "naive_l1": 300.0,
                        "icl_l1": 290.0, "aligned_l1": 150.0, "aligned_option_mass": 0.9, "optimizer": "de",
                        "budget": 12, "evaluations": 12, "seed": 0,
                        "sha256": hashlib.sha256((folder / code / "adapter_model.safetensors").read_bytes()).hexdigest()})
    (folder / MANIFEST).write_text(json.dumps({"schema": SCHEMA, "model": model or lm.name, "hidden_size": lm.hidden_size,
                                               "instrument": "vsm2013", "experts": entries}))
    return folder


class BagOfWords:
    """A deterministic fake encoder: hashed counts of lower-case words (stop words dropped), unit length."""

    STOP = set("a an and the of to in on at for is are be it do does what how who which should i you my "
               "with by as or their there this that people".split())

    def __init__(self, dim: int = 2048):
        self.dim, self.calls = dim, 0

    def encode(self, texts: list[str]) -> torch.Tensor:
        import re
        import zlib

        self.calls += 1
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                if word not in self.STOP:
                    out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)


# ---- tiny models of each architecture family ----------------------------------------------------------------
# Built in code like the tiny Llama: the same BPE vocabulary, each family's own config class and its own way of
# starting a prompt. Gemma 3 scales its input embeddings (by sqrt(hidden)) and starts with BOS but has no chat
# template (the fallback template applies, as for the real Gemma 3 270M). Gemma 3 and Qwen 2 have one full-attention
# layer and one that attends within a sliding window of 16 positions, so every survey prompt crosses the window.
# Mistral's two layers both slide (as in Mistral 7B v0.1), with a window of 128: larger than every naive survey
# prompt, so a soft prompt at position 0 still reaches the answer, and smaller than the persona and ICL ones.

WINDOWS = {"llama": None, "gemma3": 16, "qwen2": 16, "mistral": 128}
FAMILIES = ("llama", "gemma3", "qwen2", "mistral")
# Mistral-style: BOS from the template, no system role (render() folds the system text into the user turn)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def family_tokenizer(base, bos: str | None = None, template: str | None = None):
    """A copy of the tiny BPE tokenizer, with `bos` added as its start token (and added by the tokenizer)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(base.backend_tokenizer.to_str())
    kw = dict(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if bos:
        kw.update(bos_token=bos, add_bos_token=True)
    tok = PreTrainedTokenizerFast(**kw)
    tok.chat_template = template
    return tok


def family_model(family: str, tok):
    """A tiny random model of `family` for `tok`: seed 0, float32, eval mode, frozen."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM
    from transformers import Qwen2Config, Qwen2ForCausalLM

    common = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.2,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    if family == "gemma3":
        cfg = Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOWS["gemma3"],
                               layer_types=["sliding_attention", "full_attention"])
        model = Gemma3ForCausalLM(cfg)
    elif family == "qwen2":  # layer 0 full, layer 1 within the window
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOWS["qwen2"], max_window_layers=1))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, head_dim=8, sliding_window=WINDOWS["mistral"]))
    else:
        raise ValueError(family)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_gemma_dir(tiny_tokenizer, tmp_path_factory):
    """The tiny Gemma 3 saved as a user's model folder: its tokenizer adds BOS and it has no chat template."""
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    tok = family_tokenizer(tiny_tokenizer, bos="<bos>")
    family_model("gemma3", tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def family_lms(tiny_lm, tiny_tokenizer, tiny_gemma_dir):
    """family -> HFBackend. Gemma 3 goes through `load_backend` from its saved folder, as a user's model would
    (the fallback template applies)."""
    import warnings

    from culturalign.backends import HFBackend, load_backend

    lms = {"llama": tiny_lm}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lms["gemma3"] = load_backend(str(tiny_gemma_dir), device="cpu")
    tok = family_tokenizer(tiny_tokenizer, template=CHAT_TEMPLATE)
    lms["qwen2"] = HFBackend(family_model("qwen2", tok), tok, name="tiny-qwen2", device="cpu")
    tok = family_tokenizer(tiny_tokenizer, bos="<s>", template=MISTRAL_TEMPLATE)
    lms["mistral"] = HFBackend(family_model("mistral", tok), tok, name="tiny-mistral", device="cpu")
    return lms
