"""`bench kernels`' roofline is the best streaming rate measured in its run (issue 26, row 12): where a contender
streams faster than the read-bandwidth probe (torch's fp32 GEMV did on a Xeon), that contender's rate is the
roofline and is named, so no row is "over 100% of the roofline"; the probe's own percentages stay beside."""

from __future__ import annotations

import pytest

pytest.importorskip("lavin_edge._C")

from lavin_edge.bench import kernels as KB  # noqa: E402


@pytest.mark.parametrize("probe_gbs", [1e-3, 1e6])
def test_roofline_is_the_best_rate_and_says_which(monkeypatch: pytest.MonkeyPatch, probe_gbs: float) -> None:
    monkeypatch.setattr(KB, "measure_read_bandwidth", lambda *a, **k: probe_gbs)
    monkeypatch.setattr(KB, "last_level_cache_bytes", lambda: 1 << 16)  # a few weight copies, not thousands
    res = KB.run_kernel_bench(shapes=((64, 256),), ms=(1,), threads=1, min_seconds=0.01, print_results=False)
    rows = res["rows"]
    best = max(rows, key=lambda r: r["gbs"])
    assert res["read_bw_gbs"] == probe_gbs
    if probe_gbs < best["gbs"]:  # a probe some contender outruns
        assert res["roofline_gbs"] == best["gbs"]
        assert res["roofline_source"] == f"{best['contender']} 64x256 m=1"
    else:
        assert res["roofline_gbs"] == probe_gbs and res["roofline_source"] == "read-bandwidth probe"
    for r in rows:
        assert r["pct_of_roofline"] == pytest.approx(100 * r["gbs"] / res["roofline_gbs"])
        assert r["pct_of_read_bw"] == pytest.approx(100 * r["gbs"] / probe_gbs)
        assert r["pct_of_roofline"] <= 100 + 1e-9
    table = KB.format_table(res)
    assert f"the best streaming rate in this run: {res['roofline_source']}" in table and "% roof" in table
