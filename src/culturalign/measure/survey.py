"""A model's cultural profile: put the instrument to the model, score the answers, compare to a target.

`Survey` binds a backend (the frozen model), an instrument, a prompt profile and a target. It is the
single code path for the `survey` command and for the optimizer's objective (`Survey.loss` on a batch
of soft prompts), so the profile an aligned prompt is scored with during search is the one it is
reported with. It uses only the `Backend` interface: the prompt set once, option distributions per
call, generation in sample mode.

Sample mode is the Cultural Alignment Test's: generate N answers per item at a temperature and parse
the code; unparsable answers are counted, never dropped silently.

Option order (`order`, the `--order` flag): `forward` asks the items as the instrument presents them;
`reversed` asks every item with its options listed in reverse order (`Instrument.reversed`); `both`
asks both forms and averages the two distributions, after mapping the answers back to the answer
codes, which cancels a plain bias for an answer position or label (PriDe, Zheng et al., ICLR 2024).
In logprob mode the forward and reversed prompts form one prompt set, asked in one
`Backend.option_distributions` call, so prefix sharing still applies; option mass is the mean of the
two. In sample mode each order is sampled as a run of its own would sample it, with the same seed,
so `both` is exactly the mean of the `forward` and `reversed` runs.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from culturalign.backends import Backend, Distributions, GenerationRequest
from culturalign.errors import CulturalignError
from culturalign.measure.instrument import ORDERS, Instrument  # noqa: F401  (ORDERS: the survey's option orders)
from culturalign.measure.prompts import ANSWER_PREFIX, encode_items
from culturalign.measure.targets import Target, l1

MODES = ("logprob", "sample")
ANSWER_RE = re.compile(r"^\s*\(?\s*([0-9]+)")


def parse_answer(text: str, codes) -> int | None:
    """The answer code at the start of a generated answer, or None if there is none."""
    m = ANSWER_RE.match(text)
    if m and int(m.group(1)) in codes:
        return int(m.group(1))
    return None


def check_order(order, instrument: Instrument | None = None) -> str:
    """`order` if it is one of ORDERS and `instrument` (when given) can be asked in it; else one error line."""
    if order not in ORDERS:
        raise CulturalignError(f"--order {order!r}: expected one of {', '.join(ORDERS)}")
    if order != "forward" and instrument is not None:
        problem = instrument.reverse_problem()
        if problem:
            raise CulturalignError(f"--order {order}: {problem}")
    return order


def order_forms(instrument: Instrument, order: str) -> list[Instrument]:
    """The instrument's forms an order asks: [itself], [its reversed form], or both (forward first)."""
    check_order(order, instrument)
    if order == "forward":
        return [instrument]
    if order == "reversed":
        return [instrument.reversed()]
    return [instrument, instrument.reversed()]


@dataclass
class Samples:
    counts: np.ndarray  # [I, K] parsed answers per code
    unparsable: np.ndarray  # [I]
    examples: list[list[str]]  # a few unparsable answers per item, for the report


def sample_answers(backend: Backend, sequences: list[list[int]], codes, n: int = 10, temperature: float = 1.0,
                   soft: torch.Tensor | None = None, seed: int = 0, max_new_tokens: int = 4,
                   batch_items: int = 8) -> Samples:
    """Generate `n` answers per item (CAT style) and count the parsed codes.

    `soft`: one soft prompt ([n, H] or [1, n, H]) put before every item, or None. Items are generated
    `batch_items` at a time, each batch seeded from `seed`; temperature <= 0 is greedy (one answer
    per item, counted n times).
    """
    if soft is not None and soft.dim() == 3:
        if soft.shape[0] != 1:
            raise ValueError(f"sample_answers takes one soft prompt, got {soft.shape[0]}")
        soft = soft[0]
    counts = np.zeros((len(sequences), len(codes)), dtype=int)
    bad = np.zeros(len(sequences), dtype=int)
    examples: list[list[str]] = [[] for _ in sequences]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for b0 in range(0, len(sequences), batch_items):
        chunk = sequences[b0 : b0 + batch_items]
        chunk_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        answers = backend.generate([GenerationRequest(s, soft) for s in chunk], max_new_tokens=max_new_tokens,
                                   temperature=temperature, seed=chunk_seed, num_return_sequences=n)
        for j, row in enumerate(answers):
            i = b0 + j
            for g in row:
                code = parse_answer(g.text, codes)
                if code is None:
                    bad[i] += 1
                    if len(examples[i]) < 3:
                        examples[i].append(g.text)
                else:
                    counts[i, list(codes).index(code)] += 1
    return Samples(counts, bad, examples)


@dataclass
class SurveyResult:
    """One profile, serialised in the survey output contract (see README, 'Output contract')."""

    model: str
    instrument: str
    prompt: str
    mode: str
    constants: dict[str, float]
    items: list[dict]
    indices: dict[str, float]
    target: Target | None = None
    extra: dict = field(default_factory=dict)
    order: str = "forward"

    @property
    def l1(self) -> float | None:
        return l1(self.indices, self.target)[0]

    @property
    def l1_dims(self) -> list[str]:
        return l1(self.indices, self.target)[1]

    @property
    def missing_dims(self) -> list[str]:
        return [] if self.target is None else [d for d in self.indices if d not in self.target.scores]

    @property
    def mean_option_mass(self) -> float:
        return float(np.mean([it["option_mass"] for it in self.items]))

    def to_json(self) -> dict:
        from culturalign import __version__

        return {
            "culturalign_version": __version__,
            "model": self.model, "instrument": self.instrument, "prompt": self.prompt, "mode": self.mode,
            "order": self.order, "constants": self.constants, "items": self.items, "indices": self.indices,
            "target": None if self.target is None else self.target.to_json(),
            "l1": self.l1, "l1_dims": self.l1_dims, "missing_dims": self.missing_dims,
            "mean_option_mass": self.mean_option_mass, **self.extra,
        }

    @classmethod
    def from_json(cls, data: dict) -> "SurveyResult":
        """The inverse of `to_json` (a saved profile, e.g. one of an align run's result.json); the fields `to_json`
        derives (L1, option mass) and a `reference` are recomputed or dropped, everything else is kept in `extra`."""
        derived = ("culturalign_version", "model", "instrument", "prompt", "mode", "order", "constants", "items",
                   "indices", "target", "l1", "l1_dims", "missing_dims", "mean_option_mass", "reference")
        target = data.get("target")
        return cls(model=data["model"], instrument=data["instrument"], prompt=data["prompt"], mode=data["mode"],
                   constants=dict(data["constants"]), items=list(data["items"]), indices=dict(data["indices"]),
                   target=None if target is None else Target.from_json(target),
                   extra={k: v for k, v in data.items() if k not in derived}, order=data.get("order", "forward"))


def survey_json(result: SurveyResult, floor: SurveyResult | None = None) -> dict:
    """One profile as `culturalign survey --json` writes it: the profile, and the uniform floor it is read against
    under `reference.uniform` (`uniform_result`, same instrument, target and constants)."""
    data = result.to_json()
    if floor is not None:
        data["reference"] = {"uniform": floor.to_json()}
    return data


def saved_order(soft_prompt, instrument: Instrument) -> str:
    """The option order a soft prompt was aligned with (its culturalign.json; forward when it names none),
    checked against `instrument`."""
    where = repr(soft_prompt.source["path"]) if soft_prompt.source else "(in memory)"
    saved = soft_prompt.meta.get("order", "forward")
    if saved not in ORDERS:
        raise CulturalignError(f"soft prompt {where}: culturalign.json names order {saved!r}; expected one "
                               f"of {', '.join(ORDERS)} (or give --order)")
    try:
        return check_order(saved, instrument)
    except CulturalignError as e:
        raise CulturalignError(f"soft prompt {where} was aligned with {e}") from None


UNIFORM = "uniform"  # the floor profile's prompt and mode: every item answered 1/K over its K options


def uniform_result(instrument: Instrument, target: Target | None = None, constants: dict[str, float] | None = None,
                   model: str = UNIFORM) -> SurveyResult:
    """The floor: the profile of an answerer that spreads every item evenly over its K options (p = 1/K), no model call.

    It is scored through the instrument's own formulas (`Instrument.score_dict`) with `constants` C (default: the
    instrument's), so on the VSM, whose indices are differences of item means, it scores C on every index. Its L1
    to a target is what a prompt must beat to know more than "no answer". Option mass 1.0, prompt and mode
    "uniform"; `model` names it "uniform" unless told otherwise.
    """
    constants = instrument.constants(constants)
    k = len(instrument.codes)
    probs = np.full((len(instrument.items), k), 1.0 / k)
    means = probs @ np.asarray(instrument.codes, dtype=float)
    items = [{"id": it.id, "probs": [round(float(x), 6) for x in p], "mean": round(float(m), 6), "option_mass": 1.0}
             for it, p, m in zip(instrument.items, probs, means)]
    return SurveyResult(model=model, instrument=instrument.id, prompt=UNIFORM, mode=UNIFORM, constants=constants,
                        items=items, indices=instrument.score_dict(means, constants), target=target,
                        extra={"seconds": 0.0, "tokens_processed": 0})


class Survey:
    """The instrument, as asked of one model under one prompt profile, scored against one target.

    `order`: forward (as the instrument presents its options), reversed, or both (see the module
    docstring). `sequences` holds every prompt asked, form after form (2 x items for `both`)."""

    def __init__(self, backend: Backend, instrument: Instrument, prompt: str = "naive", target: Target | None = None,
                 constants: dict[str, float] | None = None, answer_prefix: str = ANSWER_PREFIX, order: str = "forward"):
        self.backend, self.instrument, self.prompt, self.target = backend, instrument, prompt, target
        self.constants = instrument.constants(constants)
        self.order = check_order(order, instrument)
        self.forms = order_forms(instrument, order)
        self.sequences, groups = [], []
        for form in self.forms:
            seqs, option_ids = encode_items(backend.tokenizer, form, prompt, target, answer_prefix)
            if self.sequences and option_ids != self.option_ids:
                raise CulturalignError("the reversed items end in other answer-code tokens than the forward ones")
            sections: dict[str, list[int]] = {}
            for i, it in enumerate(form.items):
                if it.section:
                    sections.setdefault(it.section, []).append(len(self.sequences) + i)
                elif len(self.forms) > 1:  # with two orders, each order's items without a section share a stage
                    sections.setdefault(None, []).append(len(self.sequences) + i)
            groups += list(sections.values())
            self.sequences += seqs
            self.option_ids = option_ids
        self.prompts = backend.prompt_set(self.sequences, groups)
        if target is not None:
            dims = [d for d in instrument.dims if d in target.scores]
            if not dims:
                raise CulturalignError(f"target {target.name!r} has none of the instrument's indices ({', '.join(instrument.dims)})")
            self.loss_mask = torch.tensor([d in target.scores for d in instrument.dims])
            self.target_vec = torch.tensor([target.scores.get(d, 0.0) for d in instrument.dims], dtype=torch.float32)

    def distributions(self, soft=None, progress=None) -> Distributions:
        """[P, I, K] answer distributions (I items), in answer-code order; `soft` as `Backend.option_distributions`
        takes it; `progress(n)` is called with the number of items answered so far.

        An item whose options are presented in another order (`Item.order`, e.g. a reversed instrument or
        `order="reversed"`) is asked in that order, and its distribution is mapped back to the original
        codes here, before anything is scored. With `order="both"` the forward and reversed prompts are
        asked in this one call, and each item's two distributions (and option masses) are averaged."""
        k = len(self.forms)
        if progress is not None and k > 1:
            report = progress

            def progress(done):  # prompts answered -> items answered in both orders
                report(done // k)
        if progress is None:
            d = self.backend.option_distributions(self.prompts, self.option_ids, soft)
        else:
            d = self.backend.option_distributions(self.prompts, self.option_ids, soft, progress=progress)
        if k == 1:
            return Distributions(self.forms[0].to_code_order(d.probs), d.mass)
        n = len(self.instrument.items)
        probs = [f.to_code_order(d.probs[..., j * n:(j + 1) * n, :]) for j, f in enumerate(self.forms)]
        mass = [d.mass[..., j * n:(j + 1) * n] for j in range(k)]
        return Distributions(sum(probs) / k, sum(mass) / k)

    def indices(self, dists: Distributions) -> torch.Tensor:
        """[P, n_indices] index scores from answer distributions (differentiable)."""
        return self.instrument.score(dists.means(self.instrument.codes).float(), self.constants)

    def loss(self, dists: Distributions, mass_floor: float = 0.0, mass_weight: float = 0.0) -> torch.Tensor:
        """[P] L1 distance to the target over its known dimensions, plus an optional option-mass penalty.

        The penalty, `mass_weight * mean_i max(0, mass_floor - option_mass_i)`, keeps a search from
        reaching the target through prompts on which the model no longer answers with a code.
        """
        if self.target is None:
            raise CulturalignError("the loss needs a target")
        ind = self.indices(dists)
        dist = ((ind - self.target_vec.to(ind.device)).abs() * self.loss_mask.to(ind.device)).sum(-1)
        if mass_weight:
            dist = dist + mass_weight * torch.relu(mass_floor - dists.mass.float()).mean(-1)
        return dist

    def result(self, soft: torch.Tensor | None = None, label: str | None = None, progress=None) -> SurveyResult:
        """The logprob-mode profile of one soft prompt ([n, H] or [1, n, H]) or of none."""
        t0 = time.perf_counter()
        if soft is not None and soft.dim() == 2:
            soft = soft.unsqueeze(0)
        with torch.no_grad():
            d = self.distributions(soft, progress)
        return self._result(d.probs[0].cpu().double().numpy(), d.mass[0].cpu().double().numpy(), label, "logprob",
                            {"seconds": round(time.perf_counter() - t0, 3),
                             "tokens_processed": self.prompts.tokens_per_candidate + (0 if soft is None else soft.shape[1])})

    def sample(self, n: int = 10, temperature: float = 1.0, soft: torch.Tensor | None = None, seed: int = 0,
               label: str | None = None) -> SurveyResult:
        """Sample mode: `n` generated answers per item; distributions are the parsed answers' frequencies."""
        if n < 1:
            raise CulturalignError(f"--samples must be at least 1, got {n}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise CulturalignError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
        t0 = time.perf_counter()
        if soft is not None and soft.dim() == 2:
            soft = soft.unsqueeze(0)
        m, runs = len(self.instrument.items), []
        for j, form in enumerate(self.forms):  # each order as its own run would sample it (same seed)
            s = sample_answers(self.backend, self.sequences[j * m:(j + 1) * m], self.instrument.codes, n, temperature,
                               soft, seed)
            s.counts = form.to_code_order(s.counts)  # parsed labels are presented positions
            parsed = s.counts.sum(1)
            if (parsed == 0).any():
                missing = [self.instrument.items[i].id for i in np.flatnonzero(parsed == 0)]
                where = "" if len(self.forms) == 1 else f" (options in {('forward', 'reversed')[j]} order)"
                raise CulturalignError(
                    f"no parsable answer for item(s) {missing}{where} in {n} samples; raise --samples or use --mode logprob"
                )
            runs.append((s, parsed))
        if len(runs) == 1:
            s, parsed = runs[0]
            probs, mass = s.counts / parsed[:, None], parsed / n
        else:  # the mean of the two orders' answer frequencies and parsed shares
            probs = sum(r.counts / p[:, None] for r, p in runs) / len(runs)
            mass = sum(p / n for _, p in runs) / len(runs)
            s = Samples(sum(r.counts for r, _ in runs), sum(r.unparsable for r, _ in runs),
                        [(a + b)[:3] for a, b in zip(runs[0][0].examples, runs[1][0].examples)])
        extra = {"seconds": round(time.perf_counter() - t0, 3), "samples_per_item": n, "temperature": temperature,
                 "unparsable": int(s.unparsable.sum())}
        res = self._result(probs, mass, label, "sample", extra)
        for it, bad, ex in zip(res.items, s.unparsable, s.examples):
            it["unparsable"] = int(bad)
            if ex:
                it["unparsable_examples"] = ex
        return res

    def _result(self, probs: np.ndarray, mass: np.ndarray, label, mode, extra) -> SurveyResult:
        if not (np.isfinite(probs).all() and np.isfinite(mass).all()):
            raise CulturalignError(
                f"the model's answer probabilities are NaN or infinite under prompt {label or self.prompt!r}; "
                "its inputs (e.g. a soft prompt) or weights are broken"
            )
        codes = np.asarray(self.instrument.codes, dtype=float)
        means = probs @ codes
        items = [
            {"id": it.id, "probs": [round(float(x), 6) for x in p], "mean": round(float(m), 6), "option_mass": round(float(o), 6)}
            for it, p, m, o in zip(self.instrument.items, probs, means, mass)
        ]
        return SurveyResult(
            model=self.backend.name, instrument=self.instrument.id, prompt=label or self.prompt, mode=mode,
            constants=self.constants, items=items, indices=self.instrument.score_dict(means, self.constants),
            target=self.target, extra=extra, order=self.order,
        )
