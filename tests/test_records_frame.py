"""``ncbench.load_records`` and the shipped JSON Schema of a record, on the committed records and a fresh run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import ncbench
from ncbench.errors import UserError
from ncbench.records_frame import record_schema

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference"
COMMITTED = sorted(REFERENCE.glob("*/result.json"))


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = record_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory) -> Path:
    """The run folder of a tiny real run of the current harness (schema 2)."""
    from ncbench.cli import main

    out = tmp_path_factory.mktemp("runs")
    main(["run", "--dataset", "synthetic-mini", "--epochs", "1", "--method", "gmm-filter", "--out", str(out)])
    (record,) = out.glob("*/result.json")
    return record.parent


def errors(validator, record: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(record)]


@pytest.mark.parametrize("path", COMMITTED, ids=[p.parent.name for p in COMMITTED])
def test_every_committed_record_validates(validator, path):
    assert errors(validator, json.loads(path.read_text())) == []


def test_a_record_of_the_current_harness_validates(validator, fresh_run):
    record = json.loads((fresh_run / "result.json").read_text())
    assert record["schema"] == 2 and errors(validator, record) == []
    broken = {**record, "test": {"1k": {k: v for k, v in record["test"]["1k"].items() if k != "rsum"}}}
    assert any("'rsum' is a required property" in e for e in errors(validator, broken))
    assert errors(validator, {**record, "schema": 1})  # schema 1 had no ranks file nor resume count
    assert errors(validator, {**record, "surprise": 1})


def test_records_as_a_frame(fresh_run, tmp_path):
    frame = ncbench.load_records(REFERENCE)
    assert len(frame) == len(COMMITTED) and frame.run_id.is_unique and list(frame.run_id) == sorted(frame.run_id)
    assert list(frame.columns[:6]) == ["run_id", "method", "method_version", "dataset", "protocol", "ratio"]
    row = frame.iloc[0]
    record = json.loads((Path(row.path) / "result.json").read_text())
    assert row.test_1k_rsum == record["test"]["1k"]["rsum"] and row.seed == record["config"]["seed"]
    assert row.zero_shot_1k_i2t_r1 == record["zero_shot"]["1k"]["i2t_r1"] and row.protocol == record["noise"]["protocol"]
    assert row.timing_train_s == record["timing"]["train_s"] and row.schema == record["schema"]
    table = frame.groupby(["method", "ratio"])["test_1k_rsum"].agg(["mean", "std"])  # the docstring's example
    clean_clip = frame[(frame.method == "clip") & (frame.ratio == 0)]
    assert table.loc[("clip", 0.0), "mean"] == pytest.approx(clean_clip.test_1k_rsum.mean())

    shutil.copytree(fresh_run, tmp_path / "mine" / fresh_run.name)
    (tmp_path / "mine" / "broken").mkdir()
    (tmp_path / "mine" / "broken" / "result.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable record"):
        mine = ncbench.load_records(tmp_path / "mine")
    (fresh,) = mine.itertuples()
    record = json.loads((fresh_run / "result.json").read_text())
    assert fresh.method == "gmm-filter" and fresh.resumes == 0 and fresh.schema == 2
    assert fresh.detection_kept_frac == record["epochs"][-1]["detection"]["kept_frac"]
    assert fresh.param_p_threshold == record["config"]["params"]["p_threshold"]
    assert len(ncbench.load_records(fresh_run / "result.json")) == 1 == len(ncbench.load_records(fresh_run))
    with pytest.warns(UserWarning, match="unreadable record"):
        assert list(ncbench.load_records(tmp_path / "mine" / "broken").columns)[:2] == ["run_id", "method"]
    with pytest.raises(UserError, match="no such file or folder"):
        ncbench.load_records(tmp_path / "nowhere")
