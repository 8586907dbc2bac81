"""Patch tokens for an hourly activity series, shared by the series encoders.

The series is cut into non-overlapping patches of ``patch_hours`` hours (a day by default), each
flattened and projected linearly to one token, as images are cut into patches in ViT (Dosovitskiy
et al., 2021, "An Image is Worth 16x16 Words", arXiv:2010.11929) and series into patches in
PatchTST (Nie et al., 2023, "A Time Series is Worth 64 Words", arXiv:2211.14730). The hourly
presence mask is fed in as one more input channel, so an absent hour (filled with 0) is not
confused with a real count of 0. Positions use the fixed sinusoids of Vaswani et al. (2017,
"Attention Is All You Need", arXiv:1706.03762).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


class SeriesEncoding(NamedTuple):
    """What a series encoder returns.

    Attributes:
        tokens: ``(B, N, D)`` one vector per patch.
        mask: ``(B, N)`` bool, True where the patch has at least one present hour.
        pooled: ``(B, D)`` mean of ``tokens`` over present patches (zeros if none is present).
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor


def sinusoidal_positions(
    length: int,
    dim: int,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fixed sinusoidal position encodings ``(length, dim)`` (Vaswani et al., 2017, sec. 3.5).

    Even columns hold ``sin(pos / 10000^(2i/dim))``, odd columns the matching cosine.
    """
    if dim % 2 != 0:
        raise ValueError(f"sinusoidal positions need an even dim, got dim={dim}")
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    angles = position * frequency
    encoding = torch.empty(length, dim, device=device, dtype=torch.float32)
    encoding[:, 0::2] = torch.sin(angles)
    encoding[:, 1::2] = torch.cos(angles)
    return encoding.to(dtype)


class SeriesPatchEmbed(nn.Module):
    """Cut an hourly series into patches of ``patch_hours`` hours and project each to a token.

    Each hour contributes its ``in_features`` values (zeroed where the hour is absent) plus its
    presence flag, so a patch is ``patch_hours * (in_features + 1)`` numbers, projected linearly
    to ``dim``. A patch with no present hour gets an all-zero token.

    Args:
        in_features: F, the number of values per hour.
        dim: D, the token width.
        patch_hours: hours per patch; the series length T must be a multiple of it.
    """

    def __init__(self, in_features: int, dim: int, patch_hours: int = 24) -> None:
        super().__init__()
        if in_features < 1 or dim < 1 or patch_hours < 1:
            raise ValueError(
                f"in_features, dim and patch_hours must be positive, got "
                f"in_features={in_features}, dim={dim}, patch_hours={patch_hours}"
            )
        self.in_features = in_features
        self.dim = dim
        self.patch_hours = patch_hours
        self.proj = nn.Linear(patch_hours * (in_features + 1), dim)

    def forward(self, series: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Embed ``series (B, T, F)`` with presence ``mask (B, T)``.

        Returns:
            ``tokens (B, N, D)`` and ``token_mask (B, N)`` with ``N = T // patch_hours``;
            ``token_mask`` is True where any hour of the patch is present.
        """
        if series.ndim != 3 or series.shape[-1] != self.in_features:
            raise ValueError(
                f"series must be (B, T, F={self.in_features}), got shape {tuple(series.shape)}"
            )
        batch, hours, _ = series.shape
        if mask.shape != (batch, hours):
            raise ValueError(
                f"mask must be (B, T)={(batch, hours)} to match series, got {tuple(mask.shape)}"
            )
        if hours % self.patch_hours != 0:
            raise ValueError(
                f"series length T={hours} is not a multiple of patch_hours={self.patch_hours}"
            )
        num_patches = hours // self.patch_hours
        present = mask.to(torch.bool)
        flag = present.to(series.dtype).unsqueeze(-1)
        values = torch.where(present.unsqueeze(-1), series, torch.zeros_like(series))
        hourly = torch.cat([values, flag], dim=-1)
        patches = hourly.reshape(batch, num_patches, -1)
        token_mask = present.reshape(batch, num_patches, self.patch_hours).any(dim=-1)
        tokens = self.proj(patches) * token_mask.unsqueeze(-1).to(series.dtype)
        return tokens, token_mask
