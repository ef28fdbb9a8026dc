"""Tests of stevs.models: PoE and divergences, the STevs model and its switches, backbones."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch.distributions import Normal, kl_divergence

from stevs.errors import StevsInputError
from stevs.methods import torch_switches
from stevs.models import (
    BackboneSpec,
    ImageBackbone,
    STevs,
    STevsConfig,
    effnet_lite0_package_state_dict,
    get_preset,
    kl_normal,
    kl_standard_normal,
    product_of_experts,
    symmetric_kl,
)
from stevs.models.poe import ALIGNMENTS, alignment_loss, wasserstein2

torch.set_num_threads(1)

TINY_SWIN = BackboneSpec(
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
)


def tiny_config(method: str = "stevs", n_genes: int = 6, **kwargs) -> STevsConfig:
    kwargs = {"latent_dim": 4, "hidden_dim": 16, **kwargs}
    return STevsConfig.for_method(method, n_genes=n_genes, backbone=TINY_SWIN, **kwargs)


def tiny_batch(n: int = 8, n_genes: int = 6, size: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "patch": torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
        "coords": torch.rand(n, 2, generator=g) * 2 - 1,
        "target": torch.randn(n, n_genes, generator=g),
        "counts": torch.randint(0, 20, (n, n_genes), generator=g).float(),
        "library_size": torch.full((n,), 500.0),
    }


def random_gaussians(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2, torch.randn(n, d, generator=g)


# ----------------------------------------------------------------------------- PoE, KL


def test_poe_equals_closed_form_with_prior_expert():
    (m1, lv1), (m2, lv2) = random_gaussians(5, 3, 1), random_gaussians(5, 3, 2)
    v1, v2 = lv1.exp().double(), lv2.exp().double()
    var = 1.0 / (1.0 + 1.0 / v1 + 1.0 / v2)
    mean = var * (m1.double() / v1 + m2.double() / v2)
    mu, logvar = product_of_experts([m1, m2], [lv1, lv2])
    torch.testing.assert_close(mu.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar.exp().double(), var, rtol=1e-5, atol=1e-6)


def test_poe_with_one_expert_off_is_that_expert_times_prior():
    (m1, lv1), (m2, lv2) = random_gaussians(4, 3, 3), random_gaussians(4, 3, 4)
    mu, logvar = product_of_experts([m1, m2], [lv1, lv2], weights=[None, torch.zeros(4, 1)])
    v1 = lv1.exp()
    torch.testing.assert_close(mu, m1 / (1 + v1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar.exp(), v1 / (1 + v1), rtol=1e-5, atol=1e-6)
    alone_mu, alone_logvar = product_of_experts([m1], [lv1])
    torch.testing.assert_close(mu, alone_mu)
    torch.testing.assert_close(logvar, alone_logvar)


def test_poe_is_finite_for_extreme_log_variances():
    mu = torch.tensor([[1.0, -3.0]])
    mu_out, logvar_out = product_of_experts(
        [mu, mu], [torch.tensor([[-500.0, 500.0]]), torch.tensor([[-500.0, 500.0]])]
    )
    assert torch.isfinite(mu_out).all() and torch.isfinite(logvar_out).all()
    torch.testing.assert_close(mu_out[0, 0], torch.tensor(1.0), atol=1e-4, rtol=0)


def test_kl_and_symmetric_kl_match_torch_distributions():
    (m1, lv1), (m2, lv2) = random_gaussians(6, 4, 5), random_gaussians(6, 4, 6)
    q, p = Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp())
    torch.testing.assert_close(kl_normal(m1, lv1, m2, lv2), kl_divergence(q, p).sum(-1))
    expected_sym = kl_divergence(q, p).sum(-1) + kl_divergence(p, q).sum(-1)
    torch.testing.assert_close(symmetric_kl(m1, lv1, m2, lv2), expected_sym)
    prior = Normal(torch.zeros_like(m1), torch.ones_like(m1))
    torch.testing.assert_close(kl_standard_normal(m1, lv1), kl_divergence(q, prior).sum(-1))
    torch.testing.assert_close(alignment_loss("sym_kl")(m1, lv1, m2, lv2), expected_sym)
    w2 = ((m1 - m2) ** 2 + ((0.5 * lv1).exp() - (0.5 * lv2).exp()) ** 2).sum(-1)
    torch.testing.assert_close(wasserstein2(m1, lv1, m2, lv2), w2)


@pytest.mark.parametrize("name", ALIGNMENTS)
def test_every_alignment_is_zero_for_identical_and_positive_for_different(name):
    (m1, lv1), (m2, lv2) = random_gaussians(3, 4, 7), random_gaussians(3, 4, 8)
    fn = alignment_loss(name)
    torch.testing.assert_close(fn(m1, lv1, m1, lv1), torch.zeros(3), atol=1e-5, rtol=0)
    assert (fn(m1, lv1, m2, lv2) > 0).all()
    with pytest.raises(ValueError, match="unknown alignment"):
        alignment_loss("cosine")


# ----------------------------------------------------------------------------- the model


def test_full_model_terms_are_finite_and_gradients_reach_both_experts_and_backbone():
    torch.manual_seed(0)
    model = STevs(tiny_config("stevs"))
    model.train()
    output = model(tiny_batch(), kl_weight=0.5)
    assert set(output.terms) == {"recon", "kl", "elbo_img", "elbo_spatial", "align", "mse"}
    assert all(torch.isfinite(v) for v in output.terms.values())
    assert torch.isfinite(output.loss)
    output.loss.backward()

    def grad_norm(module: torch.nn.Module) -> float:
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    assert grad_norm(model.backbone) > 0
    assert grad_norm(model.image_head) > 0
    assert grad_norm(model.spatial_encoder) > 0
    assert grad_norm(model.spatial_head) > 0
    assert grad_norm(model.decoder) > 0


@pytest.mark.parametrize("method", sorted(torch_switches()))
def test_every_method_trains_and_predicts_through_one_class(method):
    torch.manual_seed(0)
    model = STevs(tiny_config(method))
    batch = tiny_batch()
    output = model(batch, kl_weight=1.0)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    mean, std = model.predict(batch["patch"], batch["coords"], n_samples=4)
    assert mean.shape == std.shape == (8, 6)
    assert torch.isfinite(mean).all() and (std > 0).all()
    c = model.config
    assert (model.backbone is None) == (not c.use_image)
    if method == "stnet":
        assert set(output.terms) == {"mse"}
    else:
        full = ("stevs", "stevs_tail")
        assert ("align" in output.terms) == (method in full)
        assert ("elbo_spatial" in output.terms) == (method in (*full, "stevs_no_align"))
    if c.train_tail_stages:  # the tail trains, the backbone under it is frozen
        assert all(p.grad is None for p in model.backbone.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.tail.parameters())
        assert (model.spatial_encoder is None) == (method == "stevs_image_only")


def test_spatial_only_ignores_the_image_and_image_only_ignores_coords():
    torch.manual_seed(0)
    spatial = STevs(tiny_config("stevs_spatial_only")).eval()
    batch, other = tiny_batch(seed=1), tiny_batch(seed=2)
    a, _ = spatial.predict(batch["patch"], batch["coords"], n_samples=0)
    b, _ = spatial.predict(other["patch"], batch["coords"], n_samples=0)
    torch.testing.assert_close(a, b)
    image = STevs(tiny_config("stevs_image_only")).eval()
    a, _ = image.predict(batch["patch"], batch["coords"], n_samples=0)
    b, _ = image.predict(batch["patch"], other["coords"], n_samples=0)
    torch.testing.assert_close(a, b)


def test_predictions_come_back_in_the_targets_normalisation():
    torch.manual_seed(0)
    model = STevs(tiny_config("stevs_image_only")).eval()
    batch = tiny_batch()
    raw_mean, raw_std = model.predict(batch["patch"], batch["coords"], n_samples=0)
    gene_mean, gene_std = torch.linspace(1, 2, 6), torch.linspace(0.5, 3, 6)
    model.set_normalisation(gene_mean, gene_std)
    mean, std = model.predict(batch["patch"], batch["coords"], n_samples=0)
    torch.testing.assert_close(mean, raw_mean * gene_std + gene_mean)
    torch.testing.assert_close(std, raw_std * gene_std)


def test_negative_binomial_likelihood_adds_a_finite_count_term():
    torch.manual_seed(0)
    model = STevs(tiny_config("stevs", likelihood="nb"))
    output = model(tiny_batch())
    assert "nb" in output.terms and torch.isfinite(output.terms["nb"])
    assert output.terms["nb"] > 0
    output.loss.backward()
    assert model.decoder.log_theta.grad is not None


def test_small_model_overfits_a_small_batch():
    torch.manual_seed(0)
    model = STevs(tiny_config("stevs", dropout=0.0, latent_dim=8, hidden_dim=64))
    batch = tiny_batch(n=16)
    batch["target"] = batch["target"] * 2 + 1
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def eval_mse() -> float:
        mean, _ = model.predict(batch["patch"], batch["coords"], n_samples=0)
        return float(((mean - batch["target"]) ** 2).mean())

    first_loss = None
    before = eval_mse()
    for _ in range(200):
        output = model(batch, kl_weight=0.01)
        first_loss = first_loss if first_loss is not None else float(output.loss.detach())
        optimiser.zero_grad()
        output.loss.backward()
        optimiser.step()
    assert eval_mse() < before / 10
    assert float(output.loss.detach()) < first_loss - 1.0


def test_model_resizes_patches_of_another_size():
    torch.manual_seed(0)
    model = STevs(tiny_config("stnet"))
    batch = tiny_batch(size=24)
    mean, _ = model.predict(batch["patch"], batch["coords"])
    assert mean.shape == (8, 6)


def test_config_round_trips_through_json():
    import json

    config = tiny_config("stevs_concat")
    again = STevsConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="unknown method"):
        STevsConfig.for_method("stevs_magic", n_genes=3, backbone=TINY_SWIN)


# ----------------------------------------------------------------------------- backbones


def test_second_backbone_family_resnet_works_through_the_same_code():
    torch.manual_seed(0)
    spec = BackboneSpec("resnet18", img_size=32)
    model = STevs(STevsConfig.for_method("stevs", n_genes=5, backbone=spec, latent_dim=4))
    assert not model.backbone.channels_last_output
    assert model.backbone.feature_dim == sum(model.backbone.stage_channels) == 1024
    output = model(tiny_batch(n=4, n_genes=5, size=32))
    output.loss.backward()
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_file_loads_the_weights_the_test_saved(tmp_path, suffix):
    from safetensors.torch import save_file

    torch.manual_seed(123)
    source = timm.create_model("resnet18", num_classes=7)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    preset = get_preset("cpu_small", backbone="resnet18", weights=str(path))
    assert preset.backbone.weights == "file"
    backbone = ImageBackbone(preset.backbone)
    loaded = backbone.body.state_dict()
    for key in ("conv1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight"):
        torch.testing.assert_close(loaded[key], source.state_dict()[key], rtol=0, atol=0)


def test_local_weights_that_do_not_fit_or_are_not_weights_raise_input_errors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "r18.safetensors"
    save_file(
        {k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()},
        str(path),
    )
    with pytest.raises(StevsInputError, match="do not fit"):
        ImageBackbone(BackboneSpec("resnet34", weights="file", weights_path=str(path)))
    pickled = tmp_path / "object.pt"
    torch.save({"model": np.array([1, 2])}, pickled)  # not loadable with weights_only=True
    with pytest.raises(StevsInputError, match=str(pickled.name)):
        ImageBackbone(BackboneSpec("resnet18", weights="file", weights_path=str(pickled)))
    with pytest.raises(StevsInputError, match="does not exist"):
        ImageBackbone(BackboneSpec("resnet18", weights="file", weights_path=str(tmp_path / "x")))


def test_offline_timm_weights_give_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(StevsInputError, match="HF_HUB_OFFLINE=1.*--weights FILE"):
        ImageBackbone(BackboneSpec("resnet18", weights="timm"))


def test_effnet_lite0_package_weights_load_strictly_into_timm():
    state = effnet_lite0_package_state_dict()
    model = timm.create_model("tf_efficientnet_lite0")
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert len(state) == len(model.state_dict())


def test_effnet_lite0_pretrained_features_separate_images_far_more_than_random():
    yy, xx = np.mgrid[0:224, 0:224]
    stripes = np.stack(
        [(np.sin(xx / 6) > 0) * 200 + 30, (np.sin(yy / 9) > 0) * 150 + 50, 0 * xx + 120]
    )
    blob = np.stack(
        [
            255 * np.exp(-((xx - 112) ** 2 + (yy - 112) ** 2) / 3000),
            0 * xx + 200,
            100 + 50 * np.cos(xx / 30),
        ]
    )
    images = torch.tensor(np.stack([stripes, blob]), dtype=torch.uint8)

    def separation(weights: str) -> float:
        torch.manual_seed(0)
        preset = get_preset("effnet_lite0_in1k", weights=None if weights != "none" else "none")
        backbone = ImageBackbone(preset.backbone).eval()
        with torch.no_grad():
            f = backbone(images)
        return float((f[0] - f[1]).norm() / (f[0].norm() + f[1].norm()))

    pretrained, random_init = separation("package"), separation("none")
    assert pretrained > 2.5 * random_init


# ----------------------------------------------------------------------------- presets


def test_presets_state_their_patches_and_build(tmp_path):
    preset = get_preset("cpu_small")
    assert (preset.patch_px, preset.backbone.img_size) == (64, 64)
    assert preset.patch_um == pytest.approx(preset.patch_px * preset.mpp)
    assert get_preset("swin_t").backbone.name == "swin_tiny_patch4_window7_224"
    assert get_preset("swin_t").patch_px == 224
    backbone = ImageBackbone(preset.backbone)
    assert backbone.channels_last_output and backbone.feature_dim == 32 + 64 + 128 + 256
    with pytest.raises(StevsInputError, match="unknown preset"):
        get_preset("gpu_huge")


# ----------------------------------------------------------------------------- training aids


def test_gaussian_nll_plain_matches_torch_and_beta_nll_gives_the_mean_a_squared_error_gradient():
    from stevs.models.poe import gaussian_nll

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, generator=g)
    logvar = torch.randn(5, 7, generator=g)
    expected = -Normal(torch.zeros(5, 7), torch.exp(0.5 * logvar)).log_prob(x).sum(-1)
    assert torch.allclose(gaussian_nll(x, torch.zeros(5, 7), logvar), expected, atol=1e-5)

    gradients = {}
    for power in (0.0, 1.0):
        mean = torch.zeros(5, 7, requires_grad=True)
        gaussian_nll(x, mean, logvar, variance_power=power).sum().backward()
        gradients[power] = mean.grad
    # plain NLL: the mean's gradient shrinks with the variance; beta-NLL with power 1: it is
    # exactly the squared error's, whatever variance the model claims
    assert torch.allclose(gradients[0.0], -x * torch.exp(-logvar), atol=1e-5)
    assert torch.allclose(gradients[1.0], -x, atol=1e-5)


def test_image_expert_starts_narrow_and_spatial_expert_starts_as_broad_as_the_prior():
    torch.manual_seed(0)
    model = STevs(tiny_config("stevs", latent_dim=8, hidden_dim=32)).eval()
    out = model.inference(tiny_batch()["patch"], tiny_batch()["coords"])
    img_logvar = out["q_img"][1].mean().item()
    spatial_logvar = out["q_spatial"][1].mean().item()
    assert img_logvar == pytest.approx(-4.0, abs=1.0)
    assert spatial_logvar == pytest.approx(0.0, abs=1.0)
    # so the product follows the image expert's mean at the start
    mu, _ = out["qz"]
    img_mu = out["q_img"][0]
    assert torch.corrcoef(torch.stack([mu.flatten(), img_mu.flatten()]))[0, 1] > 0.9


def test_coordinate_augmentation_keeps_distances_from_the_centre_and_draws_all_symmetries():
    from stevs.training.batches import augment_coords

    torch.manual_seed(0)
    point = torch.tensor([[0.6, -0.2]]).repeat(4000, 1)
    moved = augment_coords(point, jitter=0.0)
    assert torch.allclose(moved.norm(dim=1), point.norm(dim=1), atol=1e-6)
    images = {tuple(round(v, 4) for v in row) for row in moved.tolist()}
    assert len(images) == 8  # the square's 8 symmetries (flips, 90-degree turns, transpose)
    jittered = augment_coords(point, jitter=0.05)
    radius = jittered.norm(dim=1)
    assert not torch.allclose(jittered.abs().sort(1).values, moved.abs().sort(1).values)
    assert float((radius - point.norm(dim=1)).abs().max()) < 0.05 * 0.64 + 0.05 * 1.5


# ------------------------------------------------- torch.distributions vs the old formulas
# The hand-written formulas the package used before it switched to torch.distributions,
# kept here as references.


def _old_clamp(logvar: torch.Tensor) -> torch.Tensor:
    return logvar.clamp(-12.0, 8.0)


def _old_kl_normal(mu_q, logvar_q, mu_p, logvar_p):
    logvar_q, logvar_p = _old_clamp(logvar_q), _old_clamp(logvar_p)
    var_ratio = (torch.exp(logvar_q) + (mu_q - mu_p) ** 2) * torch.exp(-logvar_p)
    return (0.5 * (logvar_p - logvar_q + var_ratio - 1)).sum(-1)


def _old_kl_standard_normal(mu, logvar):
    logvar = _old_clamp(logvar)
    return 0.5 * (torch.exp(logvar) + mu**2 - 1 - logvar).sum(-1)


def _old_gaussian_nll(x, mean, logvar, variance_power=0.0):
    logvar = _old_clamp(logvar)
    nll = 0.5 * (logvar + (x - mean) ** 2 * torch.exp(-logvar) + np.log(2 * np.pi))
    if variance_power > 0:
        nll = nll * torch.exp(variance_power * logvar.detach())
    return nll.sum(-1)


def _old_negative_binomial_nll(counts, library_size, rate_logit, log_theta):
    log_mu = torch.log(library_size.clamp_min(1.0)).unsqueeze(-1) + rate_logit
    theta = torch.exp(log_theta)
    log_theta_mu = torch.logaddexp(log_theta, log_mu)
    log_prob = (
        theta * (log_theta - log_theta_mu)
        + counts * (log_mu - log_theta_mu)
        + torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1.0)
    )
    return -log_prob.sum(-1)


def _old_sample_negative_binomial(mu, log_theta):
    theta = torch.exp(log_theta)
    rate = torch.distributions.Gamma(theta, theta / mu.clamp_min(1e-8)).sample()
    return torch.poisson(rate)


def test_kl_terms_equal_the_old_closed_forms_including_clamped_extremes():
    (m1, lv1), (m2, lv2) = random_gaussians(64, 32, 11), random_gaussians(64, 32, 12)
    lv1 = lv1 * 8  # reaches both clamps (-12, 8)
    assert (lv1 < -12).any() and (lv1 > 8).any()
    torch.testing.assert_close(
        kl_normal(m1, lv1, m2, lv2), _old_kl_normal(m1, lv1, m2, lv2), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        kl_standard_normal(m1, lv1), _old_kl_standard_normal(m1, lv1), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_gaussian_nll_and_its_gradients_equal_the_old_formula(power):
    from stevs.models.poe import gaussian_nll

    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 50, generator=g)
    grads = []
    for fn in (gaussian_nll, _old_gaussian_nll):
        mean = torch.randn(32, 50, generator=torch.Generator().manual_seed(5)).requires_grad_()
        logvar = (
            torch.randn(32, 50, generator=torch.Generator().manual_seed(6)) * 6
        ).requires_grad_()
        value = fn(x, mean, logvar, power)
        value.sum().backward()
        grads.append((value.detach(), mean.grad, logvar.grad))
    for new, old in zip(*grads, strict=True):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_negative_binomial_nll_and_gradients_equal_the_old_formula(dtype):
    """Same formula: equal to 1e-5 in float64; in float32 both carry rounding error of the
    lgamma differences at large theta (~2e-3 on d/dlog_theta), so there the gradients are
    compared with the float64 reference instead, and torch's may not be the worse one."""
    from stevs.models.decoders import negative_binomial_nll

    g = torch.Generator().manual_seed(7)
    counts = torch.randint(0, 200, (32, 40), generator=g).double()
    counts[:, :5] = 0.0
    library = torch.randint(100, 20000, (32,), generator=g).double()
    rate0 = torch.randn(32, 40, generator=g, dtype=torch.float64) * 2 - 7
    log_theta0 = torch.randn(32, 40, generator=g, dtype=torch.float64) * 3

    def run(fn, dt):
        rate, log_theta = (t.to(dt).detach().requires_grad_() for t in (rate0, log_theta0))
        value = fn(counts.to(dt), library.to(dt), rate, log_theta)
        value.sum().backward()
        return [t.double() for t in (value.detach(), rate.grad, log_theta.grad)]

    new, old = run(negative_binomial_nll, dtype), run(_old_negative_binomial_nll, dtype)
    torch.testing.assert_close(new[0], old[0], rtol=1e-5, atol=1e-5)
    if dtype == torch.float64:
        for a, b in zip(new[1:], old[1:], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        return
    reference = run(_old_negative_binomial_nll, torch.float64)
    for a, b, ref in zip(new[1:], old[1:], reference[1:], strict=True):
        assert (a - ref).abs().max() <= 1.5 * (b - ref).abs().max() + 1e-6
        torch.testing.assert_close(a, ref, rtol=1e-3, atol=1e-2)


def test_negative_binomial_sampling_equals_the_old_gamma_poisson_draws():
    from stevs.models.decoders import sample_negative_binomial

    mu = torch.tensor([0.5, 3.0, 40.0]).repeat(20000, 1)
    log_theta = torch.tensor([0.0, 1.0, -1.0]).repeat(20000, 1)
    torch.manual_seed(0)
    new = sample_negative_binomial(mu, log_theta)
    torch.manual_seed(0)
    old = _old_sample_negative_binomial(mu, log_theta)
    # same Gamma-Poisson draws from the same seed (rates agree to float rounding)
    assert (new == old).float().mean() > 0.999
    theta = torch.exp(log_theta[0])
    torch.testing.assert_close(new.mean(0), mu[0], rtol=0.05, atol=0.02)
    torch.testing.assert_close(new.var(0), mu[0] + mu[0] ** 2 / theta, rtol=0.1, atol=0.05)


def test_reparameterize_is_mu_plus_sigma_eps_and_differentiable():
    from stevs.models.poe import reparameterize

    mu, logvar = random_gaussians(8, 4, 13)
    mu.requires_grad_()
    torch.manual_seed(1)
    z = reparameterize(mu, logvar)
    torch.manual_seed(1)
    expected = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    torch.testing.assert_close(z, expected)
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))


def test_methods_table_is_the_registry_s_torch_switches():
    from stevs.methods import REGISTRY

    METHODS = torch_switches()
    torch_methods = {name: dict(m.switches) for name, m in REGISTRY.items() if m.kind == "torch"}
    assert METHODS == torch_methods
    # the table the module held before the registry (plus the context / linear-path
    # switches of the methods that must not use them), as the reference
    assert METHODS == {
        "stevs": {},
        "stevs_image_only": {"use_spatial": False, "align": None},
        "stevs_spatial_only": {
            "use_image": False, "align": None, "context": "none", "linear_path": "none"
        },
        "stevs_no_align": {"align": None},
        "stevs_concat": {"combine": "concat", "align": None},
        "stevs_tail": {"train_tail_stages": 1},
        "stnet": {"head": "regression", "use_spatial": False, "align": None, "context": "none"},
    }  # fmt: skip
    assert "ridge_color" not in METHODS
    config = STevsConfig.for_method("stevs_concat", n_genes=3, backbone=TINY_SWIN)
    assert config.combine == "concat" and config.align is None


def test_create_model_refuses_latent_dim_zero_instead_of_using_the_presets():
    from stevs.models import create_model

    preset = get_preset("cpu_small")
    genes = [f"g{i}" for i in range(4)]
    assert create_model("stevs", preset, genes, None, latent_dim=3).config.latent_dim == 3
    assert create_model("stevs", preset, genes, None).config.latent_dim == preset.latent_dim
    for bad in (0, -2):
        with pytest.raises(ValueError, match="latent_dim must be >= 1"):
            create_model("stevs", preset, genes, None, latent_dim=bad)


def _build(spec: BackboneSpec, seed: int) -> tuple[ImageBackbone, torch.Tensor]:
    torch.manual_seed(seed)
    backbone = ImageBackbone(spec)
    return backbone, torch.rand(4)  # the next draw after the build


def test_a_remembered_build_is_the_build_it_stands_for(monkeypatch, tmp_path):
    """From the same RNG state, a build from the process's memo equals a fresh build (weights
    and the RNG state it leaves); another state builds anew; each build is its own copy."""
    from stevs.models import backbones

    monkeypatch.setattr(backbones, "_BUILT", {})
    built = []
    monkeypatch.setattr(
        backbones, "create_feature_model", lambda s: built.append(s) or timm.create_model(
            s.name, pretrained=False, features_only=True, **s.timm_kwargs
        ),
    )  # fmt: skip
    first, draw = _build(TINY_SWIN, 3)
    again, again_draw = _build(TINY_SWIN, 3)
    assert len(built) == 1 and torch.equal(draw, again_draw)
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    next(again.parameters()).data.add_(1.0)  # training one copy leaves the others alone
    backbones._BUILT.clear()
    fresh, fresh_draw = _build(TINY_SWIN, 3)
    assert len(built) == 2 and torch.equal(draw, fresh_draw)
    pairs = zip(first.parameters(), fresh.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    other, _ = _build(TINY_SWIN, 4)  # random weights: another state, another build
    assert len(built) == 3
    assert not torch.equal(next(other.parameters()), next(first.parameters()))


def test_loading_a_model_leaves_the_callers_rng_alone(tmp_path):
    from stevs.io.model_dir import ModelDir
    from stevs.models import load_model, save_model

    torch.manual_seed(0)
    model = STevs(tiny_config())
    genes = [f"g{i}" for i in range(6)]
    config = {"method": "stevs", "model": model.config.to_dict(), "training": {}, "genes": genes}
    save_model(ModelDir(tmp_path / "m"), model.state_dict(), config, {"method": "stevs"})
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    loaded, _ = load_model(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
