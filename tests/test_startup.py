"""Commands that embed no image start without torch: info, remove, a no-op re-index, --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from retrieval.cli.main import cli

PROBE = """
import json, sys
from retrieval.cli.main import cli
try:
    cli(sys.argv[1:], standalone_mode=False)
finally:
    heavy = sorted(m for m in ("torch", "torchvision") if m in sys.modules)
    print(json.dumps({"heavy": heavy}), file=sys.stderr)
"""


def heavy_modules(*args: object, cwd: Path) -> tuple[list[str], str]:
    """Run the CLI in a fresh interpreter; which heavy modules it imported, and its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stderr.strip().splitlines()[-1])["heavy"], done.stdout


@pytest.fixture
def built(photos: Path, tmp_path: Path, small_model: Path) -> Path:
    index_dir = tmp_path / "index"
    result = CliRunner().invoke(
        cli, ["index", str(photos), "--index", str(index_dir), "--weights", str(small_model)]
    )
    assert result.exit_code == 0, result.output
    return index_dir


def test_info_imports_no_torch(built: Path, tmp_path: Path) -> None:
    heavy, out = heavy_modules("info", "--index", built, cwd=tmp_path)
    assert heavy == [] and "12 indexed" in out


def test_a_no_op_reindex_imports_no_torch(built: Path, photos: Path, tmp_path: Path) -> None:
    heavy, out = heavy_modules("index", photos, "--index", built, cwd=tmp_path)
    assert heavy == [] and "12 unchanged" in out


def test_remove_imports_no_torch(built: Path, photos: Path, tmp_path: Path) -> None:
    victim = sorted(photos.rglob("*.png"))[0]
    heavy, out = heavy_modules("remove", victim, "--index", built, cwd=tmp_path)
    assert heavy == [] and "removed 1" in out


def test_help_imports_no_torch(tmp_path: Path) -> None:
    for args in (["--help"], ["index", "--help"], ["query", "--help"], ["train", "--help"]):
        heavy, _ = heavy_modules(*args, cwd=tmp_path)
        assert heavy == [], args


def test_a_query_does_import_torch(built: Path, photos: Path, tmp_path: Path) -> None:
    """The probe itself can fail: a command that embeds an image needs torch."""
    query = sorted(photos.rglob("*.png"))[0]
    heavy, _ = heavy_modules("query", query, "--index", built, "-k", "1", cwd=tmp_path)
    assert "torch" in heavy
