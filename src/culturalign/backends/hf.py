"""`HFBackend`: a frozen transformers causal LM; the program's hot loop.

Long because: one backend implements every `Backend` batch method (option distributions with a shared prefix,
log-likelihoods, generation with a per-step callback) and its plain reference path, which the tests compare.

`option_distributions` returns, for a batch of rows (each with its own soft prompt or none), each
prompt's probability over the option tokens (next-token softmax restricted to them, renormalized)
and the mass the model put on them before renormalizing. It does the work once where it can:

    [soft prompt][ root prefix shared by all prompts ][ stage prefix ][ suffix ]
     per row          computed once per row              once per stage  per prompt

Each stage's KV cache is repeated (not recomputed) across what follows it; suffixes of one stage
are left-padded with explicit position ids so the last position is the answer position for every
row, and only that position's logits are computed. Rows whose soft prompts differ in length (None
is length 0) are left-padded inside the root stage: the padding is masked out and position ids
count only real tokens, so every row sees positions 0..L-1 exactly as if it were alone; later
stages carry the root's padding mask and each row's position offset. Rows whose soft prompts all
have one length take the unpadded path.

`plain_option_distributions` is the straightforward version (every prompt as its full sequence,
full logits), kept as the reference for tests and benchmarks. Both are differentiable when a soft
prompt requires grad. `generate` runs transformers' generation loop on left-padded input embeddings,
each row's soft prompt placed after its padding (its `on_step` callback rides the loop as a streamer). `loglikelihood` scores texts token by token in
left-padded batches of windows, computing logits only at the positions that predict a scored token.

Sliding-window models (Gemma 2/3, Mistral, Qwen 2 with `use_sliding_window`): the shared caches are exact only
while every row fits in the window, so `option_distributions` falls back to unshared full sequences (the plain
path with last-position logits) for any call whose longest row would not; `attention_window` reads the window
from the model's config.
"""

from __future__ import annotations

import functools
import inspect
import math

from collections.abc import Callable, Sequence

import torch

from culturalign.backends.base import (
    Backend, Distributions, Generation, GenerationRequest, LoglikelihoodRequest, PromptSet, SoftPrompts,
)


def _read_options(logits: torch.Tensor, option_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.float(), dim=-1)[..., option_ids]
    mass = logp.exp().sum(-1)
    return torch.softmax(logp, dim=-1), mass


def attention_window(config) -> int | None:
    """The sliding window of a model's attention (positions a token may attend to, itself included), or None when
    every layer attends to all earlier positions. Read from the config alone: `layer_types` where the config has
    them (Gemma 3: 5 of every 6 layers "sliding_attention"; Qwen 2 only with `use_sliding_window`), else
    `sliding_window` by itself (Mistral)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return None
    types = getattr(cfg, "layer_types", None)
    if types is not None and not any("sliding" in str(t) for t in types):
        return None
    return int(window)


def _soft_rows(soft: SoftPrompts) -> tuple[int, torch.Tensor | None, list[torch.Tensor | None] | None]:
    """(rows P, [P, n, H] when every row has a soft prompt of one length, else None, per-row list when lengths differ)."""
    if soft is None:
        return 1, None, None
    if isinstance(soft, torch.Tensor):
        if soft.dim() != 3:
            raise ValueError(f"soft prompts: expected a tensor [P, n, H] or a list of [n, H] tensors, got shape {tuple(soft.shape)}")
        return soft.shape[0], soft, None
    rows = list(soft)
    if not rows:
        raise ValueError("soft prompts: empty list (use None for one row without a soft prompt)")
    for r in rows:
        if r is not None and (not isinstance(r, torch.Tensor) or r.dim() != 2):
            raise ValueError("soft prompts: every row must be a tensor [n, H] or None")
    if all(r is None for r in rows):
        return len(rows), None, None
    if all(r is not None for r in rows) and len({r.shape[0] for r in rows}) == 1:
        return len(rows), torch.stack(rows), None
    return len(rows), None, rows


class HFBackend(Backend):
    """A transformers causal LM (frozen, eval mode) and its tokenizer.

    `max_rows`: largest batch of prompt rows per forward pass in `option_distributions` (memory bound).
    `window`: the model's sliding attention window (`attention_window` of its config), None without one.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, device: torch.device | str, max_rows: int = 96):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.device, self.max_rows = torch.device(device), max_rows
        self.window = attention_window(model.config)

    def __repr__(self) -> str:
        return f"HFBackend({self.name!r}, device={self.device}, dtype={self.dtype})"

    # -- the model's facts ----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    def embed(self, ids) -> torch.Tensor:
        t = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.long, device=self.device)
        return self.model.get_input_embeddings()(t)

    def embedding_table(self) -> torch.Tensor:
        """The table in the space `embed` returns, which is where soft prompts live. A plain `nn.Embedding` is a
        lookup, so that is its weights, unchanged; a module that transforms its rows (Gemma's scales them by
        sqrt(hidden)) is run over the whole vocabulary, so the model itself says what its input embeddings are."""
        module = self.model.get_input_embeddings()
        weight = module.weight.detach()
        if type(module) is torch.nn.Embedding:
            return weight.float().cpu()
        vocab, step = weight.shape[0], 8192
        with torch.no_grad():
            return torch.cat([module(torch.arange(i, min(vocab, i + step), device=weight.device)).float().cpu()
                              for i in range(0, vocab, step)])

    def input_gain(self) -> torch.Tensor | None:
        """The first decoder layer's input norm, measured on each basis vector: for an RMSNorm-style module,
        norm(e_i) = sqrt(H) * gain_i, whatever its parameterisation (Llama's w, Gemma's 1 + w). None when
        the model has no such module (found by name: the first `*Norm` module inside layer 0)."""
        H = self.hidden_size
        for name, module in self.model.named_modules():
            if type(module).__name__.endswith("Norm") and ".0." in f".{name}." and "layers" in name:
                try:
                    with torch.no_grad():
                        p = next(module.parameters())
                        out = module(torch.eye(H, dtype=p.dtype, device=p.device)[None])[0]
                    return (out.diagonal().float().cpu().abs() / math.sqrt(H)).detach()
                except (StopIteration, RuntimeError, TypeError):
                    return None
        return None

    def model_info(self) -> dict:
        cfg = self.model.config
        return {
            "model_type": getattr(cfg, "model_type", None),
            "num_layers": getattr(cfg, "num_hidden_layers", None),
            "num_attention_heads": getattr(cfg, "num_attention_heads", None),
            "hidden_size": self.hidden_size,
            "vocab_size": self.model.get_input_embeddings().weight.shape[0],
            "max_context": getattr(cfg, "max_position_embeddings", None),
            "attention_window": self.window,
        }

    # -- option distributions ---------------------------------------------------------------------------
    def _run(self, embeds, attn, pos, kv):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=kv, config=self.model.config) if kv else DynamicCache(config=self.model.config)
        out = self.model(inputs_embeds=embeds, attention_mask=attn, position_ids=pos, **{self._cache_argument: cache},
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], [(layer.keys, layer.values) for layer in cache.layers]  # filled in place

    @functools.cached_property
    def _cache_argument(self) -> str:
        """The forward argument that takes a KV cache: `cache` in transformers 5.24 (where `past_key_values` warns that
        it is removed in 5.40), `past_key_values` in earlier 5.x. The cache object passed is filled in place, so the
        output's own name for it (`cache` / `past_key_values`) is never read."""
        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def option_distributions(self, prompts: PromptSet, option_ids: list[int], soft: SoftPrompts = None,
                             progress: Callable[[int], None] | None = None) -> Distributions:
        """See `Backend.option_distributions`; shared prefix caches as the module docstring describes.

        On a sliding-window model (`self.window`), a call whose longest row (soft prompt + prompt) would not fit in
        the window falls back to the plain path, each prompt as its full sequence with last-position logits
        (`_unshared_option_distributions`): the shared caches keep only the window in sliding layers, and the
        suffixes' left padding would sit inside it. Within the window both paths see every position, and the
        cache is exact.
        """
        dev, dtype = self.device, self.dtype
        answered = 0
        P, uniform, ragged = _soft_rows(soft)
        if self.window is not None:
            n_soft = uniform.shape[1] if uniform is not None else max((r.shape[0] for r in ragged or [] if r is not None), default=0)
            if n_soft + max(len(s) for s in prompts.sequences) > self.window:
                return _unshared_option_distributions(self, prompts, option_ids, soft, progress)
        K = len(option_ids)
        probs = [[None] * prompts.n_items for _ in range(P)]
        mass = [[None] * prompts.n_items for _ in range(P)]
        grad = any(r is not None and r.requires_grad for r in (ragged or [uniform]))
        with torch.set_grad_enabled(grad):
            prefix = self.embed(prompts.root).to(dtype).unsqueeze(0).expand(P, -1, -1)
            offsets = root_mask = None  # ragged rows only: each row's real length so far, and its padding mask
            if ragged is not None:
                prefix, root_mask = self._padded_root(prefix, ragged)
                offsets = root_mask.sum(1)
            elif uniform is not None:
                prefix = torch.cat([uniform.to(device=dev, dtype=dtype), prefix], dim=1)
            L0 = prefix.shape[1]
            root_kv = None
            if L0 > 0:
                if root_mask is None:
                    attn = torch.ones(P, L0, dtype=torch.long, device=dev)
                    pos = torch.arange(L0, device=dev).unsqueeze(0).expand(P, -1)
                else:
                    attn, pos = root_mask, (root_mask.cumsum(-1) - 1).clamp(min=0)
                _, root_kv = self._run(prefix, attn, pos, None)
            for items, shared, suffixes in prompts.stages:
                kv, past, pmask, off = root_kv, L0, root_mask, offsets
                if shared:
                    emb = self.embed(shared).to(dtype).unsqueeze(0).expand(P, -1, -1)
                    n = len(shared)
                    if pmask is None:
                        attn = torch.ones(P, past + n, dtype=torch.long, device=dev)
                        pos = (past + torch.arange(n, device=dev)).unsqueeze(0).expand(P, -1)
                    else:
                        attn = torch.cat([pmask, torch.ones(P, n, dtype=torch.long, device=dev)], 1)
                        pos = off.unsqueeze(1) + torch.arange(n, device=dev)
                        pmask, off = attn, off + n
                    _, kv = self._run(emb, attn, pos, kv)
                    past += n
                k = len(items)
                per = max(1, self.max_rows // k)
                width = max(len(s) for s in suffixes)
                pad = [width - len(s) for s in suffixes]
                ids = torch.tensor([[0] * p + s for p, s in zip(pad, suffixes)], device=dev)
                smask = torch.tensor([[0] * p + [1] * len(s) for p, s in zip(pad, suffixes)], device=dev)
                local = torch.tensor([[0] * p + list(range(len(s))) for p, s in zip(pad, suffixes)], device=dev)
                spos = past + local
                semb = self.embed(ids).to(dtype)
                for c0 in range(0, P, per):
                    c1 = min(P, c0 + per)
                    rows = (c1 - c0) * k
                    ckv = [(a[c0:c1].repeat_interleave(k, 0), b[c0:c1].repeat_interleave(k, 0)) for a, b in kv] if kv else None
                    if pmask is None:
                        attn = torch.cat([torch.ones(rows, past, dtype=torch.long, device=dev), smask.repeat(c1 - c0, 1)], 1)
                        pos = spos.repeat(c1 - c0, 1)
                    else:
                        attn = torch.cat([pmask[c0:c1].repeat_interleave(k, 0), smask.repeat(c1 - c0, 1)], 1)
                        pos = off[c0:c1].repeat_interleave(k).unsqueeze(1) + local.repeat(c1 - c0, 1)
                    logits, _ = self._run(semb.repeat(c1 - c0, 1, 1), attn, pos, ckv)
                    p, m = _read_options(logits, option_ids)
                    p, m = p.view(c1 - c0, k, K), m.view(c1 - c0, k)
                    for ci in range(c1 - c0):
                        for j, item in enumerate(items):
                            probs[c0 + ci][item], mass[c0 + ci][item] = p[ci, j], m[ci, j]
                answered += k
                if progress is not None:
                    progress(answered)  # prompts answered so far (for every row)
        return Distributions(
            torch.stack([torch.stack(r) for r in probs]), torch.stack([torch.stack(r) for r in mass])
        )

    def _padded_root(self, root: torch.Tensor, soft: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """[pad][soft_p][root] per row, left-padded to the longest soft prompt, and its attention mask."""
        dev, dtype = self.device, self.dtype
        lengths = [0 if s is None else s.shape[0] for s in soft]
        longest = max(lengths)
        pad = self.embed([0]).to(dtype)  # any token: the padding is masked out
        rows = []
        for p, (s, n) in enumerate(zip(soft, lengths)):
            parts = [pad.expand(longest - n, -1)] if n < longest else []
            if n:
                parts.append(s.to(device=dev, dtype=dtype))
            rows.append(torch.cat([*parts, root[p]], 0))
        r = root.shape[1]
        mask = torch.tensor([[0] * (longest - n) + [1] * (n + r) for n in lengths], dtype=torch.long, device=dev)
        return torch.stack(rows), mask

    # -- log-likelihood --------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest], *, max_length: int | None = None,
                      progress: Callable[[int], None] | None = None, max_logits: int = 1 << 25) -> list[torch.Tensor]:
        """See `Backend.loglikelihood`. `max_logits` bounds rows x kept positions x vocabulary per forward pass."""
        limit = max_length or self.model_info()["max_context"] or 2048
        vocab = self.model_info()["vocab_size"]
        windows = []  # (request, soft, input ids, target ids)
        for r_i, r in enumerate(requests):
            n_soft = 0 if r.soft is None else r.soft.shape[0]
            if r.soft is not None and (r.soft.dim() != 2 or n_soft < 1):
                raise ValueError(f"request {r_i}: a soft prompt must be a tensor [n >= 1, H], got shape {tuple(r.soft.shape)}")
            tokens, first = list(r.context) + list(r.continuation), len(r.context)
            if first == 0 and n_soft == 0 and r.continuation:
                raise ValueError(f"request {r_i}: its first token has nothing to be predicted from; give a context "
                                 "(e.g. the start token) or a soft prompt")
            cap = limit - n_soft  # token positions left in a window next to the soft prompt
            if cap < 1:
                raise ValueError(f"request {r_i}: a soft prompt of {n_soft} tokens leaves no room in {limit} positions")
            s = first
            while s < len(tokens):  # targets tokens[s:e], read from the logits after tokens[a:e-1]
                e = min(len(tokens), s + cap)
                a = max(0, e - 1 - cap)
                windows.append((r_i, r.soft, tokens[a : e - 1], tokens[s:e]))
                s = e
        pieces: list[list[torch.Tensor]] = [[] for _ in requests]
        grad = any(r.soft is not None and r.soft.requires_grad for r in requests)
        done, i = 0, 0
        with torch.set_grad_enabled(grad):
            while i < len(windows):
                j = i + 1  # grow the batch while its kept logits stay within max_logits
                while j < len(windows) and (j + 1 - i) * max(len(w[3]) for w in windows[i : j + 1]) * vocab <= max_logits:
                    j += 1
                for (r_i, _, _, _), logp in zip(windows[i:j], self._window_logprobs(windows[i:j])):
                    pieces[r_i].append(logp)
                done += j - i
                i = j
                if progress is not None:
                    progress(done)
        return [torch.cat(p) if p else torch.zeros(0) for p in pieces]

    def _window_logprobs(self, batch) -> list[torch.Tensor]:
        """One left-padded forward pass over windows `[soft][input ids]`; log-probs of each window's targets."""
        dev, dtype = self.device, self.dtype
        lengths = [(0 if soft is None else soft.shape[0]) + len(ids) for _, soft, ids, _ in batch]
        width, keep = max(lengths), max(len(t) for *_, t in batch)
        rows, mask = [], []
        for n, (_, soft, ids, _) in zip(lengths, batch):
            parts = [self.embed([0] * (width - n)).to(dtype)] if n < width else []  # any token: masked out
            if soft is not None:
                parts.append(soft.to(device=dev, dtype=dtype))
            if ids:
                parts.append(self.embed(ids).to(dtype))
            rows.append(torch.cat(parts, 0))
            mask.append([0] * (width - n) + [1] * n)
        mask = torch.tensor(mask, dtype=torch.long, device=dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(inputs_embeds=torch.stack(rows), attention_mask=mask, position_ids=pos,
                            logits_to_keep=keep, use_cache=False).logits
        out = []
        for b, (*_, targets) in enumerate(batch):
            n = len(targets)
            logp = torch.log_softmax(logits[b, keep - n :].float(), dim=-1)
            out.append(logp.gather(-1, torch.tensor(targets, device=dev).unsqueeze(-1)).squeeze(-1).cpu())
        return out

    # -- generation ------------------------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, (list, tuple)) else {eos} if eos is not None else set()

    def generate(self, requests: Sequence[GenerationRequest], *, max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0, num_return_sequences: int = 1,
                 on_step: Callable[[list[list[int | None]]], None] | None = None) -> list[list[Generation]]:
        """See `Backend.generate`. `on_step` goes to transformers' loop as a streamer, which is handed each step's
        tokens and changes nothing in the decoding."""
        if max_new_tokens < 1 or num_return_sequences < 1:
            raise ValueError("max_new_tokens and num_return_sequences must be at least 1")
        if not requests:
            return []
        dev, dtype, tok = self.device, self.dtype, self.tokenizer
        lengths = [0 if r.soft is None else r.soft.shape[0] for r in requests]
        width = max(n + len(r.ids) for n, r in zip(lengths, requests))
        x, mask = [], []
        for n, r in zip(lengths, requests):
            pad = width - n - len(r.ids)
            e = self.embed([tok.pad_token_id] * pad + list(r.ids)).to(dtype)
            if n:
                e = torch.cat([e[:pad], r.soft.to(device=dev, dtype=dtype), e[pad:]])
            x.append(e)
            mask.append([0] * pad + [1] * (n + len(r.ids)))
        x = torch.stack(x)
        mask = torch.tensor(mask, device=dev)
        torch.manual_seed(seed)
        greedy = temperature <= 0  # one deterministic continuation per row, copied
        options = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        copies = 1 if greedy else num_return_sequences
        eos = self._eos_ids()
        if on_step is not None:
            options["streamer"] = _StepStreamer(on_step, len(requests), copies, num_return_sequences, eos)
        with torch.no_grad():
            out = self.model.generate(
                inputs_embeds=x, attention_mask=mask, max_new_tokens=max_new_tokens,
                num_return_sequences=copies, pad_token_id=tok.pad_token_id, **options,
            )
        results = []
        for i, (n, r) in enumerate(zip(lengths, requests)):
            row = []
            for j in range(num_return_sequences):
                ids = out[i * copies + (0 if greedy else j)].tolist()
                end = next((t + 1 for t, v in enumerate(ids) if v in eos), None)
                ids = ids if end is None else ids[:end]
                row.append(Generation(text=tok.decode(ids, skip_special_tokens=True), token_ids=ids,
                                      prompt_tokens=n + len(r.ids), new_tokens=len(ids), finished=end is not None))
            results.append(row)
        return results


class _StepStreamer:
    """transformers' streamer interface (`put`, `end`) turned into `Backend.generate`'s `on_step` callback.

    The loop first puts the prompt ids ([rows, length], empty when it starts from embeddings), then each step's
    tokens ([rows], rows = requests x copies, request-major); a row that has ended gets padding, reported as None.
    """

    def __init__(self, on_step, n_requests: int, copies: int, sequences: int, eos: set[int]):
        self.on_step, self.n, self.copies, self.sequences, self.eos = on_step, n_requests, copies, sequences, eos
        self.ended = [False] * (n_requests * copies)

    def put(self, value: torch.Tensor) -> None:
        if value.dim() != 1:  # the prompt
            return
        step = []
        for r, t in enumerate(value.tolist()):
            step.append(None if self.ended[r] else t)
            self.ended[r] = self.ended[r] or t in self.eos
        self.on_step([[step[i * self.copies + (0 if self.copies == 1 else j)] for j in range(self.sequences)]
                      for i in range(self.n)])

    def end(self) -> None:
        pass


def plain_option_distributions(backend: HFBackend, prompts: PromptSet | list[list[int]], option_ids: list[int],
                               soft: SoftPrompts = None) -> Distributions:
    """Reference: each prompt as its full sequence (soft prompt included), full logits, one batch per row."""
    sequences = prompts.sequences if isinstance(prompts, PromptSet) else prompts
    P, uniform, ragged = _soft_rows(soft)
    rows = ragged or [None if uniform is None else uniform[c] for c in range(P)]
    probs, mass = [], []
    with torch.set_grad_enabled(any(r is not None and r.requires_grad for r in rows)):
        for c in range(P):
            p, m = _full_sequences(backend, sequences, option_ids, rows[c], logits_to_keep=0)
            probs.append(p)
            mass.append(m)
    return Distributions(torch.stack(probs), torch.stack(mass))


def _unshared_option_distributions(backend: HFBackend, prompts: PromptSet, option_ids: list[int],
                                   soft: SoftPrompts = None, progress: Callable[[int], None] | None = None) -> Distributions:
    """The plain path for `option_distributions` where prefix caches would be wrong (past a sliding window): every
    prompt as its full sequence, only the last position's logits, at most `backend.max_rows` prompts per forward pass."""
    sequences = prompts.sequences
    P, uniform, ragged = _soft_rows(soft)
    rows = ragged or [None if uniform is None else uniform[c] for c in range(P)]
    per = max(1, backend.max_rows)
    probs, mass = [[] for _ in range(P)], [[] for _ in range(P)]
    with torch.set_grad_enabled(any(r is not None and r.requires_grad for r in rows)):
        for i0 in range(0, len(sequences), per):
            for c in range(P):
                p, m = _full_sequences(backend, sequences[i0 : i0 + per], option_ids, rows[c], logits_to_keep=1)
                probs[c].append(p)
                mass[c].append(m)
            if progress is not None:
                progress(min(len(sequences), i0 + per))
    return Distributions(torch.stack([torch.cat(p) for p in probs]), torch.stack([torch.cat(m) for m in mass]))


def _full_sequences(backend: HFBackend, sequences: list[list[int]], option_ids: list[int], soft: torch.Tensor | None,
                    logits_to_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over `sequences`, left-padded, each behind `soft` ([n, H] or None): [I, K] and [I]."""
    dev, dtype = backend.device, backend.dtype
    emb = backend.model.get_input_embeddings()
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[0] * (width - len(s)) + s for s in sequences], device=dev)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=dev)
    x = emb(ids).to(dtype)
    if soft is not None:
        n = soft.shape[0]
        x = torch.cat([soft.to(device=dev, dtype=dtype).unsqueeze(0).expand(len(sequences), -1, -1), x], 1)
        # left padding must stay on the left: move the soft prompt after each row's padding
        x = torch.stack([torch.cat([x[i, n : n + width - len(s)], x[i, :n], x[i, n + width - len(s) :]]) for i, s in enumerate(sequences)])
        mask = torch.cat([torch.ones(len(sequences), n, dtype=mask.dtype, device=dev), mask], 1)
        mask = torch.stack([torch.cat([mask[i, n : n + width - len(s)], mask[i, :n], mask[i, n + width - len(s) :]]) for i, s in enumerate(sequences)])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if logits_to_keep:
        logits = backend.model(inputs_embeds=x, attention_mask=mask, position_ids=pos, logits_to_keep=logits_to_keep,
                               use_cache=False).logits
    else:
        logits = backend.model(inputs_embeds=x, attention_mask=mask, position_ids=pos).logits  # full logits
    return _read_options(logits[:, -1], option_ids)
