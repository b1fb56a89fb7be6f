"""JPEG headers without decoding: size, colour components, coding, EXIF orientation.

The GPU decoder (nvjpeg through ``torchvision.io.decode_jpeg``) handles plain 8-bit YCbCr and
greyscale JPEGs, ignores EXIF orientation, and fails a whole batch on one file it cannot take.
Reading the header first lets the reader send only files it will take to the GPU, apply the
orientation there, and route everything else (CMYK, Adobe RGB-coded, arithmetic or 12-bit
coding, PNG, truncated files) to the CPU decoder, which knows how to use or reject them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
# Start-of-frame markers that nvjpeg decodes: baseline, extended (8-bit), progressive Huffman.
GPU_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
# Every other start-of-frame: lossless, hierarchical, arithmetic coding.
OTHER_FRAMES = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class JpegInfo:
    """What the header says; ``orientation`` is the EXIF value, 1 (upright) when absent."""

    width: int
    height: int
    components: int
    frame: int  # the start-of-frame marker, 0xC0..0xCF
    precision: int = 8
    orientation: int = 1
    adobe_transform: int | None = None  # APP14 "Adobe" colour transform, None when absent
    complete: bool = True  # ends with the end-of-image marker

    def gpu_decodable(self, max_megapixels: float) -> bool:
        """Whether nvjpeg will decode it to the same pixels the CPU path would use."""
        colour_ok = self.components == 1 or (
            self.components == 3 and self.adobe_transform in (None, 1)
        )
        return (
            self.frame in GPU_FRAMES
            and self.precision == 8
            and colour_ok
            and self.complete
            and 0 < self.width * self.height <= max_megapixels * 1e6
        )


def inspect_jpeg(data: bytes | bytearray) -> JpegInfo | None:
    """The header of a JPEG held in ``data``, or None if it is not a JPEG we can read the head of.

    Walks the marker segments up to the start of scan (a plain search for a frame marker would
    find the one of the EXIF thumbnail); never raises on malformed input. A few microseconds a
    file: it runs for every file, under the GIL, on the GPU path's reader threads.
    """
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    try:
        return _scan(data)
    except (struct.error, IndexError, ValueError):
        return None


def _scan(data: bytes | bytearray) -> JpegInfo | None:
    position, size = 2, len(data)
    orientation, adobe, frame_fields, seen_exif = 1, None, None, False
    while position + 4 <= size:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan
            break
        length = (data[position + 2] << 8) | data[position + 3]
        if length < 2:
            return None
        body = position + 4
        if marker == 0xE1 and not seen_exif and data[body : body + 6] == b"Exif\x00\x00":
            # Pillow reads the first EXIF block only; so must we, to agree on orientation.
            orientation = exif_orientation(bytes(data[body + 6 : position + 2 + length]))
            seen_exif = True
        elif marker == 0xEE and length >= 14 and data[body : body + 5] == b"Adobe":
            adobe = data[body + 11]
        elif marker in GPU_FRAMES or marker in OTHER_FRAMES:
            precision, height, width, components = struct.unpack_from(">BHHB", data, body)
            frame_fields = (marker, precision, height, width, components)
        position += 2 + length
    if frame_fields is None:
        return None
    frame, precision, height, width, components = frame_fields
    complete = data.find(EOI, max(0, size - 32)) != -1  # some writers pad after the end marker
    return JpegInfo(width, height, components, frame, precision, orientation, adobe, complete)


def exif_orientation(tiff: bytes) -> int:
    """The Orientation tag of IFD0 in a TIFF-structured EXIF block; 1 when absent or broken."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for entry in range(count):
            tag, kind, _, value = struct.unpack_from(order + "HHI4s", tiff, ifd + 2 + 12 * entry)
            if tag == _ORIENTATION_TAG and kind in (3, 4):  # SHORT or LONG, stored inline
                (orientation,) = struct.unpack_from(order + ("H" if kind == 3 else "I"), value)
                return orientation if 1 <= orientation <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1
