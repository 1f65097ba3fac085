"""mIoU and PQ (deimv2_deploy.segmentation_metrics) against torchmetrics' maintained implementations, on random
and constructed cases, plus the COCO panoptic (panopticapi) rules where torchmetrics has none or differs: crowd
regions, and pixels the prediction leaves void."""
from __future__ import annotations

import numpy as np
import pytest

from deimv2_deploy.segmentation_metrics import PanopticQuality, SemanticConfusion

torch = pytest.importorskip("torch")
tm = pytest.importorskip("torchmetrics", reason="the dev extra installs torchmetrics (pinned 1.9)")
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex  # noqa: E402
from torchmetrics.detection import PanopticQuality as TmPanopticQuality  # noqa: E402

THINGS, STUFF = (1, 2, 3), (7, 8)  # category ids; 0 marks void in the torchmetrics encoding below
CATEGORIES = THINGS + STUFF


# --- semantic ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_miou_and_pixel_accuracy_equal_torchmetrics_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    c = 7
    ours = SemanticConfusion(c)
    jaccard = MulticlassJaccardIndex(num_classes=c, average="macro", ignore_index=255)
    per_class = MulticlassJaccardIndex(num_classes=c, average="none", ignore_index=255)
    accuracy = MulticlassAccuracy(num_classes=c, average="micro", ignore_index=255)
    for _ in range(3):
        h, w = rng.integers(5, 30, 2)
        target = rng.integers(0, c - 2, (h, w))  # classes 5 and 6 never in the ground truth ...
        pred = np.where(rng.random((h, w)) < 0.6, target, rng.integers(0, c - 1, (h, w)))  # ... 6 never predicted
        target[rng.random((h, w)) < 0.15] = -1  # void
        ours.update(target, pred)
        t = torch.from_numpy(np.where(target < 0, 255, target))
        for metric in (jaccard, per_class, accuracy):
            metric.update(torch.from_numpy(pred)[None], t[None])
    scores = ours.scores()
    ref = per_class.compute().numpy()
    assert scores["iou"][6] is None  # absent from both: no IoU, left out of the mean
    for k, v in enumerate(scores["iou"]):
        assert (v is None and ref[k] == 0) or v == pytest.approx(float(ref[k]), abs=1e-6)
    assert scores["mIoU"] == pytest.approx(float(jaccard.compute()), abs=1e-6)
    assert scores["pixel_accuracy"] == pytest.approx(float(accuracy.compute()), abs=1e-6)


def test_semantic_edge_cases():
    conf = SemanticConfusion(3)
    conf.update(np.full((2, 2), -1), np.zeros((2, 2), int))  # all void: nothing counted
    assert conf.scores()["mIoU"] is None and conf.scores()["pixel_accuracy"] is None
    target = np.array([[0, 1], [2, -1]])
    conf.update(target, np.array([[0, 1], [2, 0]]))  # the ground truth itself (void pixel anything)
    assert conf.scores()["mIoU"] == 1.0 and conf.scores()["pixel_accuracy"] == 1.0
    with pytest.raises(ValueError, match="predicted labels must lie in 0..2"):
        conf.update(target, np.array([[0, 1], [3, 0]]))
    with pytest.raises(ValueError, match="same shape"):
        conf.update(target, np.zeros((3, 2), int))


# --- panoptic: helpers --------------------------------------------------------------------------------------------
def _random_panoptic(rng, h, w, base=None, void=True):
    """(segment ids, {id: category}) from random rectangles; stuff categories get one segment each. `base`: start
    from that map (a prediction that resembles the ground truth), relabelling some of its segments."""
    if base is None:
        ids, cats = np.zeros((h, w), np.int64), {}
        if not void:  # a full-image stuff segment first
            ids[:], cats[1] = 1, STUFF[0]
    else:
        ids, cats = base[0].copy(), dict(base[1])
        for sid in list(cats):
            if rng.random() < 0.2 and cats[sid] in THINGS:
                cats[sid] = int(rng.choice(THINGS))
    stuff_id = {c: s for s, c in cats.items() if c in STUFF}
    for _ in range(rng.integers(2, 9)):
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
        cat = int(rng.choice(CATEGORIES))
        if cat in STUFF and cat in stuff_id:
            sid = stuff_id[cat]
        else:
            sid = max(cats, default=0) + 1
            cats[sid] = cat
            if cat in STUFF:
                stuff_id[cat] = sid
        ids[y0:y1, x0:x1] = sid
    present = set(np.unique(ids).tolist())
    return ids, {s: c for s, c in cats.items() if s in present}


def _tm_input(ids, cats):
    """torchmetrics' (H, W, 2) (category, instance) encoding; void -> category 0 (not a thing or stuff)."""
    out = np.zeros(ids.shape + (2,), np.int64)
    for sid, cat in cats.items():
        out[ids == sid] = (cat, sid)
    return torch.from_numpy(out)


def _ours(pairs, crowd=()):
    pq = PanopticQuality(CATEGORIES)
    for (g, gc), (p, pc) in pairs:
        pq.update(g, {s: (c, s in crowd) for s, c in gc.items()}, p, pc)
    return pq.scores(THINGS)


def _tm(pairs):
    metric = TmPanopticQuality(things=set(THINGS), stuffs=set(STUFF), return_sq_and_rq=True, return_per_class=True,
                               allow_unknown_preds_category=True)
    for (g, gc), (p, pc) in pairs:
        metric.update(_tm_input(p, pc)[None], _tm_input(g, gc)[None])
    per_class = metric.compute().numpy()  # (things sorted, then stuff sorted) x (PQ, SQ, RQ)
    overall = TmPanopticQuality(things=set(THINGS), stuffs=set(STUFF), return_sq_and_rq=True,
                                allow_unknown_preds_category=True)
    for (g, gc), (p, pc) in pairs:
        overall.update(_tm_input(p, pc)[None], _tm_input(g, gc)[None])
    return dict(zip(sorted(THINGS) + sorted(STUFF), per_class.tolist(), strict=True)), overall.compute().numpy()


def _assert_same(ours, pairs):
    per_class, overall = _tm(pairs)
    for cid, ref in per_class.items():
        mine = ours["per_class"][cid]
        if mine["PQ"] is None:  # nothing to count for that class: torchmetrics reports 0 and leaves it out
            assert ref == [0.0, 0.0, 0.0]
        else:
            assert [mine["PQ"], mine["SQ"], mine["RQ"]] == pytest.approx(ref, abs=1e-6), cid  # float32 there
    assert [ours["all"]["PQ"], ours["all"]["SQ"], ours["all"]["RQ"]] == pytest.approx(overall.tolist(), abs=1e-6)


# --- panoptic: the same as torchmetrics where the conventions agree --------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_pq_equals_torchmetrics_on_random_images(seed):
    """Predictions that cover every pixel (no predicted void), ground truth with void, no crowd: panopticapi's and
    torchmetrics' rules are the same."""
    rng = np.random.default_rng(100 + seed)
    pairs = []
    for _ in range(4):
        h, w = (int(v) for v in rng.integers(8, 24, 2))
        gt = _random_panoptic(rng, h, w)
        pred = _random_panoptic(rng, h, w, base=_random_panoptic(rng, h, w, base=gt, void=False), void=False)
        if 0 in pred[0]:  # cover every pixel
            pred[0][pred[0] == 0] = max(pred[1]) + 1
            pred[1][max(pred[1]) + 1] = THINGS[0]
        pairs.append((gt, pred))
    ours = _ours(pairs)
    assert ours["all"]["n"] > 0 and sum(v["TP"] for v in ours["per_class"].values()) > 0
    _assert_same(ours, pairs)


def _image(h, w, segments, fill=0):
    """ids map and categories from [(id, category, (y0, y1, x0, x1))] painted in order."""
    ids = np.full((h, w), fill, np.int64)
    cats = {}
    for sid, cat, (y0, y1, x0, x1) in segments:
        ids[y0:y1, x0:x1] = sid
        cats[sid] = cat
    if fill:
        cats[fill] = STUFF[0]
    return ids, cats


def test_match_needs_iou_strictly_above_one_half():
    """GT thing of 10x10 on stuff; predicted thing of 10x5 inside it: IoU exactly 0.5 is no match (FP + FN);
    10x6: IoU 0.6 is a match."""
    gt = _image(12, 12, [(1, 1, (1, 11, 1, 11))], fill=9)
    half = _image(12, 12, [(1, 1, (1, 11, 1, 6))], fill=9)
    more = _image(12, 12, [(1, 1, (1, 11, 1, 7))], fill=9)
    at = _ours([(gt, half)])["per_class"][1]
    assert (at["TP"], at["FP"], at["FN"], at["PQ"]) == (0, 1, 1, 0.0)
    above = _ours([(gt, more)])["per_class"][1]
    assert (above["TP"], above["FP"], above["FN"]) == (1, 0, 0) and above["PQ"] == pytest.approx(0.6)
    for pairs in ([(gt, half)], [(gt, more)], [(gt, half), (gt, more)]):
        _assert_same(_ours(pairs), pairs)


def test_ground_truth_void():
    """Ground truth 12x12: thing 1 at rows 0..5, void below. A prediction of thing 1 over rows 0..9 (4 rows on void)
    matches with IoU 1 (void pixels left out of the union); a second predicted thing 2 with 60 % on void is not a
    false positive, with 40 % on void it is."""
    gt = _image(12, 12, [(1, 1, (0, 6, 0, 12))])
    pred = _image(12, 12, [(1, 1, (0, 10, 0, 12)), (2, 2, (10, 12, 0, 12))], fill=5)
    ours = _ours([(gt, pred)])
    assert ours["per_class"][1]["TP"] == 1 and ours["per_class"][1]["SQ"] == pytest.approx(1.0)
    assert ours["per_class"][2]["FP"] == 0  # thing 2: 24 pixels, all on void
    # predicted stuff (fill) covers rows 10..11 only where thing 2 does not: here nowhere -> no segment
    mostly_void = _image(12, 12, [(1, 1, (0, 6, 0, 12)), (2, 2, (4, 9, 0, 12))], fill=5)  # 36 of 60 on void
    partly_void = _image(12, 12, [(1, 1, (0, 6, 0, 12)), (2, 2, (3, 8, 0, 12))], fill=5)  # 24 of 60 on void
    assert _ours([(gt, mostly_void)])["per_class"][2]["FP"] == 0
    assert _ours([(gt, partly_void)])["per_class"][2]["FP"] == 1
    for pairs in ([(gt, pred)], [(gt, mostly_void)], [(gt, partly_void)]):
        _assert_same(_ours(pairs), pairs)


def test_stuff_and_empty_classes():
    """Stuff is scored like things (one segment per class); averages leave out classes with TP + FP + FN = 0."""
    gt = _image(10, 10, [(1, 7, (0, 10, 0, 5)), (2, 8, (0, 10, 5, 10))])
    pred = _image(10, 10, [(1, 7, (0, 10, 0, 4)), (2, 8, (0, 10, 4, 10))])
    ours = _ours([(gt, pred)])
    assert ours["per_class"][7]["PQ"] == pytest.approx(40 / 50) and ours["per_class"][8]["PQ"] == pytest.approx(
        50 / 60)
    assert ours["things"] == {"PQ": None, "SQ": None, "RQ": None, "n": 0}
    assert ours["stuff"]["n"] == 2 and ours["all"]["PQ"] == pytest.approx((0.8 + 50 / 60) / 2)
    _assert_same(ours, [(gt, pred)])


def test_ground_truth_as_prediction_gives_one():
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(3):
        gt = _random_panoptic(rng, 16, 16)
        pairs.append((gt, gt))
    ours = _ours(pairs)
    assert ours["all"]["PQ"] == ours["all"]["SQ"] == ours["all"]["RQ"] == 1.0
    assert all(v["FP"] == v["FN"] == 0 for v in ours["per_class"].values())


# --- panoptic: where panopticapi's rules are followed and torchmetrics differs ---------------------------------
def test_predicted_void_counts_as_panopticapi_does_and_differs_from_torchmetrics():
    """GT thing of 10 pixels; the prediction covers 6 of them and leaves the rest void. panopticapi: IoU =
    6 / (6 + 10 - 6) = 0.6. torchmetrics also removes the 4 ground-truth pixels the prediction leaves void from the
    union: IoU 1.0."""
    gt = _image(1, 12, [(1, 1, (0, 1, 0, 10))], fill=9)
    pred = _image(1, 12, [(1, 1, (0, 1, 0, 6))])
    pred[0][0, 10:] = 9
    pred[1][9] = STUFF[0]
    ours = _ours([(gt, pred)])
    assert ours["per_class"][1]["SQ"] == pytest.approx(0.6)
    per_class, _ = _tm([(gt, pred)])
    assert per_class[1][1] == pytest.approx(1.0)  # torchmetrics' SQ for the same case
    # a GT segment the prediction leaves (mostly) void: a false negative for panopticapi, ignored by torchmetrics
    empty = (np.zeros((1, 12), np.int64), {})
    ours = _ours([(gt, empty)])
    assert (ours["per_class"][1]["FN"], ours["per_class"][1]["PQ"]) == (1, 0.0)
    assert (ours["per_class"][STUFF[0]]["FN"], ours["all"]["PQ"]) == (1, 0.0)


def test_crowd_regions():
    """A crowd region (GT id 2, thing 1) is never matched, even by a perfect prediction, and is no false negative; an
    unmatched predicted thing 1 more than half on it (plus void) is not a false positive; another class is."""
    gt = _image(10, 10, [(1, 1, (0, 5, 0, 10)), (2, 1, (5, 10, 0, 10))], fill=0)
    perfect = _image(10, 10, [(1, 1, (0, 5, 0, 10)), (2, 1, (5, 10, 0, 10))])
    ours = _ours([(gt, perfect)], crowd={2})["per_class"][1]
    assert (ours["TP"], ours["FP"], ours["FN"], ours["PQ"]) == (1, 0, 0, 1.0)
    other = _image(10, 10, [(1, 1, (0, 5, 0, 10)), (2, 2, (5, 10, 0, 10))])
    ours = _ours([(gt, other)], crowd={2})["per_class"]
    assert ours[2]["FP"] == 1 and ours[1]["FN"] == 0
    # predicted thing 1 segments: 1 matches GT 1; 3 lies on GT 1 only (no crowd, no void); 4 lies on the crowd region
    partial = _image(10, 10, [(1, 1, (0, 4, 0, 10)), (3, 1, (4, 5, 0, 10)), (4, 1, (5, 10, 0, 3))])
    ours = _ours([(gt, partial)], crowd={2})["per_class"][1]
    assert ours["TP"] == 1 and ours["FP"] == 1  # segment 3 (10 px, none on crowd) is a false positive, 4 is not


def test_bad_panoptic_inputs():
    pq = PanopticQuality(CATEGORIES)
    ids = np.array([[1, 2]])
    with pytest.raises(ValueError, match=r"prediction segment ids \[2\] appear in the map but not in its segment"):
        pq.update(ids, {1: (1, False), 2: (2, False)}, ids, {1: 1})
    with pytest.raises(ValueError, match="category 4, which is not one of the evaluated categories"):
        pq.update(ids, {1: (1, False), 2: (2, False)}, ids, {1: 1, 2: 4})
    with pytest.raises(ValueError, match="same shape"):
        pq.update(ids, {1: (1, False), 2: (2, False)}, ids.T, {1: 1, 2: 1})
