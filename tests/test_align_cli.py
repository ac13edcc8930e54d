"""`culturalign align` on the command line: a run, user errors, and a real SIGKILL followed by --resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from culturalign import CulturalignError
from culturalign.cli import app, error_text

SRC = Path(__file__).resolve().parents[1] / "src"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def env():
    e = dict(os.environ)
    e.pop("COLUMNS", None)
    e["PYTHONPATH"] = os.pathsep.join([str(SRC), e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"
    return e


def align_args(tiny_dir, budget, popsize, *extra):
    return ["align", "--model", str(tiny_dir), "--country", "CN", "--optimizer", "de", "--budget", str(budget), "--popsize", str(popsize),
            "--tokens", "2", "--dim", "8", "--device", "cpu", *map(str, extra)]


def read(path):
    return json.loads(Path(path).read_text())


def losses(result):
    return [(h["generation"], h["evaluations"], h["best_loss"], h["mean_loss"]) for h in result["history"]]


def prompt_tensor(out):
    return load_file(str(Path(out) / "adapter_model.safetensors"))["prompt_embeddings"]


@pytest.mark.parametrize("popsize,budget", [(4, 8), (6, 12)])
def test_cli_align(runner, tiny_dir, tmp_path, popsize, budget):
    out = tmp_path / "run"
    r = runner.invoke(app, align_args(tiny_dir, budget, popsize, "--out", out))
    assert r.exit_code == 0, r.output + repr(r.exception)
    res = read(out / "result.json")
    assert res["evaluations"] == budget and len(res["history"]) == budget // popsize
    assert res["settings"]["model"] == str(tiny_dir) and res["settings"]["popsize"] == popsize
    for name in ("adapter_config.json", "adapter_model.safetensors", "culturalign.json", "report.md", "radar.png",
                 "convergence.png"):
        assert (out / name).is_file(), name
    assert read(out / "checkpoint.json")["finished"] is True
    # the comparison table: target, naive, icl, aligned, with each profile's L1
    table = r.stdout
    for word in ("China", "naive", "icl", "aligned", "L1", "PDI", "IVR"):
        assert word in table, word
    for name in ("naive", "icl", "aligned", "uniform"):
        assert f"{res['profiles'][name]['l1']:.1f}" in table, name
    assert str(out) in r.output.replace("\n", "")


@pytest.mark.parametrize("extra,needle", [
    (["--budget", "10", "--popsize", "6"], "--budget"),
    (["--popsize", "3", "--budget", "12"], "--popsize"),
    (["--init", "zeros"], "--init"),
    (["--strategy", "best2exp"], "strategy"),
    (["--mutation", "0.5,0.6,0.7"], "--mutation"),
    (["--mutation", "1.0,0.5"], "mutation"),
    (["--tokens", "0"], "--tokens"),
])
def test_cli_align_user_errors(runner, tiny_dir, tmp_path, extra, needle):
    out = tmp_path / "run"
    args = align_args(tiny_dir, 12, 6, "--out", out)
    r = runner.invoke(app, args + extra)  # later options win
    assert r.exit_code != 0
    assert isinstance(r.exception, CulturalignError), repr(r.exception)
    assert needle in error_text(r.exception)  # as the command line shows it: a setting's field as its flag
    assert not (out / "result.json").exists()


def test_main_bad_options_exit_2_without_traceback():
    cases = {"--mutation": ["--mutation", "abc"], "--optimizer": ["--optimizer", "xyz"]}
    procs = {k: subprocess.Popen([sys.executable, "-m", "culturalign", "align", "--country", "CN", *v],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
             for k, v in cases.items()}  # in parallel: most of the time is importing torch
    for flag, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, stderr
        assert "Traceback" not in stderr + stdout
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        assert flag in lines[0] and cases[flag][1] in lines[0]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(runner, tiny_dir, tmp_path):
    popsize, generations = 6, 12
    budget = popsize * generations
    base = align_args(tiny_dir, budget, popsize, "--sigma", "2")
    killed = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "culturalign", *base, "--out", str(killed)],
                            stdout=log, stderr=subprocess.STDOUT, env=env())
    ckpt = killed / "checkpoint.json"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"align exited (rc {proc.returncode}) before it could be killed: "
                            f"{(tmp_path / 'killed.log').read_text()[-2000:]}")
            if ckpt.exists() and len(read(ckpt)["history"]) >= 2:  # initial population + >= 1 generation
                os.kill(proc.pid, signal.SIGKILL)
                break
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint with a finished generation within 180 s")
            time.sleep(0.05)
    finally:
        if proc.poll() is None and not ckpt.exists():
            proc.kill()
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill landed"
    assert not (killed / "result.json").exists()
    done = len(read(ckpt)["history"])
    print("killed after", done, "of", generations, "generations")
    assert 2 <= done < generations, done

    # without --resume the folder is refused; with it the run completes
    r = runner.invoke(app, base + ["--out", str(killed)])
    assert r.exit_code != 0 and isinstance(r.exception, CulturalignError) and "--resume" in str(r.exception)
    # --resume reads every setting from the checkpoint: --out alone is enough; a setting typed differently is refused
    r = runner.invoke(app, ["align", "--out", str(killed), "--resume", "--sigma", "3"])
    assert isinstance(r.exception, CulturalignError) and "--sigma" in str(r.exception), repr(r.exception)
    r = runner.invoke(app, ["align", "--out", str(killed), "--resume", "--country", "JP"])
    assert isinstance(r.exception, CulturalignError) and "China" in str(r.exception), repr(r.exception)
    r = runner.invoke(app, ["align", "--out", str(killed), "--resume", "--sigma", "2"])  # the same value is fine
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert read(ckpt)["finished"] is True
    r = runner.invoke(app, ["align", "--out", str(killed), "--resume"])
    assert r.exit_code == 0 and "nothing to do" in r.output, r.output

    ref = tmp_path / "ref"
    r = runner.invoke(app, base + ["--out", str(ref)])
    assert r.exit_code == 0, r.output + repr(r.exception)

    a, b = read(ref / "result.json"), read(killed / "result.json")
    assert len(a["history"]) == generations and a["evaluations"] == budget
    assert losses(b) == losses(a)
    assert b["profiles"]["aligned"]["indices"] == a["profiles"]["aligned"]["indices"]
    assert b["profiles"]["aligned"]["items"] == a["profiles"]["aligned"]["items"]
    assert torch.equal(prompt_tensor(killed), prompt_tensor(ref))


def test_cli_experts_build_order_and_contrast(runner, tiny_dir, tmp_path):
    """`experts build` passes --order and --contrast to every expert's search and records them in the manifest."""
    out = tmp_path / "reg"
    r = runner.invoke(app, ["experts", "build", "--countries", "CN,JP", "--model", str(tiny_dir), "--optimizer", "de",
                            "--budget", "8", "--popsize", "4", "--tokens", "2", "--dim", "4", "--order", "both",
                            "--contrast", "0.5", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    entries = read(out / "manifest.json")["experts"]
    assert [(e["code"], e["order"], e["contrast"]) for e in entries] == [("CN", "both", 0.5), ("JP", "both", 0.5)]
    settings = read(out / "runs" / "CN" / "result.json")["settings"]
    assert settings["order"] == "both" and settings["contrast"] == 0.5
    r = runner.invoke(app, ["experts", "build", "--countries", "CN", "--model", str(tiny_dir), "--contrast", "2",
                            "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and isinstance(r.exception, CulturalignError), repr(r.exception)
    assert "--contrast" in error_text(r.exception)
