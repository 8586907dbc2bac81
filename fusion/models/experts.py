"""Per-view experts beside the fusion module, pooled as a weighted product of experts.

A product of experts (Hinton 2002, "Training Products of Experts by Minimizing Contrastive
Divergence", Neural Computation 14(8)) multiplies the experts' distributions; with one weight per
expert it is the log-linear opinion pool (Genest & Zidek 1986, "Combining Probability
Distributions: A Critique and an Annotated Bibliography", Statistical Science 1(1)):

    logits = w_fused * z_fused + w_image * z_image + w_series * z_series

Each expert is a head trained on its own cross-entropy: ``z_image`` reads only the image,
``z_series`` only the series, ``z_fused`` both through MBT or MsIFT. An expert whose view is
missing for a sample adds nothing (its logits are zero there), so the pool degrades to the views
that are present. The weights are not learned with the heads: they are fitted by NLL on places the
model was not trained on (:func:`fusion.calibration.fit_view_weights`), so a view that memorised its
training places, as a series branch trained on 1-3 sensors per class does, gets the weight it
earns on new places, not the one it would earn on its training sensors.
"""

from __future__ import annotations

from torch import Tensor, nn


class ExpertHead(nn.Module):
    """``(B, D)`` pooled features → logits ``(B, K)``: LayerNorm, dropout, linear."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Dropout(dropout), nn.Linear(dim, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def pool_experts(heads: dict[str, Tensor], weights: Tensor) -> Tensor:
    """``sum_h weights[h] * heads[h]``: ``heads`` maps names (in the order of ``weights (H,)``) to
    logits ``(B, K)``."""
    if len(heads) != len(weights):
        raise ValueError(f"{len(heads)} heads but {len(weights)} weights")
    out = None
    for w, z in zip(weights, heads.values(), strict=True):
        out = w * z if out is None else out + w * z
    assert out is not None
    return out
