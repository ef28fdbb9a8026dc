"""Tests of partial fine-tuning (`stevs train --train-stages N`,
ImageBackbone.train_last_stages): only the backbone's last stages train."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_latent import fold_path  # noqa: F401  (the tiny fold fixture)

from stevs.cli import main
from stevs.io.fold_file import read_fold
from stevs.models import BackboneSpec, create_model
from stevs.models.backbones import ImageBackbone
from stevs.models.presets import get_preset

torch.set_num_threads(1)


def trained_names(backbone: ImageBackbone) -> set[str]:
    return {name for name, p in backbone.body.named_parameters() if p.requires_grad}


def test_efficientnet_trains_only_its_last_stage_and_keeps_the_rest_as_loaded():
    backbone = ImageBackbone(BackboneSpec("tf_efficientnet_lite0", img_size=32))
    n = backbone.train_last_stages(1)  # the stride-32 stage: blocks 5 and 6
    names = trained_names(backbone)
    assert names and all(name.startswith(("blocks.5.", "blocks.6.")) for name in names)
    assert any(name.startswith("blocks.5.") for name in names)
    assert n == sum(p.numel() for name, p in backbone.body.named_parameters() if name in names)
    assert backbone.train_last_stages(2) > n  # one more stage: blocks 3 and 4 too
    assert "blocks.3.0.conv_pw.weight" in trained_names(backbone)
    backbone.train_last_stages(1)
    backbone.train()
    frozen_bn, trained_bn = backbone.body.bn1, backbone.body.blocks[6][0].bn3
    assert not frozen_bn.training and trained_bn.training
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    backbone(torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)).square().mean().backward()
    optimizer.step()
    after = backbone.state_dict()
    assert torch.equal(before["body.bn1.running_mean"], after["body.bn1.running_mean"])
    assert torch.equal(
        before["body.blocks.4.0.conv_pw.weight"], after["body.blocks.4.0.conv_pw.weight"]
    )
    assert not torch.equal(
        before["body.blocks.6.0.conv_pw.weight"], after["body.blocks.6.0.conv_pw.weight"]
    )
    with pytest.raises(ValueError, match="at least one stage"):
        backbone.train_last_stages(0)


def test_train_stages_cli_changes_only_the_last_swin_stage(fold_path, tmp_path):  # noqa: F811
    out = tmp_path / "m"
    code = main(
        ["train", "--fold", str(fold_path), "--method", "stevs", "--preset", "cpu_small"]
        + ["--out", str(out), "--epochs", "1", "--batch-size", "8", "--workers", "0"]
        + ["--device", "cpu", "--train-stages", "1"]
    )
    assert code == 0
    fold = read_fold(fold_path)
    torch.manual_seed(0)  # the run's initial weights (seed 0)
    start = create_model("stevs", get_preset("cpu_small"), fold.genes, fold.normalisation)
    initial, trained = start.state_dict(), load_file(out / "model.safetensors")
    last = f"backbone.body.layers_{len(start.backbone.stage_channels) - 1}."
    backbone_keys = [k for k in trained if k.startswith("backbone.body.")]
    changed = [k for k in backbone_keys if not torch.equal(initial[k], trained[k])]
    assert changed and all(k.startswith(last) for k in changed)
    assert not torch.equal(initial["decoder.mean.weight"], trained["decoder.mean.weight"])


def test_train_stages_with_a_frozen_backbone_is_one_clear_line(fold_path, tmp_path, capsys):  # noqa: F811
    code = main(
        ["train", "--fold", str(fold_path), "--method", "stevs", "--preset", "cpu_small"]
        + ["--out", str(tmp_path / "m"), "--epochs", "1", "--workers", "0", "--device", "cpu"]
        + ["--freeze-backbone", "--train-stages", "1"]
    )
    assert code == 2
    assert "--train-stages" in capsys.readouterr().err
