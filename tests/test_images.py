"""Files -> decoded images: the walk, every pixel mode, size limits, and every broken file."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from retrieval.errors import ImageReadError, RetrieveError, SkipReason
from retrieval.images import decode as images
from retrieval.images.decode import DEFAULT_MAX_MEGAPIXELS, convert_mode, load_image
from retrieval.images.walk import IMAGE_SUFFIXES, WalkProblem, find_images, walk
from tests.corpus import (
    MARKER_COLOURS,
    expected_walk_problems,
    make_image,
    make_oriented_jpeg,
    make_problem_corpus,
    png_bytes,
    readable_despite_permissions,
    structured_rgb,
)

needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")


def reason_of(source, **kwargs) -> str:
    with pytest.raises(ImageReadError) as caught:
        load_image(source, **kwargs)
    return caught.value.reason


def relative(paths: list[Path], root: Path) -> list[str]:
    return [path.relative_to(root).as_posix() for path in paths]


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail instead of hanging the whole suite (POSIX main thread only)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


# --- the walk -------------------------------------------------------------------------------


def test_every_suffix_in_any_case_is_found_sorted_and_recursively(tmp_path: Path) -> None:
    names = ["b/z.JPG", "a.jpeg", "b/a.Png", "c/d/e.bmp", "f.GIF", "g.webp", "h.TIF", "i.tiff"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    files, problems = find_images(tmp_path)
    assert relative(files, tmp_path) == sorted(names, key=lambda name: Path(name).parts)
    assert files == sorted(files)
    assert problems == []
    classic = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    assert classic | {".heic", ".heif", ".hif", ".avif"} == IMAGE_SUFFIXES


def test_other_suffixes_and_hidden_entries_are_not_listed(tmp_path: Path) -> None:
    for name in ["notes.txt", "photo.jpg.txt", "raw.cr2", "x.svg", ".hidden.jpg", ".cache/a.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "keep.png").write_bytes(b"x")
    assert relative(find_images(tmp_path)[0], tmp_path) == ["keep.png"]
    listed = find_images(tmp_path, include_hidden=True)[0]
    assert relative(listed, tmp_path) == [".cache/a.png", ".hidden.jpg", "keep.png"]


def test_folder_named_like_an_image_is_walked_as_a_folder(tmp_path: Path) -> None:
    make_image(tmp_path / "album.jpg" / "inside.png")
    assert relative(find_images(tmp_path)[0], tmp_path) == ["album.jpg/inside.png"]


def test_single_image_root_is_returned_as_is(tmp_path: Path) -> None:
    photo = make_image(tmp_path / "one.JPG")
    assert find_images(photo) == ([photo], [])


@pytest.mark.parametrize("name", ["missing", "notes.txt"])
def test_root_that_is_missing_or_not_an_image_raises_one_line(tmp_path: Path, name: str) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RetrieveError) as caught:
        find_images(tmp_path / name)
    assert "\n" not in str(caught.value)
    assert name in str(caught.value)


@needs_symlinks
def test_symlink_loop_does_not_hang_the_walk(tmp_path: Path) -> None:
    make_image(tmp_path / "a" / "photo.png")
    (tmp_path / "a" / "up").symlink_to("..", target_is_directory=True)
    (tmp_path / "a" / "self").symlink_to(".", target_is_directory=True)
    with deadline(5):
        files, problems = find_images(tmp_path)
    assert relative(files, tmp_path) == ["a/photo.png"]
    assert problems == [
        WalkProblem(tmp_path / "a" / "self", "symlink loop"),
        WalkProblem(tmp_path / "a" / "up", "symlink loop"),
    ]


@needs_symlinks
def test_symlinks_pointing_at_each_other_are_a_reported_loop(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").symlink_to("b.jpg")
    (tmp_path / "b.jpg").symlink_to("a.jpg")
    with deadline(5):
        files, problems = find_images(tmp_path)
    assert files == []
    assert [problem.reason for problem in problems] == ["symlink loop", "symlink loop"]


@needs_symlinks
def test_a_file_is_listed_once_under_its_real_name_and_a_link_outside_under_its_own(
    tmp_path: Path,
) -> None:
    """A link to an image of the collection is left out (the image would be indexed twice and
    be its own duplicate); a link to one elsewhere is listed, once however many point at it;
    hard links are real names and all listed."""
    root = tmp_path / "root"
    make_image(root / "real.png")
    make_image(tmp_path / "elsewhere.png", seed=1)
    (root / "a link to real.png").symlink_to("real.png")
    (root / "b link to elsewhere.png").symlink_to(tmp_path / "elsewhere.png")
    (root / "c link to elsewhere.png").symlink_to(tmp_path / "elsewhere.png")
    os.link(root / "real.png", root / "hard.png")
    found = walk(root)
    assert relative(found.files, root) == ["b link to elsewhere.png", "hard.png", "real.png"]
    assert found.aliases == 2


@needs_symlinks
def test_linked_folder_outside_root_is_walked_but_an_alias_inside_is_not(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_image(tmp_path / "elsewhere" / "far.png")
    make_image(root / "zz_real" / "near.png")
    (root / "aa_alias").symlink_to(Path("zz_real"), target_is_directory=True)
    (root / "outside").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    files, problems = find_images(root)
    # The alias sorts first, yet the folder is listed under its real path, and only once.
    assert relative(files, root) == ["outside/far.png", "zz_real/near.png"]
    assert problems == []


@needs_symlinks
def test_broken_symlink_is_a_walk_problem_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "gone.jpg").symlink_to("nowhere.jpg")
    (tmp_path / "gone.txt").symlink_to("nowhere.txt")  # not an image name: not worth telling
    assert find_images(tmp_path) == ([], [WalkProblem(tmp_path / "gone.jpg", "broken symlink")])


@needs_symlinks
def test_follow_symlinks_false_ignores_every_link(tmp_path: Path) -> None:
    make_image(tmp_path / "elsewhere" / "far.png")
    root = tmp_path / "root"
    make_image(root / "real.png")
    (root / "link.png").symlink_to(root / "real.png")
    (root / "dir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "broken.jpg").symlink_to("nowhere.jpg")
    files, problems = find_images(root, follow_symlinks=False)
    assert relative(files, root) == ["real.png"]
    assert problems == []


def test_unreadable_folder_is_reported_and_the_walk_goes_on(tmp_path: Path) -> None:
    make_image(tmp_path / "ok" / "a.png")
    locked = tmp_path / "locked"
    make_image(locked / "b.png")
    locked.chmod(0)
    if readable_despite_permissions(locked / "b.png"):
        locked.chmod(0o755)
        pytest.skip("this process reads chmod-000 folders (root)")
    try:
        files, problems = find_images(tmp_path)
    finally:
        locked.chmod(0o755)
    assert relative(files, tmp_path) == ["ok/a.png"]
    assert problems == [WalkProblem(locked, "permission denied")]


def test_folder_that_cannot_be_listed_is_reported_even_as_root(tmp_path: Path, monkeypatch) -> None:
    make_image(tmp_path / "ok" / "a.png")
    make_image(tmp_path / "locked" / "b.png")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    with monkeypatch.context() as patch:  # undone before tmp_path's own clean-up lists folders
        patch.setattr(os, "scandir", scandir)
        files, problems = find_images(tmp_path)
    assert relative(files, tmp_path) == ["ok/a.png"]
    assert problems == [WalkProblem(tmp_path / "locked", "permission denied")]


def test_names_with_unicode_spaces_and_newlines_are_found_and_load(tmp_path: Path) -> None:
    names = ["café 東京.jpg", "new\nline.png", "  spaced  .png", "😀.webp", "tab\t.gif"]
    for seed, name in enumerate(names):
        make_image(tmp_path / name, seed=seed)
    files, _ = find_images(tmp_path)
    assert sorted(path.name for path in files) == sorted(names)
    assert all(load_image(path).size == (48, 40) for path in files)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_named_pipe_is_neither_listed_nor_allowed_to_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    assert find_images(tmp_path) == ([], [])
    with deadline(5):
        assert reason_of(tmp_path / "pipe.jpg") == SkipReason.UNREADABLE.value


# --- the problem corpus, end to end through this module --------------------------------------


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, dict[str, str | None]]:
    root = tmp_path / "corpus"
    return root, make_problem_corpus(root)


def test_problem_corpus_walk_lists_exactly_the_expected_files(corpus) -> None:
    root, expected = corpus
    files, problems = find_images(root)
    assert relative(files, root) == sorted(expected, key=lambda name: Path(name).parts)
    reported = {
        path.as_posix(): reason
        for path, reason in ((p.path.relative_to(root), p.reason) for p in problems)
    }
    assert reported == expected_walk_problems(root)


def test_problem_corpus_every_file_gets_its_expected_outcome(corpus) -> None:
    root, expected = corpus
    assert len(expected) >= 60
    outcomes = {}
    for name in expected:
        try:
            image = load_image(root / name)
            assert image.mode == "RGB"
            outcomes[name] = None
        except ImageReadError as error:
            outcomes[name] = error.reason
    assert outcomes == expected
    assert {reason for reason in expected.values() if reason} >= {
        "empty file",
        "not an image",
        "truncated",
        "too large",
        "corrupt",
    }


# --- every mode becomes exactly RGB or L -----------------------------------------------------

MODE_FILES = [
    ("rgb.png", "RGB", {}),
    ("gray.png", "L", {}),
    ("rgba.png", "RGBA", {}),
    ("la.png", "LA", {}),
    ("p.png", "P", {}),
    ("p_trns.png", "P", {"transparency": 0}),
    ("p_trns_bytes.png", "P", {"transparency": bytes(range(0, 256, 16))}),
    ("cmyk.jpg", "CMYK", {}),
    ("gray16.png", "I;16", {}),
    ("gray16.tif", "I;16", {}),
    ("int32.tif", "I", {}),
    ("float.tif", "F", {}),
    ("one.bmp", "1", {}),
    ("lab.tif", "LAB", {}),
    ("ycbcr.tif", "RGB", {"compression": "jpeg"}),
    ("rgba.webp", "RGBA", {"lossless": True}),
    ("progressive.jpg", "RGB", {"progressive": True}),
]


@pytest.mark.parametrize("out_mode", ["RGB", "L"])
@pytest.mark.parametrize(("name", "mode", "options"), MODE_FILES, ids=[m[0] for m in MODE_FILES])
def test_every_file_mode_becomes_exactly_the_requested_mode(
    tmp_path: Path, name: str, mode: str, options: dict, out_mode: str
) -> None:
    path = make_image(tmp_path / name, mode=mode, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's "Palette images with Transparency..."
        image = load_image(path, mode=out_mode)
    assert image.mode == out_mode
    assert image.size == (48, 40)


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    pixels = np.zeros((4, 4, 4), np.uint8)
    pixels[:, :2] = (200, 10, 10, 255)  # opaque red-ish left half
    pixels[:, 2:] = (0, 0, 0, 0)  # fully transparent black right half
    pixels[0, 3] = (0, 0, 0, 128)  # half-transparent black
    path = tmp_path / "rgba.png"
    Image.fromarray(pixels).save(path)
    image = np.asarray(load_image(path))
    assert tuple(image[1, 0]) == (200, 10, 10)
    assert tuple(image[1, 3]) == (255, 255, 255)
    assert all(126 <= value <= 129 for value in image[0, 3])


def test_la_is_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    Image.fromarray(np.array([[[0, 0], [50, 255]]], np.uint8), "LA").save(path)
    assert np.asarray(load_image(path, mode="L")).tolist() == [[255, 50]]


@pytest.mark.parametrize("transparency", [0, b"\x00\xff"], ids=["index", "bytes"])
def test_palette_transparency_becomes_white(tmp_path: Path, transparency) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255, 255, 0, 0])
    image.putpixel((1, 0), 1)
    path = tmp_path / "p.png"
    image.save(path, transparency=transparency)
    assert np.asarray(load_image(path)).tolist() == [[[255, 255, 255], [255, 0, 0]]]


def test_transparent_gif_becomes_white(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255, 0, 255, 0])
    image.putpixel((1, 0), 1)
    path = tmp_path / "t.gif"
    image.save(path, transparency=0)
    assert np.asarray(load_image(path)).tolist() == [[[255, 255, 255], [0, 255, 0]]]


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((8, 8))
    assert red > 240 and green < 15 and blue < 15


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_is_scaled_by_its_high_byte_not_clipped(tmp_path: Path, suffix: str) -> None:
    values = np.array([[0, 255, 256, 40000, 65535]], np.uint16)
    path = tmp_path / f"gray16{suffix}"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I;16")
    assert np.asarray(load_image(path, mode="L")).tolist() == [[0, 0, 1, 156, 255]]
    assert np.asarray(load_image(path))[0, 3].tolist() == [156, 156, 156]


def test_big_endian_16_bit_tiff_is_scaled_the_same(tmp_path: Path) -> None:
    path = tmp_path / "be.tif"
    Image.fromarray(np.array([[40000, 512]], ">u2")).save(path)
    assert np.asarray(load_image(path, mode="L")).tolist() == [[156, 2]]


def test_16_bit_rgb_png_keeps_the_high_byte(tmp_path: Path) -> None:
    rows = b"\x00" + np.array([[40000, 512, 65535]], ">u2").tobytes()
    path = tmp_path / "rgb48.png"
    path.write_bytes(png_bytes(1, 1, bit_depth=16, colour_type=2, raw=rows))
    assert load_image(path).getpixel((0, 0)) == (156, 2, 255)


def test_32_bit_int_and_float_images_map_to_8_bit(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 100, 65535]], np.int32)).save(tmp_path / "i16range.tif")
    Image.fromarray(np.array([[0, 100, 255]], np.int32)).save(tmp_path / "i8range.tif")
    Image.fromarray(np.array([[-5, 0, 5]], np.int32)).save(tmp_path / "signed.tif")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "unit.tif")
    Image.fromarray(np.array([[np.nan, 10.0, 1000.0]], np.float32)).save(tmp_path / "wide.tif")
    Image.fromarray(np.full((1, 2), 70000, np.int32)).save(tmp_path / "flat.tif")

    def grey(name: str) -> list[int]:
        return np.asarray(load_image(tmp_path / name, mode="L"))[0].tolist()

    assert grey("i16range.tif") == [0, 0, 255]
    assert grey("i8range.tif") == [0, 100, 255]
    assert grey("signed.tif") == [0, 128, 255]
    assert grey("unit.tif") == [0, 128, 255]
    assert grey("wide.tif") == [0, 3, 255]
    assert grey("flat.tif") == [255, 255]


def test_one_bit_bmp_becomes_black_and_white(tmp_path: Path) -> None:
    path = tmp_path / "one.bmp"
    Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1").save(path)
    assert np.asarray(load_image(path)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


@pytest.mark.parametrize(
    ("suffix", "options"),
    [(".gif", {}), (".tif", {}), (".webp", {"lossless": True}), (".png", {})],
    ids=["gif", "tiff", "webp", "apng"],
)
def test_multi_frame_files_use_the_first_frame(tmp_path: Path, suffix: str, options) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue", "lime")]
    path = tmp_path / f"frames{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], **options)
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    assert load_image(path).getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    path = make_oriented_jpeg(tmp_path / f"o{orientation}.jpg", orientation, size=(48, 32))
    image = load_image(path)
    assert image.size == (48, 32)  # upright, whatever the stored shape
    pixels = np.asarray(image).astype(int)
    for corner, (y, x) in {"top_left": (4, 4), "top_right": (4, 43)}.items():
        assert np.abs(pixels[y, x] - MARKER_COLOURS[corner]).max() < 40, corner
    assert pixels[28, 24].min() > 215  # and white below the markers


def test_exif_orientation_is_applied_before_grayscale_and_draft(tmp_path: Path) -> None:
    path = make_oriented_jpeg(tmp_path / "o6.jpg", 6, size=(200, 64))
    image = load_image(path, mode="L", draft_size=30)
    assert image.size == (100, 32)  # stored 64x200, decoded at 1/2, turned upright
    assert image.getpixel((2, 2)) < 150  # red's luma, top-left


def test_garbage_exif_keeps_the_image_unrotated(tmp_path: Path) -> None:
    path = make_image(
        tmp_path / "x.jpg", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08" + b"\xff" * 40
    )
    assert load_image(path).size == (48, 40)


def test_webp_loads_exactly_when_lossless(tmp_path: Path) -> None:
    pixels = structured_rgb((32, 24), seed=3)
    path = tmp_path / "x.webp"
    Image.fromarray(pixels).save(path, lossless=True)
    assert np.array_equal(np.asarray(load_image(path)), pixels)


def test_png_is_loaded_pixel_exact(tmp_path: Path) -> None:
    pixels = structured_rgb((33, 17), seed=4)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    assert np.array_equal(np.asarray(load_image(path)), pixels)


@pytest.mark.parametrize("size", [(1, 1), (1, 50), (50, 1)])
def test_one_pixel_wide_images_load(tmp_path: Path, size: tuple[int, int]) -> None:
    assert load_image(make_image(tmp_path / "thin.png", size=size)).size == size


def test_zero_size_image_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "zero.png"
    path.write_bytes(png_bytes(0, 0))
    assert reason_of(path) == SkipReason.CORRUPT.value


def test_mode_pillow_cannot_convert_is_unsupported_mode() -> None:
    with pytest.raises(ImageReadError) as caught:
        convert_mode(Image.new("La", (2, 2)), "RGB", path_for_errors="x.tif")
    assert caught.value.reason == SkipReason.UNSUPPORTED_MODE.value
    assert caught.value.path == "x.tif"


def test_bytes_source_loads_and_names_itself_in_errors(tmp_path: Path) -> None:
    data = encoded(Image.fromarray(structured_rgb()), "PNG")
    assert load_image(data).size == (48, 40)
    with pytest.raises(ImageReadError) as caught:
        load_image(data[:100], path_for_errors="query.png")
    assert caught.value.path == "query.png"
    assert caught.value.reason == SkipReason.TRUNCATED.value
    assert reason_of(b"") == SkipReason.EMPTY.value


def test_bad_arguments_are_programmer_errors(tmp_path: Path) -> None:
    path = make_image(tmp_path / "x.png")
    for kwargs in ({"mode": "RGBA"}, {"max_megapixels": 0}, {"draft_size": 0}):
        with pytest.raises(ValueError):
            load_image(path, **kwargs)


# --- draft: large JPEGs decode at reduced scale ----------------------------------------------


@pytest.mark.parametrize(
    ("draft_size", "expected"),
    [(None, (400, 300)), (100, (200, 150)), (140, (200, 150)), (70, (100, 75)), (200, (400, 300))],
)
def test_draft_reduces_jpeg_only_while_the_shorter_side_stays_big_enough(
    tmp_path: Path, draft_size: int | None, expected: tuple[int, int]
) -> None:
    path = make_image(tmp_path / "big.jpg", size=(400, 300))
    image = load_image(path, draft_size=draft_size)
    assert image.size == expected
    assert min(image.size) >= (draft_size or 0)
    assert image.mode == "RGB"


def test_draft_is_ignored_for_other_formats(tmp_path: Path) -> None:
    path = make_image(tmp_path / "big.png", size=(400, 300))
    assert load_image(path, draft_size=50, mode="L").size == (400, 300)


# --- size limits and decompression bombs -----------------------------------------------------


@pytest.fixture
def no_decoding(monkeypatch) -> None:
    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_bomb_header_is_skipped_without_decoding(tmp_path: Path, no_decoding) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(30000, 30000))
    with pytest.raises(ImageReadError) as caught:  # no_decoding: refused from the header
        load_image(path)
    assert caught.value.reason == SkipReason.TOO_LARGE.value
    assert "900 MP" in caught.value.detail


def test_limit_is_checked_on_the_header_before_decoding(tmp_path: Path, no_decoding) -> None:
    path = tmp_path / "wide.png"
    path.write_bytes(png_bytes(2000, 1000))  # 2 MP, and no pixel data to speak of
    with pytest.raises(ImageReadError) as caught:
        load_image(path, max_megapixels=1.0)
    assert caught.value.reason == SkipReason.TOO_LARGE.value
    assert caught.value.detail == "2000x1000 = 2.0 MP, over 1 MP"


def test_huge_gif_header_is_too_large(tmp_path: Path, no_decoding) -> None:
    corpus_root = tmp_path / "c"
    make_problem_corpus(corpus_root)
    assert reason_of(corpus_root / "bad" / "huge.gif") == SkipReason.TOO_LARGE.value


def test_default_limit_sits_under_pillows_own_refusal() -> None:
    assert 100 <= DEFAULT_MAX_MEGAPIXELS < 2 * Image.MAX_IMAGE_PIXELS / 1e6


def test_pillow_warning_threshold_does_not_override_a_higher_limit(
    tmp_path: Path, monkeypatch
) -> None:
    path = make_image(tmp_path / "x.png")  # 1920 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would warn at 1000, fail at 2000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (48, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 900)  # now over Pillow's hard 2x limit
    assert load_image(path).size == (48, 40)  # the caller's limit rules, not Pillow's global
    assert Image.MAX_IMAGE_PIXELS == 900  # and the global is left as found
    with pytest.raises(ImageReadError) as caught:
        load_image(path, max_megapixels=0.001)
    assert caught.value.reason == SkipReason.TOO_LARGE.value


def test_pillow_globals_and_warning_filters_are_left_alone(tmp_path: Path) -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    (tmp_path / "bomb.png").write_bytes(png_bytes(30000, 30000))
    data = encoded(Image.fromarray(structured_rgb()), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    for name in ("bomb.png", "cut.jpg"):
        with pytest.raises(ImageReadError):
            load_image(tmp_path / name)
    after = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    assert after == before


# --- broken files ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.9, 0.5, 0.2])
def test_truncated_jpeg_and_png_are_truncated(fmt: str, keep: float) -> None:
    data = encoded(Image.fromarray(structured_rgb((64, 64), seed=1)), fmt)
    assert reason_of(data[: int(len(data) * keep)]) == SkipReason.TRUNCATED.value


@pytest.mark.parametrize("keep", [10, 20, 40])
def test_jpeg_cut_inside_its_header_is_truncated(keep: int) -> None:
    data = encoded(Image.fromarray(structured_rgb((64, 64), seed=1)), "JPEG")
    assert reason_of(data[:keep]) == SkipReason.TRUNCATED.value


def test_zero_byte_file_is_empty(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert reason_of(tmp_path / "empty.jpg") == SkipReason.EMPTY.value


@pytest.mark.parametrize(
    ("content", "hint"),
    [
        (b"holiday notes\nnot a photo\n" * 10, "text"),
        ("BMW service notes, Köln 東京\n".encode() * 30, "text"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "SVG"),
        (b'<?xml version="1.0"?><svg/>', "SVG"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "HEIC"),
        (bytes(np.random.default_rng(5).integers(0, 256, 2048, dtype=np.uint8)), "unknown"),
    ],
    ids=["text", "utf8-text-starting-BM", "html", "svg", "xml", "pdf", "heic", "random"],
)
def test_files_that_are_not_images_say_what_they_look_like(
    tmp_path: Path, content: bytes, hint: str
) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as caught:
        load_image(path)
    assert caught.value.reason == SkipReason.NOT_AN_IMAGE.value
    assert hint in caught.value.detail


def test_misnamed_image_is_decoded_by_its_content(tmp_path: Path) -> None:
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(encoded(Image.fromarray(structured_rgb()), "PNG"))
    assert load_image(path).size == (48, 40)


def test_valid_png_header_with_garbage_data_is_corrupt(tmp_path: Path) -> None:
    garbage = np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes()
    assert reason_of(png_bytes(32, 32, idat=garbage)) == SkipReason.CORRUPT.value
    assert reason_of(png_bytes(32, 32, break_ihdr_crc=True)) == SkipReason.CORRUPT.value


def test_valid_jpeg_header_with_garbage_scan_is_never_a_crash() -> None:
    data = encoded(Image.fromarray(structured_rgb((64, 64))), "JPEG")
    header_end = (
        data.index(b"\xff\xda") + 2 + int.from_bytes(data[data.index(b"\xff\xda") + 2 :][:2])
    )
    for seed in range(4):
        garbage = np.random.default_rng(seed).integers(0, 256, 3000, dtype=np.uint8).tobytes()
        try:  # libjpeg decodes some garbage as (ugly) pixels; what it rejects must be a skip
            assert load_image(data[:header_end] + garbage).mode == "RGB"
        except ImageReadError as error:
            assert error.reason in (SkipReason.CORRUPT.value, SkipReason.TRUNCATED.value)


def test_directory_missing_file_and_broken_symlink_are_unreadable(tmp_path: Path) -> None:
    (tmp_path / "folder.jpg").mkdir()
    assert reason_of(tmp_path / "folder.jpg") == SkipReason.UNREADABLE.value
    assert reason_of(tmp_path / "missing.jpg") == SkipReason.UNREADABLE.value
    if hasattr(os, "symlink"):
        (tmp_path / "dangling.jpg").symlink_to("nowhere.jpg")
        with pytest.raises(ImageReadError) as caught:
            load_image(tmp_path / "dangling.jpg")
        assert (caught.value.reason, caught.value.detail) == ("unreadable", "broken symlink")


def test_file_without_read_permission_is_unreadable(tmp_path: Path) -> None:
    path = make_image(tmp_path / "locked.jpg")
    path.chmod(0)
    if readable_despite_permissions(path):
        pytest.skip("this process reads chmod-000 files (root)")
    try:
        assert reason_of(path) == SkipReason.UNREADABLE.value
    finally:
        path.chmod(0o644)


def test_disk_error_while_reading_is_unreadable(tmp_path: Path, monkeypatch) -> None:
    data = encoded(Image.fromarray(structured_rgb((64, 64))), "PNG")

    class FailingDisk(io.BytesIO):
        def read(self, size=-1):
            if self.tell() > 100:
                raise OSError(errno.EIO, "Input/output error")
            return super().read(size)

    monkeypatch.setattr(images, "_open_source", lambda source, name: FailingDisk(data))
    with pytest.raises(ImageReadError) as caught:
        load_image(tmp_path / "x.png")
    assert (caught.value.reason, caught.value.detail) == ("unreadable", "I/O error")


# --- resources and the error contract --------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_no_file_handles_leak_on_success_or_failure(corpus) -> None:
    root, expected = corpus
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        for name in expected:
            with contextlib.suppress(ImageReadError):
                load_image(root / name, draft_size=16)
    assert len(os.listdir("/proc/self/fd")) == before


def test_returned_image_outlives_its_file(tmp_path: Path) -> None:
    path = make_image(tmp_path / "x.png")
    image = load_image(path)
    path.unlink()
    assert image.copy().tobytes() == image.tobytes() and len(image.tobytes()) == 48 * 40 * 3


def test_skip_reasons_are_stable_strings() -> None:
    assert {reason.name: reason.value for reason in SkipReason} == {
        "EMPTY": "empty file",
        "UNREADABLE": "unreadable",
        "NOT_AN_IMAGE": "not an image",
        "TRUNCATED": "truncated",
        "TOO_LARGE": "too large",
        "UNSUPPORTED_MODE": "unsupported mode",
        "UNSUPPORTED_FORMAT": "unsupported format",
        "CORRUPT": "corrupt",
    }
    assert str(SkipReason.TRUNCATED) == "truncated" and SkipReason.TRUNCATED == "truncated"


def test_image_read_error_carries_path_reason_and_detail(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_bytes(b"plain text")
    with pytest.raises(ImageReadError) as caught:
        load_image(path)
    error = caught.value
    assert isinstance(error, RetrieveError)
    assert (error.path, error.reason) == (str(path), "not an image")
    assert str(error) == f"{path}: not an image (a text file)"
