import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import culturalign
from culturalign import CulturalignError, load_instrument, load_target
from culturalign.cli import app
from culturalign.softprompt.prompt import SoftPrompt
from culturalign.measure.survey import Survey

SRC = Path(__file__).resolve().parents[1] / "src"
DIMS = ["PDI", "IDV", "MAS", "UAI", "LTO", "IVR"]


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def invoke(runner, *args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)


def run_main(*args, timeout=120):
    env = dict(os.environ)
    env.pop("COLUMNS", None)  # as in a pipe or CI log: no terminal width given
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "culturalign", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def formula_indices(items, constants):
    """VSM 2013 formulas on the item means of the JSON output."""
    m = {it["id"]: it["mean"] for it in items}
    return {
        "PDI": 35 * (m[7] - m[2]) + 25 * (m[20] - m[23]) + constants["PDI"],
        "IDV": 35 * (m[4] - m[1]) + 35 * (m[9] - m[6]) + constants["IDV"],
        "MAS": 35 * (m[5] - m[3]) + 35 * (m[8] - m[10]) + constants["MAS"],
        "UAI": 40 * (m[18] - m[15]) + 25 * (m[21] - m[24]) + constants["UAI"],
        "LTO": 40 * (m[13] - m[14]) + 25 * (m[19] - m[22]) + constants["LTO"],
        "IVR": 35 * (m[12] - m[11]) + 40 * (m[17] - m[16]) + constants["IVR"],
    }


def check_profile(p, prompt, mode="logprob"):
    for key in ("model", "instrument", "prompt", "mode", "constants", "items", "indices", "target", "l1", "l1_dims"):
        assert key in p, key
    assert p["instrument"] == "vsm2013"
    assert p["prompt"] == prompt
    assert p["mode"] == mode
    assert list(p["constants"]) == DIMS
    assert list(p["indices"]) == DIMS
    assert len(p["items"]) == 24
    assert [it["id"] for it in p["items"]] == list(range(1, 25))
    for it in p["items"]:
        assert len(it["probs"]) == 5
        assert sum(it["probs"]) == pytest.approx(1.0, abs=1e-5)
        assert it["mean"] == pytest.approx(sum(c * q for c, q in zip(range(1, 6), it["probs"])), abs=1e-5)
        assert 0 < it["option_mass"] <= 1
    want = formula_indices(p["items"], p["constants"])
    for d in DIMS:
        assert p["indices"][d] == pytest.approx(want[d], abs=1e-3), d


def read(path):
    return json.loads(Path(path).read_text())


# ---- countries -----------------------------------------------------------------------------------------

def test_countries_json(runner):
    r = invoke(runner, "countries", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 111
    china = next(x for x in rows if x["name"] == "China")
    assert (china["hofstede_code"], china["iso2"], china["iso3"], china["kind"]) == ("CHI", "CN", "CHN", "country")
    assert china["scores"] == {"PDI": 80, "IDV": 20, "MAS": 66, "UAI": 30, "LTO": 87, "IVR": 24}
    r = invoke(runner, "countries", "--json", "--targets", "hofstede-2023")
    assert r.exit_code == 0
    assert len(json.loads(r.stdout)) == 10


def test_countries_table(runner):
    r = invoke(runner, "countries")
    assert r.exit_code == 0
    assert "111 targets" in r.stdout
    assert "China" in r.stdout


def test_countries_unknown_set(runner):
    r = invoke(runner, "countries", "--targets", "nope")
    assert isinstance(r.exception, CulturalignError)


# ---- survey --------------------------------------------------------------------------------------------

def test_survey_json_contract(runner, tiny_dir, tmp_path):
    out = tmp_path / "out.json"
    r = invoke(runner, "survey", "--model", tiny_dir, "--country", "CN", "--prompt", "naive", "--json", out)
    assert r.exit_code == 0, r.output
    p = read(out)
    assert isinstance(p, dict)
    check_profile(p, "naive")
    assert p["model"] == str(tiny_dir)
    assert p["constants"] == {d: 0.0 for d in DIMS}
    assert p["target"] == {"name": "China", "set": "hofstede-2015", "code": "CHI", "iso2": "CN", "iso3": "CHN",
                           "scores": {"PDI": 80, "IDV": 20, "MAS": 66, "UAI": 30, "LTO": 87, "IVR": 24},
                           "source": "hofstede-2015-08-16"}
    assert p["culturalign_version"] == culturalign.__version__
    assert isinstance(p["l1"], float)
    assert p["l1_dims"] == DIMS
    assert p["l1"] == pytest.approx(sum(abs(p["indices"][d] - p["target"]["scores"][d]) for d in DIMS), abs=1e-6)
    assert [x.name for x in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind
    assert "PDI" in r.stdout  # the table
    # the uniform floor, in the same schema, as the last key: every item 1/5, indices = C, no model
    assert list(p)[-1] == "reference" and list(p["reference"]) == ["uniform"]
    u = p["reference"]["uniform"]
    check_profile(u, "uniform", mode="uniform")
    assert u["model"] == "uniform" and u["mean_option_mass"] == 1.0 and "reference" not in u
    assert all(it["probs"] == [0.2] * 5 and it["mean"] == 3.0 for it in u["items"])
    assert u["indices"] == {d: 0.0 for d in DIMS} and u["target"] == p["target"]
    assert u["l1"] == 80 + 20 + 66 + 30 + 87 + 24  # |China - 0| summed
    assert "uniform" in r.stdout and f"{u['l1']:.1f}" in r.stdout


def test_survey_matches_library(runner, tiny_dir, tiny_lm, vsm, tmp_path):
    out = tmp_path / "o.json"
    r = invoke(runner, "survey", "-m", tiny_dir, "-c", "SA", "-p", "persona", "--constant", "PDI=50",
               "--constant", "ivr=-5", "--json", out)
    assert r.exit_code == 0, r.output
    p = read(out)
    check_profile(p, "persona")
    assert p["constants"] == {"PDI": 50.0, "IDV": 0.0, "MAS": 0.0, "UAI": 0.0, "LTO": 0.0, "IVR": -5.0}
    assert p["l1_dims"] == ["LTO", "IVR"]
    ref = Survey(tiny_lm, vsm, "persona", load_target("SA"), {"PDI": 50, "IVR": -5}).result()
    np.testing.assert_allclose([it["probs"] for it in p["items"]], [it["probs"] for it in ref.items], atol=1e-6)
    assert p["indices"] == pytest.approx(ref.indices, abs=1e-4)
    assert p["l1"] == pytest.approx(ref.l1, abs=1e-4)
    assert p["reference"]["uniform"]["indices"] == p["constants"]  # the floor scores C on every index
    assert [k for k in p if k != "reference"] == list(ref.to_json())  # the profile's own keys, as before


def test_survey_several_prompts(runner, tiny_dir, tmp_path):
    out = tmp_path / "o.json"
    r = invoke(runner, "survey", "--model", tiny_dir, "--country", "China", "--prompt", "naive",
               "--prompt", "persona", "--prompt", "icl", "--json", out)
    assert r.exit_code == 0, r.output
    data = read(out)
    assert isinstance(data, list) and len(data) == 3
    for p, name in zip(data, ("naive", "persona", "icl")):
        check_profile(p, name)
        assert p["reference"]["uniform"] == data[0]["reference"]["uniform"]  # one floor for every profile
    assert data[0]["items"] != data[1]["items"]


def test_survey_soft_prompt(runner, tiny_dir, tiny_lm, vsm, tmp_path):
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(3, tiny_lm.hidden_size, generator=g) * 0.2
    sp = SoftPrompt(emb, {"prompt": "persona"}).save(tmp_path / "sp", backend=tiny_lm)
    out = tmp_path / "soft.json"
    r = invoke(runner, "survey", "--model", tiny_dir, "--country", "CN", "--soft-prompt", sp, "--json", out)
    assert r.exit_code == 0, r.output
    p = read(out)
    assert isinstance(p, dict)
    check_profile(p, "soft")
    # scored under the profile the prompt was searched with (persona), with the soft prompt in front
    ref = Survey(tiny_lm, vsm, "persona", load_target("CN")).result(emb)
    np.testing.assert_allclose([it["probs"] for it in p["items"]], [it["probs"] for it in ref.items], atol=1e-6)

    out2 = tmp_path / "both.json"
    r = invoke(runner, "survey", "--model", tiny_dir, "--country", "CN", "--prompt", "naive", "--soft-prompt", sp,
               "--json", out2)
    assert r.exit_code == 0, r.output
    data = read(out2)
    assert [x["prompt"] for x in data] == ["naive", "soft"]
    assert data[1]["items"] == p["items"]


def test_survey_soft_prompt_for_other_model(runner, tiny_dir, tmp_path):
    sp = SoftPrompt(torch.zeros(2, 576)).save(tmp_path / "sp")
    r = invoke(runner, "survey", "--model", tiny_dir, "--soft-prompt", sp)
    assert isinstance(r.exception, CulturalignError)
    assert "576" in str(r.exception)


def test_survey_target_file(runner, tiny_dir, tmp_path):
    tf = tmp_path / "mine.csv"
    tf.write_text("name,PDI,UAI\nTestland,55,70\n")
    out = tmp_path / "o.json"
    r = invoke(runner, "survey", "--model", tiny_dir, "--target-file", tf, "--json", out)
    assert r.exit_code == 0, r.output
    p = read(out)
    check_profile(p, "naive")
    assert p["target"] == {"name": "Testland", "set": "mine", "code": "", "iso2": "", "iso3": "",
                           "scores": {"PDI": 55.0, "UAI": 70.0}, "source": str(tf)}
    assert p["l1_dims"] == ["PDI", "UAI"]
    assert p["l1"] == pytest.approx(abs(p["indices"]["PDI"] - 55) + abs(p["indices"]["UAI"] - 70), abs=1e-6)


def test_survey_without_country(runner, tiny_dir, tmp_path):
    out = tmp_path / "o.json"
    r = invoke(runner, "survey", "--model", tiny_dir, "--json", out)
    assert r.exit_code == 0, r.output
    p = read(out)
    check_profile(p, "naive")
    assert p["target"] is None
    assert p["l1"] is None
    assert p["l1_dims"] == []


def test_survey_user_instrument(runner, tiny_dir, tmp_path):
    from importlib import resources

    inst = json.loads(resources.files("culturalign.data.instruments").joinpath("vsm2013.json").read_text("utf-8"))
    inst["id"] = "mine"
    inst["items"] = inst["items"][:3]
    inst["indices"] = {"AB": {"terms": [{"weight": 10, "plus": 1, "minus": 2}], "constant": 5}}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(inst))
    out = tmp_path / "o.json"
    r = invoke(runner, "survey", "--model", tiny_dir, "--instrument", path, "--json", out)
    assert r.exit_code == 0, r.output
    p = read(out)
    assert p["instrument"] == "mine" and len(p["items"]) == 3
    m = {it["id"]: it["mean"] for it in p["items"]}
    assert p["indices"] == {"AB": pytest.approx(10 * (m[1] - m[2]) + 5, abs=1e-3)}


@pytest.mark.parametrize("args,needle", [
    (["--mode", "guess"], "--mode"),
    (["--prompt", "cat"], "--prompt"),
    (["--country", "Atlantis"], "unknown country"),
    (["--constant", "XYZ=1"], "XYZ"),
    (["--constant", "PDI=abc"], "--constant"),
    (["--prompt", "persona"], "needs a target"),
])
def test_survey_user_errors(runner, tiny_dir, args, needle):
    r = invoke(runner, "survey", "--model", tiny_dir, *args)
    assert isinstance(r.exception, CulturalignError), r.output
    assert needle in str(r.exception)


def test_survey_sample_mode(runner, bigram_lm, tmp_path):
    folder = tmp_path / "bigram"
    bigram_lm.model.save_pretrained(folder)
    bigram_lm.tokenizer.save_pretrained(folder)
    out = tmp_path / "o.json"
    r = invoke(runner, "survey", "--model", folder, "--mode", "sample", "--samples", 4, "--seed", 1, "--json", out)
    assert r.exit_code == 0, r.output
    p = read(out)
    check_profile(p, "naive", mode="sample")
    assert all(it["probs"] == [0.0, 0.0, 1.0, 0.0, 0.0] for it in p["items"])
    bad = sum(it["unparsable"] for it in p["items"])
    assert p["unparsable"] == bad and p["samples_per_item"] == 4
    assert f"unparsable answers: {bad} of 96" in r.stdout


# ---- main(): errors as one line, exit code 2 --------------------------------------------------------------

def _one_error_line(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_main_unknown_country():
    line = _one_error_line(run_main("survey", "--country", "Narnia"))
    assert "unknown country" in line and "Narnia" in line


def test_main_missing_model_dir(tmp_path):
    proc = run_main("survey", "--model", "/nonexistent-culturalign/model")
    line = _one_error_line(proc)
    assert "/nonexistent-culturalign/model" in line


def test_main_bad_constant():
    line = _one_error_line(run_main("survey", "--constant", "PDI"))
    assert "--constant" in line


def test_help_shows_bracketed_words(runner):
    """Rich markup would read `[gemma]` or `[default: 20]` as a style and drop it from the help."""
    r = invoke(runner, "survey", "--help")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "culturalign[gemma]" in text and "'culturalign'" not in text
    assert "[default: 20]" in text and "[default: 1.0]" in text and "[default: 0]" in text
    r = invoke(runner, "experiment", "--help")
    assert "culturalign[gemma]" in " ".join(r.output.split())


def test_main_countries_ok():
    proc = run_main("countries", "--json", "--targets", "hofstede-2023")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 10
