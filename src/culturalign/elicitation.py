"""Ask the model every item and read its answer distribution; the program's hot loop.

`SurveyEvaluator` returns, for a batch of soft prompts (or none), each item's probability over the
answer codes (next-token softmax restricted to the option tokens, renormalized) and the mass the
model put on the option tokens before renormalizing. It does the work once where it can:

    [soft prompt][ root prefix shared by all items ][ section prefix ][ item suffix ]
     per candidate       computed once per candidate    once per section   per item

Each stage's KV cache is repeated (not recomputed) across what follows it; suffixes of one stage
are left-padded with explicit position ids so the last position is the answer position for every
row, and only that position's logits are computed. `plain_distributions` is the straightforward
version (every item as its full sequence, full logits), kept as the reference for tests and
benchmarks. Both paths are differentiable when the soft prompt requires grad.

`sample_answers` is the Cultural Alignment Test's mode: generate N answers per item at a
temperature and parse the code; unparsable answers are counted, never dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from culturalign.models import LoadedModel


def common_prefix_len(seqs: list[list[int]]) -> int:
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


@dataclass
class Distributions:
    probs: torch.Tensor  # [P, I, K] renormalized over the answer codes
    mass: torch.Tensor  # [P, I] probability on the option tokens before renormalizing

    def means(self, codes) -> torch.Tensor:
        return self.probs @ torch.as_tensor(codes, dtype=self.probs.dtype, device=self.probs.device)


def _read_options(logits: torch.Tensor, option_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.float(), dim=-1)[..., option_ids]
    mass = logp.exp().sum(-1)
    return torch.softmax(logp, dim=-1), mass


class SurveyEvaluator:
    """Answer distributions of all items for a batch of soft prompts, sharing common prefixes.

    `sequences`: each item's token ids, ending where the answer code goes. `groups`: item indices
    that share a section (items in no group share only the root prefix). `max_rows`: largest
    batch of item rows per forward pass (memory bound).
    """

    def __init__(self, lm: LoadedModel, sequences: list[list[int]], option_ids: list[int],
                 groups: list[list[int]] | None = None, max_rows: int = 96):
        self.lm, self.option_ids, self.max_rows = lm, option_ids, max_rows
        self.n_items = len(sequences)
        self.sequences = sequences
        self.root = sequences[0][: min(common_prefix_len(sequences), min(len(s) for s in sequences) - 1)]
        r = len(self.root)
        # Sections of two or more items share a stage; all other items share one last stage.
        multi = [list(g) for g in (groups or []) if len(g) > 1]
        in_multi = {i for g in multi for i in g}
        singles = [i for i in range(self.n_items) if i not in in_multi]
        stages = multi + ([singles] if singles else [])
        self.stages = []  # (item indices, shared ids after root, [suffix ids per item])
        for g in stages:
            rest = [sequences[i][r:] for i in g]
            k = min(common_prefix_len(rest), min(len(x) for x in rest) - 1) if len(g) > 1 else 0
            self.stages.append((g, rest[0][:k], [x[k:] for x in rest]))
        self.tokens_per_candidate = len(self.root) + sum(len(p) + sum(len(s) for s in sx) for _, p, sx in self.stages)
        self.plain_tokens_per_candidate = sum(len(s) for s in sequences)

    @property
    def model(self):
        return self.lm.model

    def _embed(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.long, device=self.lm.device)
        return self.model.get_input_embeddings()(t)

    def _run(self, embeds, attn, pos, kv):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=kv, config=self.model.config) if kv else DynamicCache(config=self.model.config)
        out = self.model(inputs_embeds=embeds, attention_mask=attn, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def __call__(self, soft: torch.Tensor | None = None) -> Distributions:
        """`soft`: [P, n, H] soft prompts (or None for no soft prompt). Returns [P, I, K] and [P, I]."""
        dev, dtype = self.lm.device, self.lm.dtype
        P = 1 if soft is None else soft.shape[0]
        K = len(self.option_ids)
        probs = [[None] * self.n_items for _ in range(P)]
        mass = [[None] * self.n_items for _ in range(P)]
        with torch.set_grad_enabled(soft is not None and soft.requires_grad):
            prefix = self._embed(self.root).to(dtype).unsqueeze(0).expand(P, -1, -1)
            if soft is not None:
                prefix = torch.cat([soft.to(device=dev, dtype=dtype), prefix], dim=1)
            L0 = prefix.shape[1]
            root_kv = None
            if L0 > 0:
                pos = torch.arange(L0, device=dev).unsqueeze(0).expand(P, -1)
                _, root_kv = self._run(prefix, torch.ones(P, L0, dtype=torch.long, device=dev), pos, None)
            for items, shared, suffixes in self.stages:
                kv, past = root_kv, L0
                if shared:
                    emb = self._embed(shared).to(dtype).unsqueeze(0).expand(P, -1, -1)
                    n = len(shared)
                    attn = torch.ones(P, past + n, dtype=torch.long, device=dev)
                    pos = (past + torch.arange(n, device=dev)).unsqueeze(0).expand(P, -1)
                    _, kv = self._run(emb, attn, pos, kv)
                    past += n
                k = len(items)
                per = max(1, self.max_rows // k)
                width = max(len(s) for s in suffixes)
                pad = [width - len(s) for s in suffixes]
                ids = torch.tensor([[0] * p + s for p, s in zip(pad, suffixes)], device=dev)
                smask = torch.tensor([[0] * p + [1] * len(s) for p, s in zip(pad, suffixes)], device=dev)
                spos = past + torch.tensor([[0] * p + list(range(len(s))) for p, s in zip(pad, suffixes)], device=dev)
                semb = self.model.get_input_embeddings()(ids).to(dtype)
                for c0 in range(0, P, per):
                    c1 = min(P, c0 + per)
                    rows = (c1 - c0) * k
                    ckv = [(a[c0:c1].repeat_interleave(k, 0), b[c0:c1].repeat_interleave(k, 0)) for a, b in kv] if kv else None
                    attn = torch.cat([torch.ones(rows, past, dtype=torch.long, device=dev), smask.repeat(c1 - c0, 1)], 1)
                    logits, _ = self._run(semb.repeat(c1 - c0, 1, 1), attn, spos.repeat(c1 - c0, 1), ckv)
                    p, m = _read_options(logits, self.option_ids)
                    p, m = p.view(c1 - c0, k, K), m.view(c1 - c0, k)
                    for ci in range(c1 - c0):
                        for j, item in enumerate(items):
                            probs[c0 + ci][item], mass[c0 + ci][item] = p[ci, j], m[ci, j]
        return Distributions(
            torch.stack([torch.stack(r) for r in probs]), torch.stack([torch.stack(r) for r in mass])
        )


def plain_distributions(lm: LoadedModel, sequences: list[list[int]], option_ids: list[int],
                        soft: torch.Tensor | None = None) -> Distributions:
    """Reference: each item as its full sequence (soft prompt included), full logits, one batch per candidate."""
    dev, dtype = lm.device, lm.dtype
    emb = lm.model.get_input_embeddings()
    P = 1 if soft is None else soft.shape[0]
    width = max(len(s) for s in sequences)
    probs, mass = [], []
    with torch.set_grad_enabled(soft is not None and soft.requires_grad):
        for c in range(P):
            ids = torch.tensor([[0] * (width - len(s)) + s for s in sequences], device=dev)
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=dev)
            x = emb(ids).to(dtype)
            if soft is not None:
                n = soft.shape[1]
                x = torch.cat([soft[c].to(device=dev, dtype=dtype).unsqueeze(0).expand(len(sequences), -1, -1), x], 1)
                # left padding must stay on the left: move the soft prompt after each row's padding
                x = torch.stack([torch.cat([x[i, n : n + width - len(s)], x[i, :n], x[i, n + width - len(s) :]]) for i, s in enumerate(sequences)])
                mask = torch.cat([torch.ones(len(sequences), n, dtype=mask.dtype, device=dev), mask], 1)
                mask = torch.stack([torch.cat([mask[i, n : n + width - len(s)], mask[i, :n], mask[i, n + width - len(s) :]]) for i, s in enumerate(sequences)])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = lm.model(inputs_embeds=x, attention_mask=mask, position_ids=pos).logits  # full logits
            p, m = _read_options(logits[:, -1], option_ids)
            probs.append(p)
            mass.append(m)
    return Distributions(torch.stack(probs), torch.stack(mass))


ANSWER_RE = re.compile(r"^\s*\(?\s*([0-9]+)")


def parse_answer(text: str, codes) -> int | None:
    """The answer code at the start of a generated answer, or None if there is none."""
    m = ANSWER_RE.match(text)
    if m and int(m.group(1)) in codes:
        return int(m.group(1))
    return None


@dataclass
class Samples:
    counts: np.ndarray  # [I, K] parsed answers per code
    unparsable: np.ndarray  # [I]
    examples: list[list[str]]  # a few unparsable answers per item, for the report


def sample_answers(lm: LoadedModel, sequences: list[list[int]], codes, n: int = 10, temperature: float = 1.0,
                   soft: torch.Tensor | None = None, seed: int = 0, max_new_tokens: int = 4,
                   batch_items: int = 8) -> Samples:
    """Generate `n` answers per item (CAT style) and count the parsed codes."""
    dev, dtype = lm.device, lm.dtype
    emb = lm.model.get_input_embeddings()
    tok = lm.tokenizer
    counts = np.zeros((len(sequences), len(codes)), dtype=int)
    bad = np.zeros(len(sequences), dtype=int)
    examples: list[list[str]] = [[] for _ in sequences]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for b0 in range(0, len(sequences), batch_items):
        chunk = sequences[b0 : b0 + batch_items]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in chunk], device=dev)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in chunk], device=dev)
        x = emb(ids).to(dtype)
        if soft is not None:
            s0 = soft[0].to(device=dev, dtype=dtype)
            x = torch.stack([torch.cat([x[i, : width - len(s)], s0, x[i, width - len(s) :]]) for i, s in enumerate(chunk)])
            mask = torch.stack([torch.cat([mask[i, : width - len(s)], torch.ones(len(s0), dtype=mask.dtype, device=dev), mask[i, width - len(s) :]]) for i, s in enumerate(chunk)])
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        greedy = temperature <= 0  # one deterministic answer per item, counted n times
        options = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        with torch.no_grad():
            out = lm.model.generate(
                inputs_embeds=x, attention_mask=mask, max_new_tokens=max_new_tokens,
                num_return_sequences=1 if greedy else n, pad_token_id=tok.pad_token_id, **options,
            )
        texts = tok.batch_decode(out, skip_special_tokens=True)
        if greedy:
            texts = [t for t in texts for _ in range(n)]
        for j, text in enumerate(texts):
            i = b0 + j // n
            code = parse_answer(text, codes)
            if code is None:
                bad[i] += 1
                if len(examples[i]) < 3:
                    examples[i].append(text)
            else:
                counts[i, list(codes).index(code)] += 1
    return Samples(counts, bad, examples)
