"""ONNX export: ONNX Runtime against torch on tiny and real models, dynamic batch, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODELS, load_real_model, model_input, random_scores, tiny_model
from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.onnx_export import OnnxModel, onnx_bytes, onnx_max_abs_diff, save_onnx
from snapvit_lightning.structure import BlockDims


def _elastic(key: str) -> ElasticViT:
    model, name, kwargs = tiny_model(key)
    return ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs)


@pytest.mark.parametrize("key", sorted(TINY_MODELS))
def test_sliced_tiny_models_match_and_batch_is_dynamic(key: str, one_thread: None) -> None:
    el = _elastic(key)
    sub = el.subnet(0.5, 0.3)
    graph = onnx_bytes(sub, batch_size=2)
    x = model_input(sub, batch=3, seed=4)  # traced at batch 2, run at 3 and 1
    assert onnx_max_abs_diff(sub, graph, x) < 1e-5
    runner = OnnxModel(graph, threads=1)
    assert runner(x[:1]).shape == sub(x[:1]).shape


def test_block_without_heads_exports(one_thread: None) -> None:
    el = _elastic("test_vit")
    dims = [BlockDims(b.num_heads, b.mlp_hidden) for b in el.structure.blocks]
    dims[0] = BlockDims(0, 3)
    sub = el.slice(dims)
    assert onnx_max_abs_diff(sub, onnx_bytes(sub), model_input(sub, batch=3)) < 1e-5
    assert type(sub.blocks[0].attn).__name__ == "Attention"  # replaced in a copy for the export only


def test_save_onnx_checks_and_writes_atomically(tmp_path: Path, one_thread: None, monkeypatch) -> None:
    el = _elastic("test_vit")
    sub = el.subnet(flops=0.6)
    x = model_input(sub, batch=2)
    out = tmp_path / "sub.onnx"
    diff = save_onnx(sub, out, check_images=x)
    assert diff is not None and diff < 1e-5
    assert onnx_max_abs_diff(sub, out, x) == pytest.approx(diff)
    assert [p.name for p in tmp_path.iterdir()] == ["sub.onnx"]
    assert save_onnx(sub, tmp_path / "random.onnx") < 1e-5  # checked on random images by default
    # a torch.compile'd subnet: "Detected that you are using FX to torch.jit.trace a dynamo-optimized function"
    assert save_onnx(torch.compile(sub), tmp_path / "compiled.onnx", check_images=x) == pytest.approx(diff)
    (tmp_path / "compiled.onnx").unlink()
    (tmp_path / "random.onnx").unlink()

    import snapvit_lightning.onnx_export as mod

    monkeypatch.setattr(mod, "onnx_max_abs_diff", lambda *a, **k: 0.5)
    with pytest.raises(ValueError, match=r"differs from torch's by 0\.5"):
        save_onnx(sub, tmp_path / "bad.onnx", check_images=x)
    assert not (tmp_path / "bad.onnx").exists()


def test_export_keeps_train_mode_and_device(one_thread: None) -> None:
    sub = _elastic("test_vit").subnet(0.3, 0.0).train()
    onnx_bytes(sub)
    assert sub.training


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(batch_size=0), ValueError, "batch_size must be an int >= 1"),
        (dict(opset=13), ValueError, "opset must be an int >= 14"),
        (dict(metadata=[1]), ValueError, r"metadata must map strings to strings \(a dict\), got \[1\]"),
        (dict(metadata={"a": 1}), ValueError, "metadata must map strings to strings"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        onnx_bytes(_elastic("test_vit").model, **kwargs)


def test_not_a_vit_and_bad_inputs() -> None:
    with pytest.raises(TypeError, match="timm ViT"):
        onnx_bytes(torch.nn.Linear(2, 2))
    el = _elastic("test_vit")
    with pytest.raises(ValueError, match=r"images must be a non-empty float tensor \[N, 3, H, W\] for this model, got \[2, 3\]"):
        onnx_max_abs_diff(el.model, b"", torch.zeros(2, 3))
    x = model_input(el.model)
    with pytest.raises(ValueError, match=r"images must be \[N, 3, 160, 160\] \(the exported graph's input\), got \[2, 3, 32, 32\]"):
        onnx_max_abs_diff(el.model, b"", x[:, :, :32, :32])  # test_vit takes any size, its graph one
    with pytest.raises(ValueError, match="images hold non-finite values"):
        onnx_max_abs_diff(el.model, b"", torch.full_like(x, float("nan")))
    for atol in (-1, float("nan"), "1e-4", True):
        with pytest.raises(ValueError, match="atol must be a finite number >= 0"):
            save_onnx(el.model, "never_written.onnx", atol=atol)
    # an ONNX graph under a .safetensors name, which load_subnet then called corrupt; swapped arguments: a raw TypeError
    with pytest.raises(ValueError, match=r"path: 'x.safetensors' must end in .onnx .*save_subnet\(\)"):
        save_onnx(el.model, "x.safetensors")
    with pytest.raises(TypeError, match=r"save_onnx\(model, path, ...\) takes the model first, got the path 'b.onnx'"):
        save_onnx("b.onnx", el.model)
    with pytest.raises(TypeError, match="path must be a file path .*, got int"):
        save_onnx(el.model, 3)
    with pytest.raises(TypeError, match=r"takes the model first, got the path 'b.onnx'"):
        save_onnx("b.onnx", el)
    with pytest.raises(ValueError, match=r"check_images must be \[N, 3, 160, 160\]"):
        save_onnx(el.model, "never_written.onnx", check_images=x[:, :, :32, :32])
    with pytest.raises(TypeError, match="model must be a timm ViT .*got ElasticViT: export elastic.model or a subnet"):
        onnx_bytes(el)  # the ElasticViT, not a model
    with pytest.raises(ValueError, match=r"opset must be at most \d+"):
        onnx_bytes(el.model, opset=99)
    for dtype in (torch.float16, torch.bfloat16):  # its graph would not run on float32 inputs
        with pytest.raises(ValueError, match=f"ONNX export takes a float32 model .*got {dtype}"):
            onnx_bytes(el.subnet(0.5, 0.5).to(dtype))
    with pytest.raises(FileNotFoundError, match="no ONNX file at"):
        OnnxModel("missing.onnx")


def test_a_model_that_resamples_its_position_embedding_every_forward_is_refused_in_one_line(
    tmp_path: Path, capfd, monkeypatch
) -> None:
    # dynamic_img_pad at 56 px (16 px patches): timm resamples the 3x3 position grid to 4x4 at every forward with an
    # antialiased bicubic, which the exporter cannot write; the CLI ended in the exporter's traceback.
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1, embed_dim=32, num_heads=2, num_classes=0,
                              img_size=56, dynamic_img_size=True, dynamic_img_pad=True).eval()
    with pytest.raises(ValueError, match=r"^this model's forward uses an operator ONNX opset 17 cannot express \(its 56 x 56 "
                                         r"px input padded to 16 x 16 px patches\); a timm ViT resamples its position embedding"):
        save_onnx(model, tmp_path / "p.onnx")
    assert not list(tmp_path.iterdir())
    padded = timm.create_model("test_vit", pretrained=False, img_size=60, dynamic_img_pad=True).eval()
    with pytest.raises(ValueError, match=r"cannot express \(its 60 x 60 px input padded to 16 x 16 px patches\)"):
        onnx_bytes(padded)
    assert capfd.readouterr().out == ""  # refused before tracing: the failing exporter prints the traced graph (280 lines)
    import snapvit_lightning.onnx_export as mod

    monkeypatch.setattr(mod, "_check_fixed_grid", lambda *args: None)  # another cause: the exporter's own error, one line
    with pytest.raises(ValueError, match=r"cannot express \(.*_upsample_bicubic2d_aa.*\); a timm ViT") as err:
        onnx_bytes(padded)
    assert "\n" not in str(err.value)


def test_onnx_files_and_runner_inputs(tmp_path: Path) -> None:
    el = _elastic("test_vit")
    sub = el.subnet(0.5, 0.5)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_onnx(sub, tmp_path)
    path = tmp_path / "new" / "sub.onnx"  # its folder is created, as for safetensors files
    save_onnx(sub, path)
    runner = OnnxModel(path)
    assert runner.input_shape[1:] == [3, 160, 160]
    with pytest.raises(ValueError, match=r"images must be \['B', 3, 160, 160\] for this graph, got \[2, 3, 32, 32\]"):
        runner(torch.zeros(2, 3, 32, 32))
    # uint8 pixels ran unnormalised, cast without a word (cosine .28 to the real output)
    with pytest.raises(ValueError, match=r"images must be a non-empty float32 batch, normalised .* got torch.uint8"):
        runner(torch.zeros(1, 3, 160, 160, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"non-empty float32 batch, .* got torch.float32 \[0, 3, 160, 160\]"):
        runner(torch.zeros(0, 3, 160, 160))  # ONNX Runtime's Reshape error before
    with pytest.raises(TypeError, match=r"images must be a torch.Tensor \(torch.from_numpy for an array\), got ndarray"):
        runner(torch.zeros(1, 3, 160, 160).numpy())
    with pytest.raises(ValueError, match="device 'tpu' is not available to ONNX Runtime"):
        OnnxModel(b"", device="tpu")
    with pytest.raises(ValueError, match="threads must be an int >= 1"):
        OnnxModel(b"", threads=0)
    with pytest.raises(TypeError, match="spinning must be a bool, got 'no'"):
        OnnxModel(b"", spinning="no")


def test_runtime_threads_do_not_spin_unless_asked() -> None:
    # Spinning threads of one session took the cores from the next one timed: the latency tools, which
    # time the dense graph and each candidate in turn, read ONNX Runtime 2-4x slower than it runs.
    graph = onnx_bytes(tiny_model("test_vit")[0].eval(), batch_size=1)
    for spinning, expected in ((False, "0"), (True, "1")):
        options = OnnxModel(graph, spinning=spinning).session.get_session_options()
        for pool in ("intra_op", "inter_op"):
            assert options.get_session_config_entry(f"session.{pool}.allow_spinning") == expected


def test_missing_onnxruntime_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install \"snapvit_lightning\[onnx\]\""):
        OnnxModel(b"")


@pytest.fixture(scope="module")
def real(real_weights: Path) -> tuple[ElasticViT, torch.Tensor]:
    from snapvit_lightning.data import load_eval_images
    from snapvit_lightning.module import SnapViTModule

    model = load_real_model(real_weights)
    images, _, _ = load_eval_images(None, model)  # scikit-image's photos
    scores = SnapViTModule(model, criterion="magnitude").compute_scores()
    el = ElasticViT(model, scores, model_name="vit_small_patch14_dinov2",
                    model_kwargs=dict(num_classes=0, img_size=112))
    return el, images


@pytest.mark.parametrize("correct", ["none", "lstsq"])
def test_real_vit_s14_onnx_runtime_matches_torch(real: tuple[ElasticViT, torch.Tensor], correct: str) -> None:
    """Real DINOv2 ViT-S/14 at 112 px on real photos: ONNX Runtime within 1e-4 of torch (fp32)."""
    el, images = real
    correction = {"correct": "none"}
    if correct != "none":
        correction = dict(correct=correct, calibration=el.collect_stats(images[0::4]))
    sub = el.subnet(flops=0.5, **correction)
    held_out = images[1::2][:24]
    runner = OnnxModel(onnx_bytes(sub, batch_size=2))
    diff = onnx_max_abs_diff(sub, runner, held_out, batch_size=3)  # traced at 2, run at 3
    print(f"ViT-S/14 flops=0.5 correct={correct}: ONNX Runtime vs torch max abs diff {diff:.2e}")
    assert diff <= 1e-4
    if correct != "none":  # the graph holds the corrected weights
        with torch.inference_mode():
            plain = el.subnet(flops=0.5, correct="none")(held_out[:3])
        assert (runner(held_out[:3]) - plain).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Wired in: snapvit slice --format onnx, export_elastic(onnx=True)


def _saved_elastic(tmp_path: Path) -> tuple[ElasticViT, Path]:
    el = _elastic("test_vit")
    path = tmp_path / "m.elastic.safetensors"
    el.save(path)
    return el, path


def test_cli_slice_writes_onnx_plain_and_corrected(tmp_path: Path, capsys, one_thread: None) -> None:
    from snapvit_lightning.cli import main

    el, path = _saved_elastic(tmp_path)
    x = model_input(el.model, batch=3, seed=5)
    out = tmp_path / "sub.onnx"
    assert main(["slice", str(path), "--flops", "0.6", "--format", "onnx", "-o", str(out)]) == 0
    assert "(ONNX, dynamic batch; ONNX Runtime matches torch within" in capsys.readouterr().out
    with torch.inference_mode():
        assert (OnnxModel(out)(x) - el.subnet(flops=0.6, correct="none")(x)).abs().max() < 1e-5
    _assert_described(out, el, {"flops": 0.6})

    stats = tmp_path / "m.stats.safetensors"
    el.collect_stats(model_input(el.model, batch=8, seed=6)).save(stats)
    fixed = tmp_path / "fixed.onnx"  # the .onnx suffix is enough
    assert main(["slice", str(path), "--flops", "0.6", "--correct", "lstsq", "-o", str(fixed)]) == 0
    assert "correction lstsq" in capsys.readouterr().out
    from snapvit_lightning.correction import CorrectionStats

    expected = el.subnet(flops=0.6, correct="lstsq", calibration=CorrectionStats.load(stats))
    with torch.inference_mode():
        assert (OnnxModel(fixed)(x) - expected(x)).abs().max() < 1e-5
        assert (OnnxModel(fixed)(x) - OnnxModel(out)(x)).abs().max() > 1e-4


def test_info_reads_an_onnx_subnets_metadata(tmp_path: Path, capsys, one_thread: None) -> None:
    # `snapvit info x.onnx` was refused ("is an ONNX graph; this reads ... safetensors"), though the graph holds it all
    from snapvit_lightning.cli import main

    el, path = _saved_elastic(tmp_path)
    for suffix in ("onnx", "safetensors"):
        assert main(["slice", str(path), "--flops", "0.6", "--no-correct", "-o", str(tmp_path / f"s.{suffix}")]) == 0
    capsys.readouterr()
    said = {}
    for suffix in ("onnx", "safetensors"):
        assert main(["info", str(tmp_path / f"s.{suffix}")]) == 0
        said[suffix] = capsys.readouterr().out.replace(str(tmp_path / f"s.{suffix}"), "FILE")
    assert said["onnx"] == said["safetensors"] and "FLOPs per image" in said["onnx"] and "asked: flops 0.6" in said["onnx"]
    save_onnx(el.model, tmp_path / "plain.onnx")  # no subnet metadata
    (tmp_path / "cut.onnx").write_bytes((tmp_path / "s.onnx").read_bytes()[:300])
    (tmp_path / "report.json").write_text('{"budgets": []}')
    (tmp_path / "empty.onnx").write_bytes(b"")
    for name, match in (("plain.onnx", "is an ONNX graph without snapvit's subnet metadata"),
                        ("empty.onnx", "is not an ONNX graph (empty, or no nodes)"),
                        ("cut.onnx", "is not a readable ONNX graph (corrupt or truncated?)"),
                        ("report.json", "is a JSON file (a report?), not safetensors")):
        with pytest.raises(SystemExit) as stop:
            main(["info", str(tmp_path / name)])
        assert stop.value.code == 2 and match in capsys.readouterr().err


def _assert_described(path: Path, el, requested: dict) -> None:
    """The graph says what it is (the subnet file's metadata) and how to feed it; its output width is fixed."""
    import json

    import onnx

    graph = onnx.load(str(path))
    props = {p.key: p.value for p in graph.metadata_props}
    sub = el.subnet(**{"flops": requested["flops"]}) if "flops" in requested else None
    size = list(el.model.patch_embed.img_size)
    assert props["kind"] == "subnet" and props["model_name"] == el.model_name and json.loads(props["input_size"]) == size
    assert json.loads(props["mean"]) == pytest.approx(list(el.model.pretrained_cfg["mean"]))
    assert len(json.loads(props["std"])) == 3 and json.loads(props["budget"])["requested"] == requested
    if sub is not None:
        assert json.loads(props["block_dims"]) == [[b.attn.num_heads, b.mlp.fc1.out_features] for b in sub.blocks]
    (output,) = graph.graph.output
    dims = output.type.tensor_type.shape.dim
    with torch.inference_mode():
        width = el.model(model_input(el.model, batch=1)).shape[1]
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [width]


def test_cli_slice_onnx_without_onnxruntime_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    from snapvit_lightning.cli import main

    _, path = _saved_elastic(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SystemExit) as exc:
        main(["slice", str(path), "--flops", "0.6", "-o", str(tmp_path / "s.onnx")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and 'pip install "snapvit_lightning[onnx]"' in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.onnx").exists()


def test_export_elastic_writes_onnx_per_budget(tmp_path: Path, one_thread: None) -> None:
    from snapvit_lightning.export import export_elastic

    el = _elastic("test_vit")
    images = model_input(el.model, batch=6, seed=7)
    result = export_elastic(el, tmp_path, budgets=[(0.0, 0.0), (0.5, 0.5)], onnx=True, correct="lstsq",
                            calibration_images=images, fitness_images=images)
    stats = el.collect_stats(images, ranking=True)  # what the export ships: statistics and the corrected ranking
    for entry in result["report"]["budgets"]:
        graph = tmp_path / entry["onnx_file"]
        assert result["paths"][f"onnx:{entry['label']}"] == graph and entry["onnx_max_abs_diff"] < 1e-5
        _assert_described(graph, el, entry["requested"])
        expected = el.subnet(entry["mlp_ratio"], entry["head_ratio"], correct="lstsq", calibration=stats)
        with torch.inference_mode():
            assert (OnnxModel(graph)(images[:2]) - expected(images[:2])).abs().max() < 1e-5
    assert not any(name.endswith(".onnx") for name in result["report"]["files"].values())
    plain = export_elastic(el, tmp_path / "plain", budgets=[0.6], correct="none")
    assert plain["report"]["budgets"][0]["onnx_file"] is None and not list((tmp_path / "plain").glob("*.onnx"))


def test_the_check_fails_on_outputs_that_are_not_finite(one_thread: None) -> None:
    # max(0.0, nan) is 0.0: an all-NaN graph "matched torch within 0.0e+00" and was written.
    sub = _elastic("test_vit").subnet(0.5, 0.5)
    x = model_input(sub, batch=2)
    broken = _elastic("test_vit").subnet(0.5, 0.5)
    with torch.no_grad():
        broken.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    assert onnx_max_abs_diff(sub, onnx_bytes(broken), x) == float("inf")  # the graph's outputs are NaN
    with pytest.raises(ValueError, match="the torch model's outputs are not finite"):
        onnx_max_abs_diff(broken, onnx_bytes(broken), x)


def test_runner_names_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    junk = tmp_path / "m.onnx"
    junk.write_bytes(b"not a graph")
    with pytest.raises(ValueError, match=r"'.*m.onnx' is not an ONNX model ONNX Runtime can load"):
        OnnxModel(junk)
