"""Generated test images: structured small images, labelled folders, and a corpus of problem files.

Not a test module: tests import it (``from corpus import make_problem_corpus``). Everything is
written into a folder the caller owns (``tmp_path``), seeded, 1-64 px, so it is fast.

``make_problem_corpus(root)`` returns ``{relative path: expected}`` for EXACTLY the files that
``retrieval.files.find_images(root)`` must list (paths relative to root, "/"-separated, as
``Path.relative_to(root).as_posix()`` writes them). ``expected`` is the ``SkipReason`` value that
``load_image`` must raise, or ``None`` when the file must be indexed. Kinds, by folder:

- ``good/``: RGB JPEG, PNG, BMP, TIFF, grayscale JPEG, progressive JPEG, lossy WebP -> indexed.
- ``modes/``: RGBA, LA, P with index / bytes transparency, opaque P, L and RGB with tRNS, CMYK
  JPEG and TIFF, 16-bit grey PNG, 16-bit RGB PNG, I;16 and I;16B TIFF, 32-bit int (I) and float
  (F) TIFF, LAB TIFF, 1-bit BMP and PNG, RGBA WebP -> indexed (converted, see images.py).
- ``frames/``: animated GIF, multi-page TIFF, animated WebP, APNG -> indexed (first frame).
- ``exif/``: JPEGs with EXIF orientation 1..8, one with a garbage EXIF block -> indexed.
- ``tiny/``: 1x1, 1x64, 64x1 -> indexed.
- ``names/``: spaces, accents and CJK, an emoji, a newline, a tab, upper- and mixed-case
  suffixes (.JPEG, .JpG), and a non-UTF-8 name where the file system allows one -> indexed.
- ``misnamed/``: PNG content named .jpg, JPEG content named .png, WebP named .gif -> indexed.
- ``folder.jpg/inside.png``: a folder with an image suffix is walked like any folder.
- ``nested/a/b/c/deep.png``: recursion -> indexed.
- ``bad/``: zero-byte -> "empty file"; text, HTML, SVG, PDF, fake HEIC, random bytes ->
  "not an image"; JPEG and PNG cut at 60 %, JPEG cut inside its header -> "truncated";
  30000x30000 PNG header, 65535x65535 GIF header, 13500x13000 PNG header (over the default
  175 MP, under Pillow's own limit) -> "too large"; PNG with garbage IDAT data, PNG with a 0x0
  header, PNG with a bad header CRC -> "corrupt".
- ``perm/no_read_permission.jpg``: chmod 000 -> "unreadable", or indexed when this process reads
  it anyway (root, CAP_DAC_OVERRIDE): the mapping says which.
- ``links/``: a symlink to an image outside the collection -> indexed under its own path; a
  symlink to a good image of the collection -> left out (that image is indexed under its own
  name). Where symlinks can be made: ``links/broken.jpg`` (dangling) and ``links/loop`` (points
  at its parent) are walk problems (see ``expected_walk_problems``), ``links/alias`` points at
  ``nested`` which is walked once under its real path, so nothing is listed under the alias.

Never listed (so absent from the mapping): ``notes.txt``, ``readme.md``, hidden files and folders
(``.hidden.jpg``, ``._apple.jpg``, ``.thumbnails/``), a named pipe ``weird/pipe.jpg``.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "MARKER_COLOURS",
    "expected_walk_problems",
    "make_image",
    "make_labelled_folder",
    "make_oriented_jpeg",
    "make_problem_corpus",
    "png_bytes",
    "readable_despite_permissions",
    "structured_rgb",
]

EMPTY = "empty file"
UNREADABLE = "unreadable"
NOT_AN_IMAGE = "not an image"
TRUNCATED = "truncated"
TOO_LARGE = "too large"
CORRUPT = "corrupt"

# Upright view of make_oriented_jpeg: red block top-left, green block top-right.
MARKER_COLOURS = {"top_left": (255, 0, 0), "top_right": (0, 255, 0)}


def structured_rgb(size: tuple[int, int] = (48, 40), seed: int = 0) -> np.ndarray:
    """H x W x 3 uint8: a smooth two-colour gradient plus a few shapes, all chosen by seed.

    Smooth areas and hard edges survive JPEG compression, so different seeds stay different.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = (np.cos(angle) * xs / max(width, 1) + np.sin(angle) * ys / max(height, 1) + 1) / 2
    start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    pixels = start + (end - start) * ramp[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = x0 + int(rng.integers(width // 6 + 1, width // 2 + 2))
        y1 = y0 + int(rng.integers(height // 6 + 1, height // 2 + 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=colour)
    return np.asarray(image)


def _in_mode(rgb: np.ndarray, mode: str) -> Image.Image:
    image = Image.fromarray(rgb)
    gray = np.asarray(image.convert("L")).astype(np.uint32)
    if mode == "I;16":
        return Image.fromarray((gray * 257).astype(np.uint16))
    if mode == "I":
        return Image.fromarray((gray * 257).astype(np.int32))
    if mode == "F":
        return Image.fromarray((gray / 255).astype(np.float32))
    if mode in ("RGBA", "LA"):
        alpha = np.linspace(255, 0, rgb.shape[1], dtype=np.float64)  # opaque left, clear right
        rgba = np.dstack([rgb, np.broadcast_to(alpha, rgb.shape[:2]).astype(np.uint8)])
        return Image.fromarray(rgba).convert(mode)
    if mode == "P":
        return image.quantize(16, dither=Image.Dither.NONE)
    return image.convert(mode)


def make_image(
    path: Path, size: tuple[int, int] = (48, 40), mode: str = "RGB", seed: int = 0, **save_options
) -> Path:
    """Write structured_rgb(size, seed) in ``mode`` to path (format from the suffix); return path.

    mode is any Pillow mode the format can store, plus "I;16", "I" and "F" built from the grey
    values (16-bit = 8-bit x 257). save_options go to Image.save (quality, progressive, exif, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _in_mode(structured_rgb(size, seed), mode).save(path, **save_options)
    return path


def make_oriented_jpeg(path: Path, orientation: int, size: tuple[int, int] = (48, 32)) -> Path:
    """A JPEG tagged with EXIF ``orientation`` whose UPRIGHT view (size, white) has a red block
    at the top-left and a green block at the top-right (MARKER_COLOURS), 12 px each."""
    upright = Image.new("RGB", size, (255, 255, 255))
    width, _ = size
    upright.paste(MARKER_COLOURS["top_left"], (0, 0, 12, 12))
    upright.paste(MARKER_COLOURS["top_right"], (width - 12, 0, width, 12))
    # Store the inverse of the transform a viewer applies for this tag.
    store = {
        1: None,
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    stored = upright if store is None else upright.transpose(store)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, "JPEG", quality=95, exif=exif)
    return path


_SHAPES = ("circles", "squares", "stripes", "crosses", "rings", "triangles")


def make_labelled_folder(
    root: Path, classes: int = 3, per_class: int = 4, size: int = 48
) -> dict[str, list[Path]]:
    """root/CLASS/NN.png, images alike within a class and unlike across classes.

    Each class has its own hue and shape (circles, squares, ...); images vary by position,
    scale, background shade and a little noise, seeded by class and index. Returns class -> paths.
    """
    made: dict[str, list[Path]] = {}
    for c in range(classes):
        label = _SHAPES[c % len(_SHAPES)] + ("" if c < len(_SHAPES) else str(c // len(_SHAPES)))
        hue = int(255 * c / classes)
        folder = Path(root) / label
        folder.mkdir(parents=True, exist_ok=True)
        made[label] = []
        for i in range(per_class):
            rng = np.random.default_rng(1000 * c + i)
            shade = int(rng.integers(200, 256))
            image = Image.new("RGB", (size, size), (shade, shade, shade))
            draw = ImageDraw.Draw(image)
            colour = Image.new("HSV", (1, 1), (hue, 220, 220)).convert("RGB").getpixel((0, 0))
            r = int(size * rng.uniform(0.25, 0.4))
            cx, cy = (int(v) for v in rng.integers(r, size - r + 1, 2))
            _draw_shape(draw, c % len(_SHAPES), (cx, cy, r), colour, size)
            noisy = np.asarray(image).astype(np.int16) + rng.integers(-8, 9, (size, size, 3))
            path = folder / f"{i:02d}.png"
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path)
            made[label].append(path)
    return made


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, where: tuple, colour, size: int) -> None:
    cx, cy, r = where
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == 0:
        draw.ellipse(box, fill=colour)
    elif kind == 1:
        draw.rectangle(box, fill=colour)
    elif kind == 2:
        for x in range(cx % 8, size, 8):
            draw.rectangle((x, 0, x + 3, size), fill=colour)
    elif kind == 3:
        draw.rectangle((cx - r, cy - 3, cx + r, cy + 3), fill=colour)
        draw.rectangle((cx - 3, cy - r, cx + 3, cy + r), fill=colour)
    elif kind == 4:
        draw.ellipse(box, outline=colour, width=4)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)


def png_bytes(
    width: int,
    height: int,
    *,
    bit_depth: int = 8,
    colour_type: int = 2,
    raw: bytes | None = None,
    idat: bytes | None = None,
    break_ihdr_crc: bool = False,
) -> bytes:
    """A PNG written by hand, for headers Pillow will not write (bombs, 0x0, 16-bit RGB).

    raw: the filtered scanlines (compressed here); idat: the IDAT payload as is (garbage allowed).
    """

    def chunk(kind: bytes, data: bytes, crc_fix: int = 0) -> bytes:
        crc = (zlib.crc32(kind + data) ^ crc_fix) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(raw if raw is not None else b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header, 0xDEAD if break_ihdr_crc else 0)
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def _rgb48_png(size: tuple[int, int], seed: int) -> bytes:
    rgb = structured_rgb(size, seed).astype(">u2") * 257
    rows = b"".join(b"\x00" + row.tobytes() for row in rgb)
    return png_bytes(size[0], size[1], bit_depth=16, colour_type=2, raw=rows)


def _huge_gif() -> bytes:
    """A valid 4x4 GIF whose screen and frame both claim 65535x65535."""
    buffer = io.BytesIO()
    Image.new("P", (4, 4)).save(buffer, "GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", 65535, 65535)
    position = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while data[position] == 0x21:  # skip extension blocks up to the image descriptor
        position += 2
        while data[position]:
            position += data[position] + 1
        position += 1
    assert data[position] == 0x2C
    data[position + 5 : position + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def _encoded(mode_image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    mode_image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _good_files(root: Path, expect: dict[str, str | None]) -> None:
    def good(relative: str, **kwargs) -> None:
        make_image(root / relative, **kwargs)
        expect[relative] = None

    good("good/rgb.jpg", seed=1)
    good("good/rgb.png", seed=2)
    good("good/rgb.bmp", seed=3)
    good("good/rgb.tiff", seed=4)
    good("good/gray.jpg", mode="L", seed=5)
    good("good/progressive.jpg", seed=6, progressive=True, quality=90)
    good("good/lossy.webp", seed=7, quality=80)
    for seed, (relative, mode, options) in enumerate(
        [
            ("modes/rgba.png", "RGBA", {}),
            ("modes/la.png", "LA", {}),
            ("modes/p_index_transparency.png", "P", {"transparency": 0}),
            ("modes/p_bytes_transparency.png", "P", {"transparency": bytes(range(0, 256, 16))}),
            ("modes/p_opaque.gif", "P", {}),
            ("modes/l_trns.png", "L", {"transparency": 7}),
            ("modes/rgb_trns.png", "RGB", {"transparency": (1, 2, 3)}),
            ("modes/cmyk.jpg", "CMYK", {}),
            ("modes/cmyk.tif", "CMYK", {}),
            ("modes/gray16.png", "I;16", {}),
            ("modes/gray16.tif", "I;16", {}),
            ("modes/int32.tif", "I", {}),
            ("modes/float32.tif", "F", {}),
            ("modes/lab.tif", "LAB", {}),
            ("modes/one_bit.bmp", "1", {}),
            ("modes/one_bit.png", "1", {}),
            ("modes/rgba.webp", "RGBA", {"lossless": True}),
        ],
        start=10,
    ):
        good(relative, mode=mode, seed=seed, **options)
    big_endian = np.asarray(_in_mode(structured_rgb(seed=30), "I;16")).astype(">u2")
    Image.fromarray(big_endian).save(root / "modes/gray16_big_endian.tif")  # mode I;16B
    expect["modes/gray16_big_endian.tif"] = None
    (root / "modes/rgb48.png").write_bytes(_rgb48_png((48, 40), seed=31))
    expect["modes/rgb48.png"] = None

    frames = [Image.fromarray(structured_rgb(seed=40 + i)) for i in range(3)]
    (root / "frames").mkdir()
    for relative, options in [
        ("frames/animated.gif", {"duration": 100, "loop": 0}),
        ("frames/multipage.tif", {}),
        ("frames/animated.webp", {"lossless": True}),
        ("frames/animated.png", {}),
    ]:
        frames[0].save(root / relative, save_all=True, append_images=frames[1:], **options)
        expect[relative] = None

    for orientation in range(1, 9):
        relative = f"exif/orientation_{orientation}.jpg"
        make_oriented_jpeg(root / relative, orientation)
        expect[relative] = None
    garbage_exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08" + b"\xff" * 40
    good("exif/garbage_exif.jpg", seed=50, exif=garbage_exif)

    good("tiny/1x1.png", size=(1, 1), seed=51)
    good("tiny/1x64.png", size=(1, 64), seed=52)
    good("tiny/64x1.jpg", size=(64, 1), seed=53)

    for i, relative in enumerate(
        [
            "names/with space.png",
            "names/café 東京.jpg",
            "names/😀 emoji.png",
            "names/new\nline.png",
            "names/tab\there.gif",
            "names/UPPER.JPEG",
            "names/Mixed.JpG",
            "folder.jpg/inside.png",
            "nested/a/b/c/deep.png",
        ]
    ):
        good(relative, seed=60 + i)
    try:  # Linux takes any bytes; macOS and Windows refuse names that are not valid Unicode
        latin1 = os.fsdecode(b"names/latin1-caf\xe9.png")
        make_image(root / latin1, seed=70)
        expect[latin1] = None
    except (OSError, UnicodeError):
        pass

    (root / "misnamed").mkdir()
    rgb = Image.fromarray(structured_rgb(seed=80))
    (root / "misnamed/png_content.jpg").write_bytes(_encoded(rgb, "PNG"))
    (root / "misnamed/jpeg_content.png").write_bytes(_encoded(rgb, "JPEG"))
    (root / "misnamed/webp_content.gif").write_bytes(_encoded(rgb, "WEBP"))
    expect.update(dict.fromkeys(["misnamed/png_content.jpg", "misnamed/jpeg_content.png"]))
    expect["misnamed/webp_content.gif"] = None


def _bad_files(root: Path, expect: dict[str, str | None]) -> None:
    bad = root / "bad"
    bad.mkdir()
    rng = np.random.default_rng(90)
    jpeg = _encoded(Image.fromarray(structured_rgb((64, 64), seed=91)), "JPEG", quality=90)
    png = _encoded(Image.fromarray(structured_rgb((64, 64), seed=92)), "PNG")
    contents = {
        "bad/empty.jpg": (b"", EMPTY),
        "bad/empty.png": (b"", EMPTY),
        "bad/text.jpg": (b"just some notes, not a photo\n" * 20, NOT_AN_IMAGE),
        "bad/page.html.jpg": (b"<!DOCTYPE html><html><body>404</body></html>\n", NOT_AN_IMAGE),
        "bad/drawing.png": (
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
            b'<rect width="10" height="10"/></svg>\n',
            NOT_AN_IMAGE,
        ),
        "bad/document.jpg": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", NOT_AN_IMAGE),
        "bad/phone.heic.jpg": (
            b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200),
            NOT_AN_IMAGE,
        ),
        "bad/random.png": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), NOT_AN_IMAGE),
        "bad/truncated.jpg": (jpeg[: len(jpeg) * 6 // 10], TRUNCATED),
        "bad/truncated.png": (png[: len(png) * 6 // 10], TRUNCATED),
        "bad/header_cut.jpg": (jpeg[:20], TRUNCATED),
        "bad/bomb.png": (png_bytes(30000, 30000), TOO_LARGE),
        "bad/huge.gif": (_huge_gif(), TOO_LARGE),
        "bad/over_default_limit.png": (png_bytes(13500, 13000, colour_type=0), TOO_LARGE),
        "bad/garbage_data.png": (
            png_bytes(32, 32, idat=rng.integers(0, 256, 600, dtype=np.uint8).tobytes()),
            CORRUPT,
        ),
        "bad/zero_size.png": (png_bytes(0, 0), CORRUPT),
        "bad/bad_header_crc.png": (png_bytes(32, 32, break_ihdr_crc=True), CORRUPT),
    }
    for relative, (data, reason) in contents.items():
        (root / relative).write_bytes(data)
        expect[relative] = reason
    locked = make_image(root / "perm" / "no_read_permission.jpg", seed=93)
    locked.chmod(0)
    expect["perm/no_read_permission.jpg"] = (
        None if readable_despite_permissions(locked) else UNREADABLE
    )


def readable_despite_permissions(path: Path) -> bool:
    """Whether this process reads a file despite its mode (root, CAP_DAC_OVERRIDE, Windows)."""
    try:
        with open(path, "rb"):
            return True
    except PermissionError:
        return False


def _unlisted_files(root: Path) -> None:
    (root / "notes.txt").write_text("not an image\n")
    (root / "readme.md").write_text("# photos\n")
    make_image(root / ".hidden.jpg", seed=100)
    (root / "._apple.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    make_image(root / ".thumbnails/thumb.png", seed=101)
    (root / "weird").mkdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "weird/pipe.jpg")


def _links(root: Path, expect: dict[str, str | None]) -> None:
    links = root / "links"
    links.mkdir()
    try:
        (links / "to_rgb.png").symlink_to(Path("..", "good", "rgb.png"))
    except (OSError, NotImplementedError):
        return  # no symlinks here (Windows without privilege): nothing listed under links/
    elsewhere = root.parent / f"{root.name}-elsewhere.png"  # beside the collection, not in it
    make_image(elsewhere, seed=102)
    (links / "to_elsewhere.png").symlink_to(elsewhere)
    expect["links/to_elsewhere.png"] = None
    (links / "broken.jpg").symlink_to("does-not-exist.jpg")
    (links / "loop").symlink_to("..", target_is_directory=True)
    (links / "alias").symlink_to(Path("..", "nested"), target_is_directory=True)


def make_problem_corpus(root: Path) -> dict[str, str | None]:
    """Write the corpus described in the module docstring; return relative path -> expected."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str | None] = {}
    _good_files(root, expect)
    _bad_files(root, expect)
    _unlisted_files(root)
    _links(root, expect)
    return expect


def expected_walk_problems(root: Path) -> dict[str, str]:
    """Relative path -> WalkProblem.reason that find_images(root) reports for this corpus."""
    links = Path(root) / "links"
    if not (links / "loop").is_symlink():
        return {}
    return {"links/broken.jpg": "broken symlink", "links/loop": "symlink loop"}


def scene(seed: int, size: tuple[int, int] = (192, 144), moved: int | None = None) -> Image.Image:
    """A photo-like RGB scene: a gradient, 40 shapes and grain, all chosen by ``seed``.

    ``moved`` re-renders it as a second shot of the same subject: every shape shifted a few
    pixels (seeded by ``moved``), other grain: what a re-shoot from the same place looks like.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    jitter = np.random.default_rng(moved) if moved is not None else None
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xs / width + np.sin(angle) * ys / height + 1) / 2
    start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    pixels = np.clip(start + (end - start) * ramp[..., None], 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = int(rng.integers(-10, width)), int(rng.integers(-10, height))
        w, h = int(rng.integers(6, width // 4)), int(rng.integers(6, height // 4))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if jitter is not None:
            x0, y0 = x0 + int(jitter.normal(0, 6)), y0 + int(jitter.normal(0, 6))
        box = (x0, y0, x0 + w, y0 + h)
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=3)
    grain = np.random.default_rng(seed + 1000 if moved is None else moved + 5000)
    noisy = np.asarray(image, np.float64) + grain.normal(0, 6, (height, width, 1))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
