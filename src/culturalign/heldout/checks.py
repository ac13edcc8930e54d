"""All held-out checks of one soft prompt, each measured without and with it: `run_heldout`, `heldout_markdown`.

These test whether an aligned soft prompt learned the culture or the questionnaire (paper A claims
soft-prompt DE "mitigates overfitting"):

1. **Paraphrased items.** The L1 to the target on the instrument the prompt was aligned on, and on
   every built-in paraphrase of it (`vsm2013-para-a`, `-b`: all 24 items and the section
   instructions reworded, the same scales and formulas). Each is measured with the prompt profile
   alone ("without") and with the soft prompt added ("with").
2. **Reversed options.** The same on the instrument with every item's options listed in reverse order
   (`Instrument.reversed`), the answers mapped back to the original codes before scoring.

Every survey is asked in the option order the prompt was aligned with (`order`, saved in its
`culturalign.json`): `forward` as above; `reversed` asks the original and the paraphrases with
reversed options, and the reversed-options check asks the forward order (the other one); `both`
asks and averages both orders everywhere, so there is no other order left to check and that row is
left out.
3. **Multiple-choice knowledge** (`mcq.py`): accuracy on cultural-knowledge questions.
4. **Capability** (`perplexity.py`): perplexity of a neutral text.

**Share of the L1 gain kept** on a variant v:

    kept = (L1_without(v) - L1_with(v)) / (L1_without(original) - L1_with(original))

1 means the variant improves exactly as much as the original; 0 means none of the gain carries over;
below 0 means the prompt makes the variant worse; above 1 means it improves more than the original.
When the original gain is <= 0 (the prompt did not improve the instrument it was aligned on) the share
is undefined: `kept` is None and `kept_note` says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from culturalign.errors import CulturalignError

SCHEMA = "culturalign.heldout/1"
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _profile(result) -> dict:
    return {"l1": result.l1, "indices": result.indices, "mean_option_mass": result.mean_option_mass}


def _survey_pair(backend, instrument, prompt, target, constants, soft, stage: str, progress: Progress | None,
                 order: str = "forward") -> dict:
    from culturalign.measure.survey import Survey, uniform_result

    s = Survey(backend, instrument, prompt, target, constants, order=order)
    n = len(instrument.items)
    total = n * (1 if soft is None else 2)

    def tick(offset):
        return None if progress is None else (lambda k: progress(stage, offset + k, total))

    without = s.result(None, "without", progress=tick(0))
    with_ = s.result(soft, "with", progress=tick(n)) if soft is not None else None
    out = {"instrument": instrument.id, "order": order, "without": _profile(without), "with": None if with_ is None else _profile(with_)}
    out["gain"] = None if with_ is None else without.l1 - with_.l1
    floor = uniform_result(instrument, target, s.constants)
    out["uniform"] = {"l1": floor.l1, "indices": floor.indices}  # the floor on this instrument: every item 1/K, no model
    return out


def kept_share(original_gain: float | None, variant_gain: float | None) -> tuple[float | None, str | None]:
    """(share of the original's L1 gain kept on a variant, or None; a note when None)."""
    if original_gain is None or variant_gain is None:
        return None, "no soft prompt"
    if original_gain <= 0:
        return None, f"undefined: the soft prompt did not lower the L1 on the original (gain {original_gain:.1f})"
    return variant_gain / original_gain, None


def run_heldout(backend, soft_prompt, target, *, prompt: str = "naive", constants: dict[str, float] | None = None,
                mcq_file=None, progress: Progress | None = None, instrument: str = "vsm2013", text_file=None,
                order: str = "forward") -> dict:
    """Every held-out check of `soft_prompt` (a `SoftPrompt`, or None for the baselines alone) against `target`.

    `prompt`: the prompt profile the soft prompt goes with (its `culturalign.json` says which); "without"
    is that profile alone. `constants`: index constants C (default: the instrument's). `mcq_file`: a
    question file (default: the shipped set); `text_file`: the perplexity text (default: the shipped
    neutral text). `instrument`: the instrument the prompt was aligned on; its built-in paraphrases and
    its reversed form are the variants. `order`: the option order the prompt was aligned with (forward,
    reversed or both; see the module docstring). `progress(stage, done, total)` reports long work.
    Returns a JSON-safe dict (schema `culturalign.heldout/1`, see the README section "Held-out checks").
    """
    from culturalign import __version__
    from culturalign.heldout.mcq import load_mcq, run_mcq
    from culturalign.heldout.perplexity import load_text, perplexity
    from culturalign.measure.instrument import load_instrument, paraphrase_variants
    from culturalign.measure.survey import check_order

    if target is None:
        raise CulturalignError("the held-out checks need a target (the country the soft prompt was aligned to)")
    t0 = time.perf_counter()
    soft = None
    if soft_prompt is not None:
        soft_prompt.check_width(backend.hidden_size)
        soft = soft_prompt.embeddings
    original = load_instrument(instrument)
    check_order(order, original)
    constants = original.constants(constants)
    qs = load_mcq(mcq_file)  # bad files fail before any model work
    text, text_source = load_text(text_file)

    def stage(name, asked):
        return name if order == "forward" else f"{name} ({asked} order)"

    base = _survey_pair(backend, original, prompt, target, constants, soft, stage(original.id, order), progress, order)
    variants = [(stage(v, order), "paraphrase", load_instrument(v), order) for v in paraphrase_variants(original.id)]
    if order == "forward":
        variants.append((f"{original.id}-reversed", "reversed options", original.reversed(), "forward"))
    elif order == "reversed":  # aligned on reversed options: the other order is the forward one
        variants.append((stage(original.id, "forward"), "reversed options", original, "forward"))
    rows = []
    for name, kind, inst, asked in variants:
        r = _survey_pair(backend, inst, prompt, target, constants, soft, name, progress, asked)
        r["kind"] = kind
        r["kept"], r["kept_note"] = kept_share(base["gain"], r["gain"])
        rows.append(r)

    mcq = run_mcq(backend, qs, soft, target,
                  progress=None if progress is None else (lambda n: progress("mcq", n, len(qs))))
    mcq.pop("items")
    softs = [None] if soft is None else [None, soft]
    ppl = perplexity(backend, text, softs,
                     progress=None if progress is None else (lambda n: progress("perplexity", n, len(softs))))
    capability = {"source": text_source, "tokens": ppl[0]["tokens"], "without": ppl[0]["perplexity"],
                  "with": ppl[1]["perplexity"] if soft is not None else None,
                  "nll_without": ppl[0]["nll"], "nll_with": ppl[1]["nll"] if soft is not None else None}
    capability["ratio"] = None if soft is None else capability["with"] / capability["without"]
    return {
        "schema": SCHEMA, "culturalign_version": __version__, "model": backend.name,
        "soft_prompt": None if soft_prompt is None else {**(soft_prompt.source or {"path": None}),
                                                          "n_tokens": soft_prompt.n_tokens},
        "target": target.to_json(), "prompt": prompt, "order": order, "constants": constants,
        "survey": {"original": base, "variants": rows},
        "mcq": mcq, "perplexity": capability,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# ---- presentation -----------------------------------------------------------------------------------------

def _num(x, nd: int) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _change(a, b, nd: int) -> str:
    return "-" if a is None or b is None else f"{b - a:+.{nd}f}"


def _uniform(v: dict) -> str:
    u = v.get("uniform")  # absent in results written before the floor was reported
    return "" if u is None else _num(u["l1"], 1)


def heldout_rows(result: dict) -> list[tuple[str, str, str, str, str, str]]:
    """(check, without, with, change, kept, uniform) rows shared by the terminal table and the Markdown table."""
    rows = []
    base = result["survey"]["original"]
    orders = result.get("order", "forward") != "forward"  # name each row's option order when not the default

    def name(r):
        order = r.get("order", "forward")
        return r["instrument"] + ((", both orders" if order == "both" else f", {order} order") if orders else "")

    w, s = base["without"]["l1"], (base["with"] or {}).get("l1")
    rows.append((f"L1 {name(base)} (aligned on)", _num(w, 1), _num(s, 1), _change(w, s, 1), "", _uniform(base)))
    for v in result["survey"]["variants"]:
        w, s = v["without"]["l1"], (v["with"] or {}).get("l1")
        kept = _num(v["kept"], 2) if v["kept"] is not None else ("n/a" if v["with"] is not None else "")
        rows.append((f"L1 {name(v)} ({v['kind']})", _num(w, 1), _num(s, 1), _change(w, s, 1), kept, _uniform(v)))
    m = result["mcq"]
    mw, ms = m["without"], m["with"]
    rows.append((f"MCQ accuracy ({m['questions']} questions; chance {m['chance']:.2f})", _num(mw["accuracy"], 3),
                 _num(ms and ms["accuracy"], 3), _change(mw["accuracy"], ms and ms["accuracy"], 3), "", ""))
    tc = m.get("target_country")
    if tc:
        a, b = tc["without"]["accuracy"], tc["with"] and tc["with"]["accuracy"]
        rows.append((f"MCQ accuracy, {'/'.join(tc['countries'])} ({tc['n']} questions)", _num(a, 3), _num(b, 3),
                     _change(a, b, 3), "", ""))
    rows.append(("MCQ mean P(correct answer)", _num(mw["mean_p_correct"], 3), _num(ms and ms["mean_p_correct"], 3),
                 _change(mw["mean_p_correct"], ms and ms["mean_p_correct"], 3), "", ""))
    rows.append(("MCQ answer prior (always the favourite letter)", f"{mw['prior_accuracy']:.3f} ({mw['prior_letter']})",
                 "-" if ms is None else f"{ms['prior_accuracy']:.3f} ({ms['prior_letter']})", "", "", ""))
    p = result["perplexity"]
    ratio = "-" if p["ratio"] is None else f"x{p['ratio']:.2f}"
    rows.append((f"perplexity, neutral text ({p['tokens']} tokens)", _num(p["without"], 2), _num(p["with"], 2), ratio,
                 "", ""))
    return rows


HEADERS = ("check", "without", "with soft prompt", "change", "gain kept", "uniform")


def prompt_name(sp: dict | None, code: bool = True) -> str:
    if sp is None:
        return "no soft prompt"
    if sp.get("path"):
        return f"`{sp['path']}`" if code else sp["path"]
    return f"a soft prompt of {sp['n_tokens']} tokens"


def order_words(result: dict) -> str:
    order = result.get("order", "forward")
    if order == "forward":
        return ""
    if order == "both":
        return ", both option orders averaged (no reversed-options check: both orders are in every row)"
    return ", options in reversed order"


def heldout_markdown(result: dict) -> str:
    """The held-out checks as a Markdown table, with a line naming the soft prompt and the target."""
    t = result["target"]
    lines = [f"Held-out checks of {prompt_name(result.get('soft_prompt'))} on {result['model']}, "
             f"target {t['name']} ({t.get('set') or 'own file'}), prompt profile {result['prompt']}"
             f"{order_words(result)}.", "",
             "| " + " | ".join(HEADERS) + " |", "|---|" + "---:|" * (len(HEADERS) - 1)]
    for row in heldout_rows(result):
        lines.append("| " + " | ".join(row) + " |")
    notes = {v["kept_note"] for v in result["survey"]["variants"] if v["kept"] is None and v["with"] is not None}
    lines += ["", "change = with - without (ratio with / without for perplexity); gain kept = (L1 without - L1 with) "
                  "on the variant / the same on the original; uniform = the L1 of an answerer that spreads every item "
                  "evenly over its options (no model), the floor."]
    lines += [f"gain kept {n}." for n in sorted(notes)]
    return "\n".join(lines) + "\n"
