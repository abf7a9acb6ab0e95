"""Scenes, captions, the eight tasks and the closed vocabulary agree with each other."""
import dataclasses
import re

import numpy as np
import pytest

from tvq_lightning.data.embedded import TASK_NAMES, TASKS, task_split, vocabulary
from tvq_lightning.data.embedded import render as R
from tvq_lightning.data.embedded.generate import digits
from tvq_lightning.data.embedded.scenes import (
    Scene,
    caption,
    render,
    sample_pretraining_scene,
)
from tvq_lightning.models.tiny_clip import WordTokenizer


@pytest.fixture(scope="module")
def captions() -> list[str]:
    rng, pool = np.random.default_rng(0), digits("fit")
    return [caption(sample_pretraining_scene(rng, pool), rng) for _ in range(3000)]


def test_render_is_a_deterministic_function_of_the_generator():
    pool = digits("fit")
    scenes = [sample_pretraining_scene(np.random.default_rng(s), pool) for s in range(30)]
    for s, scene in enumerate(scenes):
        a = render(scene, np.random.default_rng(s))
        assert a.shape == (32, 32, 3) and a.dtype == np.uint8
        assert np.array_equal(a, render(scene, np.random.default_rng(s)))
    assert not np.array_equal(render(scenes[0], np.random.default_rng(1)), render(scenes[0], np.random.default_rng(2)))


def test_pretraining_mixture_covers_every_kind(captions):
    rng, pool = np.random.default_rng(1), digits("fit")
    scenes = [sample_pretraining_scene(rng, pool) for _ in range(500)]
    assert any(s.count > 1 for s in scenes) and any(s.position is not None for s in scenes)
    assert any(s.orientation is not None for s in scenes) and any(s.digit is not None for s in scenes)
    assert any(s.quadrant is not None and s.count == 0 and s.digit is None for s in scenes)
    for s in scenes:
        if s.digit is not None:  # the digit's label is the image's label
            assert s.digit_image is not None and s.digit_image.shape == (8, 8)
            assert any(np.array_equal(s.digit_image, im) for im in pool[0][pool[1] == s.digit])
    assert len(set(captions)) > 300


def test_every_caption_tokenizes_within_the_context(captions):
    tok = WordTokenizer(vocabulary(), context_length=20)
    for c in captions:
        assert c and c == c.strip() and "  " not in c
        assert len(tok.encode(c)) <= tok.context_length - 2, c  # nothing is truncated
    words = {w for c in captions for w in c.split()}
    assert words <= set(vocabulary())


def test_caption_articles(captions):
    assert not [c for c in captions if re.search(r"\ba [aeiou]", c)]
    assert not [c for c in captions if re.search(r"\ban [^aeiou]", c)]


def test_caption_names_only_factors_of_the_scene():
    rng = np.random.default_rng(0)
    scene = Scene("plain", "ring", "cyan", count=3, size=1)
    for _ in range(200):
        c = caption(scene, rng)
        others = set(R.COLOUR_NAMES + R.SHAPES + R.BACKGROUNDS) - {"cyan", "ring", "plain"}
        assert not (set(c.split()) & others), c
        assert "three" in c.split() or "plain background" in c, c
    digit_scene = Scene("noisy", digit=7, digit_image=digits("fit")[0][0], digit_colour="red")
    for _ in range(100):
        c = caption(digit_scene, rng)
        assert re.search(r"(digit|number) seven", c) or "noisy background" in c, c


@pytest.mark.parametrize("task", TASK_NAMES)
def test_task_prompts_tokenize(task):
    spec = TASKS[task]
    tok = WordTokenizer(vocabulary())
    assert len(set(spec.classnames)) == spec.num_classes >= 4
    for template in spec.templates:
        assert template.count("{}") == 1
        for name in spec.classnames:
            ids = tok.encode(template.format(name))
            assert len(ids) <= tok.context_length - 2


def test_task_scenes_carry_their_label():
    factor = {"shapes": lambda s: R.SHAPES.index(s.shape), "colours": lambda s: R.COLOUR_NAMES.index(s.colour),
              "counts": lambda s: s.count - 1, "positions": lambda s: s.position, "gratings": lambda s: s.orientation,
              "sizes": lambda s: s.size, "digits": lambda s: s.digit, "quadrants": lambda s: s.quadrant}
    assert set(factor) == set(TASK_NAMES) and len(TASK_NAMES) == 8
    rng, pool = np.random.default_rng(0), digits("eval")
    for task, spec in TASKS.items():
        for y in range(spec.num_classes):
            scene = spec.scene(rng, y, pool)
            assert factor[task](scene) == y, (task, y)
            if task == "digits":
                assert any(np.array_equal(scene.digit_image, im) for im in pool[0][pool[1] == y])
            img = render(scene, rng)
            assert img.shape == (32, 32, 3) and img.dtype == np.uint8


def test_quadrant_images_are_brightest_in_their_quadrant():
    images, labels = task_split("quadrants", "train", size=200)
    q = images.astype(np.float64).mean(-1).reshape(len(images), 2, 16, 2, 16).mean((2, 4)).reshape(-1, 4)
    # subtle increments over gradient backgrounds: the raw mean is a strong hint, not an oracle
    assert (q.argmax(1) == labels).mean() > 0.6


def test_position_scenes_put_the_object_in_its_cell():
    rng = np.random.default_rng(0)
    for y in range(9):
        for _ in range(5):
            scene = dataclasses.replace(TASKS["positions"].scene(rng, y, None), background="plain", colour="white")
            img = render(scene, rng).astype(np.float64).mean(-1)
            ys, xs = np.nonzero(img > 200)  # the white object on a dark plain background
            row, col = divmod(y, 3)
            assert row * 32 / 3 <= ys.mean() + 0.5 <= (row + 1) * 32 / 3
            assert col * 32 / 3 <= xs.mean() + 0.5 <= (col + 1) * 32 / 3


def test_vocabulary_is_sorted_and_unique():
    v = vocabulary()
    assert v == sorted(set(v)) and all(" " not in w and w for w in v)
    assert {"circle", "orange", "quadrant", "diagonal", "nine"} <= set(v)
