import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from ncbench.evaluate import (
    METRICS,
    PROTOCOLS,
    detection_metrics,
    evaluate_protocol,
    evaluate_protocol_with_ranks,
    recall_at_k,
    retrieval_metrics,
)

# 3 images x 6 captions, 2 captions per image. Ties: image 2 scores 0.5 for its caption 4 and for captions
# 0-3 (i2t rank 1, not up to 5); caption 2 scores 0.6 for image 0 and for its image 1 (t2i rank 1, not 2).
SIM3 = torch.tensor([
    [0.9, 0.1, 0.6, 0.2, 0.3, 0.0],
    [0.8, 0.7, 0.6, 0.1, 0.2, 0.3],
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.2],
])
CAP3 = torch.tensor([0, 0, 1, 1, 2, 2])
# i2t ranks [1, 3, 1]; t2i ranks [1, 3, 1, 3, 1, 2]
EXPECTED3 = {
    "i2t_r1": 200 / 3, "i2t_r2": 200 / 3, "i2t_r5": 100.0,
    "t2i_r1": 50.0, "t2i_r2": 400 / 6, "t2i_r5": 100.0,
    "i2t_medr": 1.0, "t2i_medr": 1.0,
}
EXPECTED3["rsum"] = sum(v for k, v in EXPECTED3.items() if "_r" in k and "medr" not in k)


def assert_close(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_hand_computed_two_captions_with_ties():
    assert_close(recall_at_k(SIM3, CAP3, ks=(1, 2, 5)), EXPECTED3)


def test_caption_order_does_not_matter():
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    assert_close(recall_at_k(SIM3[:, perm], CAP3[perm], ks=(1, 2, 5)), EXPECTED3)


def test_hand_computed_five_captions():
    sim = torch.tensor([
        [0.1, 0.2, 0.3, 0.2, 0.1, 0.9, 0.8, 0.05, 0.0, 0.0],
        [0.5, 0.6, 0.7, 0.8, 0.9, 0.4, 0.3, 0.95, 0.2, 0.1],
    ])
    cap = torch.arange(2).repeat_interleave(5)
    # i2t ranks [3, 1]; t2i ranks [2] * 7 + [1] * 3
    got = recall_at_k(sim, cap, ks=(1, 2, 5))
    expected = {"i2t_r1": 50.0, "i2t_r2": 50.0, "i2t_r5": 100.0, "t2i_r1": 30.0, "t2i_r2": 100.0,
                "t2i_r5": 100.0, "i2t_medr": 2.0, "t2i_medr": 2.0}
    expected["rsum"] = 430.0
    assert_close(got, expected)


def naive(sim: torch.Tensor, cap: torch.Tensor, ks) -> dict:
    s, cap = sim.tolist(), cap.tolist()
    n_img, n_cap = len(s), len(cap)
    i2t = [min(1 + sum(s[i][d] > s[i][c] for d in range(n_cap)) for c in range(n_cap) if cap[c] == i)
           for i in range(n_img)]
    t2i = [1 + sum(s[j][c] > s[cap[c]][c] for j in range(n_img)) for c in range(n_cap)]
    out = {f"{d}_r{k}": 100 * sum(r <= k for r in ranks) / len(ranks)
           for d, ranks in (("i2t", i2t), ("t2i", t2i)) for k in ks}
    out["rsum"] = sum(out.values())
    out["i2t_medr"], out["t2i_medr"] = float(np.floor(np.median(i2t))), float(np.floor(np.median(t2i)))
    return out


def tied_problem(seed: int, n_img: int = 17, n_cap: int = 53, dim: int = 4):
    """Small-integer embeddings with duplicated rows: exact, frequent ties in fp32."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(-2, 3, (n_img, dim), generator=g).float()
    txt = torch.randint(-2, 3, (n_cap, dim), generator=g).float()
    img[1], img[5] = img[0], img[3]
    txt[7], txt[8], txt[20] = txt[0], txt[0], txt[11]
    cap = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (n_cap - n_img,), generator=g)])
    return img, txt, cap[torch.randperm(n_cap, generator=g)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ks", [(1, 5, 10), (1, 2, 3, 4)])
def test_matches_brute_force(seed, ks):
    img, txt, cap = tied_problem(seed)
    sim = img @ txt.T
    expected = naive(sim, cap, ks)
    assert_close(recall_at_k(sim, cap, ks=ks), expected)
    assert_close(retrieval_metrics(img, txt, cap, ks=ks), expected)


@pytest.mark.parametrize("chunk", [1, 2, 5, 16, 17, 1000])
def test_chunked_equals_unchunked(chunk):
    img, txt, cap = tied_problem(9)
    full = recall_at_k(img @ txt.T, cap, chunk=10**6)
    assert_close(retrieval_metrics(img, txt, cap, chunk=chunk), full)
    assert_close(recall_at_k(img @ txt.T, cap, chunk=chunk), full)


def test_every_image_needs_a_caption():
    with pytest.raises(ValueError):
        recall_at_k(torch.zeros(3, 4), torch.tensor([0, 0, 1, 1]))


def coco_problem():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5000, 16, generator=g), dim=1)
    cap = torch.arange(5000).repeat_interleave(5)
    txt = torch.nn.functional.normalize(img[cap] + 1.2 * torch.randn(25000, 16, generator=g), dim=1)
    return img, txt, cap


def test_coco_1k_is_mean_of_folds_and_not_npc_bug():
    img, txt, cap = coco_problem()
    folds = [recall_at_k(img[1000 * f : 1000 * f + 1000] @ txt[5000 * f : 5000 * f + 5000].T,
                         cap[5000 * f : 5000 * f + 5000] - 1000 * f) for f in range(5)]
    expected = {k: np.mean([m[k] for m in folds]) for k in folds[0]}
    got = evaluate_protocol("coco-1k", img, txt, cap)
    assert_close(got, expected)
    assert got["rsum"] == pytest.approx(sum(v for k, v in got.items() if "_r" in k and "medr" not in k))
    assert abs(got["t2i_r10"] - got["i2t_r10"]) > 1.0
    perm = torch.randperm(25000, generator=torch.Generator().manual_seed(1))
    assert_close(evaluate_protocol("coco-1k", img, txt[perm], cap[perm]), expected)


def test_whole_split_protocols_and_errors():
    img, txt, cap = tied_problem(3)
    expected = retrieval_metrics(img, txt, cap)
    assert set(PROTOCOLS) == {"1k", "coco-1k", "coco-5k"}
    assert_close(evaluate_protocol("1k", img, txt, cap), expected)
    assert_close(evaluate_protocol("coco-5k", img, txt, cap), expected)
    with pytest.raises(ValueError, match="5000"):
        evaluate_protocol("coco-1k", img, txt, cap)
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_protocol("f30k", img, txt, cap)


def test_detection_metrics_hand_computed():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])
    clean = np.array([1, 1, 0, 1, 0, 1, 0, 0], dtype=bool)
    got = detection_metrics(scores, clean, threshold=0.65)
    # kept = first 3 samples: TP = 2 of 3 kept, 4 clean
    expected = {"auroc": 13 / 16, "ap": (1 + 1 + 3 / 4 + 4 / 6) / 4, "precision": 2 / 3, "recall": 0.5,
                "f1": 4 / 7, "kept_frac": 3 / 8}
    assert_close(got, expected)
    assert got["auroc"] == pytest.approx(roc_auc_score(clean, scores))
    assert got["ap"] == pytest.approx(average_precision_score(clean, scores))


def test_detection_metrics_degenerate():
    scores = np.array([0.2, 0.4, 0.1])
    all_clean = detection_metrics(scores, np.ones(3, dtype=bool))
    assert math.isnan(all_clean["auroc"]) and math.isnan(all_clean["ap"])
    none_kept = detection_metrics(scores, np.array([1, 0, 1], dtype=bool), threshold=0.5)
    assert math.isnan(none_kept["precision"])
    assert none_kept["recall"] == 0.0 and none_kept["f1"] == 0.0 and none_kept["kept_frac"] == 0.0


def test_metric_directions():
    img, txt, cap = tied_problem(0)
    detection = set(detection_metrics(np.array([0.1, 0.9]), np.array([0, 1]))) - {"kept_frac"}
    keys = set(retrieval_metrics(img, txt, cap)) | detection
    assert keys <= set(METRICS)
    assert METRICS["rsum"] and METRICS["auroc"] and not METRICS["i2t_medr"] and not METRICS["t2i_medr"]


def recalls_from_ranks(i2t: np.ndarray, t2i: np.ndarray) -> dict:
    out = {f"{d}_r{k}": 100 * np.mean(r <= k) for d, r in (("i2t", i2t), ("t2i", t2i)) for k in (1, 5, 10)}
    out["rsum"] = sum(out.values())
    out["i2t_medr"], out["t2i_medr"] = float(np.floor(np.median(i2t))), float(np.floor(np.median(t2i)))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_ranks_are_the_brute_force_ranks_and_give_the_recalls(seed):
    img, txt, cap = tied_problem(seed)
    s, c = (img @ txt.T).tolist(), cap.tolist()
    i2t = [min(1 + sum(s[i][d] > s[i][k] for d in range(len(c))) for k in range(len(c)) if c[k] == i)
           for i in range(len(s))]
    t2i = [1 + sum(s[j][k] > s[c[k]][k] for j in range(len(s))) for k in range(len(c))]
    metrics, got_i2t, got_t2i = evaluate_protocol_with_ranks("1k", img, txt, cap)
    assert got_i2t.tolist() == i2t and got_t2i.tolist() == t2i
    assert_close(metrics, recalls_from_ranks(got_i2t, got_t2i))


def test_coco_1k_ranks_are_the_folds_ranks_in_order():
    img, txt, cap = coco_problem()
    perm = torch.randperm(25000, generator=torch.Generator().manual_seed(2))
    txt, cap = txt[perm], cap[perm]
    metrics, i2t, t2i = evaluate_protocol_with_ranks("coco-1k", img, txt, cap)
    assert i2t.shape == (5000,) and t2i.shape == (25000,)
    folds, start = [], 0
    for f in range(5):
        keep = (cap >= 1000 * f) & (cap < 1000 * (f + 1))  # the fold's captions in their original order
        _, fold_i2t, fold_t2i = evaluate_protocol_with_ranks("1k", img[1000 * f:1000 * (f + 1)], txt[keep],
                                                             cap[keep] - 1000 * f)
        np.testing.assert_array_equal(i2t[1000 * f:1000 * (f + 1)], fold_i2t)
        np.testing.assert_array_equal(t2i[start:start + len(fold_t2i)], fold_t2i)
        start += len(fold_t2i)
        folds.append(recalls_from_ranks(fold_i2t, fold_t2i))
    assert_close(metrics, {k: np.mean([m[k] for m in folds]) for k in folds[0]})
    assert_close(metrics, evaluate_protocol("coco-1k", img, txt, cap))
