"""Records are written atomically: a writer killed mid-way leaves no result.json."""
import json
import subprocess
import sys
import textwrap

from ncbench.results import RECORD, load_record, write_json_atomic


def test_round_trip(tmp_path):
    write_json_atomic(tmp_path / RECORD, {"status": "complete", "x": [1, 2]})
    assert load_record(tmp_path) == {"status": "complete", "x": [1, 2]}
    assert list(tmp_path.iterdir()) == [tmp_path / RECORD]


def test_undefined_numbers_are_written_as_null(tmp_path):
    """Records are strict JSON (jq, JavaScript): nan and inf, e.g. AUROC with no noisy pair, become null."""
    write_json_atomic(tmp_path / RECORD, {"auroc": float("nan"), "epochs": [{"ap": float("inf"), "f1": 0.5}]})
    text = (tmp_path / RECORD).read_text()

    def refuse(constant):
        raise AssertionError(f"{constant} in {text}")

    assert json.loads(text, parse_constant=refuse) == {"auroc": None, "epochs": [{"ap": None, "f1": 0.5}]}


def test_writer_killed_mid_write_leaves_no_record(tmp_path):
    """A child process starts writing a large record and is killed before the rename."""
    script = textwrap.dedent(f"""
        import json, os, signal
        import ncbench.results as r
        real_dump = json.dump
        def dump_then_die(obj, f, **kw):
            f.write('{{"status": "compl')  # half a record reaches the temporary file
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        r.json.dump = dump_then_die
        from pathlib import Path
        r.write_json_atomic(Path({str(tmp_path)!r}) / "result.json", {{"status": "complete"}})
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    assert not (tmp_path / RECORD).exists()
    assert load_record(tmp_path) is None


def test_existing_record_survives_a_killed_rewrite(tmp_path):
    write_json_atomic(tmp_path / RECORD, {"status": "complete", "v": 1})
    script = textwrap.dedent(f"""
        import os, signal
        import ncbench.results as r
        r.json.dump = lambda obj, f, **kw: (f.write("{{"), f.flush(), os.kill(os.getpid(), signal.SIGKILL))
        from pathlib import Path
        r.write_json_atomic(Path({str(tmp_path)!r}) / "result.json", {{"status": "complete", "v": 2}})
    """)
    subprocess.run([sys.executable, "-c", script])
    assert json.loads((tmp_path / RECORD).read_text()) == {"status": "complete", "v": 1}
