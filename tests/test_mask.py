"""The compiled rasterizer against a slow, obviously-correct reference.

Convention under test (tilecrate._mask): tile (row, col) is the closed square
[col, col+1] x [row, row+1]; it is selected iff that square intersects the closed polygon.
The reference decides exactly that with integer arithmetic: polygon vertices are multiples of
1/4 tile, so every coordinate is scaled by 4 and every test is exact (a tile square is
[4c, 4c+4] x [4r, 4r+4]). A square meets the polygon iff a polygon edge meets the square, or
(no edge meeting it) the square's centre is inside by the even-odd rule.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import shapely
import shapely.affinity
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from tilecrate import _mask

S = 4  # reference units per tile


# --------------------------------------------------------------------------------------------
# the reference: exact predicates on integers


def _orient(a, b, c) -> int:
    v = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    return (v > 0) - (v < 0)


def _on_segment(p, a, b) -> bool:
    return (_orient(a, b, p) == 0 and min(a[0], b[0]) <= p[0] <= max(a[0], b[0])
            and min(a[1], b[1]) <= p[1] <= max(a[1], b[1]))


def _segments_meet(p1, p2, q1, q2) -> bool:
    d1, d2 = _orient(q1, q2, p1), _orient(q1, q2, p2)
    d3, d4 = _orient(p1, p2, q1), _orient(p1, p2, q2)
    if d1 * d2 < 0 and d3 * d4 < 0:
        return True
    return (_on_segment(p1, q1, q2) or _on_segment(p2, q1, q2)
            or _on_segment(q1, p1, p2) or _on_segment(q2, p1, p2))


def _segment_meets_box(a, b, x0, y0, x1, y1) -> bool:
    for p in (a, b):
        if x0 <= p[0] <= x1 and y0 <= p[1] <= y1:
            return True
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    return any(_segments_meet(a, b, corners[i], corners[(i + 1) % 4]) for i in range(4))


def _inside_even_odd(px, py, edges) -> bool:
    inside = False
    for (x0, y0), (x1, y1) in edges:
        if (y0 > py) != (y1 > py):
            xc = Fraction(x0) + Fraction((py - y0) * (x1 - x0), y1 - y0)
            if px < xc:
                inside = not inside
    return inside


def reference_tiles(rings: list[list[tuple[int, int]]]) -> set[tuple[int, int]]:
    """{(row, col)} whose closed squares meet the polygon (rings in 1/4-tile integer units, y = row)."""
    edges = [(r[i], r[(i + 1) % len(r)]) for r in rings for i in range(len(r))]
    xs = [p[0] for r in rings for p in r]
    ys = [p[1] for r in rings for p in r]
    out = set()
    for row in range(math.floor(min(ys) / S) - 1, math.floor(max(ys) / S) + 2):
        for col in range(math.floor(min(xs) / S) - 1, math.floor(max(xs) / S) + 2):
            bx0, by0, bx1, by1 = col * S, row * S, col * S + S, row * S + S
            hit = False
            for a, b in edges:
                if max(a[0], b[0]) < bx0 or min(a[0], b[0]) > bx1 or max(a[1], b[1]) < by0 or min(a[1], b[1]) > by1:
                    continue
                if _segment_meets_box(a, b, bx0, by0, bx1, by1):
                    hit = True
                    break
            if hit or _inside_even_odd(bx0 + S // 2, by0 + S // 2, edges):
                out.add((row, col))
    return out


# --------------------------------------------------------------------------------------------
# helpers on the compiled side


def edges_of(rings: list[list[tuple[float, float]]], scale: float = 1.0) -> np.ndarray:
    out = []
    for r in rings:
        for i in range(len(r)):
            (x0, y0), (x1, y1) = r[i], r[(i + 1) % len(r)]
            out.append((x0 / scale, y0 / scale, x1 / scale, y1 / scale))
    return np.array(out, dtype=np.float64).reshape(-1, 4)


def compiled_tiles(edges: np.ndarray, bundles=((0, 0), (0, 128), (128, 0), (128, 128))) -> set[tuple[int, int]]:
    """Tiles selected by the compiled core, assembled from per-bundle 128x128 masks."""
    rast = _mask.Rasterizer(edges)
    out = set()
    for row0, col0 in bundles:
        row_ptr, spans = rast.spans(row0, 128)
        mask, n = _mask.window_mask(row_ptr, spans, col0)
        assert n == int(mask.sum())
        rr, cc = np.nonzero(mask)
        out.update(zip((rr + row0).tolist(), (cc + col0).tolist()))
    return out


def shapely_tiles(geom, window: tuple[int, int, int, int]) -> set:
    """Second opinion: GEOS intersects (robust predicates; exact for these dyadic coordinates)."""
    geom = shapely.affinity.scale(geom, 1 / S, 1 / S, origin=(0, 0))
    r0, r1, c0, c1 = window
    rows, cols = np.mgrid[r0:r1 + 1, c0:c1 + 1]
    boxes = shapely.box(cols.ravel(), rows.ravel(), cols.ravel() + 1, rows.ravel() + 1)
    hit = shapely.intersects(boxes, geom)
    return set(zip(rows.ravel()[hit].tolist(), cols.ravel()[hit].tolist()))


# --------------------------------------------------------------------------------------------
# random valid polygons with holes and several parts, vertices on a 1/4-tile grid


@st.composite
def star_ring(draw, cx, cy, rmin, rmax, step):
    k = draw(st.integers(3, 9))
    angles = sorted(draw(st.lists(st.integers(0, 359), min_size=k, max_size=k, unique=True)))
    radii = draw(st.lists(st.integers(rmin, rmax), min_size=k, max_size=k))
    pts = []
    for a, r in zip(angles, radii):
        x = round((cx + r * math.cos(math.radians(a))) / step) * step
        y = round((cy + r * math.sin(math.radians(a))) / step) * step
        if not pts or pts[-1] != (x, y):
            pts.append((x, y))
    if len(pts) > 1 and pts[0] == pts[-1]:
        pts.pop()
    return pts


@st.composite
def polygons(draw):
    """Rings (1/4-tile integer units) of a valid polygon: 1-3 parts, each with 0-2 holes, near bundle borders."""
    step = draw(st.sampled_from([4, 2, 1]))   # whole tiles (edges on tile borders), halves, quarters
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        cx = draw(st.integers(118 * S, 138 * S))
        cy = draw(st.integers(118 * S, 138 * S))
        rmax = draw(st.integers(6, 28))
        outer = draw(star_ring(cx, cy, max(rmax // 2, 3), rmax, step))
        assume(len(outer) >= 3)
        holes = []
        for _ in range(draw(st.integers(0, 2))):
            hx = cx + draw(st.integers(-rmax // 6, rmax // 6))
            hy = cy + draw(st.integers(-rmax // 6, rmax // 6))
            hr = max(rmax // 4, 2)
            hole = draw(star_ring(hx, hy, 1, hr, min(step, 2)))
            if len(hole) >= 3:
                holes.append(hole)
        parts.append((outer, holes))
    geoms = []
    for outer, holes in parts:
        p = shapely.Polygon(outer, holes)
        assume(p.is_valid and p.area > 0)
        for h in holes:
            assume(shapely.Polygon(outer).contains(shapely.Polygon(h)))
        geoms.append(p)
    mp = shapely.MultiPolygon(geoms)
    assume(mp.is_valid)
    return [outer for outer, _ in parts] + [h for _, holes in parts for h in holes], mp


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(polygons())
def test_mask_matches_exact_reference(poly):
    rings, geom = poly
    event(f"{len(geom.geoms)} part(s), {sum(len(g.interiors) for g in geom.geoms)} hole(s)")
    expected = reference_tiles(rings)
    edges = edges_of(rings, S)
    got = compiled_tiles(edges)
    assert got == expected
    ys = [p[1] for r in rings for p in r]
    xs = [p[0] for r in rings for p in r]
    window = (min(ys) // S - 1, max(ys) // S + 1, min(xs) // S - 1, max(xs) // S + 1)
    assert shapely_tiles(geom, window) == expected
    scaled = shapely.affinity.scale(geom, 1 / S, 1 / S, origin=(0, 0))
    touching = sum(shapely.touches(shapely.box(c, r, c + 1, r + 1), scaled) for r, c in expected)
    event("tiles touching only at an edge or corner" if touching else "no touch-only tiles")
    event("crosses a bundle border" if min(xs) < 128 * S < max(xs) or min(ys) < 128 * S < max(ys)
          else "inside one bundle")
    rast = _mask.Rasterizer(edges)
    assert rast.count(0, 255, 0, 255) == len(expected)
    # a window that cuts the polygon: count agrees with the reference restricted to it
    assert rast.count(120, 131, 125, 200) == sum(1 for r, c in expected if 120 <= r <= 131 and 125 <= c <= 200)


# --------------------------------------------------------------------------------------------
# edge and corner touches, named cases


def _sel(rings, bundles=((0, 0),)):
    return compiled_tiles(edges_of(rings), bundles)


def test_square_on_tile_borders_takes_the_ring_around_it():
    # the square [2,4]x[2,4] covers tiles (2..3, 2..3); tiles 1 and 4 touch along edges or corners
    got = _sel([[(2, 2), (4, 2), (4, 4), (2, 4)]])
    assert got == {(r, c) for r in range(1, 5) for c in range(1, 5)}


def test_corner_touch_only():
    # a triangle whose only contact with tile (0, 0) is that tile's corner (1, 1)
    got = _sel([[(1, 1), (3, 1.5), (1.5, 3)]])
    assert (0, 0) in got
    assert (0, 1) in got and (1, 0) in got          # they share the corner and edges nearby
    assert (0, 3) not in got and (3, 0) not in got


def test_hole_boundary_counts_and_hole_interior_does_not():
    outer = [(0.5, 0.5), (9.5, 0.5), (9.5, 9.5), (0.5, 9.5)]
    hole = [(3, 3), (7, 3), (7, 7), (3, 7)]          # tiles 3..6 inside the hole; 3 and 6 touch its border
    got = _sel([outer, hole])
    assert (4, 4) not in got and (5, 5) not in got and (4, 5) not in got
    assert (2, 2) in got and (3, 3) in got and (6, 6) in got and (3, 5) in got
    assert len(got) == 100 - 4


def test_sliver_thinner_than_a_tile():
    got = _sel([[(0.25, 5.1), (60.75, 5.1), (60.75, 5.2), (0.25, 5.2)]])
    assert got == {(5, c) for c in range(0, 61)}


def test_polygon_across_four_bundles():
    ring = [(120.5, 120.5), (140.5, 120.5), (140.5, 140.5), (120.5, 140.5)]
    got = _sel([ring], ((0, 0), (0, 128), (128, 0), (128, 128)))
    assert got == {(r, c) for r in range(120, 141) for c in range(120, 141)}


def test_vertex_exactly_on_centre_line_and_horizontal_edges():
    # vertices at row centres (y = k + 0.5) exercise the half-open crossing rule
    ring = [(0.5, 0.5), (4.5, 2.5), (8.5, 0.5), (8.5, 6.5), (4.5, 4.5), (0.5, 6.5)]
    assert _sel([ring]) == reference_tiles([[(int(x * S), int(y * S)) for x, y in ring]])


# --------------------------------------------------------------------------------------------
# sweep behaviour, bounded memory, input checks


def test_spans_restart_when_rows_go_back():
    edges = edges_of([[(1.5, 1.5), (300.5, 1.5), (300.5, 300.5), (1.5, 300.5)]])
    rast = _mask.Rasterizer(edges)
    late = rast.spans(256, 128)
    early = rast.spans(0, 128)
    again = rast.spans(256, 128)
    assert np.array_equal(late[0], again[0]) and np.array_equal(late[1], again[1])
    assert early[1].tolist()[:2] == [[1, 300], [1, 300]]
    assert early[0][1] == 0  # row 0 has nothing


def test_level_20_continent_counts_in_bounded_memory():
    # a rectangle 1e6 tiles wide and 4e5 tall: 4e11 tiles, counted row by row without a grid
    w, h = 1_000_000, 400_000
    edges = edges_of([[(10.5, 20.5), (10.5 + w, 20.5), (10.5 + w, 20.5 + h), (10.5, 20.5 + h)]])
    rast = _mask.Rasterizer(edges)
    assert rast.count(0, 2**20, 0, 2**20) == (w + 1) * (h + 1)
    row_ptr, spans = rast.spans(128, 128)
    assert len(spans) == 128 and spans[0].tolist() == [10, 10 + w]


def test_empty_and_degenerate_inputs():
    rast = _mask.Rasterizer(np.zeros((0, 4)))
    assert rast.count(0, 100, 0, 100) == 0
    row_ptr, spans = rast.spans(0, 128)
    assert len(spans) == 0 and _mask.window_mask(row_ptr, spans, 0)[1] == 0
    with pytest.raises(ValueError):
        _mask.Rasterizer(np.zeros((3, 3)))
    with pytest.raises(ValueError):
        _mask.Rasterizer(np.array([[0, 0, np.nan, 1.0]]))
    with pytest.raises(ValueError):
        _mask.Rasterizer(np.array([[0, 0, 1e300, 1.0]]))
    with pytest.raises(ValueError):
        _mask.window_mask(np.zeros(10, np.int64), np.zeros((0, 2), np.int64), 0)
    with pytest.raises(ValueError):
        _mask.window_mask(np.full(129, 5, np.int64), np.zeros((2, 2), np.int64), 0)   # points past the spans
    bad = np.arange(129, dtype=np.int64)[::-1].copy()
    with pytest.raises(ValueError):
        _mask.window_mask(bad, np.zeros((200, 2), np.int64), 0)


def test_apply_presence_intersects_and_sums():
    mask = np.zeros((128, 128), np.uint8)
    mask[0, :4] = 1
    mask[5, 5] = 1
    sizes = np.zeros(16384, np.uint32)
    sizes[[0, 2, 5 * 128 + 5, 900]] = [10, 20, 30, 40]
    tiles, nbytes = _mask.apply_presence(mask, sizes)
    assert (tiles, nbytes) == (3, 60)
    assert mask.sum() == 3 and mask[0, 1] == 0 and mask[7, 4] == 0
    with pytest.raises(ValueError):
        _mask.apply_presence(mask, sizes[:100])
    with pytest.raises(ValueError):
        _mask.apply_presence(mask.astype(np.int32), sizes)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(st.lists(st.tuples(st.floats(100, 160), st.floats(100, 160)), min_size=3, max_size=40))
def test_arbitrary_float_polygons_agree_with_geos_up_to_ties(points):
    """Real-world coordinates: any disagreement with GEOS must be a near-tie (distance ~ rounding)."""
    geom = shapely.make_valid(shapely.Polygon(points))
    parts = [p for p in shapely.get_parts(geom) if p.geom_type == "Polygon" and p.area > 0]
    assume(parts)
    poly = shapely.MultiPolygon(parts)
    rings = shapely.get_rings(shapely.get_parts(poly))
    edges = []
    for ring in rings:
        xy = shapely.get_coordinates(ring)
        edges.append(np.hstack([xy[:-1], xy[1:]]))
    got = compiled_tiles(np.vstack(edges))
    x0, y0, x1, y1 = poly.bounds
    window = (int(y0) - 1, int(y1) + 1, int(x0) - 1, int(x1) + 1)
    rows, cols = np.mgrid[window[0]:window[1] + 1, window[2]:window[3] + 1]
    boxes = shapely.box(cols.ravel(), rows.ravel(), cols.ravel() + 1, rows.ravel() + 1)
    want = set(zip(rows.ravel()[shapely.intersects(boxes, poly)].tolist(),
                   cols.ravel()[shapely.intersects(boxes, poly)].tolist()))
    eps = 1e-9
    for r, c in got - want:      # we take a tile GEOS finds apart: it must be within rounding of touching
        assert shapely.distance(shapely.box(c, r, c + 1, r + 1), poly) < eps
    for r, c in want - got:      # we miss a tile GEOS takes: the polygon may only graze its border
        assert not shapely.intersects(shapely.box(c + eps, r + eps, c + 1 - eps, r + 1 - eps), poly)


SHARED_RASTERIZER = r"""
import threading
import numpy as np
from tilecrate import _mask

n = 2000                                  # a star: many edges active in every row
ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
rad = 5000 + 3000 * (np.arange(n) % 2)
x, y = 10000 + rad * np.cos(ang), 10000 + rad * np.sin(ang)
rast = _mask.Rasterizer(np.column_stack([x, y, np.roll(x, -1), np.roll(y, -1)]))
rows = list(range(2000, 18000, 512))
want = {r: rast.spans(r, 128) for r in rows}
want_count = rast.count(9000, 11000, 0, 20000)
wrong = []

def sweep(seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        r = int(rng.choice(rows))
        rp, sp = rast.spans(r, 128)
        if not (np.array_equal(rp, want[r][0]) and np.array_equal(sp, want[r][1])):
            wrong.append(r)
        if rng.random() < 0.1 and rast.count(9000, 11000, 0, 20000) != want_count:
            wrong.append("count")

threads = [threading.Thread(target=sweep, args=(s,)) for s in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("wrong", len(wrong))
"""


def test_one_rasterizer_shared_by_threads():
    """spans/count release the GIL while they move the sweep state (active edges, span buffers)
    of the Rasterizer: calls from two threads on one instance must take turns, not corrupt the
    buffers (that segfaulted). In a child process, so a crash fails this test only."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", SHARED_RASTERIZER], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["wrong", "0"], (run.returncode, run.stdout, run.stderr[-2000:])


# --------------------------------------------------------------------------------------------
# groups: even-odd within a group, union across groups


def test_groups_union_while_rings_of_one_group_are_even_odd():
    a = [(0.5, 0.5), (6.5, 0.5), (6.5, 6.5), (0.5, 6.5)]
    b = [(2.5, 2.5), (9.5, 2.5), (9.5, 9.5), (2.5, 9.5)]
    edges = edges_of([a, b])
    one_group = compiled_tiles(edges, ((0, 0),))
    rast = _mask.Rasterizer(edges, np.array([0] * 4 + [1] * 4))
    mask, _ = _mask.window_mask(*rast.spans(0, 128), 0)
    two_groups = set(zip(*[x.tolist() for x in np.nonzero(mask)]))
    # one group: the overlap (tile centres 3.5..5.5 inside both) is a hole; its rim lies on edges
    assert one_group == reference_tiles([[(int(x * S), int(y * S)) for x, y in r] for r in (a, b)])
    assert (4, 4) not in one_group and (4, 4) in two_groups
    # two groups: the union of the two squares and the tiles touching it
    corners = {(r, c) for r in range(7, 10) for c in range(0, 2)} | {(r, c) for r in range(0, 2) for c in range(7, 10)}
    assert two_groups == {(r, c) for r in range(0, 10) for c in range(0, 10)} - corners
    assert rast.count(0, 20, 0, 20) == len(two_groups)


# --------------------------------------------------------------------------------------------
# every public entry point refuses bad arguments (issue 9 item 8)


SQUARE_EDGES = edges_of([[(1.5, 1.5), (5.5, 1.5), (5.5, 5.5), (1.5, 5.5)]])


@pytest.mark.parametrize("edges, groups, message", [
    (np.zeros((3, 3)), None, "shape"),
    (np.zeros(4), None, "shape"),
    (np.array([[0, 0, np.inf, 1.0]]), None, "non-finite"),
    (np.array([[0, 0, 2.0 ** 51, 1.0]]), None, "too far"),
    (SQUARE_EDGES, np.zeros(3, np.int64), "one entry per edge"),
    (SQUARE_EDGES, np.zeros((4, 1), np.int64), "one entry per edge"),
    (SQUARE_EDGES, np.zeros(4, np.float64), "integer"),
    (SQUARE_EDGES, np.full(4, 2**63, np.uint64), "int64"),
    (np.array([["a", "b", "c", "d"]]), None, "could not convert"),
])
def test_rasterizer_refuses_bad_input(edges, groups, message):
    with pytest.raises(ValueError, match=message):
        _mask.Rasterizer(edges, groups)


def test_rasterizer_refuses_reinit_and_use_before_init():
    rast = _mask.Rasterizer(SQUARE_EDGES)
    with pytest.raises(RuntimeError, match="once"):
        rast.__init__(np.zeros((0, 4)))
    assert rast.count(0, 10, 0, 10) == 25       # unchanged: rows and cols 1..5
    bare = _mask.Rasterizer.__new__(_mask.Rasterizer)
    with pytest.raises(RuntimeError, match="not initialised"):
        bare.spans(0, 128)
    with pytest.raises(RuntimeError, match="not initialised"):
        bare.count(0, 1, 0, 1)


@pytest.mark.parametrize("row_start, nrows", [(0, -1), (0, _mask.MAX_SPAN_ROWS + 1), (2**62 + 1, 1), (-(2**62) - 1, 1)])
def test_spans_refuses_bad_windows(row_start, nrows):
    rast = _mask.Rasterizer(SQUARE_EDGES)
    with pytest.raises(ValueError):
        rast.spans(row_start, nrows)


def test_count_refuses_to_overflow():
    w = 2.0 ** 49
    rast = _mask.Rasterizer(edges_of([[(-w, 0.5), (w, 0.5), (w, 9000.5), (-w, 9000.5)]]))
    assert rast.count(0, 0, -(2**62), 2**62) == 2 ** 50 + 2
    with pytest.raises(OverflowError):
        rast.count(0, 9000, -(2**63), 2**63 - 1)


@pytest.mark.parametrize("row_ptr, spans, col0, message", [
    (np.zeros(10, np.int64), np.zeros((0, 2), np.int64), 0, "at least 129"),
    (np.zeros(129, np.int64), np.zeros(3, np.int64), 0, "pairs"),
    (np.zeros(129, np.int64), np.array([[0, 2**62 + 5]], np.int64), 0, "out of range"),
    (np.zeros(129, np.int64), np.zeros((0, 2), np.int64), 2**62 + 1, "col0"),
    (np.full(129, -1, np.int64), np.zeros((0, 2), np.int64), 0, "valid index"),
    (np.concatenate([[0], np.full(128, 3)]).astype(np.int64), np.zeros((2, 2), np.int64), 0, "valid index"),
])
def test_window_mask_refuses_bad_input(row_ptr, spans, col0, message):
    with pytest.raises(ValueError, match=message):
        _mask.window_mask(row_ptr, spans, col0)


@pytest.mark.parametrize("make_mask, sizes, message", [
    (lambda: np.zeros((128, 128), np.uint8)[:, ::-1], np.zeros(16384, np.uint32), "C-contiguous"),
    (lambda: np.zeros((128, 128), np.uint8).T.copy()[:64], np.zeros(16384, np.uint32), "shape"),
    (lambda: np.zeros((128, 128), np.bool_), np.zeros(16384, np.uint32), "uint8"),
    (lambda: np.zeros((128, 128), np.uint8), np.zeros(16384, np.float64), "whole numbers"),
    (lambda: np.zeros((128, 128), np.uint8), np.full(16384, -1, np.int64), "whole numbers"),
    (lambda: np.zeros((128, 128), np.uint8), np.full(16384, 2**32, np.int64), "whole numbers"),
    (lambda: np.zeros((128, 128), np.uint8), np.zeros((128, 128), np.uint32), "16384"),
])
def test_apply_presence_refuses_bad_input(make_mask, sizes, message):
    with pytest.raises(ValueError, match=message):
        _mask.apply_presence(make_mask(), sizes)


def test_apply_presence_refuses_a_read_only_mask_and_takes_int64_sizes():
    mask = np.ones((128, 128), np.uint8)
    mask.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        _mask.apply_presence(mask, np.ones(16384, np.uint32))
    tiles, nbytes = _mask.apply_presence(np.ones((128, 128), np.uint8), np.full(16384, 7, np.int64))
    assert (tiles, nbytes) == (16384, 7 * 16384)
