"""The import-linter contracts in pyproject.toml hold (so `make test`, and CI, keep the layering).

`retrieval/cli` and `retrieval/indexes` are links to cli/ and indexes/, so the source tree reads
as it installs and plain `lint-imports` from the repository root sees every stage.
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
def test_the_import_linter_contracts_are_kept() -> None:
    done = subprocess.run(
        [LINT_IMPORTS, "--no-cache"],  # a cache from another tree can hide a broken import
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_the_source_tree_links_cli_and_indexes_in_as_they_install() -> None:
    for name in ("cli", "indexes"):
        link = ROOT / "retrieval" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), link


def test_no_package_holds_more_than_about_twelve_modules() -> None:
    """A folder a newcomer can read at a glance: past a dozen modules it holds two jobs."""
    packages = [ROOT / "cli", ROOT / "indexes", *(p for p in (ROOT / "retrieval").iterdir())]
    for package in packages:
        if package.is_dir() and not package.is_symlink() and (package / "__init__.py").exists():
            modules = [p for p in package.glob("*.py") if p.name != "__init__.py"]
            assert len(modules) <= 13, f"{package.relative_to(ROOT)}: {len(modules)} modules"
