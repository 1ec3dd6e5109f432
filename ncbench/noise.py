"""Noise protocols: which image each training caption is paired with, and which pairs are truly clean.

A protocol maps the true ``caption_image`` array to ``assigned_image``: training pair ``c`` is
(image ``assigned_image[c]``, caption ``c``). A pair is clean when its caption lands on its own
image (siblings that land back on their image count as clean, as in NPC's protocol).

Every protocol is a function ``(caption_image, ratio, seed, context) -> NoisyPairing`` (``context``
a :class:`NoiseContext`, possibly ``None``); ``make_noise`` is the single entry point. Each noise
instance is an artefact stored once under ``<cache>/noise/`` and shared by every run that uses it
(docs/noise.md#artefacts); ``import_ncr`` / ``import_npc_captions`` read the files the papers ship and
``export_ncr`` / ``export_npc_captions`` write them (docs/noise.md#paper-files).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ncbench.atomic import atomic_write
from ncbench.data import Pairs, Split
from ncbench.errors import UserError
from ncbench.seeding import derive_seed

HARD_NEIGHBOURS = 32  # candidate images per image in the ``hard`` protocol (docs/noise.md)
IMPORTED = "file-"  # protocol-name prefix of imported noise: file-<first 12 hex digits of its digest>


@dataclass(frozen=True)
class NoisyPairing:
    """The realised noise of one (dataset, split, protocol, ratio, seed)."""

    protocol: str
    ratio: float  # nominal
    seed: int
    assigned_image: np.ndarray  # int64 (n_captions,)
    clean: np.ndarray  # bool (n_captions,)
    dataset: str = ""
    split: str = "train"
    source: str = ""  # what it was made from: the image-similarity source of ``hard``, or an imported file
    data_digest: str = ""  # of the split it was made for (``data_digest``)

    @property
    def realised_ratio(self) -> float:
        return float(1.0 - self.clean.mean()) if len(self.clean) else 0.0

    @property
    def digest(self) -> str:
        """sha256 of the assignment and the mask: names this noise exactly."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.assigned_image, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.clean, dtype=np.bool_).tobytes())
        return h.hexdigest()

    def save(self, path: Path) -> None:
        """Write atomically as ``.npz``, with the digest."""
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez adds no suffix to it
                np.savez(f, protocol=self.protocol, ratio=self.ratio, seed=self.seed, assigned_image=self.assigned_image,
                         clean=self.clean, dataset=self.dataset, split=self.split, source=self.source,
                         data_digest=self.data_digest, digest=self.digest)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: Path) -> "NoisyPairing":
        with np.load(path) as z:
            extra = {k: str(z[k]) for k in ("dataset", "split", "source", "data_digest") if k in z}
            noise = cls(str(z["protocol"]), float(z["ratio"]), int(z["seed"]),
                        z["assigned_image"].astype(np.int64), z["clean"].astype(bool), **extra)
            if "digest" in z and str(z["digest"]) != noise.digest:
                raise UserError(f"{path}: noise artefact is corrupt (its content does not match its digest)")
            return noise


@dataclass(frozen=True)
class NoiseContext:
    """What a protocol may look at besides ``caption_image``: the split and a source of image similarity.

    ``attributes`` (n_images, F): rows whose inner product is a similarity (the synthetic world's shared
    attribute count). ``embed`` returns L2-normalised image embeddings of the split under a pretrained
    model named by ``embedder``; used only when there are no attributes.
    """

    split: Split | None = None
    attributes: np.ndarray | None = None
    embed: Callable[[], np.ndarray] | None = None
    embedder: str = ""

    @property
    def similarity_source(self) -> str:
        """Names what ``image_features`` returns: ``attributes``, ``embeddings:<embedder>`` or ``""``."""
        if self.attributes is not None:
            return "attributes"
        return f"embeddings:{self.embedder}" if self.embed is not None else ""

    def image_features(self) -> np.ndarray:
        """(n_images, d) float32 rows whose inner product measures how similar two images are."""
        if self.attributes is not None:
            return np.asarray(self.attributes, dtype=np.float32)
        if self.embed is None:
            raise UserError("--noise-protocol hard needs image attributes (synthetic world) or a pretrained model "
                            "to find similar images")
        return np.asarray(self.embed(), dtype=np.float32)


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"noise ratio must be in [0, 1), got {ratio}")


def caption_shuffle(caption_image: np.ndarray, ratio: float, seed: int,
                    context: NoiseContext | None = None) -> NoisyPairing:
    """NCR/NPC protocol (docs/noise.md#origin-caption): ``floor(ratio·N)`` random caption rows swap captions.

    Row ``r`` keeps its image and receives the caption of another selected row, so in
    caption -> image form the caption of row ``selected[j]`` is assigned the image of row
    ``selected[perm[j]]``. The permutation is not a derangement: a caption may land on its own image.
    """
    _check_ratio(ratio)
    n = len(caption_image)
    rng = np.random.default_rng(seed)
    selected = rng.permutation(n)[: int(ratio * n)]
    assigned = caption_image.astype(np.int64).copy()
    assigned[selected] = caption_image[selected[rng.permutation(len(selected))]]
    return NoisyPairing("caption-shuffle", ratio, seed, assigned, assigned == caption_image)


def image_shuffle(caption_image: np.ndarray, ratio: float, seed: int,
                  context: NoiseContext | None = None) -> NoisyPairing:
    """DECL/RCL protocol (docs/noise.md#origin-image): ``floor(ratio·N_images)`` images permute their caption sets.

    All captions of a selected image move together to the image the permutation gives it; the ratio
    counts whole images, and a selected image the permutation maps onto itself stays clean.
    """
    _check_ratio(ratio)
    images = np.unique(caption_image)
    rng = np.random.default_rng(seed)
    selected = rng.permutation(images)[: int(ratio * len(images))]
    target = np.arange(int(caption_image.max()) + 1 if len(caption_image) else 0, dtype=np.int64)
    target[selected] = selected[rng.permutation(len(selected))]
    assigned = target[caption_image]
    return NoisyPairing("image-shuffle", ratio, seed, assigned, assigned == caption_image)


def hard(caption_image: np.ndarray, ratio: float, seed: int, context: NoiseContext | None = None) -> NoisyPairing:
    """ncbench's hard noise (docs/noise.md): ``floor(ratio·N)`` captions each move to a *similar* other image.

    The rows are chosen as in caption-shuffle and their captions permuted among them (every image keeps
    its number of captions), but greedily: in a seeded order each caption takes a free slot at one of
    the ``HARD_NEIGHBOURS`` images most similar to its own (see ``_similar_slots``). Similarity is the
    inner product of ``context.image_features()``.
    """
    _check_ratio(ratio)
    rng = np.random.default_rng(seed)
    selected = rng.permutation(len(caption_image))[: int(ratio * len(caption_image))]
    assigned = caption_image.astype(np.int64).copy()
    context = context or NoiseContext()
    if len(selected):
        assigned[selected] = _similar_slots(caption_image[selected], context.image_features(), rng)
    return NoisyPairing("hard", ratio, seed, assigned, assigned == caption_image,
                        source=context.similarity_source if len(selected) else "")


hard.uses_similarity = True  # type: ignore[attr-defined]  # its artefact depends on the similarity source


def _similar_slots(own: np.ndarray, features: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """New image of each caption whose true image is ``own[i]``: a permutation of ``own`` onto similar images.

    Rounds: each pending caption, in a seeded order, takes a free slot at the first of its ``HARD_NEIGHBOURS``
    most similar images (among those with free slots at the round's start, its own excluded) that still
    has one; captions left over go to the next round. A caption for which only its own image has room
    trades places with a caption placed earlier, or stays (clean) if none can.
    """
    images, owner, counts = np.unique(own, return_inverse=True, return_counts=True)
    feats = features[images]
    rank = rng.permutation(len(images))  # breaks similarity ties
    free = counts.tolist()
    slot = [-1] * len(own)  # index into ``images``
    placed: list[int] = []
    pending = rng.permutation(len(own)).tolist()
    while pending:
        room = np.flatnonzero(np.asarray(free) > 0)
        asking = np.unique(owner[pending])
        near = dict(zip(asking.tolist(), _nearest(feats, asking, room, rank, HARD_NEIGHBOURS)))
        left = []
        for c in pending:
            u = int(owner[c])
            choices = near[u]
            if not choices:  # only the own image has room left: trade places with a caption placed earlier
                other = next((p for p in reversed(placed) if owner[p] != u and slot[p] != u), -1)
                target = u  # nothing to trade with: the caption stays on its image (clean)
                if other >= 0:
                    target, slot[other] = slot[other], u
                    free[u] -= 1
                    free[target] += 1
            else:
                target = next((v for v in choices if free[v]), -1)
                if target < 0:
                    left.append(c)
                    continue
            slot[c] = target
            free[target] -= 1
            placed.append(c)
        pending = left
    return images[np.asarray(slot, dtype=np.int64)]


def _nearest(feats: np.ndarray, rows: np.ndarray, candidates: np.ndarray, rank: np.ndarray, k: int,
             chunk: int = 256) -> list[list[int]]:
    """For each of ``rows``: its ``k`` most similar ``candidates`` other than itself, best first (ties: lower rank)."""
    out: list[list[int]] = []
    k = min(k, len(candidates))
    for a in range(0, len(rows), chunk):
        block = rows[a:a + chunk]
        sim = feats[block] @ feats[candidates].T
        sim[block[:, None] == candidates[None, :]] = -np.inf
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k else np.empty((len(block), 0), np.int64)
        top_sim = np.take_along_axis(sim, top, axis=1)
        order = np.lexsort((rank[candidates[top]], -top_sim), axis=1)
        top, top_sim = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_sim, order, axis=1)
        out.extend(candidates[t[s > -np.inf]].tolist() for t, s in zip(top, top_sim))
    return out


def protocol_function(name: str) -> Callable[..., NoisyPairing]:
    """The protocol registered as ``name`` under the ``ncbench.noises`` entry points (or ``module:function``)."""
    from ncbench.registry import NOISES

    return NOISES.get(name)


def make_noise(protocol: str, caption_image: np.ndarray, ratio: float, seed: int, dataset: str,
               context: NoiseContext | None = None) -> NoisyPairing:
    """Build the named protocol's noise, seeded by (dataset, protocol, ratio, seed)."""
    function = protocol_function(protocol)
    noise = function(caption_image, ratio, derive_seed("noise", dataset, protocol, ratio, seed), context)
    if not isinstance(noise, NoisyPairing) or noise.assigned_image.shape != caption_image.shape:
        raise UserError(f"noise protocol {protocol!r} did not return a NoisyPairing over {len(caption_image)} captions")
    return dataclasses.replace(noise, protocol=protocol, ratio=ratio, seed=seed, dataset=dataset,
                               clean=noise.assigned_image == caption_image)


# ---------------------------------------------------------------- the artefact store


def data_digest(split: Split) -> str:
    """sha256 of a split's captions and caption -> image map: what a noise artefact must match."""
    h = hashlib.sha256(np.ascontiguousarray(split.caption_image, dtype=np.int64).tobytes())
    for caption in split.captions:
        h.update(caption.encode() + b"\n")
    return h.hexdigest()


def artefact_path(cache_dir: Path, dataset: str, split: str, data: str, protocol: str, ratio: float, seed: int,
                  similarity_source: str = "") -> Path:
    """``<cache>/noise/<dataset>/<protocol>/<split>-<data>/r<ratio>_s<seed>.npz`` (imports: ``.../imported.npz``).

    ``data`` (the split's ``data_digest``, shortened) keeps noise made for different versions of a split
    (a changed generator, a carved-out clean subset) apart. A protocol built on a pretrained model's
    embeddings gets the model in its folder name (``hard@<embedder>``).
    """
    folder = protocol
    if similarity_source.startswith("embeddings:"):
        folder += "@" + similarity_source.partition(":")[2]
    name = "imported.npz" if protocol.startswith(IMPORTED) else f"r{ratio:g}_s{seed}.npz"
    return Path(cache_dir) / "noise" / dataset / folder / f"{split}-{data[:12]}" / name


def store(noise: NoisyPairing, path: Path) -> Path:
    """Save ``noise`` at ``path`` once; the same noise there is kept, a different one is refused."""
    if path.is_file():
        old = NoisyPairing.load(path)
        if old.digest != noise.digest or old.data_digest != noise.data_digest:
            raise UserError(f"{path}: a different noise artefact already has this name (digest {old.digest[:12]}, "
                            f"new {noise.digest[:12]}); remove the file to replace it")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    noise.save(path)
    return path


def load_artefact(path: Path, split: Split) -> NoisyPairing:
    """A stored artefact, checked against the split it is used with."""
    noise = NoisyPairing.load(path)
    if noise.data_digest != data_digest(split) or not np.array_equal(noise.clean, noise.assigned_image == split.caption_image):
        raise UserError(f"{path}: noise artefact was made for different data than this split; remove it to rebuild")
    return noise


def _readable_artefact(path: Path, split: Split) -> NoisyPairing | None:
    """The stored artefact at ``path``, or None with a warning when the file cannot be read (it is rebuilt)."""
    try:
        return load_artefact(path, split)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UserError) as e:
        warnings.warn(f"{path}: unreadable noise artefact ({e}); rebuilding it")
        return None


class ImageEmbedder(Protocol):
    """A pretrained model's view of images, for protocols that need image similarity on data without attributes
    (``ncbench.backbone.image_embedder`` makes one)."""

    name: str  # names the model and its weights: part of the artefact's folder name

    def embed(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised float32 embeddings (n_images x d) of uint8 images."""


def context_for(pairs: Pairs, split: str, embedder: ImageEmbedder | None = None) -> NoiseContext:
    """The context of ``split``: the dataset's image attributes if it has them, else ``embedder``'s embeddings."""
    data = getattr(pairs, split)
    embed = None if embedder is None else (lambda: embedder.embed(data.images))
    return NoiseContext(data, pairs.image_attributes.get(split), embed, embedder.name if embedder else "")


def obtain(pairs: Pairs, protocol: str, ratio: float, seed: int, cache_dir: Path, split: str = "train",
           embedder: ImageEmbedder | None = None, mode: str = "get") -> tuple[NoisyPairing, Path]:
    """The shared artefact of (dataset, split, protocol, ratio, seed) and its path.

    ``mode``: ``get`` loads it if stored, else builds and stores it (what runs do); ``make`` builds it and
    stores it, refusing if a different artefact is stored under its name; ``load`` only loads.
    ``embedder`` matters only to protocols that need image similarity on data without attributes.
    Imported noise (``file-…``) is only loaded; its nominal ratio must be ``ratio``.
    """
    data = getattr(pairs, split)
    digest = data_digest(data)
    context = context_for(pairs, split, embedder)
    imported = protocol.startswith(IMPORTED)
    uses_similarity = not imported and getattr(protocol_function(protocol), "uses_similarity", False)
    source = context.similarity_source if uses_similarity and ratio > 0 else ""
    path = artefact_path(cache_dir, pairs.name, split, digest, protocol, ratio, seed, source)
    cheap = not uses_similarity or context.attributes is not None  # derived in a moment: checked on every load
    if path.is_file() and imported:
        noise = load_artefact(path, data)
        if noise.ratio != ratio:
            raise UserError(f"--noise {ratio:g}: imported noise {protocol} has nominal ratio {noise.ratio:g}")
        return noise, path
    if path.is_file() and mode != "make":
        stored = _readable_artefact(path, data)
        if stored is not None and not cheap:
            return stored, path
        derived = dataclasses.replace(make_noise(protocol, data.caption_image, ratio, seed, pairs.name, context),
                                      split=split, data_digest=digest)
        if stored is not None and stored.digest == derived.digest:
            return stored, path
        if stored is not None:
            warnings.warn(f"{path}: stored noise artefact differs from what its protocol derives "
                          f"(digest {stored.digest[:12]}, derived {derived.digest[:12]}); replaced by the derived one")
        path.unlink()
        return derived, store(derived, path)
    if imported:
        raise UserError(f"--noise-protocol {protocol}: no imported noise of that name for this {pairs.name} {split} "
                        f"split; import the file with --noise-file or `ncbench noise import`")
    if mode == "load":
        raise UserError(f"no {protocol} noise at ratio {ratio:g}, seed {seed} for {pairs.name} {split} yet; "
                        f"make it with `ncbench noise make`")
    noise = make_noise(protocol, data.caption_image, ratio, seed, pairs.name, context)
    noise = dataclasses.replace(noise, split=split, data_digest=digest)
    return noise, store(noise, path)


def examples(noise: NoisyPairing, split: Split, k: int = 5) -> list[tuple[int, str, int, str]]:
    """``k`` noisy pairs spread over the split: (caption, its text, assigned image, a true caption of that image)."""
    noisy = np.flatnonzero(~noise.clean)
    first = np.zeros(split.n_images, np.int64)
    images, at = np.unique(split.caption_image, return_index=True)
    first[images] = at
    picks = noisy[np.linspace(0, len(noisy) - 1, min(k, len(noisy))).astype(int)] if len(noisy) else noisy
    return [(int(c), split.captions[c], int(noise.assigned_image[c]),
             split.captions[first[int(noise.assigned_image[c])]]) for c in picks]


# ---------------------------------------------------------------- the papers' noise files


def _ratio_from_name(path: Path, pattern: str) -> float | None:
    match = re.fullmatch(pattern, path.name)
    return float(match.group(1)) if match else None


def _imported(assigned: np.ndarray, split: Split, ratio: float | None, source: str, flag: str) -> NoisyPairing:
    """Name an imported assignment ``file-<digest>``; its nominal ratio is ``ratio`` or the realised one."""
    clean = assigned == split.caption_image
    realised = float(1 - clean.mean()) if len(clean) else 0.0
    nominal = round(realised, 2) if ratio is None else float(ratio)
    _check_ratio(nominal)
    if abs(nominal - realised) > 0.01:
        raise UserError(f"{flag}: the file's realised noise ratio is {realised:.4f}, not the nominal {nominal:g}")
    noise = NoisyPairing("", nominal, 0, assigned, clean, source=source, data_digest=data_digest(split))
    return dataclasses.replace(noise, protocol=IMPORTED + noise.digest[:12])


def import_ncr(path: Path, split: Split, ratio: float | None = None, flag: str = "--noise-file") -> NoisyPairing:
    """Read an NCR/BiCro noise index (docs/noise.md#origin-caption): ``t2i[c]`` = image of caption ``c``, ``np.save``d.

    An array with one entry per image instead (RCL/DECL's ``noise_inx``, docs/noise.md#origin-image) pairs caption ``c`` with
    ``noise_inx[image of c]``. The nominal ratio is ``ratio``, else read from a ``<name>_<ratio>.npy`` name.
    """
    path = Path(path)
    try:
        t2i = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"{flag} {path}: not a readable .npy array ({err})") from None
    if t2i.ndim != 1 or t2i.dtype.kind not in "iu":
        raise UserError(f"{flag} {path}: expected a 1-D integer array, got {t2i.dtype} {t2i.shape}")
    if len(t2i) == split.n_captions:
        assigned = t2i.astype(np.int64)
    elif len(t2i) == split.n_images:
        assigned = t2i.astype(np.int64)[split.caption_image]
    else:
        raise UserError(f"{flag} {path}: {len(t2i)} entries; expected {split.n_captions} (one per caption) "
                        f"or {split.n_images} (one per image)")
    if len(assigned) and (assigned.min() < 0 or assigned.max() >= split.n_images):
        raise UserError(f"{flag} {path}: holds an image index outside [0, {split.n_images})")
    ratio = ratio if ratio is not None else _ratio_from_name(path, r".*_(\d*\.?\d+)\.npy")
    return _imported(assigned, split, ratio, f"ncr:{path.name}", flag)


def import_npc_captions(path: Path, split: Split, ratio: float | None = None,
                        flag: str = "--noise-file") -> NoisyPairing:
    """Read NPC's ``{r}_noise_train_caps.txt`` (docs/noise.md#origin-npc): line ``k`` is the caption now paired with row ``k``'s image.

    The file is a permutation of the split's captions. A line is matched to a caption index by its text:
    to row ``k``'s own caption if the text is the same, else to an unused caption of the same image with
    that text, else to the first unused caption with that text (identical strings cannot be told apart).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{flag} {path}: cannot read the caption file ({err})") from None
    if len(lines) != split.n_captions:
        raise UserError(f"{flag} {path}: {len(lines)} lines; expected {split.n_captions}, one per training caption")
    texts = [line.strip() for line in lines]
    captions = [c.strip() for c in split.captions]
    unused: dict[str, list[int]] = {}
    for c, text in enumerate(captions):
        unused.setdefault(text, []).append(c)
    source = np.full(len(texts), -1, np.int64)
    for k, text in enumerate(texts):
        if text == captions[k]:
            source[k] = k
            unused[text].remove(k)
    image = split.caption_image
    for same_image in (True, False):
        for k in np.flatnonzero(source < 0).tolist():
            pool = unused.get(texts[k], [])
            pick = next((c for c in pool if image[c] == image[k]), None) if same_image else (pool[0] if pool else None)
            if pick is not None:
                source[k] = pick
                pool.remove(pick)
    if (source < 0).any():
        k = int(np.flatnonzero(source < 0)[0])
        raise UserError(f"{flag} {path}: line {k + 1} is not one of the split's captions (or repeats one too often)")
    assigned = np.empty(len(texts), np.int64)
    assigned[source] = image
    ratio = ratio if ratio is not None else _ratio_from_name(path, r"(\d*\.?\d+)_noise_train_caps\.txt")
    return _imported(assigned, split, ratio, f"npc:{path.name}", flag)


def import_file(path: Path, pairs: Pairs, cache_dir: Path, ratio: float | None = None,
                flag: str = "--noise-file") -> tuple[NoisyPairing, Path]:
    """Import an NCR ``.npy`` or NPC ``.txt`` noise file for the train split and store it as ``file-<digest>``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    readers = {".npy": import_ncr, ".txt": import_npc_captions}
    if path.suffix not in readers:
        raise UserError(f"{flag} {path}: expected an NCR index (.npy) or an NPC caption file (.txt)")
    noise = dataclasses.replace(readers[path.suffix](path, pairs.train, ratio, flag), dataset=pairs.name)
    return noise, store(noise, artefact_path(cache_dir, pairs.name, "train", noise.data_digest, noise.protocol,
                                             noise.ratio, 0))


def export_ncr(noise: NoisyPairing, folder: Path) -> Path:
    """Write the NCR index ``<folder>/<dataset>_<ratio>.npy`` (int64 image of each caption; docs/noise.md#paper-files)."""
    path = Path(folder) / f"{noise.dataset or 'noise'}_{noise.ratio:g}.npy"
    data = io.BytesIO()
    np.save(data, np.ascontiguousarray(noise.assigned_image, dtype=np.int64))
    return _place(path, data.getvalue())


def export_npc_captions(noise: NoisyPairing, split: Split, folder: Path) -> Path:
    """Write NPC's ``<folder>/{r}_noise_train_caps.txt`` (docs/noise.md#origin-npc): line ``k`` = caption paired with row ``k``'s image.

    Needs every image to keep its number of captions (true of all built-in protocols). A clean caption
    stays on its own line; an image's other lines take the captions assigned to it, in caption order.
    """
    counts = np.bincount(split.caption_image, minlength=split.n_images)
    if not np.array_equal(np.bincount(noise.assigned_image, minlength=split.n_images), counts):
        raise UserError("NPC format needs every image to keep its number of captions; this noise changes them")
    if any("\n" in c or "\r" in c for c in split.captions):
        raise UserError("NPC format is one caption per line; a caption of this split contains a line break")
    line = np.arange(len(noise.clean))
    moved = np.flatnonzero(~noise.clean)
    # the rows of each image whose caption moved away take the captions moved onto that image, both in order
    line[moved[np.argsort(split.caption_image[moved], kind="stable")]] = \
        moved[np.argsort(noise.assigned_image[moved], kind="stable")]
    path = Path(folder) / f"{noise.ratio}_noise_train_caps.txt"
    return _place(path, "".join(split.captions[c] + "\n" for c in line.tolist()).encode("utf-8"))


def _place(path: Path, data: bytes) -> Path:
    """Write an exported file's bytes atomically; an existing different file under that name is refused."""
    if path.exists():
        if path.read_bytes() != data:
            raise UserError(f"{path}: a different file already exists; remove it or export elsewhere")
        return path
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
