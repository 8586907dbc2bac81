"""The scaling curves of the quick benchmark (``tests/bench/conftest.py``): their points and
what grows with what."""

from __future__ import annotations

import pandas as pd

from fusion.bench.build import TIMM_VIT
from fusion.bench.scaling import FUSION_MODULES, QUICK, SERIES_HOURS
from tests.bench.conftest import Bench


def test_scaling_curves(bench: Bench) -> None:
    series = pd.read_csv(bench.output / "scaling_series.csv")
    for encoder in ("bilstm", "trans_blstm"):
        rows = series[series["series_encoder"] == encoder].set_index("hours")
        assert rows.index.tolist() == list(SERIES_HOURS)
        assert (rows["ms_per_batch"] > 0).all()
    bilstm = series[series["series_encoder"] == "bilstm"].set_index("hours")["ms_per_batch"]
    assert bilstm[max(SERIES_HOURS)] > bilstm[min(SERIES_HOURS)]

    tile = pd.read_csv(bench.output / "scaling_tile.csv")
    assert sorted(tile["tile"].unique()) == sorted(QUICK["tile"])
    assert set(tile["model"]) == {TIMM_VIT, "mbt_mid"}
    assert (tile.loc[tile["model"] == TIMM_VIT, "ratio"] == 1.0).all()

    bottlenecks = pd.read_csv(bench.output / "scaling_bottlenecks.csv")
    assert len(bottlenecks) == 2 * len(QUICK["bottlenecks"])

    tokens = pd.read_csv(bench.output / "scaling_fusion_tokens.csv")
    assert set(tokens["module"]) == set(FUSION_MODULES)
    gflops = tokens.pivot(index="tokens", columns="module", values="gflops_per_sample")
    assert (gflops.diff().iloc[1:] > 0).all().all()  # more tokens, more work
    # At equal depth, full cross-attention costs more than exchanging through bottlenecks.
    assert (gflops["msift_depth4"] > gflops["mbt_early"]).all()
