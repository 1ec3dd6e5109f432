"""Bad input of every kind: one line on stderr naming the flag, file or value, the documented exit code, no
traceback, nothing half-written. The CLI runs in-process (``ncbench.cli.main``), as a user's shell calls it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ncbench import config, lock
from ncbench.cli import main
from ncbench.registry import METHODS

MINI = ("--dataset", "synthetic-mini", "--epochs", "1")
REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference"  # the committed records


def invoke(capsys, *argv: object) -> tuple[int, str, str]:
    """Run ``ncbench argv`` in this process; return (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(capsys, *argv: object, code: int = 2) -> str:
    got, _, err = invoke(capsys, *argv)
    assert got == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def run_folders(out: Path) -> list[Path]:
    """The run folders under ``out`` (the lock folder is not a run)."""
    return [p for p in out.iterdir() if not p.name.startswith(".")] if out.exists() else []


def run_id(method: str = "clip", **flags) -> str:
    flags = {"noise": 0.0, "seed": 0, "dataset": "synthetic-mini", "epochs": 1, **flags}
    return config.resolve(METHODS.get(method), flags).run_id


# ---------------------------------------------------------------- the command line itself

USAGE = [
    (("run", "--noise", "abc"), "--noise"),
    (("run", "--seed", "1.5"), "--seed"),
    (("run", "--epochs", "two"), "--epochs"),
    (("run", "--bogus"), "--bogus"),
    (("sweep",), "--methods"),
    (("noise", "import"), "path"),
    (("frob",), "frob"),
    (("list", "--plugin"), "--plugin"),
    (("leaderboard", "--format"), "--format"),
]


@pytest.mark.parametrize("argv,word", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors_are_one_line(capsys, argv, word):
    line = one_error_line(capsys, *argv)
    assert word in line and "--help" in line


@pytest.mark.parametrize("argv", [(), ("noise",)], ids=["ncbench", "ncbench noise"])
def test_bare_command_prints_help(capsys, argv):
    code, out, err = invoke(capsys, *argv)
    assert code == 0 and "Usage" in out and "Traceback" not in err


# ---------------------------------------------------------------- refused before any work

REFUSED = [
    (("--method", "nope"), "unknown method"),
    (("--dataset", "nope"), "nope"),
    (("--noise-protocol", "nope", "--noise", "0.2"), "nope"),
    (("--noise", "1.0"), "--noise"),
    (("--noise", "-0.1"), "--noise"),
    (("--lr", "-1"), "--lr"),
    (("--lr", "nan"), "--lr"),
    (("--lr", "0"), "--lr"),
    (("--epochs", "0"), "--epochs"),
    (("--batch-size", "0"), "--batch-size"),
    (("--batch-size", "100000"), "--batch-size 100000"),
    (("--param", "nope=1"), "--param nope"),
    (("--param", "novalue"), "--param"),
    (("--method", "gmm-filter", "--param", "p_threshold=high"), "p_threshold=high"),
    (("--method", "gmm-filter", "--param", "p_threshold=1.5"), "p_threshold"),
    (("--selection", "first"), "--selection"),
    (("--clean-fraction", "0.7"), "--clean-fraction"),
    (("--method", "mscn", "--clean-fraction", "0"), "clean"),
    (("--dataset", "f30k"), "--data-root"),
    (("--dataset", "f30k", "--data-root", "/nonexistent/f30k"), "/nonexistent/f30k"),
    (("--noise-file", "/nonexistent/noise.npy"), "noise.npy"),
    (("--model", "no-such-arch"), "no-such-arch"),
]


@pytest.mark.parametrize("flags,word", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_run_refuses_bad_settings_and_leaves_no_run_folder(capsys, tmp_path, flags, word):
    line = one_error_line(capsys, "run", *MINI, *flags, "--out", tmp_path / "out")
    assert word in line
    assert run_folders(tmp_path / "out") == []


def test_noise_file_with_a_protocol(capsys, tmp_path):
    path = tmp_path / "f30k_precomp_0.2.npy"
    np.save(path, np.arange(10))
    line = one_error_line(capsys, "run", *MINI, "--noise-file", path, "--noise-protocol", "hard", "--out", tmp_path)
    assert "--noise-file" in line and "--noise-protocol" in line


def test_malformed_noise_file(capsys, tmp_path):
    path = tmp_path / "noise.npy"
    path.write_bytes(b"not numpy")
    line = one_error_line(capsys, "run", *MINI, "--noise-file", path, "--out", tmp_path / "out")
    assert str(path) in line and run_folders(tmp_path / "out") == []


@pytest.mark.parametrize("where,word", [("--out", "/proc/ncbench-runs"), ("--cache-dir", "/proc/ncbench-cache")])
def test_unwritable_folders(capsys, tmp_path, where, word):
    """/proc refuses new folders even to root, so this holds in CI."""
    flags = {"--out": tmp_path / "out", "--cache-dir": tmp_path / "cache", where: word}
    line = one_error_line(capsys, "run", *MINI, *[x for kv in flags.items() for x in kv])
    assert f"{where} {word}" in line and "writable" in line


def test_out_that_is_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "--out" in one_error_line(capsys, "run", *MINI, "--out", tmp_path / "file")


@pytest.mark.parametrize("content,word", [(None, "missing.py"), ("def broken(:\n", "broken.py")], ids=["missing", "syntax"])
def test_bad_plugin_file(capsys, tmp_path, content, word):
    path = tmp_path / word
    if content is not None:
        path.write_text(content)
    assert word in one_error_line(capsys, "run", *MINI, "--plugin", path, "--out", tmp_path / "out")


def test_plugin_name_cannot_escape_the_results_folder(capsys, tmp_path):
    plugin = tmp_path / "escape.py"
    plugin.write_text("from ncbench.methods.clip import CLIPFineTune\n\n"
                      "class Escape(CLIPFineTune):\n    name = '../escape'\n")
    out = tmp_path / "deep" / "out"
    line = one_error_line(capsys, "run", *MINI, "--plugin", plugin, "--method", "../escape", "--out", out)
    assert "../escape" in line
    assert not (tmp_path / "deep" / "escape_synthetic-mini").exists() and run_folders(out) == []


# ---------------------------------------------------------------- the other commands

OTHER = [
    (("sweep", "--methods", "clip", "--noise", "abc"), "--noise"),
    (("sweep", "--methods", "clip", "--seeds", "x"), "--seeds"),
    (("sweep", "--methods", "clip,nope"), "unknown method"),
    (("sweep", "--methods", "clip", "--jobs", "0"), "--jobs"),
    (("sweep", "--methods", "clip", "--launcher", "cloud"), "--launcher"),
    (("sweep", "--methods", "clip", "--partition", "gpu"), "--partition"),
    (("leaderboard", "--format", "xls"), "--format"),
    (("leaderboard", "--metric", "accuracy"), "accuracy"),
    (("plot", "--metric", "accuracy"), "accuracy"),
    (("list", "gadgets"), "gadgets"),
    (("noise", "export", "--format", "tsv"), "--format"),
    (("noise", "import", "/nonexistent/noise.npy"), "noise.npy"),
]


@pytest.mark.parametrize("argv,word", OTHER, ids=[" ".join(a) for a, _ in OTHER])
def test_other_commands_refuse_bad_input(capsys, tmp_path, argv, word):
    extra = {"sweep": ("--out", tmp_path / "out"), "leaderboard": ("--results", REFERENCE),
             "plot": ("--results", REFERENCE, "--out", tmp_path / "plots")}.get(argv[0], ())
    assert word in one_error_line(capsys, *argv, *extra)


# ---------------------------------------------------------------- real-data files

def _karpathy(root: Path, filename: str = "{k}.jpg", caption: str = "a red box on a blue background") -> Path:
    entries = []
    root.mkdir(parents=True, exist_ok=True)
    for k, split in enumerate(["train"] * 4 + ["val"] * 2 + ["test"] * 2):
        name = filename.format(k=k)
        if not name.startswith(".."):
            (root / "images").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), (20 * k, 90, 200)).save(root / "images" / name)
        entries.append({"filename": name, "split": split, "sentences": [{"raw": caption}] * 5})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    return root


def test_image_names_cannot_leave_the_data_root(capsys, tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "secret.jpg")
    root = _karpathy(tmp_path / "f30k", filename="../../secret.jpg")
    line = one_error_line(capsys, "run", "--dataset", "karpathy-f30k", "--data-root", root, "--epochs", "1",
                          "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert "outside" in line and "dataset_flickr30k.json" in line


def test_empty_captions_are_refused(capsys, tmp_path):
    root = _karpathy(tmp_path / "f30k", caption="   ")
    line = one_error_line(capsys, "run", "--dataset", "karpathy-f30k", "--data-root", root, "--epochs", "1",
                          "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert "empty" in line and "dataset_flickr30k.json" in line
    assert run_folders(tmp_path / "out") == []


# ---------------------------------------------------------------- state files

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_a_pickle_payload_is_refused(capsys, tmp_path):
    run_dir = tmp_path / "out" / run_id()
    run_dir.mkdir(parents=True)
    marker = tmp_path / "executed"
    torch.save({"epoch": 0, "x": _Payload(marker)}, run_dir / "checkpoint.pt")
    line = one_error_line(capsys, "run", *MINI, "--out", tmp_path / "out")
    assert "checkpoint.pt" in line and "refusing" in line
    assert not marker.exists() and not (run_dir / "result.json").exists()


def test_run_held_by_another_process_is_refused(capsys, tmp_path):
    run_dir = tmp_path / "out" / run_id()
    with lock.hold(run_dir):
        line = one_error_line(capsys, "run", *MINI, "--out", tmp_path / "out", code=lock.RUN_LOCKED_EXIT)
    assert "another process" in line and run_id() in line


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory):
    """One tiny run started over a zero-byte checkpoint and a truncated record: both are healed."""
    out = tmp_path_factory.mktemp("damaged")
    run_dir = out / run_id()
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"")
    (run_dir / "result.json").write_text('{"schema": 2, "run_id": "x", "sta')
    return out, run_dir


def test_damaged_checkpoint_and_record_are_healed(capsys, damaged_run):
    out, run_dir = damaged_run
    code, stdout, err = invoke(capsys, "run", *MINI, "--out", out)
    assert code == 0 and "Traceback" not in err, err
    assert "unreadable checkpoint" in err and "unreadable record" in err
    record = json.loads((run_dir / "result.json").read_text())
    assert record["status"] == "complete" and record["resumes"] == 0
    assert list(run_dir.glob("checkpoint.pt.corrupt-*"))
    code, _, err = invoke(capsys, "leaderboard", "--results", out)
    assert code == 0 and "Traceback" not in err


def test_leaderboard_skips_an_unreadable_record_with_a_warning(capsys, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "result.json").write_text("{trunc")
    code, _, err = invoke(capsys, "leaderboard", "--results", tmp_path)
    assert "Traceback" not in err and str(tmp_path / "r" / "result.json") in err
