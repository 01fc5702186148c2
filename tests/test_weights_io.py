"""snapvit_lightning.weights_io.create_timm_model and SnapViTModule(pretrained=True), offline.

timm's own route for local pretrained weights, ``pretrained_cfg_overlay=dict(file=PATH)``,
stands in for a download: the same ``load_pretrained`` (with the model family's
``checkpoint_filter_fn``) runs, only the source differs.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from snapvit_lightning.module import SnapViTModule
from snapvit_lightning.weights_io import create_timm_model

from conftest import load_real_model

IMG = 32


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random test_vit state dict (img_size 32) as a safetensors file."""
    torch.manual_seed(3)
    state = {k: v.contiguous() for k, v in timm.create_model("test_vit", img_size=IMG).state_dict().items()}
    path = tmp_path_factory.mktemp("pretrained") / "test_vit.safetensors"
    save_file(state, str(path))
    return path, state


def overlay(path: Path, **kwargs) -> dict:
    return {"img_size": IMG, "pretrained_cfg_overlay": {"file": str(path)}, **kwargs}


def assert_state_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


def test_create_timm_model_loads_the_overlay_file(tiny_weights):
    path, state = tiny_weights
    assert_state_equal(create_timm_model("test_vit", True, overlay(path)), state)


def test_pretrained_module_loads_timms_weights(tiny_weights):
    path, state = tiny_weights
    module = SnapViTModule("test_vit", pretrained=True, model_kwargs=overlay(path))
    assert_state_equal(module.student, state)
    assert module.hparams.pretrained is True
    assert module.student.blocks[0].attn.qkv.weight.requires_grad  # set up for scoring as usual


def test_pretrained_from_yaml_config(tiny_weights, tmp_path):
    """``model.pretrained: true`` in a LightningCLI config."""
    from lightning.pytorch.cli import LightningCLI

    from snapvit_lightning.data import CalibrationDataModule

    path, state = tiny_weights
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n"
        "  model: test_vit\n"
        "  pretrained: true\n"
        f"  model_kwargs: {json.dumps(overlay(path))}\n"
    )
    cli = LightningCLI(
        SnapViTModule, CalibrationDataModule, run=False, args=["--config", str(config)],
        save_config_callback=None, trainer_defaults={"logger": False, "enable_checkpointing": False},
    )
    assert_state_equal(cli.model.student, state)


def test_pretrained_resamples_like_timm(real_weights):
    """The real ViT-S/14 (37x37 position grid) at 112 px: timm's filter resamples, as checkpoint_path does."""
    module = SnapViTModule(
        "vit_small_patch14_dinov2", pretrained=True,
        model_kwargs={"num_classes": 0, "img_size": 112, "pretrained_cfg_overlay": {"file": str(real_weights)}},
    )
    expected = load_real_model(real_weights, img_size=112)
    assert module.student.pos_embed.shape == (1, 1 + 8 * 8, 384)
    assert_state_equal(module.student, expected.state_dict())


def test_prefixed_names_reach_timm(tiny_weights, tmp_path):
    """``local-dir:`` (like ``hf-hub:``) names are resolved by timm, not refused by the name check."""
    from timm.models import save_for_hf

    path, state = tiny_weights
    folder = tmp_path / "model"
    model = timm.create_model("test_vit", img_size=IMG)
    model.load_state_dict(state)
    save_for_hf(model, str(folder), model_args={"img_size": IMG}, safe_serialization=True)  # as on the Hub
    module = SnapViTModule(f"local-dir:{folder}", pretrained=True)
    assert_state_equal(module.student, state)
    # The export records what rebuilds it without the folder (it named local-dir:... and failed after the fit).
    from snapvit_lightning.export import _rebuild_info

    name, kwargs = _rebuild_info(module, None, None)
    assert name == "test_vit"
    rebuilt = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in state.items()}


def test_a_hub_configs_preprocessing_reaches_the_subnets_and_their_onnx_metadata(tiny_weights, tmp_path):
    # A local-dir:/hf-hub: config with CLIP's mean and std was rebuilt with the architecture's
    # defaults: its subnets, ONNX files and resolve_data_config normalised images another way.
    from timm.data import resolve_data_config
    from timm.models import save_for_hf

    from snapvit_lightning.elastic import ElasticViT, load_subnet
    from snapvit_lightning.export import _rebuild_info
    from snapvit_lightning.scores import ImportanceScores

    clip = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bilinear"}
    path, state = tiny_weights
    model = timm.create_model("test_vit", img_size=IMG, pretrained_cfg_overlay=clip)
    model.load_state_dict(state)
    save_for_hf(model, str(tmp_path / "clip"), model_args={"img_size": IMG}, safe_serialization=True)
    module = SnapViTModule(f"local-dir:{tmp_path / 'clip'}", pretrained=True)
    name, kwargs = _rebuild_info(module, None, None)
    scores = ImportanceScores(torch.rand(len(module.student.blocks), 192), torch.rand(len(module.student.blocks), 2))
    elastic = ElasticViT(module.student, scores, model_name=name, model_kwargs=kwargs)
    assert elastic.model_kwargs["pretrained_cfg_overlay"] == clip
    elastic.save(tmp_path / "e.elastic.safetensors")
    loaded = ElasticViT.load(tmp_path / "e.elastic.safetensors")
    assert loaded.model_kwargs == elastic.model_kwargs  # the reloaded model records the same, once
    sub = loaded.subnet(0.5, 0.0)
    config = resolve_data_config({}, model=sub)
    assert [list(config["mean"]), list(config["std"]), config["interpolation"]] == list(clip.values())
    loaded.save_subnet(tmp_path / "s.safetensors", sub)
    assert list(resolve_data_config({}, model=load_subnet(tmp_path / "s.safetensors"))["mean"]) == clip["mean"]
    # A model with its architecture's own preprocessing records no overlay (files as before).
    plain = ElasticViT(timm.create_model("test_vit", img_size=IMG), scores, model_name="test_vit")
    assert "pretrained_cfg_overlay" not in plain.model_kwargs


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(pretrained=True, checkpoint_path="w.safetensors"), ValueError,
         r"either pretrained=True .* or checkpoint_path='w\.safetensors'"),
        (dict(pretrained="yes"), ValueError, "pretrained must be True or False, got 'yes'"),
        (dict(model="nope:x", pretrained=True), ValueError, r"model 'nope:x' is not a timm model name.*hf-hub"),
        (dict(model="no_such_vit", pretrained=True), ValueError, "not a registered timm model name"),
        (dict(pretrained=True, model_kwargs=overlay(Path("/nonexistent.safetensors"))), FileNotFoundError,
         r"pretrained_cfg_overlay file='/nonexistent\.safetensors' does not exist"),
        (dict(pretrained=False, model_kwargs=overlay(Path("w.safetensors"))), ValueError,
         "only read with pretrained=True"),
    ],
)
def test_pretrained_argument_errors(kwargs, error, match):
    args = {"model": "test_vit", "model_kwargs": {"img_size": IMG}, **kwargs}
    with pytest.raises(error, match=match):
        SnapViTModule(**args)


def test_pretrained_with_an_instance_refused():
    with pytest.raises(ValueError, match="pretrained=True only apply when model is a timm name"):
        SnapViTModule(timm.create_model("test_vit", img_size=IMG), pretrained=True)


def test_pretrained_weights_that_do_not_fit(tiny_weights):
    path, _ = tiny_weights
    with pytest.raises(ValueError, match=r"pretrained=True: could not load weights for model 'test_vit2'"):
        SnapViTModule("test_vit2", pretrained=True, model_kwargs=overlay(path))


def test_pretrained_file_loads_strictly_except_a_differing_head(tiny_weights, tmp_path):
    # timm loads an overlay file non-strictly whenever num_classes differs from its config (every
    # shipped config has num_classes 0): a file without block 0 loaded silently, half random.
    path, state = tiny_weights
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("blocks.0.")}, str(partial))
    with pytest.raises(ValueError, match=r"could not load weights for model 'test_vit'.* missing keys \['blocks\.0\."):
        SnapViTModule("test_vit", pretrained=True, model_kwargs={"img_size": IMG, "num_classes": 0, **overlay(partial)})
    headed = tmp_path / "headed.safetensors"  # a classifier the model (num_classes 0) does not have: dropped, as timm does
    save_file({**state, "head.weight": torch.randn(10, state["cls_token"].shape[-1]), "head.bias": torch.zeros(10)}, str(headed))
    module = SnapViTModule("test_vit", pretrained=True, model_kwargs={"img_size": IMG, "num_classes": 0, **overlay(headed)})
    assert_state_equal(module.student, {k: v for k, v in state.items() if not k.startswith("head.")})


def test_checkpoint_path_inside_model_kwargs_refused():
    # timm would load it, and the elastic checkpoint would store the path and re-read it at every load.
    with pytest.raises(ValueError, match=r"model_kwargs checkpoint_path='w.pth': pass it as checkpoint_path"):
        SnapViTModule("test_vit", model_kwargs={"img_size": IMG, "checkpoint_path": "w.pth"})


def test_an_unreachable_hub_names_the_model_and_the_offline_ways(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub ...")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ValueError, match=r"model 'vit_small_patch16_224.augreg_in21k': the Hugging Face Hub could not "
                                         r"provide its files \(offline\?\): .* give local weights: checkpoint_path"):
        create_timm_model("vit_small_patch16_224.augreg_in21k", pretrained=True)


def test_a_misspelt_model_kwargs_key_is_a_value_error_naming_it():
    # A config's `model_kwargs: {img_sz: 64}` was a traceback of timm's TypeError (exit status 1).
    with pytest.raises(ValueError, match=r"model_kwargs \['img_sz'\]: 'test_vit' does not take one of them: .*"
                                         r"unexpected keyword argument 'img_sz'"):
        create_timm_model("test_vit", model_kwargs={"img_sz": 64})


@pytest.mark.parametrize("kwargs, match", [
    ({"class_token": False, "global_pool": "token"}, r"timm refuses them for 'test_vit': Token pooling needs the class token"),
    ({"num_heads": 5}, r"timm refuses them for 'test_vit': dim should be divisible by num_heads"),
    ({"pos_embed": "bogus"}, r"timm refuses them for 'test_vit': an assertion failed$"),  # an assert without a message
    ({"patch_size": 0}, r"timm refuses them for 'test_vit': ZeroDivisionError: "),  # were tracebacks too
    ({"act_layer": "bogus"}, r"timm refuses them for 'test_vit': KeyError: 'bogus'$"),
])
def test_model_kwargs_timm_asserts_against_are_a_value_error(kwargs, match) -> None:
    # timm's AssertionError was a traceback (exit status 1) where a misspelt key was one line
    with pytest.raises(ValueError, match=r"^model_kwargs \{.*\}: " + match):
        create_timm_model("test_vit", model_kwargs=kwargs)


def test_a_local_dir_without_its_config_is_refused_with_the_layout(tmp_path) -> None:
    # timm said only "Config file not found: FOLDER/config.json", for a missing folder too
    with pytest.raises(FileNotFoundError, match=r"the folder '.*nope' does not exist; timm's local-dir: reads FOLDER/config.json"):
        create_timm_model(f"local-dir:{tmp_path / 'nope'}")
    with pytest.raises(FileNotFoundError, match=r"has no config.json; .*FOLDER/model.safetensors"):
        create_timm_model(f"local-dir:{tmp_path}")
    (tmp_path / "config.json").write_text("not json")  # json's and timm's KeyError tracebacks before
    with pytest.raises(ValueError, match=r"its config.json is no JSON"):
        create_timm_model(f"local-dir:{tmp_path}")
    (tmp_path / "config.json").write_text('{"num_classes": 0}')
    with pytest.raises(ValueError, match=r'its config.json names no "architecture"'):
        create_timm_model(f"local-dir:{tmp_path}")
    with pytest.raises(FileNotFoundError, match=r"'.*config.json' is a file, not a folder"):
        create_timm_model(f"local-dir:{tmp_path / 'config.json'}")
    with pytest.raises(FileNotFoundError, match=r"the folder '~/nope' does not exist \(timm does not expand ~"):
        create_timm_model("local-dir:~/nope")
    (tmp_path / "config.json").write_text('{"architecture": "test_vit", "num_classes": 0, "pretrained_cfg": {}}')
    assert create_timm_model(f"local-dir:{tmp_path}").num_classes == 0


def test_a_local_dirs_weights_load_as_a_checkpoint_path_does(tmp_path) -> None:
    # timm's loader raised a SafetensorError traceback (status 1) for a truncated file, and listed every key
    # (24,000 characters) for another architecture's
    (tmp_path / "config.json").write_text('{"architecture": "test_vit", "num_classes": 5, "pretrained_cfg": {}}')
    with pytest.raises(FileNotFoundError, match=r"with pretrained: true the folder '.*' must hold its weights \(model"):
        create_timm_model(f"local-dir:{tmp_path}", pretrained=True)
    for name in ("model.pth", "weights.safetensors"):  # timm takes them too (it found them, and this refused them)
        state = timm.create_model("test_vit", num_classes=5).state_dict()
        if name.endswith(".pth"):
            torch.save(state, tmp_path / name)
        else:
            save_file(state, tmp_path / name)
        theirs = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).state_dict()
        ours = create_timm_model(f"local-dir:{tmp_path}", pretrained=True).state_dict()
        assert all(torch.equal(ours[k], v) for k, v in theirs.items()), name
        (tmp_path / name).unlink()
    reference = timm.create_model("test_vit", num_classes=5)
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    loaded = create_timm_model(f"local-dir:{tmp_path}", pretrained=True)
    timms = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)  # the same weights as timm's own loading
    assert loaded.num_classes == 5 and all(torch.equal(loaded.state_dict()[k], v) for k, v in timms.state_dict().items())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.state_dict().items() if k != "pos_embed")
    assert loaded.pretrained_cfg["architecture"] == "test_vit"  # what the elastic checkpoint records
    with pytest.raises(ValueError, match=r"^pretrained=True: could not load weights for model 'local-dir:.*': the file "
                                         r"'.*model.safetensors' does not match the model: .*weights of another architecture\?\)$"):
        save_file(timm.create_model("test_vit2", num_classes=5).state_dict(), tmp_path / "model.safetensors")
        create_timm_model(f"local-dir:{tmp_path}", pretrained=True)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match=r"the file '.*model.safetensors' is not a readable safetensors file"):
        create_timm_model(f"local-dir:{tmp_path}", pretrained=True)


def test_timm_data_config_of_models_and_subnets_is_the_built_size(tmp_path) -> None:
    # create_model(..., img_size=S) keeps the pretrained config's size: timm's own transforms then fed
    # the model (and every subnet of it) images it refuses.
    from timm.data import create_transform, resolve_data_config

    from snapvit_lightning.elastic import ElasticViT, load_subnet
    from conftest import random_scores

    model = create_timm_model("test_vit", model_kwargs={"img_size": 64})
    assert timm.create_model("test_vit", img_size=64).pretrained_cfg["input_size"] != (3, 64, 64)  # timm's own
    elastic = ElasticViT(model, random_scores(model), model_name="test_vit", model_kwargs={"img_size": 64})
    path = tmp_path / "s.safetensors"
    elastic.save_subnet(path, elastic.subnet(0.5, 0.5))
    for m in (model, elastic.subnet(0.5, 0.5), load_subnet(path), ElasticViT.load(_saved_elastic(elastic, tmp_path)).model):
        config = resolve_data_config({}, model=m)
        assert config["input_size"] == (3, 64, 64) and m.default_cfg["input_size"] == (3, 64, 64)
        from PIL import Image

        image = Image.fromarray(torch.randint(0, 255, (90, 120, 3), dtype=torch.uint8).numpy())
        m.eval()(create_transform(**config)(image)[None])  # runs: the size it was built for


def _saved_elastic(elastic, tmp_path: Path) -> Path:
    path = tmp_path / "e.elastic.safetensors"
    elastic.save(path)
    return path


def test_a_fine_tuned_head_dropped_by_a_headless_model_is_said(tmp_path) -> None:
    # a user's 8-class checkpoint under a config with num_classes: 0 lost its head without a word
    from snapvit_lightning.weights_io import classifier_layers, load_weights

    for name, classes, said in (("test_vit", 8, True), ("test_vit", 1000, False)):  # 1000: the hub's own head
        source = timm.create_model(name, num_classes=classes)
        save_file(source.state_dict(), tmp_path / "w.safetensors")
        headless = timm.create_model(name, num_classes=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_weights(headless, tmp_path / "w.safetensors", classifier=classifier_layers(headless))
        messages = [str(w.message) for w in caught if "classifier of" in str(w.message)]
        assert messages == ([f"checkpoint_path '{tmp_path / 'w.safetensors'}' holds a classifier of 8 classes, which this "
                             "model (num_classes=0) drops; give model_kwargs num_classes: 8 to keep it (the exported "
                             "subnets then ship it)"] if said else []), (classes, messages)



def _hub_cache(home: Path, repo: str, files: dict[str, bytes]) -> None:
    """A Hugging Face cache under ``home`` (HF_HOME) holding ``files`` of ``repo``, as a download leaves it."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    (folder / "snapshots" / revision).mkdir(parents=True)
    for name, data in files.items():
        (folder / "snapshots" / revision / name).write_bytes(data)


def _create_offline(home: Path, name: str, **kwargs) -> tuple[int, str]:
    code = (f"from snapvit_lightning.weights_io import create_timm_model\n"
            f"m = create_timm_model({name!r}, True, {{'img_size': {IMG}, **{kwargs!r}}})\nprint('SUM', float(m.cls_token.sum()))")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_damaged_or_missing_hub_cache_is_one_line_naming_the_cache(tiny_weights, tmp_path):
    # A truncated cached file was an 80-line SafetensorError traceback, a config.json that is no JSON a
    # JSONDecodeError one; another architecture's weights a 24,000-character line; an empty cache told
    # an offline user to "check your connection" without naming the repository or the cache.
    path, state = tiny_weights
    repo, data = "timm/test_vit.r160_in1k", path.read_bytes()
    config = json.dumps({"architecture": "test_vit", "model_args": {"img_size": IMG}, "pretrained_cfg": {}}).encode()
    _hub_cache(tmp_path / "good", repo, {"model.safetensors": data, "config.json": config})
    rc, out = _create_offline(tmp_path / "good", "test_vit.r160_in1k")
    total = [line.split()[1] for line in out.splitlines() if line.startswith("SUM ")]
    assert rc == 0 and float(total[0]) == pytest.approx(float(state["cls_token"].sum()), abs=1e-6), out
    _hub_cache(tmp_path / "cut", repo, {"model.safetensors": data[: len(data) // 2]})
    _hub_cache(tmp_path / "config", repo, {"model.safetensors": data, "config.json": b"{\n,"})
    wide = timm.create_model("test_vit", img_size=IMG, embed_dim=96)
    save_file(wide.state_dict(), str(tmp_path / "wide.safetensors"))
    _hub_cache(tmp_path / "wide", repo, {"model.safetensors": (tmp_path / "wide.safetensors").read_bytes()})
    for home, name, expected in [
        ("cut", "test_vit.r160_in1k", r"a file read for model 'test_vit\.r160_in1k' is damaged or truncated "
                                      r"\(SafetensorError: .*\); it comes from the Hugging Face cache .*cut/hub/"
                                      r"models--timm--test_vit\.r160_in1k \(timm/test_vit\.r160_in1k\): delete that folder"),
        ("config", f"hf-hub:{repo}", r"is damaged or truncated \(JSONDecodeError: "),
        ("wide", "test_vit.r160_in1k", r"could not load weights for model 'test_vit\.r160_in1k': the Hugging Face cache's "
                                       r"file '.*wide/hub/.*model\.safetensors' does not match the model: \d+ of its \d+ "
                                       r"tensors have other shapes .*; it comes from the Hugging Face cache"),
        ("empty", f"hf-hub:{repo}", r"model 'hf-hub:timm/test_vit\.r160_in1k': HF_HUB_OFFLINE=1 and the Hugging Face cache "
                                    r".*empty/hub/models--timm--test_vit\.r160_in1k \(timm/test_vit\.r160_in1k\) holds no "
                                    r"complete copy of its files"),
    ]:
        rc, out = _create_offline(tmp_path / home, name)
        last = out.strip().splitlines()[-1]
        assert rc == 1 and re.search(expected, last) and len(last) < 1200, (home, out[-2000:])
        assert "check your connection" not in last
    # timm loads hub weights non-strictly for a head of another size: with num_classes 0 (every config's) another
    # architecture's file loaded its matching tensors and left the rest (cls_token, norm) random, without a word
    other = timm.create_model("test_vit2", img_size=IMG)
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    _hub_cache(tmp_path / "other", repo, {"model.safetensors": (tmp_path / "other.safetensors").read_bytes()})
    rc, out = _create_offline(tmp_path / "other", "test_vit.r160_in1k", num_classes=0)
    assert rc == 1 and "could not load weights for model 'test_vit.r160_in1k': the Hugging Face cache's file" in out, out[-2000:]
    rc, out = _create_offline(tmp_path / "good", "test_vit.r160_in1k", num_classes=0)  # its own file: the head dropped
    assert rc == 0 and float(out.split("SUM ")[1].split()[0]) == pytest.approx(float(state["cls_token"].sum()), abs=1e-6)


def test_a_subnet_file_given_as_the_full_models_weights_names_load_subnet(tmp_path):
    # "63 of its 174 tensors have other shapes": it did not say the file is a subnet, nor how to load one
    from snapvit_lightning.elastic import ElasticViT
    from snapvit_lightning.scores import ImportanceScores
    from snapvit_lightning.weights_io import load_weights

    model = timm.create_model("test_vit", img_size=IMG)
    elastic = ElasticViT(model, ImportanceScores(torch.rand(6, 192), torch.rand(6, 2)), model_name="test_vit")
    elastic.save_subnet(tmp_path / "sub.safetensors", elastic.subnet(0.5, 0.5))
    with pytest.raises(ValueError, match=r"checkpoint_path '.*sub\.safetensors' is a subnet file \(a model cut to a "
                                         r"budget.*load it with snapvit_lightning\.load_subnet\(path\)"):
        load_weights(timm.create_model("test_vit", img_size=IMG), tmp_path / "sub.safetensors")
    elastic.save(tmp_path / "e.elastic.safetensors")  # an elastic file's dense model still loads as weights
    load_weights(timm.create_model("test_vit", img_size=IMG), tmp_path / "e.elastic.safetensors")


def test_the_weights_source_is_recorded_with_its_file_and_digest(tiny_weights, tmp_path):
    # nothing recorded which file, cached hub snapshot or local folder the scored weights came from
    import hashlib

    path, state = tiny_weights
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    module = SnapViTModule("test_vit", checkpoint_path=path, model_kwargs={"img_size": IMG})
    assert module.weights_source == {  # the file's name: the folders of the machine that built it are not shared
        "model": "test_vit", "pretrained": False, "file": path.name, "sha256": digest, "hub_revision": None}
    overlaid = SnapViTModule("test_vit", pretrained=True, model_kwargs=overlay(path))
    assert overlaid.weights_source["sha256"] == digest
    # the overlay's file path is not kept in what rebuilds the model (a checkpoint and its subnets are shared)
    from snapvit_lightning.elastic import ElasticViT
    from snapvit_lightning.export import _rebuild_info
    from snapvit_lightning.scores import ImportanceScores

    name, kwargs = _rebuild_info(overlaid, None, None)
    elastic = ElasticViT(overlaid.student, ImportanceScores(torch.rand(6, 192), torch.rand(6, 2)), model_name=name,
                         model_kwargs=kwargs)
    assert "pretrained_cfg_overlay" not in elastic.model_kwargs and str(path) not in json.dumps(elastic.model_kwargs)
    config = json.dumps({"architecture": "test_vit", "model_args": {"img_size": IMG}, "pretrained_cfg": {}}).encode()
    _hub_cache(tmp_path / "home", "timm/test_vit.r160_in1k", {"model.safetensors": path.read_bytes(), "config.json": config})
    code = ("from snapvit_lightning.module import SnapViTModule\n"
            "print('SOURCE', SnapViTModule('hf-hub:timm/test_vit.r160_in1k', pretrained=True).weights_source)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"})
    hub = ast.literal_eval(proc.stdout.split("SOURCE ", 1)[1].strip())
    assert hub["sha256"] == digest and hub["hub_revision"] == "0123456789abcdef0123456789abcdef01234567", proc.stderr
    assert hub["file"] == "model.safetensors"
    assert SnapViTModule(timm.create_model("test_vit", img_size=IMG)).weights_source is None  # an instance: nothing known
    with pytest.warns(UserWarning, match="scoring random weights"):
        assert SnapViTModule("test_vit", model_kwargs={"img_size": IMG}).weights_source["file"] is None  # the name only


def test_weights_at_a_url_that_cannot_be_read_are_one_line(monkeypatch):
    # a model whose pretrained weights are at a URL only (no hub copy), offline: urllib's two tracebacks
    import urllib.error

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", unreachable)
    overlay_url = {"img_size": IMG, "pretrained_cfg_overlay": {"hf_hub_id": "", "url": "https://example.invalid/w.pth"}}
    with pytest.raises(ValueError, match=r"pretrained=True: the weights of model 'test_vit' are at a URL that could not "
                                         r"be read \(\[Errno -2\] Name or service not known\); give local weights"):
        create_timm_model("test_vit", True, overlay_url)


def test_another_in_chans_keeps_timms_adapted_patch_embedding(tiny_weights, tmp_path):
    # the strict loader refused hub weights for in_chans=1 ("patch_embed.proj.weight: file [64, 3, 16, 16]"),
    # which timm's loader adapts (adapt_input_conv)
    path, state = tiny_weights
    _hub_cache(tmp_path / "home", "timm/test_vit.r160_in1k", {"model.safetensors": path.read_bytes()})
    # ... through the strict loader: the file recorded, and a file missing tensors refused as for in_chans 3
    missing = {k: v for k, v in state.items() if k != "cls_token"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    _hub_cache(tmp_path / "lacks", "timm/test_vit.r160_in1k", {"model.safetensors": (tmp_path / "missing.safetensors").read_bytes()})
    code = ("from snapvit_lightning.weights_io import LOADED_FILE, create_timm_model\n"
            f"m = create_timm_model('test_vit.r160_in1k', True, {{'img_size': {IMG}, 'in_chans': 1, 'num_classes': 0}})\n"
            "print('SHAPE', list(m.patch_embed.proj.weight.shape), getattr(m, LOADED_FILE).rsplit('/', 1)[1])")
    for home, ok in (("home", True), ("lacks", False)):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HOME": str(tmp_path / home), "HF_HUB_OFFLINE": "1"})
        if ok:
            assert proc.returncode == 0 and "SHAPE [64, 1, 16, 16] model.safetensors" in proc.stdout, proc.stderr[-2000:]
        else:
            assert proc.returncode == 1 and "could not load weights" in proc.stderr and "cls_token" in proc.stderr
