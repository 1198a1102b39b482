"""``python -m bench <scenario> --smoke``: every benchmark still runs end to end.

Benchmarks are not tests: this only checks that each scenario exits 0, prints its table and
writes its PNG chart. No timing is asserted (smoke sizes are far too small for that).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SCENARIOS = [
    pytest.param("overhead", marks=pytest.mark.rabbitmq),
    pytest.param("saturation", marks=pytest.mark.rabbitmq),
    pytest.param("embedded", marks=[pytest.mark.rabbitmq, pytest.mark.embedded]),
    pytest.param("memory", marks=pytest.mark.rabbitmq),
    pytest.param("scale", marks=pytest.mark.rabbitmq),
    pytest.param("lanes", marks=pytest.mark.rabbitmq),
    pytest.param("mix", marks=[pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.postgres]),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_smoke(scenario: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "bench", scenario, "--smoke", "--out", str(out)],
        cwd=ROOT,  # bench/ is not installed: it is imported from the repository
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    console = f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    assert completed.returncode == 0, console
    # A table: a header line followed by a rule of dashes, and the scenario's end line.
    assert re.search(r"^\S.*\n-+( +-+)*$", completed.stdout, re.M), console
    assert f"[{scenario}] finished in" in completed.stdout, console
    charts = [Path(p) for p in re.findall(r"^chart: (.+\.png)$", completed.stdout, re.M)]
    assert charts, console
    for chart in charts:
        assert chart.parent == out, chart
        assert chart.read_bytes()[:8] == PNG_MAGIC, chart
