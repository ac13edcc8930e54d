"""How an item is put to the model: chat messages per profile, rendered to token ids.

Each item becomes one user turn: the section instruction, the numbered answer options, the item,
and "Answer with the number of one option". The instruction comes before the item text. The assistant turn is pre-filled with `Answer:` so the
very next token is the answer code; on SmolLM2-135M this puts ~98% of the next-token probability on
the five option tokens (~55% without the prefill). Options come before the item text so that all
items of a section share a long token prefix, which the evaluator computes once.

Profiles: `naive` (the item alone), `persona` (answer as a typical person from the target, CAT
style, in the system turn), `icl` (persona plus the target's published scores in words: the same
information the optimizer gets).
"""

from __future__ import annotations

from culturalign.errors import CulturalignError
from culturalign.measure.instrument import Instrument, Item
from culturalign.measure.targets import Target

PROFILES = ("naive", "persona", "icl")
ANSWER_PREFIX = "Answer:"
DIM_WORDS = {
    "PDI": "power distance",
    "IDV": "individualism",
    "MAS": "masculinity",
    "UAI": "uncertainty avoidance",
    "LTO": "long-term orientation",
    "IVR": "indulgence",
}


def level(score: float) -> str:
    return "low" if score < 35 else "high" if score > 65 else "moderate"


def system_text(profile: str, target: Target | None) -> str | None:
    if profile not in PROFILES:
        raise CulturalignError(f"unknown prompt {profile!r}; expected one of {', '.join(PROFILES)}")
    if profile == "naive":
        return None
    if target is None:
        raise CulturalignError(f"prompt {profile!r} needs a target country (--country or --target-file)")
    text = (
        f"You are a typical person from {target.name}. "
        f"Answer the following questionnaire item as a typical person from {target.name} would."
    )
    if profile == "icl":
        parts = [
            f"{DIM_WORDS.get(d, d)} {v:g} ({level(v)})" for d, v in target.scores.items()
        ]
        text += (
            f" For reference, the published Hofstede cultural dimension scores of {target.name} "
            f"(0-100 scale) are: {', '.join(parts)}. Let your answer reflect these cultural values."
        )
    return text


def user_text(item: Item, codes: tuple[int, ...]) -> str:
    """The item's user turn. Options are listed in their presented order (`Item.presented_options`), each
    labelled with the answer codes in sequence; a reordered item's answers are mapped back by the survey."""
    options = "\n".join(f"{c}. {o}" for c, o in zip(codes, item.presented_options))
    head = f"{item.section}\n" if item.section else ""
    return (
        f"{head}Answer options:\n{options}\n"
        f"Answer with the number of one option ({codes[0]}-{codes[-1]}).\n\n{item.text}"
    )


def render(tokenizer, system: str | None, user: str, answer_prefix: str = ANSWER_PREFIX) -> str:
    """Chat-template text ending in the assistant's pre-filled answer prefix."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception:  # templates that reject a system role: fold it into the user turn
        if not system:
            raise
        msgs = [{"role": "user", "content": f"{system}\n\n{user}"}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return text + answer_prefix


def option_token_ids(tokenizer, text: str, codes: tuple[int, ...]) -> tuple[list[int], str]:
    """Token ids of the answer codes as the next token after the prompt, and the text that ends the prompt.

    Tries, in order: `text` + " 1" as one token (Llama-3 style), `text + " "` then "1" (tokenizers
    that split the space off, as SmolLM2's does), and `text` + "1". A variant is accepted only if,
    for every code, the prompt's tokens are unchanged and the code adds exactly one token.
    """
    for tail, sep in (("", " "), (" ", ""), ("", "")):
        base = tokenizer(text + tail, add_special_tokens=False)["input_ids"]
        ids = []
        for c in codes:
            full = tokenizer(text + tail + sep + str(c), add_special_tokens=False)["input_ids"]
            if len(full) != len(base) + 1 or full[: len(base)] != base:
                break
            ids.append(full[-1])
        else:
            if len(set(ids)) == len(codes):
                return ids, tail
    raise CulturalignError(
        "this tokenizer does not encode the answer codes as single tokens after the answer prefix; "
        "logprob mode needs that (try --mode sample)"
    )


def encode_prompts(tokenizer, items: list[Item], codes: tuple[int, ...], system: str | None,
                   answer_prefix: str = ANSWER_PREFIX) -> tuple[list[list[int]], list[int]]:
    """Token ids of each item's full prompt (ending where the answer code goes) and the option token ids."""
    texts = [render(tokenizer, system, user_text(it, codes), answer_prefix) for it in items]
    option_ids, tail = option_token_ids(tokenizer, texts[0], codes)
    return [tokenizer(t + tail, add_special_tokens=False)["input_ids"] for t in texts], option_ids


def encode_items(tokenizer, instrument: Instrument, profile: str, target: Target | None,
                 answer_prefix: str = ANSWER_PREFIX) -> tuple[list[list[int]], list[int]]:
    """Token ids of every item's full prompt (ending where the answer code goes) and the option ids."""
    return encode_prompts(tokenizer, instrument.items, instrument.codes, system_text(profile, target), answer_prefix)
