"""Benchmark fixtures: the large sample (`--large-sample PATH`, made by `tilecrate sample --large`)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_addoption(parser):
    parser.addoption("--large-sample", default=os.environ.get("TILECRATE_LARGE_SAMPLE"),
                     help="path of the cache made by `tilecrate sample PATH --large`")


@pytest.fixture(scope="session")
def large_sample(request) -> Path:
    """The large sample cache; benchmarks that need it are skipped when it is not given."""
    path = request.config.getoption("--large-sample")
    if not path:
        pytest.skip("no --large-sample PATH given (make one with `tilecrate sample PATH --large`)")
    p = Path(path)
    if not p.is_dir():
        pytest.fail(f"--large-sample {p} is not a folder")
    return p


def report(request, name: str, **values) -> None:
    """Record figures (ratios, rates) in the benchmark JSON and print them in the terminal summary."""
    request.config._tilecrate_report = getattr(request.config, "_tilecrate_report", [])
    request.config._tilecrate_report.append((name, values))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = getattr(config, "_tilecrate_report", [])
    if not rows:
        return
    terminalreporter.section("tilecrate figures")
    for name, values in rows:
        text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        terminalreporter.write_line(f"{name}: {text}")
