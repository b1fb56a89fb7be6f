"""The CUDA path: JPEG headers, routing, GPU decode + resize + crop against the CPU path.

The decoding logic runs on the CPU everywhere (torchvision's decode_jpeg uses libjpeg-turbo
there), so routing, orientation, fallback and the resize's tolerance are pinned without a GPU;
the tests marked ``cuda`` repeat the comparison with nvjpeg and the real pipeline on a GPU.

Tolerances, CPU emulation (measured): decoded pixels equal Pillow's; crops within 2 levels of
the CPU path's, 0.03-0.06 levels on average (Pillow resizes in fixed point, we in float32).
On a GPU (not yet measured on this project's hardware; set from nvjpeg's documented IDCT and
upsampling differences): crops within a mean of 2 levels, fc7 rows within 5% relative L2 and
the top-6 neighbours of a set overlapping >= 0.9 with the CPU path's.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from retrieval.extraction import extract_images
from retrieval.extraction.cuda import (
    _Jpeg,
    _launch,
    assemble,
    decode_items,
    extract_on_device,
    read_for_device,
)
from retrieval.extraction.mapper import Fc7Mapper
from retrieval.extraction.reader import decode_on_cpu, read_file
from retrieval.extraction.types import ExtractOptions, StageTimes
from retrieval.images.decode import load_image
from retrieval.images.gpu_decode import decode_jpegs, orient, resize_and_crop, resized_size
from retrieval.images.jpeg import exif_orientation, inspect_jpeg
from retrieval.model.preprocess import IMAGENET, Preprocessing
from retrieval.model.weights import load_model
from tests.corpus import make_image, make_oriented_jpeg, make_problem_corpus, structured_rgb

SMALL = Preprocessing(resize=64, crop=56)
CPU = torch.device("cpu")


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def test_header_of_plain_grey_progressive_and_cmyk_jpegs() -> None:
    rgb = Image.fromarray(structured_rgb((48, 40)))
    plain = inspect_jpeg(_jpeg(rgb))
    assert (plain.width, plain.height, plain.components, plain.frame) == (48, 40, 3, 0xC0)
    assert plain.gpu_decodable(175)
    assert inspect_jpeg(_jpeg(rgb.convert("L"))).components == 1
    progressive = inspect_jpeg(_jpeg(rgb, progressive=True))
    assert progressive.frame == 0xC2 and progressive.gpu_decodable(175)
    cmyk = inspect_jpeg(_jpeg(rgb.convert("CMYK")))
    assert cmyk.components == 4 and not cmyk.gpu_decodable(175)
    assert not plain.gpu_decodable(48 * 40 / 1e6 - 1e-6)  # over the size limit: CPU says why


def test_header_refuses_what_is_not_a_whole_jpeg() -> None:
    data = _jpeg(Image.fromarray(structured_rgb((64, 64))))
    assert inspect_jpeg(data[:20]) is None  # cut before the frame header
    assert not inspect_jpeg(data[: len(data) // 2]).complete
    assert inspect_jpeg(b"\x89PNG\r\n\x1a\n" + bytes(40)) is None
    assert inspect_jpeg(b"\xff\xd8\xff" + bytes(range(256)) * 4) is None
    assert inspect_jpeg(b"") is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_read_and_applied_like_pillow(tmp_path: Path, orientation) -> None:
    path = make_oriented_jpeg(tmp_path / "o.jpg", orientation)
    data = path.read_bytes()
    info = inspect_jpeg(data)
    assert info.orientation == orientation
    stored = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert np.array_equal(orient(stored, orientation).permute(1, 2, 0).numpy(), upright)


def test_broken_exif_means_upright() -> None:
    assert exif_orientation(b"MM\x00*\x00\x00\x00\x08" + b"\xff" * 40) == 1
    assert exif_orientation(b"junk") == 1


def test_decoded_pixels_equal_pillows(tmp_path: Path) -> None:
    paths = [
        make_image(tmp_path / "rgb.jpg", size=(70, 50), seed=1, quality=85),
        make_image(tmp_path / "grey.jpg", size=(50, 70), mode="L", seed=2),
        make_image(tmp_path / "progressive.jpg", size=(64, 64), seed=3, progressive=True),
        make_oriented_jpeg(tmp_path / "rotated.jpg", 6),
    ]
    datas = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    infos = [inspect_jpeg(p.read_bytes()) for p in paths]
    for path, image in zip(paths, decode_jpegs(datas, infos, CPU, 3), strict=True):
        expected = np.asarray(load_image(path, mode="RGB"))
        assert np.array_equal(image.permute(1, 2, 0).numpy(), expected), path.name


def test_tensor_resize_and_crop_is_within_two_levels_of_pillow(tmp_path: Path) -> None:
    sizes = [(224, 224), (500, 375), (375, 500), (100, 80), (300, 1000), (257, 256)]
    for seed, size in enumerate(sizes):
        image = load_image(make_image(tmp_path / f"{seed}.png", size=size, seed=seed))
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        ours = resize_and_crop([tensor], IMAGENET)[0].int()
        theirs = IMAGENET.resize_and_crop(image).int()
        difference = (ours - theirs).abs()
        assert difference.max() <= 2 and difference.float().mean() <= 0.1, size


def test_same_sized_images_share_a_resize_and_keep_their_order() -> None:
    rng = np.random.default_rng(0)
    images = [
        torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        for h, w in [(60, 80), (90, 64), (60, 80), (64, 64), (60, 80)]
    ]
    together = resize_and_crop(images, SMALL)
    for i, image in enumerate(images):
        assert torch.equal(together[i], resize_and_crop([image], SMALL)[0])
    assert resized_size(60, 80, 64) == (64, 85) and resized_size(90, 64, 64) == (90, 64)


def test_reader_routes_each_file_to_the_decoder_that_takes_it(tmp_path: Path) -> None:
    rgb = Image.fromarray(structured_rgb((64, 48)))
    (tmp_path / "a.jpg").write_bytes(_jpeg(rgb))
    (tmp_path / "cmyk.jpg").write_bytes(_jpeg(rgb.convert("CMYK")))
    rgb.save(tmp_path / "b.png")
    (tmp_path / "cut.jpg").write_bytes(_jpeg(rgb)[:400])
    payloads = {
        name: read_for_device(0, str(tmp_path / name), SMALL, 175)
        for name in ("a.jpg", "cmyk.jpg", "b.png", "cut.jpg")
    }
    assert isinstance(payloads["a.jpg"][1], _Jpeg)
    assert isinstance(payloads["cmyk.jpg"][1], torch.Tensor)  # decoded by Pillow in the reader
    assert isinstance(payloads["b.png"][1], torch.Tensor)
    record, payload, _ = payloads["cut.jpg"]
    assert payload is None and record.reason == "truncated"


def test_device_path_on_the_problem_corpus_matches_the_cpu_path(tmp_path: Path) -> None:
    """Every file of the corpus through reader -> decode_items -> assemble, on the CPU."""
    expected = make_problem_corpus(tmp_path)
    paths = sorted(expected)
    items = [read_for_device(i, str(tmp_path / p), SMALL, 175) for i, p in enumerate(paths)]
    images, crops = decode_items(items, SMALL, CPU, 175)
    batch = assemble(images, crops, SMALL, CPU)
    assert [r.reason for r, _, _ in items] == [expected[p] for p in paths]
    ok = [i for i, (r, _, _) in enumerate(items) if r.ok]
    assert batch.shape == (len(ok), 3, 56, 56)
    assert any(isinstance(items[i][1], _Jpeg) for i in ok)  # the JPEGs did take the device path
    for slot, i in enumerate(ok):
        record, data, times = read_file(i, str(tmp_path / paths[i]))
        reference = decode_on_cpu(record, data, times, SMALL, 175)
        difference = (batch[slot].int() - reference.int()).abs()
        assert difference.float().mean() <= 0.5 and difference.max() <= 3, paths[i]


def test_one_file_nvjpeg_refuses_does_not_fail_its_batch(monkeypatch) -> None:
    import torchvision.io

    real = torchvision.io.decode_jpeg
    datas = [
        torch.frombuffer(
            bytearray(_jpeg(Image.fromarray(structured_rgb(seed=i)))), dtype=torch.uint8
        )
        for i in range(3)
    ]
    refused = datas[1]

    def picky(data, **kwargs):
        if (isinstance(data, list) and any(d is refused for d in data)) or data is refused:
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    infos = [inspect_jpeg(d.numpy().tobytes()) for d in datas]
    decoded = decode_jpegs(datas, infos, CPU, 3)
    assert decoded[1] is None and decoded[0] is not None and decoded[2] is not None


def test_a_refused_jpeg_is_decoded_by_pillow_or_skipped_with_its_reason(
    tmp_path: Path, monkeypatch
) -> None:
    import retrieval.extraction.cuda as extract_cuda

    good = make_image(tmp_path / "good.jpg", size=(64, 64), seed=1)
    broken = tmp_path / "broken.jpg"  # a whole header, then stray markers: Pillow says corrupt
    data = good.read_bytes()
    scan = data.index(b"\xff\xda")
    broken.write_bytes(data[: scan + 14] + b"\xff\xd8" * 10 + b"\xff\xd9")
    items = [read_for_device(i, str(p), SMALL, 175) for i, p in enumerate([good, broken, good])]
    assert all(isinstance(payload, _Jpeg) for _, payload, _ in items)
    monkeypatch.setattr(extract_cuda, "decode_jpegs", lambda datas, *a: [None] * len(datas))
    images, crops = decode_items(items, SMALL, CPU, 175)
    assert images == {} and sorted(crops) == [0, 2]
    assert items[1][0].reason == "corrupt" and items[0][0].ok


def test_progressive_and_large_jpegs_are_decoded_in_the_reader_threads(tmp_path: Path) -> None:
    """Both would be decoded serially or at full size on the GPU; Pillow's draft is cheaper."""
    plain = make_image(tmp_path / "plain.jpg", size=(80, 72), seed=1)
    progressive = make_image(tmp_path / "progressive.jpg", size=(80, 72), seed=2, progressive=True)
    large = make_image(tmp_path / "large.jpg", size=(8 * 64 + 8, 8 * 64), seed=3)
    just_under = make_image(tmp_path / "under.jpg", size=(8 * 64, 8 * 64 - 1), seed=4)
    kinds = {
        path.name: type(read_for_device(0, str(path), SMALL, 175)[1])
        for path in (plain, progressive, large, just_under)
    }
    assert kinds == {
        "plain.jpg": _Jpeg,
        "progressive.jpg": torch.Tensor,
        "large.jpg": torch.Tensor,
        "under.jpg": _Jpeg,
    }


def test_refused_jpegs_are_decoded_in_the_fallback_pool_not_the_caller(
    tmp_path: Path, monkeypatch
) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import retrieval.extraction.cuda as extract_cuda

    paths = [make_image(tmp_path / f"{i}.jpg", size=(64, 64), seed=i) for i in range(3)]
    items = [read_for_device(i, str(p), SMALL, 175) for i, p in enumerate(paths)]
    monkeypatch.setattr(extract_cuda, "decode_jpegs", lambda datas, *a: [None] * len(datas))
    threads: list[str] = []
    real = extract_cuda.decode_on_cpu

    def spy(*args):
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(extract_cuda, "decode_on_cpu", spy)
    with ThreadPoolExecutor(2, "retrieve-fallback") as pool:
        images, crops = decode_items(items, SMALL, CPU, 175, pool)
    assert images == {} and sorted(crops) == [0, 1, 2]
    assert threads and all(name.startswith("retrieve-fallback") for name in threads)


def test_crops_are_assembled_without_index_tensors(tmp_path: Path, monkeypatch) -> None:
    """``torch.tensor(list, device="cuda")`` blocks the host; none may be made per batch."""
    paths = [make_image(tmp_path / f"{i}.jpg", size=(60 + 4 * i, 70), seed=i) for i in range(5)]
    paths.append(make_image(tmp_path / "x.png", size=(64, 64), seed=9))
    items = [read_for_device(i, str(p), SMALL, 175) for i, p in enumerate(paths)]
    images, crops = decode_items(items, SMALL, CPU, 175)
    want = assemble(images, crops, SMALL, CPU)

    def no_tensor(*args, **kwargs):
        raise AssertionError("torch.tensor called while assembling a batch")

    monkeypatch.setattr(torch, "tensor", no_tensor)
    got = assemble(images, crops, SMALL, CPU)
    monkeypatch.undo()
    assert torch.equal(got, want) and got.shape == (6, 3, 56, 56)


def test_unknown_decode_ordering_is_refused() -> None:
    with pytest.raises(ValueError, match="ordering"):
        decode_jpegs([], [], CPU, 3, "sometimes")


def _mixed_folder(root: Path, size: tuple[int, int] = (240, 200)) -> list[Path]:
    """24 JPEGs of assorted sizes (one progressive, one 4:4:4), greyscale, CMYK, PNG,
    EXIF-rotated, then a truncated one."""
    width, height = size
    paths = [
        make_image(root / f"{i:02d}.jpg", size=(width + 7 * i, height + 5 * i), seed=i, quality=90)
        for i in range(24)
    ]
    bigger = (width + 20, height + 30)
    paths[1] = make_image(paths[1], size=bigger, seed=1, progressive=True)
    paths[2] = make_image(paths[2], size=bigger, seed=2, subsampling=0)  # 4:4:4 chroma
    paths.append(make_image(root / "grey.jpg", size=bigger, mode="L", seed=40))
    paths.append(make_image(root / "cmyk.jpg", size=bigger, mode="CMYK", seed=41))
    paths.append(make_image(root / "lossless.png", size=bigger[::-1], seed=42))
    paths.append(make_oriented_jpeg(root / "rotated.jpg", 6, size=(width + 60, height + 40)))
    cut = root / "cut.jpg"
    cut.write_bytes(paths[0].read_bytes()[:500])
    paths.append(cut)
    return paths


def _top6(features: np.ndarray) -> np.ndarray:
    distances = ((features[:, None, :] - features[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    return np.argsort(distances, axis=1)[:, :6]


def test_device_runner_keeps_order_records_and_times_on_the_cpu(
    tmp_path: Path, small_model: Path
) -> None:
    """The CUDA runner (reader threads, one batch in flight) driven on the CPU."""
    paths = _mixed_folder(tmp_path, size=(70, 60))
    options = ExtractOptions(device="cpu", batch_size=5, workers=2)
    reference, cpu_records = extract_images(paths, load_model(small_model), options)
    loaded = load_model(small_model)
    mapper = Fc7Mapper(loaded, CPU)
    threads = ExtractOptions(device="cpu", batch_size=5, workers=3)
    batches = list(extract_on_device(paths, loaded, mapper, threads))
    records = [r for b in batches for r in b.records]
    assert [r.path for r in records] == [str(p) for p in paths]
    assert [r.position for r in records] == list(range(len(paths)))
    assert [r.reason for r in records] == [r.reason for r in cpu_records]
    assert [r.sha256 for r in records] == [r.sha256 for r in cpu_records]
    features = np.concatenate([b.features for b in batches])
    relative = np.linalg.norm(features - reference, axis=1) / np.linalg.norm(reference, axis=1)
    # Most rows differ by the resize's rounding (measured 0.0001-0.0005); the JPEGs at least twice
    # the resize size differ more because the CPU path decodes them at half scale (measured
    # 0.004-0.026), the device path at full size.
    assert np.median(relative) <= 0.002 and relative.max() <= 0.05
    total = StageTimes()
    for batch in batches:
        total.add(batch.times)
    assert total.images == len(features) and total.skipped == 1
    assert min(total.read, total.decode, total.preprocess, total.model, total.wall) > 0


def test_each_image_counts_the_road_it_took(tmp_path: Path, monkeypatch) -> None:
    """nvjpeg, Pillow by choice, Pillow after nvjpeg failed: every decoded image is in one."""
    import torchvision.io

    from retrieval.images.gpu_decode import DecodeFailures

    paths = [make_image(tmp_path / f"{i}.jpg", size=(64, 64), seed=i) for i in range(3)]
    paths.append(make_image(tmp_path / "x.png", size=(64, 64), seed=9))

    def roads(items) -> tuple[int, int, int]:
        total = StageTimes()
        for _, _, times in items:
            total.add(times)
        return total.gpu_decoded, total.cpu_decoded, total.gpu_fallback

    items = [read_for_device(i, str(p), SMALL, 175) for i, p in enumerate(paths)]
    failures = DecodeFailures()
    decode_items(items, SMALL, CPU, 175, failures=failures)
    assert roads(items) == (3, 1, 0) and failures.calls == 0

    def out_of_memory(data, **kwargs):
        raise RuntimeError("nvjpeg: CUDA out of memory\nmore detail")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", out_of_memory)
    items = [read_for_device(i, str(p), SMALL, 175) for i, p in enumerate(paths)]
    images, crops = decode_items(items, SMALL, CPU, 175, failures=failures)
    assert images == {} and sorted(crops) == [0, 1, 2, 3]
    assert roads(items) == (0, 1, 3)
    assert failures.calls == 4  # the batch, then each of its three files
    assert failures.first_error == "RuntimeError: nvjpeg: CUDA out of memory"


def test_greyscale_jpegs_are_decoded_in_rgb_mode_like_pillow(tmp_path: Path) -> None:
    """RGB mode: the decoder replicates Y (nvjpeg does too), as Pillow's L -> RGB does."""
    grey = make_image(tmp_path / "grey.jpg", size=(64, 48), mode="L", seed=3)
    data = torch.frombuffer(bytearray(grey.read_bytes()), dtype=torch.uint8)
    (decoded,) = decode_jpegs([data], [inspect_jpeg(grey.read_bytes())], CPU, 3)
    assert decoded.shape == (3, 48, 64)
    pillow = torch.from_numpy(np.array(Image.open(grey).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(decoded, pillow)


def test_bytes_take_the_files_road_on_the_device_path(tmp_path: Path) -> None:
    """On CUDA, a query by bytes is decoded as the same file is (nvjpeg for the JPEGs it takes),
    so both give one vector; here the same code on the CPU, record for record, crop for crop."""
    from retrieval.extraction import _on_device
    from retrieval.extraction.cuda import crops_on_device

    paths = [make_image(tmp_path / f"{i}.jpg", size=(70 + i, 64), seed=i) for i in range(3)]
    paths.append(make_image(tmp_path / "grey.jpg", size=(64, 64), mode="L", seed=5))
    paths.append(make_image(tmp_path / "x.png", size=(64, 70), seed=9))
    broken = tmp_path / "cut.jpg"
    broken.write_bytes(paths[0].read_bytes()[:300])
    paths.append(broken)
    mapper = Fc7Mapper(load_model("random"), CPU)
    mapper.preprocessing = SMALL
    items = [read_for_device(i, str(p), SMALL, 175) for i, p in enumerate(paths)]
    from_files = crops_on_device(items, SMALL, CPU, 175)
    records, from_bytes = _on_device([p.read_bytes() for p in paths], mapper, 175)
    assert torch.equal(from_bytes, from_files) and from_bytes.shape == (5, 3, 56, 56)
    assert [r.reason for r in records] == [r.reason for r, _, _ in items]
    assert [r.sha256 for r in records] == [r.sha256 for r, _, _ in items]
    assert records[-1].reason is not None and records[0].path == "<upload 0>"


def _through_the_device_runner(monkeypatch) -> None:
    """``retrieve index --device cpu`` driven through the CUDA runner (the CUDA-free road the
    runner allows: torchvision decodes with libjpeg-turbo on the CPU)."""
    import retrieval.extraction.cpu as extract_cpu

    monkeypatch.setattr(extract_cpu, "extract_on_cpu", extract_on_device)


def test_a_failed_gpu_decode_is_counted_and_warned_once(
    tmp_path: Path, small_model: Path, monkeypatch, caplog
) -> None:
    import json
    import logging

    import torchvision.io
    from click.testing import CliRunner

    from retrieval.cli.main import cli

    folder = tmp_path / "images"
    for i in range(5):
        make_image(folder / f"{i}.jpg", size=(64, 64), seed=i)
    (folder / "junk.jpg").write_bytes(b"\xff\xd8\xff" + b"not a jpeg")
    _through_the_device_runner(monkeypatch)
    index = ["--index", str(tmp_path / "index"), "--weights", str(small_model)]
    base = ["index", str(folder), *index, "--device", "cpu", "--batch-size", "2"]
    base += ["--precision", "fp32"]  # bf16 would embed again to measure its fp32 agreement

    result = CliRunner().invoke(cli, [*base, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["decoded"] == {
        "gpu": 5,
        "cpu": 0,
        "cpu_after_gpu_failure": 0,
        "skipped": 1,
    }

    def no_nvjpeg(data, **kwargs):
        raise RuntimeError("decode_jpeg: torchvision was built without nvjpeg")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", no_nvjpeg)
    caplog.set_level(logging.WARNING)
    result = CliRunner().invoke(cli, [*base, "--rebuild", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["decoded"] == {"gpu": 0, "cpu": 0, "cpu_after_gpu_failure": 5, "skipped": 1}
    assert data["added"] == 5 and data["times"]["gpu_fallback"] == 5
    warned = [r.getMessage() for r in caplog.records if "nvjpeg failed" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "5 image(s) were decoded on the CPU" in warned[0] and "without nvjpeg" in warned[0]

    result = CliRunner().invoke(cli, ["-v", *base, "--rebuild"], catch_exceptions=False)
    assert "decoded 0 on the GPU, 0 on the CPU, 5 on the CPU after the GPU failed" in (
        result.stdout
    )
    assert "5 on the CPU after the GPU failed" in result.stderr.split("stage busy times")[-1]


# --- on a GPU -------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_features_match_the_cpu_path(tmp_path: Path, precision: str) -> None:
    paths = _mixed_folder(tmp_path)
    cpu, cpu_records = extract_images(paths, load_model("random"), ExtractOptions(device="cpu"))
    options = ExtractOptions(device="cuda", batch_size=8, workers=4, precision=precision)
    gpu, gpu_records = extract_images(paths, load_model("random"), options)
    assert [r.reason for r in gpu_records] == [r.reason for r in cpu_records]
    assert [r.path for r in gpu_records] == [str(p) for p in paths]
    relative = np.linalg.norm(gpu - cpu, axis=1) / np.linalg.norm(cpu, axis=1)
    assert relative.max() <= 0.05
    overlap = np.mean(
        [len(set(a) & set(b)) / 6 for a, b in zip(_top6(gpu), _top6(cpu), strict=True)]
    )
    assert overlap >= 0.9


@pytest.mark.cuda
def test_nvjpeg_crops_are_close_to_pillows(tmp_path: Path) -> None:
    paths = _mixed_folder(tmp_path)[:26]
    device = torch.device("cuda")
    items = [read_for_device(i, str(p), IMAGENET, 175) for i, p in enumerate(paths)]
    images, crops = decode_items(items, IMAGENET, device, 175)
    assert len(images) >= 24  # the JPEGs went to nvjpeg
    batch = assemble(images, crops, IMAGENET, device).cpu()
    for slot, path in enumerate(paths):
        record, data, times = read_file(slot, str(path))
        reference = decode_on_cpu(record, data, times, IMAGENET, 175)
        assert (batch[slot].int() - reference.int()).abs().float().mean() <= 2.0, path.name


@pytest.mark.cuda
def test_cuda_compile_and_order_with_reader_threads(tmp_path: Path) -> None:
    paths = [make_image(tmp_path / f"{i:03d}.jpg", size=(230, 250), seed=i) for i in range(40)]
    plain, _ = extract_images(
        paths, load_model("random"), ExtractOptions(device="cuda", batch_size=16, workers=8)
    )
    options = ExtractOptions(device="cuda", batch_size=16, workers=8, compile=True)
    compiled, records = extract_images(paths, load_model("random"), options)
    assert [r.path for r in records] == [str(p) for p in paths]
    relative = np.linalg.norm(compiled - plain, axis=1) / np.linalg.norm(plain, axis=1)
    assert relative.max() <= 1e-2


def _race_folder(root: Path) -> list[Path]:
    """96 JPEGs of varied sizes: each batch frees blocks of many sizes for the next to reuse."""
    return [
        make_image(root / f"{i:03d}.jpg", size=(224 + 13 * (i % 9), 224 + 7 * (i % 5)), seed=i)
        for i in range(96)
    ]


@pytest.mark.cuda
def test_pipelined_nvjpeg_decode_gives_the_features_of_a_synchronised_run(tmp_path: Path) -> None:
    """The decode race: batch N+1's nvjpeg output must not land in memory batch N still reads.

    Unordered, torchvision allocates the output on the main stream and nvjpeg writes it from its
    own, so N's queued model can read N+1's pixels (a torchvision pull request saw 199 corrupted
    runs of 200 on an H100). The reference synchronises before every decode.
    """
    paths = _race_folder(tmp_path)
    loaded = load_model("random")
    mapper = Fc7Mapper(loaded, torch.device("cuda"))
    options = ExtractOptions(device="cuda", batch_size=16, workers=8)

    def run(ordering: str) -> np.ndarray:
        batches = extract_on_device(paths, loaded, mapper, options, ordering=ordering)
        return np.concatenate([b.features for b in batches])

    reference = run("sync")
    for _ in range(5):
        pipelined = run("streams")
        relative = np.linalg.norm(pipelined - reference, axis=1) / np.linalg.norm(reference, axis=1)
        assert relative.max() <= 1e-3


@pytest.mark.cuda
def test_decoding_and_assembling_a_batch_never_waits_for_the_device(tmp_path: Path) -> None:
    paths = _race_folder(tmp_path)[:32]
    paths.append(make_image(tmp_path / "x.png", size=(300, 260), seed=1))  # a CPU crop too
    device = torch.device("cuda")
    items = [read_for_device(i, str(p), IMAGENET, 175) for i, p in enumerate(paths)]
    decode_items(items, IMAGENET, device, 175)  # warm-up: nvjpeg handles, allocator pools
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        images, crops = decode_items(items, IMAGENET, device, 175)
        batch = assemble(images, crops, IMAGENET, device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert batch.shape == (33, 3, 224, 224)


@pytest.mark.cuda
def test_launching_a_batch_through_the_model_never_waits_for_the_device(tmp_path: Path) -> None:
    """The whole launch, normalisation and model included (needs Preprocessing.normalize to keep
    its mean and std off the host-to-device path)."""
    paths = _race_folder(tmp_path)[:32]
    loaded = load_model("random")
    mapper = Fc7Mapper(loaded, torch.device("cuda"))
    options = ExtractOptions(device="cuda", batch_size=32)
    items = [read_for_device(i, str(p), IMAGENET, 175) for i, p in enumerate(paths)]
    _launch(list(items), IMAGENET, mapper, options).marks.wait()  # warm-up (cuDNN, pools)
    items = [read_for_device(i, str(p), IMAGENET, 175) for i, p in enumerate(paths)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        launched = _launch(items, IMAGENET, mapper, options)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    launched.marks.wait()
    assert launched.features.shape == (32, loaded.fc7_dim)
