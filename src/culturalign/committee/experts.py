"""A registry of cultural experts: one aligned soft prompt per culture, for one base model.

On disk a registry is a folder:

    manifest.json        schema, model, hidden size, instrument, and one entry per expert
    CN/                  a PEFT prompt-tuning folder (adapter_config.json, adapter_model.safetensors,
    US/ ...              culturalign.json), exactly what `culturalign align` writes
    runs/CN/ ...         (when built here) the ordinary `align` output folders the experts came from

Each manifest entry records the culture, its target set and scores, the naive and aligned L1 of the
run, the optimizer, budget and evaluations, the seed, and the SHA-256 of the tensor file, so that a
registry can be checked before it is used: `load_registry` refuses a missing or corrupt expert, a
changed tensor, or experts built for another model or hidden size, with one line naming the folder.

`build_experts` aligns one expert after the other with `Aligner` (any optimizer `align` offers) in
`OUT/runs/<code>`, copies the finished soft prompt to `OUT/<code>` and rewrites the manifest
atomically after each. Rerunning it keeps finished experts and resumes an interrupted one.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from culturalign.errors import CulturalignError
from culturalign.files import atomic_write_json, read_json_file
from culturalign.softprompt.prompt import SoftPrompt

SCHEMA = "culturalign.experts/1"
MANIFEST = "manifest.json"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "culturalign.json")


@dataclass
class Expert:
    code: str  # ISO alpha-2 (or the target's own code)
    name: str
    prompt: SoftPrompt
    info: dict = field(default_factory=dict)  # the manifest entry

    @property
    def embeddings(self):
        return self.prompt.embeddings


@dataclass
class Registry:
    path: Path
    model: str
    hidden_size: int
    instrument: str
    experts: dict[str, Expert]

    @property
    def codes(self) -> list[str]:
        return list(self.experts)

    def __getitem__(self, code: str) -> Expert:
        return self.experts[code]

    def __len__(self) -> int:
        return len(self.experts)


def shipped_registry(model: str) -> Path | None:
    """The registry shipped as package data for `model` (the embedded model), or None."""
    root = resources.files("culturalign.data").joinpath("experts", model)
    path = Path(str(root))
    return path if (path / MANIFEST).is_file() else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_registry(path: str | Path | None, model: str | None = None, hidden_size: int | None = None) -> Registry:
    """Read and check a registry folder (None: the one shipped for `model`).

    `model`/`hidden_size`: the base model it will be used with; experts built for another are refused.
    """
    if path is None:
        found = shipped_registry(model or "")
        if found is None:
            raise CulturalignError(
                f"no expert registry is shipped for model {model!r}; build one with "
                "`culturalign experts build --countries CN,US,... --out DIR` and pass --experts DIR"
            )
        path = found
    folder = Path(path)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise CulturalignError(f"expert registry {str(folder)!r} {what}; expected a folder with {MANIFEST}")
    data = read_json_file(folder / MANIFEST, "expert registry manifest")
    where = f"expert registry {str(folder)!r}"
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise CulturalignError(f"{where}: {MANIFEST} is not a culturalign expert manifest (schema {SCHEMA})")
    entries = data.get("experts")
    if not isinstance(entries, list) or not entries:
        raise CulturalignError(f"{where}: {MANIFEST} lists no experts")
    reg_model, reg_hidden = data.get("model"), data.get("hidden_size")
    if model is not None and reg_model != model:
        raise CulturalignError(f"{where} was built for model {reg_model!r}, not {model!r}; build experts for this model")
    if hidden_size is not None and reg_hidden != hidden_size:
        raise CulturalignError(
            f"{where} was built for hidden size {reg_hidden}, but the model has {hidden_size}; build experts for this model"
        )
    experts: dict[str, Expert] = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("code"), str) or not isinstance(e.get("folder"), str):
            raise CulturalignError(f"{where}: experts[{i}] needs a 'code' and a 'folder'")
        code = e["code"]
        if code in experts:
            raise CulturalignError(f"{where}: expert {code!r} is listed twice")
        sub = folder / e["folder"]
        if not sub.is_dir():
            raise CulturalignError(f"{where}: expert {code!r} is missing (no folder {e['folder']!r})")
        sp = SoftPrompt.load(sub, reg_hidden)
        if e.get("sha256") and sp.source and sp.source["sha256"] != e["sha256"]:
            raise CulturalignError(f"{where}: expert {code!r} does not match its manifest (SHA-256 of its tensor changed)")
        experts[code] = Expert(code=code, name=str(e.get("name", code)), prompt=sp, info=e)
    return Registry(path=folder, model=str(reg_model), hidden_size=int(reg_hidden), instrument=str(data.get("instrument")),
                    experts=experts)


def parse_culture_specs(text: str, default_set: str) -> list[tuple[str, str]]:
    """'CN,US,SA@hofstede-2023' -> [(CN, default_set), (US, default_set), (SA, hofstede-2023)]."""
    specs = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        code, _, set_name = part.partition("@")
        specs.append((code.strip(), set_name.strip() or default_set))
    if not specs:
        raise CulturalignError(f"--countries {text!r}: expected a comma-separated list, e.g. CN,US,SA@hofstede-2023")
    codes = [c.upper() for c, _ in specs]
    dup = sorted({c for c in codes if codes.count(c) > 1})
    if dup:
        raise CulturalignError(f"--countries {text!r}: {', '.join(dup)} given more than once")
    return specs


def _manifest(model: str, hidden: int, instrument: str, entries: list[dict]) -> dict:
    from culturalign import __version__

    return {"schema": SCHEMA, "culturalign_version": __version__, "model": model, "hidden_size": hidden,
            "instrument": instrument, "experts": entries}


def build_experts(backend, instrument, targets: list, config, out: str | Path,
                  progress: Callable[[str, dict], None] | None = None,
                  on_start: Callable[[str, object], None] | None = None) -> Registry:
    """Align one expert per target (an `AlignConfig` shared by all) into the registry folder `out`.

    Finished experts (in the manifest, tensor unchanged) are kept; an interrupted one resumes from its
    checkpoint in `out/runs/<code>`. The manifest is rewritten atomically after each expert.
    """
    from culturalign.alignment.run import CHECKPOINT, Aligner

    out = Path(out)
    entries: list[dict] = []
    if (out / MANIFEST).exists():
        reg = load_registry(out, hidden_size=backend.hidden_size)
        if reg.model != backend.name:
            raise CulturalignError(f"expert registry {str(out)!r} was built for model {reg.model!r}, not {backend.name!r}")
        entries = [e.info for e in reg.experts.values()]
    elif out.is_dir() and any(p.name != "runs" and not p.name.startswith(".") for p in out.iterdir()):
        # a folder holding only runs/ is a build interrupted before its first expert finished
        raise CulturalignError(f"--out {str(out)!r} is not empty and holds no expert registry; choose a new or empty folder")
    done = {e["code"] for e in entries}
    for target in targets:
        code = target.iso2 or target.code or target.name
        if code in done:
            continue
        run_dir = out / "runs" / code
        resume = (run_dir / CHECKPOINT).exists()
        aligner = Aligner(backend, instrument, target, config, run_dir, resume=resume)
        if on_start is not None:
            on_start(code, aligner)
        aligner.progress = (lambda info, c=code: progress(c, info)) if progress else (lambda info: None)
        if not aligner.nothing_to_do:
            result = aligner.run()
        else:
            result = read_json_file(run_dir / "result.json", "align result")
        entries.append(_install(out, code, target, run_dir, result))
        atomic_write_json(out / MANIFEST, _manifest(backend.name, backend.hidden_size, instrument.id, entries), indent=2)
    return load_registry(out, hidden_size=backend.hidden_size)


def _install(out: Path, code: str, target, run_dir: Path, result: dict) -> dict:
    """Copy a finished run's soft prompt into the registry and describe it for the manifest."""
    dest = out / code
    tmp = out / f".{code}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in PEFT_FILES:
        shutil.copy2(run_dir / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    s, prof = result["settings"], result["profiles"]
    return {
        "code": code, "name": target.name, "folder": code, "target": target.to_json(),
        "naive_l1": prof["naive"]["l1"], "icl_l1": prof["icl"]["l1"], "aligned_l1": prof["aligned"]["l1"],
        "aligned_option_mass": prof["aligned"]["mean_option_mass"],
        "optimizer": s["optimizer"], "budget": s["budget"], "evaluations": result["evaluations"], "seed": s["seed"],
        "tokens": s["tokens"], "constants": s["constants"], "instrument": s["instrument"],
        "order": s.get("order", "forward"), "contrast": s.get("contrast", 0.0),
        "search_seconds": result["search_seconds"], "sha256": _sha256(dest / "adapter_model.safetensors"),
        "run": str(Path("runs") / code),
    }
