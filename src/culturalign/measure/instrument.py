"""Questionnaires as data: items, answer scales and the index formulas that score them.

An instrument is a JSON file (schema `culturalign.instrument/1`, see `data/instruments/vsm2013.json`).
Each index is a sum of weighted differences of item means plus a constant C:
    PDI = 35(m07 - m02) + 25(m20 - m23) + C
which is linear in the item means, so `Instrument.weights` turns it into one matrix product that
works on numpy arrays and torch tensors alike (the optimizer differentiates through it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np

from culturalign.errors import CulturalignError

SCHEMA = "culturalign.instrument/1"
BUILTIN = ("vsm2013", "vsm2013-para-a", "vsm2013-para-b")
ORDERS = ("forward", "reversed", "both")  # option order of the items: as listed, reversed, both averaged (measure.survey)
REVERSED = "-reversed"  # suffix of an id: the instrument with every item's options presented in reverse order


@dataclass(frozen=True)
class Item:
    """One questionnaire item. `options` are in the order of the answer codes (option k has code codes[k]).

    `order`, when set, is the order in which the options are *presented*: the option listed at position j
    (labelled with the j-th answer code) is `options[order[j]]`. The model's answer at position j is
    mapped back to code `codes[order[j]]` before scoring (`Instrument.to_code_order`). None means the
    natural order.
    """

    id: int
    text: str
    options: tuple[str, ...]
    section: str | None = None  # instruction shared by a block of items (printed above the item)
    order: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.order is not None and sorted(self.order) != list(range(len(self.options))):
            raise ValueError(f"item {self.id}: order {self.order} is not a permutation of its {len(self.options)} options")

    @property
    def presented_options(self) -> tuple[str, ...]:
        """The options in the order they are shown to the model."""
        return self.options if self.order is None else tuple(self.options[i] for i in self.order)


@dataclass(frozen=True)
class Term:
    weight: float
    plus: int
    minus: int


@dataclass(frozen=True)
class Index:
    code: str
    name: str
    terms: tuple[Term, ...]


@dataclass
class Instrument:
    id: str
    name: str
    items: list[Item]
    indices: dict[str, Index]
    codes: tuple[int, ...] = (1, 2, 3, 4, 5)
    citation: str = ""
    terms_of_use: str = ""
    defaults: dict[str, float] = field(default_factory=dict)  # default constant C per index
    source: str = ""  # how it was loaded: a built-in id or the file's path (to load it again, e.g. on resume)
    variant_of: str = ""  # the id of the instrument this one paraphrases (held-out variants), or ""

    @property
    def dims(self) -> list[str]:
        return list(self.indices)

    @property
    def item_ids(self) -> list[int]:
        return [it.id for it in self.items]

    def constants(self, overrides: dict[str, float] | None = None) -> dict[str, float]:
        """The constant C of each index: the file's default, then `overrides` (unknown names are errors)."""
        c = {d: float(self.defaults.get(d, 0.0)) for d in self.dims}
        for k, v in (overrides or {}).items():
            key = k.upper()
            if key not in c:
                raise CulturalignError(f"unknown index {k!r} in constants; expected one of {', '.join(self.dims)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise CulturalignError(f"index constant {key}={v!r}: expected a finite number")
            c[key] = float(v)
        return c

    @property
    def weights(self) -> np.ndarray:
        """Matrix W [n_indices, n_items] such that indices = W @ item_means + C."""
        pos = {iid: j for j, iid in enumerate(self.item_ids)}
        w = np.zeros((len(self.indices), len(self.items)))
        for i, idx in enumerate(self.indices.values()):
            for t in idx.terms:
                w[i, pos[t.plus]] += t.weight
                w[i, pos[t.minus]] -= t.weight
        return w

    def reversed(self) -> "Instrument":
        """The same instrument with every item's options presented in reverse order (id `<id>-reversed`).

        The answer codes are relabelled: the first option shown is labelled with the first code, so on a
        five-point scale the model sees "1. <original option 5>" ... "5. <original option 1>". Its answers are
        mapped back to the original codes (`to_code_order`) before anything is scored, so the indices mean
        the same as the original's. Reversing twice gives the original presentation.
        """
        items = []
        for it in self.items:
            current = it.order if it.order is not None else tuple(range(len(it.options)))
            order = tuple(reversed(current))
            items.append(replace(it, order=None if order == tuple(range(len(it.options))) else order))
        rid = self.id[: -len(REVERSED)] if self.id.endswith(REVERSED) else self.id + REVERSED
        src = self.source[: -len(REVERSED)] if self.source.endswith(REVERSED) else (self.source + REVERSED if self.source else "")
        return replace(self, id=rid, items=items, source=src)

    def reverse_problem(self) -> str | None:
        """Why this instrument has no reversed form to ask next to it (`--order reversed|both`), or None.

        The order setting reverses the options of an instrument presented in its natural order. An
        instrument whose options are already presented in another order (`vsm2013-reversed`, or items with
        an `order`) has none: reversing it again would ask the natural order under the name "reversed".
        Nor has one on which reversing changes no item (every scale reads the same both ways).
        """
        if self.presentation is not None:
            hint = f"; use {self.id[: -len(REVERSED)]!r} with --order reversed" if self.id.endswith(REVERSED) else ""
            return f"instrument {self.id!r} already presents its options in another order{hint}"
        if all(it.options == tuple(reversed(it.options)) for it in self.items):
            return f"instrument {self.id!r} has no reversed form: every item's options read the same in reverse"
        return None

    @property
    def presentation(self) -> np.ndarray | None:
        """[I, K] for each item, the option index shown at each position (None when every item is in natural order)."""
        if all(it.order is None for it in self.items):
            return None
        k = len(self.codes)
        return np.array([it.order if it.order is not None else tuple(range(k)) for it in self.items], dtype=np.int64)

    def to_code_order(self, probs):
        """Answer probabilities per *presented* position [..., I, K] -> per answer code [..., I, K].

        Works on numpy arrays and torch tensors (differentiably); the identity when no item is reordered.
        """
        order = self.presentation
        if order is None:
            return probs
        inverse = np.argsort(order, axis=1)  # inverse[i, k]: the position at which option k was shown
        if hasattr(probs, "detach"):
            import torch

            idx = torch.as_tensor(inverse, device=probs.device).expand(*probs.shape[:-2], *inverse.shape)
            return torch.gather(probs, -1, idx)
        probs = np.asarray(probs)
        return np.take_along_axis(probs, np.broadcast_to(inverse, probs.shape), axis=-1)

    def score(self, means, constants: dict[str, float] | None = None):
        """Index scores from item means ([..., n_items], numpy or torch); returns [..., n_indices]."""
        c = self.constants(constants)
        w, cvec = self.weights, np.array([c[d] for d in self.dims])
        if hasattr(means, "detach"):  # torch tensor: stay differentiable
            import torch

            return means @ torch.as_tensor(w.T, dtype=means.dtype, device=means.device) + torch.as_tensor(
                cvec, dtype=means.dtype, device=means.device
            )
        means = np.asarray(means, dtype=float)
        if means.shape[-1] != len(self.items):
            raise CulturalignError(f"expected {len(self.items)} item means, got {means.shape[-1]}")
        return means @ w.T + cvec

    def score_dict(self, means, constants: dict[str, float] | None = None) -> dict[str, float]:
        return {d: float(v) for d, v in zip(self.dims, self.score(np.asarray(means, dtype=float), constants))}


def _fail(path, msg):
    raise CulturalignError(f"{path}: {msg}")


def parse_instrument(data: dict, path: str = "<instrument>") -> Instrument:
    """Validate a decoded instrument file and build an `Instrument`; errors name the file and field."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        _fail(path, f"expected a JSON object with \"schema\": \"{SCHEMA}\"")
    for key in ("id", "name", "scales", "items", "indices"):
        if key not in data:
            _fail(path, f"missing field {key!r}")
    for key, kind in (("scales", dict), ("items", list), ("indices", dict), ("sections", dict)):
        if key in data and not isinstance(data[key], kind):
            _fail(path, f"field {key!r} must be a JSON {'object' if kind is dict else 'array'}")
    codes = tuple(data.get("answer_codes", (1, 2, 3, 4, 5)))
    if not all(isinstance(c, int) for c in codes):
        _fail(path, f"answer_codes must be integers, got {list(codes)}")
    if len(codes) < 2 or list(codes) != list(range(codes[0], codes[0] + len(codes))):
        _fail(path, f"answer_codes must be consecutive integers, got {list(codes)}")
    scales, sections = data["scales"], data.get("sections", {})
    for name, opts in scales.items():
        if not isinstance(opts, list) or len(opts) != len(codes) or not all(isinstance(o, str) and o for o in opts):
            _fail(path, f"scale {name!r} must list {len(codes)} non-empty answer labels, one per answer code")
    items, seen = [], set()
    for k, it in enumerate(data["items"]):
        where = f"items[{k}]"
        if not isinstance(it, dict) or not isinstance(it.get("id"), int) or not it.get("text"):
            _fail(path, f"{where} needs an integer 'id' and a non-empty 'text'")
        if it["id"] in seen:
            _fail(path, f"{where}: duplicate item id {it['id']}")
        seen.add(it["id"])
        if it.get("scale") not in scales:
            _fail(path, f"{where}: scale {it.get('scale')!r} is not defined in 'scales' ({', '.join(scales)})")
        sec = it.get("section")
        if sec is not None and sec not in sections:
            _fail(path, f"{where}: section {sec!r} is not defined in 'sections'")
        items.append(Item(it["id"], it["text"], tuple(scales[it["scale"]]), sections[sec] if sec else None))
    if not items:
        _fail(path, "no items")
    indices, defaults = {}, {}
    for code, spec in data["indices"].items():
        terms = []
        if not isinstance(spec, dict) or not isinstance(spec.get("terms", []), list):
            _fail(path, f"index {code}: expected an object with a list of 'terms'")
        for t in spec.get("terms", []):
            ok = isinstance(t, dict) and {"weight", "plus", "minus"} <= set(t)
            if not ok or t["plus"] not in seen or t["minus"] not in seen or isinstance(t["weight"], bool) \
                    or not isinstance(t["weight"], (int, float)) or not math.isfinite(t["weight"]):
                _fail(path, f"index {code}: each term needs a numeric weight, and plus/minus naming existing item ids; got {t}")
            terms.append(Term(float(t["weight"]), int(t["plus"]), int(t["minus"])))
        if not terms:
            _fail(path, f"index {code}: no terms")
        indices[code.upper()] = Index(code.upper(), spec.get("name", code), tuple(terms))
        const = spec.get("constant", 0)
        if isinstance(const, bool) or not isinstance(const, (int, float)) or not math.isfinite(const):
            _fail(path, f"index {code}: constant must be a finite number, got {const!r}")
        defaults[code.upper()] = float(const)
    return Instrument(
        id=str(data["id"]), name=str(data["name"]), items=items, indices=indices, codes=codes,
        citation=data.get("citation", ""), terms_of_use=data.get("terms_of_use", ""), defaults=defaults,
        variant_of=str(data.get("variant_of") or ""),
    )


def load_instrument(name_or_path: str = "vsm2013") -> Instrument:
    """A built-in instrument by id (`vsm2013`, or the held-out paraphrases `vsm2013-para-a`/`-b`) or a user's JSON file of the same schema.

    A built-in id or a file path with the suffix `-reversed` (`vsm2013-reversed`, `mine.json-reversed`)
    is that instrument with its options presented in reverse order (`Instrument.reversed`); its `source`
    keeps the suffix, so it loads again the same way.
    """
    base = name_or_path[: -len(REVERSED)]
    if name_or_path.endswith(REVERSED) and (base in BUILTIN or (Path(base).is_file() and not Path(name_or_path).exists())):
        return load_instrument(base).reversed()
    if name_or_path in BUILTIN:
        text = resources.files("culturalign.data.instruments").joinpath(f"{name_or_path}.json").read_text("utf-8")
        inst = parse_instrument(json.loads(text), name_or_path)
        inst.source = name_or_path
        return inst
    path = Path(name_or_path)
    if not path.exists():
        raise CulturalignError(
            f"instrument {name_or_path!r} not found: expected a built-in id ({', '.join(BUILTIN)}, each also with the suffix {REVERSED}) or a JSON file path"
        )
    from culturalign.files import read_json_file

    inst = parse_instrument(read_json_file(path, "instrument file"), str(path))
    inst.source = str(path)
    return inst


def paraphrase_variants(instrument_id: str) -> list[str]:
    """Ids of the built-in instruments that paraphrase `instrument_id` (their `variant_of`), in id order."""
    return [b for b in BUILTIN if b != instrument_id and load_instrument(b).variant_of == instrument_id]
