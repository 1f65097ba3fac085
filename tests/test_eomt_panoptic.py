"""EoMT panoptic segmentation: the runtime's numpy post-processing against the official steps re-stated in torch.

The official steps (github.com/tue-mps/eomt, training/lightning_module.py `to_per_pixel_preds_panoptic`, run on the
instance canvas reverted to the image): per query, argmax of softmax over all C + 1 columns; keep queries whose class
is not no-object and whose probability is > 0.8; every pixel to the kept query with the largest probability x
sigmoid(mask); a query is a segment if the area it won is >= 0.8 x the area of its own mask (sigmoid >= 0.5) and its
own mask and won area overlap; stuff classes merged into one segment per class; ids in query order from 0, -1 void.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers (pinned 5.24)")
F = torch.nn.functional

from vit_helpers import make_confident  # noqa: E402

from deimv2_deploy.cli.export import main as export_main  # noqa: E402
from deimv2_deploy.exporters.vit_export import export_vit  # noqa: E402
from deimv2_deploy.preprocess import resize_like_pil  # noqa: E402
from deimv2_deploy.runtimes import load_runtime  # noqa: E402
from deimv2_deploy.segmentation import PanopticSegments, panoptic_from_outputs  # noqa: E402
from deimv2_deploy.vit_spec import parse_stuff_classes  # noqa: E402

# random init gives near-identical queries with class probabilities < 0.8 and mask logits of std ~0.002, so panoptic
# would keep nothing: the class head is sharpened (x40, no-object biased so that a couple of queries stay confident)
# and the mask head scaled (x300, mask logits of std ~0.5). Richer outputs (many segments, stuff merges) are tested on
# synthetic logits below, through the same function and the official steps.
CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8, num_register_tokens=1, num_blocks=1, num_queries=40, num_labels=4)
STUFF = (0, 1)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("panoptic")
    torch.manual_seed(3)
    model = transformers.EomtDinov3ForUniversalSegmentation(transformers.EomtDinov3Config(**CONFIG)).eval()
    model.attn_mask_probs.fill_(0.0)
    make_confident(model, no_object_bias=13.5)  # instances pass --score, panoptic keeps segments
    model.save_pretrained(root / "sharp")
    with_stuff = export_vit("eomt", root / "sharp", output_dir=root / "a", stuff_classes="0-1", quiet=True)
    without = export_vit("eomt", root / "sharp", output_dir=root / "b", quiet=True)
    return {"folder": root / "sharp", "stuff": with_stuff, "unknown": without}


def _official_panoptic(runtime, image_rgb: np.ndarray, stuff: tuple[int, ...], strict_ratio: bool = False):
    """The official steps in torch; strict_ratio=True uses transformers' `ratio > 0.8` instead of `>= 0.8`."""
    size = runtime.spec.input_size[0]
    h, w = image_rgb.shape[:2]
    factor = min(size / h, size / w)
    nh, nw = round(h * factor), round(w * factor)
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:nh, :nw] = resize_like_pil(image_rgb, (nh, nw))  # the image resize is ours on both sides
    out = runtime.infer(runtime.normalize(canvas)[None])
    logits = F.interpolate(torch.from_numpy(out["masks_queries_logits"]), (size, size), mode="bilinear")
    logits = F.interpolate(logits[:, :, :nh, :nw], (h, w), mode="bilinear")[0]
    return _official_segments(torch.from_numpy(out["class_queries_logits"][0]), logits, stuff, strict_ratio)


def _official_segments(class_logits, mask_logits, stuff, strict_ratio=False, threshold=0.8, overlap=0.8):
    """(segment id map (H, W) with -1 void, [(id, label, query)]) from (Q, C + 1) class and (Q, H, W) mask logits."""
    probs, classes = class_logits.softmax(-1).max(-1)
    keep = (classes != class_logits.shape[-1] - 1) & (probs > threshold)
    ids = torch.full(mask_logits.shape[-2:], -1, dtype=torch.long)
    if not keep.any():
        return ids.numpy(), []
    masks = mask_logits[keep].sigmoid()
    winners = (probs[keep][:, None, None] * masks).argmax(0)
    segments, stuff_seen = [], {}
    kept_queries = torch.nonzero(keep)[:, 0].tolist()
    for k, (label, query) in enumerate(zip(classes[keep].tolist(), kept_queries, strict=True)):
        own, won = masks[k] >= 0.5, winners == k
        both = own & won
        a_own, a_won, a_both = int(own.sum()), int(won.sum()), int(both.sum())
        if a_own == 0 or a_won == 0 or a_both == 0:
            continue
        ratio = a_won / a_own
        if (ratio <= overlap) if strict_ratio else (ratio < overlap):
            continue
        if label in stuff and label in stuff_seen:
            ids[both] = stuff_seen[label]
            continue
        if label in stuff:
            stuff_seen[label] = len(segments)
        ids[both] = len(segments)
        segments.append((len(segments), label, query))
    return ids.numpy(), segments


@pytest.mark.parametrize("hw", [(45, 130), (90, 40), (32, 32)])
def test_panoptic_is_the_official_one(artifacts, hw):
    runtime = load_runtime(artifacts["stuff"].path)
    assert runtime.spec.stuff_classes == STUFF
    image = np.random.default_rng(hw[1]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    seg = runtime.predict(image, tasks=["panoptic", "instance"], color="rgb")
    assert seg.semantic is None and seg.instances is not None
    pan = seg.panoptic
    assert isinstance(pan, PanopticSegments) and pan.segment_ids.shape == hw and pan.segment_ids.dtype == np.int32
    want_ids, want_segments = _official_panoptic(runtime, image, STUFF)
    assert len(want_segments) >= 1  # not vacuous
    assert [(s.id, s.label, s.query) for s in pan.segments] == want_segments
    assert np.mean(pan.segment_ids == want_ids) > 0.999  # float noise may flip a pixel at a tie
    labels = pan.label_map()
    for s in pan.segments:
        assert s.is_thing == (s.label not in STUFF) and s.class_name == runtime.spec.class_names[s.label]
        assert s.area == int(np.sum(pan.segment_ids == s.id)) > 0
        assert 0.8 < s.score <= 1.0
        assert np.all(labels[pan.mask(s.id)] == s.label)
    assert np.all(labels[pan.segment_ids == -1] == -1)
    # a stuff class appears at most once, whatever number of queries predicted it
    stuff_labels = [s.label for s in pan.segments if not s.is_thing]
    assert len(stuff_labels) == len(set(stuff_labels))


def _synthetic_outputs(rng, queries: int, classes: int, grid: int):
    """Class logits (Q, C + 1) with most queries confident, mask logits (Q, grid, grid) shaped as overlapping discs."""
    class_logits = rng.normal(0, 1, (queries, classes + 1)).astype(np.float32)
    labels = rng.integers(0, classes + 1, queries)  # some queries confidently no-object
    class_logits[np.arange(queries), labels] += rng.choice([1.0, 4.0, 8.0], queries)  # some not above 0.8
    yy, xx = np.mgrid[:grid, :grid]
    centres = rng.uniform(0, grid, (queries, 2))
    radii = rng.uniform(grid / 10, grid / 4, queries)
    dist = np.hypot(yy[None] - centres[:, 0, None, None], xx[None] - centres[:, 1, None, None])
    mask_logits = (radii[:, None, None] - dist) * rng.uniform(0.3, 3.0, (queries, 1, 1))
    mask_logits += rng.normal(0, 0.5, mask_logits.shape)
    return class_logits, mask_logits.astype(np.float32)


def test_panoptic_on_synthetic_outputs_is_the_official_one():
    """Many queries, stuff merges, the canvas revert (upsample, crop, resize) on logits that resemble a trained
    model's (distinct overlapping blobs): our numpy function against the official steps in torch."""
    rng = np.random.default_rng(0)
    size, stuff, merged, total = 64, (0, 1, 2), 0, 0
    for image_hw in [(45, 130), (90, 40), (32, 32), (17, 23)] * 3:
        class_logits, mask_logits = _synthetic_outputs(rng, queries=12, classes=5, grid=size // 4)
        factor = min(size / image_hw[0], size / image_hw[1])
        scaled = (round(image_hw[0] * factor), round(image_hw[1] * factor))
        pan = panoptic_from_outputs(class_logits, mask_logits, scaled, image_hw, size, stuff,
                                    class_names=tuple("abcde"))
        logits = F.interpolate(torch.from_numpy(mask_logits)[None], (size, size), mode="bilinear")
        logits = F.interpolate(logits[:, :, :scaled[0], :scaled[1]], image_hw, mode="bilinear")[0]
        want_ids, want = _official_segments(torch.from_numpy(class_logits), logits, stuff)
        assert [(s.id, s.label, s.query) for s in pan.segments] == want
        assert np.mean(pan.segment_ids == want_ids) > 0.999
        _, separate = _official_segments(torch.from_numpy(class_logits), logits, ())
        merged += len(separate) - len(want)
        total += len(want)
        for s in pan.segments:
            assert s.is_thing == (s.label not in stuff) and s.area == int(np.sum(pan.segment_ids == s.id))
    assert total >= 20 and merged >= 3  # not vacuous: many segments, and stuff queries were merged


def test_panoptic_stuff_override(artifacts):
    """`stuff_classes="none"`: every class is a thing, as the official steps give with no stuff."""
    runtime = load_runtime(artifacts["stuff"].path)
    image = np.random.default_rng(7).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    separate = runtime.predict(image, tasks="panoptic", color="rgb", stuff_classes="none").panoptic
    assert separate.stuff_classes == () and all(s.is_thing for s in separate.segments)
    want_ids, want_segments = _official_panoptic(runtime, image, ())
    assert [(s.id, s.label, s.query) for s in separate.segments] == want_segments


def _two_query_case(won_pixels: int):
    """Query 0 owns 10 pixels and wins `won_pixels` of them; query 1 wins the rest of the image."""
    h = w = 8
    masks = np.full((2, h, w), -5.0, np.float32)
    masks[1] = -4.0  # query 1 wins the background (query 0 is below 0.5 there too)
    own = np.zeros((h, w), bool)
    own.reshape(-1)[:10] = True
    masks[0][own] = 5.0
    lost = np.flatnonzero(own.reshape(-1))[won_pixels:]
    masks[1].reshape(-1)[lost] = 8.0  # query 1 takes the other pixels of query 0's mask
    classes = np.array([[6.0, 0.0, 0.0, 0.0], [0.0, 6.0, 0.0, 0.0]], np.float32)  # p = 0.98 for classes 0 and 1
    return classes, masks


@pytest.mark.parametrize("won", [8, 7])
def test_overlap_ratio_boundary_is_inclusive(won):
    """won / own = 8 / 10 = 0.8 exactly: official (>= 0.8) keeps the segment, transformers' rule (> 0.8) does not."""
    classes, masks = _two_query_case(won)
    pan = panoptic_from_outputs(classes, masks, (8, 8), (8, 8), 8, stuff_classes=(), class_names=("a", "b", "c"))
    want_ids, want = _official_segments(torch.from_numpy(classes), torch.from_numpy(masks), ())
    _, strict = _official_segments(torch.from_numpy(classes), torch.from_numpy(masks), (), strict_ratio=True)
    assert [(s.id, s.label, s.query) for s in pan.segments] == want
    np.testing.assert_array_equal(pan.segment_ids, want_ids)
    if won == 8:
        assert [s.query for s in pan.segments] == [0, 1] and pan.segments[0].area == 8
        assert [q for _, _, q in strict] == [1]  # the boundary matters: > would drop query 0
    else:
        assert [s.query for s in pan.segments] == [1]  # 0.7 < 0.8 under either rule
    assert pan.segments[-1].class_name == "b"


def test_no_confident_query_gives_an_empty_map():
    classes = np.zeros((3, 4), np.float32)  # p = 0.25 everywhere: nothing above 0.8
    pan = panoptic_from_outputs(classes, np.zeros((3, 4, 4), np.float32), (4, 4), (6, 6), 4, stuff_classes=())
    assert len(pan) == 0 and pan.segment_ids.shape == (6, 6) and np.all(pan.segment_ids == -1)


def test_unknown_stuff_classes_are_one_clear_error(artifacts):
    runtime = load_runtime(artifacts["unknown"].path)
    assert runtime.spec.stuff_classes is None
    image = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ValueError, match="does not record which classes are stuff.*--stuff-classes"):
        runtime.predict(image, tasks="panoptic")
    assert runtime.predict(image).panoptic is None  # the default tasks (semantic, instance) need no split
    pan = runtime.predict(image, tasks="panoptic", stuff_classes=[1]).panoptic
    assert pan.stuff_classes == (1,)
    with pytest.raises(ValueError, match="outside this model's labels 0..3"):
        runtime.predict(image, tasks="panoptic", stuff_classes="2-9")


def test_parse_stuff_classes():
    names = ("person", "car", "sky", "grass", "road")
    assert parse_stuff_classes("2-4", names) == (2, 3, 4)
    assert parse_stuff_classes("sky,0,3-4", names) == (0, 2, 3, 4)
    assert parse_stuff_classes([4, "sky"], names) == (2, 4)
    assert parse_stuff_classes("none", names) == ()
    with pytest.raises(ValueError, match="'trees' is neither a label"):
        parse_stuff_classes("sky,trees", names)


def test_export_cli_stuff_classes(artifacts, tmp_path, capsys):
    assert export_main(["eomt", "--checkpoint", str(artifacts["folder"]), "--stuff-classes", "LABEL_3,1",
                        "--output-dir", str(tmp_path), "--quiet"]) == 0
    assert "(2 stuff / 2 thing)" in capsys.readouterr().out
    [path] = tmp_path.glob("*.onnx")
    assert load_runtime(path).spec.stuff_classes == (1, 3)
    capsys.readouterr()
    assert export_main(["eomt", "--checkpoint", str(artifacts["folder"]), "--stuff-classes", "7",
                        "--output-dir", str(tmp_path / "x"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("deimv2-export: error:") and "outside this model's labels 0..3" in err and "\n" not in err
