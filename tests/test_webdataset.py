"""``--dataset webdataset`` on tar shards written here as img2dataset writes them (``<key>.jpg``, ``.txt``, ``.json``)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ncbench.data import decode_bytes
from ncbench.datasets.streamed import held_out_size
from ncbench.datasets.webdataset import expand_braces, split_name
from ncbench.errors import UserError
from ncbench.registry import DATASETS

SIZE = 32
PER_SHARD = 10


def jpeg(k: int, fmt: str = "JPEG") -> bytes:
    """A small picture whose colours depend on ``k``."""
    rng = np.random.default_rng(k)
    image = Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8).repeat(2, 0).repeat(2, 1))
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, n_shards: int, prefix: str = "", caption_in: str = "txt",
                 corrupt: str | None = None) -> dict[str, tuple[bytes, list[str]]]:
    """``{00000..}.tar`` with PER_SHARD samples each, keys as img2dataset makes them; returns key -> (image, captions)."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for s in range(n_shards):
        with tarfile.open(folder / f"{prefix}{s:05d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                key = f"{prefix}{s:05d}{i:04d}"
                k = s * PER_SHARD + i
                image = b"\xff\xd8 not a jpeg" if key == corrupt else jpeg(k, "PNG" if k % 3 == 0 else "JPEG")
                captions = [f"picture {key} number {k}"]
                add(tar, f"{key}.{'png' if k % 3 == 0 else 'jpg'}", image)
                meta = {"url": f"http://example.invalid/{k}.jpg", "key": key, "status": "success", "width": 60}
                if caption_in == "txt":
                    add(tar, f"{key}.txt", captions[0].encode())
                else:
                    captions = [captions[0], f"another caption of {key}"]
                    meta["caption"] = captions
                add(tar, f"{key}.json", json.dumps(meta).encode())
                truth[key] = (image, captions)
    return truth


def check_pairs(pairs, truth) -> None:
    """Every caption sits with its own decoded image."""
    seen = set()
    for split in ("train", "dev", "test"):
        data = getattr(pairs, split)
        assert data.images.shape[1:] == (SIZE, SIZE, 3) and isinstance(data.images, np.memmap)
        for c, caption in enumerate(data.captions):
            key = next(k for k, (_, caps) in truth.items() if caption in caps)
            seen.add(key)
            assert np.array_equal(data.images[data.caption_image[c]], decode_bytes(truth[key][0], SIZE, key))
    assert seen == set(truth)


def test_brace_patterns_expand_as_webdataset_does():
    braceexpand = pytest.importorskip("braceexpand").braceexpand  # what the webdataset package uses
    for pattern in ("d/{00000..00009}.tar", "d/shard-{0..11}.tar", "{a,b}/x-{08..10}.tar", "plain.tar"):
        assert expand_braces(pattern) == list(braceexpand(pattern))
    assert split_name("dir/abc.seg.png") == ("dir/abc", "seg.png") and split_name("k1.JPG") == ("k1", "jpg")


def test_one_pattern_gets_a_fixed_seeded_split(tmp_path):
    truth = write_shards(tmp_path / "shards", 4)
    pattern = str(tmp_path / "shards" / "{00000..00003}.tar")
    pairs = DATASETS.get("webdataset")().load(Path(pattern), tmp_path / "cache", SIZE)
    k = held_out_size(len(truth))
    assert (pairs.dev.n_images, pairs.test.n_images, pairs.train.n_images) == (k, k, len(truth) - 2 * k)
    assert pairs.has_clean_mask is False and pairs.meta["split"] == "seeded" and pairs.meta["shards"] == 4
    check_pairs(pairs, truth)
    # the folder itself is the same data: same split, cache reused (no new files)
    caches = sorted((tmp_path / "cache" / "images").iterdir())
    again = DATASETS.get("webdataset")().load(tmp_path / "shards", tmp_path / "cache", SIZE)
    assert again.test.captions == pairs.test.captions and sorted((tmp_path / "cache" / "images").iterdir()) == caches


def test_named_splits_json_captions_and_a_sidecar(tmp_path):
    truth = {}
    for split, n in (("train", 3), ("dev", 1), ("test", 1)):
        truth |= write_shards(tmp_path / split, n, prefix=split, caption_in="json")
    (tmp_path / "train" / "ncbench.json").write_text(json.dumps({"clean": True}))
    spec = ";".join(f"{s}={tmp_path / s / (s + '{00000..0000' + str(n - 1) + '}.tar')}"
                    for s, n in (("train", 3), ("dev", 1), ("test", 1)))
    pairs = DATASETS.get("webdataset")().load(Path(spec), tmp_path / "cache", SIZE)
    assert (pairs.train.n_images, pairs.dev.n_images, pairs.test.n_images) == (30, 10, 10)
    assert pairs.train.n_captions == 60 and pairs.has_clean_mask is True and pairs.meta["split"] == "given"
    assert all(" test00000" in c for c in pairs.test.captions)
    check_pairs(pairs, truth)


def test_a_corrupt_member_is_one_line_naming_shard_and_member(tmp_path, cli):
    write_shards(tmp_path / "shards", 3, corrupt="000010003")
    with pytest.raises(UserError) as err:
        DATASETS.get("webdataset")().load(tmp_path / "shards", tmp_path / "cache", SIZE)
    message = str(err.value)
    assert "\n" not in message and f"{tmp_path / 'shards' / '00001.tar'}: member 000010003.jpg: cannot decode" in message
    assert not list((tmp_path / "cache" / "images").glob("*.npy")) and not list((tmp_path / "cache" / "images").glob(".*"))


@pytest.mark.parametrize("problem, expected", [
    ("missing", "1 of 3 shards missing, e.g. "),
    ("truncated", "the shard is truncated or damaged"),
    ("no-caption", "no caption (expected a .txt member"),
    ("empty-caption", "caption 1 is empty"),
    ("bad-spec", "give all of train=, dev= and test="),
])
def test_bad_shards_are_one_line_errors(tmp_path, cli, problem, expected):
    folder = tmp_path / "shards"
    write_shards(folder, 2)
    root = str(folder / "{00000..00001}.tar")
    if problem == "missing":
        root = str(folder / "{00000..00002}.tar")
    elif problem == "truncated":
        data = (folder / "00001.tar").read_bytes()
        (folder / "00001.tar").write_bytes(data[: len(data) // 2 + 100])
    elif problem in ("no-caption", "empty-caption"):
        with tarfile.open(folder / "00001.tar", "a") as tar:
            add(tar, "zzz.jpg", jpeg(99))
            if problem == "empty-caption":
                add(tar, "zzz.txt", b"  ")
    elif problem == "bad-spec":
        root = f"train={root};dev={root}"
    proc = cli("run", "--dataset", "webdataset", "--data-root", root, "--model", "ncbench-tiny-bpe", "--pretrained",
               "none", "--epochs", "1", "--out", tmp_path / "runs", "--cache-dir", tmp_path / "cache")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
    if problem in ("no-caption", "truncated"):
        assert "00001.tar" in lines[0]


def test_run_end_to_end_with_synthetic_noise_on_top(tmp_path, cli):
    write_shards(tmp_path / "shards", 4)
    proc = cli("run", "--dataset", "webdataset", "--data-root", tmp_path / "shards" / "{00000..00003}.tar",
               "--noise", "0.2", "--model", "ncbench-tiny-bpe", "--pretrained", "none", "--epochs", "1",
               "--batch-size", "8", "--out", tmp_path / "runs", "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    (path,) = (tmp_path / "runs").glob("*/result.json")
    record = json.loads(path.read_text())
    assert record["dataset"]["name"] == "webdataset" and record["dataset"]["has_clean_mask"] is False
    assert record["dataset"]["meta"]["source_noise"] == "unknown" and record["noise"]["ratio"] == 0.2
    assert record["dataset"]["train_pairs"] == 36 and list(record["test"]) == ["1k"]


def test_shards_written_by_the_webdataset_package(tmp_path):
    wds = pytest.importorskip("webdataset")
    truth = {}
    for s in range(3):
        with wds.TarWriter(str(tmp_path / f"shard-{s:02d}.tar")) as sink:
            for i in range(PER_SHARD):
                key = f"s{s}i{i}"
                truth[key] = (jpeg(100 + 10 * s + i), [f"web picture {key}"])
                sink.write({"__key__": key, "jpg": truth[key][0], "txt": truth[key][1][0]})
    pairs = DATASETS.get("webdataset")().load(Path(str(tmp_path / "shard-{00..02}.tar")), tmp_path / "cache", SIZE)
    check_pairs(pairs, truth)
