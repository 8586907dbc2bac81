"""Bidirectional LSTM series encoder, the baseline for the activity-series branch.

A bidirectional LSTM (Graves & Schmidhuber, 2005, "Framewise phoneme classification with
bidirectional LSTM and other neural network architectures", Neural Networks 18(5-6)) reads the
day tokens of :class:`~fusion.models.series_patch.SeriesPatchEmbed` forwards and backwards, so
every day's output sees the whole window. The LSTM cell is Hochreiter & Schmidhuber (1997,
"Long Short-Term Memory", Neural Computation 9(8)).
"""

from __future__ import annotations

from torch import Tensor, nn

from fusion.models.blocks import masked_mean
from fusion.models.series_patch import SeriesEncoding, SeriesPatchEmbed


class BiLSTM(nn.Module):
    """Stacked bidirectional LSTM mapping ``(B, N, in_dim)`` to ``(B, N, out_dim)``.

    Each direction has ``out_dim // 2`` units and their outputs are concatenated, so the output
    width is ``out_dim`` with no extra projection.

    Args:
        in_dim: input width.
        out_dim: output width; must be even.
        layers: number of stacked bidirectional layers.
        dropout: dropout between stacked layers (unused when ``layers == 1``).
    """

    def __init__(self, in_dim: int, out_dim: int, layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        if out_dim % 2 != 0:
            raise ValueError(f"a bidirectional LSTM needs an even output width, got {out_dim}")
        self.lstm = nn.LSTM(
            input_size=in_dim,
            hidden_size=out_dim // 2,
            num_layers=layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if layers > 1 else 0.0,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, N, in_dim)`` -> ``(B, N, out_dim)``, forward and backward states concatenated."""
        out, _ = self.lstm(x)
        return out


class BiLSTMEncoder(nn.Module):
    """Series encoder: day patches -> stacked bidirectional LSTM -> masked mean.

    Args:
        in_features: F, values per hour in the input series.
        hidden: D, the token width and the LSTM output width (``hidden // 2`` per direction).
        layers: stacked bidirectional LSTM layers.
        dropout: dropout on the patch tokens and between LSTM layers.
        patch_hours: hours per token.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int = 128,
        layers: int = 2,
        dropout: float = 0.1,
        patch_hours: int = 24,
    ) -> None:
        super().__init__()
        self.out_dim = hidden
        self.embed = SeriesPatchEmbed(in_features, hidden, patch_hours)
        self.drop = nn.Dropout(dropout)
        self.rnn = BiLSTM(hidden, hidden, layers=layers, dropout=dropout)

    def forward(self, series: Tensor, mask: Tensor) -> SeriesEncoding:
        """Encode ``series (B, T, F)`` with presence ``mask (B, T)``.

        Returns:
            :class:`SeriesEncoding` with ``tokens (B, N, D)``, ``mask (B, N)`` and
            ``pooled (B, D)``, the mean over patches with at least one present hour.
        """
        tokens, token_mask = self.embed(series, mask)
        tokens = self.rnn(self.drop(tokens))
        return SeriesEncoding(tokens, token_mask, masked_mean(tokens, token_mask))
