"""Runners execute an ExportPlan: in this process (default) or on a Dask cluster, with the same per-bundle task."""
