"""Collects benchmark rows and, at the end of the session, writes benches/results/<name>.json
and a PNG plot per benchmark module (see common.py)."""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List

import pytest

from benches import common, plots

ROWS: Dict[str, List[dict]] = defaultdict(list)


@pytest.fixture
def record():
    """record(name, row): keep one result row for benchmark `name`."""

    def add(name: str, row: dict) -> None:
        ROWS[name].append(row)

    return add


def pytest_sessionfinish(session, exitstatus):
    for name, rows in ROWS.items():
        path = common.write_results(name, rows)
        plots.plot(name, path)
        print(f"\nmoefuse benchmarks: wrote {path} and {path.with_suffix('.png')}")
