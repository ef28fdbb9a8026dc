"""Tests of the encoder presets: full-size recipes on the meta device, scaled-down recipes
through the embed step, published weight layouts loaded offline, ``stevs encoders``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from stevs.cli import main
from stevs.embed import embed_patches, embedding_key
from stevs.errors import StevsInputError
from stevs.models import BackboneSpec, ImageBackbone, get_preset
from stevs.models.presets import ENCODERS, PRESETS, scaled_down

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- helpers


def tiny(spec: BackboneSpec, width: int = 32) -> BackboneSpec:
    """The same timm class and options at a tiny depth and width, random weights."""
    return scaled_down(spec, width)


def on_meta(spec: BackboneSpec) -> ImageBackbone:
    """The full-size backbone on the meta device (no memory; timm's ViT weight init, which
    means nothing there, skipped)."""
    spec = replace(spec, weights="none")
    if spec.pooling != "stages":
        spec = replace(spec, timm_kwargs={**spec.timm_kwargs, "weight_init": "skip"})
    with torch.device("meta"):
        return ImageBackbone(spec)


def tiny_dim(spec: BackboneSpec, width: int = 32) -> int:
    return {"cls": width, "mean": width, "cls+mean": 2 * width, "conch_attn": 16}[spec.pooling]


def patches(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def embed(backbone: ImageBackbone, images: np.ndarray) -> np.ndarray:
    return embed_patches(backbone.eval(), images, batch_size=3, progress=False)


def hf_cache(root: Path, repo: str, filename: str, state: dict) -> None:
    """A Hugging Face hub cache holding ``repo``'s ``filename`` (the layout hf_hub_download
    reads offline: refs/main -> snapshots/<commit>/<file>)."""
    commit = "0" * 40
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    path = folder / "snapshots" / commit / filename
    if filename.endswith(".safetensors"):
        save_file(state, str(path))
    else:  # pytorch_model.bin: a torch checkpoint of plain tensors
        torch.save(state, path)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_full_size_on_meta_with_its_published_width(name):
    preset = PRESETS[name]
    spec = preset.backbone
    backbone = on_meta(spec)
    with torch.device("meta"):
        out = backbone(torch.empty(2, 3, spec.img_size, spec.img_size), normalised=True)
    assert preset.embedding_dim > 0
    assert backbone.feature_dim == preset.embedding_dim
    assert tuple(out.shape) == (2, preset.embedding_dim)
    assert preset.patch_px == spec.img_size and preset.licence


def test_recipes_are_the_published_architectures():
    def params(name: str) -> float:
        body = on_meta(PRESETS[name].backbone).body
        return sum(p.numel() for p in body.parameters()) / 1e6

    # model cards: UNI ViT-L 303M, UNI2-h 681M, Virchow2 ViT-H 632M, H-Optimus-1 ViT-g 1.1B,
    # Prov-GigaPath tile encoder 1.13B
    assert params("uni") == pytest.approx(303, abs=2)
    assert params("uni2_h") == pytest.approx(681, abs=2)
    assert params("virchow2") == pytest.approx(632, abs=2)
    assert params("gigapath") == pytest.approx(1134, abs=5)
    assert params("hoptimus1") == pytest.approx(1134, abs=5)
    uni2 = PRESETS["uni2_h"].backbone
    assert uni2.timm_kwargs["mlp_layer"] == "SwiGLUPacked" and uni2.timm_kwargs["reg_tokens"] == 8
    assert PRESETS["virchow2"].backbone.pooling == "cls+mean"
    assert PRESETS["hoptimus0"].backbone.mean == (0.707223, 0.578729, 0.703617)
    assert PRESETS["resnet50_trunc"].backbone.timm_kwargs == {"out_indices": (3,)}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_scaled_down_recipe_embeds_through_the_embed_step(name):
    torch.manual_seed(0)
    spec = tiny(ENCODERS[name].backbone)
    backbone = ImageBackbone(spec).eval()
    images = patches(5, spec.img_size + 4)  # cut at another size: resized on the device
    features = embed(backbone, images)
    expected = 1024 if spec.pooling == "stages" else tiny_dim(spec)
    assert features.shape == (5, expected) and np.isfinite(features).all()
    assert np.abs(features[0] - features[1]).max() > 1e-4  # different patches differ
    if spec.pooling in ("cls", "cls+mean"):
        x = backbone.prepare(torch.from_numpy(images).permute(0, 3, 1, 2))
        with torch.no_grad():
            tokens = backbone.body.forward_features(x)
        first = tokens[:, 0].numpy()
        np.testing.assert_allclose(features[:, : first.shape[1]], first, rtol=1e-4, atol=1e-5)
    if spec.pooling == "cls+mean":
        prefix = backbone.body.num_prefix_tokens
        assert prefix == 1 + spec.timm_kwargs.get("reg_tokens", 0)
        mean = tokens[:, prefix:].mean(1).numpy()
        np.testing.assert_allclose(features[:, first.shape[1] :], mean, rtol=1e-4, atol=1e-5)


def test_preset_as_backbone_keeps_its_whole_recipe():
    preset = get_preset("cpu_small", backbone="uni2_h")
    assert preset.backbone == PRESETS["uni2_h"].backbone
    assert preset.backbone.timm_kwargs is not PRESETS["uni2_h"].backbone.timm_kwargs
    assert get_preset("cpu_small", backbone="resnet18").backbone == BackboneSpec(
        "resnet18", img_size=64
    )
    assert get_preset("uni", weights="none").backbone.timm_kwargs["init_values"] == 1e-5
    assert get_preset("uni", weights="hf").backbone.weights == "hf"


def test_a_scaled_down_vit_recipe_trains_inside_stevs():
    from stevs.models import STevs, STevsConfig

    torch.manual_seed(0)
    spec = tiny(ENCODERS["virchow2"].backbone)
    config = STevsConfig.for_method("stevs", n_genes=4, backbone=spec, latent_dim=4)
    model = STevs(config)
    assert model.backbone.feature_dim == 64
    g = torch.Generator().manual_seed(0)
    batch = {
        "patch": torch.randint(0, 256, (6, 3, 28, 28), generator=g, dtype=torch.uint8),
        "coords": torch.rand(6, 2, generator=g),
        "target": torch.randn(6, 4, generator=g),
        "counts": torch.randint(0, 9, (6, 4), generator=g).float(),
        "library_size": torch.full((6,), 100.0),
    }
    model(batch, kl_weight=1.0).loss.backward()
    assert model.backbone.body.patch_embed.proj.weight.grad.abs().sum() > 0


def test_spec_round_trips_through_json_and_reads_old_specs():
    spec = PRESETS["conch_v1_5"].backbone
    assert BackboneSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    old = BackboneSpec.from_dict({"name": "resnet18", "img_size": 32, "weights": "none"})
    assert (old.pooling, old.mean, old.layout, old.hub) == ("stages", None, "timm", None)


# ----------------------------------------------------------------------------- weights


def test_published_conch_layout_loads_offline_from_the_hf_cache(offline_hub):
    torch.manual_seed(1)
    spec = tiny(ENCODERS["conch_v1_5"].backbone)
    source = ImageBackbone(spec).eval()
    state = {f"trunk.{k}": v for k, v in source.body.state_dict().items()}
    state |= {k: v for k, v in source.head.state_dict().items()}
    assert "attn_pool_contrast.to_kv.weight" in state and "ln_contrast.bias" in state
    hf_cache(offline_hub, spec.hub, spec.hub_file, {k: v.contiguous() for k, v in state.items()})
    loaded = ImageBackbone(replace(spec, weights="hf"))
    images = patches(4, spec.img_size)
    np.testing.assert_array_equal(embed(loaded, images), embed(source, images))
    key = embedding_key("conch_v1_5", loaded.spec, "none", 448, 0.5)
    assert key.weights == "hf:MahmoodLab/conchv1_5/pytorch_model_vision.bin"


def test_conch_positions_of_the_224_px_checkpoint_are_resampled_bilinearly(tmp_path):
    torch.manual_seed(5)
    small = tiny(ENCODERS["conch_v1_5"].backbone)  # 2 x 2 patches, as the checkpoint
    large = replace(small, img_size=64, timm_kwargs={**small.timm_kwargs, "img_size": 64})
    source = ImageBackbone(small)
    state = {f"trunk.{k}": v for k, v in source.body.state_dict().items()}
    state |= source.head.state_dict()
    path = tmp_path / "pytorch_model_vision.bin"
    torch.save(state, path)
    loaded = ImageBackbone(replace(large, weights="file", weights_path=str(path)))
    pos = source.body.pos_embed.detach()
    grid = pos[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bilinear")
    expected = expected.permute(0, 2, 3, 1).reshape(1, 16, -1)
    torch.testing.assert_close(loaded.body.pos_embed[:, 1:].detach(), expected)
    torch.testing.assert_close(loaded.body.pos_embed[:, :1].detach(), pos[:, :1])
    assert embed(loaded, patches(2, 64)).shape == (2, 16)


def test_a_cache_that_timm_filled_with_safetensors_serves_too(offline_hub):
    torch.manual_seed(4)
    spec = tiny(ENCODERS["uni"].backbone)
    source = ImageBackbone(spec).eval()
    state = {k: v.contiguous() for k, v in source.body.state_dict().items()}
    hf_cache(offline_hub, spec.hub, "model.safetensors", state)  # not pytorch_model.bin
    images = patches(3, spec.img_size)
    loaded = ImageBackbone(replace(spec, weights="hf"))
    np.testing.assert_array_equal(embed(loaded, images), embed(source, images))


def test_hf_cache_without_the_file_says_how_to_get_it_offline(offline_hub, capsys):
    spec = tiny(ENCODERS["uni"].backbone)
    with pytest.raises(StevsInputError, match="MahmoodLab/UNI.*HF_HUB_OFFLINE=1"):
        ImageBackbone(replace(spec, weights="hf"))
    # the command: one line, exit code 2, before the full-size model is built
    out = offline_hub.parent / "uni.h5"
    argv = ["embed", "--patches", str(out), "--preset", "uni", "--out", str(out)]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "pytorch_model.bin of Hugging Face repository" in error


def _to_hf_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT keys -> Hugging Face Dinov2Model keys (what Phikon-v2 / Hibou-L publish)."""
    top = {
        "cls_token": "embeddings.cls_token",
        "reg_token": "embeddings.register_tokens",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    block = {"attn.proj": "attention.output.dense", "ls1.gamma": "layer_scale1.lambda1"}
    block |= {"ls2.gamma": "layer_scale2.lambda1"}
    out = {"embeddings.mask_token": torch.zeros(1, state["cls_token"].shape[-1])}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        _, index, rest = key.split(".", 2)
        prefix = f"encoder.layer.{index}"
        if rest.startswith("attn.qkv."):
            for name, part in zip(("query", "key", "value"), value.chunk(3), strict=True):
                out[f"{prefix}.attention.attention.{name}.{rest.rsplit('.', 1)[1]}"] = part
            continue
        for old, new in block.items():
            rest = rest.replace(old, new)
        out[f"{prefix}.{rest}"] = value
    if "embeddings.register_tokens" in out:  # Hugging Face: the class token has a position
        pos = out["embeddings.position_embeddings"]
        out["embeddings.position_embeddings"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], 1)
    return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.parametrize("name", ["phikon_v2", "hibou_l"])
def test_hugging_face_dinov2_layout_loads_into_the_timm_recipe(tmp_path, name):
    torch.manual_seed(2)
    spec = tiny(ENCODERS[name].backbone)
    source = ImageBackbone(spec).eval()
    path = tmp_path / "model.safetensors"
    save_file(_to_hf_dinov2(source.body.state_dict()), str(path))
    loaded = ImageBackbone(replace(spec, weights="file", weights_path=str(path)))
    images = patches(3, spec.img_size)
    np.testing.assert_allclose(embed(loaded, images), embed(source, images), rtol=1e-5, atol=1e-6)


def test_a_wrong_shaped_tensor_is_named(tmp_path):
    torch.manual_seed(3)
    spec = tiny(ENCODERS["virchow2"].backbone)
    state = {k: v.contiguous() for k, v in ImageBackbone(spec).body.state_dict().items()}
    state["blocks.1.mlp.fc1.weight"] = state["blocks.1.mlp.fc1.weight"][:-2].contiguous()
    path = tmp_path / "virchow2.safetensors"
    save_file(state, str(path))
    with pytest.raises(StevsInputError, match=r"blocks\.1\.mlp\.fc1\.weight has shape") as err:
        ImageBackbone(replace(spec, weights="file", weights_path=str(path)))
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    del state["blocks.1.mlp.fc1.weight"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(path))
    with pytest.raises(StevsInputError, match=r"has no tensor blocks\.1\.mlp\.fc1\.weight"):
        ImageBackbone(replace(spec, weights="file", weights_path=str(path)))


def test_resnet50_truncated_after_the_third_stage_loads_the_full_published_weights(tmp_path):
    torch.manual_seed(6)
    source = timm.create_model("resnet50")  # resnet50.tv_in1k's keys: all four stages + fc
    path = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    backbone = ImageBackbone(get_preset("resnet50_trunc", weights=str(path)).backbone)
    assert (
        backbone.feature_dim == 1024 and "layer4.0.conv1.weight" not in backbone.body.state_dict()
    )
    torch.testing.assert_close(
        backbone.body.state_dict()["layer3.5.conv3.weight"],
        source.state_dict()["layer3.5.conv3.weight"],
        rtol=0,
        atol=0,
    )


def test_a_wrong_shaped_tensor_is_named_for_a_cnn_too(tmp_path):
    state = {k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3)
    path = tmp_path / "r18.safetensors"
    save_file(state, str(path))
    with pytest.raises(StevsInputError, match=r"do not fit.*layer2\.0\.conv1\.weight has shape"):
        ImageBackbone(BackboneSpec("resnet18", weights="file", weights_path=str(path)))


# ----------------------------------------------------------------------------- stevs encoders


def test_stevs_encoders_lists_every_preset_with_its_geometry_and_weights(capsys, offline_hub):
    assert main(["encoders"]) == 0
    table = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in table[1:]]
    assert names == list(PRESETS)
    assert main(["encoders", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {row["preset"]: row for row in rows}
    assert set(by_name) == set(PRESETS)
    for name, preset in PRESETS.items():
        row = by_name[name]
        assert (row["dim"], row["px"], row["um_per_px"]) == (
            preset.embedding_dim,
            preset.patch_px,
            preset.mpp,
        )
    assert by_name["uni"]["weights"] == "Hugging Face MahmoodLab/UNI/pytorch_model.bin"
    assert by_name["uni"]["cached"] == "no" and "gated" in by_name["uni"]["licence"]
    hf_cache(offline_hub, "MahmoodLab/UNI", "pytorch_model.bin", {"x": torch.zeros(1)})
    assert main(["encoders", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["preset"]: r["cached"] for r in rows}["uni"] == "yes"
