"""`tilecrate compare`: metrics against independent computations, the table, CSV, plot and JSON."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from tilecrate.cache import open_cache
from tilecrate.cli import main
from tilecrate.compare import compare, psnr, sample_tiles, ssim


def ssim_direct(a: np.ndarray, b: np.ndarray, w: int = 8) -> float:
    """SSIM with explicit loops over every 8x8 window (the definition, no integral images)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for y in range(a.shape[0] - w + 1):
        for x in range(a.shape[1] - w + 1):
            pa, pb = a[y:y + w, x:x + w], b[y:y + w, x:x + w]
            ma, mb = pa.mean(), pb.mean()
            va, vb = pa.var(), pb.var()
            cov = ((pa - ma) * (pb - mb)).mean()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_metrics_match_their_definitions():
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 255, (24, 30))
    b = np.clip(a + rng.normal(0, 12, a.shape), 0, 255)
    assert ssim(a, b) == pytest.approx(ssim_direct(a, b), abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) < ssim(a, (a + b) / 2) < 1
    mse = np.mean((a - b) ** 2)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / mse))
    assert psnr(a, a) == 99.0


def test_sample_is_spread_and_deterministic(sample_v2):
    with open_cache(str(sample_v2)) as cache:
        one = sample_tiles(cache, cache.levels, 30)
        two = sample_tiles(cache, cache.levels, 30)
        assert [t[:3] for t in one] == [t[:3] for t in two] and len(one) == 30
        assert len({t[0] for t in one}) >= 3
        for lv, r, c, data in one:
            assert cache.tile(lv, r, c) == data


def test_compare_rows(sample_v2):
    with open_cache(str(sample_v2)) as cache:
        result = compare(cache, [90, 60, 30], ["dct", "pixel"], levels="3-5", sample=40)
    assert result.levels == [3, 4, 5] and result.source_quality == 75
    rows = {(r.quality, r.method): r for r in result.rows}
    assert len(rows) == 6
    for m in ("dct", "pixel"):
        assert rows[(90, m)].ratio == 1.0 and rows[(90, m)].psnr == 99.0 and rows[(90, m)].note
        assert 1.0 > rows[(60, m)].ratio > rows[(30, m)].ratio
        assert rows[(60, m)].psnr > rows[(30, m)].psnr > 25
        assert 1.0 > rows[(60, m)].ssim > rows[(30, m)].ssim > 0.5
        assert rows[(60, m)].tiles_per_s > 0 and rows[(60, m)].reencoded == 40
    with open_cache(str(sample_v2)) as cache:
        strong = compare(cache, [60], ["dct"], levels="3-5", sample=40, deadzone=0.3).rows[0]
    assert strong.bytes < rows[(60, "dct")].bytes and strong.psnr < rows[(60, "dct")].psnr


def test_cli_table_csv_plot_json(sample_mixed, tmp_path, capsys):
    csv_path, png_path = tmp_path / "c.csv", tmp_path / "c.png"
    assert main(["compare", str(sample_mixed), "--qualities", "70,40", "--sample", "30", "--quiet",
                 "--csv", str(csv_path), "--plot", str(png_path)]) == 0
    out = capsys.readouterr().out
    assert "PSNR dB" in out and "SSIM" in out and "dct" in out and "pixel" in out
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["quality"], r["method"]) for r in rows] == [("70", "dct"), ("70", "pixel"),
                                                           ("40", "dct"), ("40", "pixel")]
    assert all(0 < float(r["ratio"]) < 1 for r in rows)
    with Image.open(png_path) as im:
        assert im.format == "PNG" and im.size == (900, 560)
        px = np.asarray(im.convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in px[::7]}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours     # one line per method
    assert main(["compare", str(sample_mixed), "--qualities", "50", "--methods", "dct", "--sample", "10",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rows"][0]["method"] == "dct" and doc["rows"][0]["tiles"] == 10


@pytest.mark.parametrize("args,message", [
    (["--qualities", "90,abc"], "bad quality"),
    (["--qualities", "150"], "outside 1-100"),
    (["--methods", "wavelet"], "unknown method"),
    (["--levels", "17-19"], "none of levels"),
    (["--sample", "0"], "at least 1"),
    (["--deadzone", "0.7"], "between 0 and 0.5"),
])
def test_cli_errors_are_one_line(sample_v2, capsys, args, message):
    assert main(["compare", str(sample_v2), "--quiet"] + args) == 1
    assert message in capsys.readouterr().err


def test_png_cache_is_reported_unchanged(capsys):
    """Usa.tpkx holds PNG tiles (two of them corrupt): nothing to re-encode, no metrics, valid JSON."""
    from conftest import real_path

    assert main(["compare", str(real_path("Usa.tpkx")), "--qualities", "40", "--sample", "20", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["ratio"] == 1.0 and row["psnr"] is None and row["ssim"] is None and row["note"]
