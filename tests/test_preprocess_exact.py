"""The one-pass preprocessing (resize in the input's channel order, then a per-plane lookup table) must give
exactly the arithmetic of the spec: RGB, x / 255 -> (x / 255 - mean) / std in float32, channels first."""
from __future__ import annotations

import numpy as np
import pytest

from deimv2_deploy.preprocess import Preprocessor, letterbox, resize_like_pil
from deimv2_deploy.spec import ArtifactSpec


def _arithmetic(spec: ArtifactSpec, image: np.ndarray, color: str, resize: str) -> np.ndarray:
    """The plain formula, step by step, as a reference (float32 rounding at each step)."""
    if image.ndim == 2 or image.shape[2] == 1:
        rgb = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    else:
        rgb = image[:, :, :3]
        rgb = rgb[:, :, ::-1] if color == "bgr" else rgb
    rgb = np.ascontiguousarray(rgb)
    resized = letterbox(rgb, spec.input_size)[0] if resize == "letterbox" else resize_like_pil(rgb, spec.input_size)
    x = resized.astype(np.float32)
    if spec.mean is None:
        x *= np.float32(1.0 / 255.0)
    else:
        std = np.asarray(spec.std, np.float32)
        x *= (1.0 / (255.0 * std)).astype(np.float32)
        x += (-np.asarray(spec.mean, np.float32) / std).astype(np.float32)
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize("variant", ["atto", "s"])  # no normalisation / ImageNet normalisation
@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_lookup_table_equals_the_arithmetic_bit_for_bit(variant, resize):
    spec = ArtifactSpec.for_variant(variant)
    prep = Preprocessor(spec, resize)
    rng = np.random.default_rng(0)
    shapes = [(480, 640, 3), (375, 500, 3), (100, 700, 3), (640, 640, 3), (480, 640), (480, 640, 1), (480, 640, 4)]
    for shape in shapes:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        for color in ("bgr", "rgb"):
            got = prep(image, color).images[0]
            assert got.dtype == np.float32 and got.shape == (3, *spec.input_size)
            assert np.array_equal(got, _arithmetic(spec, image, color, resize)), (shape, color)


def test_every_level_of_every_channel():
    """All 256 levels of each channel map exactly (the tables hold the whole range)."""
    spec = ArtifactSpec.for_variant("s")
    rows, cols = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    image = np.zeros((640, 640, 3), np.uint8)  # 640 x 640: no resize for s, so every level reaches the table
    image[:256, :256] = np.stack([rows, cols, 255 - rows], -1)
    got = Preprocessor(spec)(image).images[0]
    assert np.array_equal(got, _arithmetic(spec, image, "bgr", "stretch"))


def test_views_and_batches_are_handled():
    spec = ArtifactSpec.for_variant("atto")
    prep = Preprocessor(spec)
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    flipped = base[:, ::-1]  # negative strides
    crop = base[10:310, 20:620]  # non-contiguous rows
    batch = prep([flipped, crop, base])
    for i, image in enumerate((flipped, crop, base)):
        assert np.array_equal(batch.images[i], _arithmetic(spec, image, "bgr", "stretch"))
    assert batch.orig_target_sizes.tolist() == [[640, 480], [600, 300], [640, 480]]
    out = np.full((3, *spec.input_size), np.nan, np.float32)
    chw, _, _ = prep.prepare_one(base, out=out)
    assert chw is out and np.array_equal(out, batch.images[2])  # written in place


def test_bad_color_and_dtype_still_refused():
    prep = Preprocessor(ArtifactSpec.for_variant("atto"))
    image = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="color"):
        prep(image, color="hsv")
    with pytest.raises(ValueError, match="uint8"):
        prep(image.astype(np.float32))
