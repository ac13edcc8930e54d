import copy
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import culturalign
from culturalign import CulturalignError, load_target
from culturalign.softprompt.params import Projection, embedding_std, initial_prompt
from culturalign.softprompt.prompt import SoftPrompt
from culturalign.measure.survey import Survey


@pytest.fixture()
def prompt(tiny_lm):
    g = torch.Generator().manual_seed(7)
    return torch.randn(5, tiny_lm.hidden_size, generator=g) * 0.2


def test_save_load_roundtrip(tmp_path, tiny_lm, prompt):
    meta = {"prompt": "persona", "instrument": "vsm2013", "model": "tiny", "target": "China"}
    folder = SoftPrompt(prompt, meta).save(tmp_path / "sp", base_model="tiny", backend=tiny_lm)
    assert folder == tmp_path / "sp"
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "culturalign.json"]  # no temp files left
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING"
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["num_virtual_tokens"] == 5
    assert cfg["token_dim"] == tiny_lm.hidden_size
    assert cfg["num_layers"] == 2 and cfg["num_attention_heads"] == 4
    assert cfg["base_model_name_or_path"] == "tiny"
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"]
    assert torch.equal(tensors["prompt_embeddings"], prompt)
    sp = SoftPrompt.load(folder, tiny_lm.hidden_size)
    assert torch.equal(sp.embeddings, prompt)
    assert sp.meta == {**meta, "culturalign_version": culturalign.__version__}  # save records the version
    assert sp.source == {"path": str(folder), "sha256": hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest(),
                         "n_tokens": 5}
    assert sp.n_tokens == 5


def test_save_without_model_and_overwrite(tmp_path, prompt):
    folder = tmp_path / "deep" / "sp"
    SoftPrompt(prompt).save(folder)
    SoftPrompt(prompt[:2] * 2, {"prompt": "icl"}).save(folder)
    sp = SoftPrompt.load(folder)
    assert torch.equal(sp.embeddings, prompt[:2] * 2)
    assert sp.meta == {"prompt": "icl", "culturalign_version": culturalign.__version__}
    assert json.loads((folder / "adapter_config.json").read_text())["num_virtual_tokens"] == 2


def test_load_without_meta_or_config(tmp_path, prompt):
    folder = tmp_path / "bare"
    folder.mkdir()
    save_file({"prompt_embeddings": prompt.contiguous()}, str(folder / "adapter_model.safetensors"))
    sp = SoftPrompt.load(folder, prompt.shape[1])
    assert torch.equal(sp.embeddings, prompt) and sp.meta == {}


def test_width_mismatch(tmp_path, prompt):
    SoftPrompt(prompt).save(tmp_path / "sp")
    with pytest.raises(CulturalignError, match="width 32") as e:
        SoftPrompt.load(tmp_path / "sp", 576)
    assert "576" in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(CulturalignError, match="nope' does not exist"):
        SoftPrompt.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CulturalignError, match="adapter_model.safetensors"):
        SoftPrompt.load(tmp_path / "empty")


def test_wrong_peft_type(tmp_path, prompt):
    folder = SoftPrompt(prompt).save(tmp_path / "sp")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["peft_type"] = "LORA"
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CulturalignError, match="LORA"):
        SoftPrompt.load(folder)


def test_wrong_tensor(tmp_path, prompt):
    folder = tmp_path / "sp"
    folder.mkdir()
    save_file({"weight": prompt.contiguous()}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(CulturalignError, match="prompt_embeddings"):
        SoftPrompt.load(folder)
    save_file({"prompt_embeddings": prompt[0].contiguous()}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(CulturalignError, match="prompt_embeddings"):
        SoftPrompt.load(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CulturalignError, match="safetensors"):
        SoftPrompt.load(folder)


def test_corrupt_adapter_config_is_user_error(tmp_path, prompt):
    folder = SoftPrompt(prompt).save(tmp_path / "sp")
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(CulturalignError) as e:
        SoftPrompt.load(folder)
    assert "sp" in str(e.value)


# ---- initial prompts -----------------------------------------------------------------------------------

def test_initial_prompt_text(tiny_lm):
    table = tiny_lm.model.get_input_embeddings().weight
    ids = tiny_lm.tokenizer("Answer options:", add_special_tokens=False)["input_ids"]
    assert 1 < len(ids) < 7
    p = initial_prompt(tiny_lm, 7, "text", "Answer options:")
    assert p.shape == (7, tiny_lm.hidden_size)
    cycled = (ids * 7)[:7]
    for row, i in zip(p, cycled):
        assert torch.equal(row, table[i])
    short = initial_prompt(tiny_lm, 1, "text", "Answer options:")
    assert torch.equal(short[0], table[ids[0]])
    p[0] += 1  # a copy, not a view of the embedding table
    assert torch.equal(table[ids[0]], short[0])


def test_initial_prompt_vocab_and_random(tiny_lm):
    table = tiny_lm.model.get_input_embeddings().weight
    v = initial_prompt(tiny_lm, 6, "vocab", seed=3)
    assert v.shape == (6, tiny_lm.hidden_size)
    assert all(any(torch.equal(row, t) for t in table) for row in v)
    assert torch.equal(v, initial_prompt(tiny_lm, 6, "vocab", seed=3))
    r = initial_prompt(tiny_lm, 64, "random", seed=0)
    assert r.shape == (64, tiny_lm.hidden_size)
    assert float(r.std()) == pytest.approx(embedding_std(tiny_lm), rel=0.1)
    assert torch.equal(r, initial_prompt(tiny_lm, 64, "random", seed=0))
    assert not torch.equal(r, initial_prompt(tiny_lm, 64, "random", seed=1))


def test_initial_prompt_errors(tiny_lm):
    with pytest.raises(CulturalignError, match="at least 1"):
        initial_prompt(tiny_lm, 0, "random")
    with pytest.raises(CulturalignError, match="non-empty"):
        initial_prompt(tiny_lm, 3, "text", "")
    with pytest.raises(CulturalignError, match="unknown soft prompt init"):
        initial_prompt(tiny_lm, 3, "zeros")


# ---- projection ---------------------------------------------------------------------------------------

def test_projection_deterministic_per_seed():
    p0 = torch.zeros(4, 8)
    a, b, c = Projection(p0, 10, 5, 0.5), Projection(p0, 10, 5, 0.5), Projection(p0, 10, 6, 0.5)
    z = np.random.default_rng(0).uniform(-1, 1, (3, 10))
    assert torch.equal(a(z), b(z))
    assert not torch.allclose(a(z), c(z))
    assert a(z).shape == (3, 4, 8)
    assert a(z[0]).shape == (1, 4, 8)
    # p0 + A z: zero z gives p0, linear in z
    p1 = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    d = Projection(p1, 10, 5, 0.5)
    assert torch.equal(d(np.zeros(10))[0], p1)
    torch.testing.assert_close(d(z[0] + z[1])[0] - p1, (d(z[0])[0] - p1) + (d(z[1])[0] - p1))


def test_projection_coordinate_std_matches_embedding_std():
    emb_std = 0.07
    proj = Projection(torch.zeros(8, 64), 50, 0, emb_std)
    z = torch.rand(400, 50, generator=torch.Generator().manual_seed(0)) * 2 - 1  # U(-1, 1)
    delta = proj(z)
    assert float(delta.std()) == pytest.approx(emb_std, rel=0.05)
    # bound b: z ~ U(-b, b) gives the same spread
    proj2 = Projection(torch.zeros(8, 64), 50, 0, emb_std, bound=3.0)
    assert float(proj2(z * 3).std()) == pytest.approx(emb_std, rel=0.05)


def test_projection_identity_when_dim_is_full():
    p0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    proj = Projection(p0, 6, 0, emb_std=0.2)
    assert proj.A is None
    z = np.array([1.0, -1.0, 0.5, 0.0, 0.25, -0.5])
    out = proj(z)[0]
    torch.testing.assert_close(out, p0 + torch.tensor(z, dtype=torch.float32).view(2, 3) * 0.2 * math.sqrt(3))


@pytest.mark.parametrize("dim", [0, -1, 7])
def test_projection_bad_dim(dim):
    with pytest.raises(CulturalignError, match="--dim"):
        Projection(torch.zeros(2, 3), dim, 0, 0.1)


# ---- PEFT equivalence ---------------------------------------------------------------------------------

def test_peft_loads_prompt_and_gives_same_answers(tmp_path, tiny_lm, vsm, prompt):
    from peft import PeftModel

    folder = SoftPrompt(prompt, {"prompt": "persona"}).save(tmp_path / "sp", backend=tiny_lm)
    base = copy.deepcopy(tiny_lm.model)
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    survey = Survey(tiny_lm, vsm, "persona", load_target("SA"))
    result = survey.result(prompt)
    plain = survey.result()
    differs = 0.0
    for i, seq in enumerate(survey.sequences):
        with torch.no_grad():
            logits = peft_model(input_ids=torch.tensor([seq])).logits[0, -1]
        assert logits.shape == (len(tiny_lm.tokenizer),)
        opt = torch.softmax(logits.double(), -1)[survey.option_ids]
        probs = (opt / opt.sum()).numpy()
        np.testing.assert_allclose(probs, result.items[i]["probs"], atol=1e-5)
        assert float(opt.sum()) == pytest.approx(result.items[i]["option_mass"], abs=1e-5)
        differs = max(differs, float(np.abs(probs - plain.items[i]["probs"]).max()))
    assert differs > 0.05  # the soft prompt changes the answers, so the comparison has teeth
