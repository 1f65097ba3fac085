"""Drawing EoMT segmentation and DINOv3 patch features (deimv2_deploy.drawing), no torch, no model."""
from __future__ import annotations

import numpy as np
import pytest

from deimv2_deploy.drawing import (
    class_color,
    draw_instances,
    draw_panoptic,
    draw_segmentation,
    draw_semantic,
    embeddings_pca_image,
)
from deimv2_deploy.embeddings import Embeddings
from deimv2_deploy.segmentation import InstanceSegments, PanopticSegment, PanopticSegments, Segmentation

NAMES = ("person", "car", "sky")


def _image(h=60, w=80):
    return np.full((h, w, 3), 100, np.uint8)


def test_semantic_overlay_uses_class_colours_and_leaves_void():
    image = _image()
    semantic = np.full((60, 80), -1, np.int64)
    semantic[:, :40] = 2
    semantic[30:, 40:] = 0
    out = draw_semantic(image, semantic, NAMES, alpha=0.5, labels=False)
    assert out.shape == image.shape and out is not image and np.all(image == 100)
    expected = (100 * 0.5 + np.asarray(class_color(2)) * 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out[10, 10], expected)  # inside a region, away from edges
    np.testing.assert_array_equal(out[5, 70], [100, 100, 100])  # void: untouched
    assert np.all(out[10, 39] < expected)  # the edge between classes is darkened
    labelled = draw_semantic(image, semantic, NAMES)
    assert np.any(labelled != out)  # names were written
    with pytest.raises(ValueError, match="semantic map is 10x10 but the image is 60x80"):
        draw_semantic(image, np.zeros((10, 10), np.int64))


def test_instances_respect_the_score_threshold():
    image = _image()
    masks = np.zeros((2, 60, 80), bool)
    masks[0, 5:25, 5:25] = True
    masks[1, 35:55, 45:75] = True
    inst = InstanceSegments(masks, np.array([0.9, 0.2], np.float32), np.array([0, 1]), np.array([3, 7]), NAMES)
    out = draw_instances(image, inst, score_threshold=0.5)
    assert np.any(out[5:25, 5:25] != 100)
    np.testing.assert_array_equal(out[36:54, 46:74], image[36:54, 46:74])  # below the threshold: not drawn
    both = draw_instances(image, inst, score_threshold=0.1)
    assert np.any(both[36:54, 46:74] != 100)
    np.testing.assert_array_equal(both[0:3, 0:3], image[0:3, 0:3])  # outside every mask


def test_panoptic_and_the_combined_panel():
    image = _image()
    ids = np.full((60, 80), -1, np.int32)
    ids[:20] = 0
    ids[30:50, 10:30] = 1
    segments = (PanopticSegment(0, 2, "sky", 0.95, False, int((ids == 0).sum()), 4),
                PanopticSegment(1, 0, "person", 0.9, True, int((ids == 1).sum()), 9))
    pan = PanopticSegments(ids, segments, (2,))
    out = draw_panoptic(image, pan, NAMES)
    assert np.any(out[:20] != 100) and np.any(out[30:50, 10:30] != 100)
    np.testing.assert_array_equal(out[55:, 50:], image[55:, 50:])  # void: untouched
    np.testing.assert_array_equal(pan.label_map()[ids == -1], -1)
    seg = Segmentation((60, 80), NAMES, semantic=np.zeros((60, 80), np.int64), panoptic=pan)
    assert draw_segmentation(image, seg).shape == (60, 160, 3)  # semantic | panoptic
    with pytest.raises(ValueError, match="holds no result"):
        draw_segmentation(image, Segmentation((60, 80), NAMES))


def test_pca_image_separates_patch_groups():
    """Patches from two distinct directions (plus noise) get two clearly different colours; blocks per patch."""
    rng = np.random.default_rng(0)
    rows, cols, dim = 4, 6, 16
    a, b = rng.normal(size=dim), rng.normal(size=dim)
    patches = np.where(np.arange(cols)[None, :, None] < 3, a, b) + rng.normal(0, 0.01, (rows, cols, dim))
    emb = Embeddings(cls=np.zeros(dim, np.float32), registers=np.zeros((0, dim), np.float32),
                     patches=patches.astype(np.float32), pooled=np.zeros(dim, np.float32), image_size=(40, 60))
    img = embeddings_pca_image(emb)
    assert img.shape == (40, 60, 3) and img.dtype == np.uint8
    left, right = img[:, :30].reshape(-1, 3).astype(int), img[:, 30:].reshape(-1, 3).astype(int)
    # the first component (red, channel 2 in BGR) splits the two groups end to end
    assert abs(int(np.median(left[:, 2])) - int(np.median(right[:, 2]))) > 200
    np.testing.assert_array_equal(img[0, 0], img[9, 9])  # one block per patch (10 x 10 pixels)
    assert embeddings_pca_image(emb, (8, 12), smooth=True).shape == (8, 12, 3)
