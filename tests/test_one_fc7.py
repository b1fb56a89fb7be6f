"""Every vector computed one way: the same image gets the same fc7 bits whatever its batch, its
road (file, bytes, update, rebuild) or the index kind it lands in (issue 20)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from retrieval import Index
from retrieval.build.options import IndexOptions
from retrieval.build.run import index_folder
from retrieval.devices import fast_bf16, one_device
from retrieval.errors import RetrieveError
from retrieval.extraction import ExtractOptions
from retrieval.extraction.embedder import Embedder
from retrieval.extraction.mapper import Fc7Mapper
from retrieval.model.weights import load_model
from tests.corpus import make_labelled_folder
from tests.stored import stored_vectors

CPU = torch.device("cpu")
NATIVE_BF16 = fast_bf16(CPU)
PRECISIONS = [
    "fp32",
    pytest.param(
        "bf16",
        marks=pytest.mark.skipif(not NATIVE_BF16, reason="bf16 is emulated on this CPU (slow)"),
    ),
]


def cli(*args: object, ok: bool = True):
    from retrieval.cli.main import cli as main

    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + result.stderr
    return result


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """100 different 224-px images (the full model: these tests are about its numbers)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (100, 3, 224, 224), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_an_images_fc7_is_bit_identical_alone_in_7_and_among_100(crops, precision) -> None:
    mapper = Fc7Mapper(load_model("random"), CPU, precision)
    alone = mapper(crops[:1])[0]
    among_7 = mapper(crops[:7])[0]
    among_100 = mapper(crops)[0]
    shuffled = mapper(torch.cat([crops[50:53], crops[:1], crops[60:64]]))[3]
    assert torch.equal(alone, among_7) and torch.equal(alone, among_100)
    assert torch.equal(alone, shuffled)


def test_the_fixed_shapes_leave_torchs_flags_as_they_were(crops) -> None:
    mapper = Fc7Mapper(load_model("random"), CPU, "fp32")
    before = (torch.get_num_threads(), torch.backends.cudnn.benchmark)
    mapper(crops[:3])
    assert (torch.get_num_threads(), torch.backends.cudnn.benchmark) == before
    assert mapper(crops[:0]).shape == (0, mapper.out_features)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    make_labelled_folder(root, classes=4, per_class=6, size=48)
    return root


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_file_gets_the_same_vector_in_any_batch_size_and_by_its_bytes(
    folder, small_model, precision
) -> None:
    paths = sorted(folder.rglob("*.png"))
    embedder = Embedder(load_model(small_model), precision, ExtractOptions(device="cpu"))
    batches = {}
    for size in (1, 7, 64):
        options = dataclasses.replace(embedder.options, batch_size=size, workers=0)
        sized = Embedder(embedder.loaded, precision, options)
        batches[size] = np.concatenate([b.features for b in sized.files(paths)])
    assert np.array_equal(batches[1], batches[7]) and np.array_equal(batches[1], batches[64])
    by_bytes, _ = embedder.images([p.read_bytes() for p in paths[:3]])
    assert np.array_equal(by_bytes, batches[1][:3])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_query_of_an_indexed_file_by_path_or_bytes_is_at_distance_exactly_0(
    folder, small_model, tmp_path, precision
) -> None:
    options = IndexOptions(weights=str(small_model), extract=ExtractOptions(precision=precision))
    with Index.create(tmp_path / "ix", folder, options) as index:
        target = sorted(folder.rglob("*.png"))[5]
        by_path = index.search([target], k=1)[0].neighbors[0]
        by_bytes = index.search([target.read_bytes()], k=1)[0].neighbors[0]
    assert by_path.path == by_bytes.path == str(target)
    assert by_path.distance == 0.0 and by_bytes.distance == 0.0


def _vectors_by_path(index_dir: Path) -> dict[str, bytes]:
    return {path: vector.tobytes() for path, vector in stored_vectors(index_dir).items()}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_an_incremental_index_equals_a_rebuild_bit_for_bit(
    folder, small_model, tmp_path, precision
) -> None:
    options = IndexOptions(weights=str(small_model), extract=ExtractOptions(precision=precision))
    index_folder(folder, tmp_path / "incremental", options)
    for gone in sorted(folder.rglob("*.png"))[::6]:  # 4 files go, 4 others come
        gone.unlink()
    make_labelled_folder(tmp_path / "more", classes=4, per_class=1, size=40)
    for i, new in enumerate(sorted((tmp_path / "more").rglob("*.png"))):
        shutil.copy(new, folder / new.parent.name / f"new{i}.png")
    index_folder(folder, tmp_path / "incremental", IndexOptions())
    index_folder(folder, tmp_path / "rebuilt", options)
    assert _vectors_by_path(tmp_path / "incremental") == _vectors_by_path(tmp_path / "rebuilt")


@pytest.mark.skipif(not NATIVE_BF16, reason="needs a bf16 index built where bf16 is native")
def test_an_update_stores_the_indexs_bf16_even_when_queries_run_in_fp32(
    folder, small_model, tmp_path, monkeypatch
) -> None:
    """Where bf16 is emulated a bf16 index may take fp32 queries; its update must still store
    bf16 vectors, the bits `retrieve index` stores."""
    late = sorted(folder.rglob("*.png"))[::3]
    held = tmp_path / "held"
    for path in late:
        (held / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.move(path, held / path.parent.name / path.name)
    bf16 = IndexOptions(weights=str(small_model), extract=ExtractOptions(precision="bf16"))
    index_folder(folder, tmp_path / "ix", bf16)
    monkeypatch.setattr("retrieval.devices.fast_bf16", lambda device: False)
    monkeypatch.setattr("retrieval.model.recorded.fp32_allowed", lambda manifest: True)
    with Index.open(tmp_path / "ix") as index:
        index.search([sorted(folder.rglob("*.png"))[0]], k=1)
        assert index.precision == "fp32"  # the query embedder is loaded, in fp32
        shutil.copytree(held, folder, dirs_exist_ok=True)
        index.update(folder)
    monkeypatch.undo()
    index_folder(folder, tmp_path / "fresh", bf16)
    assert _vectors_by_path(tmp_path / "ix") == _vectors_by_path(tmp_path / "fresh")


def test_index_update_stores_what_retrieve_index_stores(folder, small_model, tmp_path) -> None:
    late = sorted(folder.rglob("*.png"))[::4]
    held = tmp_path / "held"
    for path in late:
        (held / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.move(path, held / path.parent.name / path.name)
    options = IndexOptions(weights=str(small_model))
    with Index.create(tmp_path / "ix", folder, options) as index:
        index.search([sorted(folder.rglob("*.png"))[0]], k=1)  # loads the query model
        shutil.copytree(held, folder, dirs_exist_ok=True)
        report = index.update(folder)
        assert report.added == len(late)
    cli("index", folder, "--index", tmp_path / "cli", "--weights", small_model)
    assert _vectors_by_path(tmp_path / "ix") == _vectors_by_path(tmp_path / "cli")


KINDS = [
    ("Flat", None),
    ("IVF4,Flat", None),
    ("IVF4,PQ16x4fs", None),
    ("IVF4,SQ8", None),
    ("HNSW8", None),
    ("Flat", "PCA16"),
    ("IVF4,Flat", "PCA16"),
    ("auto", None),
]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("kind", "reduce"), KINDS)
def test_every_index_kind_builds_and_answers_at_every_precision(
    folder, small_model, tmp_path, kind, reduce, precision
) -> None:
    args = ["index", folder, "--index", tmp_path / "ix", "--weights", small_model]
    args += ["--index-type", kind, "--precision", precision, "--json"]
    args += ["--reduce", reduce] if reduce else []
    report = json.loads(cli(*args).stdout)
    assert report["count"] == 24
    info = json.loads(cli("info", "--index", tmp_path / "ix", "--json").stdout)
    assert info["precision"] == precision
    if precision == "bf16":
        measured = info["fp32_agreement"]
        assert measured["queries"] == 24 and 0.0 <= measured["top6_overlap"] <= 1.0
    query = sorted(folder.rglob("*.png"))[2]
    found = json.loads(cli("query", query, "--index", tmp_path / "ix", "-k", "3", "--json").stdout)
    neighbours = found["neighbors"]
    assert len(neighbours) == 3 and neighbours[0]["path"] == str(query)


def test_the_index_holds_one_device() -> None:
    assert one_device("auto", "cpu") == "cpu" and one_device("cpu", "auto") == "cpu"
    assert one_device("cuda:1", "cuda:1") == "cuda:1" and one_device("auto", "auto") == "auto"
    with pytest.raises(RetrieveError, match="two devices"):
        one_device("cpu", "cuda")
    with pytest.raises(RetrieveError, match="unknown device"):
        one_device("gpu", "auto")


def test_index_create_keeps_the_device_it_was_given(folder, small_model, tmp_path) -> None:
    options = IndexOptions(weights=str(small_model), extract=ExtractOptions(device="cpu"))
    with Index.create(tmp_path / "ix", folder, options) as index:
        assert index.device == "cpu"
        assert index._embedder.queries.device == CPU
    with pytest.raises(RetrieveError, match="two devices"):
        Index.open(tmp_path / "ix", device="cpu", extract=ExtractOptions(device="cuda"))


def test_ray_places_cuda_n_on_gpu_actors() -> None:
    from retrieval.distributed.engine import RayOptions, _placement

    for device in ("cuda", "cuda:1", "auto"):
        where, gpus, actors = _placement(RayOptions(device=device), {"GPU": 2, "CPU": 8})
        assert (where, gpus, actors) == ("cuda", 1.0, 2)
    assert _placement(RayOptions(device="cpu"), {"GPU": 2, "CPU": 8})[0] == "cpu"


def test_a_ray_actor_embeds_with_the_runs_preprocessing(small_model) -> None:
    """An update over Ray embeds as its index recorded, not as the weights file says."""
    from retrieval.distributed.tasks import Fc7Actor

    recorded = load_model(small_model).preprocessing.to_dict() | {"resize": 72, "crop": 64}
    actor = Fc7Actor(
        str(small_model),
        load_model(small_model).sha256,
        "cpu",
        "fp32",
        None,
        preprocessing=recorded,
    )
    assert actor.mapper.preprocessing.to_dict() == recorded


def test_the_query_path_does_not_import_the_write_path(folder, small_model, tmp_path) -> None:
    import subprocess
    import sys

    index_folder(folder, tmp_path / "ix", IndexOptions(weights=str(small_model)))
    probe = (
        "import sys\n"
        "from retrieval import Index\n"
        f"with Index.open({str(tmp_path / 'ix')!r}) as ix:\n"
        f"    ix.search([{str(sorted(folder.rglob('*.png'))[0])!r}], k=2)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('retrieval.build.run',"
        " 'retrieval.build.commit', 'retrieval.indexes.staging'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_on_cuda_an_image_gets_the_same_bits_alone_in_7_and_among_100(crops, precision) -> None:
    mapper = Fc7Mapper(load_model("random"), torch.device("cuda"), precision)
    on_device = crops.cuda()
    alone = mapper(on_device[:1])[0]
    assert torch.equal(alone, mapper(on_device[:7])[0])
    assert torch.equal(alone, mapper(on_device)[0])


@pytest.mark.cuda
def test_on_cuda_fp32_is_ieee_per_call_and_the_flags_are_put_back(crops) -> None:
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    cudnn.allow_tf32 = matmul.allow_tf32 = True  # what a caller may have set for itself
    before = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32)
    loaded = load_model("random")
    ieee = Fc7Mapper(loaded, torch.device("cuda"), "fp32")(crops[:8].cuda()).cpu()
    assert (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32) == before
    on_cpu = Fc7Mapper(loaded, CPU, "fp32")(crops[:8])
    # TF32 (10-bit mantissa) is ~1e-3 relative off; IEEE fp32 on two devices is ~1e-5.
    assert torch.allclose(ieee, on_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_on_cuda_a_jpeg_by_path_and_by_bytes_gets_one_vector_through_index(tmp_path) -> None:
    """JPEGs on CUDA go to nvjpeg, by path and by bytes alike (``Index(device="cuda")``):
    one vector, the indexed one, at fp32 (IEEE, no TF32) and at bf16."""
    from tests.corpus import make_image

    folder = tmp_path / "jpegs"
    paths = [make_image(folder / f"{i:02d}.jpg", size=(96 + 8 * i, 90), seed=i) for i in range(9)]
    paths.append(make_image(folder / "grey.jpg", size=(100, 90), mode="L", seed=20))
    for precision in ("fp32", "bf16"):
        extract = ExtractOptions(device="cuda", precision=precision)
        options = IndexOptions(weights="random", extract=extract, rebuild=True)
        with Index.create(tmp_path / "ix", folder, options) as index:
            assert index.device == "cuda" and index.report.decoded["gpu"] == len(paths)
            for target in (paths[3], paths[-1]):
                by_path, _ = index.embed([target])
                by_bytes, _ = index.embed([target.read_bytes()])
                assert np.array_equal(by_path, by_bytes), (precision, target.name)
                stored = index.vectors([index.id_of(target)])
                assert np.array_equal(by_path, stored), (precision, target.name)


@pytest.mark.cuda
def test_on_cuda_fp32_indexing_leaves_tf32_off_and_the_callers_flags_alone(tmp_path) -> None:
    """fp32 on CUDA means IEEE fp32: TF32 off and deterministic cuDNN inside each model call,
    whatever the caller set, and the caller's flags put back after ``Index(device="cuda")``."""
    from tests.corpus import make_image

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    folder = tmp_path / "jpegs"
    for i in range(6):
        make_image(folder / f"{i}.jpg", size=(90, 80), seed=i)
    seen = []
    real = Fc7Mapper.__call__

    def spy(self, crops):
        seen.append((cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark))
        with self._numerics():
            seen.append((cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic,
                         cudnn.benchmark))  # fmt: skip
        return real(self, crops)

    cudnn.allow_tf32 = matmul.allow_tf32 = cudnn.benchmark = True
    try:
        options = IndexOptions(weights="random", extract=ExtractOptions(device="cuda",
                               precision="fp32"))  # fmt: skip
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Fc7Mapper, "__call__", spy)
            with Index.create(tmp_path / "ix", folder, options) as index:
                assert index.precision == "fp32"
                index.search([folder / "0.jpg"], k=1)
        assert seen and all(s == (False, False, True, False) for s in seen[1::2])
        assert (cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark) == (True, True, True)
    finally:
        cudnn.allow_tf32, cudnn.benchmark = True, False
        matmul.allow_tf32 = False


@pytest.mark.cuda
def test_on_cuda_a_query_by_path_and_by_bytes_is_at_distance_exactly_0(
    folder, small_model, tmp_path
) -> None:
    options = IndexOptions(weights=str(small_model), extract=ExtractOptions(device="cuda"))
    with Index.create(tmp_path / "ix", folder, options) as index:
        assert index.device == "cuda"
        target = sorted(folder.rglob("*.png"))[5]
        by_path = index.search([target], k=1)[0].neighbors[0]
        by_bytes = index.search([target.read_bytes()], k=1)[0].neighbors[0]
    assert by_path.path == by_bytes.path == str(target)
    assert by_path.distance == 0.0 and by_bytes.distance == 0.0


def test_the_cli_takes_cuda_n_and_refuses_an_unknown_device(folder, small_model, tmp_path):
    cli("index", folder, "--index", tmp_path / "ix", "--weights", small_model)
    query = sorted(folder.rglob("*.png"))[0]
    wrong = cli("query", query, "--index", tmp_path / "ix", "--device", "gpu", ok=False)
    assert wrong.exit_code == 2 and "unknown device 'gpu'" in wrong.output
    if not torch.cuda.is_available():
        missing = cli("query", query, "--index", tmp_path / "ix", "--device", "cuda:1", ok=False)
        assert missing.exit_code == 1 and "no CUDA device" in missing.output
        assert "Traceback" not in missing.output


def test_index_create_says_what_its_run_did_and_update_too(folder, small_model, tmp_path):
    with Index.create(tmp_path / "ix", folder, IndexOptions(weights=str(small_model))) as index:
        assert index.report.added == 24 and index.count == 24
        (folder / "extra").mkdir()
        shutil.copy(sorted(folder.rglob("*.png"))[0], folder / "extra" / "copy.png")
        index.update(folder)
        assert index.report.added == 1 and index.count == 25
