"""Dense scenes: exact depth / normals on analytic cases, and label / depth / normal consistency."""
import numpy as np
import pytest

from tvq_lightning.data.scenes.camera import camera_rays, rotation
from tvq_lightning.data.scenes.render import render
from tvq_lightning.data.scenes.sampling import CLASSES, OBJECT_TYPES, TASKS_SPEC, SceneSpec, sample_scenes

SIZE = (24, 32)


def empty_scene(yaw=0.0, tilt=0.0, height=50.0, back=5.0, fov=60.0):
    """One untextured scene without objects: a camera far above the floor facing the back wall."""
    s = sample_scenes(np.random.default_rng(0), 1, SceneSpec(objects=(0, 0), rug=0.0, picture=0.0))
    s["camera"].update(yaw=np.array([np.deg2rad(yaw)]), tilt=np.array([np.deg2rad(tilt)]),
                       fov=np.array([np.deg2rad(fov)]), pos=np.array([[0.0, height, 0.0]]))
    s["room"].update(back=np.array([back]), left=np.array([-1e3]), right=np.array([1e3]), height=np.array([1e3]))
    return s


def add(scene, kind, **fields):
    slot = {"mask": np.array([[True]]), "hue": np.array([[0.1]]), "bin": np.array([[0]]),
            "colour": np.array([[[0.8, 0.2, 0.2]]])}
    scene[kind] = {**slot, **{k: np.asarray(v, np.float64)[None, None] for k, v in fields.items()}}
    return scene


def points(scene, out):
    """Camera-frame and world-frame 3-D points of every pixel, back-projected from the depth."""
    x_cam = out["depth"].reshape(1, -1, 1) * camera_rays(scene["camera"]["fov"], SIZE)
    rot = rotation(scene["camera"]["yaw"], scene["camera"]["tilt"])[0]
    return x_cam[0], scene["camera"]["pos"][0] + x_cam[0] @ rot.T, rot


def test_camera_is_a_rotation():
    r = rotation(np.array([0.3, -0.2]), np.array([0.1, 0.5]))
    assert np.allclose(r @ r.transpose(0, 2, 1), np.eye(3)) and np.allclose(np.linalg.det(r), 1.0)


def test_facing_a_wall_constant_depth_and_normal():
    out = render(empty_scene(), SIZE, np.random.default_rng(0))
    assert (out["label"] == CLASSES.index("wall")).all()
    np.testing.assert_allclose(out["depth"], 5.0, rtol=1e-6)
    np.testing.assert_allclose(out["normal"].reshape(-1, 3), np.tile([0.0, 0.0, -1.0], (SIZE[0] * SIZE[1], 1)), atol=1e-6)


@pytest.mark.parametrize("yaw,tilt", [(20.0, 0.0), (-15.0, 10.0)])
def test_turned_camera_sees_a_plane(yaw, tilt):
    scene = empty_scene(yaw, tilt)
    out = render(scene, SIZE, np.random.default_rng(0))
    x_cam, x_world, rot = points(scene, out)
    wall = out["label"].reshape(-1) == CLASSES.index("wall")
    assert wall.mean() > 0.9
    np.testing.assert_allclose(x_world[wall, 2], 5.0, atol=1e-4)                     # on the plane z = 5
    np.testing.assert_allclose(out["normal"].reshape(-1, 3)[wall], np.tile(rot.T @ [0, 0, -1.0], (wall.sum(), 1)), atol=1e-5)


def test_sphere_normals_are_radial():
    scene = add(empty_scene(back=20.0), "sphere", centre=[0.3, 49.8, 5.0], radius=1.2)
    out = render(scene, SIZE, np.random.default_rng(0))
    _, x_world, rot = points(scene, out)
    hit = out["label"].reshape(-1) == CLASSES.index("sphere")
    assert 20 < hit.sum() < hit.size
    radial = (x_world[hit] - [0.3, 49.8, 5.0]) / 1.2
    np.testing.assert_allclose(np.linalg.norm(radial, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out["normal"].reshape(-1, 3)[hit] @ rot.T, radial, atol=1e-4)


def test_cylinder_and_box_surfaces():
    scene = add(empty_scene(back=20.0, tilt=30.0, height=3.0), "cylinder", base=[0.8, 0.0, 4.0], radius=0.5, height=1.5)
    scene = add(scene, "box", centre=[-1.0, 0.6, 4.5], half=[0.5, 0.6, 0.4], yaw=0.4)
    out = render(scene, SIZE, np.random.default_rng(0))
    _, p, rot = points(scene, out)
    n = out["normal"].reshape(-1, 3) @ rot.T
    cyl = out["label"].reshape(-1) == CLASSES.index("cylinder")
    top = n[:, 1] > 0.5
    assert (cyl & top).any() and (cyl & ~top).any()
    np.testing.assert_allclose(p[cyl & top, 1], 1.5, atol=1e-4)
    np.testing.assert_allclose(np.hypot(p[cyl & ~top, 0] - 0.8, p[cyl & ~top, 2] - 4.0), 0.5, atol=1e-4)
    box = out["label"].reshape(-1) == CLASSES.index("box")
    c, s = np.cos(0.4), np.sin(0.4)
    turn = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])                                   # box frame -> world
    local, n_local = (p[box] - [-1.0, 0.6, 4.5]) @ turn, n[box] @ turn
    axis = np.argmax(np.abs(n_local), 1)
    assert box.sum() > 10 and np.allclose(np.abs(n_local).max(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.abs(local[np.arange(len(axis)), axis]), np.array([0.5, 0.6, 0.4])[axis], atol=1e-4)


def test_random_scenes_are_consistent():
    scene = sample_scenes(np.random.default_rng(3), 16, TASKS_SPEC)
    out = render(scene, (32, 32), np.random.default_rng(3))
    label, depth, normal = out["label"], out["depth"], out["normal"]
    void = label == -1
    assert set(np.unique(label)) <= set(range(-1, len(CLASSES))) and len(np.unique(label)) >= 6
    assert ((depth == 0) == void).all() and (np.abs(normal[void]).sum(-1) == 0).all()
    np.testing.assert_allclose(np.linalg.norm(normal[~void], axis=-1), 1.0, atol=1e-6)
    rays = camera_rays(scene["camera"]["fov"], (32, 32)).reshape(16, 32, 32, 3)
    assert ((normal * rays).sum(-1)[~void] < 1e-6).all()                                  # facing the camera
    floor = np.isin(label, [CLASSES.index("floor"), CLASSES.index("rug")])
    up = np.einsum("bji,j->bi", rotation(scene["camera"]["yaw"], scene["camera"]["tilt"]), [0.0, 1.0, 0.0])
    np.testing.assert_allclose(normal[floor], np.broadcast_to(up[:, None, None], normal.shape)[floor], atol=1e-5)
    obj = out["object"] >= 0
    assert (obj == np.isin(label, [CLASSES.index(t) for t in OBJECT_TYPES])).all()
