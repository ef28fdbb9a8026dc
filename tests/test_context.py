"""Tests of stevs.models.context (neighbour lookup) and the model's context / linear path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stevs.geometry import median_spot_pitch
from stevs.models import BackboneSpec, STevs, STevsConfig
from stevs.models.context import neighbour_index, neighbour_mean
from stevs.models.ridge import fit_ridge, reduce_rank
from stevs.models.stevs import fit_linear_path

torch.set_num_threads(1)

TINY_SWIN = BackboneSpec(
    "swin_tiny_patch4_window7_224",
    timm_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 16, "depths": (1, 1),
                 "num_heads": (1, 2), "window_size": 4},
    img_size=16,
)  # fmt: skip


def square_grid(n: int = 5, pitch: float = 200.0) -> np.ndarray:
    """(n*n, 2) centres of a square grid, row by row."""
    ys, xs = np.mgrid[0:n, 0:n]
    return np.stack([xs.ravel(), ys.ravel()], axis=1) * pitch


def test_square_grid_neighbours_within_one_and_one_and_a_half_pitches():
    grid = square_grid()
    assert median_spot_pitch(grid) == pytest.approx(200.0)
    centre, corner, edge = 12, 0, 2  # (2, 2), (0, 0), (2, 0)
    one = neighbour_index(grid, 1.0)
    assert sorted(one[centre].tolist()) == [7, 11, 13, 17]
    assert sorted(one[corner].tolist()) == [1, 5]
    ring = neighbour_index(grid, 1.5)
    assert sorted(ring[centre].tolist()) == [6, 7, 8, 11, 13, 16, 17, 18]
    assert sorted(ring[corner].tolist()) == [1, 5, 6]
    assert len(ring[edge]) == 5
    assert all(i not in nbrs for i, nbrs in enumerate(ring))  # a spot is not its own neighbour


def test_hexagonal_grid_has_six_neighbours_in_the_first_ring():
    rows = [(col * 100.0 + (row % 2) * 50.0, row * 100.0 * np.sqrt(3) / 2)
            for row in range(5) for col in range(5)]  # fmt: skip
    ring = neighbour_index(np.asarray(rows), 1.5)
    assert len(ring[12]) == 6


def test_neighbour_mean_is_the_mean_of_the_neighbours_per_slide_and_scale_free():
    grid = square_grid(4)
    coords = np.concatenate([grid, grid])  # two slides with the same layout
    slide = np.repeat([0, 1], len(grid))
    embedding = torch.arange(len(coords) * 3, dtype=torch.float32).view(-1, 3)
    context = neighbour_mean(embedding, coords, slide, radius=1.0)
    for i, nbrs in enumerate(neighbour_index(grid, 1.0)):
        assert torch.allclose(context[i], embedding[nbrs].mean(0))
        assert torch.allclose(context[len(grid) + i], embedding[len(grid) + nbrs].mean(0))
    # the per-slide normalised coordinates of stevs.data give the same neighbourhoods
    scaled = neighbour_mean(embedding, coords / 1234.5, slide, radius=1.0)
    assert torch.equal(scaled, context)


def test_a_spot_without_neighbours_keeps_its_own_embedding_and_bad_coords_fail():
    coords = np.array([[0.0, 0.0], [1.0, 0.0], [50.0, 50.0]])
    embedding = torch.tensor([[1.0], [3.0], [7.0]])
    context = neighbour_mean(embedding, coords, radius=1.5)
    assert context.tolist() == [[3.0], [1.0], [7.0]]
    assert neighbour_mean(embedding[:1], coords[:1]).tolist() == [[1.0]]
    with pytest.raises(ValueError, match="coords"):
        neighbour_mean(embedding, coords[:2])


def tiny_model(**kwargs) -> STevs:
    torch.manual_seed(0)
    config = STevsConfig(n_genes=4, backbone=TINY_SWIN, latent_dim=4, hidden_dim=16, **kwargs)
    return STevs(config)


def test_context_doubles_the_image_features_and_is_required():
    plain, with_context = tiny_model(), tiny_model(context="neighbours")
    dim = plain.backbone.feature_dim
    assert plain.feature_dim == dim and with_context.feature_dim == 2 * dim
    emb, coords = torch.randn(6, dim), torch.rand(6, 2)
    mean, std = with_context.predict(embedding=emb, coords=coords, context=emb.flip(0))
    assert mean.shape == std.shape == (6, 4)
    with pytest.raises(ValueError, match="context"):
        with_context.predict(embedding=emb, coords=coords)
    with pytest.raises(ValueError, match="context must be"):
        tiny_model(context="ring")
    with pytest.raises(ValueError, match="need the image"):
        tiny_model(use_image=False, linear_path="ridge", align=None)


def _probe_data(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(60, dim, generator=g)
    y = x[:, :3] @ torch.randn(3, 4, generator=g) + 0.1 * torch.randn(60, 4, generator=g)
    return x, y, np.repeat([0, 1, 2], 20)


def test_ridge_linear_path_with_the_latent_part_off_is_the_ridge_probe():
    model = tiny_model(linear_path="ridge", linear_stacking=True)
    model.set_normalisation(torch.tensor([1.0, 0.0, -1.0, 2.0]), torch.tensor([2.0, 1.0, 0.5, 3.0]))
    x, y, groups = _probe_data(model.feature_dim)
    fitted, oof = fit_linear_path(model, x, y, groups, list("abcd"))
    assert fitted["linear_path"] == "ridge"
    # the decoder's mean starts at zero: the prediction is the probe's, in the targets' units
    mean, _ = model.predict(embedding=x, coords=torch.zeros(60, 2), n_samples=0)
    probe = fit_ridge(x.double().numpy(), model.standardise(y).numpy(), groups, list("abcd"))
    expected = probe.predict(x.numpy()) * model.target_std.numpy() + model.target_mean.numpy()
    np.testing.assert_allclose(mean.numpy(), expected, atol=1e-4)
    assert not model.linear.weight.requires_grad  # fixed: the latent path learns the rest
    # training sees the probe's out-of-fold predictions: slide 0's from a fit without slide 0
    held = groups == 0
    without = fit_ridge(
        x[~held].double().numpy(), model.standardise(y)[~held].numpy(), groups[~held],
        list("abcd"), alphas=[fitted["alpha"]],
    )  # fmt: skip
    np.testing.assert_allclose(oof[held].numpy(), without.predict(x[held].numpy()), atol=1e-4)
    in_sample = (mean - model.target_mean) / model.target_std
    assert not torch.allclose(oof, in_sample, atol=1e-3)
    # and the model uses them in place of the probe when given
    out = model.inference(embedding=x, coords=torch.zeros(60, 2), linear_offset=oof)
    assert torch.equal(out["linear"], oof)


def test_reduced_rank_linear_path_is_the_reduced_rank_probe():
    model = tiny_model(linear_path="ridge", linear_rank="cv")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, model.feature_dim, generator=g)  # 4 genes mixing 2 features, noisy
    y = x[:, :2] @ torch.randn(2, 4, generator=g) + 0.5 * torch.randn(60, 4, generator=g)
    groups = np.repeat([0, 1, 2], 20)
    fitted, _ = fit_linear_path(model, x, y, groups, list("abcd"))
    probe = fit_ridge(x.double().numpy(), model.standardise(y).numpy(), groups, list("abcd"))
    reduced = reduce_rank(probe, x.double().numpy(), model.standardise(y).numpy(), groups)
    assert fitted["rank"] == reduced.meta["rank"] == 2
    mean, _ = model.predict(embedding=x, coords=torch.zeros(60, 2), n_samples=0)
    expected = reduced.predict(x.numpy()) * model.target_std.numpy() + model.target_mean.numpy()
    np.testing.assert_allclose(mean.numpy(), expected, atol=1e-4)
    assert np.linalg.matrix_rank(model.linear.weight.detach().numpy(), tol=1e-5) == 2
    with pytest.raises(ValueError, match="linear_rank must be"):
        tiny_model(linear_path="ridge", linear_rank="2")


def test_learned_linear_path_starts_at_zero_and_trains():
    model = tiny_model(linear_path="learned")
    x, y, groups = _probe_data(model.feature_dim)
    assert fit_linear_path(model, x, y, groups, list("abcd"))[1] is None
    assert torch.allclose(model.feature_mean, x.mean(0))
    assert (
        model.linear.weight.requires_grad and float(model.linear.weight.detach().abs().sum()) == 0
    )
    batch = {"embedding": x, "coords": torch.rand(60, 2), "target": y}
    model(batch).loss.backward()
    assert float(model.linear.weight.grad.abs().sum()) > 0
