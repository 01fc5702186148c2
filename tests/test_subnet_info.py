"""What `snapvit info` says about a subnet file."""

from __future__ import annotations

from conftest import random_scores, tiny_model

from snapvit_lightning.checkpoint import read_metadata
from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.subnet_info import describe_subnet, head_split


def test_a_budget_saved_from_python_is_shown_as_given(tmp_path) -> None:
    # it printed "cut from None: mlp_ratio None, head_ratio None, correction None"
    model, name, kwargs = tiny_model("test_vit")
    elastic = ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs)
    sub = elastic.subnet(flops=0.6)
    a, h = elastic.resolve_budget(flops=0.6)
    cut = (f"cut from an elastic model (asked: flops 0.6): mlp_ratio {a:.4f}, head_ratio {h:.4f} (heads pruned at the "
           "neurons' ratio, down to every block's minimum), correction none")
    plain = elastic.slice(elastic.dims(a, h))  # not subnet()'s: nothing says how it was cut
    for i, (module, budget, expected) in enumerate((
        (plain, {"flops": 0.6}, ["budget (as saved): flops 0.6000"]),
        (sub, None, [cut]),  # subnet() records its cut (it recorded nothing)
        # a budget of the user's adds to the cut (it replaced it: the ratios and correction were lost)
        (sub, {"finetuned": "distilled"}, [cut, "budget (as saved): finetuned distilled"]),
        (plain, None, []),
    )):
        path = tmp_path / f"{i}.safetensors"
        elastic.save_subnet(path, module, budget=budget)
        lines = describe_subnet(str(path), read_metadata(path))
        assert lines[0].startswith(f"{path}: subnet of {name}, block dims [heads, neurons] ")
        assert lines[2:] == expected
        assert not any("None" in text for text in lines)


def test_a_compiled_subnet_is_saved_as_the_model_it_compiled(tmp_path) -> None:
    # it was refused: "model torch._dynamo.eval_frame.OptimizedModule is not a timm VisionTransformer"
    import torch

    from snapvit_lightning.checkpoint import load_subnet

    model, name, kwargs = tiny_model("test_vit")
    elastic = ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs)
    sub = elastic.subnet(flops=0.6)
    elastic.save_subnet(tmp_path / "s.safetensors", torch.compile(sub))
    loaded = load_subnet(tmp_path / "s.safetensors")
    assert loaded.state_dict().keys() == sub.state_dict().keys()
    assert all(torch.equal(v, sub.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert loaded.snapvit_cut == sub.snapvit_cut


def test_head_split_in_words() -> None:
    assert head_split(None) == "" and head_split(1.0) == " (heads pruned at the neurons' ratio, down to every block's minimum)"
    assert head_split(0.25, 0.75) == (" (heads pruned at 0.25 x the neurons' ratio until 0.75 of the neurons go, then both "
                                      "to every block's minimum)")


def test_a_loaded_subnet_saved_again_keeps_its_cut(tmp_path) -> None:
    # load_subnet dropped the record: a deployer who fine-tuned a loaded subnet and saved it lost what the cut was
    import torch

    from snapvit_lightning.checkpoint import load_subnet

    model, name, kwargs = tiny_model("test_vit")
    elastic = ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs)
    first, again, plain = tmp_path / "first.safetensors", tmp_path / "again.safetensors", tmp_path / "plain.safetensors"
    elastic.save_subnet(first, elastic.subnet(flops=0.6))
    loaded = load_subnet(first)
    with torch.no_grad():
        loaded.blocks[0].mlp.fc2.weight.add_(1.0)  # fine-tuned: the cut is the same, the weights are not
    elastic.save_subnet(again, loaded)
    assert read_metadata(again)["budget"] == read_metadata(first)["budget"]
    assert read_metadata(first)["budget"]["requested"] == {"flops": 0.6}
    elastic.save_subnet(plain, elastic.slice(elastic.dims(0.3, 0.2)))  # recorded nothing: loads with nothing
    assert not hasattr(load_subnet(plain), "snapvit_cut")
