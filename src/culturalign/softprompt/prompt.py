"""Soft prompts: learnable input embeddings prepended at position 0, saved in PEFT's format.

A saved prompt is a folder PEFT loads with `PeftModel.from_pretrained(model, folder)`:
`adapter_config.json` (PROMPT_TUNING, CAUSAL_LM) and `adapter_model.safetensors` with one tensor,
`prompt_embeddings` [n, hidden]. culturalign adds `culturalign.json` (the prompt profile, instrument
and model the prompt was searched with) so `culturalign survey --soft-prompt DIR` asks the same way.

The parameterisations that map search coordinates to such a tensor live in
`culturalign.softprompt.params`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from culturalign.backends import Backend
from culturalign.errors import CulturalignError
from culturalign.files import atomic_write, atomic_write_json

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
