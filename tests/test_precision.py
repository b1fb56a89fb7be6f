"""--precision auto, recorded in the identity; a bf16 index answers fp32 queries only where it
measured that they agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from retrieval import Index
from retrieval.cli.main import cli
from retrieval.devices import fast_bf16
from retrieval.errors import IndexMismatchError
from retrieval.indexes import store


def run(*args: object) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    return result.stdout


def test_auto_records_bf16_only_where_it_is_native(photos, tmp_path, small_model) -> None:
    run("index", photos, "--index", tmp_path / "i", "--weights", small_model, "--device", "cpu")
    manifest = json.loads((tmp_path / "i" / store.MANIFEST).read_text())
    native = fast_bf16(torch.device("cpu"))
    assert manifest["identity"]["precision"] == ("bf16" if native else "fp32")
    assert ("fp32_agreement" in manifest) == native


def test_a_bf16_index_measures_fp32_agreement_and_queries_follow_it(
    photos, tmp_path, small_model
) -> None:
    index_dir = tmp_path / "i"
    run("index", photos, "--index", index_dir, "--weights", small_model, "--precision", "bf16")
    manifest = json.loads((index_dir / store.MANIFEST).read_text())
    measured = manifest["fp32_agreement"]
    assert measured["queries"] == 12 and 0.0 <= measured["top6_overlap"] <= 1.0
    assert "fp32 queries: top-6 overlap" in run("info", "--index", index_dir)
    native = fast_bf16(torch.device("cpu"))
    with Index.open(index_dir, device="cpu") as ix:
        expected = "bf16" if native or measured["top6_overlap"] < 0.99 else "fp32"
        assert ix.precision == expected
        query = sorted(photos.rglob("*.png"))[0]
        assert ix.search([query], k=1)[0].neighbors[0].path == str(query)

    manifest["fp32_agreement"]["top6_overlap"] = 0.5  # an index that disagrees keeps bf16
    (index_dir / store.MANIFEST).write_text(json.dumps(manifest))
    with Index.open(index_dir, device="cpu") as ix:
        assert ix.precision == "bf16"
    # Asking for fp32 outright is a mismatch, said in one line.
    with (
        Index.open(index_dir, device="cpu", extract=_fp32()) as ix,
        pytest.raises(IndexMismatchError, match="precision: the index has bf16"),
    ):
        _ = ix.precision


def test_the_agreement_sample_is_decoded_once_into_the_stored_bits(
    photos, tmp_path, small_model
) -> None:
    """The check decodes each sampled file once for both precisions; its bf16 vectors are the
    ones the build stored, and a file gone since the build is left out of the sample."""
    import numpy as np

    from retrieval import ExtractOptions
    from retrieval.build.agreement import _embedded_both_ways
    from retrieval.extraction.embedder import Embedder
    from retrieval.model.weights import load_model

    embedder = Embedder(load_model(str(small_model)), "bf16", ExtractOptions(device="cpu"))
    index_dir = tmp_path / "i"
    run("index", photos, "--index", index_dir, "--weights", small_model, "--precision", "bf16")
    with Index.open(index_dir, device="cpu") as ix:
        rows = ix.rows(limit=None)
        Path(rows[0].path).unlink()
        kept, stored, fp32 = _embedded_both_ways(rows, embedder)
        assert [r.id for r in kept] == [r.id for r in rows[1:]]
        assert np.array_equal(stored, ix.vectors([r.id for r in kept]))
    assert fp32.shape == stored.shape and not np.array_equal(fp32, stored)


def _fp32():
    from retrieval import ExtractOptions

    return ExtractOptions(precision="fp32")


@pytest.mark.parametrize("arch", ["torchvision", "paper"])  # paper: LRN keeps autocast
def test_bf16_mapper_computes_what_autocast_does_and_leaves_the_model_fp32(arch: str) -> None:
    from retrieval.extraction.mapper import Fc7Mapper
    from retrieval.model.alexnet import ModelArgs, build_alexnet
    from retrieval.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
    from retrieval.model.weights import LoadedModel

    model = build_alexnet(ModelArgs(arch=arch, num_classes=3), seed=0)
    preprocessing = Preprocessing(resize=64, crop=64, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    loaded = LoadedModel(model, preprocessing, "0" * 64, "test")
    fp32 = Fc7Mapper(loaded, torch.device("cpu"), "fp32")
    bf16 = Fc7Mapper(loaded, torch.device("cpu"), "bf16")
    crops = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    batch = loaded.preprocessing.normalize(crops).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        by_autocast = fp32.module(batch).float()
    assert torch.equal(bf16(crops), by_autocast)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    # The fast path (weights converted once) wherever the network allows it.
    converted = next(bf16.module.parameters()).dtype == torch.bfloat16
    assert converted == (arch == "torchvision")
