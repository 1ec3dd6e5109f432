"""``ncbench export``: a kept model written where open_clip's own loader finds it, with the same embeddings."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from ncbench.backbone import load_backbone
from ncbench.errors import UserError
from ncbench.export import RUN_MODEL, export_model, load_run_model, save_run_model

TINY = "ncbench-tiny-bpe"
CAPTIONS = ["a red disk on a blue background", "two dogs", "a bar"]


def trained_like(seed: int) -> torch.nn.Module:
    """The tiny BPE model with weights no initialisation gives (as if fine-tuned)."""
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def embeddings(model: torch.nn.Module, tokenize) -> tuple[np.ndarray, np.ndarray]:
    torch.manual_seed(123)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        return model.encode_image(images).numpy(), model.encode_text(tokenize(CAPTIONS)).numpy()


OPEN_CLIP_ONLY = textwrap.dedent('''
    import sys, numpy as np, torch, open_clip
    assert "ncbench" not in sys.modules
    out, weights, config, folder = sys.argv[1:]
    open_clip.add_model_config(config)  # the config written beside the weights
    loaded = {"file": open_clip.create_model_and_transforms("ncbench-tiny-bpe", pretrained=weights)[0],
              "folder": open_clip.create_model_and_transforms("local-dir:" + folder)[0]}
    tokenize = open_clip.get_tokenizer("ncbench-tiny-bpe")
    torch.manual_seed(123)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        np.savez(out, **{f"{k}.{w}": m.eval().encode_image(images).numpy() if w == "img" else
                         m.encode_text(tokenize(%r)).numpy() for k, m in loaded.items() for w in ("img", "txt")})
''' % CAPTIONS)


def test_round_trip_through_open_clips_own_loader(tmp_path):
    models = [trained_like(0), trained_like(1)]
    save_run_model(tmp_path / "run", models, TINY)
    name, count, state = load_run_model(tmp_path / "run", member=1)
    assert (name, count) == (TINY, 2)
    tokenize = open_clip.get_tokenizer(TINY)
    expected = embeddings(models[1], tokenize)
    for out in (tmp_path / "model.pt", tmp_path / "model.safetensors", tmp_path / "hub"):
        files = export_model(state, name, out)
        assert (tmp_path / f"{TINY}.json").is_file() if out.suffix else {f.name for f in files} == {
            "open_clip_config.json", "open_clip_model.safetensors"}
        spec = (f"local-dir:{out}",) if not out.suffix else (TINY,)
        model = open_clip.create_model_and_transforms(*spec, **({"pretrained": str(out)} if out.suffix else {}))[0]
        got = embeddings(model.eval(), tokenize)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected)), out
    # in a fresh interpreter that never imports ncbench: open_clip alone finds the config
    (tmp_path / "load.py").write_text(OPEN_CLIP_ONLY)
    proc = subprocess.run([sys.executable, "load.py", "emb.npz", str(tmp_path / "model.pt"),
                           str(tmp_path / f"{TINY}.json"), str(tmp_path / "hub")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "emb.npz") as fresh:  # another process may take other kernels (threads, attention path)
        for kind in ("file", "folder"):
            np.testing.assert_allclose(fresh[f"{kind}.img"], expected[0], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(fresh[f"{kind}.txt"], expected[1], rtol=1e-5, atol=1e-5)


def test_export_command_on_a_real_run(tmp_path, cli):
    """A committed reference run (its record as the harness wrote it), given the model the harness keeps."""
    source = min((Path(__file__).resolve().parents[1] / "results" / "reference").glob("clip_*/result.json"))
    run_dir, run_id = tmp_path / "runs" / source.parent.name, source.parent.name
    shutil.copytree(source.parent, run_dir)
    record = run_dir / "result.json"
    cache = Path(os.environ["NCBENCH_CACHE"])  # the session's pretrained tiny weights
    proc = cli("export", run_id, "--results", tmp_path / "runs", "--out", tmp_path / "m.pt")
    assert proc.returncode == 2 and "kept no model" in proc.stderr and "--keep-model" in proc.stderr
    config = json.loads(record.read_text())["config"]
    model = load_backbone(config["model"], config["pretrained"], cache).model.eval()  # as the harness keeps it
    save_run_model(run_dir, [model], config["model"])
    proc = cli("export", run_dir, "--out", tmp_path / "m.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert f'pretrained="{tmp_path / "m.safetensors"}"' in proc.stdout and "tiny_tokenizer" in proc.stdout
    exported = open_clip.create_model_and_transforms(config["model"], pretrained=str(tmp_path / "m.safetensors"))[0]
    kept = model.state_dict()
    assert all(torch.equal(value, kept[key]) for key, value in exported.state_dict().items())
    for args, expected in (((run_dir, "--out", tmp_path / "m.pt", "--member", "1"), "--member 1: the run kept 1 model"),
                           (("nope", "--results", tmp_path / "runs", "--out", tmp_path / "m.pt"), "no run of that id"),
                           ((run_dir, "--out", tmp_path / "m.zip"), "expected a .pt, .pth, .bin, .safetensors file")):
        proc = cli("export", *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr


def test_a_damaged_kept_model_is_one_line(tmp_path):
    (tmp_path / RUN_MODEL).write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_run_model(tmp_path)
