"""Real-data adapters end to end on generated fixtures in each on-disk layout (datasets/README.md).

Fixtures are real JPEG files drawn with PIL; runs use the real ``ncbench`` command line, in this process, and the
tiny ``ncbench-tiny-bpe`` open_clip model (open_clip's BPE tokenizer, 64 px) with random weights saved to a file.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageDraw

import ncbench.backbone as backbone
from ncbench import cli as ncbench_cli
from ncbench import config, evaluate
from ncbench.data import ImageNormalizer, cached_images, decode_image
from ncbench.errors import UserError
from ncbench.lock import LOCKS
from ncbench.presets import PRESETS, preset_values
from ncbench.registry import DATASETS, METHODS

TINY = "ncbench-tiny-bpe"
SIZE = 64
COLOURS = ("red", "green", "blue", "yellow", "white", "black")
SHAPES = ("box", "disk", "bar")
RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (230, 220, 50),
       "white": (240, 240, 240), "black": (10, 10, 10)}


# ---------------------------------------------------------------- fixtures: images, captions, layouts

def draw_image(path: Path, k: int, size: tuple[int, int] = (96, 72), mode: str = "RGB") -> list[str]:
    """Write a JPEG of a coloured shape on a coloured background; returns five captions describing it."""
    rng = np.random.default_rng(k)
    fg, bg = (COLOURS[i] for i in rng.choice(len(COLOURS), 2, replace=False))
    shape = SHAPES[k % len(SHAPES)]
    image = Image.new("RGB", size, RGB[bg])
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4) if shape != "bar" else (w // 8, h // 3, 7 * w // 8, 2 * h // 3)
    (ImageDraw.Draw(image).ellipse if shape == "disk" else ImageDraw.Draw(image).rectangle)(box, fill=RGB[fg])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert(mode).save(path, quality=90)
    return [f"a {fg} {shape} on a {bg} background", f"{bg} background with a {fg} {shape}",
            f"picture {k}: one {fg} {shape}", f"a {shape} coloured {fg}", f"the {fg} {shape} in the middle"]


SPLIT_SIZES = {"train": 12, "dev": 4, "test": 4}  # images per split (5 captions each; CC: x2 images, 1 caption)


def write_scan(root: Path, family: str) -> dict:
    """NPC's SCAN-split layout: train ids one per image, dev/test ids one per caption (datasets/README.md#scan-split)."""
    ann = root / "annotations" / "scan_split"
    ann.mkdir(parents=True)
    names, k, truth = [], 0, {}
    for split, n in SPLIT_SIZES.items():
        caps, ids, files = [], [], []
        for _ in range(n * (2 if family == "cc" else 1)):
            if family == "f30k":
                image_id, name = str(len(names)), f"{1000092795 + 7 * k}.jpg"
                names.append(name)
            elif family == "coco":
                image_id = str(391895 + 13 * k)
                name = f"COCO_2014_{int(image_id):012d}.jpg"
            else:
                image_id = str(3000 + k)
                name = f"{image_id}.jpg"
            sentences = draw_image(root / "images" / name, k, mode="L" if k == 3 else "RGB")[: 1 if family == "cc" else 5]
            caps += sentences
            ids += [image_id] if split == "train" else [image_id] * len(sentences)
            files.append(name)
            k += 1
        (ann / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
        (ann / f"{split}_ids.txt").write_text("\n".join(ids) + "\n")
        truth[split] = (files, caps)
    if family == "f30k":
        (ann / "image_name.txt").write_text("\n".join(names) + "\n")
    return truth


def write_karpathy(root: Path, family: str) -> dict:
    """Karpathy's dataset_{flickr30k,coco}.json: COCO entries carry filepath; one COCO image has 6 sentences."""
    entries, truth = [], {"train": ([], []), "dev": ([], []), "test": ([], [])}
    k = 0
    for split, n in SPLIT_SIZES.items():
        for j in range(n):
            raw_split = {"train": "restval" if j % 3 == 0 else "train", "dev": "val", "test": "test"}[split]
            folder = "" if family == "f30k" else ("train2014" if raw_split == "train" else "val2014")
            name = f"{1000092795 + 7 * k}.jpg" if family == "f30k" else f"COCO_{folder}_{391895 + 13 * k:012d}.jpg"
            sentences = draw_image(root / "images" / folder / name, k)
            if family == "coco" and k == 0:
                sentences.append("a sixth sentence that SCAN's five-per-image split leaves out")
            entry = {"filename": name, "imgid": k, "split": raw_split,
                     "sentences": [{"raw": s + " ", "tokens": s.split()} for s in sentences]}
            if folder:
                entry["filepath"] = folder
            entries.append(entry)
            truth[split][0].append(str(Path(folder) / name))
            truth[split][1].extend(sentences[:5])
            k += 1
    json_name = "dataset_flickr30k.json" if family == "f30k" else "dataset_coco.json"
    (root / json_name).write_text(json.dumps({"images": entries, "dataset": family}))
    return truth


def write_cc152k(root: Path) -> dict:
    """NCR's cc152k_precomp/{split}_caps.tsv (id<TAB>caption) with images/<id>.jpg downloaded by the user."""
    (root / "cc152k_precomp").mkdir(parents=True)
    truth, k = {}, 0
    for split, n in SPLIT_SIZES.items():
        rows = []
        for _ in range(2 * n):
            image_id = f"{1100 + k}_{1931474802 + k}"
            rows.append((image_id, draw_image(root / "images" / f"{image_id}.jpg", k)[0]))
            k += 1
        with open(root / "cc152k_precomp" / f"{split}_caps.tsv", "w", newline="") as f:
            csv.writer(f, delimiter="\t", lineterminator="\r\n").writerows(rows)
        truth[split] = ([f"{i}.jpg" for i, _ in rows], [c for _, c in rows])
    return truth


LAYOUTS = {
    "f30k": lambda root: write_scan(root, "f30k"),
    "coco": lambda root: write_scan(root, "coco"),
    "cc120k": lambda root: write_scan(root, "cc"),
    "karpathy-f30k": lambda root: write_karpathy(root, "f30k"),
    "karpathy-coco": lambda root: write_karpathy(root, "coco"),
    "cc152k": write_cc152k,
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Random weights of the tiny BPE model, saved as a checkpoint file (what --pretrained PATH reads)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / f"{TINY}.pt"
    torch.save(open_clip.create_model(TINY).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    out = {}
    for name, write in LAYOUTS.items():
        root = tmp_path_factory.mktemp(name)
        out[name] = (root, write(root))
    return out


def run_args(dataset: str, root: Path, weights: Path, tmp: Path, *extra: str) -> list[str]:
    return ["run", "--dataset", dataset, "--data-root", str(root), "--model", TINY, "--pretrained", str(weights),
            "--epochs", "1", "--batch-size", "8", "--out", str(tmp / "runs"), "--cache-dir", str(tmp / "cache"), *extra]


def run_folders(out: Path) -> list[Path]:
    """What runs left in ``out`` besides the run locks."""
    return [p for p in out.iterdir() if p.name != LOCKS]


def one_error_line(capsys, args: list[str]) -> str:
    """Run the real CLI entry point in-process; it must exit 2 with exactly one line on stderr."""
    with pytest.raises(SystemExit) as exit_:
        ncbench_cli.main(args)
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------- end to end, one CLI run per layout

@pytest.mark.parametrize("dataset", [name if name in ("f30k", "coco", "cc152k") else  # one per family by default
                                     pytest.param(name, marks=pytest.mark.slow) for name in LAYOUTS])
def test_run_end_to_end(cli, roots, weights, tmp_path, dataset):
    root, truth = roots[dataset]
    extra = ("--preset", "paper", "--lr", "1e-4") if dataset == "f30k" else ()
    noise = ("--noise", "0") if dataset.startswith("cc") else ("--noise", "0.4")
    proc = cli(*run_args(dataset, root, weights, tmp_path, *noise, *extra))
    assert proc.returncode == 0, proc.stderr
    (record_file,) = (tmp_path / "runs").glob("*/result.json")
    record = json.loads(record_file.read_text())
    assert record["status"] == "complete" and record["dataset"]["name"] == dataset
    real_noise = dataset.startswith("cc")
    assert record["dataset"]["has_clean_mask"] is (not real_noise)
    assert record["dataset"]["train_pairs"] == len(truth["train"][1])
    meta = record["dataset"]["meta"]
    assert meta["captions"] == {s: len(truth[s][1]) for s in truth}
    assert meta["images"] == {s: len(truth[s][0]) for s in truth}
    coco = "coco" in dataset
    assert list(record["test"]) == record["dataset"]["test_protocols"] == (["coco-5k"] if coco else ["1k"])
    if coco:
        assert "needs exactly 5000" in meta["skipped_protocols"]["coco-1k"]
    assert record["config"]["model"] == TINY and record["config"]["pretrained"] == str(weights)
    if dataset == "f30k":  # the paper preset under explicit flags (docs/methods/clip.md#paper-preset), and the record keeps both
        cfg = record["config"]
        assert cfg["preset"] == "paper"
        assert (cfg["weight_decay"], cfg["warmup_steps"], cfg["lr"], cfg["batch_size"]) == (0.2, 500, 1e-4, 8)
    caches = list((tmp_path / "cache" / "images").glob(f"{dataset}-*-{SIZE}px-*.npy"))
    assert len(caches) == 3 and not list((tmp_path / "cache" / "images").glob(".*tmp"))


# ---------------------------------------------------------------- loaders, in-process

@pytest.mark.parametrize("dataset", list(LAYOUTS))
def test_loader_pairs_every_caption_with_its_own_image_file(roots, tmp_path, dataset):
    root, truth = roots[dataset]
    pairs = DATASETS.get(dataset)().load(root, tmp_path, SIZE)
    for split in ("train", "dev", "test"):
        data, (files, captions) = getattr(pairs, split), truth[split]
        assert data.captions == tuple(captions)
        assert data.images.shape == (len(files), SIZE, SIZE, 3) and isinstance(data.images, np.memmap)
        for c in range(0, data.n_captions, 3):
            file = files[data.caption_image[c]]
            assert np.array_equal(data.images[data.caption_image[c]], decode_image(root / "images" / file, SIZE))
    assert pairs.has_clean_mask is not DATASETS.get(dataset).real_noise


def test_cache_is_built_once_and_rebuilt_when_a_file_changes(roots, tmp_path):
    root, truth = roots["cc152k"]
    files = [root / "images" / f for f in truth["dev"][0]]
    first = cached_images(files, SIZE, tmp_path, "x-dev")
    (path,) = (tmp_path / "images").iterdir()
    mtime = path.stat().st_mtime_ns
    again = cached_images(files, SIZE, tmp_path, "x-dev")
    assert isinstance(again, np.memmap) and not again.flags.writeable
    assert np.array_equal(first, again) and path.stat().st_mtime_ns == mtime
    changed = tmp_path / "changed.jpg"
    draw_image(changed, 99)
    third = cached_images([changed, *files[1:]], SIZE, tmp_path, "x-dev")
    assert len(list((tmp_path / "images").iterdir())) == 2
    assert not np.array_equal(third[0], first[0]) and np.array_equal(third[1:], first[1:])


@pytest.mark.parametrize("mode,size", [("RGB", (500, 375)), ("L", (375, 500)), ("P", (120, 50))])
def test_cached_pixels_match_open_clip_val_preprocessing(tmp_path, mode, size):
    """Cache (uint8) -> the harness's normaliser equals open_clip's val transform of the file (docs/methods/clip.md#clip-a5)."""
    path = tmp_path / ("x.png" if mode == "P" else "x.jpg")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    (image.quantize(64) if mode == "P" else image.convert(mode)).save(path)
    cached = cached_images([path], SIZE, tmp_path, "one")
    mine = ImageNormalizer(backbone.OPENAI_MEAN, backbone.OPENAI_STD, SIZE, torch.device("cpu"))(cached)
    theirs = open_clip.image_transform(SIZE, is_train=False)(Image.open(path))
    assert mine.shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(mine[0], theirs, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- one-line errors

def test_missing_image(roots, tmp_path, weights, capsys):
    root, truth = roots["cc120k"]
    broken = tmp_path / "cc"
    (broken / "images").mkdir(parents=True)
    os.symlink(root / "annotations", broken / "annotations", target_is_directory=True)
    for f in truth["train"][0][1:]:
        os.link(root / "images" / f, broken / "images" / f)
    line = one_error_line(capsys, run_args("cc120k", broken, weights, tmp_path, "--noise", "0"))
    assert "cc120k-train: 1 of 24 image files missing" in line and truth["train"][0][0] in line


def test_caption_id_count_mismatch(roots, tmp_path, weights, capsys):
    root, _ = roots["coco"]
    broken = tmp_path / "coco"
    (broken / "annotations").mkdir(parents=True)
    os.symlink(root / "images", broken / "images", target_is_directory=True)
    ann = broken / "annotations" / "scan_split"
    ann.mkdir()
    for f in (root / "annotations" / "scan_split").iterdir():
        (ann / f.name).write_text(f.read_text())
    (ann / "dev_ids.txt").write_text("\n".join((ann / "dev_ids.txt").read_text().split()[:-1]) + "\n")
    line = one_error_line(capsys, run_args("coco", broken, weights, tmp_path))
    assert "dev_ids.txt: 19 ids for 20 captions" in line and "one id per caption (20) or one per image (20/5)" in line


def test_unknown_and_mismatched_layouts(roots, tmp_path, weights, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error_line(capsys, run_args("f30k", empty, weights, tmp_path))
    assert f"--data-root {empty}: not the SCAN-split (NPC) layout" in line and "matches no known layout" in line
    line = one_error_line(capsys, run_args("f30k", roots["karpathy-coco"][0], weights, tmp_path))
    assert "looks like the layout of --dataset karpathy-coco" in line
    line = one_error_line(capsys, run_args("karpathy-f30k", roots["coco"][0], weights, tmp_path))
    assert "--dataset cc120k or coco or f30k" in line
    line = one_error_line(capsys, run_args("f30k", tmp_path / "nowhere", weights, tmp_path))
    assert f"--data-root {tmp_path / 'nowhere'}: no such folder" in line
    line = one_error_line(capsys, ["run", "--dataset", "f30k", "--out", str(tmp_path / "runs")])
    assert "--dataset f30k needs --data-root PATH" in line
    assert not run_folders(tmp_path / "runs")  # refused before a run folder is made


def test_real_noise_datasets_refuse_synthetic_noise(roots, tmp_path, weights, capsys):
    for dataset in ("cc120k", "cc152k"):
        line = one_error_line(capsys, run_args(dataset, roots[dataset][0], weights, tmp_path, "--noise", "0.2"))
        assert f"--noise 0.2: --dataset {dataset} has real, unlabelled noise; run it with --noise 0" in line
    assert not run_folders(tmp_path / "runs")


def test_missing_or_wrong_weights(roots, tmp_path, capsys):
    root = roots["f30k"][0]
    args = ["run", "--dataset", "f30k", "--data-root", str(root), "--model", TINY, "--batch-size", "8",
            "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    line = one_error_line(capsys, [*args, "--pretrained", str(tmp_path / "nope.pt")])
    assert f"--pretrained: no such checkpoint file {tmp_path / 'nope.pt'}" in line
    line = one_error_line(capsys, args)  # the default, embedded, exists only for the compact-vocabulary model
    assert "--pretrained embedded: only ncbench-tiny have embedded weights" in line
    other = tmp_path / "other.pt"
    torch.save(open_clip.create_model("ncbench-tiny").state_dict(), other)
    assert not run_folders(tmp_path / "runs")  # both refused before any data is read
    line = one_error_line(capsys, [*args, "--pretrained", str(other)])
    assert f"--pretrained {other}: not a checkpoint of {TINY}" in line


def test_open_clip_architectures_by_name_offline(tmp_path):
    with pytest.raises(UserError, match="use --model ViT-B-32-quickgelu"):
        backbone.load_backbone("ViT-B-32", "openai", tmp_path)
    with pytest.raises(UserError, match="not a checkpoint file nor a tag of ViT-B-32-quickgelu .*openai"):
        backbone.load_backbone("ViT-B-32-quickgelu", "nonsense", tmp_path)
    with pytest.raises(UserError, match="no such checkpoint file"):
        backbone.load_backbone("ViT-B-32-quickgelu", str(tmp_path / "ViT-B-32.pt"), tmp_path)


def test_tiny_bpe_model_uses_open_clip_tokenizer_and_loads_a_checkpoint(weights, tmp_path):
    b = backbone.load_backbone(TINY, str(weights), tmp_path)
    captions = ["a red box on a blue background", "Two young guys with shaggy hair look at their hands."]
    assert torch.equal(b.tokenize(captions), open_clip.get_tokenizer("ViT-B-32")(captions))
    assert b.image_size == SIZE == backbone.input_size(TINY)
    saved = torch.load(weights, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in b.model.state_dict().items())


# ---------------------------------------------------------------- presets

def test_paper_preset_values_and_precedence():
    clip = METHODS.get("clip")
    cfg = config.resolve(clip, {"dataset": "coco", "preset": "paper", "lr": None})
    assert (cfg.model, cfg.pretrained, cfg.batch_size, cfg.epochs, cfg.lr, cfg.weight_decay, cfg.warmup_steps) == \
           ("ViT-B-32-quickgelu", "openai", 256, 5, 5e-7, 0.2, 500)
    assert cfg.identity()["preset"] == "paper"
    explicit = config.resolve(clip, {"dataset": "coco", "preset": "paper", "epochs": 2})
    assert explicit.epochs == 2 and explicit.lr == 5e-7
    same_values = config.resolve(clip, {k: v for k, v in harness_values(cfg).items()})
    assert same_values.preset is None and same_values.run_id == cfg.run_id
    assert preset_values("paper", "npc", "karpathy-f30k") == {**preset_values("paper", "clip", "cc120k"),
                                                              "lr": 2e-7, "grad_clip": 10.0}
    assert {m for m, _ in PRESETS["paper"]} >= {"clip", "npc", "npc-official", "gmm-filter", "ncr", "mscn"}
    with pytest.raises(UserError, match="no settings for method 'clip' on dataset 'synthetic-mini' .family none."):
        config.resolve(clip, {"dataset": "synthetic-mini", "preset": "paper"})
    with pytest.raises(UserError, match="--preset 'fast': unknown; available: paper"):
        config.resolve(clip, {"dataset": "coco", "preset": "fast"})


def harness_values(cfg: config.RunConfig) -> dict:
    return {k: getattr(cfg, k) for k in config.HARNESS_FIELDS if k != "preset"}


# ---------------------------------------------------------------- COCO 1K (5 folds) and 5K vs a direct computation

def direct_recalls(img: np.ndarray, txt: np.ndarray, caption_image: np.ndarray, chunk: int = 500) -> dict[str, float]:
    """R@1/5/10 both ways by counting, for each query, the candidates whose cosine is strictly above its ground
    truth's (i2t: the best of the image's captions), over blocks of image rows."""
    positive = np.einsum("cd,cd->c", img[caption_image], txt)  # each caption with its own image
    gt = np.full(len(img), -np.inf, dtype=np.float32)
    np.maximum.at(gt, caption_image, positive)
    i2t, t2i = np.empty(len(img), dtype=np.int64), np.ones(len(txt), dtype=np.int64)
    for a in range(0, len(img), chunk):
        sim = img[a:a + chunk] @ txt.T
        i2t[a:a + chunk] = 1 + (sim > gt[a:a + chunk, None]).sum(axis=1)
        t2i += (sim > positive[None, :]).sum(axis=0)
    out = {f"{d}_r{k}": 100.0 * float(np.mean(r <= k)) for d, r in (("i2t", i2t), ("t2i", t2i)) for k in (1, 5, 10)}
    return {**out, "rsum": sum(out.values())}


def test_coco_1k_and_5k_equal_a_direct_computation():
    """Small-integer embeddings make every similarity exact in float32 (and ties frequent), so both computations
    must agree to the last caption; captions are shuffled, so folds are found by image, not by position."""
    rng = np.random.default_rng(3)
    img = rng.integers(-3, 4, (5000, 8)).astype(np.float32)
    caption_image = rng.permutation(np.repeat(np.arange(5000), 5))
    txt = img[caption_image] + rng.integers(-2, 3, (25000, 8)).astype(np.float32)
    as_torch = [torch.from_numpy(a) for a in (img, txt, caption_image)]
    got_1k, got_5k = (evaluate.evaluate_protocol(p, *as_torch) for p in ("coco-1k", "coco-5k"))
    folds = []
    for f in range(5):
        keep = caption_image // 1000 == f
        folds.append(direct_recalls(img[1000 * f:1000 * (f + 1)], txt[keep], caption_image[keep] - 1000 * f))
    expected_1k = {k: float(np.mean([fold[k] for fold in folds])) for k in folds[0]}
    expected_5k = direct_recalls(img, txt, caption_image)
    for got, expected in ((got_1k, expected_1k), (got_5k, expected_5k)):
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-9), key
    assert 5 < expected_5k["t2i_r1"] < expected_1k["t2i_r1"] < 95  # neither trivial nor saturated
