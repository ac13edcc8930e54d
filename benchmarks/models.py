"""The cross-model table, as in the Cultural Alignment Test: every model on the paper's four targets.

    python benchmarks/models.py [--models smollm2-135m,gemma3-270m] [--targets SA@hofstede-2023,US,CN,IN]
                                [--align-budget N] [--out runs/models] [--json benchmarks/models.json]

For each model (loaded once) and each target (Saudi Arabia on hofstede-2023; the United States, China
and India on hofstede-2015; `CODE` alone means hofstede-2015 except SA), the survey in logprob mode
(`Survey(...).result()`, index constants C = 0):
- the naive, persona and icl profiles and the uniform floor (`survey.uniform_result`: every item 1/K,
  no model call). The naive profile does not depend on the target, so it is measured once per model
  and scored against each target;
- their L1 to the target and their option mass (the uniform floor's is 1 by construction);
- Kendall tau-b per dimension across the targets, for each profile: do the profile's index scores rank
  the targets as Hofstede's published scores do? Computed by the experiment report's own definition
  (`experiments.report.kendall`). The naive profile and the uniform floor are the same for every
  target, so their tau is undefined ("n/a").

With `--align-budget N` (default 0: skip), one `align` per model on China (hofstede-2015) with the
default optimizer and settings at budget N, each in its own folder under `--out`; a finished run is
read back, an interrupted one resumes from its checkpoint, and a larger budget extends a finished one.
It reports the naive and aligned L1, aligned / naive and the aligned option mass.

A model that cannot be loaded (e.g. Gemma without its package) is skipped with one line; the others run.
Prints Markdown tables and writes the numbers as strict JSON (no NaN; null where undefined) to `--json`.
The survey part is recomputed on every run (about 3 s a survey for SmolLM2 on 2 CPU cores).
"""

import argparse
import gc
import json
import math
import re
import time
from dataclasses import replace
from pathlib import Path

import torch

from culturalign.alignment.config import AlignConfig
from culturalign.alignment.run import CHECKPOINT, Aligner
from culturalign.backends import load_backend
from culturalign.backends.loading import FALLBACK_TEMPLATE, FALLBACK_TEMPLATE_BOS, GEMMA, GEMMA_INSTALL
from culturalign.display import quiet_libraries
from culturalign.errors import CulturalignError
from culturalign.experiments.report import kendall
from culturalign.measure.instrument import load_instrument
from culturalign.measure.survey import Survey, uniform_result
from culturalign.measure.targets import load_target

TARGETS = "SA@hofstede-2023,US,CN,IN"
DEFAULT_SET = {"SA": "hofstede-2023"}  # the 2015 release has only Saudi Arabia's LTO and IVR
PROFILES = ("naive", "persona", "icl", "uniform")
ALIGN_TARGET = "CN@hofstede-2015"
KNOWN = {  # what the packaged models are; anything else is described by its template alone
    "smollm2-135m": "SmolLM2-135M-Instruct: instruction-tuned (Llama architecture)",
    GEMMA: "Gemma 3 270M: a base model, not instruction-tuned",
}


def parse_target(spec: str):
    code, _, set_name = spec.strip().partition("@")
    return load_target(code, set_name or DEFAULT_SET.get(code.upper(), "hofstede-2015"))


def template_of(backend) -> str:
    t = getattr(backend.tokenizer, "chat_template", None)
    if t == FALLBACK_TEMPLATE_BOS:
        return "fallback with BOS"
    if t == FALLBACK_TEMPLATE:
        return "fallback"
    return "own"


def describe(name: str, template: str) -> str:
    what = KNOWN.get(name)
    prefix = f"{what}; " if what else ""
    if template == "own":
        return f"{prefix}prompts use its own chat template"
    return (f"{prefix}no chat template of its own, so prompts use the plain 'User:/Assistant:' fallback template"
            + (", with BOS first" if template == "fallback with BOS" else "")
            + (": it answers as a base model does (watch the option mass)" if name == GEMMA else ""))


def clean(x):
    """Strict JSON: non-finite floats become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def key_of(t) -> str:
    return f"{t.iso2 or t.code}-{t.set_name}"


def tau_rows(targets, measured, dims) -> list[dict]:
    """Rows in the experiment report's shape, so that `report.kendall` computes tau by its one definition:
    naive and icl as its baselines, persona and uniform as 'optimizers' whose 'aligned' scores are theirs."""
    rows = []
    for t in targets:
        m = measured[key_of(t)]
        base = {"status": "finished", "code": t.code, "set": t.set_name, "country": t.name,
                **{f"err_{d}": None for d in dims}, **{f"target_{d}": t.scores.get(d) for d in dims},
                **{f"{p}_{d}": m[p]["indices"][d] for p in ("naive", "icl") for d in dims}}
        for p in ("persona", "uniform"):
            rows.append({**base, "optimizer": p, "aligned_l1": m[p]["l1"],
                         **{f"aligned_{d}": m[p]["indices"][d] for d in dims}})
    return rows


def profile_json(res) -> dict:
    return {"l1": res.l1, "l1_dims": res.l1_dims, "option_mass": res.mean_option_mass, "indices": res.indices,
            "seconds": res.extra.get("seconds"), "tokens_processed": res.extra.get("tokens_processed")}


def survey_model(backend, inst, targets) -> dict:
    naive = Survey(backend, inst, "naive").result()  # no target: the naive prompt does not depend on it
    print(f"  naive: option mass {naive.mean_option_mass:.3f} ({naive.extra['seconds']:.1f} s)", flush=True)
    out = {}
    for t in targets:
        row = {"naive": profile_json(replace(naive, target=t))}
        for p in ("persona", "icl"):
            row[p] = profile_json(Survey(backend, inst, p, t).result())
        row["uniform"] = profile_json(uniform_result(inst, t))
        out[key_of(t)] = row
        print(f"  {t.name} ({t.set_name}): L1 " + ", ".join(f"{p} {row[p]['l1']:.1f}" for p in PROFILES), flush=True)
    return out


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")


def align_model(backend, inst, budget: int, out_root: Path) -> dict:
    target = parse_target(ALIGN_TARGET)
    cfg = AlignConfig(budget=budget)
    out = out_root / f"{slug(backend.name)}-{key_of(target)}-{cfg.optimizer}-s{cfg.seed}"
    t0 = time.perf_counter()

    def progress(i):
        print(f"  align {key_of(target)} {i['evaluations']:4d}/{i['budget']} evals  best {i['best_loss']:.1f}",
              flush=True)

    aligner = Aligner(backend, inst, target, cfg, out, resume=(out / CHECKPOINT).exists(), progress=progress)
    if aligner.nothing_to_do and (out / "result.json").exists():
        result = json.loads((out / "result.json").read_text())
        how = "read back"
    else:
        how = "run" if not aligner.state else "extended" if aligner.state.get("finished") else "resumed"
        result = aligner.run()
    p = result["profiles"]
    naive, aligned = p["naive"]["l1"], p["aligned"]["l1"]
    return {"folder": str(out), "how": how, "target": key_of(target), "optimizer": cfg.optimizer, "budget": budget,
            "seed": cfg.seed, "evaluations": result["evaluations"], "naive_l1": naive, "aligned_l1": aligned,
            "ratio": aligned / naive if naive else None, "aligned_option_mass": p["aligned"]["mean_option_mass"],
            "search_seconds": result.get("search_seconds"), "wall_seconds": round(time.perf_counter() - t0, 1)}


def f(x, nd=1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def print_tables(report: dict, targets, dims) -> None:
    ok = {m: r for m, r in report["models"].items() if r["status"] == "measured"}
    print("\n## Models\n")
    for m, r in report["models"].items():
        print(f"- `{m}`: " + (f"{r['description']}; {r['dtype']} on {r['device']}" if r["status"] == "measured"
                              else f"skipped: {r['reason']}"))
    if not ok:
        return
    print("\n## L1 to the target (lower is better), logprob mode, C = 0\n")
    print("| model | target | set | naive | persona | icl | uniform floor |")
    print("|---|---|---|---:|---:|---:|---:|")
    for m, r in ok.items():
        for t in targets:
            row = r["profiles"][key_of(t)]
            print(f"| {m} | {t.name} | {t.set_name} | " + " | ".join(f(row[p]["l1"]) for p in PROFILES) + " |")
    print("\n## Option mass (probability on the answer codes; the uniform floor's is 1)\n")
    print("| model | target | naive | persona | icl |")
    print("|---|---|---:|---:|---:|")
    for m, r in ok.items():
        for t in targets:
            row = r["profiles"][key_of(t)]
            print(f"| {m} | {t.name} | " + " | ".join(f(row[p]["option_mass"], 3) for p in PROFILES[:3]) + " |")
    print("\n## Kendall τ-b per dimension across the targets (p-value)\n")
    if len(targets) < 3:
        print(f"Not computed: {len(targets)} target(s); Kendall τ needs at least 3.")
    else:
        print("n/a: the naive profile and the uniform floor are the same for every target, so their τ is undefined"
              " (likewise a profile whose scores on a dimension do not vary).\n")
        print("| model | dimension | " + " | ".join(PROFILES) + " |")
        print("|---|---|" + "---:|" * len(PROFILES))
        for m, r in ok.items():
            for d in dims:
                cells = [r["kendall"][d][p] for p in PROFILES]
                print(f"| {m} | {d} | " + " | ".join("n/a" if e["tau"] is None else f"{e['tau']:+.2f} ({e['p']:.2f})"
                                                      for e in cells) + " |")
    aligned = {m: r["align"] for m, r in ok.items() if r.get("align")}
    if aligned:
        print("\n## One align per model on China (hofstede-2015), default optimizer and settings\n")
        print("| model | optimizer | budget | evaluations | naive L1 | aligned L1 | aligned / naive "
              "| aligned option mass | search seconds |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for m, a in aligned.items():
            if "error" in a:
                print(f"| {m} | - | {a['budget']} | - | - | - | - | - | failed: {a['error']} |")
                continue
            print(f"| {m} | {a['optimizer']} | {a['budget']} | {a['evaluations']} | {f(a['naive_l1'])} | "
                  f"{f(a['aligned_l1'])} | {f(a['ratio'], 2)} | {f(a['aligned_option_mass'], 3)} | "
                  f"{f(a['search_seconds'], 0)} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=f"smollm2-135m,{GEMMA}", help="comma-separated --model values")
    ap.add_argument("--targets", default=TARGETS, help="comma-separated CODE or CODE@SET")
    ap.add_argument("--align-budget", type=int, default=0, help="evaluations of one align per model on China (0: skip)")
    ap.add_argument("--out", default="runs/models", help="folder of the align runs")
    ap.add_argument("--json", default=str(Path(__file__).with_name("models.json")))
    args = ap.parse_args()
    if args.align_budget < 0:
        ap.error("--align-budget must be >= 0")
    quiet_libraries()
    try:
        targets = [parse_target(s) for s in args.targets.split(",") if s.strip()]
    except CulturalignError as e:
        ap.error(str(e))
    if args.align_budget:
        try:
            AlignConfig(budget=args.align_budget)
        except CulturalignError as e:
            ap.error(f"--align-budget {args.align_budget}: {e}")
    inst = load_instrument()
    dims = list(inst.dims)
    report = {"instrument": inst.id, "mode": "logprob", "constants": inst.constants(None),
              "targets": [t.to_json() for t in targets], "align_budget": args.align_budget,
              "threads": torch.get_num_threads(), "models": {}}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t0 = time.perf_counter()
        try:
            backend = load_backend(name)
        except CulturalignError as e:
            reason = str(e)
            if name == GEMMA and "not installed" in reason:
                reason = f"Gemma 3 270M is not installed; install it with `{GEMMA_INSTALL}`"
            print(f"skip {name}: {reason}", flush=True)
            report["models"][name] = {"status": "skipped", "reason": reason}
            continue
        template = template_of(backend)
        entry = {"status": "measured", "description": describe(name, template), "chat_template": template,
                 "device": str(backend.device), "dtype": str(backend.dtype).replace("torch.", ""),
                 "load_seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name}: {entry['description']} (loaded in {entry['load_seconds']} s)", flush=True)
        entry["profiles"] = survey_model(backend, inst, targets)
        tau = kendall(tau_rows(targets, entry["profiles"], dims))
        entry["kendall"] = {d: {p: tau[d][p] for p in PROFILES} for d in dims}
        if args.align_budget:
            try:
                entry["align"] = a = align_model(backend, inst, args.align_budget, Path(args.out))
                print(f"  align {a['target']}: {a['how']} ({a['folder']}), aligned L1 {a['aligned_l1']:.1f}",
                      flush=True)
            except CulturalignError as e:
                print(f"  align failed: {e}", flush=True)
                entry["align"] = {"budget": args.align_budget, "error": str(e)}
        report["models"][name] = entry
        del backend
        gc.collect()
    print_tables(report, targets, dims)
    Path(args.json).write_text(json.dumps(clean(report), indent=1, allow_nan=False) + "\n")
    print(f"\n-> {args.json}")


if __name__ == "__main__":
    main()
