"""Backbone registry: shapes, normalisation, RGB->gray weight folding, export/load round trip."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from xray_images import unit_pixels

from xrayfm.models import create_backbone, export_backbone, list_backbones, load_backbone
from xrayfm.models.backbones import equalize, read_state_dict
from xrayfm.ssl import PretrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def real_xray(size: int) -> torch.Tensor:
    """The pydicom-data ankle radiograph RG3 as a (1, 1, size, size) tensor in [0, 1]."""
    cv2 = pytest.importorskip("cv2")
    arr = cv2.resize(unit_pixels("RG3_UNCR.dcm", as_displayed=False), (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.clip(arr, 0, 1))[None, None]


def test_registry_lists_the_seven_backbones() -> None:
    expected = {"vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16", "vit_small_patch8",
                "vit_tiny_patch8", "resnet18", "resnet50"}
    assert expected <= set(list_backbones())
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("vit_huge_nonsense")


@pytest.mark.parametrize("size", [(64, 64), (32, 48), (96, 96)])
def test_vit_pooled_and_dense_shapes_any_size(size: tuple[int, int]) -> None:
    bb = create_backbone("vit_tiny_patch16", img_size=64).eval()
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        pooled = bb(x)
        dense = bb.forward_dense(x)
    assert pooled.shape == (2, bb.embed_dim) == (2, 192)
    assert len(dense) == len(bb.dense_channels) == len(bb.dense_strides) == 4
    for fmap, c, s in zip(dense, bb.dense_channels, bb.dense_strides):
        assert fmap.shape == (2, c, size[0] // s, size[1] // s)
    assert bb.dense_indices == [2, 5, 8, 11]
    assert torch.isfinite(pooled).all()


def test_registry_timm_kwargs_reach_the_model() -> None:
    # vit_tiny_patch8 is timm's vit_tiny_patch16_224 built with patch_size=8: 64 tokens at 64 px
    bb = create_backbone("vit_tiny_patch8", img_size=64).eval()
    with torch.no_grad():
        dense = bb.forward_dense(torch.rand(1, 1, 64, 64))
    assert bb.patch_size == 8 and bb.embed_dim == 192
    assert dense[-1].shape == (1, 192, 8, 8)
    assert bb.model.pos_embed.shape == (1, 1 + 64, 192)


def test_vit_rejects_bad_input() -> None:
    bb = create_backbone("vit_tiny_patch16", img_size=64)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        bb(torch.rand(1, 1, 40, 64))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        bb(torch.rand(1, 3, 64, 64))


def test_resnet_pooled_and_dense_shapes() -> None:
    bb = create_backbone("resnet18").eval()
    x = torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        pooled = bb(x)
        dense = bb.forward_dense(x)
    assert pooled.shape == (2, 512)
    assert bb.dense_strides == [4, 8, 16, 32] and bb.dense_channels == [64, 128, 256, 512]
    for fmap, c, s in zip(dense, bb.dense_channels, bb.dense_strides):
        assert fmap.shape == (2, c, 64 // s, 96 // s)


def test_normalisation_is_inside_the_model() -> None:
    bb = create_backbone("resnet18").eval()
    x = real_xray(64)
    with torch.no_grad():
        direct = bb.model((x - 0.5) / 0.25)
        assert torch.allclose(bb(x), direct, atol=1e-6)


@pytest.mark.parametrize("arch,timm_name,prefix", [
    ("vit_tiny_patch16", "vit_tiny_patch16_224", "module.backbone."),
    ("resnet18", "resnet18", "teacher."),
])
def test_rgb_weights_fold_to_gray_exactly(tmp_path: Path, arch: str, timm_name: str, prefix: str) -> None:
    """Folded 1-channel weights on a gray image == the RGB model on that image replicated 3x."""
    torch.manual_seed(0)
    kwargs = {"img_size": 224} if arch.startswith("vit") else {}
    rgb = timm.create_model(timm_name, pretrained=False, in_chans=3, num_classes=10, **kwargs).eval()
    ckpt = tmp_path / "rgb.pth"
    torch.save({"teacher": {prefix + k: v for k, v in rgb.state_dict().items()}}, ckpt)
    gray = create_backbone(arch, img_size=112 if arch.startswith("vit") else 224,
                           pretrained_path=str(ckpt)).eval()
    x = real_xray(112)
    with torch.no_grad():
        ours = gray(x)
        ref_in = ((x - 0.5) / 0.25).repeat(1, 3, 1, 1)
        if arch.startswith("vit"):
            rgb.set_input_size(img_size=112)  # same bicubic pos-embed resize as our loader
            ref = rgb.forward_features(ref_in)[:, 0]
        else:
            ref = rgb.forward_head(rgb.forward_features(ref_in), pre_logits=True)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def test_load_pretrained_reports_mismatch(tmp_path: Path) -> None:
    other = timm.create_model("resnet50", pretrained=False, in_chans=3, num_classes=0)
    ckpt = tmp_path / "r50.pth"
    torch.save(other.state_dict(), ckpt)
    with pytest.raises(ValueError, match="do not fit backbone resnet18"):
        create_backbone("resnet18", pretrained_path=str(ckpt))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_backbone("resnet18", pretrained_path=str(tmp_path / "nope.pth"))
    torch.save({"args": argparse.Namespace(lr=1.0), "teacher": other.state_dict()}, tmp_path / "full.pth")
    with pytest.raises(ValueError, match="state dict alone"):
        create_backbone("resnet50", pretrained_path=str(tmp_path / "full.pth"))


def test_safetensors_weights_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = create_backbone("vit_tiny_patch16", img_size=64)
    save_file({"backbone." + k: v.contiguous() for k, v in src.model.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    assert "cls_token" in {k.split(".", 1)[1] for k in read_state_dict(tmp_path / "w.safetensors")}
    dst = create_backbone("vit_tiny_patch16", img_size=64, pretrained_path=str(tmp_path / "w.safetensors"))
    x = real_xray(64)
    with torch.no_grad():
        assert torch.equal(src.eval()(x), dst.eval()(x))


def test_export_then_load_backbone_gives_same_outputs(tmp_path: Path) -> None:
    bb = create_backbone("vit_tiny_patch16", img_size=64).eval()
    export_backbone(bb, tmp_path / "bundle", img_size=64, extra={"method": "dino"})
    card = json.loads((tmp_path / "bundle" / "model_card.json").read_text())
    assert card["in_chans"] == 1 and card["arch"] == "vit_tiny_patch16" and card["patch_size"] == 16
    loaded, card2 = load_backbone(str(tmp_path / "bundle"))
    assert card2["method"] == "dino" and card2["embed_dim"] == 192
    x = real_xray(64)
    with torch.no_grad():
        assert torch.equal(bb(x), loaded(x))
        for a, b in zip(bb.forward_dense(x), loaded.forward_dense(x)):
            assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="model_card.json"):
        load_backbone(str(tmp_path))
    # a bundle / run folder is also a valid --init: continue pretraining from it
    again = create_backbone("vit_tiny_patch16", img_size=64, pretrained_path=str(tmp_path / "bundle")).eval()
    with torch.no_grad():
        assert torch.equal(bb(x), again(x))


def test_equalize_maps_each_image_to_its_intensity_ranks() -> None:
    x = real_xray(64)
    y = equalize(x)
    assert abs(float(y.mean())) < 1e-5 and 0.8 < float(y.var(unbiased=False)) <= 1.0  # ties lower the variance
    assert abs(float(equalize(torch.rand(1, 1, 64, 64)).var(unbiased=False)) - 1) < 0.01
    # any increasing intensity map (window/level, gamma, contrast) leaves the ranks in place, up to
    # the 4096-bin quantisation merging neighbouring values that the map compresses
    for mapped in (0.4 * x + 0.3, x**0.6, torch.sigmoid(8 * (x - 0.5))):
        assert (equalize(mapped) - y).abs().mean() < 0.02
        assert ((mapped - x) / 0.25).abs().mean() > 0.15  # what the fixed normalisation sees
    # ties share one value (flat collimator borders do not become ramps); a flat image maps to 0
    z = x.clone()
    z[..., :, :10] = 0.0
    ez = equalize(z)
    assert torch.unique(ez[..., :, :10]).numel() == 1
    assert torch.equal(equalize(torch.full((2, 1, 16, 16), 0.7)), torch.zeros(2, 1, 16, 16))
    # the order of pixels is what counts: brighter stays brighter
    flat, eflat = x.flatten(), y.flatten()
    i, j = flat.argmin(), flat.argmax()
    assert eflat[i] < 0 < eflat[j]


@pytest.mark.parametrize("arch", ["vit_tiny_patch16", "resnet18"])
def test_equalize_backbone_ignores_window_and_gamma_and_round_trips(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    bb = create_backbone(arch, img_size=64, input_norm="equalize").eval()
    fixed = create_backbone(arch, img_size=64).eval()
    fixed.load_state_dict(bb.state_dict())
    x = real_xray(64)
    windowed = (0.5 * x + 0.2) ** 0.8
    with torch.no_grad():
        cos_eq = torch.cosine_similarity(bb(x), bb(windowed)).item()
        cos_fixed = torch.cosine_similarity(fixed(x), fixed(windowed)).item()
    assert cos_eq > 0.99 and cos_eq > cos_fixed
    export_backbone(bb, tmp_path / "eq", img_size=64)
    loaded, card = load_backbone(str(tmp_path / "eq"))
    assert card["input_norm"] == "equalize" and loaded.input_norm == "equalize"
    with torch.no_grad():
        assert torch.equal(bb(x), loaded(x))
    with pytest.raises(ValueError, match="input_norm must be one of fixed, equalize"):
        create_backbone(arch, input_norm="zscore")
    with pytest.raises(ValueError, match="input_norm"):
        PretrainConfig(input_norm="zscore").validate()


def test_vit_under_cpu_autocast_keeps_attention_fp32_and_matches() -> None:
    """bf16 autocast: projections in bf16, attention core in fp32; result close to fp32."""
    bb = create_backbone("vit_tiny_patch16", img_size=64).eval()
    x = real_xray(64)
    seen: list[torch.dtype] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(q.dtype)
        return sdpa(q, *args, **kwargs)

    qkv_dtypes: list[torch.dtype] = []
    bb.model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: qkv_dtypes.append(o.dtype))
    with torch.no_grad():
        ref = bb(x)
        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = bb(x)
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
    assert seen and set(seen) == {torch.float32}
    assert qkv_dtypes == [torch.float32, torch.bfloat16]
    cos = torch.nn.functional.cosine_similarity(low.float(), ref).item()
    assert cos > 0.99, cos


@pytest.mark.parametrize("arch", ["vit_tiny_patch16", "resnet18"])
def test_pooled_embeddings(arch: str) -> None:
    from xrayfm.models.backbones import pool_levels

    torch.manual_seed(0)
    bb = create_backbone(arch, img_size=64).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(bb.forward_pooled(x, "final"), bb(x))
        levels = bb.forward_pooled(x, "multilevel")
        dense = bb.forward_dense(x)
    assert levels.shape == (2, sum(bb.dense_channels))
    torch.testing.assert_close(levels[:, -bb.dense_channels[-1]:], dense[-1].mean(dim=(2, 3)))
    torch.testing.assert_close(levels, pool_levels(dense))
    assert bb.resolve_pool("auto") == ("multilevel" if arch == "resnet18" else "final")
    with pytest.raises(ValueError, match="pool must be one of final, multilevel"):
        bb.forward_pooled(x, "max")


def test_runtime_device_and_precision() -> None:
    from xrayfm.config import ConfigError
    from xrayfm.models.runtime import module_device, resolve_bf16, resolve_device, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else cpu)
    assert resolve_device("cpu") == cpu
    with pytest.raises(ConfigError, match="device 'npu0' is not a torch device"):
        resolve_device("npu0")
    with pytest.raises(ConfigError, match="device 'meta' is not supported"):
        resolve_device("meta")
    assert module_device(torch.nn.Linear(2, 2)) == cpu and module_device(torch.nn.ReLU()) == cpu
    assert resolve_precision("fp32", cpu) is None
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ConfigError, match="precision must be one of auto, bf16, fp16, fp32, got 'int8'"):
        resolve_precision("int8", cpu)
    fast = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if fast else None)
    assert resolve_bf16("fp32", cpu) is None and resolve_bf16("auto", cpu) == (torch.bfloat16 if fast else None)
    with pytest.raises(ConfigError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        resolve_bf16("fp16", cpu)
