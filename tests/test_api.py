"""The front door (`culturalign.api`): survey, align and ask in one call each, on the tiny random model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import culturalign as ca
from conftest import BagOfWords, make_registry
from culturalign.cli import app
from culturalign.errors import CulturalignError

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[1] / "src"
TINY_RUN = dict(optimizer="de", popsize=4, tokens=2, dim=8)  # as the CLI align tests run it


def without_timing(data):
    """Profile JSON without the seconds it took (everything else is deterministic)."""
    if isinstance(data, dict):
        return {k: without_timing(v) for k, v in data.items() if k != "seconds"}
    if isinstance(data, list):
        return [without_timing(v) for v in data]
    return data


def test_import_culturalign_imports_no_torch():
    code = ("import sys, culturalign as ca; names = [ca.survey, ca.ask, ca.load_model, ca.Profile, ca.Alignment, ca.align]; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_align_is_the_call_even_after_the_alignment_subpackage_is_imported():
    import inspect

    import culturalign.alignment.config  # noqa: F401  (the subpackage has its own name, so ca.align stays the call)
    from culturalign.api import align

    assert ca.align is align and "budget" in inspect.signature(ca.align).parameters


def test_model_cache_returns_the_same_backend(tiny_dir, tiny_lm):
    a = ca.load_model(str(tiny_dir), device="cpu")
    assert ca.load_model(tiny_dir, device="cpu") is a
    assert ca.load_model(str(tiny_dir), device=None) is not a  # another device key: loaded again
    from culturalign import api

    assert api._backend(tiny_lm, None) is tiny_lm  # a loaded backend is used as it is


def test_survey_equals_the_command_lines_json(tiny_dir, tmp_path):
    out = tmp_path / "p.json"
    r = CliRunner().invoke(app, ["survey", "--model", str(tiny_dir), "--country", "CN", "--prompt", "persona",
                                 "--order", "both", "--device", "cpu", "--json", str(out)])
    assert r.exit_code == 0, r.output
    p = ca.survey("CN", model=str(tiny_dir), prompt="persona", order="both", device="cpu")
    assert without_timing(p.to_json()) == without_timing(json.loads(out.read_text()))
    assert p.to_json()["reference"]["uniform"]["prompt"] == "uniform"
    assert p.l1 == pytest.approx(sum(abs(p.indices[d] - p.target.scores[d]) for d in p.target.scores))
    assert p.naive.prompt == "naive" and p.naive is not p and p.uniform.prompt == "uniform"
    assert 0 <= p.option_mass <= 1
    assert "persona" in repr(p) and "L1" in repr(p)


def test_survey_of_a_soft_prompt_and_its_plot(tiny_lm, tmp_path):
    from culturalign.softprompt.prompt import SoftPrompt

    sp = SoftPrompt(torch.randn(2, tiny_lm.hidden_size, generator=torch.Generator().manual_seed(0)), {"order": "reversed"})
    sp.save(tmp_path / "sp", tiny_lm.name)
    p = ca.survey("JP", model=tiny_lm, soft_prompt=tmp_path / "sp")
    assert p.prompt == "soft" and p.order == "reversed" and p.naive.prompt == "naive" and p.naive.order == "reversed"
    assert p.to_json()["soft_prompt"]["path"] == str(tmp_path / "sp")
    assert ca.survey("JP", model=tiny_lm, soft_prompt=SoftPrompt.load(tmp_path / "sp")).indices == p.indices
    assert p.plot(tmp_path / "radar.png").stat().st_size > 0
    png = p.plot()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png._repr_png_() == bytes(png)
    naive = ca.survey(model=tiny_lm)  # no country: no target, no L1
    assert naive.l1 is None and naive.naive is naive


def test_align_in_memory_twice_and_save(tiny_lm, tmp_path):
    from culturalign.softprompt.prompt import SoftPrompt

    run = ca.align("CN", budget=8, model=tiny_lm, **TINY_RUN)
    again = ca.align("CN", budget=8, model=tiny_lm, **TINY_RUN)  # a rerun notebook cell: no folder to clash with
    assert torch.equal(run.soft_prompt.embeddings, again.soft_prompt.embeddings)
    assert run.soft_prompt.embeddings.shape == (2, tiny_lm.hidden_size) and run.path is None
    assert set(run.profiles) == {"naive", "icl", "aligned", "uniform"} and run.nfev == 8
    assert run.history[-1]["evaluations"] == 8 and run.l1 == run.profiles["aligned"].l1
    assert run.profiles["aligned"].naive is run.profiles["naive"]
    folder = run.save(tmp_path / "cn")
    assert {p.name for p in folder.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json", "result.json",
                                                  "report.md", "radar.png", "convergence.png", "checkpoint.json"}
    assert torch.equal(SoftPrompt.load(folder).embeddings, run.soft_prompt.embeddings)
    assert json.loads((folder / "result.json").read_text())["profiles"]["aligned"] == run.result["profiles"]["aligned"]
    again.save(tmp_path / "cn")  # replaces the earlier run's files
    assert "Alignment to China" in repr(run)
    # the survey of the aligned soft prompt is the run's aligned profile
    measured = ca.survey("CN", model=tiny_lm, soft_prompt=run.soft_prompt)
    assert measured.indices == pytest.approx(run.profiles["aligned"].indices)


def test_align_into_a_folder_continues_and_returns_it(tiny_lm, tmp_path):
    calls = []
    run = ca.align("CN", budget=8, model=tiny_lm, out=tmp_path / "run", progress=calls.append, **TINY_RUN)
    assert run.path == tmp_path / "run" and (tmp_path / "run" / "result.json").is_file() and calls
    same = ca.align("CN", budget=8, model=tiny_lm, out=tmp_path / "run", **TINY_RUN)  # finished: read back
    assert same.result == run.result and torch.equal(same.x, run.x)
    longer = ca.align("CN", budget=12, model=tiny_lm, out=tmp_path / "run", **TINY_RUN)  # extended
    assert longer.nfev == 12 and longer.history[:2] == run.history[:2]
    with pytest.raises(CulturalignError, match="different settings"):
        ca.align("CN", budget=12, model=tiny_lm, out=tmp_path / "run", **{**TINY_RUN, "dim": 4})


def test_ask_routes_to_experts(tiny_lm, tmp_path):
    reg = make_registry(tmp_path / "experts", tiny_lm)
    enc = BagOfWords()
    a = ca.ask("How should I greet my manager?", culture="Japan", model=tiny_lm, registry=reg, encoder=enc,
               max_new_tokens=4)
    assert isinstance(a, ca.Answer) and isinstance(a.text, str)
    assert a.culture == "JP" and a.routing["experts"][0]["code"] == "JP" and a.routing["reasons"]
    assert [e["code"] for e in a.experts] == [e["code"] for e in a.routing["experts"]]
    assert "routing" in repr(a)
    b = ca.ask("Is it rude to be late?", culture="JP", model=tiny_lm, registry=reg, encoder=enc,
               options=["yes", "no"])
    assert b.text in ("yes", "no") and len(b.answer["probs"]) == 2
    from culturalign import api

    assert len([k for k in api._COMMITTEES if k[0] == id(tiny_lm)]) == 1  # the committee is loaded once


@pytest.mark.parametrize("call,needle", [
    (lambda lm: ca.survey("Atlantis", model=lm), "unknown country or region 'Atlantis'"),
    (lambda lm: ca.survey("CN", model=lm, prompt="pirate"), "prompt 'pirate': expected one of naive, persona, icl"),
    (lambda lm: ca.survey("CN", model=lm, order="sideways"), "order 'sideways'"),
    (lambda lm: ca.survey("CN", model=lm, mode="guess"), "mode 'guess'"),
    (lambda lm: ca.survey("CN", model=42), "model=int"),
    (lambda lm: ca.align("CN", budget=0, model=lm), "budget must be at least 1"),
    (lambda lm: ca.align("CN", budget="ten", model=lm), "budget must be an integer"),
    (lambda lm: ca.align("CN", budget=8, model=lm, popsise=4), "unknown setting 'popsise'"),
    (lambda lm: ca.align("CN", optimizer="magic", model=lm), "optimizer 'magic'"),
    (lambda lm: ca.align(model=lm), "no target"),
    (lambda lm: ca.ask("  ", model=lm), "the question is empty"),
    (lambda lm: ca.ask("Hi?", model=lm, system="oracle"), "system 'oracle'"),
    (lambda lm: ca.load_model("/no/such/model"), "/no/such/model"),
])
def test_bad_input_is_one_clear_error(tiny_lm, call, needle):
    with pytest.raises(CulturalignError) as e:
        call(tiny_lm)
    assert needle in str(e.value) and "\n" not in str(e.value)
