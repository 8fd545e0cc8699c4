"""`python -m mri` as a user meets it, run in a subprocess: every expected failure is one line
on stderr with exit status 2, nothing is overwritten by a forgotten flag, Ctrl-C says where the
last checkpoint is, and output survives a closed pipe."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mri.config import load_config
from mri.pipeline import prepare_builtin

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TINY = ["--config", "cpu-tiny", "--no-progress"]


def mri(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mri", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=ENV,
    )  # fmt: skip


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = done.stderr.splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 2-step cpu-tiny run (built-in data next to it) to resume, evaluate, refuse."""
    root = tmp_path_factory.mktemp("cli")
    done = mri("train", *TINY, "--out", str(root / "run"), "--iterations", "2",
               "--set", "train.val_every=2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return root / "run"


# Runs each command line of a JSON list (stdin) in its own process, forked from this one after
# `mri.cli` and torch are imported once: real exit statuses and real stderr, as `python -m mri`
# gives them, without paying the import for each of dozens of cases.
DRIVER = r"""
import json, os, sys, tempfile, traceback
from mri.cli import main

results = []
for argv in json.load(sys.stdin):
    err = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        os.dup2(err.fileno(), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    err.seek(0)
    results.append({"rc": os.waitstatus_to_exitcode(status), "stderr": err.read().decode()})
print(json.dumps(results))
"""


def _bad_files(tmp: Path) -> dict[str, Path]:
    text = tmp / "notes.txt"
    text.write_text("not a checkpoint\n")
    noise = tmp / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 40)
    return {"text": text, "noise": noise}


# (subcommand arguments, fragments the one line must hold); "{run}", "{tmp}" are filled in.
BAD_INPUTS = [
    (["bogus"], ["invalid choice", "bogus"]),
    ([], ["required"]),
    (["configs", "--bogus"], ["unrecognized", "--bogus"]),
    (["simulate"], ["--out"]),
    (["simulate", "--out", "{tmp}/s", "--shape", "32"], ["--shape", "32", "H W"]),
    (["simulate", "--out", "{tmp}/s", "--kind", "3d", "--shape", "64", "64"], ["--shape", "D H W"]),
    (["simulate", "--out", "{tmp}/s", "--kind", "4d"], ["--kind", "4d"]),
    (["simulate", "--out", "{tmp}/s", "--coils", "0"], ["--coils", "0"]),
    (["simulate", "--out", "{tmp}/s", "--num-train", "x"], ["--num-train", "'x'"]),
    (["prepare", "dicom", "x", "--out", "y"], ["dicom"]),
    (["prepare", "fastmri", "{tmp}/missing", "--out", "{tmp}/p"], ["missing"]),
    (["train", "--out", "{tmp}/t"], ["--config"]),
    (["train", "--config", "nope", "--out", "{tmp}/t"], ["nope", "cpu-tiny"]),
    (["train", *TINY, "--out", "{tmp}/t", "--set", "train.lr"], ["KEY=VALUE"]),
    (["train", *TINY, "--out", "{tmp}/t", "--set", "train.lr=["], ["not YAML"]),
    (["train", *TINY, "--out", "{tmp}/t", "--set", "train.lr=-1"], ["train.lr", "-1"]),
    (["train", *TINY, "--out", "{tmp}/t", "--set", "train.bogus=1"], ["train.bogus", "unknown"]),
    (["train", *TINY, "--out", "{tmp}/t", "--set", "train.precision=fp16"],
     ["train.precision", "fp16"]),
    (["train", *TINY, "--out", "{tmp}/t", "--method", "pgleam", "--set",
      "train.devices=[0, 1]"], ["train.devices", "cuda:0"]),
    (["train", *TINY, "--out", "{tmp}/t", "--threads", "0"], ["--threads", "'0'"]),
    (["train", *TINY, "--out", "{tmp}/t", "--iterations", "0"], ["train.iterations", "0"]),
    (["train", *TINY, "--out", "{tmp}/t", "--data", "{tmp}/missing"], ["missing"]),
    (["train", *TINY, "--out", "{run}"], ["--resume", "--overwrite", "already holds a run"]),
    (["train", *TINY, "--out", "{run}", "--resume", "--overwrite"], ["--resume", "--overwrite"]),
    (["train", *TINY, "--out", "{run}", "--resume", "--set", "train.splits=1"],
     ["train.splits", "on resume", "--overwrite"]),
    (["train", *TINY, "--out", "{run}", "--resume", "--method", "e2e"], ["train.method"]),
    (["train", *TINY, "--out", "{run}/last.pt"], ["is a file"]),
    (["evaluate", "--data", "{tmp}", "--out", "{tmp}/e"], ["--checkpoint"]),
    (["evaluate", "--checkpoint", "{tmp}/missing.pt", "--data", "{tmp}", "--out", "{tmp}/e"],
     ["missing.pt", "does not exist"]),
    (["evaluate", "--checkpoint", "{run}", "--data", "{tmp}", "--out", "{tmp}/e"],
     ["is a folder", "best.pt"]),
    (["evaluate", "--checkpoint", "{text}", "--data", "{tmp}", "--out", "{tmp}/e"],
     ["notes.txt", "cannot be loaded"]),
    (["evaluate", "--checkpoint", "{noise}", "--data", "{tmp}", "--out", "{tmp}/e"],
     ["noise.pt", "cannot be loaded"]),
    (["evaluate", "--checkpoint", "{run}/best.pt", "--data", "{tmp}/missing", "--out",
      "{tmp}/e"], ["missing"]),
    (["evaluate", "--checkpoint", "{run}/best.pt", "--data", "{tmp}", "--split", "nope",
      "--out", "{tmp}/e"], ["nope"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def bad_input_results(run_dir, tmp_path_factory) -> list[tuple[subprocess.CompletedProcess, dict]]:
    before = {p.name: p.read_bytes() for p in run_dir.glob("*.pt")}
    fills, argvs = [], []
    for args, _ in BAD_INPUTS:
        tmp = tmp_path_factory.mktemp("bad")
        files = _bad_files(tmp)
        fill = {"run": str(run_dir), "tmp": str(tmp), **{k: str(v) for k, v in files.items()}}
        fills.append(fill)
        argvs.append([a.format(**fill) for a in args])
    done = subprocess.run(
        [sys.executable, "-c", DRIVER], input=json.dumps(argvs),
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    # No refusal touched the finished run.
    assert {p.name: p.read_bytes() for p in run_dir.glob("*.pt")} == before
    return [
        (subprocess.CompletedProcess(argv, r["rc"], "", r["stderr"]), fill)
        for argv, r, fill in zip(argvs, results, fills, strict=True)
    ]


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)),
                         ids=[" ".join(a)[:60] for a, _ in BAD_INPUTS])  # fmt: skip
def test_every_subcommand_refuses_bad_input_in_one_line(bad_input_results, case):
    done, fill = bad_input_results[case]
    assert_one_line_error(done, *[f.format(**fill) for f in BAD_INPUTS[case][1]])


def test_the_walk_reaches_every_subcommand():
    subcommands = {"configs", "simulate", "prepare", "train", "evaluate"}
    assert subcommands <= {args[0] for args, _ in BAD_INPUTS if args}


def test_debug_shows_the_traceback_instead(tmp_path):
    done = mri("train", "--config", "nope", "--out", str(tmp_path / "t"), "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr and "ConfigError" in done.stderr


def test_overwrite_replaces_the_whole_run_and_resume_without_checkpoint_starts(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "test").mkdir()
    (run / "test" / "metrics.json").write_text("{}")  # an evaluation of the old model
    done = mri("train", *TINY, "--out", str(run), "--iterations", "1", "--overwrite",
               "--set", "train.val_every=1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not (run / "test").exists()
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 1
    # A job script of a preemptible cluster always passes --resume, even before any checkpoint.
    fresh = tmp_path / "fresh"
    done = mri("train", *TINY, "--out", str(fresh), "--iterations", "1", "--resume")
    assert done.returncode == 0, done.stderr
    assert "no checkpoint" in done.stdout and "starting from step 0" in done.stdout
    assert (fresh / "last.pt").is_file()


def test_train_checks_the_test_split_before_training(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepare_builtin(load_config("cpu-tiny"), tmp_path / "built"), data)
    broken = sorted((data / "test").glob("*.h5"))[0]
    broken.write_bytes(broken.read_bytes()[:200])
    run = tmp_path / "run"
    start = time.perf_counter()
    done = mri("train", *TINY, "--out", str(run), "--data", str(data), "--evaluate")
    assert_one_line_error(done, broken.name)
    assert not (run / "last.pt").exists(), "training ran before the test split was checked"
    assert time.perf_counter() - start < 120


def test_a_raw_fastmri_file_as_training_data_hints_at_prepare(tmp_path):
    h5py = pytest.importorskip("h5py")
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        with h5py.File(tmp_path / split / "file1000001.h5", "w") as f:
            f["kspace"] = torch.zeros(2, 4, 8, 8, dtype=torch.complex64).numpy()
            f["ismrmrd_header"] = b"<ismrmrdHeader/>"
    done = mri("train", *TINY, "--out", str(tmp_path / "run"), "--data", str(tmp_path))
    assert_one_line_error(done, "raw fastMRI", "python -m mri prepare fastmri")


def test_ctrl_c_says_where_the_last_checkpoint_is_and_log_lines_stream(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mri", "train", *TINY, "--out", str(run), "--iterations",
         "100000", "--set", "train.val_every=1", "--set", "train.log_every=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV,
        # A shell starts background jobs with SIGINT ignored and the child would inherit that
        # (Python then installs no KeyboardInterrupt handler): give it a terminal's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        seen = []
        # --no-progress prints every log line as it is written, not at the end.
        while not any("validation" in line for line in seen):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            seen.append(line)
        assert any(line.startswith("step 1/100000: loss per stage") for line in seen), seen
        assert proc.poll() is None
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(run / "last.pt") in err and "--resume" in err


def test_configs_survives_a_closed_pipe_and_cuts_no_word(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mri", "configs"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=ENV,
    )  # fmt: skip
    proc.stdout.close()  # like `| head` exiting before the listing is written
    _, err = proc.communicate(timeout=120)
    assert err == b"", err.decode()
    done = mri("configs")
    assert done.returncode == 0
    for line in done.stdout.splitlines():
        name, _, shown = line.partition(" ")
        description = " ".join(load_config(name).description.split())
        shown = shown.strip().removesuffix(" ...")
        assert description.startswith(shown), (shown, description)
        rest = description[len(shown) :]
        assert rest == "" or rest.startswith(" "), f"{name}: cut mid-word at {shown[-12:]!r}"


def test_simulate_help_shows_defaults_and_what_counts_mean():
    done = mri("simulate", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "default: 32" in text and "training slices" in text


def test_train_honours_threads_and_says_where_built_in_data_went(tmp_path):
    done = mri("train", *TINY, "--out", str(tmp_path / "run"), "--iterations", "1",
               "--threads", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "torch threads: 1" in done.stdout
    data_line = next(line for line in done.stdout.splitlines() if line.startswith("data:"))
    assert Path(data_line.split(" in ", 1)[1]).is_dir()


def test_evaluate_writes_metrics_of_a_run(run_dir, tmp_path):
    data = prepare_builtin(load_config("cpu-tiny"), run_dir.parent)
    done = mri("evaluate", "--checkpoint", str(run_dir / "best.pt"), "--data", str(data),
               "--out", str(tmp_path / "e"), "--no-figures", "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["gleam"]["psnr"] > 0
