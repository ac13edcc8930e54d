"""Every CLI command against bad inputs, as a new user would type them: one table, one rule.

For each case the command must exit non-zero with exactly one line on stderr, starting with
"error:" and naming the input (the needle); no traceback; and the working folder must be left
exactly as it was (no file half-written or left behind). New commands add their rows here.

Cases run in-process through `culturalign.cli.run`, in a fresh folder with the inputs the case
needs, on the tiny random model built in conftest (saved to a folder, as a user's model would be).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from culturalign.cli import run

HIDDEN = 32  # the tiny model's hidden size (conftest)
ALIGN = ["align", "--model", "{M}", "--country", "CN", "--optimizer", "de", "--budget", "12", "--popsize", "6", "--tokens", "2", "--dim", "4"]
SURVEY = ["survey", "--model", "{M}"]


# ---- inputs the cases need, created in the case's folder -------------------------------------------------

def soft_prompt(folder: Path, tensor: torch.Tensor, config: dict | None = None) -> None:
    folder.mkdir(parents=True)
    save_file({"prompt_embeddings": tensor}, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": tensor.shape[0],
           "token_dim": tensor.shape[1] if tensor.dim() == 2 else None}
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def model_copy(tiny_dir: Path, folder: Path, drop=(), replace: dict | None = None) -> None:
    folder.mkdir()
    for f in Path(tiny_dir).iterdir():
        if f.name not in drop:
            (folder / f.name).write_bytes(f.read_bytes())
    for name, data in (replace or {}).items():
        (folder / name).write_bytes(data(folder / name) if callable(data) else data)


def checkpoint(folder: Path, data) -> None:
    folder.mkdir()
    (folder / "checkpoint.json").write_text(data if isinstance(data, str) else json.dumps(data))


def valid_checkpoint(finished: bool) -> dict:
    config = {"optimizer": "de", "tokens": 2, "dim": 4, "seed": 0, "projection_seed": None, "init": "text",
              "init_text": None, "prompt": "naive", "popsize": 6, "mutation": [0.5, 1.0], "crossover": 0.9,
              "strategy": "best1bin", "bound": 1.0, "sigma": 40.0, "lr": 0.02, "mass_floor": 0.5, "mass_weight": 100.0,
              "constants": {d: 0.0 for d in ("PDI", "IDV", "MAS", "UAI", "LTO", "IVR")}}
    return {"fingerprint": {"config": config, "model": "m", "target": {"name": "China", "scores": {"PDI": 80}},
                            "instrument": "vsm2013"},
            "budget": 12, "finished": finished, "optimizer_state": {}, "history": [{"evaluations": 12}]}


def registry(w: Path, m: Path, name: str = "reg", hidden: int = HIDDEN, model: str | None = None, drop: str | None = None):
    """A registry of random experts for the tiny model saved at `m` (its name is the folder path)."""
    from types import SimpleNamespace

    from conftest import make_registry

    folder = make_registry(w / name, SimpleNamespace(name=str(m), hidden_size=hidden), model=model)
    if drop:
        import shutil

        shutil.rmtree(folder / drop)
    return folder


EXPERIMENT = ["experiment", "{W}/g.yaml", "--model", "{M}", "--out", "{W}/e"]
GRID = "grid:\n  targets: [CN]\n  optimizers: [de]\n  budget: 12\nsettings: {tokens: 2, dim: 2, sigma: 2.0}\n"


def started_experiment(w: Path, m: Path) -> None:
    """An experiment folder whose first cell has a checkpoint, started from g.yaml with sigma 2; g.yaml now says 3."""
    from culturalign.experiments import load_spec
    from culturalign.experiments.runner import CELLS_DIR, SCHEMA, SPEC_FILE

    (w / "g.yaml").write_text(GRID)
    exp = load_spec(w / "g.yaml", model=str(m))
    (w / "e" / CELLS_DIR).mkdir(parents=True)
    (w / "e" / SPEC_FILE).write_text(json.dumps({"schema": SCHEMA, "spec": exp.normalised()}))
    checkpoint(w / "e" / CELLS_DIR / exp.cells[0].name, valid_checkpoint(False))
    (w / "g.yaml").write_text(GRID.replace("sigma: 2.0", "sigma: 3.0"))


def csv_file(name: str, text: str | bytes):
    return lambda w, m: (w / name).write_bytes(text if isinstance(text, bytes) else text.encode())


def truncated(path: Path) -> bytes:
    return path.read_bytes()[:200]


# (id, argv, setup(workspace, tiny_dir), needle that the error line must contain)
CASES = [
    # countries
    ("countries-unknown-set", ["countries", "--targets", "nope"], None, "'nope'"),
    ("countries-unknown-option", ["countries", "--bogus"], None, "--bogus"),
    ("no-such-command", ["surevy"], None, "surevy"),
    # survey: output paths, checked before any work
    ("survey-json-proc", [*SURVEY, "--json", "/proc/x.json"], None, "/proc"),
    ("survey-json-dir", [*SURVEY, "--json", "{W}/outdir"], lambda w, m: (w / "outdir").mkdir(), "is a folder"),
    ("survey-json-under-file", [*SURVEY, "--json", "{W}/file.txt/sub.json"], csv_file("file.txt", "x"), "file.txt"),
    # survey: targets
    ("survey-empty-country", [*SURVEY, "--country", ""], None, "--country ''"),
    ("survey-unknown-country", [*SURVEY, "--country", "Atlantis"], None, "Atlantis"),
    ("survey-unknown-set", [*SURVEY, "--country", "CN", "--targets", "hofstede-1999"], None, "hofstede-1999"),
    ("survey-target-file-missing-brackets", [*SURVEY, "--target-file", "{W}/my[final].csv"], None, "my[final].csv"),
    ("survey-target-file-dir", [*SURVEY, "--target-file", "{W}/tdir"], lambda w, m: (w / "tdir").mkdir(), "is a folder"),
    ("survey-target-huge-field", [*SURVEY, "--target-file", "{W}/t.csv"],
     csv_file("t.csv", "name,PDI\nX," + "9" * 140_000 + "\n"), "t.csv"),
    ("survey-target-lowercase-nan", [*SURVEY, "--target-file", "{W}/t.csv"], csv_file("t.csv", "name,PDI,IDV\nX,nan,3\n"), "'nan'"),
    ("survey-target-NaN", [*SURVEY, "--target-file", "{W}/t.csv"], csv_file("t.csv", "name,PDI,IDV\nX,NaN,3\n"), "'NaN'"),
    ("survey-target-inf", [*SURVEY, "--target-file", "{W}/t.csv"], csv_file("t.csv", "name,PDI\nX,inf\n"), "'inf'"),
    ("survey-target-dup-column", [*SURVEY, "--target-file", "{W}/t.csv"], csv_file("t.csv", "name,PDI,PDI\nX,1,2\n"), "'pdi'"),
    ("survey-target-short-row", [*SURVEY, "--target-file", "{W}/t.csv"], csv_file("t.csv", "name,PDI,IDV\nX,1\n"), "row 1"),
    ("survey-target-extra-value", [*SURVEY, "--target-file", "{W}/t.csv"], csv_file("t.csv", "name,PDI\nX,1,2\n"), "row 1"),
    ("survey-target-no-name", [*SURVEY, "--target-file", "{W}/t.csv"], csv_file("t.csv", "PDI,IDV\n1,2\n"), "'name'"),
    ("survey-target-empty", [*SURVEY, "--target-file", "{W}/t.csv"], csv_file("t.csv", ""), "empty"),
    ("survey-target-not-utf8", [*SURVEY, "--target-file", "{W}/t.csv"], csv_file("t.csv", b"name,PDI\n\xff\xfe,1\n"), "UTF-8"),
    ("survey-target-bad-json", [*SURVEY, "--target-file", "{W}/t.json"], csv_file("t.json", "{nope"), "JSON"),
    ("survey-target-json-not-rows", [*SURVEY, "--target-file", "{W}/t.json"], csv_file("t.json", "[1, 2]"), "row 1"),
    ("survey-target-too-large", [*SURVEY, "--target-file", "{W}/t.csv"], csv_file("t.csv", "name,PDI\nX,5000\n"), "'5000'"),
    ("survey-target-no-scores", [*SURVEY, "--target-file", "{W}/t.csv"], csv_file("t.csv", "name,PDI\nX,\n"), "no scores"),
    ("survey-target-unknown-field", [*SURVEY, "--target-file", "{W}/t.csv"], csv_file("t.csv", "name,PDI,XYZ\nX,1,2\n"), "'xyz'"),
    ("survey-target-two-rows", [*SURVEY, "--target-file", "{W}/t.csv"], csv_file("t.csv", "name,PDI\nX,1\nY,2\n"), "--country"),
    ("survey-targets-and-file", [*SURVEY, "--target-file", "{W}/t.csv", "--targets", "hofstede-2023"],
     csv_file("t.csv", "name,PDI\nX,1\n"), "--targets"),
    # survey: constants
    ("survey-constant-nan", [*SURVEY, "--constant", "PDI=nan"], None, "PDI=nan"),
    ("survey-constant-inf", [*SURVEY, "--constant", "IDV=inf"], None, "IDV=inf"),
    ("survey-constant-no-value", [*SURVEY, "--constant", "PDI"], None, "'PDI'"),
    ("survey-constant-unknown-index", [*SURVEY, "--constant", "XYZ=5"], None, "XYZ"),
    ("survey-constant-twice", [*SURVEY, "--constant", "PDI=1", "--constant", "pdi=2"], None, "pdi=2"),
    # survey: prompts, modes and sampling options
    ("survey-prompt-twice", [*SURVEY, "--prompt", "naive", "--prompt", "naive"], None, "'naive'"),
    ("survey-prompt-unknown", [*SURVEY, "--prompt", "bogus"], None, "'bogus'"),
    ("survey-persona-needs-country", [*SURVEY, "--prompt", "persona"], None, "persona"),
    ("survey-mode-unknown", [*SURVEY, "--mode", "greedy"], None, "'greedy'"),
    ("survey-temperature-in-logprob", [*SURVEY, "--temperature", "0.5"], None, "--temperature"),
    ("survey-samples-in-logprob", [*SURVEY, "--samples", "5"], None, "--samples"),
    ("survey-seed-in-logprob", [*SURVEY, "--seed", "3"], None, "--seed"),
    ("survey-negative-temperature", [*SURVEY, "--mode", "sample", "--temperature", "-1"], None, "--temperature"),
    ("survey-nan-temperature", [*SURVEY, "--mode", "sample", "--temperature", "nan"], None, "--temperature"),
    ("survey-zero-samples", [*SURVEY, "--mode", "sample", "--samples", "0"], None, "--samples"),
    ("survey-samples-not-int", [*SURVEY, "--samples", "abc"], None, "--samples"),
    ("survey-unknown-option", [*SURVEY, "--popsize", "3"], None, "--popsize"),
    # survey: option order
    ("survey-order-unknown", [*SURVEY, "--order", "sideways"], None, "--order 'sideways'"),
    ("survey-order-reversed-instrument", [*SURVEY, "--instrument", "vsm2013-reversed", "--order", "both"], None,
     "'vsm2013-reversed' already presents its options in another order"),
    ("survey-order-no-reversed-form", [*SURVEY, "--instrument", "{W}/i.json", "--order", "reversed"],
     csv_file("i.json", '{"schema": "culturalign.instrument/1", "id": "same", "name": "x", "scales": {"s": ["a", "a"]},'
              ' "answer_codes": [1, 2], "items": [{"id": 1, "text": "t", "scale": "s"}, {"id": 2, "text": "u", "scale": "s"}],'
              ' "indices": {"A": {"terms": [{"weight": 1, "plus": 1, "minus": 2}]}}}'), "has no reversed form"),
    ("survey-soft-bad-saved-order", [*SURVEY, "--soft-prompt", "{W}/sp"],
     lambda w, m: (soft_prompt(w / "sp", torch.zeros(2, HIDDEN)), (w / "sp" / "culturalign.json").write_text('{"order": "up"}')),
     "order 'up'"),
    # survey: instruments
    ("survey-instrument-unknown", [*SURVEY, "--instrument", "vsm1994"], None, "vsm1994"),
    ("survey-instrument-dir", [*SURVEY, "--instrument", "{W}/idir"], lambda w, m: (w / "idir").mkdir(), "is a folder"),
    ("survey-instrument-bad-json", [*SURVEY, "--instrument", "{W}/i.json"], csv_file("i.json", "{"), "JSON"),
    ("survey-instrument-nan-constant", [*SURVEY, "--instrument", "{W}/i.json"],
     csv_file("i.json", '{"schema": "culturalign.instrument/1", "id": "x", "name": "x", "scales": {"s": ["a", "b"]},'
              ' "answer_codes": [1, 2], "items": [{"id": 1, "text": "t", "scale": "s"}, {"id": 2, "text": "u", "scale": "s"}],'
              ' "indices": {"A": {"terms": [{"weight": 1, "plus": 1, "minus": 2}], "constant": NaN}}}'), "constant"),
    # survey: models
    ("survey-model-is-file", ["survey", "--model", "{W}/some.csv"], csv_file("some.csv", "a,b\n"), "is a file"),
    ("survey-model-missing-dir", ["survey", "--model", "{W}/nope"], None, "does not exist"),
    ("survey-model-empty-name", ["survey", "--model", ""], None, "--model"),
    ("survey-model-bad-config", ["survey", "--model", "{W}/m"],
     lambda w, m: model_copy(m, w / "m", replace={"config.json": b"{oops"}), "config.json"),
    ("survey-model-no-tokenizer", ["survey", "--model", "{W}/m"],
     lambda w, m: model_copy(m, w / "m", drop=("tokenizer.json",)), "tokenizer"),
    ("survey-model-truncated-weights", ["survey", "--model", "{W}/m"],
     lambda w, m: model_copy(m, w / "m", replace={"model.safetensors": truncated}), "could not be loaded"),
    ("survey-device-unknown", [*SURVEY, "--device", "tpu"], None, "'tpu'"),
    # survey: soft prompts
    ("survey-soft-missing", [*SURVEY, "--soft-prompt", "{W}/sp"], None, "does not exist"),
    ("survey-soft-nan", [*SURVEY, "--soft-prompt", "{W}/sp"],
     lambda w, m: soft_prompt(w / "sp", torch.full((2, HIDDEN), float("nan"))), "NaN"),
    ("survey-soft-inf", [*SURVEY, "--soft-prompt", "{W}/sp"],
     lambda w, m: soft_prompt(w / "sp", torch.full((2, HIDDEN), float("inf"))), "infinite"),
    ("survey-soft-virtual-tokens", [*SURVEY, "--soft-prompt", "{W}/sp"],
     lambda w, m: soft_prompt(w / "sp", torch.zeros(4, HIDDEN), {"num_virtual_tokens": 8}), "num_virtual_tokens"),
    ("survey-soft-token-dim", [*SURVEY, "--soft-prompt", "{W}/sp"],
     lambda w, m: soft_prompt(w / "sp", torch.zeros(2, 64), {"token_dim": 576}), "token_dim"),
    ("survey-soft-empty-tensor", [*SURVEY, "--soft-prompt", "{W}/sp"],
     lambda w, m: soft_prompt(w / "sp", torch.zeros(0, HIDDEN)), "empty"),
    ("survey-soft-other-model", [*SURVEY, "--soft-prompt", "{W}/sp"],
     lambda w, m: soft_prompt(w / "sp", torch.zeros(2, 64)), "another model"),
    ("survey-soft-corrupt", [*SURVEY, "--soft-prompt", "{W}/sp"],
     lambda w, m: (soft_prompt(w / "sp", torch.zeros(2, HIDDEN)),
                   (w / "sp" / "adapter_model.safetensors").write_bytes(b"garbage")), "safetensors"),
    ("survey-soft-bad-config", [*SURVEY, "--soft-prompt", "{W}/sp"],
     lambda w, m: (soft_prompt(w / "sp", torch.zeros(2, HIDDEN)), (w / "sp" / "adapter_config.json").write_text("[")),
     "adapter_config.json"),
    # align: --out and --resume, checked before the model loads
    ("align-out-under-file", [*ALIGN, "--out", "{W}/file.txt/sub"], csv_file("file.txt", "x"), "file.txt"),
    ("align-out-proc", [*ALIGN, "--out", "/proc/x"], None, "/proc"),
    ("align-out-is-file", [*ALIGN, "--out", "{W}/file.txt"], csv_file("file.txt", "x"), "not a folder"),
    ("align-out-unrelated-files", [*ALIGN, "--out", "{W}/o"],
     lambda w, m: ((w / "o").mkdir(), (w / "o" / "notes.txt").write_text("mine")), "not empty"),
    ("align-resume-needs-out", [*ALIGN, "--resume"], None, "--out"),
    ("align-resume-nothing", [*ALIGN, "--out", "{W}/o", "--resume"], lambda w, m: (w / "o").mkdir(), "nothing to resume"),
    ("align-resume-truncated", ["align", "--out", "{W}/o", "--resume"], lambda w, m: checkpoint(w / "o", '{"fingerprint": {"con'), "damaged"),
    ("align-resume-empty-file", ["align", "--out", "{W}/o", "--resume"], lambda w, m: checkpoint(w / "o", ""), "damaged"),
    ("align-resume-list", ["align", "--out", "{W}/o", "--resume"], lambda w, m: checkpoint(w / "o", []), "damaged"),
    ("align-resume-empty-object", ["align", "--out", "{W}/o", "--resume"], lambda w, m: checkpoint(w / "o", {}), "damaged"),
    ("align-resume-missing-key", ["align", "--out", "{W}/o", "--resume"],
     lambda w, m: checkpoint(w / "o", {k: v for k, v in valid_checkpoint(False).items() if k != "history"}), "'history'"),
    ("align-finished-without-resume", [*ALIGN, "--out", "{W}/o"], lambda w, m: checkpoint(w / "o", valid_checkpoint(True)),
     "finished run"),
    ("align-interrupted-without-resume", [*ALIGN, "--out", "{W}/o"], lambda w, m: checkpoint(w / "o", valid_checkpoint(False)),
     "--resume"),
    ("align-resume-other-setting", ["align", "--out", "{W}/o", "--resume", "--sigma", "3"],
     lambda w, m: checkpoint(w / "o", valid_checkpoint(False)), "--sigma"),
    ("align-resume-other-country", ["align", "--out", "{W}/o", "--resume", "--country", "JP"],
     lambda w, m: checkpoint(w / "o", valid_checkpoint(False)), "Japan"),
    # align: settings, checked before the model loads
    ("align-sigma-nan", [*ALIGN, "--sigma", "nan"], None, "--sigma"),
    ("align-sigma-zero", [*ALIGN, "--sigma", "0"], None, "--sigma"),
    ("align-dim-zero", [*ALIGN, "--dim", "0"], None, "--dim"),
    ("align-lr-nan", [*ALIGN, "--optimizer", "adam", "--lr", "nan"], None, "--lr"),
    ("align-bound-inf", [*ALIGN, "--bound", "inf"], None, "--bound"),
    ("align-mass-floor-nan", [*ALIGN, "--mass-floor", "nan"], None, "--mass-floor"),
    ("align-mass-floor-negative", [*ALIGN, "--mass-floor", "-1"], None, "--mass-floor"),
    ("align-mass-weight-negative", [*ALIGN, "--mass-weight", "-100"], None, "--mass-weight"),
    ("align-popsize-small", [*ALIGN, "--popsize", "3"], None, "--popsize"),
    ("align-budget-small", [*ALIGN, "--budget", "10"], None, "--budget"),
    ("align-budget-not-int", [*ALIGN, "--budget", "abc"], None, "--budget"),
    ("align-optimizer-unknown", [*ALIGN, "--optimizer", "sgd"], None, "'sgd'"),
    ("align-mutation-text", [*ALIGN, "--mutation", "abc"], None, "--mutation"),
    ("align-crossover-large", [*ALIGN, "--crossover", "2"], None, "--crossover"),
    ("align-strategy-unknown", [*ALIGN, "--strategy", "best2exp"], None, "best2exp"),
    ("align-init-unknown", [*ALIGN, "--init", "zeros"], None, "'zeros'"),
    ("align-seed-negative", [*ALIGN, "--seed", "-1"], None, "--seed"),
    ("align-init-text-empty", [*ALIGN, "--init-text", " "], None, "--init-text"),
    ("align-order-unknown", [*ALIGN, "--order", "sideways"], None, "--order 'sideways'"),
    ("align-order-reversed-instrument", [*ALIGN, "--instrument", "vsm2013-reversed", "--order", "reversed"], None,
     "already presents its options in another order"),
    ("align-resume-other-order", ["align", "--out", "{W}/o", "--resume", "--order", "both"],
     lambda w, m: checkpoint(w / "o", valid_checkpoint(False)), "--order 'both' differs from the run's 'forward'"),
    ("align-empty-country", ["align", "--model", "{M}", "--country", ""], None, "--country ''"),
    ("align-no-target", ["align", "--model", "{M}"], None, "--country"),
    ("align-constant-nan", [*ALIGN, "--constant", "LTO=nan"], None, "LTO=nan"),
    # align: checked once the model is loaded, still before anything is written
    ("align-dim-too-large", [*ALIGN, "--dim", "100000", "--out", "{W}/o"], None, "--dim"),
    # ask: the committee of experts
    ("ask-empty-question", ["ask", "  ", "--model", "{M}", "--experts", "{W}/reg"], registry, "empty"),
    ("ask-one-option", ["ask", "q?", "--options", "only", "--model", "{M}", "--experts", "{W}/reg"], registry, "at least two"),
    ("ask-empty-option", ["ask", "q?", "--options", "a||b", "--model", "{M}", "--experts", "{W}/reg"], registry, "empty"),
    ("ask-unknown-culture", ["ask", "q?", "--culture", "Atlantis", "--model", "{M}", "--experts", "{W}/reg"], registry, "Atlantis"),
    ("ask-unknown-system", ["ask", "q?", "--system", "oracle", "--model", "{M}"], None, "oracle"),
    ("ask-json-proc", ["ask", "q?", "--json", "/proc/a.json", "--model", "{M}"], None, "/proc"),
    ("ask-registry-missing", ["ask", "q?", "--model", "{M}", "--experts", "{W}/nope"], None, "does not exist"),
    ("ask-registry-expert-missing", ["ask", "q?", "--model", "{M}", "--experts", "{W}/reg"],
     lambda w, m: registry(w, m, drop="JP"), "'JP' is missing"),
    ("ask-registry-corrupt-expert", ["ask", "q?", "--model", "{M}", "--experts", "{W}/reg"],
     lambda w, m: (registry(w, m), (w / "reg" / "CN" / "adapter_model.safetensors").write_bytes(b"x")), "safetensors"),
    ("ask-registry-other-model", ["ask", "q?", "--model", "{M}", "--experts", "{W}/reg"],
     lambda w, m: registry(w, m, model="someone-else"), "built for model"),
    ("ask-registry-other-hidden-size", ["ask", "q?", "--model", "{M}", "--experts", "{W}/reg"],
     lambda w, m: registry(w, m, hidden=64), "hidden size"),
    ("ask-query-too-long", ["ask", "word " * 1200, "--culture", "JP", "--model", "{M}", "--experts", "{W}/reg"], registry,
     "context"),
    # experts: build and list
    ("experts-build-empty-list", ["experts", "build", "--countries", " , ", "--out", "{W}/r", "--model", "{M}"], None, "--countries"),
    ("experts-build-twice", ["experts", "build", "--countries", "CN,cn", "--out", "{W}/r", "--model", "{M}"], None, "more than once"),
    ("experts-build-unknown", ["experts", "build", "--countries", "CN,Atlantis", "--out", "{W}/r", "--model", "{M}"], None, "Atlantis"),
    ("experts-build-unknown-set", ["experts", "build", "--countries", "SA@hofstede-1990", "--out", "{W}/r", "--model", "{M}"], None,
     "hofstede-1990"),
    ("experts-build-optimizer", ["experts", "build", "--countries", "CN", "--optimizer", "sgd", "--out", "{W}/r"], None, "sgd"),
    ("experts-build-out-not-empty", ["experts", "build", "--countries", "CN", "--out", "{W}/o", "--model", "{M}"],
     lambda w, m: ((w / "o").mkdir(), (w / "o" / "x.txt").write_text("x")), "not empty"),
    ("experts-build-out-proc", ["experts", "build", "--countries", "CN", "--out", "/proc/r"], None, "/proc"),
    ("experts-list-missing", ["experts", "list", "{W}/nope"], None, "does not exist"),
    ("experts-list-bad-manifest", ["experts", "list", "{W}/reg"],
     lambda w, m: (registry(w, m), (w / "reg" / "manifest.json").write_text("{")), "JSON"),
    # committee eval
    ("eval-queries-missing", ["committee", "eval", "--out", "{W}/e", "--queries", "{W}/q.jsonl", "--model", "{M}"], None, "q.jsonl"),
    ("eval-queries-bad-row", ["committee", "eval", "--out", "{W}/e", "--queries", "{W}/q.jsonl", "--model", "{M}"],
     csv_file("q.jsonl", '{"id": "a", "kind": "likert", "text": "t", "options": ["x"], "culture_dependent": true}\n'), "line 1"),
    ("eval-queries-bad-json", ["committee", "eval", "--out", "{W}/e", "--queries", "{W}/q.jsonl", "--model", "{M}"],
     csv_file("q.jsonl", '{"id": "a",\n'), "line 1"),
    ("eval-queries-duplicate-id", ["committee", "eval", "--out", "{W}/e", "--queries", "{W}/q.jsonl", "--model", "{M}"],
     csv_file("q.jsonl", '{"id": "a", "kind": "open", "text": "t", "culture_dependent": true}\n'
                         '{"id": "a", "kind": "open", "text": "u", "culture_dependent": true}\n'), "'a'"),
    ("eval-out-not-empty", ["committee", "eval", "--out", "{W}/e", "--model", "{M}"],
     lambda w, m: ((w / "e").mkdir(), (w / "e" / "x").write_text("x")), "not empty"),
    ("eval-heldout-in-registry", ["committee", "eval", "--out", "{W}/e", "--heldout", "JP", "--model", "{M}", "--experts", "{W}/reg"],
     registry, "JP"),
    ("eval-order-unknown", ["committee", "eval", "--out", "{W}/e", "--order", "sideways", "--model", "{M}"], None,
     "--order 'sideways'"),
    ("eval-open-limit", ["committee", "eval", "--out", "{W}/e", "--open-limit", "-1", "--model", "{M}", "--experts", "{W}/reg"],
     registry, "--open-limit"),
    # serve: every setting is checked before the model loads and before anything listens
    ("serve-port-out-of-range", ["serve", "--model", "{M}", "--port", "70000"], None, "--port"),
    ("serve-port-negative", ["serve", "--model", "{M}", "--port", "-1"], None, "--port"),
    ("serve-port-not-a-number", ["serve", "--model", "{M}", "--port", "http"], None, "--port"),
    ("serve-bad-host", ["serve", "--model", "{M}", "--host", "not a host!"], None, "not a host!"),
    ("serve-empty-host", ["serve", "--model", "{M}", "--host", ""], None, "--host"),
    ("serve-experts-missing", ["serve", "--model", "{M}", "--experts", "{W}/nope"], None, "does not exist"),
    ("serve-experts-corrupt", ["serve", "--model", "{M}", "--experts", "{W}/reg"],
     lambda w, m: (registry(w, m), (w / "reg" / "manifest.json").write_text("{")), "JSON"),
    ("serve-experts-other-model", ["serve", "--model", "{M}", "--experts", "{W}/reg", "--port", "0"],
     lambda w, m: registry(w, m, model="someone-else"), "built for model"),
    ("serve-empty-api-key", ["serve", "--model", "{M}", "--api-key", ""], None, "--api-key"),
    ("serve-max-batch-zero", ["serve", "--model", "{M}", "--max-batch", "0"], None, "--max-batch"),
    ("serve-timeout-zero", ["serve", "--model", "{M}", "--timeout", "0"], None, "--timeout"),
    ("serve-batch-window-nan", ["serve", "--model", "{M}", "--batch-window-ms", "nan"], None, "--batch-window-ms"),
    ("serve-max-tokens-limit-zero", ["serve", "--model", "{M}", "--max-tokens-limit", "0"], None, "--max-tokens-limit"),
    ("serve-top-k-zero", ["serve", "--model", "{M}", "--experts", "{W}/reg", "--top-k", "0", "--port", "0"], registry, "top_k"),
    # experiment: the file, the grid and the folder, all checked before the model loads
    ("experiment-missing-file", ["experiment", "{W}/nope.yaml"], None, "nope.yaml"),
    ("experiment-suffix", ["experiment", "{W}/g.json"], csv_file("g.json", "{}"), ".yaml, .yml or .toml"),
    ("experiment-bad-yaml", EXPERIMENT, csv_file("g.yaml", "grid: [\n"), "not valid YAML"),
    ("experiment-unknown-key", EXPERIMENT, csv_file("g.yaml", GRID + "colour: red\n"), "g.yaml: colour: unknown key"),
    ("experiment-unknown-grid-key", EXPERIMENT, csv_file("g.yaml", GRID.replace("  budget", "  budgte")), "grid.budgte: unknown key"),
    ("experiment-unknown-optimizer", EXPERIMENT, csv_file("g.yaml", GRID.replace("[de]", "[de, foo]")),
     "grid.optimizers[1]: unknown optimizer 'foo'"),
    ("experiment-unknown-country", EXPERIMENT, csv_file("g.yaml", GRID.replace("[CN]", "[CN, Atlantis]")),
     "grid.targets[1].country: unknown country or region 'Atlantis'"),
    ("experiment-empty-grid", EXPERIMENT, csv_file("g.yaml", GRID.replace("[CN]", "[]")), "grid.targets: empty"),
    ("experiment-bad-setting", EXPERIMENT, csv_file("g.yaml", GRID.replace("sigma: 2.0", "sigma: .nan")), "settings.sigma"),
    ("experiment-order-unknown", EXPERIMENT, csv_file("g.yaml", GRID.replace("sigma: 2.0", "sigma: 2.0, order: sideways")),
     "settings.order: 'sideways'"),
    ("experiment-order-reversed-instrument", EXPERIMENT,
     csv_file("g.yaml", "instrument: vsm2013-reversed\n" + GRID.replace("sigma: 2.0", "sigma: 2.0, order: both")),
     "settings.order: both: instrument 'vsm2013-reversed' already presents"),
    ("experiment-changed-file", EXPERIMENT, started_experiment, "(changed: settings.sigma)"),
    ("experiment-out-not-empty", EXPERIMENT, lambda w, m: (csv_file("g.yaml", GRID)(w, m), (w / "e").mkdir(),
                                                           (w / "e" / "x.txt").write_text("x")), "not empty"),
    ("experiment-out-proc", ["experiment", "{W}/g.yaml", "--out", "/proc/e"], csv_file("g.yaml", GRID), "/proc"),
    ("experiment-executor-unknown", [*EXPERIMENT, "--executor", "dask"], csv_file("g.yaml", GRID), "'dask'"),
    # experiment: checked once the model is loaded, still before anything is written
    ("experiment-dim-too-large", EXPERIMENT, csv_file("g.yaml", GRID.replace("dim: 2", "dim: 100000")), "--dim"),
    # mcq: question files, checked before the model loads
    ("mcq-file-missing", ["mcq", "--file", "{W}/q.csv", "--model", "{M}"], None, "q.csv"),
    ("mcq-file-dir", ["mcq", "--file", "{W}/qdir", "--model", "{M}"], lambda w, m: (w / "qdir").mkdir(), "is a folder"),
    ("mcq-empty-file", ["mcq", "--file", "{W}/q.csv", "--model", "{M}"], csv_file("q.csv", ""), "empty file"),
    ("mcq-missing-columns", ["mcq", "--file", "{W}/q.csv", "--model", "{M}"],
     csv_file("q.csv", "id,question,option_a,option_b,answer\nq1,Q?,a,b,A\n"), "missing column(s) country"),
    ("mcq-answer-not-an-option", ["mcq", "--file", "{W}/q.csv", "--model", "{M}"],
     csv_file("q.csv", "id,country,question,option_a,option_b,option_c,answer\nq1,China,Q?,a,b,,C\n"), "not among the options"),
    ("mcq-duplicated-ids", ["mcq", "--file", "{W}/q.csv", "--model", "{M}"],
     csv_file("q.csv", "id,country,question,option_a,option_b,answer\nq1,China,Q?,a,b,A\nq1,India,R?,a,b,B\n"),
     "duplicated id 'q1'"),
    ("mcq-one-option", ["mcq", "--file", "{W}/q.csv", "--model", "{M}"],
     csv_file("q.csv", "id,country,question,option_a,option_b,answer\nq1,China,Q?,a,,A\n"), "fewer than two options"),
    ("mcq-culturalbench-hard-bad-answer", ["mcq", "--file", "{W}/q.csv", "--model", "{M}"],
     csv_file("q.csv", "data_idx,question_idx,prompt_question,prompt_option,answer,country\n0,1,Q?,a,maybe,Peru\n"), "true or false"),
    ("mcq-soft-missing", ["mcq", "--soft-prompt", "{W}/sp", "--model", "{M}"], None, "does not exist"),
    ("mcq-soft-other-model", ["mcq", "--soft-prompt", "{W}/sp", "--model", "{M}"],
     lambda w, m: soft_prompt(w / "sp", torch.zeros(2, 64)), "another model"),
    ("mcq-json-proc", ["mcq", "--json", "/proc/m.json", "--model", "{M}"], None, "/proc"),
    # heldout: the soft prompt, its target and the check inputs, checked before the model loads
    ("heldout-needs-soft-prompt", ["heldout", "--model", "{M}"], None, "--soft-prompt"),
    ("heldout-soft-missing", ["heldout", "--soft-prompt", "{W}/sp", "--model", "{M}"], None, "does not exist"),
    ("heldout-no-target", ["heldout", "--soft-prompt", "{W}/sp", "--model", "{M}"],
     lambda w, m: soft_prompt(w / "sp", torch.zeros(2, HIDDEN)), "names no target"),
    ("heldout-bad-saved-target", ["heldout", "--soft-prompt", "{W}/sp", "--model", "{M}"],
     lambda w, m: (soft_prompt(w / "sp", torch.zeros(2, HIDDEN)), (w / "sp" / "culturalign.json").write_text('{"target": [1]}')),
     "not understood"),
    ("heldout-bad-saved-prompt", ["heldout", "--soft-prompt", "{W}/sp", "--country", "CN", "--model", "{M}"],
     lambda w, m: (soft_prompt(w / "sp", torch.zeros(2, HIDDEN)), (w / "sp" / "culturalign.json").write_text('{"prompt": "bogus"}')),
     "'bogus'"),
    ("heldout-order-unknown", ["heldout", "--soft-prompt", "{W}/sp", "--country", "CN", "--order", "up", "--model", "{M}"],
     lambda w, m: soft_prompt(w / "sp", torch.zeros(2, HIDDEN)), "--order 'up'"),
    ("heldout-bad-saved-order", ["heldout", "--soft-prompt", "{W}/sp", "--country", "CN", "--model", "{M}"],
     lambda w, m: (soft_prompt(w / "sp", torch.zeros(2, HIDDEN)), (w / "sp" / "culturalign.json").write_text('{"order": "up"}')),
     "order 'up'"),
    ("heldout-saved-order-reversed-instrument", ["heldout", "--soft-prompt", "{W}/sp", "--country", "CN", "--model", "{M}"],
     lambda w, m: (soft_prompt(w / "sp", torch.zeros(2, HIDDEN)),
                   (w / "sp" / "culturalign.json").write_text('{"order": "both", "instrument": "vsm2013-reversed"}')),
     "already presents"),
    ("heldout-unknown-country", ["heldout", "--soft-prompt", "{W}/sp", "--country", "Atlantis", "--model", "{M}"],
     lambda w, m: soft_prompt(w / "sp", torch.zeros(2, HIDDEN)), "Atlantis"),
    ("heldout-targets-without-country", ["heldout", "--soft-prompt", "{W}/sp", "--targets", "hofstede-2023", "--model", "{M}"],
     lambda w, m: soft_prompt(w / "sp", torch.zeros(2, HIDDEN)), "--targets"),
    ("heldout-bad-mcq-file", ["heldout", "--soft-prompt", "{W}/sp", "--country", "CN", "--mcq-file", "{W}/q.csv", "--model", "{M}"],
     lambda w, m: (soft_prompt(w / "sp", torch.zeros(2, HIDDEN)),
                   (w / "q.csv").write_text("id,country,question,option_a,option_b,answer\nq1,China,Q?,a,b,Z\n")), "'Z'"),
    ("heldout-empty-text", ["heldout", "--soft-prompt", "{W}/sp", "--country", "CN", "--text", "{W}/t.txt", "--model", "{M}"],
     lambda w, m: (soft_prompt(w / "sp", torch.zeros(2, HIDDEN)), (w / "t.txt").write_text(" \n")), "empty"),
    ("heldout-constant-nan", ["heldout", "--soft-prompt", "{W}/sp", "--country", "CN", "--constant", "PDI=nan", "--model", "{M}"],
     lambda w, m: soft_prompt(w / "sp", torch.zeros(2, HIDDEN)), "PDI=nan"),
    ("heldout-json-proc", ["heldout", "--soft-prompt", "{W}/sp", "--country", "CN", "--json", "/proc/h.json", "--model", "{M}"],
     lambda w, m: soft_prompt(w / "sp", torch.zeros(2, HIDDEN)), "/proc"),
    ("heldout-soft-other-model", ["heldout", "--soft-prompt", "{W}/sp", "--country", "CN", "--model", "{M}"],
     lambda w, m: soft_prompt(w / "sp", torch.zeros(2, 64)), "another model"),
    # the embedded model's cache folder must be writable before the 35 s conversion starts
    ("survey-cache-unwritable", ["survey"], lambda w, m: None, "CULTURALIGN_CACHE"),
]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    w = tmp_path / "w"
    w.mkdir()
    monkeypatch.chdir(w)
    monkeypatch.setenv("CULTURALIGN_CACHE", str(tmp_path / "cache"))
    return w


def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_table_is_large_and_unique():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv,setup,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(argv, setup, needle, workspace, tiny_dir, monkeypatch, capsys, one_thread):
    if setup is not None:
        setup(workspace, Path(tiny_dir))
    if "CULTURALIGN_CACHE" in needle:
        monkeypatch.setenv("CULTURALIGN_CACHE", "/proc/culturalign-cache")
    before = _snapshot(workspace)
    argv = [a.replace("{M}", str(tiny_dir)).replace("{W}", str(workspace)) for a in argv]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code != 0, stdout + stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in stdout + stderr
    assert _snapshot(workspace) == before  # nothing written, nothing half-written, nothing left behind


def test_ctrl_c_in_survey_says_so(workspace, tiny_dir, monkeypatch, capsys):
    import culturalign.measure.survey

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(culturalign.measure.survey.Survey, "result", interrupted)
    code, _, stderr = run_cli(["survey", "--model", str(tiny_dir), "--json", str(workspace / "o.json")], capsys)
    assert code == 130 and "interrupted" in stderr and "nothing was written" in stderr
    assert not (workspace / "o.json").exists()


def test_ctrl_c_in_align_names_the_resume_command(workspace, tiny_dir, monkeypatch, capsys):
    import culturalign.alignment.run

    real = culturalign.alignment.run.Aligner._checkpoint

    def checkpoint_then_interrupt(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(culturalign.alignment.run.Aligner, "_checkpoint", checkpoint_then_interrupt)
    out = workspace / "run"
    code, _, stderr = run_cli([a.replace("{M}", str(tiny_dir)) for a in ALIGN] + ["--out", str(out)], capsys)
    assert code == 130
    assert "interrupted" in stderr and "--resume" in stderr and str(out) in stderr.replace("\n", "")
    assert (out / "checkpoint.json").is_file()


def test_json_dash_writes_standard_output(workspace, tiny_dir, capsys):
    code, stdout, stderr = run_cli(["survey", "--model", str(tiny_dir), "--country", "CN", "--json", "-"], capsys)
    assert code == 0, stderr
    data = json.loads(stdout)  # standard output is the JSON alone; the table goes to stderr
    assert data["prompt"] == "naive" and "PDI" in stderr
    assert not (workspace / "-").exists()


def test_version(capsys):
    import culturalign

    code, stdout, _ = run_cli(["--version"], capsys)
    assert code == 0 and stdout.strip() == f"culturalign {culturalign.__version__}"


def test_help_shows_no_bool_types(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    for argv in (["--help"], ["survey", "--help"], ["align", "--help"]):
        code, stdout, _ = run_cli(argv, capsys)
        assert code == 0 and "<bool>" not in stdout and "--help" in stdout


def test_outputs_use_the_umask(workspace, tiny_dir, capsys):
    import os

    old = os.umask(0o022)
    try:
        run_cli(["survey", "--model", str(tiny_dir), "--json", str(workspace / "o.json")], capsys)
    finally:
        os.umask(old)
    assert (workspace / "o.json").stat().st_mode & 0o777 == 0o644


# ---- property: random target files and constants give a finite profile or one clear error -----------------

CELLS = st.one_of(
    st.integers(-2000, 2000).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "nan", "NaN", "inf", "-Infinity", "#NULL!", "NA", "null", "1e9", "abc", " 42 ", "3,5"]),
    st.text(max_size=6),
)
COLUMNS = st.lists(st.sampled_from(["name", "PDI", "IDV", "MAS", "UAI", "LTO", "IVR", "pdi", "Name", "xyz", ""]),
                   min_size=1, max_size=7)
CONSTANTS = st.one_of(
    st.tuples(st.sampled_from(["PDI", "idv", "MAS", "XYZ", "", " UAI "]), st.sampled_from(["=", ":", "=="]), CELLS)
    .map(lambda t: "".join(t)),
    st.text(max_size=12),
)


def _strict(text: str):
    def reject(c):
        raise ValueError(f"non-strict JSON constant {c}")

    return json.loads(text, parse_constant=reject)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(columns=COLUMNS, rows=st.lists(st.lists(CELLS, min_size=0, max_size=8), min_size=0, max_size=3),
       constants=st.lists(CONSTANTS, max_size=2))
@example(columns=["name", "PDI", "idv"], rows=[["Xland", "50", ""]], constants=["PDI=10"])  # the valid path, always
@example(columns=["name", "PDI"], rows=[["Xland", "nan"]], constants=[])
def test_random_target_files_and_constants(columns, rows, constants, tiny_lm, tmp_path_factory, monkeypatch, capsys):
    import culturalign.cli.common

    monkeypatch.setattr(culturalign.cli.common, "load_model", lambda model, device: tiny_lm)
    folder = tmp_path_factory.mktemp("prop")
    tf = folder / "t.csv"
    lines = [",".join(columns)] + [",".join(r) for r in rows]
    tf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = folder / "o.json"
    argv = ["survey", "--target-file", str(tf), "--json", str(out)]
    for c in constants:
        if "\x00" not in c:
            argv += ["--constant", c]
    code, stdout, stderr = run_cli(argv, capsys)
    assert "Traceback" not in stdout + stderr
    if code == 0:
        data = _strict(out.read_text())
        numbers = [v for it in data["items"] for v in it["probs"]] + list(data["indices"].values())
        numbers += list(data["target"]["scores"].values()) + [data["l1"]]
        assert all(isinstance(x, float | int) and math.isfinite(x) for x in numbers)
    else:
        assert code == 2
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        assert not out.exists()


def test_align_dfols_without_the_package(workspace, tiny_dir, monkeypatch, capsys):
    """DFO-LS is an optional extra (GPL-3.0-or-later): without it, --optimizer dfols is one line saying how to get it."""
    import sys

    monkeypatch.setitem(sys.modules, "dfols", None)  # `import dfols` fails, as when it is not installed
    before = _snapshot(workspace)
    argv = [a.replace("{M}", str(tiny_dir)) for a in ALIGN] + ["--optimizer", "dfols", "--out", str(workspace / "o")]
    code, stdout, stderr = run_cli(argv, capsys)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --optimizer dfols needs the DFO-LS package")
    assert "pip install 'culturalign[dfols]'" in lines[0] and "Traceback" not in stdout + stderr
    assert _snapshot(workspace) == before
