"""Experiment files: a grid of align runs, read from YAML or TOML and checked before anything runs.

A file (`experiments/paper.yaml`):

    name: paper                      # default: the file's stem
    model: smollm2-135m              # default; a local model folder (relative to this file) or a hub id
    instrument: vsm2013              # default; a built-in id or an instrument JSON file
    grid:
      targets:                       # a country (set hofstede-2015), "CODE@SET", or {country, set}
        - {country: SA, set: hofstede-2023}
        - US
        - CN@hofstede-2015
      optimizers: [de, adam]         # any name in the optimizer registry (culturalign.search.registry)
      seeds: [0, 1, 2]               # default [0]
      budget: 200                    # candidate evaluations per cell
    settings: {tokens: 32, sigma: 40}          # any AlignConfig field, for every cell
    optimizer_settings: {adam: {lr: 0.02}}     # per optimizer, over `settings` (budget allowed)

The grid is targets x optimizers x seeds; each cell is one `align` run. `load_spec` reads and checks
the file (unknown keys, types, optimizers, countries, every cell's AlignConfig) and returns an
`Experiment`: the resolved targets, one `Cell` per run and `normalised()`, the JSON that the
experiment folder keeps to detect a changed file on resume. Every error is one line that names the
file and the key path: `paper.yaml: grid.optimizers[2]: unknown optimizer 'foo'; expected one of de, adam`.

Long because: the experiment file's schema and every check of it, each naming the file and key path, are one
unit; splitting them would separate a rule from the message that reports it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from culturalign.errors import CulturalignError

SUFFIXES = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML"}
GRID_FIELDS = ("optimizer", "seed")  # AlignConfig fields the grid sets; not allowed in settings
DEFAULT_MODEL = "smollm2-135m"


# ---- the file's schema ------------------------------------------------------------------------------

class _Strict(BaseModel):
    """Unknown keys are errors that list the keys this table accepts."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data):
        if isinstance(data, dict):
            known = list(cls.model_fields)
            for key in data:
                if key not in known:
                    raise PydanticCustomError("unknown_key", "unknown key; expected one of {known}",
                                              {"key": str(key), "known": ", ".join(known)})
        return data


class TargetSpec(_Strict):
    country: StrictStr
    set: StrictStr = "hofstede-2015"


class GridSpec(_Strict):
    targets: list[TargetSpec]
    optimizers: list[StrictStr]
    seeds: list[StrictInt] = [0]
    budget: StrictInt | None = None  # default: AlignConfig's

    @field_validator("targets", mode="before")
    @classmethod
    def _target_strings(cls, value):
        """'US' and 'SA@hofstede-2023' are short for {country: US} and {country: SA, set: hofstede-2023}."""
        if isinstance(value, list):
            out = []
            for v in value:
                if isinstance(v, str) and "@" in v:
                    country, _, set_name = v.partition("@")
                    v = {"country": country.strip(), "set": set_name.strip()}
                elif isinstance(v, str):
                    v = {"country": v}
                out.append(v)
            return out
        return value


class ExperimentSpec(_Strict):
    name: StrictStr | None = None
    model: StrictStr = DEFAULT_MODEL
    instrument: StrictStr = "vsm2013"
    grid: GridSpec
    settings: dict[StrictStr, Any] = {}
    optimizer_settings: dict[StrictStr, dict[StrictStr, Any]] = {}


# ---- the checked, resolved experiment ---------------------------------------------------------------

@dataclass
class Cell:
    """One align run of the grid: its folder name, target, optimizer, seed and full AlignConfig."""

    name: str  # <COUNTRY>-<set>-<optimizer>-s<seed>, the folder under OUT/cells/
    code: str  # the target's ISO alpha-2 code (or Hofstede's code, or its name)
    target: Any  # culturalign.measure.targets.Target
    optimizer: str
    seed: int
    config: Any  # culturalign.alignment.config.AlignConfig (checked on construction)

    @property
    def set_name(self) -> str:
        return self.target.set_name

    @property
    def budget(self) -> int:
        return self.config.budget


@dataclass
class Experiment:
    path: Path  # the file it was read from
    name: str
    model: str
    instrument: Any  # culturalign.measure.instrument.Instrument
    targets: list  # Target, in grid order
    optimizers: list[str]
    seeds: list[int]
    settings: dict
    optimizer_settings: dict
    cells: list[Cell]

    @property
    def dims(self) -> list[str]:
        return list(self.instrument.dims)

    def normalised(self) -> dict:
        """What defines the results: resolved targets, full per-cell settings. Stored as experiment.json."""
        from culturalign.files import dumps
        import json

        cells = {c.name: c.config.fingerprint_json() for c in self.cells}
        return json.loads(dumps({
            "name": self.name, "model": self.model, "instrument": self.instrument.source or self.instrument.id,
            "grid": {"targets": [{"country": _code(t), "set": t.set_name, "name": t.name} for t in self.targets],
                     "optimizers": self.optimizers, "seeds": self.seeds},
            "settings": self.settings, "optimizer_settings": self.optimizer_settings,
            "cells": cells,
        }))


def _code(target) -> str:
    raw = target.iso2 or target.code or target.name
    return "".join(ch if ch.isalnum() else "-" for ch in raw).strip("-")


# ---- reading ----------------------------------------------------------------------------------------

def _loc(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _pydantic_error(where: str, err: ValidationError) -> CulturalignError:
    e = err.errors(include_url=False)[0]
    loc = list(e["loc"])
    if e["type"] == "unknown_key":
        loc.append(e["ctx"]["key"])
        return CulturalignError(f"{where}: {_loc(loc)}: unknown key; expected one of {e['ctx']['known']}")
    if e["type"] == "extra_forbidden":
        return CulturalignError(f"{where}: {_loc(loc)}: unknown key")
    path = _loc(loc) or "top level"
    if e["type"] == "missing":
        return CulturalignError(f"{where}: {path}: missing; this key is required")
    msg = e["msg"][0].lower() + e["msg"][1:]
    if loc == [] and e["type"] == "model_type":
        return CulturalignError(f"{where}: expected a table of keys (name, model, grid, ...), got {e['input']!r}")
    return CulturalignError(f"{where}: {path}: {msg}, got {e['input']!r}"[:400])


class _UniqueKeyLoader:
    """A PyYAML safe loader that refuses a key given twice (PyYAML keeps the last one silently)."""

    @staticmethod
    def build():
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def mapping(loader, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = loader.construct_object(key_node, deep=deep)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: construct_mapping says so below
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice", key_node.start_mark)
                seen.add(key)
            return loader.construct_mapping(node, deep)

        Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
        return Loader


def read_spec_file(path: str | Path) -> tuple[ExperimentSpec, str]:
    """Parse the file by its suffix (.yaml/.yml or .toml) into the schema; returns it and the name to cite."""
    from culturalign.files import read_text_file

    p = Path(path)
    where = str(path)
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise CulturalignError(f"experiment file {where!r}: expected a .yaml, .yml or .toml file")
    text = read_text_file(p, "experiment file", "a YAML or TOML file")
    if kind == "TOML":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise CulturalignError(f"{where}: not valid TOML ({e})") from None
    else:
        import yaml

        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader.build())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e)
            raise CulturalignError(f"{where}: not valid YAML ({at}{problem})") from None
    if data is None or data == {}:
        raise CulturalignError(f"{where}: the file is empty; expected at least a grid with targets and optimizers")
    try:
        return ExperimentSpec.model_validate(data), where
    except ValidationError as e:
        raise _pydantic_error(where, e) from None


def _local_path(value: str, base: Path) -> str:
    """A relative path in the file is relative to the file's folder (when it names something there)."""
    if value.startswith(("./", "../")) or (not Path(value).is_absolute() and (base / value).exists()):
        return str((base / value).resolve())
    return value


def _flat_types(hint) -> set:
    """The types a field accepts: {float, tuple} for `float | tuple[float, float]`."""
    import types

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return set().union(*(_flat_types(a) for a in typing.get_args(hint)))
    return {typing.get_origin(hint) or hint}


def _check_value(where: str, key_path: str, name: str, value, hints: dict):
    """One setting's value, converted to the AlignConfig field's type (a list for a tuple, ...)."""
    from pydantic import TypeAdapter

    hint = hints.get(name)
    if hint is None:
        return value
    allowed = _flat_types(hint)
    bad = (isinstance(value, bool) and bool not in allowed) or (isinstance(value, str) and str not in allowed)
    if not bad:
        try:
            return TypeAdapter(hint).validate_python(value)
        except ValidationError:
            bad = True
        except Exception:  # a type pydantic cannot build a validator for: leave it to AlignConfig
            return value
    raise CulturalignError(f"{where}: {key_path}: expected {_type_name(hint)}, got {value!r}")


def _settings(where: str, prefix: str, values: dict, hints: dict, fields: list[str], allow_budget: bool) -> dict:
    settable = [f for f in fields if f not in GRID_FIELDS and (allow_budget or f != "budget")]
    out = {}
    for key, value in values.items():
        path = f"{prefix}.{key}"
        if key in GRID_FIELDS:
            raise CulturalignError(f"{where}: {path}: set by the grid; use grid.{key}s")
        if key == "budget" and not allow_budget:
            raise CulturalignError(f"{where}: {path}: the budget is grid.budget (or optimizer_settings.<name>.budget)")
        if key not in settable:
            raise CulturalignError(f"{where}: {path}: unknown setting; expected one of {', '.join(settable)}")
        out[key] = _check_value(where, path, key, value, hints)
    return out


def _field_message(error: CulturalignError, names: list[str]) -> tuple[str | None, str]:
    """Which setting an AlignConfig error is about (the first field it names), and its message for that setting:
    the field's name leads the location, so the message drops it (or names it without its flag); other fields
    keep their command-line flags, as the CLI shows them."""
    from culturalign.alignment.config import flag
    from culturalign.errors import ConfigError, field

    if not isinstance(error, ConfigError):
        return None, str(error)
    key = next((f for f in error.fields if f in names), None)
    if key is None:
        return None, error.named(flag)
    template = error.args[0]
    mark = field(key)
    rest = template[len(mark) + 1:] if template.startswith(mark + " ") else template.replace(mark, key)
    return key, ConfigError(rest).named(flag)


def load_spec(path: str | Path, model: str | None = None) -> Experiment:
    """Read, check and resolve an experiment file; `model` overrides the file's model (CLI --model).

    Checks everything that can be checked without the model: keys and types, the targets (each
    country in its set, no target twice), optimizer names (read from the optimizer registry now), seeds, and
    each cell's `AlignConfig` (checked on construction). Nothing is written.
    """
    from culturalign.alignment.config import AlignConfig
    from culturalign.search.registry import dfols_missing, optimizer_names

    optimizers = optimizer_names()
    from culturalign.measure.instrument import load_instrument
    from culturalign.measure.targets import load_target

    spec, where = read_spec_file(path)
    base = Path(path).resolve().parent
    grid = spec.grid
    for key in ("targets", "optimizers", "seeds"):
        if not getattr(grid, key):
            raise CulturalignError(f"{where}: grid.{key}: empty; the grid needs at least one (it would have no cells)")

    targets, seen = [], {}
    for i, t in enumerate(grid.targets):
        try:
            target = load_target(t.country, t.set)
        except CulturalignError as e:
            key = "set" if "unknown target set" in str(e) else "country"
            raise CulturalignError(f"{where}: grid.targets[{i}].{key}: {e}") from None
        ident = (target.name, target.set_name)
        if ident in seen:
            raise CulturalignError(
                f"{where}: grid.targets[{i}]: {target.name} ({target.set_name}) is already in the grid as targets[{seen[ident]}]")
        seen[ident] = i
        targets.append(target)
    codes = [f"{_code(t)}-{t.set_name}" for t in targets]
    for i, c in enumerate(codes):
        if codes.index(c) != i:
            raise CulturalignError(f"{where}: grid.targets[{i}]: its folder name {c!r} is taken by targets[{codes.index(c)}]")

    for i, name in enumerate(grid.optimizers):
        if name not in optimizers:
            raise CulturalignError(f"{where}: grid.optimizers[{i}]: unknown optimizer {name!r}; expected one of {', '.join(optimizers)}")
        if name == "dfols" and dfols_missing():
            raise CulturalignError(f"{where}: grid.optimizers[{i}]: {dfols_missing()}")
        if grid.optimizers.index(name) != i:
            raise CulturalignError(f"{where}: grid.optimizers[{i}]: {name!r} is given twice")
    for i, seed in enumerate(grid.seeds):
        if grid.seeds.index(seed) != i:
            raise CulturalignError(f"{where}: grid.seeds[{i}]: seed {seed} is given twice")
    for name in spec.optimizer_settings:
        if name not in optimizers:
            raise CulturalignError(
                f"{where}: optimizer_settings.{name}: unknown optimizer {name!r}; expected one of {', '.join(optimizers)}")

    try:
        inst = load_instrument(_local_path(spec.instrument, base))
    except CulturalignError as e:
        raise CulturalignError(f"{where}: instrument: {e}") from None

    fields = [f.name for f in dataclasses.fields(AlignConfig)]
    try:
        hints = typing.get_type_hints(AlignConfig)
    except Exception:  # an annotation this Python cannot resolve: values are checked by AlignConfig alone
        hints = {}
    common = _settings(where, "settings", spec.settings, hints, fields, allow_budget=False)
    per_opt = {name: _settings(where, f"optimizer_settings.{name}", values, hints, fields, allow_budget=True)
               for name, values in spec.optimizer_settings.items()}
    for prefix, values in [("settings", common)] + [(f"optimizer_settings.{k}", v) for k, v in per_opt.items()]:
        if "constants" in values:
            try:
                values["constants"] = inst.constants(values["constants"])
            except CulturalignError as e:
                raise CulturalignError(f"{where}: {prefix}.constants: {e}") from None
        if "prompt" in values:
            from culturalign.measure.prompts import PROFILES

            if values["prompt"] not in PROFILES:
                raise CulturalignError(f"{where}: {prefix}.prompt: {values['prompt']!r}; expected one of {', '.join(PROFILES)}")

    cells = []
    for target, code in zip(targets, codes):
        for opt in grid.optimizers:
            mine = per_opt.get(opt, {})
            values = {**common, **mine, "optimizer": opt}
            if "budget" not in values and grid.budget is not None:
                values["budget"] = grid.budget
            values.setdefault("constants", inst.constants())
            for seed in grid.seeds:
                try:
                    cfg = AlignConfig(**values, seed=seed)
                except CulturalignError as e:
                    key, msg = _field_message(e, fields)
                    if key == "seed":
                        at = f"grid.seeds[{grid.seeds.index(seed)}]"
                    elif key == "budget":
                        at = f"optimizer_settings.{opt}.budget" if "budget" in mine else "grid.budget"
                    elif key in mine:
                        at = f"optimizer_settings.{opt}.{key}"
                    elif key in common:
                        at = f"settings.{key}"
                    else:
                        at = f"grid.optimizers[{grid.optimizers.index(opt)}] ({opt}, default {key or 'settings'})"
                    raise CulturalignError(f"{where}: {at}: {msg}") from None
                if cfg.order != "forward" and inst.reverse_problem():
                    at = f"optimizer_settings.{opt}.order" if "order" in mine else "settings.order"
                    raise CulturalignError(f"{where}: {at}: {cfg.order}: {inst.reverse_problem()}")
                cells.append(Cell(f"{code}-{opt}-s{seed}", _code(target), target, opt, seed, cfg))

    model_spec = model if model is not None else _local_path(spec.model, base)
    if not model_spec.strip():
        raise CulturalignError(f"{where}: model: empty; expected {DEFAULT_MODEL}, a local model folder or a hub id")
    return Experiment(path=Path(path), name=spec.name or Path(path).stem, model=model_spec, instrument=inst,
                      targets=targets, optimizers=list(grid.optimizers), seeds=list(grid.seeds), settings=common,
                      optimizer_settings=per_opt, cells=cells)

