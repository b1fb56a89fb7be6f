"""Every file a phone makes: HEIC/HEIF and AVIF decoded upright; other types counted, named."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from retrieval.images.decode import load_image
from retrieval.images.walk import walk

ORIENTATION = 0x0112


def rotated_photo(path: Path, fmt: str) -> Path:
    """40x20, blue strip on the left, EXIF orientation 6: upright it is 20x40, blue on top."""
    image = Image.new("RGB", (40, 20), (200, 0, 0))
    image.paste((0, 0, 200), (0, 0, 10, 20))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    image.save(path, format=fmt, exif=exif.tobytes(), quality=90)
    return path


@pytest.mark.parametrize(("fmt", "name"), [("HEIF", "IMG_0001.HEIC"), ("AVIF", "photo.avif")])
def test_phone_formats_decode_with_exif_orientation_applied(tmp_path, fmt, name) -> None:
    if fmt == "HEIF":
        pytest.importorskip("pillow_heif").register_heif_opener()  # to write the test file
    decoded = load_image(rotated_photo(tmp_path / name, fmt))
    assert decoded.mode == "RGB" and decoded.size == (20, 40)
    top, bottom = decoded.getpixel((10, 3)), decoded.getpixel((10, 36))
    assert top[2] > 150 and top[0] < 50  # blue on top
    assert bottom[0] > 150 and bottom[2] < 50


def test_walk_lists_heic_and_avif_and_counts_other_types(tmp_path) -> None:
    names = [
        "a/IMG_1.HEIC",
        "a/IMG_2.heif",
        "b/x.avif",
        "b/y.jpg",
        "raw/1.CR2",
        "raw/2.cr2",
        "clip.mov",
        "notes",
        ".hidden.mov",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = walk(tmp_path)
    listed = sorted(p.relative_to(tmp_path).as_posix() for p in found.files)
    assert listed == ["a/IMG_1.HEIC", "a/IMG_2.heif", "b/x.avif", "b/y.jpg"]
    assert dict(found.other_types) == {".cr2": 2, ".mov": 1, "(no suffix)": 1}
    assert found.other_types_summary() == (
        "4 files of other types: .cr2 (2), (no suffix) (1), .mov (1)"
    )


def test_walk_of_only_images_has_no_other_types_line(tmp_path) -> None:
    (tmp_path / "x.png").write_bytes(b"x")
    assert walk(tmp_path).other_types_summary() == ""


def test_other_types_line_names_the_most_common_first() -> None:
    from retrieval.images.walk import describe_other_types

    assert describe_other_types({".mov": 2, ".cr2": 10}) == (
        "12 files of other types: .cr2 (10), .mov (2)"
    )
    assert describe_other_types({".txt": 1}) == "1 file of other types: .txt (1)"
    many = {f".x{i}": 1 for i in range(8)}
    assert describe_other_types(many, most=6).endswith(", 2 more types")
