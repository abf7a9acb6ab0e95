"""The embedded benchmark's drawing primitives: masks, placement, gratings, quadrants, digits."""
import itertools

import numpy as np
import pytest

from tvq_lightning.data.embedded import render as R


@pytest.mark.parametrize("shape", R.SHAPES)
@pytest.mark.parametrize("radius", [lo for lo, _ in R.SIZE_RADII] + [R.SIZE_RADII[-1][1]])
def test_shape_mask_is_nonempty_and_local(shape, radius):
    cx, cy = 13.3, 17.8
    mask = R.shape_mask(shape, cx, cy, radius)
    assert mask.shape == (R.SIZE, R.SIZE) and mask.dtype == bool
    assert mask.sum() >= 4
    ys, xs = np.nonzero(mask)
    # every painted pixel centre lies within the shape's extent (diamond: 1.1 r is the widest)
    assert np.all(np.hypot(xs + 0.5 - cx, ys + 0.5 - cy) <= 1.1 * radius * np.sqrt(2) + 1e-6)
    assert np.all(np.abs(xs + 0.5 - cx) <= 1.1 * radius) and np.all(np.abs(ys + 0.5 - cy) <= 1.1 * radius)


def test_shapes_differ_and_ring_has_a_hole():
    masks = {s: R.shape_mask(s, 16, 16, 8.0) for s in R.SHAPES}
    for a, b in itertools.combinations(R.SHAPES, 2):
        assert not np.array_equal(masks[a], masks[b]), (a, b)
    assert masks["circle"][15:17, 15:17].all() and not masks["ring"][15:17, 15:17].any()
    assert (masks["ring"] <= masks["circle"]).all()
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        R.shape_mask("blob", 16, 16, 3)


@pytest.mark.parametrize("style", R.BACKGROUNDS)
def test_backgrounds_are_dark_canvases(style):
    a = R.background(np.random.default_rng(0), style)
    b = R.background(np.random.default_rng(0), style)
    c = R.background(np.random.default_rng(1), style)
    assert a.shape == (R.SIZE, R.SIZE, 3) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= (1.0 if style == "noisy" else 0.42)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    if style != "plain":
        assert a.reshape(-1, 3).std(0).max() > 0  # the styles other than plain vary across the canvas


def test_unknown_background_raises():
    with pytest.raises(ValueError, match="unknown background style 'wavy'"):
        R.background(np.random.default_rng(0), "wavy")


@pytest.mark.parametrize("n,r", [(1, 12.0), (3, 4.0), (6, 3.0), (6, 4.0), (4, 5.5)])
def test_place_gives_separated_centres_inside_the_canvas(n, r):
    for seed in range(5):
        centres = R.place(np.random.default_rng(seed), n, r)
        assert len(centres) == n
        c = np.asarray(centres)
        assert np.all(c >= r + 0.5) and np.all(c <= R.SIZE - r - 0.5)
        for (ax, ay), (bx, by) in itertools.combinations(centres, 2):
            assert (ax - bx) ** 2 + (ay - by) ** 2 >= (2 * r + 1.5) ** 2
    assert R.place(np.random.default_rng(7), n, r) == R.place(np.random.default_rng(7), n, r)


def test_place_respects_its_box_and_raises_when_impossible():
    box = (20.0, 2.0, 28.0, 10.0)
    for x, y in R.place(np.random.default_rng(0), 2, 2.0, box):
        assert box[0] <= x <= box[2] and box[1] <= y <= box[3]
    with pytest.raises(RuntimeError, match="cannot place 9 objects of radius 8"):
        R.place(np.random.default_rng(0), 9, 8.0, restarts=3, tries=5)


@pytest.mark.parametrize("position", range(9))
@pytest.mark.parametrize("r", [2.0, 3.0, 4.5])
def test_cell_box_lies_in_its_grid_cell(position, r):
    row, col = divmod(position, 3)
    w = R.SIZE / 3
    x0, y0, x1, y1 = R.cell_box(position, r)
    assert col * w <= x0 < x1 <= (col + 1) * w and row * w <= y0 < y1 <= (row + 1) * w
    assert x0 >= r and y0 >= r and x1 <= R.SIZE - r and y1 <= R.SIZE - r


@pytest.mark.parametrize("orientation,varies_along", [(0, "y"), (4, "x")])
def test_grating_orientation(orientation, varies_along):
    for seed in range(10):
        g = R.grating(np.random.default_rng(seed), orientation, np.ones(3, np.float32),
                      np.zeros((R.SIZE, R.SIZE, 3), np.float32))[..., 0]
        along_y = np.abs(np.diff(g, axis=0)).mean()  # change from row to row
        along_x = np.abs(np.diff(g, axis=1)).mean()
        if varies_along == "y":  # horizontal bars: constant along a row, changing down a column
            assert along_x < 0.3 * along_y
        else:
            assert along_y < 0.3 * along_x


def test_grating_diagonals_are_mirror_images():
    # rising diagonal (2) and falling diagonal (6): the wave changes equally along x and y
    for orientation in (2, 6):
        g = R.grating(np.random.default_rng(0), orientation, np.ones(3, np.float32),
                      np.zeros((R.SIZE, R.SIZE, 3), np.float32))[..., 0]
        ratio = np.abs(np.diff(g, axis=0)).mean() / np.abs(np.diff(g, axis=1)).mean()
        assert 0.6 < ratio < 1.6


@pytest.mark.parametrize("quadrant", range(4))
def test_brighten_quadrant(quadrant):
    canvas = np.full((R.SIZE, R.SIZE, 3), 0.2, np.float32)
    out = R.brighten_quadrant(canvas, quadrant, 0.3)
    h = R.SIZE // 2
    means = out.mean(-1).reshape(2, h, 2, h).mean((1, 3)).reshape(4)
    assert means.argmax() == quadrant
    np.testing.assert_allclose(means[quadrant], 0.5, atol=1e-6)
    np.testing.assert_allclose(np.delete(means, quadrant), 0.2, atol=1e-6)
    assert R.brighten_quadrant(np.full((R.SIZE, R.SIZE, 3), 0.9, np.float32), quadrant, 0.4).max() == 1.0


def test_digit_blends_by_ink():
    canvas = np.zeros((R.SIZE, R.SIZE, 3), np.float32)
    image8 = np.zeros((8, 8), np.float32)
    image8[2, 3], image8[5, 5] = 16.0, 8.0
    rgb = np.array([1.0, 0.5, 0.0], np.float32)
    R.digit(canvas, image8, rgb, ox=4, oy=1)
    np.testing.assert_allclose(canvas[1 + 6:1 + 9, 4 + 9:4 + 12], np.broadcast_to(rgb, (3, 3, 3)))  # full ink
    np.testing.assert_allclose(canvas[1 + 15:1 + 18, 4 + 15:4 + 18], np.broadcast_to(rgb / 2, (3, 3, 3)))
    assert np.count_nonzero(canvas.any(-1)) == 18  # two 3 x 3 blocks, nothing else


def test_colour_jitter_and_to_uint8():
    for name, rgb in R.COLOURS.items():
        c = R.colour(np.random.default_rng(0), name)
        assert c.dtype == np.float32 and np.all(np.abs(c - np.asarray(rgb)) <= 0.07 + 1e-6)
        assert c.min() >= 0 and c.max() <= 1
    out = R.to_uint8(np.array([[-0.5, 0.0, 0.5, 1.0, 2.0]], np.float32))
    assert out.dtype == np.uint8 and out.tolist() == [[0, 0, 128, 255, 255]]
