"""Committee evaluation: seven metrics, each defined once and applied to every system.

Systems (see `compose.SYSTEMS`): naive, persona, expert (the router's top-1 expert), committee.

1. Cultural alignment, in [0, 1]. For a user of culture X the system answers the held-out paraphrased
   VSM 2013 items (instrument variants `vsm2013-para-a`/`-b`, never seen in alignment). The item
   means give the six indices (the instrument's formulas, constants C), and
       alignment(X) = max(0, 1 - L1(indices, scores_X) / (100 * |D|))
   over the dimensions D that X's target publishes: 100 points per dimension is the width of
   Hofstede's published scale, so 0 means "off by the whole scale on average" and 1 a perfect match.
   Reported per culture, for cultures in the registry and for cultures held out of it.
2. Diversity entropy, in bits. For one value question q with options, asked by users of the cultures
   C, the system gives answer distributions p_c. Diversity is their mutual information
       I(culture; answer) = H(mean_c p_c) - mean_c H(p_c)
   (the generalised Jensen-Shannon divergence). A system that ignores the culture gives the same p_c
   to everyone and scores exactly 0; one that answers each culture with a different sure answer scores
   up to log2(min(|C|, K)). Mean and std over the untagged value questions.
3. Expert responses per query: culture-conditioned model responses behind the answer (routed experts;
   the one persona answer; 0 for the base model).
4. Unique cultural profiles per query: distinct cultures among those responses.
5. Completeness: the share of queries answered with a parsable option (the answer puts at least half
   its next-token probability on the option codes: `option_mass >= 0.5`) or, for open questions, a
   non-empty reply within the token limit.
6. Latency per query, p50 and p95, and each system's p50 over the base model's.
7. Router accuracy on culture-tagged queries whose culture has an expert (routed without a user
   culture, from the text alone): top-1 and top-k; and the gate's accuracy on the neutral controls
   (sent to the base model alone), with and without a user culture.

Two reference systems answer no query; they bound what the alignment numbers mean:
- `uniform`: an answerer that spreads every item evenly over its options (`survey.uniform_result`, no
  model call): the floor. Its diversity is 0 by the definition (the same answer for every culture).
- `wrong-expert`: each registry culture served by each of the *other* registry experts (alignment: the mean
  over them). An expert's answers to the paraphrases do not depend on the user's culture, so each expert's
  indices are computed once per variant and scored against every culture: the culture x expert alignment
  matrix. **Specificity** of a culture = its own expert's alignment - the mean of the other experts'; the
  own expert is "best" when no other expert aligns better with that culture.
Every cell uses `alignment_score`, the one formula of metric 1.

Alignment and diversity need many (culture x question) answers: they are computed from batched
answer tables (every expert's distribution in one call per question set, persona prompts in one set)
mixed with the router's weights by the same `mix` the committee uses. The per-query metrics (3-6)
come from `Committee.ask`, the path a user calls.

Long because: this docstring defines the seven metrics, and each definition's one implementation (applied to
every system by one `Evaluator`) is kept beside it.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from culturalign.errors import CulturalignError

EPS = 1e-12


def entropy_bits(p: np.ndarray) -> float:
    p = np.asarray(p, dtype=float)
    p = p[p > EPS]
    return float(-(p * np.log2(p)).sum())


def mutual_information(probs: np.ndarray) -> float:
    """I(culture; answer) in bits for answer distributions [C, K], cultures equally likely."""
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError("expected answer distributions of shape [cultures, options]")
    mi = entropy_bits(probs.mean(0)) - float(np.mean([entropy_bits(p) for p in probs]))
    return max(0.0, mi)  # rounding can give -1e-16


def alignment_score(indices: dict[str, float], scores: dict[str, float]) -> tuple[float, float, list[str]]:
    """(alignment in [0, 1], L1, dimensions compared) against a target's published scores."""
    dims = [d for d in indices if d in scores]
    if not dims:
        raise CulturalignError("the target has none of the instrument's dimensions")
    l1 = float(sum(abs(indices[d] - scores[d]) for d in dims))
    return max(0.0, 1.0 - l1 / (100.0 * len(dims))), l1, dims


REFERENCE_SYSTEMS = ("uniform", "wrong-expert")


def expert_matrix_rows(expert_indices: dict[str, dict[str, dict[str, float]]], targets: dict,
                       cultures: list[str]) -> list[dict]:
    """culture x expert x variant rows: `alignment_score` of each expert's indices ({variant: {expert: indices}})
    against each culture's published scores (`targets[culture]`, a Target)."""
    rows = []
    for variant, per_expert in expert_indices.items():
        for culture in cultures:
            for code, indices in per_expert.items():
                score, l1, _ = alignment_score(indices, targets[culture].scores)
                rows.append({"culture": culture, "expert": code, "variant": variant, "alignment": score, "l1": l1})
    return rows


def wrong_expert_rows(matrix_rows: list[dict]) -> list[dict]:
    """The `wrong-expert` system's alignment rows: per culture that has an expert and per variant, the mean alignment
    (and L1) of the other experts."""
    out = []
    experts = set(r["expert"] for r in matrix_rows)
    keys = list(dict.fromkeys((r["variant"], r["culture"]) for r in matrix_rows))
    for variant, culture in keys:
        if culture not in experts:
            continue
        others = [r for r in matrix_rows if r["variant"] == variant and r["culture"] == culture and r["expert"] != culture]
        if not others:
            continue
        out.append({"system": "wrong-expert", "culture": culture, "variant": variant, "in_registry": True,
                    "alignment": statistics.fmean(r["alignment"] for r in others),
                    "l1": statistics.fmean(r["l1"] for r in others), "experts": "|".join(r["expert"] for r in others)})
    return out


def specificity(matrix_rows: list[dict]) -> tuple[dict, list[dict]]:
    """(summary for metrics.json, rows of specificity.csv) from the culture x expert x variant rows.

    The matrix is the alignment averaged over the variants. For each culture with its own expert: own, the mean of
    the other experts (`wrong_mean`), specificity = own - wrong_mean, the best expert, and whether it is the own one
    (a tie counts as best). `mean` is the mean specificity over those cultures; `own_best` counts them."""
    experts = list(dict.fromkeys(r["expert"] for r in matrix_rows))
    cultures = list(dict.fromkeys(r["culture"] for r in matrix_rows))
    cell = {(c, e): statistics.fmean(r["alignment"] for r in matrix_rows if r["culture"] == c and r["expert"] == e)
            for c in cultures for e in experts}
    per, csv_rows = {}, []
    for c in cultures:
        row = {"culture": c, **{e: cell[(c, e)] for e in experts}}
        best = max(experts, key=lambda e: cell[(c, e)])
        if c in experts and len(experts) > 1:
            own = cell[(c, c)]
            wrong = statistics.fmean(cell[(c, e)] for e in experts if e != c)
            per[c] = {"own": own, "wrong_mean": wrong, "specificity": own - wrong, "best_expert": best,
                      "own_is_best": own >= max(cell[(c, e)] for e in experts)}
            row.update({"own": own, "wrong_mean": wrong, "specificity": own - wrong})
        row["best_expert"] = best
        csv_rows.append(row)
    spec = [v["specificity"] for v in per.values()]
    summary_ = {"experts": experts, "cultures": cultures, "alignment": [[cell[(c, e)] for e in experts] for c in cultures],
                "per_culture": per, "mean": statistics.fmean(spec) if spec else None,
                "own_best": sum(v["own_is_best"] for v in per.values()), "n_cultures": len(per)}
    return summary_, csv_rows


def mix(weights: list[tuple[int, float]], probs: torch.Tensor) -> torch.Tensor:
    """Weighted mixture of rows of `probs` ([rows, ..., K]); weights as (row, weight)."""
    out = torch.zeros_like(probs[0], dtype=torch.float64)
    for row, w in weights:
        out += w * probs[row].double()
    return out


def summarize_values(values: list[float]) -> dict:
    """Mean, population std and count of the finite values (None when there are none)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@dataclass
class EvalConfig:
    registry_cultures: list[str]
    heldout_cultures: list[str]
    variants: tuple[str, ...] = ("vsm2013-para-a", "vsm2013-para-b")
    open_limit: int = 8  # open questions asked per system (generation is the slow part)
    query_limit: int | None = None  # all option queries by default
    target_set: str = "hofstede-2015"
    order: str = "forward"  # option order of the alignment metric's survey items (culturalign.measure.survey.ORDERS)

    def __post_init__(self):
        if self.open_limit < 0:
            raise CulturalignError(f"--open-limit must be >= 0, got {self.open_limit}")
        if self.query_limit is not None and self.query_limit < 1:
            raise CulturalignError(f"--limit must be >= 1, got {self.query_limit}")
        from culturalign.measure.instrument import load_instrument
        from culturalign.measure.survey import check_order

        check_order(self.order)
        if self.order != "forward":
            for v in self.variants:
                check_order(self.order, load_instrument(v))


@dataclass
class EvalResult:
    metrics: dict
    rows: list[dict] = field(default_factory=list)  # query x system
    alignment_rows: list[dict] = field(default_factory=list)  # system x culture x variant
    diversity_rows: list[dict] = field(default_factory=list)  # system x question
    specificity_rows: list[dict] = field(default_factory=list)  # culture x expert alignment matrix (specificity.csv)


class Evaluator:
    """Runs every metric for every system on one committee (see the module docstring)."""

    def __init__(self, committee, queries: list, config: EvalConfig, targets: dict,
                 progress: Callable[[str, int, int], None] | None = None):
        self.c, self.queries, self.cfg, self.targets = committee, queries, config, targets
        self.progress = progress or (lambda stage, done, total: None)
        self.systems = ("naive", "persona", "expert", "committee")
        self.expert_indices: dict[str, dict[str, dict[str, float]]] = {}  # variant -> expert -> indices (alignment())

    # -- alignment on held-out paraphrases -----------------------------------------------------------
    def _route_weights(self, text: str, culture: str, system: str, codes: list[str]) -> list[tuple[int, float]] | None:
        experts, _ = self.c.route(text, culture, system, has_options=True)
        if not experts:
            return None  # gated to the base model
        return [(codes.index(code), w) for code, w in experts]

    def alignment(self) -> list[dict]:
        from culturalign.measure.instrument import load_instrument
        from culturalign.measure.survey import Survey

        c, rows = self.c, []
        codes = c.registry.codes
        soft = torch.stack([c.registry[k].embeddings for k in codes])
        cultures = list(self.cfg.registry_cultures) + list(self.cfg.heldout_cultures)
        total, done = len(self.cfg.variants) * (2 + len(cultures)), 0
        order = self.cfg.order
        for variant in self.cfg.variants:
            inst = load_instrument(variant)
            with torch.no_grad():
                naive = Survey(c.backend, inst, "naive", order=order).distributions().probs[0].double().cpu()  # [I, K]
                done += 1
                self.progress("alignment", done, total)
                experts = Survey(c.backend, inst, "naive", order=order).distributions(soft).probs.double().cpu()  # [E, I, K]
                done += 1
                self.progress("alignment", done, total)
            expert_means = (experts @ torch.tensor(inst.codes, dtype=torch.float64)).numpy()  # [E, I]
            self.expert_indices[variant] = {k: inst.score_dict(m) for k, m in zip(codes, expert_means)}
            for culture in cultures:
                target = self.targets[culture]
                with torch.no_grad():
                    persona = Survey(c.backend, inst, "persona", target, order=order).distributions().probs[0].double().cpu()
                done += 1
                self.progress("alignment", done, total)
                tables = {"naive": naive, "persona": persona}
                for system in ("expert", "committee"):
                    items = []
                    for i, it in enumerate(inst.items):
                        w = self._route_weights(it.text, culture, system, codes)
                        items.append(naive[i] if w is None else mix(w, experts[:, i]))
                    tables[system] = torch.stack(items)
                for system in self.systems:
                    means = (tables[system] @ torch.tensor(inst.codes, dtype=torch.float64)).numpy()
                    indices = inst.score_dict(means)
                    score, l1, dims = alignment_score(indices, target.scores)
                    rows.append({"system": system, "culture": culture, "variant": variant,
                                 "in_registry": culture in c.registry.experts, "alignment": score, "l1": l1,
                                 "dims": "|".join(dims), **{f"index_{d}": round(v, 3) for d, v in indices.items()}})
        return rows

    # -- the reference systems: the uniform floor and the wrong expert ----------------------------------------
    def references(self) -> tuple[list[dict], dict, list[dict]]:
        """(alignment rows of `uniform` and `wrong-expert`, the specificity summary, specificity.csv's rows).

        Needs `alignment()` first (the experts' indices per variant); no model call."""
        from culturalign.measure.instrument import load_instrument
        from culturalign.measure.survey import uniform_result

        cultures = list(self.cfg.registry_cultures) + list(self.cfg.heldout_cultures)
        rows = []
        for variant in self.cfg.variants:
            inst = load_instrument(variant)
            for culture in cultures:
                indices = uniform_result(inst, self.targets[culture]).indices
                score, l1, dims = alignment_score(indices, self.targets[culture].scores)
                rows.append({"system": "uniform", "culture": culture, "variant": variant,
                             "in_registry": culture in self.c.registry.experts, "alignment": score, "l1": l1,
                             "dims": "|".join(dims), **{f"index_{d}": round(v, 3) for d, v in indices.items()}})
        matrix = expert_matrix_rows(self.expert_indices, self.targets, list(self.cfg.registry_cultures))
        rows += wrong_expert_rows(matrix)
        spec, spec_rows = specificity(matrix)
        return rows, spec, spec_rows

    def _diversity_questions(self) -> list:
        return [q for q in self.queries if q.has_options and q.culture is None and q.culture_dependent]

    def uniform_diversity(self) -> list[dict]:
        """The uniform answerer's diversity rows: the same 1/K answer for every culture, through the one formula."""
        n = len(self.cfg.registry_cultures)
        rows = []
        for q in self._diversity_questions():
            p = np.full((n, len(q.options)), 1.0 / len(q.options))
            rows.append({"system": "uniform", "query_id": q.id, "diversity_bits": mutual_information(p),
                         "distinct_choices": int(len(set(p.argmax(1).tolist())))})
        return rows if n else []

    # -- diversity across user cultures ----------------------------------------------------------------
    def diversity(self) -> list[dict]:
        from culturalign.measure.instrument import Item
        from culturalign.measure.prompts import encode_prompts, system_text

        c = self.c
        codes = c.registry.codes
        soft = [c.registry[k].embeddings for k in codes]
        cultures = list(self.cfg.registry_cultures)
        questions = self._diversity_questions()
        rows = []
        tok = c.backend.tokenizer
        for n, q in enumerate(questions):
            item = Item(0, q.text, tuple(q.options))
            kcodes = tuple(range(1, len(q.options) + 1))
            seqs, option_ids = encode_prompts(tok, [item], kcodes, None)
            prompts = c.backend.prompt_set(seqs)
            with torch.no_grad():
                base = c.backend.option_distributions(prompts, option_ids).probs[0, 0].double().cpu()
                ex = c.backend.option_distributions(prompts, option_ids, soft=soft).probs[:, 0].double().cpu()
                pseqs = [encode_prompts(tok, [item], kcodes, system_text("persona", self.targets[u]))[0][0] for u in cultures]
                pers = c.backend.option_distributions(c.backend.prompt_set(pseqs), option_ids).probs[0].double().cpu()
            per_system = {"naive": base.expand(len(cultures), -1), "persona": pers}
            for system in ("expert", "committee"):
                dists = []
                for u in cultures:
                    w = self._route_weights(q.text, u, system, codes)
                    dists.append(base if w is None else mix(w, ex))
                per_system[system] = torch.stack(dists)
            for system in self.systems:
                p = per_system[system].numpy()
                rows.append({"system": system, "query_id": q.id, "diversity_bits": mutual_information(p),
                             "distinct_choices": int(len(set(p.argmax(1).tolist())))})
            self.progress("diversity", n + 1, len(questions))
        return rows

    # -- per-query asks: responses, cultures, completeness, latency ----------------------------------
    def _user_culture(self, q, k: int) -> str | None:
        if q.culture is not None:
            return q.culture
        reg = self.cfg.registry_cultures
        return reg[k % len(reg)] if reg else None

    def per_query(self) -> list[dict]:
        opts = [q for q in self.queries if q.has_options]
        if self.cfg.query_limit is not None:
            opts = opts[: self.cfg.query_limit]
        open_q = _spread([q for q in self.queries if not q.has_options], self.cfg.open_limit)
        chosen = opts + open_q
        rows, total = [], len(chosen) * len(self.systems)
        for k, q in enumerate(chosen):
            user = self._user_culture(q, k)
            for system in self.systems:
                t0 = time.perf_counter()
                a = self.c.ask(q.text, culture=user, options=list(q.options) if q.has_options else None, system=system)
                seconds = time.perf_counter() - t0
                if q.has_options:
                    complete = a.answer["option_mass"] >= 0.5
                else:
                    complete = bool(a.answer["text"])
                rows.append({"query_id": q.id, "kind": q.kind, "system": system, "user_culture": user,
                             "tagged_culture": q.culture, "culture_dependent": q.culture_dependent,
                             "seconds": seconds, "responses": a.responses, "unique_cultures": len(a.cultures),
                             "complete": complete, "routed": "|".join(e["code"] for e in a.experts),
                             "choice": a.answer.get("choice"), "option_mass": a.answer.get("option_mass"),
                             "generated_tokens": a.tokens.get("generated", 0),
                             "reply": a.answer.get("text", a.answer.get("option"))})
                self.progress("queries", len(rows), total)
        return rows

    # -- the router ----------------------------------------------------------------------------------
    def router(self) -> dict:
        reg = set(self.c.registry.codes)
        tagged = [q for q in self.queries if q.culture in reg]
        top1 = topk = 0
        for q in tagged:
            routed = [code for code, _ in self.c.router.route(q.text, culture=None, has_options=q.has_options).experts]
            top1 += bool(routed) and routed[0] == q.culture
            topk += q.culture in routed
        neutral = [q for q in self.queries if not q.culture_dependent]
        gate_plain = sum(not self.c.router.route(q.text, None, q.has_options).experts for q in neutral)
        user = self.cfg.registry_cultures[0] if self.cfg.registry_cultures else None
        gate_user = sum(not self.c.router.route(q.text, user, q.has_options).experts for q in neutral)
        dependent = [q for q in self.queries if q.culture_dependent]
        kept = sum(bool(self.c.router.route(q.text, None, q.has_options).culture_dependent) for q in dependent)
        return {
            "tagged_queries": len(tagged), "top1_accuracy": top1 / len(tagged) if tagged else None,
            "topk_accuracy": topk / len(tagged) if tagged else None, "top_k": self.c.router.config.top_k,
            "neutral_queries": len(neutral),
            "gate_accuracy_neutral": gate_plain / len(neutral) if neutral else None,
            "gate_accuracy_neutral_with_user_culture": gate_user / len(neutral) if neutral else None,
            "gate_recall_culture_dependent": kept / len(dependent) if dependent else None,
        }

    # -- everything --------------------------------------------------------------------------------
    def run(self) -> EvalResult:
        t0 = time.perf_counter()
        router = self.router()
        align_rows = self.alignment()
        div_rows = self.diversity()
        rows = self.per_query()
        ref_rows, spec, spec_rows = self.references()
        align_rows += ref_rows
        div_rows += self.uniform_diversity()
        metrics = summarize(rows, align_rows, div_rows, router, self.systems, REFERENCE_SYSTEMS)
        metrics["specificity"] = spec
        metrics["seconds"] = round(time.perf_counter() - t0, 1)
        return EvalResult(metrics, rows, align_rows, div_rows, spec_rows)


def _spread(queries: list, n: int) -> list:
    """Up to n queries, one culture after another (round-robin over the tags), in file order."""
    by: dict = {}
    for q in queries:
        by.setdefault(q.culture, []).append(q)
    out, lists = [], list(by.values())
    while len(out) < n and any(lists):
        for lst in lists:
            if lst and len(out) < n:
                out.append(lst.pop(0))
    return out


def summarize(rows: list[dict], align_rows: list[dict], div_rows: list[dict], router: dict, systems,
              references=()) -> dict:
    """Per system: every metric from the tidy rows. `references` (systems that answer no query: uniform,
    wrong-expert) get the same entry, listed under "reference_systems"; their per-query metrics are empty."""
    out = {"systems": list(systems), "router": router, "per_system": {}}
    if references:
        out["reference_systems"] = list(references)
    naive_p50 = percentile([r["seconds"] for r in rows if r["system"] == "naive"], 50)
    for s in [*systems, *references]:
        sr = [r for r in rows if r["system"] == s]
        lat = [r["seconds"] for r in sr]
        opt_lat = [r["seconds"] for r in sr if r["kind"] != "open"]
        open_lat = [r["seconds"] for r in sr if r["kind"] == "open"]
        ar = [r for r in align_rows if r["system"] == s]
        out["per_system"][s] = {
            "alignment_registry": summarize_values([r["alignment"] for r in ar if r["in_registry"]]),
            "alignment_heldout": summarize_values([r["alignment"] for r in ar if not r["in_registry"]]),
            "l1_registry": summarize_values([r["l1"] for r in ar if r["in_registry"]]),
            "l1_heldout": summarize_values([r["l1"] for r in ar if not r["in_registry"]]),
            "diversity_bits": summarize_values([r["diversity_bits"] for r in div_rows if r["system"] == s]),
            "responses_per_query": summarize_values([r["responses"] for r in sr]),
            "unique_cultures_per_query": summarize_values([r["unique_cultures"] for r in sr]),
            "completeness": (sum(r["complete"] for r in sr) / len(sr)) if sr else None,
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "latency_options_p50_s": percentile(opt_lat, 50), "latency_open_p50_s": percentile(open_lat, 50),
            "latency_ratio_to_naive": (percentile(lat, 50) / naive_p50) if naive_p50 and lat else None,
            "queries": len(sr),
        }
    return out
