"""The thumbnail looks up only the cells of the window it draws (a level's selected cells can be millions)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from tilecrate.package.thumbnail import _selected_cells
from tilecrate.tiling import PACKET


def _selection(rng):
    """Level 9 with four random bundle masks around (128, 128), and a level 8 bundle that must not count."""
    bundles = []
    for row0, col0 in ((0, 0), (0, 128), (128, 0), (256, 128)):
        mask = rng.random(PACKET * PACKET) < 0.3
        bundles.append(SimpleNamespace(mask=mask, ref=SimpleNamespace(row0=row0, col0=col0)))
    other = SimpleNamespace(mask=np.ones(PACKET * PACKET, bool), ref=SimpleNamespace(row0=0, col0=0))
    return SimpleNamespace(levels=[SimpleNamespace(level=8, bundles=[other]), SimpleNamespace(level=9, bundles=bundles)])


def test_window_cells_are_the_selected_cells_inside_it():
    sel = _selection(np.random.default_rng(7))
    every = set()
    for b in sel.levels[1].bundles:
        rows, cols = np.nonzero(b.mask.reshape(PACKET, PACKET))
        every.update(zip((rows + b.ref.row0).tolist(), (cols + b.ref.col0).tolist()))
    windows = [(0, 383, 0, 255),            # everything
               (120, 140, 120, 140),        # across four bundle corners
               (250, 260, 100, 200),        # across a missing bundle (256, 0) and a present one
               (384, 400, 0, 255),          # below every bundle: nothing
               (-5, 3, 250, 300)]           # partly outside the level
    for rmin, rmax, cmin, cmax in windows:
        want = {(r, c) for r, c in every if rmin <= r <= rmax and cmin <= c <= cmax}
        assert _selected_cells(sel, 9, rmin, rmax, cmin, cmax) == want
