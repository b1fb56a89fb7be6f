"""The import-linter contracts in pyproject.toml hold (so `make test`, and CI, keep the layering).

import-linter reads packages from where they import, and `retrieval.indexes` / `retrieval.cli`
live in indexes/ and cli/ beside `retrieval/`: the contracts are checked on a copy of the tree
laid out as it is installed. `make lint` runs this file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is not installed (make install)")
def test_the_import_linter_contracts_are_kept(tmp_path: Path) -> None:
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "retrieval", tmp_path / "retrieval", ignore=skip)
    shutil.copytree(ROOT / "indexes", tmp_path / "retrieval" / "indexes", ignore=skip)
    shutil.copytree(ROOT / "cli", tmp_path / "retrieval" / "cli", ignore=skip)
    done = subprocess.run(
        [LINT_IMPORTS, "--no-cache", str(ROOT / "pyproject.toml")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
