"""Tests of stevs.train: outputs, checkpoints, resume after a kill, frozen backbone, stopping."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

import stevs.training.loop as loop_module
from stevs.embed import embed_patches
from stevs.errors import StevsInputError
from stevs.metrics import VAL_METRIC
from stevs.models import BackboneSpec, Preset, create_model, load_model
from stevs.training.batches import EmbeddingDataset, augment_patches
from stevs.training.fold import fit_model
from stevs.training.loop import lr_factor, train_model
from stevs.training.options import TrainOptions

torch.set_num_threads(1)

N_GENES = 5

TINY_PRESET = Preset(
    name="tiny",
    backbone=BackboneSpec(
        "swin_tiny_patch4_window7_224",
        timm_kwargs={
            "img_size": 16,
            "patch_size": 4,
            "embed_dim": 16,
            "depths": (1, 1),
            "num_heads": (1, 2),
            "window_size": 4,
        },
        img_size=16,
    ),
    patch_px=16,
    mpp=4.0,
    latent_dim=4,
    hidden_dim=32,
    epochs=3,
    batch_size=8,
    warmup_epochs=0.5,
    kl_warmup_epochs=1.0,
    patience=10,
)


class TinySpots(Dataset):
    """Striped or flat patches of varying darkness; expression follows both (item contract)."""

    def __init__(self, n: int, slides: tuple[int, ...], seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        striped = torch.randint(0, 2, (n,), generator=g).float()
        darkness = torch.rand(n, generator=g)
        stripes = ((torch.arange(16) // 2) % 2).float().view(1, 1, 1, 16)
        texture = 1.0 - 0.5 * striped.view(n, 1, 1, 1) * stripes
        base = torch.tensor([200.0, 120.0, 180.0]).view(1, 3, 1, 1)
        image = base * (0.6 + 0.4 * darkness.view(n, 1, 1, 1)) * texture
        noise = torch.randint(0, 20, (n, 3, 16, 16), generator=g)
        self.patches = (image + noise).clamp(0, 255).to(torch.uint8)
        weights = torch.randn(2, N_GENES, generator=torch.Generator().manual_seed(99))
        signal = torch.stack([striped, darkness], dim=1) @ weights
        self.target = signal + 0.1 * torch.randn(n, N_GENES, generator=g)
        self.coords = torch.rand(n, 2, generator=g) * 2 - 1
        self.slide = torch.tensor([slides[i % len(slides)] for i in range(n)])

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> dict:
        return {
            "patch": self.patches[i],
            "coords": self.coords[i],
            "target": self.target[i],
            "counts": torch.ones(N_GENES),
            "library_size": torch.tensor(100.0),
            "slide": self.slide[i],
            "barcode": f"spot{i}",
        }


def normalisation() -> dict:
    return {
        "method": "log1p_cp10k",
        "target_sum": 1e4,
        "mean": [0.5] * N_GENES,
        "std": [1.0] * N_GENES,
    }


def run_training(out, method="stevs", on_epoch_end=None, preset=TINY_PRESET, n_train=40,
                 keep_checkpoint=False, **options):  # fmt: skip
    torch.manual_seed(0)
    genes = [f"g{i}" for i in range(N_GENES)]
    model = create_model(method, preset, genes, normalisation())
    options.setdefault("checkpoint_minutes", 0)  # a checkpoint per epoch, to read or kill at
    opts = TrainOptions(workers=0, device="cpu", **options).resolved(preset)
    config = {"method": method, "model": model.config.to_dict(), "genes": genes, "fold": "f0"}
    return train_model(
        model,
        TinySpots(n_train, (0, 1), seed=1),
        TinySpots(16, (2,), seed=2),
        out,
        opts,
        config,
        on_epoch_end=on_epoch_end,
        keep_checkpoint=keep_checkpoint,
    )


def test_training_writes_weights_config_checkpoint_and_metrics(tmp_path):
    seen = {}

    def read_checkpoint(epoch: int) -> None:  # after each epoch's checkpoint is written
        seen[epoch] = torch.load(tmp_path / "checkpoint.pt", weights_only=True)

    result = run_training(tmp_path, on_epoch_end=read_checkpoint)
    assert result.finished and result.epochs_done == 3 and sorted(seen) == [1, 2, 3]
    for name in ("model.safetensors", "config.json", "metrics.csv"):
        assert (tmp_path / name).is_file()
    # a finished run keeps no resume state (optimiser state is most of a model folder), so
    # its last epoch writes none: the weights are written instead
    assert [seen[e]["epoch"] for e in (1, 2, 3)] == [1, 2, 2]
    assert not (tmp_path / "checkpoint.pt").exists()
    assert not list(tmp_path.glob(".*tmp*"))
    # a kept checkpoint (a refit's selection run) holds the finished state
    kept = tmp_path / "kept"
    run_training(kept, keep_checkpoint=True)
    checkpoint = torch.load(kept / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["finished"]
    assert {"model", "optimizer", "scheduler", "rng"} <= set(checkpoint)
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for column in (
        "train_loss",
        "train_recon",
        "train_kl",
        "train_elbo_img",
        "train_elbo_spatial",
        "train_align",
        VAL_METRIC,
        "lr_backbone",
        "lr_heads",
        "epoch_seconds",
    ):
        assert all(np.isfinite(float(r[column])) for r in rows), column
    assert float(rows[0]["kl_weight"]) < float(rows[-1]["kl_weight"]) == TINY_PRESET.beta
    assert json.loads((tmp_path / "config.json").read_text())["method"] == "stevs"
    # the saved weights are the best epoch's and load back into an equal model
    best = checkpoint["best_model"]
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == set(best)
    assert all(torch.equal(saved[k], best[k]) for k in saved)
    model, config = load_model(tmp_path)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert config["genes"] == [f"g{i}" for i in range(N_GENES)]


def test_checkpoints_come_after_the_first_epoch_then_by_the_clock(tmp_path, monkeypatch):
    """Every minute at most (the default): with 40-second epochs the checkpoint is written
    after epochs 1 and 3 (60 s after 1), none for the finished last one; a --max-minutes
    stop writes the epoch it stops at, so that the rerun resumes from there."""
    now = [0.0]
    monkeypatch.setattr(loop_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    real = loop_module._train_epoch

    def forty_seconds(run, epoch):
        now[0] += 40
        return real(run, epoch)

    monkeypatch.setattr(loop_module, "_train_epoch", forty_seconds)
    seen = {}

    def read_checkpoint(epoch: int) -> None:
        seen[epoch] = torch.load(tmp_path / "clock" / "checkpoint.pt", weights_only=True)["epoch"]

    run_training(tmp_path / "clock", on_epoch_end=read_checkpoint, checkpoint_minutes=1.0,
                 epochs=5, patience=10)  # fmt: skip
    assert seen == {1: 1, 2: 1, 3: 3, 4: 3, 5: 3}
    limited = run_training(tmp_path / "limited", checkpoint_minutes=60.0, max_minutes=1.5,
                           epochs=5, patience=10)  # fmt: skip
    assert not limited.finished and limited.epochs_done == 3  # 120 s > 90 s after epoch 3
    assert torch.load(tmp_path / "limited" / "checkpoint.pt", weights_only=True)["epoch"] == 3


def test_training_learns_the_image_signal(tmp_path):
    result = run_training(
        tmp_path, method="stnet", n_train=128, epochs=5, lr_heads=3e-3, lr_backbone=1e-3
    )
    assert result.best_val_pearson is not None and result.best_val_pearson > 0.5


def test_run_killed_after_an_epoch_resumes_to_the_same_weights(tmp_path):
    straight = run_training(tmp_path / "straight")
    assert straight.epochs_done == 3

    class Killed(Exception):
        pass

    def kill_after_first(epoch: int) -> None:
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        run_training(tmp_path / "resumed", on_epoch_end=kill_after_first)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = run_training(tmp_path / "resumed")
    assert resumed.epochs_done == 3
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert set(a) == set(b)
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    assert [r["train_loss"] for r in straight.history] == [r["train_loss"] for r in resumed.history]


def test_rerunning_a_finished_run_does_not_train_again(tmp_path):
    run_training(tmp_path)
    before = load_file(str(tmp_path / "model.safetensors"))
    again = run_training(tmp_path)
    assert again.epochs_done == 3 and len(again.history) == 3
    after = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_of_another_run_is_not_resumed(tmp_path, caplog):
    """A changed method or training argument trains from scratch, like a fresh folder."""
    run_training(tmp_path, epochs=1)
    with caplog.at_level("WARNING", logger="stevs.train"):
        changed = run_training(tmp_path, method="stnet", epochs=2, seed=5)
    assert "another run" in caplog.text and "method" in caplog.text
    assert "training.epochs" in caplog.text and "training.seed" in caplog.text
    fresh = run_training(tmp_path / "fresh", method="stnet", epochs=2, seed=5)
    assert changed.epochs_done == 2 and [r["train_loss"] for r in changed.history] == [
        r["train_loss"] for r in fresh.history
    ]
    saved, expected = (
        load_file(str(p / "model.safetensors")) for p in (tmp_path, tmp_path / "fresh")
    )
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert json.loads((tmp_path / "config.json").read_text())["method"] == "stnet"


def test_zero_epochs_is_an_error(tmp_path):
    with pytest.raises(StevsInputError, match="--epochs must be a whole number >= 1"):
        run_training(tmp_path, epochs=0)
    assert not (tmp_path / "model.safetensors").exists()


def test_frozen_backbone_trains_the_heads_only(tmp_path):
    torch.manual_seed(0)
    genes = [f"g{i}" for i in range(N_GENES)]
    model = create_model("stevs", TINY_PRESET, genes, normalisation())
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    heads_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    opts = TrainOptions(workers=0, device="cpu", freeze_backbone=True, epochs=2).resolved(
        TINY_PRESET
    )
    result = train_model(
        model, TinySpots(40, (0,), 1), TinySpots(16, (1,), 2), tmp_path, opts, {"method": "stevs"}
    )
    assert result.epochs_done == 2
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone_before.items())
    assert any(not torch.equal(v, model.decoder.state_dict()[k]) for k, v in heads_before.items())
    assert np.isfinite(result.history[-1][VAL_METRIC])


def test_early_stopping_stops_when_validation_does_not_improve(tmp_path):
    result = run_training(tmp_path, epochs=6, lr_heads=0.0, lr_backbone=0.0, patience=2)
    assert result.epochs_done == 3 and result.best_epoch == 1 and result.finished


def test_augmentation_keeps_shape_range_and_varies():
    torch.manual_seed(0)
    patches = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    out = augment_patches(patches)
    assert out.shape == patches.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not torch.allclose(out, patches.float())
    # without colour change the result is one of the 8 dihedral views of the input
    uniform = torch.full((4, 3, 16, 16), 100, dtype=torch.uint8)
    assert torch.allclose(augment_patches(uniform).std(dim=(1, 2, 3)), torch.zeros(4), atol=1e-3)


def test_validation_score_is_the_evaluations_headline_metric():
    """Same predictions, one gene held constant: validation and ``stevs evaluate`` agree (the
    constant prediction scores 0 in both, it is not skipped)."""
    from stevs import metrics

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(30, 4))
    prediction = truth + rng.normal(size=(30, 4))
    prediction[:, 3] = 1.0
    slides = np.repeat([0, 1], 15)
    genes, headline = ["a", "b", "c", "d"], ["a", "b", "d"]
    score = metrics.headline_pearson(truth, prediction, slides, genes, headline)
    tables = [
        metrics.per_gene_table(
            truth[slides == s], prediction[slides == s], genes, headline_genes=headline
        )
        for s in (0, 1)
    ]
    summary = metrics.summarise_fold(pd.concat(tables, ignore_index=True))
    assert score == summary[metrics.HEADLINE_METRIC]  # bit for bit
    per_slide = [
        metrics.pearson_per_gene(truth[slides == s], prediction[slides == s]) for s in (0, 1)
    ]
    expected = np.mean(np.mean(per_slide, axis=0)[[0, 1, 3]])
    assert score == pytest.approx(expected) and np.mean(per_slide, axis=0)[3] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_validation_score_equals_the_evaluation_bit_for_bit(seed):
    """Unequal slides, a gene constant on one slide (NaN there), a headline subset out of
    panel order: the fast path and the evaluation's tables give the very same float."""
    from stevs import metrics

    rng = np.random.default_rng(seed)
    sizes, n_genes = (23, 41, 17), 60
    truth = rng.normal(size=(sum(sizes), n_genes)).astype(np.float32)
    prediction = (truth + rng.normal(size=truth.shape)).astype(np.float32)
    slides = np.repeat(["s2", "s0", "s1"], sizes)
    truth[slides == "s1", 5] = 2.0
    prediction[:, 7] = 0.5
    genes = [f"g{i}" for i in range(n_genes)]
    headline = list(rng.permutation(genes)[:25])
    score = metrics.headline_pearson(truth, prediction, slides, genes, headline)
    tables = [
        metrics.per_gene_table(
            truth[slides == s], prediction[slides == s], genes, headline_genes=headline
        )
        for s in np.unique(slides)
    ]
    summary = metrics.summarise_fold(pd.concat(tables, ignore_index=True))
    assert np.isfinite(score) and score == summary[metrics.HEADLINE_METRIC]
    everything = metrics.headline_pearson(truth, prediction, slides, genes, [])
    assert everything == metrics.summarise_fold(pd.concat(tables))["pearson_r_mean_all"]


def test_learning_rate_warms_up_then_decays():
    factors = [lr_factor(step, 10, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] < 0.02
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))


def test_resolved_options_take_preset_defaults():
    options = TrainOptions(epochs=7).resolved(replace(TINY_PRESET, batch_size=12))
    assert options.epochs == 7 and options.batch_size == 12
    assert options.lr_heads == TINY_PRESET.lr_heads


CONTEXT_PRESET = replace(TINY_PRESET, context="neighbours", linear_path="ridge", epochs=2)


def test_preset_context_and_linear_path_apply_to_frozen_runs_only():
    genes = [f"g{i}" for i in range(N_GENES)]
    frozen = create_model("stevs", CONTEXT_PRESET, genes, normalisation(), frozen=True)
    assert (frozen.config.context, frozen.config.linear_path) == ("neighbours", "ridge")
    trainable = create_model("stevs", CONTEXT_PRESET, genes, normalisation())
    assert (trainable.config.context, trainable.config.linear_path) == ("none", "none")
    # the ST-Net baseline stays the ST-Net design; the spatial-only ablation has no image
    stnet = create_model("stnet", CONTEXT_PRESET, genes, normalisation(), frozen=True)
    assert stnet.config.context == "none"
    spatial = create_model(
        "stevs_spatial_only", CONTEXT_PRESET, genes, normalisation(), frozen=True
    )
    assert (spatial.config.context, spatial.config.linear_path) == ("none", "none")
    # a command-line override wins over the preset
    off = create_model("stevs", CONTEXT_PRESET, genes, normalisation(), frozen=True, context="none")
    assert off.config.context == "none" and off.config.linear_path == "ridge"


def tiny_embeddings(model, spots: TinySpots) -> EmbeddingDataset:
    """TinySpots as the fold level hands them to the loop: frozen embeddings, no patches."""
    patches = spots.patches.permute(0, 2, 3, 1).numpy()
    items = {k: v for k, v in spots[slice(None)].items() if k not in ("patch", "barcode")}
    items = {**items, "counts": torch.ones(len(spots), N_GENES),
             "library_size": torch.full((len(spots),), 100.0)}  # fmt: skip
    embedded = embed_patches(model.backbone.eval(), patches, progress=False)
    return EmbeddingDataset(torch.from_numpy(embedded), items)


def _context_run(out) -> tuple:
    torch.manual_seed(0)
    genes = [f"g{i}" for i in range(N_GENES)]
    model = create_model("stevs", CONTEXT_PRESET, genes, normalisation(), frozen=True)
    opts = TrainOptions(workers=0, device="cpu", freeze_backbone=True).resolved(CONTEXT_PRESET)
    config = {"method": "stevs", "model": model.config.to_dict(), "genes": genes, "fold": "f0"}
    train, val = TinySpots(40, (0, 1), seed=1), TinySpots(16, (2,), seed=2)
    train_data, val_data = tiny_embeddings(model, train), tiny_embeddings(model, val)
    result = fit_model(model, (train_data, val_data), out, opts, config)
    return model, result


def test_frozen_run_with_context_and_ridge_path_is_deterministic_and_predicts(tmp_path):
    from stevs.models.context import neighbour_mean
    from stevs.predict import predict_patches

    first, result = _context_run(tmp_path / "a")
    second, _ = _context_run(tmp_path / "b")
    assert result.epochs_done == 2 and np.isfinite(result.history[-1][VAL_METRIC])
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert float(first.linear.weight.detach().abs().sum()) > 0  # the ridge probe was fitted
    loaded, _ = load_model(tmp_path / "a")
    assert loaded.config.context == "neighbours" and loaded.linear is not None
    # prediction embeds every spot, then adds each spot's neighbourhood context
    spots = TinySpots(16, (2,), seed=2)
    mean, _ = predict_patches(loaded, spots, n_samples=0, progress=False)
    with torch.no_grad():
        embedding = loaded.embed(spots.patches)
    context = neighbour_mean(embedding, spots.coords, spots.slide, 1.5)
    expected, _ = loaded.predict(
        embedding=embedding, coords=spots.coords, context=context, n_samples=0
    )
    np.testing.assert_allclose(mean, expected.numpy(), atol=1e-5)


def test_context_with_a_trainable_backbone_is_a_clear_error(tmp_path):
    genes = [f"g{i}" for i in range(N_GENES)]
    model = create_model("stevs", TINY_PRESET, genes, normalisation(), context="neighbours")
    opts = TrainOptions(workers=0, device="cpu").resolved(TINY_PRESET)
    with pytest.raises(StevsInputError, match="--freeze-backbone"):
        train_model(model, TinySpots(16, (0,), 1), None, tmp_path, opts, {"method": "stevs"})
