"""The README's regenerate commands name exactly the committed reference grid: every run they expand to has a
record in results/reference, and every record there is one of those runs."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ncbench import sweep
from ncbench.registry import load_plugin_file
from ncbench.results import RECORD, iter_records

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "results" / "reference"


def regenerate_sweeps() -> list[list[str]]:
    """The arguments of each ``ncbench sweep`` line in the README's "Regenerate" code block."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("```bash", text.index("\nRegenerate")) + len("```bash"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    lines = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    return [words[2:] for words in lines if words[:2] == ["ncbench", "sweep"]]


def expanded_run_ids(args: list[str]) -> set[str]:
    """The run ids one sweep line expands to, as ``ncbench sweep`` expands them."""
    parser = argparse.ArgumentParser()
    for flag in ("--methods", "--noise", "--seeds", "--noise-protocol", "--lr", "--out"):
        parser.add_argument(flag)
    parser.add_argument("--plugin", action="append", default=[])
    flags = parser.parse_args(args)
    plugins = [ROOT / path for path in flags.plugin]
    for path in plugins:
        load_plugin_file(path)
    assert Path(flags.out) == Path("results/reference"), args
    settings = dict(noise_protocol=flags.noise_protocol, dataset="synthetic", data_root=None, epochs=None,
                    batch_size=None, lr=None if flags.lr is None else float(flags.lr), model=None, pretrained=None,
                    selection=None, preset=None)
    grid = sweep.expand(sweep.parse_list(flags.methods, str, "--methods"), sweep.parse_list(flags.noise, float, "--noise"),
                        sweep.parse_list(flags.seeds, int, "--seeds"), settings)
    return {job.run_id for job in grid}


def test_regenerate_commands_are_the_committed_grid(monkeypatch):
    for name in ("NCBENCH_PRETRAIN_IMAGES", "NCBENCH_PRETRAIN_EPOCHS"):  # the suite's shrunken pretraining
        monkeypatch.delenv(name, raising=False)
    lines = regenerate_sweeps()
    assert lines, "no ncbench sweep line in the README's Regenerate block"
    expected = set().union(*(expanded_run_ids(args) for args in lines))
    committed = {path.parent.name for path in REFERENCE.glob(f"*/{RECORD}")}
    assert sorted(expected - committed) == [], "README commands name runs without a committed record"
    assert sorted(committed - expected) == [], "committed records no README command regenerates"


def test_readme_states_the_committed_records_count_weights_and_threads():
    """The README's claims above its results table: how many records, one thread each, one set of weights."""
    records = list(iter_records(REFERENCE))
    text = " ".join((ROOT / "README.md").read_text().split())
    assert f"{len(records)} records in all" in text
    assert {record["environment"]["torch_threads"] for record in records} == {1}
    stated = {record["weights_sha256"] for record in records if "weights_sha256" in record}
    assert len(stated) == 1, "records from more than one set of weights"
    unstated = [record["config"] for record in records if "weights_sha256" not in record]
    assert {(config["noise_protocol"], config["seed"]) for config in unstated} == {("hard", 0)}
    assert f"all but the first {len(unstated)} seed-0 records under hard noise" in text
