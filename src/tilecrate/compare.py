"""What `tilecrate compare` measures: size, speed and fidelity of re-encoding a cache's tiles per quality and method.

A deterministic sample of tiles (spread evenly over the chosen levels) is read once; for every
quality and method it is re-encoded exactly as an export would (same policy, same compiled core,
originals kept where re-encoding would not shrink a tile) and compared with the source pixels:
PSNR over RGB, SSIM on luma (BT.601) with the 8x8 uniform sliding window (stride 1, K1=0.01,
K2=0.03, as in Wang et al. 2004's 8x8 variant). Only JPEG tiles enter the PSNR/SSIM means; every
tile enters the byte totals.
"""
from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from tilecrate.cache import Cache
from tilecrate.errors import RequestError
from tilecrate.recompress import DEFAULT_DEADZONE, RecompressPolicy, reencode_tiles
from tilecrate.request import parse_levels

JPEG_MAGIC = b"\xff\xd8\xff"
PSNR_CAP = 99.0                      # identical pixels


@dataclass
class CompareRow:
    """One (quality, method) measurement."""

    quality: int
    method: str
    tiles: int
    source_bytes: int
    bytes: int
    ratio: float                     # bytes / source_bytes
    tiles_per_s: float
    psnr: float                      # mean over JPEG tiles, dB
    ssim: float                      # mean over JPEG tiles
    reencoded: int                   # tiles that got new bytes
    failed: int                      # JPEG tiles libjpeg could not decode (kept verbatim)
    note: str = ""


@dataclass
class CompareResult:
    """All rows plus what was sampled."""

    cache: str
    source_quality: int
    levels: list[int]
    rows: list[CompareRow]

    def to_json(self) -> dict:
        """JSON-ready form."""
        return {"cache": self.cache, "sourceQuality": self.source_quality, "levels": self.levels,
                "rows": [{k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                          for k, v in asdict(r).items()} for r in self.rows]}


def parse_qualities(text: str) -> list[int]:
    """'90,75,60,40' -> [90, 75, 60, 40] (each 1-100)."""
    out = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            q = int(item)
        except ValueError:
            raise RequestError(f"bad quality {item!r}: use whole numbers such as 90,75,60,40") from None
        if not 1 <= q <= 100:
            raise RequestError(f"quality {q} is outside 1-100")
        out.append(q)
    if not out:
        raise RequestError("no qualities given: use e.g. --qualities 90,75,60,40")
    return out


def parse_methods(text: str) -> list[str]:
    """'dct,pixel' -> ['dct', 'pixel']."""
    out = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    bad = [m for m in out if m not in ("dct", "pixel")]
    if bad or not out:
        raise RequestError(f"unknown method(s) {', '.join(bad) or '(none)'}: use dct, pixel or dct,pixel")
    return out


def choose_levels(cache: Cache, levels: str | None) -> list[int]:
    """The cache's levels within `levels` (LevelIDs and ranges); all of them when None."""
    have = list(cache.levels)
    if levels is None:
        return have
    items = parse_levels(levels)
    chosen = [lv for lv in have if any(min(lo, hi) <= lv <= max(lo, hi) for lo, hi in items)]
    if not chosen:
        raise RequestError(f"the cache has none of levels {levels} (it has {', '.join(map(str, have)) or 'none'})")
    return chosen


def sample_tiles(cache: Cache, levels: Sequence[int], n: int) -> list[tuple[int, int, int, bytes]]:
    """Up to n tiles spread evenly over the given levels, in a deterministic order."""
    if n < 1:
        raise RequestError("--sample must be at least 1")
    present = []
    for lv in levels:
        for ref in cache.bundles(lv):
            _, sizes = cache.index(ref)
            for i in np.flatnonzero(sizes):
                present.append((ref, int(i)))
    if not present:
        raise RequestError("no tiles in the chosen levels")
    picks = np.unique(np.linspace(0, len(present) - 1, min(n, len(present))).round().astype(np.int64))
    out = []
    by_ref: dict = {}
    for p in picks.tolist():
        ref, i = present[p]
        by_ref.setdefault(ref, []).append(i)
    for ref, idx in by_ref.items():
        with cache.open_bundle(ref) as data:
            for i in idx:
                row, col = ref.row0 + i // 128, ref.col0 + i % 128
                out.append((ref.level, row, col, data.tile(row, col)))
    return out


def _pixels(data: bytes) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float64)
    except Exception:        # an undecodable source tile has no pixels to compare against
        return None


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two same-shaped 8-bit images (capped at 99 for identical ones)."""
    mse = float(np.mean((a - b) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10.0 * np.log10(255.0**2 / mse))


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB float image."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _box(x: np.ndarray, w: int) -> np.ndarray:
    """Means of every w x w window (valid positions) through an integral image."""
    s = np.zeros((x.shape[0] + 1, x.shape[1] + 1))
    s[1:, 1:] = x.cumsum(0).cumsum(1)
    return (s[w:, w:] - s[:-w, w:] - s[w:, :-w] + s[:-w, :-w]) / (w * w)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 8) -> float:
    """Mean SSIM of two grey images (8x8 uniform sliding window, K1=0.01, K2=0.03, L=255)."""
    if a.shape != b.shape:
        raise ValueError("ssim needs images of one shape")
    if min(a.shape) < window:
        window = min(a.shape)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _box(a, window), _box(b, window)
    var_a = _box(a * a, window) - mu_a**2
    var_b = _box(b * b, window) - mu_b**2
    cov = _box(a * b, window) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def compare(cache: Cache, qualities: Sequence[int], methods: Sequence[str] = ("dct", "pixel"), *,
            levels: str | None = None, sample: int = 200, threads: int = 0,
            deadzone: float = DEFAULT_DEADZONE, progress: Callable[[int], None] | None = None) -> CompareResult:
    """Re-encode a sample of the cache's tiles at each quality with each method and measure the result."""
    if not 0.0 <= deadzone <= 0.5:
        raise RequestError(f"--deadzone must be between 0 and 0.5, not {deadzone}")
    if threads < 0:
        raise RequestError(f"--threads must be 0 (all cores) or more, not {threads}")
    tile_size = (int(cache.scheme.tile_cols), int(cache.scheme.tile_rows))
    chosen = choose_levels(cache, levels)
    tiles = sample_tiles(cache, chosen, sample)
    data = [t[3] for t in tiles]
    source_bytes = sum(map(len, data))
    jpeg = [i for i, d in enumerate(data) if d[:3] == JPEG_MAGIC]
    ref_px = {i: _pixels(data[i]) for i in jpeg}
    ref_px = {i: p for i, p in ref_px.items() if p is not None}
    ref_luma = {i: luma(p) for i, p in ref_px.items()}
    rows = []
    for q in qualities:
        for method in methods:
            policy = RecompressPolicy(quality=q, source_quality=int(cache.compression_quality or 0),
                                      method=method, threads=threads, tile_format=str(cache.tile_format or ""))
            if policy.active:
                t0 = time.perf_counter()
                result = reencode_tiles(data, q, method=method, threads=threads, deadzone=deadzone,
                                        tile_size=tile_size)
                seconds = time.perf_counter() - t0
                out, status = result.tiles, result.status
                reencoded = int((status == 0).sum())
                failed = len(result.errors)
                note = ""
            else:
                seconds, out, reencoded, failed = 0.0, data, 0, 0
                note = "unchanged: at or above the source quality, or no JPEG tiles"
            ps, ss = [], []
            for i, px in ref_px.items():
                if out[i] is data[i]:
                    ps.append(PSNR_CAP)
                    ss.append(1.0)
                    continue
                new = _pixels(out[i])
                if new is None or new.shape != px.shape:
                    continue
                ps.append(psnr(px, new))
                ss.append(ssim(ref_luma[i], luma(new)))
            total = sum(map(len, out))
            rows.append(CompareRow(
                quality=q, method=method, tiles=len(data), source_bytes=source_bytes, bytes=total,
                ratio=total / source_bytes if source_bytes else 1.0,
                tiles_per_s=len(data) / seconds if seconds > 0 else 0.0,
                psnr=float(np.mean(ps)) if ps else float("nan"),
                ssim=float(np.mean(ss)) if ss else float("nan"),
                reencoded=reencoded, failed=failed, note=note))
            if progress is not None:
                progress(1)
    return CompareResult(cache=cache.path, source_quality=int(cache.compression_quality or 0),
                         levels=chosen, rows=rows)


def _num(v: float, digits: int) -> str:
    return f"{v:.{digits}f}" if np.isfinite(v) else "-"


def format_table(result: CompareResult) -> str:
    """The rows as an aligned text table."""
    head = ["quality", "method", "tiles", "bytes", "ratio", "tiles/s", "PSNR dB", "SSIM", "note"]
    lines = [head]
    for r in result.rows:
        lines.append([str(r.quality), r.method, str(r.tiles), f"{r.bytes:,}", f"{r.ratio:.3f}",
                      f"{r.tiles_per_s:,.0f}" if r.tiles_per_s else "-", _num(r.psnr, 2), _num(r.ssim, 4),
                      (f"{r.failed} undecodable kept; " if r.failed else "") + r.note])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        cells = [c.rjust(w) if 0 < i < 8 and i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths[:-1]) + "  ----")
    src = f"source: {result.rows[0].source_bytes:,} bytes in {result.rows[0].tiles} tiles" if result.rows else ""
    return "\n".join(out + ([src] if src else []))


def write_csv(result: CompareResult, path: str) -> None:
    """The rows as CSV (one header line, one line per quality and method)."""
    fields = list(CompareRow.__dataclass_fields__)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in result.rows:
            w.writerow(asdict(r))


def _font(size: int):
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    span = hi - lo if hi > lo else 1.0
    raw = span / n
    mag = 10 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = np.ceil(lo / step) * step
    return [float(v) for v in np.arange(start, hi + step * 0.001, step)]


COLOURS = {"dct": (31, 119, 180), "pixel": (214, 39, 40)}


def plot_png(result: CompareResult, path: str, width: int = 900, height: int = 560) -> None:
    """Size (percent of the source) against quality, one line per method, drawn with PIL's ImageDraw."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    title_font, font, small = _font(20), _font(15), _font(13)
    left, right, top, bottom = 90, width - 190, 60, height - 70
    rows = [r for r in result.rows if np.isfinite(r.ratio)]
    qs = sorted({r.quality for r in rows}) or [0, 100]
    x_lo, x_hi = min(qs), max(qs)
    if x_lo == x_hi:
        x_lo, x_hi = x_lo - 5, x_hi + 5
    ys = [100 * r.ratio for r in rows] or [0, 100]
    y_lo, y_hi = 0.0, max(100.0, max(ys) * 1.05)

    def px(q: float, y: float) -> tuple[float, float]:
        return (left + (q - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    d.text((left, 18), f"Re-encoded size vs quality — {result.rows[0].tiles if result.rows else 0} tiles, "
                       f"source quality {result.source_quality or 'unknown'}", fill="black", font=title_font)
    for y in _nice_ticks(y_lo, y_hi):
        _, yy = px(x_lo, y)
        d.line([(left, yy), (right, yy)], fill=(225, 225, 225))
        d.line([(left - 6, yy), (left, yy)], fill="black")
        label = f"{y:g}%"
        d.text((left - 10 - d.textlength(label, font=small), yy - 8), label, fill="black", font=small)
    for q in _nice_ticks(x_lo, x_hi, 8):
        xx, _ = px(q, y_lo)
        d.line([(xx, bottom), (xx, bottom + 6)], fill="black")
        label = f"{q:g}"
        d.text((xx - d.textlength(label, font=small) / 2, bottom + 9), label, fill="black", font=small)
    d.rectangle([left, top, right, bottom], outline="black")
    xlabel = "compressionQuality"
    d.text(((left + right) / 2 - d.textlength(xlabel, font=font) / 2, bottom + 32), xlabel, fill="black", font=font)
    ylabel = "size (% of source)"
    tw = int(d.textlength(ylabel, font=font)) + 4
    tmp = Image.new("RGB", (tw, 22), "white")
    ImageDraw.Draw(tmp).text((2, 2), ylabel, fill="black", font=font)
    tmp = tmp.rotate(90, expand=True)
    img.paste(tmp, (12, int((top + bottom) / 2 - tw / 2)))
    d = ImageDraw.Draw(img)
    _, y100 = px(x_lo, 100)
    for x0 in range(left, right, 12):
        d.line([(x0, y100), (min(x0 + 6, right), y100)], fill=(90, 90, 90))
    methods = list(dict.fromkeys(r.method for r in rows))
    for n, m in enumerate(methods):
        colour = COLOURS.get(m, (44, 160, 44))
        pts = sorted((r.quality, 100 * r.ratio) for r in rows if r.method == m)
        xy = [px(q, y) for q, y in pts]
        lw, r = max(2, 6 - 2 * n), max(3, 6 - 2 * n)     # later lines thinner: coinciding lines stay visible
        if len(xy) > 1:
            d.line(xy, fill=colour, width=lw)
        for x, y in xy:
            d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        ly = top + 10 + 44 * n
        d.line([(right + 20, ly + 8), (right + 50, ly + 8)], fill=colour, width=3)
        d.ellipse([right + 31, ly + 4, right + 39, ly + 12], fill=colour)
        mean_speed = np.mean([r.tiles_per_s for r in rows if r.method == m and r.tiles_per_s] or [0])
        d.text((right + 58, ly), m, fill="black", font=font)
        d.text((right + 58, ly + 17), f"{mean_speed:,.0f} tiles/s", fill=(80, 80, 80), font=small)
    ly = top + 10 + 44 * len(methods)
    for x0 in range(right + 20, right + 50, 12):
        d.line([(x0, ly + 8), (x0 + 6, ly + 8)], fill=(90, 90, 90))
    d.text((right + 58, ly), "source", fill="black", font=font)
    img.save(path, "PNG", optimize=True)
