"""Soft prompts: learnable input embeddings prepended at position 0, saved in PEFT's format.

A saved prompt is a folder PEFT loads with `PeftModel.from_pretrained(model, folder)`:
`adapter_config.json` (PROMPT_TUNING, CAUSAL_LM) and `adapter_model.safetensors` with one tensor,
`prompt_embeddings` [n, hidden]. culturalign adds `culturalign.json` (the prompt profile, instrument
and model the prompt was searched with) so `culturalign survey --soft-prompt DIR` asks the same way.

`Projection` is the black-box parameterisation of Black-Box Tuning (Sun et al., 2022): the prompt is
`p0 + A z` with `z` in R^d and `A` a fixed Gaussian matrix drawn from a recorded seed, scaled so that
for `z` uniform in [-b, b]^d each coordinate of `A z` has `sigma` times the embedding table's standard
deviation (BBT uses sigma = 1; on SmolLM2-135M random directions of that size barely move the survey
answers, see README "Design choices", so the default is larger).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from culturalign.backends import Backend
from culturalign.errors import CulturalignError
from culturalign.files import atomic_write, atomic_write_json

from culturalign.config import INITS  # noqa: F401  (re-exported)
META = "culturalign.json"


@dataclass
class SoftPrompt:
    embeddings: torch.Tensor  # [n, hidden]
    meta: dict = field(default_factory=dict)
    source: dict | None = None  # where it was loaded from: {"path", "sha256"} of the tensor file (reproducibility)

    @property
    def n_tokens(self) -> int:
        return self.embeddings.shape[0]

    def save(self, folder: str | Path, base_model: str = "", backend: Backend | None = None) -> Path:
        """Write the PEFT folder; `backend` (the model it was searched on) fills in PEFT's model fields."""
        folder = Path(folder)
        if self.embeddings.dim() != 2 or self.embeddings.shape[0] < 1:
            raise CulturalignError(f"a soft prompt must have shape [n >= 1, hidden], got {list(self.embeddings.shape)}")
        if not torch.isfinite(self.embeddings).all():
            raise CulturalignError(f"refusing to save a soft prompt with NaN or infinite values to {str(folder)!r}")
        folder.mkdir(parents=True, exist_ok=True)
        info = backend.model_info() if backend is not None else {}
        config = {
            "auto_mapping": None, "base_model_name_or_path": base_model or None, "inference_mode": True,
            "modules_to_save": None, "num_attention_heads": info.get("num_attention_heads"),
            "num_layers": info.get("num_layers"), "num_transformer_submodules": 1,
            "num_virtual_tokens": self.n_tokens, "peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None, "revision": None, "task_type": "CAUSAL_LM",
            "token_dim": self.embeddings.shape[1], "tokenizer_kwargs": None, "tokenizer_name_or_path": None,
        }
        atomic_write(folder / "adapter_model.safetensors", lambda p: save_file(
            {"prompt_embeddings": self.embeddings.detach().float().cpu().contiguous()}, p))
        atomic_write_json(folder / "adapter_config.json", config, indent=2)
        from culturalign import __version__

        atomic_write_json(folder / META, {**self.meta, "culturalign_version": __version__}, indent=2)
        return folder

    @classmethod
    def load(cls, folder: str | Path, hidden_size: int | None = None) -> "SoftPrompt":
        """Read a PEFT prompt-tuning folder; every inconsistency is one clear error naming the file."""
        folder = Path(folder)
        if not folder.is_dir():
            what = "is a file" if folder.exists() else "does not exist"
            raise CulturalignError(f"soft prompt {str(folder)!r} {what}; expected a PEFT prompt-tuning folder")
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise CulturalignError(f"soft prompt {str(folder)!r}: no adapter_model.safetensors (expected a PEFT prompt-tuning folder)")
        try:
            tensors = load_file(str(weights))
        except Exception as e:  # safetensors raises its own error types
            raise CulturalignError(f"soft prompt {str(weights)!r} is not a readable safetensors file ({e})") from None
        if "prompt_embeddings" not in tensors or tensors["prompt_embeddings"].dim() != 2:
            raise CulturalignError(f"soft prompt {str(weights)!r}: expected one tensor 'prompt_embeddings' of shape [n, hidden]")
        emb = tensors["prompt_embeddings"].float()
        if emb.shape[0] < 1 or emb.shape[1] < 1:
            raise CulturalignError(f"soft prompt {str(weights)!r}: tensor 'prompt_embeddings' is empty, shape {list(emb.shape)}")
        if not torch.isfinite(emb).all():
            raise CulturalignError(f"soft prompt {str(weights)!r} holds NaN or infinite values")
        cfg_path = folder / "adapter_config.json"
        if cfg_path.is_file():
            cfg = _read_json(cfg_path)
            if cfg.get("peft_type", "PROMPT_TUNING") != "PROMPT_TUNING":
                raise CulturalignError(f"soft prompt {str(folder)!r}: peft_type is {cfg.get('peft_type')!r}, expected PROMPT_TUNING")
            for key, actual in (("num_virtual_tokens", emb.shape[0]), ("token_dim", emb.shape[1])):
                declared = cfg.get(key)
                if declared is not None and declared != actual:
                    raise CulturalignError(
                        f"soft prompt {str(cfg_path)!r}: {key} is {declared!r} but the tensor has shape "
                        f"{list(emb.shape)} (n, hidden); the folder is inconsistent"
                    )
        meta = _read_json(folder / META) if (folder / META).is_file() else {}
        sp = cls(emb, meta, {"path": str(folder), "sha256": _sha256(weights), "n_tokens": int(emb.shape[0])})
        if hidden_size is not None:
            sp.check_width(hidden_size)
        return sp

    def check_width(self, hidden_size: int) -> None:
        """A prompt made for another model (another embedding width) is an error naming its folder."""
        if self.embeddings.shape[1] != hidden_size:
            where = repr(self.source["path"]) if self.source else "the soft prompt"
            raise CulturalignError(
                f"soft prompt {where} has width {self.embeddings.shape[1]} but the model's embeddings have "
                f"{hidden_size}: it was made for another model"
            )


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise CulturalignError(f"soft prompt file {str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CulturalignError(f"soft prompt file {str(path)!r}: expected a JSON object")
    return data


def embedding_std(backend: Backend) -> float:
    """The standard deviation of the model's input embeddings (`Backend.embedding_table`, the space `embed` returns)."""
    return float(backend.embedding_table().std())


VOCAB_ROWS = 8192  # the most frequent tokens (BPE ids are roughly in merge order): the pool of real tokens


def vocab_rows(backend: Backend, n: int = VOCAB_ROWS):
    """[V, hidden] float64 numpy: the embeddings of the first `n` vocabulary rows, without special tokens."""
    table = backend.embedding_table()
    special = set(getattr(backend.tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(min(n, table.shape[0])) if i not in special]
    return table[ids].double().numpy()


def initial_prompt(backend: Backend, n: int, how: str = "text", text: str | None = None, seed: int = 0) -> torch.Tensor:
    """[n, hidden] starting prompt: a text's token embeddings (cycled/cut to n), sampled vocabulary rows, or noise.

    All three are in the space the model's own tokens enter it (`Backend.embedding_table`): a `text` prompt
    answers as the text given as tokens at position 0 does, also on models that scale their embeddings (Gemma)."""
    if n < 1:
        raise CulturalignError(f"--tokens must be at least 1, got {n}")
    table = backend.embedding_table()
    g = torch.Generator().manual_seed(seed)
    if how == "text":
        ids = backend.tokenizer(text or "", add_special_tokens=False)["input_ids"]
        if not ids:
            raise CulturalignError("soft prompt init 'text' needs a non-empty text")
        ids = (ids * math.ceil(n / len(ids)))[:n]
        return table[ids].clone()
    if how == "vocab":
        return table[torch.randint(0, min(table.shape[0], 5000), (n,), generator=g)].clone()
    if how == "random":
        return torch.randn(n, table.shape[1], generator=g) * table.std()
    raise CulturalignError(f"unknown soft prompt init {how!r}; expected one of {', '.join(INITS)}")


class Projection:
    """prompt(z) = p0 + A z, z in [-bound, bound]^d; A Gaussian from `seed`, or scaled identity if d = n*hidden."""

    def __init__(self, p0: torch.Tensor, dim: int, seed: int, emb_std: float, bound: float = 1.0, sigma: float = 1.0):
        self.p0, self.shape, self.dim, self.seed, self.bound = p0.float(), tuple(p0.shape), dim, seed, bound
        full = p0.numel()
        self.check_dim(dim, full)
        if sigma <= 0:
            raise CulturalignError(f"--sigma must be positive, got {sigma}")
        self.sigma = sigma
        z_std = bound / math.sqrt(3.0)  # std of U(-b, b)
        target_std = sigma * emb_std  # per-coordinate std of A z
        if dim == full:
            self.A = None
            self.scale = target_std / z_std
        else:
            g = torch.Generator().manual_seed(seed)
            self.A = torch.randn(full, dim, generator=g) * (target_std / (math.sqrt(dim) * z_std))

    @staticmethod
    def check_dim(dim: int, full: int) -> None:
        if not 1 <= dim <= full:
            raise CulturalignError(f"--dim must be between 1 and {full} (tokens x hidden size), got {dim}")

    def __call__(self, z) -> torch.Tensor:
        """[P, d] (numpy or torch) -> [P, n, hidden] prompts."""
        z = torch.as_tensor(z, dtype=torch.float32)
        if z.dim() == 1:
            z = z.unsqueeze(0)
        delta = z * self.scale if self.A is None else z @ self.A.T
        return self.p0.unsqueeze(0) + delta.view(-1, *self.shape)
