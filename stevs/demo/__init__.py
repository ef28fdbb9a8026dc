"""Synthetic H&E slides with known spatial expression, for the demo and the tests.

``make_demo(out_dir)`` (or ``stevs demo --out DIR``) writes a small, fully synthetic
Visium study whose ground truth is known:

- a hidden tissue-composition field per slide (``tumour``, ``stroma``, ``fat``, ``immune``
  and ``background`` glass outside an irregular tissue outline), made of smooth random
  fields pushed through a low-temperature softmax so regions are fairly pure;
- an H&E rendering of that field (Beer-Lambert mix of haematoxylin and eosin with a
  per-slide stain shift): dense large nuclei for tumour, wavy eosin fibres with sparse
  spindle nuclei for stroma, white adipocytes with thin pink membranes for fat, small dark
  round nuclei packed tight for immune infiltrates; saved as a pyramidal tiled TIFF
  (RGB JPEG tiles, reduced levels as ``subfiletype=1`` pages of the main chain, resolution
  in centimetres) that OpenSlide opens with its microns per pixel;
- a Space Ranger-style ``outs/`` folder on the Visium geometry (55 µm spots on a 100 µm
  hexagonal pitch) with a 10x HDF5 v3 count matrix of the in-tissue spots, whose counts are
  negative binomial draws around a log-mean that follows the spot's tissue composition;
- ground truth per slide in ``truth/{slide}.npz`` (see
  :data:`~stevs.demo.constants.TRUTH_KEYS`), an H&E-only slide ``demo_heonly`` with
  ``predict.tsv``, and the sample sheet ``samples.tsv``, which is written last so an
  interrupted run never looks complete.

Everything is a deterministic function of the seed: rerunning gives the same bytes, and
slide ``demo_i`` does not depend on how many slides were asked for.

Modules, by stage: :mod:`~stevs.demo.constants` (fixed settings, truth keys),
:mod:`~stevs.demo.layout` (tissue composition, textures, nuclei, stain, spot grid),
:mod:`~stevs.demo.genes` (gene model, spot expression, counts), :mod:`~stevs.demo.render`
(H&E rendering, pyramidal TIFF), :mod:`~stevs.demo.spaceranger` (``outs/`` writers),
:mod:`~stevs.demo.slide` (one slide end to end) and :mod:`~stevs.demo.study` (the whole
set, sample sheets, README, the ``stevs demo`` command).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["add_arguments", "make_demo", "run"]


def __getattr__(name: str) -> Any:
    """``make_demo``, ``add_arguments`` and ``run`` of :mod:`~stevs.demo.study`, imported on
    first use: the workflow reads :mod:`~stevs.demo.constants` while Snakemake parses its
    rules, without the generator's image libraries."""
    if name not in __all__:
        raise AttributeError(f"module 'stevs.demo' has no attribute {name!r}")
    return getattr(importlib.import_module("stevs.demo.study"), name)
