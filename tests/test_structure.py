from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from timm.layers import Attention, LayerNorm
from timm.models.vision_transformer import VisionTransformer

from snapvit_lightning.structure import (
    BlockDims,
    UnsupportedModelError,
    block_dims,
    check_supported,
    count_flops,
    count_params,
    get_blocks,
    inspect_vit,
    measure_flops,
    mlp_input_layers,
    permute_block,
    select_units,
    slice_block,
    slice_model,
)

from conftest import TINY_MODELS, model_input, tiny_model


def _norm_model() -> VisionTransformer:
    """A ViT with q/k norm, scale_norm on attention and MLP, and gated attention."""
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
        qkv_bias=True, qk_norm=True, scale_attn_norm=True, scale_mlp_norm=True, num_classes=5,
    )
    for block in model.blocks:
        old = block.attn
        block.attn = Attention(32, num_heads=4, qkv_bias=True, qk_norm=True, scale_norm=True,
                               gated=True, norm_layer=LayerNorm)
        block.attn.load_state_dict(old.state_dict(), strict=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


ALL_KEYS = list(TINY_MODELS)


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_inspect_reports_features() -> None:
    s = inspect_vit(tiny_model("distilled")[0])
    assert s.has_dist_token and s.num_prefix_tokens == 2 and s.mlp_kind == "mlp"
    s = inspect_vit(tiny_model("registers")[0])
    assert s.num_reg_tokens == 4 and s.num_prefix_tokens == 5 and s.layer_scale
    s = inspect_vit(tiny_model("siglip")[0])
    assert s.attn_pool and not s.has_class_token
    assert inspect_vit(tiny_model("swiglu")[0]).mlp_kind == "swiglu"
    s = inspect_vit(tiny_model("glu")[0])
    assert s.mlp_kind == "glu" and s.blocks[0].mlp_hidden == 256
    s = inspect_vit(_norm_model())
    assert s.qk_norm and s.scale_norm and s.mlp_norm and s.gated_attention
    assert s.num_blocks == 2 and s.blocks[0] == BlockDims(num_heads=4, mlp_hidden=64) and s.head_dim == 8


@pytest.mark.parametrize("key", ALL_KEYS + ["norms"])
def test_permutation_leaves_output_unchanged(key: str) -> None:
    model = _norm_model() if key == "norms" else tiny_model(key)[0]
    x = model_input(model)
    dense = _forward(model, x)
    g = torch.Generator().manual_seed(3)
    for block in get_blocks(model):
        d = block_dims(block)
        permute_block(block, torch.randperm(d.mlp_hidden, generator=g), torch.randperm(d.num_heads, generator=g))
    torch.testing.assert_close(_forward(model, x), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", ALL_KEYS)
def test_slicing_equals_masking(key: str) -> None:
    model, _, _ = tiny_model(key)
    x = model_input(model)
    masked = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    for i, (block, mblock) in enumerate(zip(get_blocks(model), get_blocks(masked))):
        d = block_dims(block)
        keep_h = max(1, d.num_heads - 1 - i % 2) if i % 3 else 0  # some blocks keep zero heads
        keep_m = [d.mlp_hidden // 3, 1, 0][i % 3]
        mlp_idx = torch.randperm(d.mlp_hidden, generator=g)
        head_idx = torch.randperm(d.num_heads, generator=g)
        with torch.no_grad():  # masking: zero what consumes the removed units' outputs
            mblock.mlp.fc2.weight[:, mlp_idx[keep_m:]] = 0
            hd = mblock.attn.head_dim
            for h in head_idx[keep_h:].tolist():
                mblock.attn.proj.weight[:, h * hd:(h + 1) * hd] = 0
        select_units(block, mlp_idx[:keep_m], head_idx[:keep_h])
        assert block_dims(block) == BlockDims(keep_h, keep_m)
        assert block.attn.attn_dim == keep_h * block.attn.head_dim
        assert block.attn.qkv.out_features == 3 * keep_h * block.attn.head_dim
        assert block.attn.proj.in_features == keep_h * block.attn.head_dim
        for layer in mlp_input_layers(block):
            assert layer.weight.shape[0] == layer.out_features
    torch.testing.assert_close(_forward(model, x), _forward(masked, x), atol=1e-5, rtol=1e-5)


def test_slicing_keeps_head_dim_scale_and_gate() -> None:
    model = _norm_model()
    attn = model.blocks[0].attn
    head_dim, scale = attn.head_dim, attn.scale
    slice_block(model.blocks[0], 2, 10)
    assert (attn.head_dim, attn.scale, attn.num_heads) == (head_dim, scale, 2)
    assert attn.gate.out_features == 16 and attn.norm.normalized_shape == (16,)
    assert model.blocks[0].mlp.norm.normalized_shape == (10,)
    assert torch.isfinite(_forward(model, model_input(model))).all()


def test_norm_over_units_requires_one_unit() -> None:
    model = _norm_model()
    with pytest.raises(ValueError, match="needs >= 1"):
        slice_block(model.blocks[0], 0, 10)
    with pytest.raises(ValueError, match="needs >= 1"):
        slice_block(model.blocks[0], 2, 0)


def test_ratio_zero_slice_is_identity() -> None:
    model, _, _ = tiny_model("test_vit2")
    x = model_input(model)
    dense = _forward(model, x)
    slice_model(model, [block_dims(b) for b in get_blocks(model)])
    torch.testing.assert_close(_forward(model, x), dense, atol=0, rtol=0)


@pytest.mark.parametrize("key", ALL_KEYS + ["norms"])
def test_flops_and_params_match_measurement(key: str) -> None:
    model = _norm_model() if key == "norms" else tiny_model(key)[0]
    x = model_input(model, batch=1)
    assert count_flops(model)["total"] == measure_flops(model, x)
    assert count_params(model)["total"] == sum(p.numel() for p in model.parameters())
    # Non-uniform blocks: predicted before slicing, measured after.
    dims = [BlockDims(max(1, d.num_heads - 1 - i % 2), max(1, d.mlp_hidden // (i + 2)))
            for i, d in enumerate(map(block_dims, get_blocks(model)))]
    predicted_flops = count_flops(model, dims=dims)
    predicted_params = count_params(model, dims=dims)
    slice_model(model, dims)
    assert predicted_flops["total"] == measure_flops(model, x)
    assert predicted_params["total"] == sum(p.numel() for p in model.parameters())
    for block, f in zip(get_blocks(model), predicted_flops["blocks"]):
        tokens = torch.randn(1, predicted_flops["tokens"], model.embed_dim)
        assert f == measure_flops(block, tokens)


def test_flops_at_other_input_size() -> None:
    model = timm.create_model("test_vit", pretrained=False, dynamic_img_size=True).eval()
    x = torch.randn(1, 3, 96, 128)
    assert count_flops(model, img_size=(96, 128))["total"] == measure_flops(model, x)
    fixed = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1, img_size=64)
    with pytest.raises(ValueError, match="img_size"):
        count_flops(fixed, img_size=96)


def test_refuses_unsupported_models() -> None:
    with pytest.raises(UnsupportedModelError, match="not a timm VisionTransformer"):
        check_supported(timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1, img_size=28))
    dinov3 = timm.create_model("vit_small_patch16_dinov3", pretrained=False, depth=1, embed_dim=64, num_heads=2, img_size=32)
    with pytest.raises(UnsupportedModelError, match=r"Eva is not a .*RoPE ViTs such as DINOv3"):  # a vit_ name, an Eva
        check_supported(dinov3)
    with pytest.raises(UnsupportedModelError, match=r"Beit is not a .*BEiT v1/v2"):
        check_supported(timm.create_model("beit_base_patch16_224", pretrained=False, depth=1, embed_dim=64, num_heads=2, img_size=32))
    with pytest.raises(UnsupportedModelError, match="not a timm VisionTransformer"):
        check_supported(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match=r"an nn.Module\), got str: build it with timm.create_model"):
        check_supported("test_vit")
    elastic_like = type("ElasticViT", (), {"model": torch.nn.Linear(2, 2)})()
    with pytest.raises(UnsupportedModelError, match=r"an nn.Module\), got ElasticViT: pass its .model"):
        check_supported(elastic_like)
    parallel = timm.create_model("vit_small_patch16_18x2_224", pretrained=False, depth=1, img_size=32)
    with pytest.raises(UnsupportedModelError, match="block 0 is .*ParallelThingsBlock"):
        check_supported(parallel)
    model = timm.create_model("test_vit", pretrained=False)
    model.blocks[1].mlp = timm.layers.GatedMlp(64, 128)
    with pytest.raises(UnsupportedModelError, match="MLP .*GatedMlp is not supported"):
        check_supported(model)
    model = timm.create_model("test_vit", pretrained=False)
    model.blocks[0].attn = timm.layers.AttentionRope(64, num_heads=2)
    with pytest.raises(UnsupportedModelError, match="attention .*AttentionRope is not supported"):
        inspect_vit(model)
    hybrid = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, depth=2, embed_dim=64, num_heads=4, img_size=32)
    with pytest.raises(UnsupportedModelError, match="patch embedding .*HybridEmbed is not timm's PatchEmbed"):
        check_supported(hybrid)  # its input is the CNN stem's: calibration, ONNX and FLOPs would be wrong
    with pytest.raises(UnsupportedModelError, match="global_pool='' .*not one embedding per image"):
        check_supported(timm.create_model("test_vit", pretrained=False, global_pool=""))


def test_naflex_is_refused() -> None:
    naflex = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(UnsupportedModelError, match="NaFlexVit"):
        check_supported(naflex)


@pytest.mark.parametrize(
    ("heads", "neurons", "match"),
    [(3, 5, "num_heads must be an int in \\[0, 2\\]"), (1, 193, "mlp_hidden must be an int in \\[0, 192\\]"),
     (-1, 5, "num_heads"), (1.5, 5, "num_heads")],
)
def test_slice_block_bad_counts(heads: object, neurons: object, match: str) -> None:
    block = timm.create_model("test_vit", pretrained=False).blocks[0]
    with pytest.raises(ValueError, match=match):
        slice_block(block, heads, neurons)
    assert block_dims(block) == BlockDims(2, 192)  # nothing changed


def test_bad_indices_and_orders() -> None:
    block = timm.create_model("test_vit", pretrained=False).blocks[0]
    with pytest.raises(ValueError, match="mlp_index indices must lie in"):
        select_units(block, mlp_index=[0, 192])
    with pytest.raises(ValueError, match="must be unique"):
        select_units(block, head_index=[1, 1])
    with pytest.raises(ValueError, match="head_order must be a permutation of 2"):
        permute_block(block, head_order=[0])
    with pytest.raises(ValueError, match="dims has 1 entries"):
        slice_model(timm.create_model("test_vit", pretrained=False), [BlockDims(1, 1)])


def test_input_sizes_follow_timms_patch_embedding() -> None:
    from snapvit_lightning.structure import check_model_images

    dynamic = timm.create_model("test_vit", pretrained=False, num_classes=0)  # dynamic size, 16 px patches
    for size in ((32, 48), (16, 16)):
        dynamic(check_model_images(dynamic, torch.randn(1, 3, *size), "images"))  # runs
    with pytest.raises(ValueError, match=r"images: 40 x 32 px images do not cut into this model's 16 x 16 px patches; "
                                         r"give a size that is a multiple of 16 \(e.g. 32 or 48\)"):
        check_model_images(dynamic, torch.randn(1, 3, 40, 32), "images")
    with pytest.raises(AssertionError, match="should be divisible by patch size"):
        dynamic(torch.randn(1, 3, 40, 32))  # what the check spares the user
    padded = timm.create_model("test_vit", pretrained=False, num_classes=0, dynamic_img_pad=True)
    padded(check_model_images(padded, torch.randn(1, 3, 40, 32), "images"))  # pads: any size


def test_a_padding_model_without_dynamic_size_must_be_built_at_whole_patches() -> None:
    # It passed the checks and failed in the scoring's first forward: 7 x 7 padded patches, 6 x 6 position embeddings.
    kwargs = dict(depth=1, embed_dim=32, num_heads=2, num_classes=0, dynamic_img_pad=True)
    fixed = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=100, **kwargs)
    with pytest.raises(RuntimeError, match="must match"):
        fixed(torch.randn(1, 3, 100, 100))  # what the check spares the user
    with pytest.raises(UnsupportedModelError, match=r"^model img_size=100: 100 x 100 px images are padded to whole 16 x "
                                                    r"16 px patches \(dynamic_img_pad\), more than this ViT's 6 x 6 position "
                                                    r"embeddings \(no dynamic_img_size\), so timm's own forward fails; build "
                                                    r"it with dynamic_img_size=True, or at a multiple of 16 \(e\.g\. 96 or "
                                                    r"112\)$"):
        check_supported(fixed)
    for ok in (dict(img_size=96), dict(img_size=100, dynamic_img_size=True)):
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs, **ok)
        check_supported(model)
        model(torch.randn(1, 3, *model.patch_embed.img_size))


def test_a_dynamic_size_model_that_cannot_take_its_own_size_is_refused() -> None:
    # Built at 56 px with 16 px patches, it ran until its latency or ONNX export fed it 56 px images (timm's assertion).
    kwargs = dict(depth=1, embed_dim=32, num_heads=2, num_classes=0, img_size=56)
    with pytest.raises(UnsupportedModelError, match=r"^model img_size=56: 56 x 56 px images do not cut into this model's "
                                                    r"16 x 16 px patches; .* \(e\.g\. 48 or 64\); a model with "
                                                    r"dynamic_img_size=True must take its own img_size"):
        check_supported(timm.create_model("vit_small_patch16_224", pretrained=False, dynamic_img_size=True, **kwargs))
    check_supported(timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs))  # fixed size: timm floors
    check_supported(timm.create_model("vit_small_patch16_224", pretrained=False, dynamic_img_size=True,
                                      dynamic_img_pad=True, **kwargs))  # pads


@pytest.mark.parametrize("dims, error", [((1.5, 100), TypeError), ((1, 100.7), TypeError), ((True, 1), TypeError),
                                         (("1", 100), TypeError), ((-1, 3), ValueError)])
def test_block_dims_refuse_what_no_block_has(dims, error):
    # slice() cut 1.5 heads down to 1 while cost() counted 1.5: they disagreed without a word
    with pytest.raises(error, match="BlockDims.(num_heads|mlp_hidden) must be"):
        BlockDims(*dims)
    assert BlockDims(np.int64(2), torch.tensor(5)) == BlockDims(2, 5)  # numpy and 0-d tensor counts are taken


def test_flops_are_counted_under_inference_mode_too() -> None:
    # FlopCounterMode's module tracker failed there ("'NoneType' object has no attribute 'next_functions'")
    model = timm.create_model("test_vit", pretrained=False).eval()
    with torch.inference_mode():
        inside = count_flops(model)["total"]
    assert inside == count_flops(model)["total"] > 0
