"""e2e/kind/run.sh under pytest: the same scenarios on kind (real kubelets, the built images,
the chart), where Docker and kind exist; skipped with the script's own reason elsewhere."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent / "run.sh"


@pytest.mark.slow
def test_kind_e2e() -> None:
    check = subprocess.run(["bash", str(RUN), "--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    if check.stdout.startswith("SKIP:"):
        pytest.skip(check.stdout.strip().removeprefix("SKIP:").strip())
    result = subprocess.run(["bash", str(RUN)], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-20000:]
    assert "kind e2e passed" in result.stdout
