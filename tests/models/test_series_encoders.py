"""Tests for the series branch: patch embedding, BiLSTM baseline and both TRANS-BLSTM variants."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from fusion.models.bilstm import BiLSTMEncoder
from fusion.models.blocks import masked_mean
from fusion.models.series_patch import SeriesEncoding, SeriesPatchEmbed, sinusoidal_positions
from fusion.models.trans_blstm import TransBLSTMBlock, TransBLSTMEncoder

DIM = 32
HOURS = 24
ENCODERS: dict[str, Callable[[int], nn.Module]] = {
    "bilstm": lambda f: BiLSTMEncoder(f, hidden=DIM, layers=2),
    "trans_blstm_1": lambda f: TransBLSTMEncoder(f, dim=DIM, depth=2, heads=4, variant=1),
    "trans_blstm_2": lambda f: TransBLSTMEncoder(f, dim=DIM, depth=2, heads=4, variant=2),
}


def make_encoder(name: str, in_features: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return ENCODERS[name](in_features).eval()


def linears_outside_attention(block: TransBLSTMBlock) -> int:
    return sum(
        isinstance(module, nn.Linear)
        for name, module in block.named_modules()
        if not name.startswith("attn")
    )


@pytest.mark.parametrize("name", ENCODERS)
def test_encoder_shapes(name: str) -> None:
    encoder = make_encoder(name)
    series = torch.randn(3, 672, 5)
    mask = torch.rand(3, 672) > 0.2
    out = encoder(series, mask)
    assert isinstance(out, SeriesEncoding)
    assert encoder.out_dim == DIM
    assert out.tokens.shape == (3, 28, DIM)
    assert out.mask.shape == (3, 28) and out.mask.dtype == torch.bool
    assert out.pooled.shape == (3, DIM)


def test_patch_embed_tokens_and_mask() -> None:
    torch.manual_seed(0)
    embed = SeriesPatchEmbed(in_features=2, dim=8, patch_hours=HOURS)
    series = torch.zeros(1, 3 * HOURS, 2)
    mask = torch.ones(1, 3 * HOURS, dtype=torch.bool)
    mask[0, HOURS : 2 * HOURS] = False  # day 1 wholly absent
    mask[0, 2 * HOURS + 5] = False  # day 2 missing one hour
    tokens, token_mask = embed(series, mask)
    assert token_mask.tolist() == [[True, False, True]]
    assert torch.equal(tokens[0, 1], torch.zeros(8))
    # The same zero values read differently when the hour is flagged absent: day 0 (all real
    # zeros) and day 2 (one filled hour) must not get the same token.
    assert not torch.allclose(tokens[0, 0], tokens[0, 2])
    # A patch is exactly a linear function of its hours' values and presence flags.
    series = torch.randn(1, 3 * HOURS, 2)
    tokens, _ = embed(series, mask)
    flags = mask.float().unsqueeze(-1)
    day2 = torch.cat([series * flags, flags], dim=-1)[0, 2 * HOURS :].reshape(-1)
    torch.testing.assert_close(tokens[0, 2], embed.proj(day2))


def test_patch_embed_rejects_length_not_multiple() -> None:
    embed = SeriesPatchEmbed(in_features=5, dim=8, patch_hours=HOURS)
    with pytest.raises(ValueError, match=r"T=100.*patch_hours=24"):
        embed(torch.zeros(2, 100, 5), torch.ones(2, 100, dtype=torch.bool))
    encoder = make_encoder("trans_blstm_1")
    with pytest.raises(ValueError, match=r"T=100.*patch_hours=24"):
        encoder(torch.zeros(2, 100, 5), torch.ones(2, 100, dtype=torch.bool))


def test_masked_mean_and_positions() -> None:
    tokens = torch.arange(12.0).reshape(2, 3, 2)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    pooled = masked_mean(tokens, mask)
    torch.testing.assert_close(pooled[0], (tokens[0, 0] + tokens[0, 2]) / 2)
    assert torch.equal(pooled[1], torch.zeros(2))

    pos = sinusoidal_positions(28, DIM)
    assert pos.shape == (28, DIM)
    torch.testing.assert_close(pos[0, 0::2], torch.zeros(DIM // 2))
    torch.testing.assert_close(pos[0, 1::2], torch.ones(DIM // 2))
    torch.testing.assert_close(pos[3, 0], torch.tensor(math.sin(3.0)))
    assert torch.unique(pos, dim=0).shape[0] == 28


def test_variant_1_replaces_feed_forward_with_blstm() -> None:
    block = TransBLSTMBlock(DIM, heads=4, variant=1)
    assert block.mlp is None
    assert any(isinstance(m, nn.LSTM) for m in block.modules())
    lstm = next(m for m in block.modules() if isinstance(m, nn.LSTM))
    assert lstm.bidirectional and lstm.hidden_size * 2 == DIM
    assert linears_outside_attention(block) == 0


def test_variant_2_has_feed_forward_and_blstm() -> None:
    torch.manual_seed(0)
    one = TransBLSTMBlock(DIM, heads=4, variant=1, mlp_ratio=2.0)
    two = TransBLSTMBlock(DIM, heads=4, variant=2, mlp_ratio=2.0)
    assert any(isinstance(m, nn.LSTM) for m in two.modules())
    assert linears_outside_attention(two) == 2
    ffn_params = (DIM * 2 * DIM + 2 * DIM) + (2 * DIM * DIM + DIM)
    count = sum(p.numel() for p in one.parameters())
    assert sum(p.numel() for p in two.parameters()) == count + ffn_params


@pytest.mark.parametrize("variant", [1, 2])
def test_block_matches_paper_wiring(variant: int) -> None:
    torch.manual_seed(0)
    block = TransBLSTMBlock(DIM, heads=4, variant=variant).eval()
    x = torch.randn(2, 7, DIM)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    seen: list[Tensor] = []
    handle = block.lstm.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    with torch.no_grad():
        y = block(x, mask)
        handle.remove()
        h = block.norm1(x + block.attn(x, x, mask))
        if variant == 1:
            torch.testing.assert_close(seen[0], h)  # BLSTM in the feed-forward slot
            expected = block.norm2(h + block.lstm(h))
        else:
            assert torch.equal(seen[0], x)  # BLSTM reads the block input, in parallel
            expected = block.norm2(h + block.mlp(h) + block.lstm(x))
        torch.testing.assert_close(y, expected)
        for p in block.lstm.parameters():
            p.zero_()
        assert not torch.allclose(block(x, mask), y, atol=1e-4)


@pytest.mark.parametrize("variant", [1, 2])
def test_block_never_attends_to_masked_tokens(variant: int) -> None:
    torch.manual_seed(0)
    block = TransBLSTMBlock(DIM, heads=4, variant=variant).eval()
    with torch.no_grad():
        for p in block.lstm.parameters():
            p.zero_()  # leave attention as the only path between tokens
        x = torch.randn(2, 6, DIM)
        mask = torch.tensor([[True, True, False, True, False, True], [False] * 6])
        out = block(x, mask)
        changed = x.clone()
        changed[0, 2] += 10.0
        changed[0, 4] -= 10.0
        out_changed = block(changed, mask)
    present = mask[0]
    torch.testing.assert_close(out_changed[0, present], out[0, present])
    assert not torch.allclose(out_changed[0, ~present], out[0, ~present])
    assert torch.isfinite(out).all()  # the all-masked row does not yield NaN


@pytest.mark.parametrize("name", ENCODERS)
def test_absent_hours_do_not_change_pooled(name: str) -> None:
    encoder = make_encoder(name)
    torch.manual_seed(1)
    series = torch.rand(2, 7 * HOURS, 5)
    mask = torch.ones(2, 7 * HOURS, dtype=torch.bool)
    mask[:, 3 * HOURS : 4 * HOURS] = False  # day 3 wholly absent
    mask[:, 5 * HOURS + 2 : 5 * HOURS + 9] = False  # part of day 5 absent
    with torch.no_grad():
        base = encoder(series, mask)
        noisy = series.clone()
        noisy[~mask] = torch.randn(int((~mask).sum()), 5) * 100.0
        same = encoder(noisy, mask)
        present = series.clone()
        present[:, 1 * HOURS : 2 * HOURS] += 1.0
        moved = encoder(present, mask)
    assert base.mask[:, 3].eq(False).all() and base.mask[:, 5].all()
    torch.testing.assert_close(same.pooled, base.pooled)
    assert not torch.allclose(moved.pooled, base.pooled, atol=1e-4)


def test_bilstm_is_bidirectional() -> None:
    encoder = make_encoder("bilstm")
    series = torch.rand(1, 7 * HOURS, 5)
    mask = torch.ones(1, 7 * HOURS, dtype=torch.bool)
    with torch.no_grad():
        base = encoder(series, mask).tokens
        late = series.clone()
        late[:, -HOURS:] += 1.0
        first_changed = encoder(late, mask).tokens
        early = series.clone()
        early[:, :HOURS] += 1.0
        last_changed = encoder(early, mask).tokens
    assert not torch.allclose(first_changed[0, 0], base[0, 0], atol=1e-5)  # backward direction
    assert not torch.allclose(last_changed[0, -1], base[0, -1], atol=1e-5)  # forward direction


@pytest.mark.parametrize("name", ENCODERS)
def test_all_masked_sample_is_finite(name: str) -> None:
    encoder = make_encoder(name)
    series = torch.randn(2, 4 * HOURS, 5)
    mask = torch.ones(2, 4 * HOURS, dtype=torch.bool)
    mask[1] = False
    out = encoder(series, mask)
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    assert torch.equal(out.pooled[1], torch.zeros(DIM))
    out.pooled.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="even"):
        BiLSTMEncoder(5, hidden=33)
    with pytest.raises(ValueError, match="variant"):
        TransBLSTMBlock(DIM, heads=4, variant=3)  # type: ignore[arg-type]


def daily_shape_task(n: int, days: int = 7) -> tuple[Tensor, Tensor, Tensor]:
    """Two classes of activity series: a morning peak (label 0) or an evening peak (label 1)."""
    hour = torch.arange(days * HOURS) % HOURS
    labels = torch.arange(n) % 2
    peak = torch.where(labels == 0, 8, 19).unsqueeze(1)
    counts = torch.exp(-((hour.unsqueeze(0) - peak) ** 2) / 8.0) + 0.1 * torch.rand(n, days * HOURS)
    series = torch.stack([counts, torch.sin(2 * math.pi * hour / HOURS).expand(n, -1)], dim=-1)
    mask = torch.rand(n, days * HOURS) > 0.2
    return series, mask, labels


@pytest.mark.parametrize("name", ENCODERS)
def test_training_reduces_loss(name: str) -> None:
    torch.manual_seed(0)
    encoder = ENCODERS[name](2)
    head = nn.Linear(encoder.out_dim, 2)
    series, mask, labels = daily_shape_task(16)
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(12):
        loss = nn.functional.cross_entropy(head(encoder(series, mask).pooled), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
