"""Tests of ``stevs_tail``: STevs with a trainable copy of a frozen encoder's last stage
(``STevsConfig.train_tail_stages``) over the ``tail`` embedding view."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from test_latent import fold_path  # noqa: F401  (the tiny fold fixture)

from stevs.cli import main
from stevs.data import SpotDataset
from stevs.embed import embedding_key_of
from stevs.io.fold_file import read_fold
from stevs.io.model_dir import ModelDir
from stevs.methods import REGISTRY
from stevs.models import create_model, load_model, save_model
from stevs.models.presets import get_preset
from stevs.training.fold import _fit_linear_path, embedding_dataset, with_context

torch.set_num_threads(1)


def tiny_preset(tmp_path):
    """A scaled-down EfficientNet-Lite0 (32 px, random weights saved to a file, so that a
    model folder records the frozen backbone by reference)."""
    state = timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict()
    path = tmp_path / "effnet.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return get_preset("cpu_small", backbone="tf_efficientnet_lite0", weights=str(path))


def test_the_tail_view_reproduces_the_frozen_embedding_and_only_the_tail_trains(tmp_path):
    preset = tiny_preset(tmp_path)
    genes = [f"g{i}" for i in range(3)]
    torch.manual_seed(0)
    model = create_model("stevs_tail", preset, genes, None, frozen=True, context="neighbours")
    patches = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    model.eval()
    view = model.embed(patches)
    assert view.shape == (6, model.tail_input_dim) and model.tail_input_dim > 512
    frozen = model.frozen_embedding(view)
    torch.testing.assert_close(frozen, model.backbone(patches))
    torch.testing.assert_close(model.image_features(view, frozen)[:, :512], frozen)
    trained = {id(p) for p in model.backbone_parameters() if p.requires_grad}
    assert trained == {id(p) for p in model.tail.parameters()}
    model.train()
    assert not model.backbone.training and model.tail.training
    with pytest.raises(ValueError, match="'tail' embedding view"):
        model.image_features(frozen, frozen)


def test_save_load_keeps_the_tail_records_the_backbone_and_predicts_the_same(tmp_path):
    preset = tiny_preset(tmp_path)
    genes = [f"g{i}" for i in range(3)]
    model = create_model("stevs_tail", preset, genes, None, frozen=True, context="neighbours")
    with torch.no_grad():
        for p in model.tail.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = {
        "method": "stevs_tail",
        "genes": genes,
        "model": model.config.to_dict(),
        "training": {"freeze_backbone": True, "embedding_view": "tail"},
    }
    save_model(ModelDir(tmp_path / "m"), model.state_dict(), config, {})
    stored = load_file(tmp_path / "m" / "model.safetensors")
    assert any(k.startswith("tail.") for k in stored)
    assert not any(k.startswith("backbone.") for k in stored)
    loaded, saved = load_model(tmp_path / "m")
    assert saved["backbone_weights"]["stored"] is False
    view = model.embed(torch.randint(0, 255, (5, 3, 32, 32), dtype=torch.uint8))
    coords = torch.rand(5, 2)
    context = model.frozen_embedding(view)
    expected = model.predict(None, coords, view, n_samples=0, context=context)
    got = loaded.predict(None, coords, view, n_samples=0, context=context)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def test_train_embed_predict_from_the_tail_cache(fold_path, tmp_path):  # noqa: F811
    """stevs embed --view tail -> stevs train --method stevs_tail -> stevs predict: the tail
    trains, the frozen encoder does not, the context and the ridge probe are the frozen
    features', and predicting from the cache equals predicting from the patches."""
    fold = read_fold(fold_path)
    emb = tmp_path / "emb"
    for entry in fold.slides:
        cache = str(emb / f"{entry.slide}.h5")
        code = main(["embed", "--patches", entry.patches, "--preset", "effnet_lite0_in1k"]
                    + ["--view", "tail", "--device", "cpu", "--out", cache])  # fmt: skip
        assert code == 0
    out = tmp_path / "m"
    code = main(
        ["train", "--fold", str(fold_path), "--method", "stevs_tail", "--preset"]
        + ["effnet_lite0_in1k", "--freeze-backbone", "--embeddings", str(emb), "--out", str(out)]
        + ["--epochs", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    )
    assert code == 0
    model, config = load_model(out)  # the frozen backbone hashes to the pretrained one
    assert config["training"]["embedding_view"] == "tail"
    assert model.config.uses_context and model.config.linear_path == "ridge"
    start = create_model("stevs_tail", get_preset("effnet_lite0_in1k"), fold.genes,
                         fold.normalisation, frozen=True)  # fmt: skip
    tail_keys = [k for k in model.state_dict() if k.startswith("tail.") and "weight" in k]
    changed = [
        k for k in tail_keys if not torch.equal(model.state_dict()[k], start.state_dict()[k])
    ]
    assert changed
    # the probe of the linear path: fitted on the frozen features and their context
    train = embedding_dataset([SpotDataset(fold, "train")], folder=str(emb),
                              key=embedding_key_of(config, "tail"))  # fmt: skip
    _fit_linear_path(start, with_context(start, train), config)
    torch.testing.assert_close(start.linear.weight, model.linear.weight)
    assert model.linear.weight.abs().sum() > 0
    for args, name in (([], "patches"), (["--embeddings", str(emb)], "cache")):
        where = ["--out-dir", str(tmp_path / name)]
        code = main(["predict", "--model-dir", str(out), "--fold", str(fold_path), "--device"]
                    + ["cpu", "--samples", "0", *where, *args])  # fmt: skip
        assert code == 0
    a = ad.read_h5ad(tmp_path / "patches" / "s3.h5ad").X
    b = ad.read_h5ad(tmp_path / "cache" / "s3.h5ad").X
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_stevs_tail_without_a_frozen_backbone_is_one_clear_line(fold_path, tmp_path, capsys):  # noqa: F811
    code = main(
        ["train", "--fold", str(fold_path), "--method", "stevs_tail", "--preset", "cpu_small"]
        + ["--out", str(tmp_path / "m"), "--epochs", "1", "--workers", "0", "--device", "cpu"]
    )
    assert code == 2
    assert (
        "stevs_tail" in capsys.readouterr().err
        and not (tmp_path / "m" / "model.safetensors").exists()
    )
    code = main(
        ["train", "--fold", str(fold_path), "--method", "stevs", "--preset", "cpu_small"]
        + ["--out", str(tmp_path / "m"), "--epochs", "1", "--workers", "0", "--device", "cpu"]
        + ["--freeze-backbone", "--embedding-view", "tail"]
    )
    assert code == 2 and "--embedding-view tail" in capsys.readouterr().err


def test_stevs_tail_is_a_frozen_encoder_torch_method_reading_the_tail_view():
    method = REGISTRY["stevs_tail"]
    assert method.kind == "torch" and method.encoder == "frozen"
    assert method.embedding_view == "tail" and method.switches == {"train_tail_stages": 1}
    assert method.reads_embeddings(frozen=True, pretrained=True)
    assert not method.reads_embeddings(frozen=False, pretrained=True)
