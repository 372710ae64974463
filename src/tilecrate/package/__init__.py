"""Writers of what exportTiles hands out: compact bundles, package metadata, stored zips, cache folders."""
