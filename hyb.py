import timm, torch, warnings; warnings.filterwarnings("ignore")
from snapvit_lightning.module import SnapViTModule
from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning import onnx_export
from snapvit_lightning.structure import count_flops
kw = dict(depth=2, embed_dim=64, num_heads=4, img_size=32)
m = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, **kw).eval()
print("patch_embed", type(m.patch_embed).__name__, "img_size", m.patch_embed.img_size)
s = SnapViTModule(m, criterion="magnitude").compute_scores()
ev = ElasticViT(m, s, model_kwargs=kw)
print("flops", count_flops(m)["patch_embed"], "measured total", ev._dense_flops)
from snapvit_lightning.structure import measure_flops
print("measured forward flops", measure_flops(m, torch.randn(1,3,32,32)))
sub = ev.subnet(0.3, 0.2)
for f in [lambda: ev.subnet(0.3, 0.2, correct="lstsq", calibration=torch.randn(16,3,32,32)),
          lambda: onnx_export.checked_onnx(sub),
          lambda: onnx_export.checked_onnx(sub, torch.randn(2,3,32,32))]:
    try: r = f(); print("ok", type(r))
    except Exception as e: print(type(e).__name__, str(e)[:200])
