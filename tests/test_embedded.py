"""Model loading and the model cache; one real survey on the embedded SmolLM2-135M."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from culturalign import CulturalignError, load_instrument, load_target
from culturalign.backends import loading
from culturalign.backends.loading import FALLBACK_TEMPLATE, MANIFEST, cache_is_valid, load_backend
from culturalign.measure.survey import Survey

DIMS = ["PDI", "IDV", "MAS", "UAI", "LTO", "IVR"]


# ---- the embedded model, for real ----------------------------------------------------------------------

@pytest.mark.slow
def test_embedded_naive_survey_china(embedded_lm):
    assert embedded_lm.name == "smollm2-135m"
    assert not embedded_lm.model.training
    assert not any(p.requires_grad for p in embedded_lm.model.parameters())
    r = Survey(embedded_lm, load_instrument(), "naive", load_target("CN")).result()
    j = json.loads(json.dumps(r.to_json()))
    assert j["model"] == "smollm2-135m" and j["instrument"] == "vsm2013"
    assert j["prompt"] == "naive" and j["mode"] == "logprob"
    assert list(j["constants"]) == DIMS and list(j["indices"]) == DIMS
    assert j["target"]["name"] == "China"
    assert isinstance(j["l1"], float) and j["l1_dims"] == DIMS
    assert len(j["items"]) == 24
    for it in j["items"]:
        assert len(it["probs"]) == 5
        assert sum(it["probs"]) == pytest.approx(1.0, abs=1e-5)
    assert j["mean_option_mass"] > 0.9
    assert np.mean([it["option_mass"] for it in j["items"]]) > 0.9
    inst = load_instrument()
    np.testing.assert_allclose([j["indices"][d] for d in DIMS], inst.score([it["mean"] for it in j["items"]]), atol=1e-3)


@pytest.mark.slow
def test_embedded_model_comes_from_a_valid_cache(embedded_lm):
    folder = loading.embedded_model_dir()  # what a second load_backend() uses
    assert folder.is_dir()
    assert folder.parent == loading.cache_dir() / "models"
    assert folder.name.startswith("smollm2-135m-")
    assert cache_is_valid(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    assert not list(folder.parent.glob(".tmp-*"))  # no half-written cache left behind


# ---- cache validity on a small fake folder ----------------------------------------------------------------

def _fake_cache(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / MANIFEST).write_text(json.dumps({"source": "fake.gguf", "files": loading._manifest(folder)}, indent=1))
    return folder


def test_cache_valid_fake(tmp_path):
    folder = _fake_cache(tmp_path / "c")
    assert cache_is_valid(folder)
    files = json.loads((folder / MANIFEST).read_text())["files"]
    assert set(files) == {"model.safetensors", "config.json"}
    assert files["model.safetensors"]["size"] == 10240


def test_cache_hand_written_manifest(tmp_path):
    import hashlib

    folder = tmp_path / "c"
    folder.mkdir()
    data = b"weights" * 100
    (folder / "w.bin").write_bytes(data)
    manifest = {"source": "x", "files": {"w.bin": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert cache_is_valid(folder)
    manifest["files"]["w.bin"]["sha256"] = "0" * 64
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert not cache_is_valid(folder)


def test_cache_truncated_file_invalid(tmp_path):
    folder = _fake_cache(tmp_path / "c")
    p = folder / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    assert not cache_is_valid(folder)


def test_cache_same_size_change_invalid(tmp_path):
    folder = _fake_cache(tmp_path / "c")
    p = folder / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[5000] ^= 0xFF
    p.write_bytes(bytes(data))
    assert not cache_is_valid(folder)


def test_cache_missing_file_or_manifest_invalid(tmp_path):
    folder = _fake_cache(tmp_path / "a")
    (folder / "config.json").unlink()
    assert not cache_is_valid(folder)
    folder = _fake_cache(tmp_path / "b")
    (folder / MANIFEST).unlink()
    assert not cache_is_valid(folder)
    assert not cache_is_valid(tmp_path / "does-not-exist")


@pytest.mark.parametrize("text", ["{broken", "[]", '{"files": {}}', '{"source": "x"}', '{"files": {"config.json": 3}}'])
def test_cache_bad_manifest_invalid(tmp_path, text):
    folder = _fake_cache(tmp_path / "c")
    (folder / MANIFEST).write_text(text)
    assert not cache_is_valid(folder)


def test_embedded_model_dir_builds_once_and_rebuilds_when_corrupt(tmp_path, monkeypatch):
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 96)
    builds = []

    def fake_build(src, target):
        builds.append(target)
        if target.exists():
            shutil.rmtree(target)
        _fake_cache(target)

    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "embedded_gguf", lambda: gguf)
    monkeypatch.setattr(loading, "_build_embedded_cache", fake_build)
    folder = loading.embedded_model_dir()
    assert folder == tmp_path / "cache" / "models" / "smollm2-135m-100"
    assert cache_is_valid(folder) and len(builds) == 1
    assert loading.embedded_model_dir() == folder and len(builds) == 1  # valid cache: reused
    (folder / "model.safetensors").write_bytes(b"half a file")
    assert loading.embedded_model_dir() == folder and len(builds) == 2  # corrupt: rebuilt
    assert cache_is_valid(folder)


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "x"))
    assert loading.cache_dir() == tmp_path / "x"
    monkeypatch.delenv(loading.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.cache_dir() == tmp_path / "xdg" / "culturalign"


# ---- load_backend on local folders ------------------------------------------------------------------------

def test_load_backend_from_dir(tiny_dir, tiny_lm):
    lm = load_backend(str(tiny_dir), device="cpu")
    assert lm.name == str(tiny_dir)
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.pad_token_id is not None
    assert lm.tokenizer.chat_template == tiny_lm.tokenizer.chat_template
    assert lm.hidden_size == 32
    for a, b in zip(lm.model.state_dict().values(), tiny_lm.model.state_dict().values()):
        assert torch.equal(a, b)


def test_load_backend_without_chat_template(tiny_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lm = load_backend(str(folder), device="cpu")
    assert any("no chat template" in str(x.message) for x in w)
    assert lm.tokenizer.chat_template == FALLBACK_TEMPLATE
    s = Survey(lm, load_instrument(), "persona", load_target("CN"))
    text = lm.tokenizer.decode(s.sequences[0])
    assert text.startswith("You are a typical person from China.")
    assert "\n\nUser: " in text and text.endswith("Assistant: Answer: ")


def test_load_backend_errors(tmp_path, monkeypatch):
    with pytest.raises(CulturalignError, match="does not exist"):
        load_backend(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CulturalignError, match="config.json"):
        load_backend(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CulturalignError, match="could not be loaded"):
        load_backend("culturalign-test/no-such-model")


def test_device_errors():
    with pytest.raises(CulturalignError, match="unknown device"):
        loading.default_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(CulturalignError, match="CUDA"):
            loading.default_device("cuda")
    assert loading.default_device("cpu") == torch.device("cpu")
