"""Expression simulation of the demo: gene model, spot log-rates, negative binomial counts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stevs.demo.constants import (
    DEFAULT_N_GENES,
    LIBRARY_SCALE,
    MARKER_BASELINE,
    MITO_GENES,
    N_MARKERS_PER_TYPE,
    PATIENTS,
    RIBO_GENES,
    TISSUE_TYPES,
)
from stevs.demo.fields import seeded_rng


@dataclass(frozen=True)
class GeneModel:
    """Log-linear gene model shared by all slides; patients shift it a little."""

    names: tuple[str, ...]
    baseline: np.ndarray  # (G,)
    effects: np.ndarray  # (G, 4)
    dispersion: np.ndarray  # (G,)
    patient_baseline_shift: dict[str, np.ndarray]
    patient_effect_shift: dict[str, np.ndarray]

    def for_patient(self, patient: str) -> tuple[np.ndarray, np.ndarray]:
        """(baseline, effects) of one patient."""
        return (
            self.baseline + self.patient_baseline_shift[patient],
            self.effects + self.patient_effect_shift[patient],
        )


def make_gene_model(seed: int, n_genes: int = DEFAULT_N_GENES) -> GeneModel:
    """Markers per tissue type, weak/noise genes, sparse genes, mitochondrial and ribosomal."""
    rng = seeded_rng(seed, 1)
    n_types = len(TISSUE_TYPES)
    n_other = n_genes - n_types * N_MARKERS_PER_TYPE - len(MITO_GENES) - len(RIBO_GENES)
    n_sparse = max(3, n_other // 10)
    names: list[str] = []
    baseline = np.zeros(n_genes)
    effects = np.zeros((n_genes, n_types))
    g = 0
    for k, tissue in enumerate(TISSUE_TYPES):
        for i in range(1, N_MARKERS_PER_TYPE + 1):
            names.append(f"{tissue.upper()}_{i}")
            baseline[g] = rng.uniform(MARKER_BASELINE - 0.4, MARKER_BASELINE + 0.4)
            effects[g, k] = rng.uniform(2.2, 3.2)  # zero elsewhere: type-specific
            g += 1
    for i in range(1, n_other + 1):
        names.append(f"GENE_{i:03d}")
        if i > n_other - n_sparse:  # zero in most spots
            baseline[g] = rng.uniform(-4.5, -3.5)
        else:
            baseline[g] = rng.normal(0.3, 0.8)
        effects[g] = rng.normal(0.0, 0.35, n_types)
        g += 1
    for name in MITO_GENES:
        names.append(name)
        baseline[g] = rng.uniform(2.8, 3.6)
        effects[g] = rng.normal(0.0, 0.25, n_types)
        g += 1
    for name in RIBO_GENES:
        names.append(name)
        baseline[g] = rng.uniform(2.2, 3.0)
        effects[g] = rng.normal(0.0, 0.25, n_types)
        g += 1
    dispersion = np.exp(rng.normal(math.log(0.12), 0.4, n_genes))
    # patients rescale the effects by ~10% and shift the baselines a little
    baseline_shift = {p: rng.normal(0.0, 0.1, n_genes) for p in PATIENTS}
    effect_shift = {
        p: effects * (np.exp(rng.normal(0.0, 0.1, effects.shape)) - 1.0) for p in PATIENTS
    }
    return GeneModel(tuple(names), baseline, effects, dispersion, baseline_shift, effect_shift)


def expected_expression(
    genes: GeneModel, patient: str, composition: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(log_rate (n, G), tissue fraction (n,)) of spots with composition (n, 5)."""
    baseline, effects = genes.for_patient(patient)
    tissue_fraction = 1.0 - composition[:, -1]
    tissue_share = composition[:, :-1] / np.maximum(tissue_fraction, 1e-6)[:, None]
    return baseline[None, :] + tissue_share @ effects.T, tissue_fraction


@dataclass(frozen=True)
class SpotExpression:
    """Noise-free expression of a slide's in-tissue spots."""

    log_rate: np.ndarray  # (n, G)
    tissue_fraction: np.ndarray  # (n,)
    size_factor: np.ndarray  # (n,) depth x spot size x tissue fraction
    expected: np.ndarray  # (n, G) exp(log_rate) * size_factor


def simulate_spot_expression(
    genes: GeneModel,
    patient: str,
    composition: np.ndarray,
    depth_factor: float,
    rng: np.random.Generator,
) -> SpotExpression:
    """Log-rates and expected counts of spots with composition (n, 5); draws spot sizes."""
    log_rate, tissue_fraction = expected_expression(genes, patient, composition)
    spot_size = np.exp(rng.normal(0.0, 0.35, composition.shape[0]))
    size_factor = LIBRARY_SCALE * depth_factor * spot_size * tissue_fraction
    expected = np.exp(log_rate) * size_factor[:, None]
    return SpotExpression(log_rate, tissue_fraction, size_factor, expected)


def draw_counts(genes: GeneModel, expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Negative binomial counts (gamma-Poisson) around ``expected`` (n, G), as int32."""
    phi = genes.dispersion[None, :]
    rate = rng.gamma(shape=1.0 / phi, scale=expected * phi)
    return rng.poisson(rate).astype(np.int32)
