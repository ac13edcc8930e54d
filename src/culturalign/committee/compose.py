"""Ask a committee: route a query to cultural experts, ask them in one batch, compose one answer.

One code path serves four systems, so that every metric is computed the same way for all of them:

    naive      the base model alone
    persona    the base model with a text persona of the user's culture in the system turn
               (what the public code behind Feng et al. 2025 does instead of tuned experts)
    expert     the single best-matching expert: the router's top-1 expert, weight 1
    committee  the router's experts (top-k, weighted)

Queries with answer options (Likert or multiple choice) are put as the survey puts its items
(options first, "Answer with the number of one option", the assistant pre-filled with "Answer:").
The routed experts' answer distributions come from ONE `Backend.option_distributions` call whose rows
carry different soft prompts; the committee's answer is their weighted mixture, and each expert's
distribution is returned as well.

Open questions: each routed expert generates in one `Backend.generate` batch (a soft prompt per row).
With two or more expert answers the base model then composes one reply from them; with one, that
answer is the reply (a composition of one answer would only cost time).

Streaming (`ask(..., on_text=...)`): the reply's text goes out as it is decoded, in deltas that add up to
`answer["text"]`. A composed reply can only start once every expert has answered, so it streams from
then on; a single answer streams from its first token. Options queries generate nothing: their answer
comes whole, at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from culturalign.errors import CulturalignError
from culturalign.measure.instrument import Item
from culturalign.measure.prompts import encode_prompts, render
from culturalign.measure.targets import Target

SYSTEMS = ("naive", "persona", "expert", "committee")
MAX_OPTIONS = 9  # answer codes are the single digits 1..9

COMPOSE_TEMPLATE = (
    "Advisers from different cultures answered the question below. Write one short, helpful answer{for_whom} "
    "that keeps what they agree on and names where customs differ.\n\nQuestion: {query}\n\n{answers}"
)


@dataclass
class CommitteeConfig:
    """Generation limits for open questions (options queries generate nothing)."""

    max_new_tokens: int = 48  # per expert answer
    compose_max_new_tokens: int = 64  # the composed reply
    temperature: float = 0.0  # 0 = greedy: the same query and seed give the same answer
    seed: int = 0

    def __post_init__(self):
        for name in ("max_new_tokens", "compose_max_new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise CulturalignError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (self.temperature >= 0 and self.temperature != float("inf")):
            raise CulturalignError(f"temperature must be a finite number >= 0, got {self.temperature!r}")


@dataclass(repr=False)
class Answer:
    """One system's answer to one query, with everything needed to score and explain it (`text`: the answer)."""

    query: str
    system: str
    culture: str | None
    options: list[str] | None
    routing: dict | None
    experts: list[dict]  # per expert: code, name, weight, and probs+option_mass or text+tokens
    answer: dict  # options: probs, choice (1-based), option, option_mass; open: text, tokens, finished
    seconds: float
    tokens: dict = field(default_factory=dict)  # prompt / generated token counts

    @property
    def text(self) -> str:
        """The answer: the composed (or only) reply to an open question, the chosen option to one with options."""
        return self.answer["option"] if self.options is not None else self.answer["text"]

    def __repr__(self) -> str:
        """As `culturalign ask` prints it: the routing, each expert's answer, the answer."""
        import io

        from rich.console import Console

        from culturalign.committee.report import print_answer

        buf = io.StringIO()
        print_answer(self, Console(file=buf, width=100, color_system=None))
        return buf.getvalue().rstrip()

    @property
    def responses(self) -> int:
        """Culture-conditioned responses behind the answer (experts, or the one persona answer)."""
        return len(self.experts)

    @property
    def cultures(self) -> list[str]:
        return sorted({e["culture"] for e in self.experts if e.get("culture")})

    def to_json(self) -> dict:
        return {"query": self.query, "system": self.system, "culture": self.culture, "options": self.options,
                "routing": self.routing, "experts": self.experts, "answer": self.answer,
                "responses": self.responses, "cultures": self.cultures, "seconds": round(self.seconds, 4),
                "tokens": self.tokens}


def check_options(options: list[str] | None) -> list[str] | None:
    if options is None:
        return None
    opts = [str(o).strip() for o in options]
    if len(opts) < 2:
        raise CulturalignError(f"--options {'|'.join(opts)!r}: give at least two options separated by '|', e.g. 'yes|no'")
    if len(opts) > MAX_OPTIONS:
        raise CulturalignError(f"--options: at most {MAX_OPTIONS} options, got {len(opts)}")
    if any(not o for o in opts):
        raise CulturalignError(f"--options {'|'.join(opts)!r}: an option is empty")
    if len(set(o.casefold() for o in opts)) != len(opts):
        raise CulturalignError(f"--options {'|'.join(opts)!r}: an option is given twice")
    return opts


class Committee:
    """A frozen model, a registry of soft-prompt experts and a router, asked through one backend."""

    def __init__(self, backend, registry, router, cultures: list | None = None, config: CommitteeConfig | None = None):
        self.backend, self.registry, self.router = backend, registry, router
        self.config = config or CommitteeConfig()
        self.cultures = {c.code: c for c in (cultures or [])}

    # -- helpers ---------------------------------------------------------------------------------
    def _culture_name(self, code: str) -> str:
        if code in self.cultures:
            return self.cultures[code].name
        if code in self.registry.experts:
            return self.registry[code].name
        return code

    def _persona(self, culture: str | None) -> str | None:
        from culturalign.measure.prompts import system_text

        return None if culture is None else system_text("persona", Target(name=self._culture_name(culture), scores={}))

    def _check_query(self, query: str) -> str:
        if not isinstance(query, str) or not query.strip():
            raise CulturalignError("the query is empty; ask a question, e.g. culturalign ask \"How should I greet an elder?\"")
        return query.strip()

    def _check_length(self, ids: list[int], extra: int, query: str) -> None:
        limit = self.backend.model_info().get("max_context")
        n = len(ids) + extra
        if limit and n > limit:
            raise CulturalignError(
                f"the query needs {n} tokens with its prompt, soft prompt and answer, but the model's context is "
                f"{limit} tokens; shorten it (it starts {query[:40]!r})"
            )

    def route(self, query: str, culture: str | None, system: str, has_options: bool):
        """The experts (code, weight) a system uses for this query, and the routing record."""
        if system not in SYSTEMS:
            raise CulturalignError(f"unknown system {system!r}; expected one of {', '.join(SYSTEMS)}")
        if system in ("naive", "persona"):
            return [], None
        routing = self.router.route(query, culture=culture, has_options=has_options)
        experts = list(routing.experts)
        if system == "expert" and experts:
            experts = [(experts[0][0], 1.0)]
        return experts, routing.to_json()

    # -- asking ----------------------------------------------------------------------------------
    def resolve_culture(self, culture: str | None) -> str | None:
        """A user's culture as a code ('Japan', 'jp' -> 'JP'); unknown names are one error with close matches."""
        if culture is None:
            return None
        if not culture.strip():
            raise CulturalignError("--culture '' is empty; expected a culture code or name, e.g. JP or Japan")
        from culturalign.committee.cultures import find_culture

        return find_culture(list(self.cultures.values()), culture).code if self.cultures else culture

    def ask(self, query: str, culture: str | None = None, options: list[str] | None = None,
            system: str = "committee", on_text=None) -> Answer:
        """`on_text(delta)`: called with the open reply's text as it is decoded (see the module docstring)."""
        query = self._check_query(query)
        culture = self.resolve_culture(culture)
        options = check_options(options)
        t0 = time.perf_counter()
        experts, routing = self.route(query, culture, system, options is not None)
        if options is not None:
            ans = self._ask_options(query, culture, options, system, experts)
        else:
            ans = self._ask_open(query, culture, system, experts, on_text)
        ans.routing, ans.seconds = routing, time.perf_counter() - t0
        return ans

    def _rows(self, culture: str | None, system: str, experts: list[tuple[str, float]]):
        """(system text, soft prompt, description) per row of the batch."""
        if experts:
            return [(None, self.registry[c].embeddings, {"code": c, "culture": c, "name": self.registry[c].name,
                                                         "weight": float(w)}) for c, w in experts]
        if system == "persona" and culture is not None:
            return [(self._persona(culture), None, {"code": "persona", "culture": culture,
                                                    "name": f"persona ({self._culture_name(culture)})", "weight": 1.0})]
        return [(None, None, None)]  # the base model alone

    def _ask_options(self, query, culture, options, system, experts) -> Answer:
        tok = self.backend.tokenizer
        codes = tuple(range(1, len(options) + 1))
        item = Item(0, query, tuple(options))
        rows = self._rows(culture, system, experts)
        system_text = rows[0][0]  # only the persona row has one, and it is alone
        seqs, option_ids = encode_prompts(tok, [item], codes, system_text)
        soft_len = max((r[1].shape[0] for r in rows if r[1] is not None), default=0)
        self._check_length(seqs[0], soft_len + 1, query)
        prompts = self.backend.prompt_set(seqs)
        with torch.no_grad():
            d = self.backend.option_distributions(prompts, option_ids, soft=[r[1] for r in rows])
        probs, mass = d.probs[:, 0].double().cpu(), d.mass[:, 0].double().cpu()
        weights = torch.tensor([r[2]["weight"] if r[2] else 1.0 for r in rows], dtype=torch.float64)
        mix = (weights[:, None] * probs).sum(0)
        per = []
        for (_, _, info), p, m in zip(rows, probs, mass):
            if info is not None:
                per.append({**info, "probs": [round(float(x), 6) for x in p], "option_mass": round(float(m), 6),
                            "choice": int(p.argmax()) + 1})
        choice = int(mix.argmax())
        answer = {"probs": [round(float(x), 6) for x in mix], "choice": choice + 1, "option": options[choice],
                  "option_mass": round(float((weights * mass).sum()), 6)}
        tokens = {"prompt": len(seqs[0]) * len(rows), "generated": 0}
        return Answer(query, system, culture, options, None, per, answer, 0.0, tokens)

    def _generate(self, requests, max_new_tokens, on_text=None):
        """One generate call; `on_text` (one request only) gets its stripped text as it is decoded."""
        from culturalign.backends import GenerationRequest, TextStream

        reqs = [GenerationRequest(ids, soft) for ids, soft in requests]
        stream = {}
        if on_text is not None:
            text = TextStream(self.backend.tokenizer, strip=True)

            def on_step(tokens):
                delta = "" if tokens[0][0] is None else text.add(tokens[0][0])
                if delta:
                    on_text(delta)

            stream = {"on_step": on_step}
        out = self.backend.generate(reqs, max_new_tokens=max_new_tokens, temperature=self.config.temperature,
                                    seed=self.config.seed, **stream)
        return [g[0] for g in out]

    def _chat_ids(self, system: str | None, user: str) -> list[int]:
        tok = self.backend.tokenizer
        return tok(render(tok, system, user, answer_prefix=""), add_special_tokens=False)["input_ids"]

    def _ask_open(self, query, culture, system, experts, on_text=None) -> Answer:
        cfg = self.config
        rows = self._rows(culture, system, experts)
        requests = []
        for sys_text, soft, _ in rows:
            ids = self._chat_ids(sys_text, query)
            self._check_length(ids, (0 if soft is None else soft.shape[0]) + cfg.max_new_tokens, query)
            requests.append((ids, soft))
        gens = self._generate(requests, cfg.max_new_tokens, on_text if len(rows) == 1 else None)  # one row: the reply
        per = []
        for (_, _, info), g in zip(rows, gens):
            if info is not None:
                per.append({**info, "text": g.text.strip(), "tokens": g.new_tokens, "finished": g.finished})
        tokens = {"prompt": sum(len(r[0]) for r in requests), "generated": sum(g.new_tokens for g in gens)}
        if len(per) < 2:
            g = gens[0]
            answer = {"text": g.text.strip(), "tokens": g.new_tokens, "finished": g.finished, "composed": False}
            return Answer(query, system, culture, None, None, per, answer, 0.0, tokens)
        listing = "\n".join(f"[{e['name']} adviser, weight {e['weight']:.2f}] {e['text']}" for e in per)
        for_whom = f" for a person from {self._culture_name(culture)}" if culture else ""
        prompt = COMPOSE_TEMPLATE.format(for_whom=for_whom, query=query, answers=listing)
        ids = self._chat_ids(None, prompt)
        self._check_length(ids, cfg.compose_max_new_tokens, query)
        g = self._generate([(ids, None)], cfg.compose_max_new_tokens, on_text)[0]
        tokens = {"prompt": tokens["prompt"] + len(ids), "generated": tokens["generated"] + g.new_tokens}
        answer = {"text": g.text.strip(), "tokens": g.new_tokens, "finished": g.finished, "composed": True}
        return Answer(query, system, culture, None, None, per, answer, 0.0, tokens)


def load_committee(backend, experts: str | None = None, router_config=None, config: CommitteeConfig | None = None,
                   encoder=None) -> Committee:
    """The committee for `backend`: its registry (`experts` folder, or the one shipped for the model),
    the cultures file, and a router over the registry's experts."""
    from culturalign.committee.cultures import load_cultures
    from culturalign.committee.experts import load_registry
    from culturalign.committee.router import Router

    registry = load_registry(experts, model=backend.name, hidden_size=backend.hidden_size)
    cultures = load_cultures()
    router = Router(cultures, registry.codes, encoder=encoder, config=router_config)
    return Committee(backend, registry, router, cultures, config)
