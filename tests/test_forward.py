"""The shortened CLS forward equals the model's own forward, and its gradients too."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, assert_close_fp32, load_real_model, model_input, tiny_model

from snapvit_lightning.forward import embed, explicit_attention, prefers_explicit_attention, supports_cls_only
from snapvit_lightning.structure import inspect_vit, select_units


def _full(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("key", sorted(TINY_MODELS))
def test_embed_equals_forward(key, one_thread):
    model, _, _ = tiny_model(key)
    x = model_input(model)
    with torch.no_grad():
        torch.testing.assert_close(embed(model, x), _full(model, x), rtol=1e-5, atol=1e-5)


def test_which_models_take_the_short_path():
    expected = {  # token pooling only: avg pool and attention pooling need every token, and the
        # distilled model's own forward_head also reads the distillation token
        "test_vit": True, "test_vit2": False, "test_vit3": False, "test_vit4": False, "swiglu": False,
        "glu": True, "distilled": False, "siglip": False, "registers": True,
    }
    assert {key: supports_cls_only(tiny_model(key)[0]) for key in TINY_MODELS} == expected
    model = tiny_model("test_vit")[0]
    model.blocks[-1].train()  # dropout/drop-path would draw per-token randomness
    assert not supports_cls_only(model)
    assert not supports_cls_only(torch.nn.Linear(2, 2))


def test_embed_on_a_cut_model_and_its_gradients(one_thread):
    """A cut last block (fewer heads and neurons); weight gradients equal the full forward's."""
    model, _, _ = tiny_model("glu")
    blocks = inspect_vit(model).blocks
    select_units(model.blocks[-1], torch.arange(blocks[-1].mlp_hidden // 2), torch.tensor([0, 2]))
    assert supports_cls_only(model)
    x = model_input(model, batch=3)
    grads = []
    for fn in (embed, lambda m, t: _full(m, t)):
        model.zero_grad()
        out = fn(model, x)
        (out.square().sum() + out.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close_fp32(grads[0][name], grads[1][name], msg=name)


def test_embed_on_the_real_model(real_weights):
    model = load_real_model(real_weights)
    assert supports_cls_only(model)
    x = model_input(model, batch=4)
    with torch.inference_mode():
        torch.testing.assert_close(embed(model, x), _full(model, x), rtol=1e-4, atol=1e-4)


def _attention_flags(model: torch.nn.Module) -> list[bool]:
    return [m.fused_attn for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]


def test_explicit_attention_restores_the_flags():
    model = tiny_model("test_vit")[0]
    layers = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    assert len(layers) == len(model.blocks)
    layers[0].fused_attn = False  # a mixed setting comes back as it was
    before = _attention_flags(model)
    with pytest.raises(RuntimeError, match="inside"):
        with explicit_attention(model):
            assert not any(_attention_flags(model))
            raise RuntimeError("inside")
    assert _attention_flags(model) == before


def test_which_forwards_prefer_explicit_attention():
    model = tiny_model("test_vit")[0]
    x = model_input(model)
    assert not prefers_explicit_attention(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert prefers_explicit_attention(model, x)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not prefers_explicit_attention(model, x)
    assert prefers_explicit_attention(model.to(torch.bfloat16), x.bfloat16())
    assert not prefers_explicit_attention(model, x.to("meta"))  # not on CPU: the fused kernels


@pytest.mark.parametrize("key", ["test_vit", "test_vit2"])  # the CLS-only path and the model's own
def test_bf16_embed_takes_the_explicit_path(key, one_thread, monkeypatch):
    model, _, _ = tiny_model(key)
    for m in model.modules():
        if isinstance(getattr(m, "fused_attn", None), bool):
            m.fused_attn = True
    x = model_input(model, batch=3)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        dense = embed(model, x)
        assert len(calls) == len(model.blocks)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            explicit = embed(model, x)
        assert len(calls) == len(model.blocks)  # no fused call under bf16
        with explicit_attention(model):
            explicit_fp32 = embed(model, x)
    assert all(_attention_flags(model))
    torch.testing.assert_close(explicit_fp32, dense, rtol=1e-5, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(explicit.float(), dense, dim=-1)
    assert cos.min() > 0.99
