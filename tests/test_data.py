"""Tests for snapvit_lightning.data: multi-crop transform, image sources, data module."""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from snapvit_lightning.data import (
    CalibrationDataModule,
    DatasetSource,
    DINOMultiCrop,
    ImageFolderSource,
    PaddedShards,
    ResumableDataLoader,
    SkimagePhotosSource,
    UnreadableImageError,
    eval_transform,
    find_images,
    load_calibration_views,
    load_eval_images,
    load_image,
    resolve_input_config,
    to_uint8_image,
)


def _rand_uint8(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def _write_image(path: Path, seed: int = 0, size: tuple[int, int] = (48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image")
    return path


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    return timm.create_model("test_vit", pretrained=False)


class _PairDataset(Dataset):
    """(uint8 tensor, label) pairs; image i is a solid colour i so sets can be told apart."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((3, 20 + i, 24), i, dtype=torch.uint8), i


class _NoiseDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.images = [_rand_uint8(40, 50, seed=i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], i


class _PILDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.images = [Image.fromarray(np.full((30, 36, 3), 10 * i, dtype=np.uint8)) for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Image.Image:
        return self.images[i]


# ------------------------------------------------------------------ multi-crop


@pytest.mark.parametrize(("size", "num_local"), [(32, 10), (24, 0), (40, 3)])
def test_multicrop_shape_dtype(size: int, num_local: int) -> None:
    t = DINOMultiCrop(size=size, num_local_crops=num_local)
    out = t(_rand_uint8(70, 90), index=3)
    assert out.shape == (2 + num_local, 3, size, size)
    assert out.dtype == torch.float32
    assert t.num_views == 2 + num_local
    assert torch.isfinite(out).all()


def test_multicrop_views_are_independent() -> None:
    t = DINOMultiCrop(size=32, num_local_crops=10)
    out = t(_rand_uint8(96, 128), index=0)
    flat = out.flatten(1)
    for a in range(out.shape[0]):
        for b in range(a + 1, out.shape[0]):
            assert not torch.allclose(flat[a], flat[b]), f"views {a} and {b} are identical"


def test_multicrop_reproducible() -> None:
    img = _rand_uint8(64, 64)
    a = DINOMultiCrop(size=32, seed=1)(img, index=5)
    b = DINOMultiCrop(size=32, seed=1)(img, index=5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, DINOMultiCrop(size=32, seed=2)(img, index=5))
    assert not torch.allclose(a, DINOMultiCrop(size=32, seed=1)(img, index=6))
    assert not torch.allclose(a, DINOMultiCrop(size=32, seed=1)(img, index=5, epoch=1))
    gen_a = DINOMultiCrop(size=32)(img, generator=torch.Generator().manual_seed(7))
    gen_b = DINOMultiCrop(size=32)(img, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(gen_a, gen_b, rtol=0, atol=0)


def test_multicrop_normalisation_and_flip() -> None:
    img = torch.full((3, 50, 60), 255, dtype=torch.uint8)
    out = DINOMultiCrop(size=16, num_local_crops=2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(img)
    torch.testing.assert_close(out, torch.full_like(out, 2.0))
    # flip=False and a full-image crop range give the un-flipped resized image
    ramp = torch.arange(64, dtype=torch.uint8).repeat(3, 64, 1)
    t = DINOMultiCrop(size=64, num_local_crops=0, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    out = t(ramp)
    assert (out[0, 0, 0, 1:] > out[0, 0, 0, :-1]).all()


@pytest.mark.parametrize(("scale", "height", "width"), [((0.05, 0.25), 90, 120), ((0.25, 1.0), 40, 33), ((1.0, 1.0), 8, 50)])
def test_crop_params_in_bounds(scale: tuple[float, float], height: int, width: int) -> None:
    t = DINOMultiCrop(size=16)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = t.crop_params(height, width, scale, g)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h >= 1 and w >= 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"size": 0}, ValueError, "size"),
        ({"size": 32.0}, TypeError, "size"),
        ({"size": 32, "num_local_crops": -1}, ValueError, "num_local_crops.*-1"),
        ({"size": 32, "global_scale": (0.5, 0.2)}, ValueError, "global_scale"),
        ({"size": 32, "local_scale": (0.0, 0.2)}, ValueError, "local_scale"),
        ({"size": 32, "local_scale": (0.1, 1.5)}, ValueError, "local_scale"),
        ({"size": 32, "std": (1.0, 0.0, 1.0)}, ValueError, "std"),
        ({"size": 32, "mean": (0.5, 0.5)}, ValueError, "mean"),
    ],
)
def test_multicrop_bad_args(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        DINOMultiCrop(**kwargs)


def test_multicrop_bad_image() -> None:
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        DINOMultiCrop(size=8)(torch.zeros(4, 10, 10, dtype=torch.uint8))


# ------------------------------------------------------------------ model config


def test_resolve_input_config(tiny_vit: torch.nn.Module) -> None:
    size, mean, std = resolve_input_config(tiny_vit)
    cfg = timm.data.resolve_data_config({}, model=tiny_vit)
    assert size == cfg["input_size"][-1] == 160
    assert mean == tuple(cfg["mean"]) and std == tuple(cfg["std"])
    # a model built at another size reports the size it was built for
    small = timm.create_model("test_vit", pretrained=False, img_size=64)
    assert resolve_input_config(small)[0] == 64


def test_resolve_input_config_non_square() -> None:
    model = timm.create_model("test_vit", pretrained=False, img_size=(64, 96))
    with pytest.raises(ValueError, match="square.*64x96"):
        resolve_input_config(model)


def test_images_and_normalisation_off_the_unit_scale_are_refused() -> None:
    img = torch.rand(3, 40, 48)
    nan = img.clone()
    nan[0, 0, 0] = float("nan")
    for bad, said in ((img * 255, r"got range \[.*, 255\]"), (img - 0.5, r"got range \[-0\.5"),
                      (nan, r"got range \[.*\] and NaN/inf"), (torch.full_like(img, float("nan")), "got only NaN/inf")):
        for transform in (lambda x: eval_transform(x, 32), DINOMultiCrop(32), to_uint8_image):
            with pytest.raises(ValueError, match=r"floating point images must hold values in \[0, 1\] \(unnormalised\); " + said):
                transform(bad)  # was clamped to almost white or black without a word (to_uint8_image: NaN became 0)
    with pytest.raises(ValueError, match=r"`mean` is on the \[0, 1\] scale .* got \(123.7, 116.3, 103.5\): divide 0..255"):
        eval_transform(img, 32, mean=(123.7, 116.3, 103.5))
    with pytest.raises(ValueError, match=r"`std` values must be > 0, got \(0, 0, 0\)"):
        eval_transform(img, 32, std=(0, 0, 0))
    with pytest.raises(ValueError, match=r"`std` is on the \[0, 1\] scale"):
        CalibrationDataModule(None, std=(58.4, 57.1, 57.4))
    with pytest.raises(TypeError, match="`size` must be an int"):
        eval_transform(img, (32, 32))
    with pytest.raises(TypeError, match=r"model must be the timm model \(an nn.Module\) .* got 'vit_small_patch14_dinov2': "
                                        "build one with timm.create_model"):
        load_eval_images(None, "vit_small_patch14_dinov2")  # gave 224-px views with ImageNet's normalisation
    assert eval_transform(img, 32).shape == (3, 32, 32) and to_uint8_image(img).dtype == torch.uint8


def test_eval_transform() -> None:
    img = torch.full((3, 100, 50), 51, dtype=torch.uint8)
    out = eval_transform(img, 32, mean=(0.2, 0.2, 0.2), std=(0.5, 0.5, 0.5))
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-5, rtol=0)


def test_eval_view_of_a_long_strip_keeps_its_centre_without_resizing_it_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    from snapvit_lightning.data import crops

    g = torch.Generator().manual_seed(0)
    strip = torch.randint(0, 256, (3, 40, 2000), generator=g, dtype=torch.uint8)  # 50:1
    cut = eval_transform(strip, 64)
    monkeypatch.setattr(crops, "_MAX_EVAL_ASPECT", 10**9)  # resized whole, as before
    torch.testing.assert_close(cut, eval_transform(strip, 64), rtol=0, atol=1e-6)
    monkeypatch.undo()
    assert eval_transform(torch.zeros(3, 2, 30000, dtype=torch.uint8), 160).shape == (3, 160, 160)  # was ~4 GB


# ------------------------------------------------------------------ conversion / decoding


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)),
        Image.fromarray(np.zeros((30, 40), dtype=np.uint8)),
        Image.fromarray(np.zeros((30, 40, 4), dtype=np.uint8)),
        torch.zeros(3, 30, 40, dtype=torch.uint8),
        torch.zeros(1, 30, 40),
        torch.zeros(30, 40),
        np.zeros((30, 40, 3), dtype=np.uint8),
        np.zeros((30, 40), dtype=np.float32),
        np.zeros((30, 40), dtype=bool),
    ],
    ids=["pil-rgb", "pil-l", "pil-rgba", "uint8", "float-1ch", "float-hw", "np-hwc", "np-hw-float", "np-bool"],
)
def test_to_uint8_image(image: object) -> None:
    out = to_uint8_image(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 30, 40)


def test_to_uint8_image_max_side_and_errors() -> None:
    out = to_uint8_image(torch.zeros(3, 100, 300, dtype=torch.uint8), max_side=50)
    assert out.shape == (3, 50, 150)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8_image(torch.randn(3, 10, 10) * 3)
    with pytest.raises(TypeError, match="unsupported image type str"):
        to_uint8_image("a.jpg")
    with pytest.raises(ValueError, match="shape"):
        to_uint8_image(torch.zeros(5, 10, 10))


def test_load_image(tmp_path: Path) -> None:
    path = _write_image(tmp_path / "a.PNG", size=(200, 100))
    img = load_image(path, max_side=40)
    assert img.dtype == torch.uint8 and img.shape == (3, 40, 80)
    jpg = tmp_path / "b.jpg"
    Image.fromarray(np.full((300, 200, 3), 128, dtype=np.uint8)).save(jpg)
    assert load_image(jpg, max_side=50).shape == (3, 75, 50)
    with pytest.raises(UnreadableImageError, match="bad.jpg"):
        load_image(_write_corrupt(tmp_path / "bad.jpg"))
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    assert load_image(path, max_side=np.int64(40)).shape == load_image(path, max_side=40.0).shape == (3, 40, 80)
    for bad in (0, -3, 2.5, True):  # 0 was a ZeroDivisionError; -3 and 2.5 decoded 1- and 2-pixel images
        with pytest.raises(ValueError, match=rf"max_side must be an int >= 1 .* got {bad!r}"):
            load_image(path, max_side=bad)


def test_high_bit_depth_images(tmp_path: Path) -> None:
    """16-bit grayscale is scaled to 8 bits (PIL's convert would clip it to white); 32-bit pixels are refused."""
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    img = load_image(tmp_path / "g16.png")
    assert torch.equal(img[0], torch.from_numpy((ramp >> 8).astype(np.uint8))) and torch.equal(img[0], img[2])
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "i32.tif")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "f32.tif")
    for name, what in (("i32.tif", "32-bit integers"), ("f32.tif", "32-bit floats")):
        with pytest.raises(UnreadableImageError, match=f"{name}.*{what}"):
            load_image(tmp_path / name)


# ------------------------------------------------------------------ folder sources


def test_find_images_follows_linked_folders_once(tmp_path: Path) -> None:
    import os

    store = tmp_path / "store"
    _write_image(store / "dogs" / "a.jpg")
    _write_image(store / "cats" / "b.png")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(store / "dogs", root / "dogs")  # a class folder that is a link
    os.symlink(store / "cats", root / "cats")
    (root / "cats" / "loop").symlink_to(root)  # a cycle: not followed twice
    files, labels, classes = find_images(root)
    assert [f.relative_to(root).as_posix() for f in files] == ["cats/b.png", "dogs/a.jpg"]
    assert classes == ["cats", "dogs"] and labels == [0, 1]


def test_find_images_imagefolder_layout(tmp_path: Path) -> None:
    _write_image(tmp_path / "dogs" / "b.jpg")
    _write_image(tmp_path / "dogs" / "sub" / "a.JPEG")
    _write_image(tmp_path / "cats" / "x.png")
    _write_image(tmp_path / "cats" / ".hidden.png")
    _write_image(tmp_path / "birds" / "y.webp")
    _write_image(tmp_path / "birds" / "z.TIF")
    (tmp_path / "cats" / "notes.txt").write_text("x")
    (tmp_path / "README.md").write_text("x")
    files, labels, classes = find_images(tmp_path)
    assert classes == ["birds", "cats", "dogs"]
    rel = [f.relative_to(tmp_path).as_posix() for f in files]
    assert rel == ["birds/y.webp", "birds/z.TIF", "cats/x.png", "dogs/b.jpg", "dogs/sub/a.JPEG"]
    assert labels == [0, 0, 1, 2, 2]


def test_a_folder_reached_through_links_has_the_same_name_on_every_machine(tmp_path: Path) -> None:
    # os.walk's order is the file system's: the class took a link's name ('x6' on one machine, another elsewhere)
    _write_image(tmp_path / "red" / "0.png")
    _write_image(tmp_path / "z_real" / "1.png")
    for i in range(8):
        (tmp_path / f"x{i}").symlink_to(tmp_path / "red")
    (tmp_path / "a_alias").symlink_to(tmp_path / "z_real")  # a link whose name sorts before its folder's
    files, labels, classes = find_images(tmp_path)
    assert classes == ["red", "z_real"] and [f.relative_to(tmp_path).as_posix() for f in files] == ["red/0.png", "z_real/1.png"]


def test_a_very_large_image_is_named_by_the_package(tmp_path: Path, monkeypatch) -> None:
    # Pillow's own DecompressionBombWarning went out raw (no command prefix, no hint)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    large, huge = _write_image(tmp_path / "large.png", size=(40, 40)), _write_image(tmp_path / "huge.png", size=(50, 50))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert load_image(large).shape == (3, 40, 40)
    assert [type(w.message) for w in said] == [UserWarning]
    assert str(said[0].message).startswith(f"'{large}': Image size (1600 pixels) exceeds limit of 1000 pixels")
    assert str(said[0].message).endswith("; read all the same (Pillow refuses images twice that size; from Python "
                                         "PIL.Image.MAX_IMAGE_PIXELS sets its limit)")
    hint = r"Image size \(2500 pixels\) exceeds limit of 2000 pixels.*: from Python, raise PIL.Image.MAX_IMAGE_PIXELS to read it\)"
    with pytest.raises(UnreadableImageError, match=r"huge.png': " + hint):
        load_image(huge)
    with pytest.raises(UnreadableImageError, match=r"huge.png' \(--data='.*huge.png'\): " + hint):
        ImageFolderSource(huge, argument="--data")  # one file named on its own: checked at once
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        ImageFolderSource(large, argument="--data")
    assert [type(w.message) for w in said] == [UserWarning] and "read all the same" in str(said[0].message)
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 images .*'.*huge.png' \(" + hint):  # the skip keeps the hint
        load_eval_images(tmp_path, timm.create_model("test_vit", pretrained=False))


def test_a_folder_inside_reached_through_a_link_is_read_under_its_real_path(tmp_path: Path) -> None:
    # a link one level down was followed first: its images took the link's class, and their real class was "empty"
    _write_image(tmp_path / "b" / "own" / "0.png")
    _write_image(tmp_path / "c" / "deep" / "1.png")
    (tmp_path / "b" / "inner").symlink_to(tmp_path / "c" / "deep")
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    _write_image(outside / "2.png")
    (tmp_path / "d_link").symlink_to(outside)  # two links to one folder outside: read once, under the first name
    (tmp_path / "e_link").symlink_to(outside)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")  # no folder "holds no images": each is read, once
        source = ImageFolderSource(tmp_path)
    assert source.classes == ["b", "c", "d_link"]
    assert [f.relative_to(tmp_path).as_posix() for f in source.files] == ["b/own/0.png", "c/deep/1.png", "d_link/2.png"]
    assert [str(w.message) for w in said] == [
        f"link(s) 'e_link' in '{tmp_path}' lead to folders already read under another link's name (each folder is "
        "read once): not classes of their own"]


def test_class_folders_that_are_links_into_a_hidden_store_are_classes(tmp_path: Path) -> None:
    # a link into the folder was never followed: links into a '.store' inside gave no classes, or lost them silently
    _write_image(tmp_path / "bird" / "0.png")
    for name in ("cat", "dog"):
        _write_image(tmp_path / ".store" / f"c_{name}" / f"{name}.png")
        (tmp_path / name).symlink_to(tmp_path / ".store" / f"c_{name}")
    files, labels, classes = find_images(tmp_path)
    assert classes == ["bird", "cat", "dog"] and labels == [0, 1, 2]
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["bird/0.png", "cat/cat.png", "dog/dog.png"]


def test_a_link_to_a_folder_enclosing_the_root_is_not_followed(tmp_path: Path) -> None:
    # `up -> ..` read the folders beside the root as one more class ('up'), and `cat/anc -> ../..` put them in 'cat'
    _write_image(tmp_path / "beside" / "x" / "0.png")
    root = tmp_path / "root"
    _write_image(root / "cat" / "1.png")
    _write_image(root / "dog" / "2.png")
    (root / "up").symlink_to("..")
    (root / "cat" / "anc").symlink_to("../..")
    with pytest.warns(UserWarning, match=rf"link\(s\) 'up' -> '{tmp_path}' in '{root}' lead to folders read under their "
                                         r"own path there, or enclosing it, so they are not classes"):
        source = ImageFolderSource(root)
    assert source.classes == ["cat", "dog"]
    assert [f.relative_to(root).as_posix() for f in source.files] == ["cat/1.png", "dog/2.png"]


def test_links_to_folders_read_under_their_own_path_are_named(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        _write_image(tmp_path / "raw" / name / "0.png")
        (tmp_path / name).symlink_to(tmp_path / "raw" / name)
    with pytest.warns(UserWarning) as said:
        source = ImageFolderSource(tmp_path, argument="--data")
    assert source.classes == ["raw"]  # read once, under their real path
    assert [str(w.message) for w in said] == [
        f"--data: link(s) 'cat' -> 'raw/cat', 'dog' -> 'raw/dog' in '{tmp_path}' lead to folders read under their own "
        "path there, or enclosing it, so they are not classes of their own; for classes made of links keep the folders "
        "they lead to outside it or in a hidden folder (a name starting with '.')"]


def test_a_folder_says_what_it_leaves_out(tmp_path: Path) -> None:
    _write_image(tmp_path / "a_red" / "0.png")
    _write_image(tmp_path / "b_blue" / "1.jpg")
    (tmp_path / "a0_empty").mkdir()
    (tmp_path / ".cache").mkdir()  # hidden: no class, nothing to say
    for name in ("anim.gif", "photo.jfif", "x.GIF"):
        (tmp_path / "b_blue" / name).write_bytes(b"x")
    (tmp_path / ".hidden.gif").write_bytes(b"x")
    with pytest.warns(UserWarning) as said:
        source = ImageFolderSource(tmp_path, argument="data_dir")
    assert source.classes == ["a_red", "b_blue"]
    assert [str(w.message) for w in said] == [
        f"data_dir: subfolder(s) 'a0_empty' of '{tmp_path}' hold no images: not classes, so the 2 classes are indexed "
        "without them",
        f"data_dir: 3 file(s) in '{tmp_path}' of image types that are not read (2 .gif, 1 .jfif); read: .jpg, .jpeg, "
        ".png, .bmp, .webp, .tif, .tiff (convert them to include them)",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary class folder: no note
        ImageFolderSource(tmp_path / "a_red")


def test_find_images_flat(tmp_path: Path) -> None:
    for i, name in enumerate(["c.bmp", "a.jpg", "b.Png"]):
        _write_image(tmp_path / name, seed=i)
    _write_image(tmp_path / "sub" / "d.jpg")
    files, labels, classes = find_images(tmp_path)
    assert [f.name for f in files] == ["a.jpg", "b.Png", "c.bmp", "d.jpg"]
    assert labels == [-1] * 4 and classes == []
    with pytest.warns(UserWarning, match=r"3 image\(s\) directly in '.*' \('a.jpg', 'b.Png', 'c.bmp'\) beside 1 subfolders of images: the "
                                         r"folder is read as unlabelled \(no classes\); move them into a class folder"):
        source = ImageFolderSource(tmp_path)
    assert len(source) == 4
    img, label = source.load(1, max_side=16)
    assert img.shape[0] == 3 and min(img.shape[1:]) == 16 and label == -1


def test_real_photo_folder(photo_folder: Path) -> None:
    """An ImageFolder of real PNG photos (scikit-image's, in classes color/gray): files, classes, labels."""
    files, labels, classes = find_images(photo_folder)
    assert len(files) == 14 and classes == ["color", "gray"] and labels == [0] * 7 + [1] * 7
    dm = CalibrationDataModule(data_dir=photo_folder, img_size=32)
    dm.setup("fit")
    assert dm.num_calibration_images == 14
    assert sorted(dm.calibration_labels().tolist()) == labels
    assert dm.classes == classes


@pytest.mark.parametrize("max_samples", [1, 8])
def test_real_photo_folder_max_samples(photo_folder: Path, max_samples: int) -> None:
    dm = CalibrationDataModule(data_dir=photo_folder, img_size=32, max_samples=max_samples, batch_size=4)
    views, labels = next(iter(dm.train_dataloader()))
    assert dm.num_calibration_images == max_samples
    assert views.shape == (min(4, max_samples), 12, 3, 32, 32)
    assert labels.dtype == torch.long and ((labels >= 0) & (labels < 2)).all()
    # a seeded subset: same seed → same subset
    again = CalibrationDataModule(data_dir=photo_folder, img_size=32, max_samples=max_samples)
    torch.testing.assert_close(again.calibration_images_eval(), dm.calibration_images_eval())


def test_eval_images_of_the_builtin_photos() -> None:
    """``load_eval_images(None, model)`` gives the scikit-image photos: the datamodule's default images."""
    model = timm.create_model("test_vit", pretrained=False)
    images, labels, classes = load_eval_images(None, model)
    assert images.shape == (len(SkimagePhotosSource()), 3, *model.patch_embed.img_size)
    assert labels.tolist() == [-1] * len(images) and classes == []
    size, mean, std = resolve_input_config(model)
    dm = CalibrationDataModule(img_size=size, mean=mean, std=std)
    torch.testing.assert_close(dm.calibration_images_eval(), images, rtol=0, atol=0)


def test_calibration_views_are_the_eval_views_then_seeded_crops(photo_folder: Path) -> None:
    from snapvit_lightning.data.crops import STATS_CROP_SCALE, stats_crops
    from snapvit_lightning.export_options import stats_views_per_image

    dm = CalibrationDataModule(data_dir=photo_folder, img_size=32, max_samples=5)
    plain = dm.calibration_images_eval()
    torch.testing.assert_close(dm.calibration_views(), plain, rtol=0, atol=0)
    views = dm.calibration_views(4)
    assert views.shape == (20, 3, 32, 32)
    torch.testing.assert_close(views[:5], plain, rtol=0, atol=0)  # the eval views first
    crops = views[5:].reshape(5, 3, 3, 32, 32)  # image i's three crops follow one another
    assert not any(torch.equal(crops[i, j], plain[i]) for i in range(5) for j in range(3))
    torch.testing.assert_close(dm.calibration_views(4), views, rtol=0, atol=0)  # seeded: the same every call
    # The crops of an image come from (seed, index) alone: a larger count extends the same crops.
    torch.testing.assert_close(dm.calibration_views(2)[5:], crops[:, 0], rtol=0, atol=0)
    other = CalibrationDataModule(data_dir=photo_folder, img_size=32, max_samples=5, seed=1)
    assert not torch.equal(other.calibration_views(2)[5:], dm.calibration_views(2)[5:])
    # A crop's area: STATS_CROP_SCALE of the image; the content is the image's, normalised like the eval view.
    assert STATS_CROP_SCALE == (0.35, 1.0) and abs(float(crops.mean()) - float(plain.mean())) < 0.5
    assert stats_crops([], 32, 3).shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="views_per_image"):
        dm.calibration_views(0)
    # From a folder, as `snapvit stats` loads it: the eval views, then the crops.
    model = timm.create_model("test_vit", pretrained=False, img_size=32)
    inputs, per_image = load_calibration_views(photo_folder, model, stats_views=24)
    plain_folder = load_eval_images(photo_folder, model)[0]
    assert per_image == 24 // len(plain_folder) and inputs.shape == (per_image * len(plain_folder), 3, 32, 32)
    torch.testing.assert_close(inputs[: len(plain_folder)], plain_folder, rtol=0, atol=0)
    torch.testing.assert_close(load_calibration_views(photo_folder, model, stats_views=24)[0], inputs, rtol=0, atol=0)
    # How many views the export takes per image: 256 inputs aimed for, 1 to 8 per image.
    assert [stats_views_per_image(n) for n in (1, 14, 32, 49, 98, 196, 1000)] == [8, 8, 8, 5, 2, 1, 1]
    assert stats_views_per_image(14, stats_views=1) == 1
    with pytest.raises(ValueError, match="stats_views must be an int >= 1"):
        stats_views_per_image(14, stats_views=0)


# ------------------------------------------------------------------ errors


def test_missing_folder(tmp_path: Path) -> None:
    """Refused at construction, before a Trainer (and its precision probe) is built, naming the argument."""
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="^data_dir: .*does_not_exist"):
        CalibrationDataModule(data_dir=missing, img_size=16)
    with pytest.raises(FileNotFoundError, match="^fitness_data_dir: .*does_not_exist"):
        CalibrationDataModule(dataset=_PairDataset(2), fitness_data_dir=missing, img_size=16)
    folder = tmp_path / "later_removed"
    folder.mkdir()
    dm = CalibrationDataModule(data_dir=folder, img_size=16)
    folder.rmdir()
    with pytest.raises(FileNotFoundError, match="later_removed"):
        dm.setup("fit")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"no image files.*empty. \(hidden files and folders, whose names start with .\.., are not read\)"):
        CalibrationDataModule(data_dir=tmp_path / "empty", img_size=16).setup("fit")


def test_folder_without_readable_images(tmp_path: Path) -> None:
    _write_corrupt(tmp_path / "bad" / "a.jpg")
    _write_corrupt(tmp_path / "bad" / "b.png")
    dm = CalibrationDataModule(data_dir=tmp_path / "bad", img_size=16)
    with pytest.raises(ValueError, match="no readable images in.*bad"), pytest.warns(UserWarning):
        dm.setup("fit")


def test_a_broken_link_in_a_folder_is_skipped_by_name(tmp_path: Path, tiny_vit: torch.nn.Module) -> None:
    _write_image(tmp_path / "photos" / "a.jpg")
    (tmp_path / "photos" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 images .*gone\.jpg.*a broken link"):
        images = load_eval_images(tmp_path / "photos", tiny_vit)[0]
    assert len(images) == 1


def test_single_unreadable_file(tmp_path: Path) -> None:
    bad = _write_corrupt(tmp_path / "broken.jpg")
    with pytest.raises(ValueError, match="cannot read image file.*broken.jpg"):
        CalibrationDataModule(data_dir=bad, img_size=16).setup("fit")


def test_single_file_that_is_no_image_is_refused_by_check_sources(tmp_path: Path) -> None:
    # `snapvit fit` calls check_sources before the precision probe: the file was read only after it.
    notes = tmp_path / "notes.txt"
    notes.write_text("no image")
    with pytest.raises(UnreadableImageError, match=r"cannot read image file '.*notes.txt' \(data_dir='.*notes.txt'\): cannot identify"):
        CalibrationDataModule(data_dir=notes, img_size=16).check_sources()
    whole = _write_image(tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # a good header: it failed after the probe too
    with pytest.raises(UnreadableImageError, match=r"cannot read image file '.*cut.jpg' \(data_dir=.*\): image file is truncated"):
        CalibrationDataModule(data_dir=tmp_path / "cut.jpg", img_size=16).check_sources()


def test_single_good_file(tmp_path: Path) -> None:
    good = _write_image(tmp_path / "one.jpg")
    dm = CalibrationDataModule(data_dir=good, img_size=16)
    assert dm.train_dataset()[0][0].shape == (12, 3, 16, 16)


def test_corrupt_file_is_skipped_with_warning(tmp_path: Path) -> None:
    for i in range(3):
        _write_image(tmp_path / f"good{i}.png", seed=i)
    _write_corrupt(tmp_path / "corrupt.jpg")
    dm = CalibrationDataModule(data_dir=tmp_path, img_size=16)
    with pytest.warns(UserWarning) as record:
        dm.setup("fit")
    messages = [str(w.message) for w in record if "could not be read" in str(w.message)]
    assert len(messages) == 1  # one warning names every skipped file and counts them
    assert "corrupt.jpg" in messages[0] and "skipped 1 of 4 images in data_dir=" in messages[0]
    assert dm.num_calibration_images == 3


@pytest.mark.parametrize("argument, reader", [("data_dir", "datamodule"), ("--data", "load_eval_images")])
def test_one_rule_for_unreadable_images(tmp_path: Path, tiny_vit: torch.nn.Module, argument: str, reader: str) -> None:
    """The calibration data and the eval images (stats/slice/bench) skip, name and count alike."""
    for i in range(3):
        _write_image(tmp_path / "photos" / f"good{i}.png", seed=i)
    for i in range(12):
        _write_corrupt(tmp_path / "photos" / f"bad{i:02d}.jpg")

    def read(folder: Path) -> int:
        if reader == "datamodule":
            dm = CalibrationDataModule(data_dir=folder, img_size=16)
            dm.setup("fit")
            return dm.num_calibration_images
        return len(load_eval_images(folder, tiny_vit, argument=argument)[0])

    with pytest.warns(UserWarning, match="could not be read") as record:
        assert read(tmp_path / "photos") == 3
    messages = [str(w.message) for w in record if "could not be read" in str(w.message)]
    assert len(messages) == 1
    assert f"skipped 12 of 15 images in {argument}=" in messages[0]
    assert sum(f"bad{i:02d}.jpg" in messages[0] for i in range(12)) == 10  # 10 named (in reading order)
    assert messages[0].endswith("and 2 more")
    for i in range(3):
        (tmp_path / "photos" / f"good{i}.png").unlink()
    with pytest.raises(ValueError, match=f"no readable images in {argument}=.*bad"), pytest.warns(UserWarning):
        read(tmp_path / "photos")
    with pytest.raises(FileNotFoundError, match=f"{argument}: image folder not found: .*missing"):
        read(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{argument}: no image files .* found in .*empty"):
        read(tmp_path / "empty")


def test_corrupt_file_is_replaced_under_max_samples(tmp_path: Path) -> None:
    for i in range(4):
        _write_image(tmp_path / f"good{i}.png", seed=i)
    for i in range(2):
        _write_corrupt(tmp_path / f"bad{i}.jpg")
    with pytest.warns(UserWarning):
        dm = CalibrationDataModule(data_dir=tmp_path, img_size=16, max_samples=4)
        dm.setup("fit")
    assert dm.num_calibration_images == 4


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_samples": 0}, ValueError, "max_samples.*0"),
        ({"max_samples": -3}, ValueError, "max_samples.*-3"),
        ({"max_samples": 2.5}, TypeError, "max_samples"),
        ({"batch_size": 0}, ValueError, "batch_size.*0"),
        ({"batch_size": True}, TypeError, "batch_size"),
        ({"num_workers": -1}, ValueError, "num_workers.*-1"),
        ({"num_local_crops": -2}, ValueError, "num_local_crops.*-2"),
        ({"global_scale": (0.3, 0.2)}, ValueError, "global_scale"),
        ({"global_scale": 0.5}, TypeError, "global_scale"),
        ({"local_scale": (0.0, 0.25)}, ValueError, "local_scale"),
        ({"img_size": 0}, ValueError, "img_size.*0"),
        ({"holdout": -1}, ValueError, "holdout.*-1"),
        ({"holdout": 1.0}, ValueError, "holdout.*1.0"),
        ({"holdout": "10"}, TypeError, "holdout"),
        ({"holdout": 2, "fitness_data_dir": "x"}, ValueError, "holdout.*fitness_data_dir"),
        ({"data_dir": "x", "dataset": _PairDataset(2)}, ValueError, "data_dir.*dataset"),
        ({"dataset": iter([1, 2])}, TypeError, "dataset"),
        ({"mean": (0.5, 0.5)}, ValueError, "mean"),
    ],
)
def test_datamodule_bad_args(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        CalibrationDataModule(**kwargs)


def test_iterable_dataset_rejected() -> None:
    class _Stream(IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield torch.zeros(3, 8, 8)

    with pytest.raises(TypeError, match="map-style"):
        CalibrationDataModule(dataset=_Stream())


@pytest.mark.parametrize("holdout", [5, 0.99])
def test_holdout_leaves_nothing(holdout: int | float) -> None:
    with pytest.raises(ValueError, match=r"holdout.*leaves no calibration images out of 5 .*: give a holdout below 5 "):
        CalibrationDataModule(dataset=_PairDataset(5), holdout=holdout, img_size=16).setup("fit")


def test_size_unknown() -> None:
    dm = CalibrationDataModule(dataset=_PairDataset(3))
    dm.setup("fit")  # lists the source, defers decoding
    with pytest.raises(RuntimeError, match="configure_from_model"):
        dm.train_dataloader()


def test_bad_dataset_item() -> None:
    class _Bad(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> tuple[str, int]:
            return "not an image", 0

    with pytest.raises(TypeError, match="item 0.*unsupported image type"):
        CalibrationDataModule(dataset=_Bad(), img_size=16).setup("fit")


def test_dict_dataset_items_are_refused_naming_the_keys_and_the_fix() -> None:
    items = [{"image": torch.rand(3, 20, 20), "label": 0}] * 2
    with pytest.raises(TypeError, match=r"list item 0: expected an image or an \(image, label\) pair, got a dict with keys "
                                        r"\['image', 'label'\]: give a dataset whose items are \(item\['image'\]"):
        CalibrationDataModule(dataset=items, img_size=16).setup("fit")


# ------------------------------------------------------------------ built-in default / datasets


def test_builtin_skimage_default(caplog) -> None:
    dm = CalibrationDataModule(img_size=24, batch_size=4, num_local_crops=2)
    with caplog.at_level("INFO"):
        dm.setup("fit")
    n = dm.num_calibration_images
    # a config without data_dir calibrated on these photos without a word
    assert f"data: no data_dir, so the calibration images are the {n} scikit-image photos" in caplog.text
    assert n >= 8
    assert (dm.calibration_labels() == -1).all()
    views, labels = next(iter(dm.train_dataloader()))
    assert views.shape == (4, 4, 3, 24, 24) and labels.tolist() == [-1] * 4


def test_builtin_without_skimage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ImportError, match="pip install scikit-image"):
        SkimagePhotosSource()
    with pytest.raises(ImportError, match="data_dir"):
        CalibrationDataModule(img_size=16).setup("fit")


def test_pil_dataset_source() -> None:
    dm = CalibrationDataModule(dataset=_PILDataset(5), img_size=16, batch_size=5)
    views, labels = next(iter(dm.train_dataloader()))
    assert views.shape == (5, 12, 3, 16, 16) and labels.tolist() == [-1] * 5


def test_pair_dataset_source() -> None:
    source = DatasetSource(_PairDataset(4))
    img, label = source.load(2)
    assert img.dtype == torch.uint8 and img.shape == (3, 22, 24) and label == 2
    dm = CalibrationDataModule(dataset=_PairDataset(6), img_size=16, batch_size=4)
    batches = list(dm.train_dataloader())
    assert [b[0].shape[0] for b in batches] == [4, 2]
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(6))


# ------------------------------------------------------------------ holdout / fitness


@pytest.mark.parametrize(("holdout", "expected"), [(3, 3), (0.25, 5), (0.01, 1)])
def test_holdout_is_disjoint(tiny_vit: torch.nn.Module, holdout: int | float, expected: int) -> None:
    dm = CalibrationDataModule(dataset=_PairDataset(20), holdout=holdout)
    dm.configure_from_model(tiny_vit)
    fit_labels = dm.fitness_labels().tolist()
    cal_labels = dm.calibration_labels().tolist()
    assert len(fit_labels) == expected
    assert set(fit_labels).isdisjoint(cal_labels)
    assert sorted(fit_labels + cal_labels) == list(range(20))
    assert fit_labels == sorted(fit_labels) and cal_labels == sorted(cal_labels)
    size, mean, std = resolve_input_config(tiny_vit)
    fit = dm.fitness_images()
    assert fit.shape == (expected, 3, size, size) and fit.dtype == torch.float32
    # solid colour image i → (i/255 - mean) / std everywhere
    for row, label in zip(fit, fit_labels):
        torch.testing.assert_close(row, torch.full_like(row, (label / 255 - mean[0]) / std[0]), atol=1e-4, rtol=0)
    views, _ = dm.train_dataset()[0]
    assert views.shape == (12, 3, size, size)
    # the same seed gives the same split; another seed another one
    other = CalibrationDataModule(dataset=_PairDataset(20), holdout=holdout, img_size=16)
    assert other.fitness_labels().tolist() == fit_labels
    if expected > 1:
        reseeded = CalibrationDataModule(dataset=_PairDataset(20), holdout=holdout, img_size=16, seed=5)
        assert reseeded.fitness_labels().tolist() != fit_labels


def test_holdout_and_max_samples() -> None:
    dm = CalibrationDataModule(dataset=_PairDataset(30), holdout=4, max_samples=10, img_size=16)
    assert len(dm.fitness_labels()) == 4 and len(dm.calibration_labels()) == 10
    assert set(dm.fitness_labels().tolist()).isdisjoint(dm.calibration_labels().tolist())
    short = CalibrationDataModule(dataset=_PairDataset(12), holdout=4, max_samples=10, img_size=16)
    with pytest.warns(UserWarning, match=r"max_samples=10 asks for more calibration images than the 8 that `holdout`=4 "
                                         r"leaves of the 12 in .*: the fit calibrates on 8 \(it needs holdout \+ max_samples"):
        short.check_sources()  # the holdout is taken first: 8 calibration images, said (was silent)
    assert len(short.calibration_labels()) == 8


def test_fitness_defaults_to_calibration_images() -> None:
    dm = CalibrationDataModule(dataset=_PairDataset(5), img_size=16)
    torch.testing.assert_close(dm.fitness_images(), dm.calibration_images_eval())
    assert dm.fitness_labels().tolist() == dm.calibration_labels().tolist() == list(range(5))


def test_fitness_data_dir(tmp_path: Path) -> None:
    for i, cls in enumerate(["a", "b", "b"]):
        _write_image(tmp_path / "fit" / cls / f"{i}.png", seed=i)
    dm = CalibrationDataModule(dataset=_PairDataset(4), fitness_data_dir=tmp_path / "fit", img_size=20)
    assert dm.fitness_images().shape == (3, 3, 20, 20)
    assert dm.fitness_labels().tolist() == [0, 1, 1]
    assert dm.num_calibration_images == 4


def test_explicit_size_wins_and_model_normalisation(tiny_vit: torch.nn.Module) -> None:
    dm = CalibrationDataModule(dataset=_PairDataset(3), img_size=48)  # a size the model cuts into patches
    dm.configure_from_model(tiny_vit)
    assert dm.size == 48 and dm.normalization == ((0.5,) * 3, (0.5,) * 3)
    assert dm.train_dataset()[0][0].shape == (12, 3, 48, 48)
    # without a model: ImageNet statistics
    plain = CalibrationDataModule(dataset=_PairDataset(3), img_size=24)
    assert plain.normalization[0] == (0.485, 0.456, 0.406)


# ------------------------------------------------------------------ loaders


def test_dataloader_reproducible_and_worker_independent() -> None:
    kwargs = {"dataset": _NoiseDataset(6), "img_size": 16, "batch_size": 4, "num_local_crops": 2}
    first = [b[0] for b in CalibrationDataModule(**kwargs).train_dataloader()]
    again = [b[0] for b in CalibrationDataModule(**kwargs, num_workers=2).train_dataloader()]
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = next(iter(CalibrationDataModule(**kwargs, seed=1).train_dataloader()))[0]
    assert not torch.allclose(first[0], other)


class _RecordingDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.n, self.loaded = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.loaded.append(i)
        return i


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumable_loader_continues_after_served_batches(num_workers: int) -> None:
    data = _RecordingDataset(5)

    def make() -> ResumableDataLoader:
        return ResumableDataLoader(data, batch_size=2, num_workers=num_workers)

    first = make()
    it = iter(first)
    assert [next(it).tolist(), next(it).tolist()] == [[0, 1], [2, 3]]
    state = first.state_dict()
    assert state["num_samples"] == 5
    torch.save(state, buffer := io.BytesIO())
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)  # plain values: a Lightning checkpoint stays weights_only
    data.loaded.clear()
    resumed = make()
    resumed.load_state_dict(state)
    assert len(resumed) == 3  # Lightning needs the full length
    assert [b.tolist() for b in resumed] == [[4]]
    if num_workers == 0:  # (workers load into their own copy of the dataset)
        assert data.loaded == [4]  # skipped batches are never loaded
    assert [b.tolist() for b in resumed] == [[0, 1], [2, 3], [4]]  # the skip applies to one pass only
    with pytest.raises(ValueError, match="num_samples=4, but this loader's dataset has 5"):
        resumed.load_state_dict({**state, "num_samples": 4})
    with pytest.raises(ValueError, match="before it used torchdata's StatefulDataLoader"):
        resumed.load_state_dict({"batches": 1, "num_samples": 5})  # the format of earlier versions
    # A state of 2 DDP processes in 1 (and the reverse): the shares differ, so the skip would be wrong.
    assert state["world_size"] == 1
    with pytest.raises(ValueError, match=r"saved by a fit of 2 process\(es\), this one runs 1: .* same number of processes"):
        resumed.load_state_dict({**state, "world_size": 2})
    sharded = ResumableDataLoader(data, batch_size=2, sampler=PaddedShards(data, num_replicas=2, rank=0))
    assert sharded.state_dict()["world_size"] == 2
    with pytest.raises(ValueError, match=r"saved by a fit of 1 process\(es\), this one runs 2"):
        sharded.load_state_dict(state)


def test_datamodule_loader_resumes_with_identical_views() -> None:
    kwargs = {"dataset": _NoiseDataset(5), "img_size": 16, "batch_size": 2, "num_local_crops": 2}
    full = [b[0] for b in CalibrationDataModule(**kwargs).train_dataloader()]
    first = CalibrationDataModule(**kwargs).train_dataloader()
    next(iter(first))
    loader = CalibrationDataModule(**kwargs).train_dataloader()
    loader.load_state_dict(first.state_dict())
    rest = [b[0] for b in loader]
    assert len(rest) == 2
    for a, b in zip(rest, full[1:], strict=True):
        assert torch.equal(a, b)


def test_set_epoch_changes_crops() -> None:
    dm = CalibrationDataModule(dataset=_NoiseDataset(2))
    dm.configure_from_model(timm.create_model("test_vit", pretrained=False, img_size=16))
    epoch0 = dm.train_dataset()[1][0]
    dm.set_epoch(1)
    assert not torch.allclose(epoch0, dm.train_dataset()[1][0])
    dm.set_epoch(0)
    torch.testing.assert_close(epoch0, dm.train_dataset()[1][0], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:.*configure_optimizers.*returned `None`")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")
def test_trainer_fit_sees_batches() -> None:
    import lightning.pytorch as pl

    class _Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = timm.create_model("test_vit", pretrained=False, img_size=16)
            self.automatic_optimization = False
            self.shapes: list[tuple[int, ...]] = []

        def setup(self, stage: str) -> None:
            self.trainer.datamodule.configure_from_model(self.model)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            views, labels = batch
            self.shapes.append(tuple(views.shape))
            assert labels.shape == (views.shape[0],)

        def configure_optimizers(self) -> None:
            return None

    probe = _Probe()
    dm = CalibrationDataModule(dataset=_PairDataset(5), batch_size=2, num_local_crops=3)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(probe, datamodule=dm)
    assert probe.shapes == [(2, 5, 3, 16, 16), (2, 5, 3, 16, 16), (1, 5, 3, 16, 16)]


def test_official_style_repeated_views() -> None:
    img = _rand_uint8(64, 80)
    views = DINOMultiCrop(size=16, num_local_crops=4, independent_views=False)(img, index=3)
    assert torch.equal(views[0], views[1])
    assert all(torch.equal(views[2], views[k]) for k in range(3, 6))
    assert not torch.equal(views[0], views[2])
    independent = DINOMultiCrop(size=16, num_local_crops=4)(img, index=3)
    assert not torch.equal(independent[0], independent[1])
    with pytest.raises(TypeError, match="independent_views"):
        DINOMultiCrop(size=16, independent_views=1)


@pytest.mark.parametrize("n, world", [(7, 2), (8, 2), (1, 2), (10, 4)])
def test_padded_shards_cover_every_image_once_and_mark_the_padding(n: int, world: int) -> None:
    shards = [list(PaddedShards(list(range(n)), num_replicas=world, rank=r)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal steps on every rank
    kept = sorted(i for s in shards for i, keep in s if keep)
    assert kept == list(range(n))  # each image once, padding marked
    assert [s[0] for s in shards] == [(r % n, r < n) for r in range(world)]  # rank r starts at image r
    assert all(s[1:2] in ([], [((r + world) % n, r + world < n)]) for r, s in enumerate(shards))  # then strides by world
    assert len(PaddedShards(list(range(n)), num_replicas=world, rank=0)) == len(shards[0])


def test_padded_shards_items_carry_keep_through_the_loader(tmp_path: Path) -> None:
    for i in range(3):
        _write_image(tmp_path / f"{i}.png", seed=i)
    dm = CalibrationDataModule(data_dir=tmp_path, img_size=32, num_local_crops=2, batch_size=2)
    dataset = dm.train_dataset()
    loader = ResumableDataLoader(dataset, batch_size=2, sampler=PaddedShards(dataset, num_replicas=2, rank=1))
    (views, labels, keep), = list(loader)  # rank 1 of 2 over 3 images: image 1, then image 0 repeated
    assert views.shape[:2] == (2, 4) and keep.tolist() == [True, False]
    assert torch.equal(views[0], dataset[1][0]) and torch.equal(views[1], dataset[0][0])


def test_a_view_size_a_dynamic_size_model_cannot_cut_is_refused_when_configured() -> None:
    # timm's AssertionError came in the middle of the fit (the model's own size is checked by check_supported).
    kwargs = dict(depth=1, embed_dim=32, num_heads=2, num_classes=0, dynamic_img_size=True, img_size=64)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs)
    dataset = [torch.rand(3, 64, 64) for _ in range(2)]
    with pytest.raises(ValueError, match=r"^data\.img_size=60: 60 x 60 px images do not cut into this model's 16 x 16 px "
                                         r"patches; give a size that is a multiple of 16 \(e.g. 48 or 64\)"):
        CalibrationDataModule(dataset=dataset, img_size=60).configure_from_model(model)
    for size in (None, 48):  # the model's own, or another it takes
        dm = CalibrationDataModule(dataset=dataset, img_size=size, num_local_crops=2, batch_size=2)
        dm.configure_from_model(model)
        dm.setup("fit")
        views, _ = next(iter(dm.train_dataloader()))
        assert views.shape[-1] == (size or 64) and torch.isfinite(model(views[:, 0])).all()


def test_a_view_size_a_fixed_size_model_does_not_take_is_refused_when_configured() -> None:
    # `snapvit fit --data.img_size 96` on a 64 px model: timm's assertion came in the scoring, a traceback
    fixed = timm.create_model("test_vit", pretrained=False, img_size=64, dynamic_img_size=False)
    with pytest.raises(ValueError, match=r"^data\.img_size=96: this ViT takes 64 x 64 px images only \(give 64, or build"):
        CalibrationDataModule(dataset=_NoiseDataset(2), img_size=96).configure_from_model(fixed)
    with pytest.raises(ValueError, match=r"img_size=65: .*build the ViT with dynamic_img_size=True and give a multiple of 16\)"):
        CalibrationDataModule(dataset=_NoiseDataset(2), img_size=65).configure_from_model(fixed)
    CalibrationDataModule(dataset=_NoiseDataset(2), img_size=64).configure_from_model(fixed)
    dynamic = timm.create_model("test_vit", pretrained=False, img_size=64, dynamic_img_size=True)
    CalibrationDataModule(dataset=_NoiseDataset(2), img_size=96).configure_from_model(dynamic)


def test_a_resume_with_other_calibration_data_options_is_refused(tmp_path: Path) -> None:
    """The datamodule's state in a Lightning checkpoint: what its crops depend on (any entry: CLI, last, Python)."""
    for folder in ("a", "b"):
        for i in range(3):
            _write_image(tmp_path / folder / "x" / f"{i}.png", seed=i, size=(48, 40) if folder == "a" or i else (40, 40))
    shutil.copytree(tmp_path / "a", tmp_path / "a_copy")

    def module(**kwargs: Any) -> CalibrationDataModule:
        dm = CalibrationDataModule(**{"data_dir": tmp_path / "a", "img_size": 32, **kwargs})
        dm.check_sources()
        return dm

    saved = module().state_dict()
    module(data_dir=tmp_path / "a_copy").load_state_dict(saved)  # the same files elsewhere: a moved folder resumes
    module(fitness_data_dir=tmp_path / "b").load_state_dict(saved)  # read by the search only
    for kwargs, said in (({"seed": 5}, "data.seed=5 (the checkpoint's: 0)"),
                         ({"batch_size": 3}, "data.batch_size=3 (the checkpoint's: 16)"),
                         ({"data_dir": tmp_path / "b"}, "data.images='"),  # as many files, one of another size
                         ({"data_dir": None}, "data.images='")):  # the built-in photos
        with pytest.raises(ValueError, match=re.escape(f"whose calibration data this one changes: {said}")):
            module(**kwargs).load_state_dict(saved)
    module(data_dir=tmp_path / "b").load_state_dict({})  # a checkpoint before the datamodule saved its state
    with pytest.raises(ValueError, match=r"the checkpoint's 3 images: data_dir='.*a', this fit's 3 images: data_dir='.*b'"):
        module(data_dir=tmp_path / "b").load_state_dict(saved)  # the message says what the digests stand for

    class Cats(_PairDataset):
        pass

    cats = CalibrationDataModule(dataset=Cats(6), img_size=16)
    dogs = CalibrationDataModule(dataset=_PairDataset(6), img_size=16)
    cats.check_sources(), dogs.check_sources()
    with pytest.raises(ValueError, match="data.images="):  # the user's dataset class, not the wrapper's
        dogs.load_state_dict(cats.state_dict())
    # a checkpoint before the datamodule saved its own state: its saved options, the folder by its resolved path
    old = {"datamodule_hyper_parameters": dict(module().hparams)}
    module(data_dir=os.path.relpath(tmp_path / "a")).check_saved_options(old)  # the same folder, given relative
    with pytest.raises(ValueError, match=r"changes: data.seed=5 \(the checkpoint's: 0\)"):
        module(seed=5).check_saved_options(old)
    module(seed=5).check_saved_options({**old, "CalibrationDataModule": {}})  # a newer one: load_state_dict's
    module(seed=5).check_saved_options({"datamodule_hyper_parameters": {"batch_size": 64, "root": "x"}})  # not ours
