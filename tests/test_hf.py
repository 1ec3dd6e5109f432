"""``--dataset hf`` on Hugging Face datasets written here by the ``datasets`` library (``save_to_disk``, ``to_parquet``).

The fixtures are made in a subprocess started in a temporary folder: from the repository root, ncbench's own
``datasets/`` folder (the adapters) would shadow the ``datasets`` library on ``sys.path``.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ncbench.data import decode_bytes
from ncbench.datasets.streamed import held_out_size
from ncbench.errors import UserError
from ncbench.registry import DATASETS

SIZE = 32
BUILD = textwrap.dedent('''
    import io, json, sys
    import numpy as np
    from PIL import Image
    from datasets import Dataset, DatasetDict, Image as ImageFeature

    def picture(k):
        rng = np.random.default_rng(k)
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(out, "PNG" if k % 2 else "JPEG")
        return out.getvalue()

    def rows(ks, image="image", caption="caption", many=False, split=None, corrupt=None):
        data = {image: [{"bytes": b"not an image" if k == corrupt else picture(k), "path": None} for k in ks],
                caption: [[f"photo {k} caption {j}" for j in range(3)] if many else f"photo {k}" for k in ks]}
        if split:
            data["split"] = [split[k % len(split)] for k in ks]
        return Dataset.from_dict(data).cast_column(image, ImageFeature())

    root = sys.argv[1]
    DatasetDict({"train": rows(range(0, 12)), "validation": rows(range(12, 16)), "test": rows(range(16, 20))}
                ).save_to_disk(f"{root}/dict")
    rows(range(20, 40), image="img", caption="sentences", many=True,
         split=["train", "restval", "val", "test", "train"]).save_to_disk(f"{root}/karpathy")
    for split, ks in (("train", range(40, 50)), ("validation", range(50, 53)), ("test", range(53, 56))):
        rows(ks, image="picture", caption="alt_text").to_parquet(f"{root}/parquet/data/{split}-00000-of-00001.parquet")
    json.dump({"image": "picture", "caption": "alt_text"}, open(f"{root}/parquet/ncbench.json", "w"))
    rows(range(60, 100)).save_to_disk(f"{root}/nosplit")
    rows(range(100, 130), split=["train", "val", "test"], corrupt=117).to_parquet(f"{root}/corrupt/all.parquet")
''')


def picture(k: int) -> bytes:
    """The image bytes the build script stores for ``k``."""
    rng = np.random.default_rng(k)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(out, "PNG" if k % 2 else "JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> Path:
    pytest.importorskip("pyarrow")
    root = tmp_path_factory.mktemp("hf")
    (root / "build.py").write_text(BUILD)
    proc = subprocess.run([sys.executable, "build.py", str(root)], cwd=root, capture_output=True, text=True, timeout=300)
    if proc.returncode and "No module named 'datasets'" in proc.stderr:
        pytest.skip("the datasets library is not installed (pip install 'ncbench[test]')")
    assert proc.returncode == 0, proc.stderr
    return root


def check_pairs(pairs) -> set[int]:
    """Every caption sits with its own image; returns the image numbers seen."""
    seen = set()
    for split in ("train", "dev", "test"):
        data = getattr(pairs, split)
        assert data.images.shape[1:] == (SIZE, SIZE, 3) and isinstance(data.images, np.memmap)
        for c, caption in enumerate(data.captions):
            k = int(caption.split()[1])
            seen.add(k)
            assert np.array_equal(data.images[data.caption_image[c]], decode_bytes(picture(k), SIZE, str(k)))
    return seen


def load(root: Path, tmp_path: Path):
    return DATASETS.get("hf")().load(root, tmp_path / "cache", SIZE)


def test_save_to_disk_dataset_dict_keeps_its_splits(roots, tmp_path):
    pairs = load(roots / "dict", tmp_path)
    assert (pairs.train.n_images, pairs.dev.n_images, pairs.test.n_images) == (12, 4, 4)
    assert check_pairs(pairs) == set(range(20)) and pairs.meta["split"] == "saved splits"
    assert {int(c.split()[1]) for c in pairs.test.captions} == set(range(16, 20))
    assert pairs.has_clean_mask is False and pairs.meta["columns"] == {"image": "image", "caption": "caption", "split": None}


def test_karpathy_split_column_and_caption_lists(roots, tmp_path):
    pairs = load(roots / "karpathy", tmp_path)
    split_of = {k: ["train", "train", "dev", "test", "train"][k % 5] for k in range(20, 40)}  # restval counts as train
    for split in ("train", "dev", "test"):
        data = getattr(pairs, split)
        assert {int(c.split()[1]) for c in data.captions} == {k for k, s in split_of.items() if s == split}
        assert data.n_captions == 3 * data.n_images
    assert check_pairs(pairs) == set(range(20, 40)) and pairs.meta["columns"]["caption"] == "sentences"


def test_parquet_files_with_columns_named_in_the_sidecar(roots, tmp_path):
    pairs = load(roots / "parquet", tmp_path)
    assert (pairs.train.n_images, pairs.dev.n_images, pairs.test.n_images) == (10, 3, 3)
    assert check_pairs(pairs) == set(range(40, 56)) and pairs.meta["columns"]["image"] == "picture"


def test_no_split_gets_the_seeded_split_and_the_cache_is_reused(roots, tmp_path):
    pairs = load(roots / "nosplit", tmp_path)
    k = held_out_size(40)
    assert (pairs.dev.n_images, pairs.test.n_images, pairs.meta["split"]) == (k, k, "seeded")
    assert check_pairs(pairs) == set(range(60, 100))
    caches = sorted((tmp_path / "cache" / "images").iterdir())
    assert len(caches) == 3 and load(roots / "nosplit", tmp_path).test.captions == pairs.test.captions
    assert sorted((tmp_path / "cache" / "images").iterdir()) == caches


def test_a_corrupt_image_names_file_and_row(roots, tmp_path):
    with pytest.raises(UserError) as err:
        load(roots / "corrupt", tmp_path)
    assert f"{roots / 'corrupt' / 'all.parquet'}: row 17: cannot decode image" in str(err.value)


def test_bad_folders_are_one_line_errors(roots, tmp_path, cli):
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "ncbench.json").write_text(json.dumps({"caption": "nope"}))
    (other / "x.parquet").write_bytes((roots / "corrupt" / "all.parquet").read_bytes())
    for root, expected in ((tmp_path / "empty", "no Hugging Face dataset here"),
                           (other, "caption column 'nope' is not in")):
        proc = cli("run", "--dataset", "hf", "--data-root", root, "--model", "ncbench-tiny-bpe", "--pretrained", "none",
                   "--out", tmp_path / "runs", "--cache-dir", tmp_path / "cache")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr


def test_image_cells_that_hold_a_path_are_read_under_the_root(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root = tmp_path / "paths"
    (root / "images").mkdir(parents=True)
    cells = []
    for k in range(200, 212):
        (root / "images" / f"{k}.jpg").write_bytes(picture(k))
        cells.append({"bytes": None, "path": f"images/{k}.jpg"})
    table = pa.table({"image": cells, "caption": [f"photo {k}" for k in range(200, 212)],
                      "split": ["train"] * 8 + ["val"] * 2 + ["test"] * 2})
    pq.write_table(table, root / "data.parquet")
    assert check_pairs(load(root, tmp_path)) == set(range(200, 212))
    (root / "images" / "211.jpg").unlink()
    with pytest.raises(UserError, match=r"data.parquet: row 11: image file images/211.jpg not found"):
        load(root, tmp_path / "other")
