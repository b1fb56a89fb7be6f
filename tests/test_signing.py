"""A signature is the same bit for bit whoever makes it: the duplicates pass from the file, or
the index build from the image it decoded for the model (on any size, format, turn or mode)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.build import signature_store
from retrieval.images.decode import load_image
from retrieval.images.hashes import ImageSignature
from retrieval.images.signing import (
    DRAFT,
    jpeg_draft_scale,
    signature_of_decoded,
    signature_of_file,
)
from tests.corpus import scene


def same(a: ImageSignature, b: ImageSignature) -> bool:
    return (
        np.array_equal(a.hashes, b.hashes)
        and np.array_equal(a.windows, b.windows)
        and np.array_equal(a.thumb, b.thumb)
        and (a.width, a.height, a.grey) == (b.width, b.height, b.grey)
    )


def save(path: Path, image: Image.Image, orientation: int | None = None, **options) -> Path:
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif
    image.save(path, **options)
    return path


@pytest.mark.parametrize(
    "size",
    [(100, 80), (255, 300), (256, 256), (600, 511), (1023, 1100), (2047, 3000), (2100, 2048)],
)
@pytest.mark.parametrize("side", [None, 64, DRAFT, 256])
def test_jpeg_draft_scale_is_the_one_pillow_picks(size, side) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 120, 30)).save(buffer, "JPEG")
    with Image.open(buffer) as image:
        if side is not None:
            image.draft("RGB", (side, side))
        drafted = image.size
    scale = jpeg_draft_scale(size, side)
    assert drafted == (-(-size[0] // scale), -(-size[1] // scale))


@pytest.mark.parametrize(
    ("name", "size", "orientation", "resize", "mode"),
    [
        ("small.jpg", (200, 150), None, 256, "RGB"),  # both decodes at full scale
        ("mid.jpg", (700, 520), None, 256, "RGB"),  # the model's 1/2, the signature's 1/4
        ("large.jpg", (2400, 2100), None, 256, "RGB"),  # both at 1/8
        ("turned.jpg", (700, 520), 6, 256, "RGB"),
        ("turned_small.jpg", (180, 120), 8, 256, "RGB"),
        ("small_model.jpg", (700, 520), None, 64, "RGB"),  # a 64 px model: 1/8 against 1/4
        ("phone.jpg", (700, 520), None, 256, "MPO"),  # a JPEG Pillow names MPO: drafts too
        ("plain.png", (300, 200), None, 256, "RGB"),
        ("grey_model.png", (300, 200), None, 256, "L"),  # the model sees grey, the hashes colour
    ],
)
def test_the_builds_signature_is_the_files(tmp_path, name, size, orientation, resize, mode) -> None:
    options = {"quality": 90} if name.endswith(".jpg") else {}
    if mode == "MPO":  # a second picture inside, as phones write them
        options.update(format="MPO", save_all=True, append_images=[scene(8, size)])
        mode = "RGB"
    path = save(tmp_path / name, scene(7, size), orientation, **options)
    data = path.read_bytes()
    decoded = load_image(data, mode=mode, draft_size=resize)
    made = signature_of_decoded(data, decoded, mode, resize)
    assert same(made, signature_of_file(str(path)))
    upright = (size[1], size[0]) if orientation in (6, 8) else size
    assert (made.width, made.height) == upright


def test_a_grey_picture_is_grey_whichever_decode_signs_it(tmp_path) -> None:
    path = save(tmp_path / "grey.jpg", scene(3, (400, 300)).convert("L"), quality=90)
    data = path.read_bytes()
    made = signature_of_decoded(data, load_image(data, draft_size=256), "RGB", 256)
    assert made.grey and same(made, signature_of_file(str(path)))


def test_index_build_stores_each_files_signature_from_its_decoders(tmp_path, small_model) -> None:
    """Through the decoder processes (the records cross a process boundary): every decoded
    file's stored signature is the file's own; a broken file has none and the rest are kept."""
    from retrieval import ExtractOptions, Index, IndexOptions

    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(70):  # enough files for a decoder process (MIN_FILES_FOR_WORKERS)
        size = (700, 520) if seed % 3 else (160, 120)
        save(folder / f"scene{seed}.jpg", scene(seed, size), 6 if seed % 5 == 0 else None)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG at all")
    options = IndexOptions(weights=str(small_model), extract=ExtractOptions(workers=1))
    with Index.create(tmp_path / "index", folder, options) as index:
        rows = [r for r in index.rows(limit=None)]
        report = index.report
    assert report.signed == 70 and report.skipped == 1
    db = signature_store.connect(tmp_path / "index")
    stored = signature_store.read(db, [r.sha256 for r in rows])
    db.close()
    assert len(stored) == 70
    for row in rows:
        assert same(stored[row.sha256], signature_of_file(row.path)), row.path

    again = IndexOptions(weights=str(small_model), rebuild=True)
    with Index.create(tmp_path / "index", folder, again) as index:
        assert index.report.signed == 0  # the same bytes: signed the first time


def test_no_signatures_stores_none(tmp_path, small_model) -> None:
    from retrieval import Index, IndexOptions

    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(3):
        save(folder / f"scene{seed}.png", scene(seed, (96, 72)))
    options = IndexOptions(weights=str(small_model), signatures=False)
    with Index.create(tmp_path / "index", folder, options) as index:
        assert index.report.signed == 0
    assert not (tmp_path / "index" / signature_store.FILE).exists()


def test_a_signature_that_fails_costs_the_file_nothing(tmp_path, small_model, monkeypatch) -> None:
    """Signing is a cache: whatever it raises, the file is indexed and the pass signs it later."""
    from retrieval import Index, IndexOptions
    from retrieval.extraction import reader

    def broken(*args, **kwargs):
        raise ValueError("the signature's own failure")

    monkeypatch.setattr(reader, "signature_of_decoded", broken)
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(3):
        save(folder / f"scene{seed}.png", scene(seed, (96, 72)))
    with Index.create(tmp_path / "index", folder, IndexOptions(weights=str(small_model))) as index:
        assert index.report.signed == 0 and index.report.added == 3 and index.count == 3
