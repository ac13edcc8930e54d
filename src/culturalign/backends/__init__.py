"""The frozen model behind one interface (`Backend`); `HFBackend` for transformers models.

    base.py     the interface and its small dataclasses
    hf.py       HFBackend: prefix/KV-sharing option distributions, generation, the plain reference
    loading.py  the embedded GGUF -> cached safetensors, local dirs, hub ids, devices -> HFBackend
"""

from culturalign.backends.base import (
    Backend, Distributions, Generation, GenerationRequest, LoglikelihoodRequest, PromptSet, TextStream,
)
from culturalign.backends.hf import HFBackend
from culturalign.backends.loading import load_backend

__all__ = ["Backend", "Distributions", "PromptSet", "GenerationRequest", "Generation", "LoglikelihoodRequest", "HFBackend",
           "load_backend", "TextStream"]
