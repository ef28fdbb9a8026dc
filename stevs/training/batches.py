"""Batches for the training loop: collation, device transfer, augmentation, the seeded
epoch shuffle, in-memory embedding datasets and the DataLoader factory."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep strings as lists."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], Tensor) else list(values)
    return batch


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensor entries of a batch to ``device`` (non-blocking)."""
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v)
        for k, v in batch.items()
    }


def augment_patches(patch: Tensor) -> Tensor:
    """Random flips, 90-degree rotations and colour jitter, per patch, on the device.

    uint8 (B, 3, H, W) -> float (B, 3, H, W) in [0, 255]. Uses the global torch RNG of the
    device (saved in checkpoints), so a resumed run draws the same augmentations.

    Hand-written, not ``torchvision.transforms.v2.ColorJitter``: v2 draws one set of factors
    per call, so per-patch factors need a Python loop over the batch. Measured (1 CPU thread,
    64 patches of 64 px): this whole function (turns, flips and jitter) 14.5 ms per batch,
    v2's jitter alone in a per-patch loop 15.7 ms; on a GPU the loop is also 64 small kernel
    launches per operation instead of one.
    """
    x = patch.float()
    b = x.shape[0]
    device = x.device
    turns = torch.randint(0, 4 if x.shape[-1] == x.shape[-2] else 1, (b,), device=device)
    rotated = x.clone()
    for k in range(1, 4):
        chosen = turns == k
        if bool(chosen.any()):
            rotated[chosen] = torch.rot90(x[chosen], k, dims=(2, 3))
    flip = (torch.rand(b, device=device) < 0.5).view(b, 1, 1, 1)
    x = torch.where(flip, rotated.flip(3), rotated)
    brightness = torch.empty(b, 1, 1, 1, device=device).uniform_(0.85, 1.15)
    contrast = torch.empty(b, 1, 1, 1, device=device).uniform_(0.85, 1.15)
    saturation = torch.empty(b, 1, 1, 1, device=device).uniform_(0.85, 1.15)
    x = x * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * saturation + grey
    return x.clamp(0.0, 255.0)


def augment_coords(coords: Tensor, jitter: float = 0.05) -> Tensor:
    """Random flips and 90-degree rotations of per-slide normalised coordinates, per spot,
    plus a small scale and shift jitter.

    A slide's absolute layout says nothing about another slide's, so the spatial expert must
    not memorise where the training slides' regions lie: under these transforms it can only
    learn what survives them (how far a spot lies from the tissue's centre), and it learns to
    be uncertain otherwise, which keeps it from outvoting the image expert in the Product of
    Experts on held-out slides.
    """
    xy = coords.float()
    b = xy.shape[0]
    device = xy.device
    swap = torch.rand(b, 1, device=device) < 0.5
    xy = torch.where(swap, xy.flip(1), xy)
    signs = torch.randint(0, 2, (b, 2), device=device).float() * 2 - 1
    scale = torch.empty(b, 1, device=device).uniform_(1 - jitter, 1 + jitter)
    shift = torch.empty(b, 2, device=device).uniform_(-jitter, jitter)
    return xy * signs * scale + shift


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on ``seed + epoch`` (so a resumed epoch is identical)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class EmbeddingDataset(Dataset):
    """Dataset items with the patch replaced by its cached backbone embedding."""

    def __init__(self, embeddings: Tensor, items: Mapping[str, Any]) -> None:
        self.embeddings = embeddings
        self.items = items

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {k: v[index] for k, v in self.items.items()}
        item["embedding"] = self.embeddings[index]
        return item


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    sampler: Sampler | None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with the item collate, pinned memory on CUDA, persistent workers."""
    in_memory = isinstance(dataset, EmbeddingDataset)
    workers = 0 if in_memory else workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
