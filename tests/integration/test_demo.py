"""The README's first command: ``p2preg demo`` runs the whole system and cleans up after itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_runs_and_leaves_nothing_behind() -> None:
    before = set(os.listdir(tempfile.gettempdir()))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2preg",
            "demo",
            "--nodes",
            "3",
            "--node-bandwidth",
            "100MiB",
            "--origin-bandwidth",
            "100MiB",
        ],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The origin served one copy of the image for three nodes (manifests and blobs).
    copies = re.search(r"origin served: p2preg [^(]*\((\d+\.\d+) copies", result.stdout)
    assert copies is not None, result.stdout[-2000:]
    assert float(copies.group(1)) <= 1.1, result.stdout[-3000:]
    assert re.search(r"-> \d+\.\dx faster", result.stdout), result.stdout[-3000:]
    leftovers = {n for n in set(os.listdir(tempfile.gettempdir())) - before if "p2preg-demo" in n}
    assert leftovers == set()
