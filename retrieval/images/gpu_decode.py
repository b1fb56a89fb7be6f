"""JPEG bytes -> cropped uint8 tensors on the device: batched decode, orientation, resize, crop.

The CUDA path's decoder. ``torchvision.io.decode_jpeg(list, device="cuda")`` runs nvjpeg on a
whole batch; the reader has already sent only the files whose header nvjpeg takes (see
:mod:`retrieval.jpeg`). nvjpeg ignores EXIF orientation, so it is applied here, on the tensor,
with the same transposes as Pillow's ``exif_transpose``.

Resize and crop follow :meth:`Preprocessing.resize_and_crop` (shorter side to ``resize`` with an
antialiased bilinear filter, centre crop) but on float tensors, rounded back to uint8, so the
result mixes freely with CPU-decoded crops in one batch. The numbers are not bit-identical to
the CPU path: nvjpeg's IDCT and chroma upsampling may differ from libjpeg-turbo's by a few
levels; the tensor resize computes in float32 where Pillow uses fixed point (at most 2 levels
apart, 0.03-0.06 on average); and a JPEG at least twice the resize size is decoded whole here
where the CPU path decodes it at 1/2-1/8 scale (Pillow's draft mode). ``tests/test_gpu_decode.py``
states the tolerances. Everything here also runs on the CPU (with libjpeg-turbo), which is how
it is tested without a GPU.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torchvision.io import ImageReadMode
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from retrieval.images.jpeg import JpegInfo

log = logging.getLogger(__name__)


class CropSpec(Protocol):
    """What resizing and cropping need of ``retrieval.model.preprocess.Preprocessing`` (named
    by shape, not imported: images come before the model in the pipeline's layers)."""

    resize: int
    crop: int
    channels: int
    interpolation: str


# Decoded pixels per decode_jpeg call (about 768 MB of RGB): a batch of large photos is decoded
# in several calls rather than all at once.
DECODE_PIXEL_BUDGET = 256 * 2**20
# Pixels resized in one call: float32 copies are 4 bytes a sample (about 768 MB for RGB).
RESIZE_PIXEL_BUDGET = 64 * 2**20


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``C x H x W`` turned upright for an EXIF orientation, as ``ImageOps.exif_transpose`` does."""
    if orientation == 2:  # mirrored
        return image.flip(-1)
    if orientation == 3:  # rotated 180
        return image.flip(-2, -1)
    if orientation == 4:  # mirrored vertically
        return image.flip(-2)
    if orientation == 5:  # Pillow's TRANSPOSE
        return image.transpose(-2, -1)
    if orientation == 6:  # Pillow's ROTATE_270: a quarter turn clockwise
        return image.rot90(-1, dims=(-2, -1))
    if orientation == 7:  # Pillow's TRANSVERSE
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # Pillow's ROTATE_90: a quarter turn anticlockwise
        return image.rot90(1, dims=(-2, -1))
    return image


# How a batch's nvjpeg decode is ordered against the work already queued on the device:
# "streams" (the default) decodes on a side stream and records the decoded images as used on the
# main stream; "sync" waits for the device first; "none" is the unordered call (torchvision
# allocates the output on the caller's stream but nvjpeg writes it from its own, so the
# allocator can hand it memory that queued kernels still read). "none" and "sync" are kept so
# ``bench/gpu_check.py`` can show the corruption the one causes and compare against the other.
ORDERINGS = ("streams", "sync", "none")
_side_streams: dict[int, torch.cuda.Stream] = {}


@dataclass
class DecodeFailures:
    """nvjpeg calls that raised during a run: how many, and the first error, so that a run that
    quietly became a CPU run (a torchvision without nvjpeg, an out-of-memory) says so once."""

    calls: int = 0
    first_error: str = ""

    def record(self, error: BaseException) -> None:
        self.calls += 1
        if not self.first_error:
            line = (str(error).strip().splitlines() or [""])[0]
            self.first_error = f"{type(error).__name__}: {line}"[:200]


def decode_jpegs(
    datas: Sequence[torch.Tensor],
    infos: Sequence[JpegInfo],
    device: torch.device,
    channels: int,
    ordering: str = "streams",
    failures: DecodeFailures | None = None,
) -> list[torch.Tensor | None]:
    """Decode on ``device``, upright, with ``channels`` channels; None where decoding failed.

    One file that nvjpeg rejects fails its whole call, so a failed call is retried file by file
    and only the culprits come back as None (the caller decodes those on the CPU). Every call
    that raised is counted in ``failures``.

    Colour images are decoded in ``ImageReadMode.RGB``: nvjpeg replicates a greyscale JPEG's
    Y plane into three channels itself (as Pillow's L -> RGB does), so every output is a fresh
    3-channel buffer written by nvjpeg. In ``UNCHANGED`` mode torchvision instead clones a
    greyscale image's buffer on the current stream and frees the original, one more allocation
    and free on the side stream for the race below to play with.
    """
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {ORDERINGS}, not {ordering!r}")
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    decoded: list[torch.Tensor | None] = []
    for start, stop in _budgeted_slices(infos):
        chunk = list(datas[start:stop])
        if device.type == "cuda" and ordering != "none":
            decoded.extend(_ordered_decode(chunk, mode, device, ordering, failures))
        else:
            decoded.extend(_decode_slice(chunk, mode, device, failures))
    return [
        None if image is None else _channels(orient(image, info.orientation), channels)
        for image, info in zip(decoded, infos, strict=True)
    ]


def _ordered_decode(
    datas: list[torch.Tensor],
    mode: ImageReadMode,
    device: torch.device,
    ordering: str,
    failures: DecodeFailures | None,
) -> list[torch.Tensor | None]:
    """nvjpeg's output never shares memory with work still queued on the main stream.

    The output is allocated on the side stream, whose pool holds only blocks that side-stream
    allocations made: a block comes back to it after its last main-stream use (``record_stream``
    below), never while a queued kernel still reads it. So the side stream need not wait for
    the main one (the inputs are host bytes, nothing on the device), and the decode of batch
    N+1 overlaps batch N's model. An earlier ``side.wait_stream(main)`` added nothing to that
    and held a clone made on the side stream behind the previous batch while the block it came
    from was free for the next write (see :func:`decode_jpegs` on greyscale). The main stream
    waits for the side one before it touches the pixels. ``bench/gpu_check.py``'s race probe
    compares this ordering against a synchronised reference on a GPU.
    """
    main = torch.cuda.current_stream(device)
    if ordering == "sync":
        main.synchronize()
        return _decode_slice(datas, mode, device, failures)
    side = _side_streams.get(device.index or 0)
    if side is None:
        side = _side_streams.setdefault(device.index or 0, torch.cuda.Stream(device))
    with torch.cuda.stream(side):
        images = _decode_slice(datas, mode, device, failures)
    main.wait_stream(side)
    for image in images:
        if image is not None:
            # Freed later on the main stream: without this the allocator would give the block
            # back to the side stream's pool while main-stream kernels still read it.
            image.record_stream(main)
    return images


def _budgeted_slices(infos: Sequence[JpegInfo]) -> list[tuple[int, int]]:
    slices, start, pixels = [], 0, 0
    for position, info in enumerate(infos):
        pixels += info.width * info.height
        if pixels > DECODE_PIXEL_BUDGET and position > start:
            slices.append((start, position))
            start, pixels = position, info.width * info.height
    if start < len(infos):
        slices.append((start, len(infos)))
    return slices


def _decode_slice(
    datas: list[torch.Tensor],
    mode: ImageReadMode,
    device: torch.device,
    failures: DecodeFailures | None = None,
) -> list[torch.Tensor | None]:
    import torchvision.io

    failures = failures if failures is not None else DecodeFailures()
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec; nvjpeg is what we want.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(torchvision.io.decode_jpeg(datas, mode=mode, device=device))
        except RuntimeError as error:
            failures.record(error)
            log.debug("batched JPEG decode failed (%s); retrying file by file", error)
        results: list[torch.Tensor | None] = []
        for data in datas:
            try:
                results.append(torchvision.io.decode_jpeg(data, mode=mode, device=device))
            except RuntimeError as error:
                failures.record(error)
                results.append(None)
        return results


def _channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1 and channels == 3:  # not from nvjpeg (RGB mode gives 3): a safety net
        return image.expand(3, -1, -1)
    raise RuntimeError(f"decoded {image.shape[0]} channels where {channels} were expected")


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Shorter side to ``size``, the longer truncated, as torchvision's ``resize(img, [size])``."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _resize_like_pillow(
    batch: torch.Tensor, size: tuple[int, int], interpolation: InterpolationMode
) -> torch.Tensor:
    """Float ``N x C x H x W`` resized one axis at a time, rounding to whole levels in between.

    Pillow resizes horizontally, stores uint8, then resizes vertically; doing the same cuts the
    mean difference to its crops about fourfold (measured on Imagenette: 0.03-0.06 levels
    instead of 0.13-0.20), at the price of one more kernel.
    """
    height, width = size
    if width != batch.shape[-1]:
        batch = F.resize(batch, [batch.shape[-2], width], interpolation, antialias=True)
        batch = batch.round_().clamp_(0, 255)
    if height != batch.shape[-2]:
        batch = F.resize(batch, [height, width], interpolation, antialias=True)
        batch = batch.round_().clamp_(0, 255)
    return batch


def resize_and_crop(images: Sequence[torch.Tensor], preprocessing: CropSpec) -> torch.Tensor:
    """Upright ``C x H x W`` uint8 images -> ``N x C x crop x crop`` uint8, on their device.

    Images of one size are resized together (one kernel per size, not per image): a folder of
    same-sized JPEGs costs one resize per batch. The crops are put back in order with one stack
    of views, not with index tensors: ``torch.tensor(list, device="cuda")`` is a blocking
    host-to-device copy, and one per size group stalled the host about 256 times a batch.
    """
    if not images:
        raise ValueError("resize_and_crop needs at least one image")
    crop = preprocessing.crop
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for position, image in enumerate(images):
        groups[tuple(image.shape)].append(position)
    interpolation = InterpolationMode(preprocessing.interpolation)
    crops: list[torch.Tensor | None] = [None] * len(images)
    for shape, positions in groups.items():
        size = resized_size(shape[-2], shape[-1], preprocessing.resize)
        step = max(1, RESIZE_PIXEL_BUDGET // max(shape[-1] * shape[-2], size[0] * size[1]))
        for start in range(0, len(positions), step):
            chunk = positions[start : start + step]
            # float32 on every device, so the CPU runs the very arithmetic the GPU does
            # (on uint8, the CPU would take a Pillow-like fixed-point path instead).
            batch = torch.stack([images[p] for p in chunk]).to(torch.float32)
            batch = F.center_crop(_resize_like_pillow(batch, size, interpolation), [crop])
            for position, pixels in zip(chunk, batch.to(torch.uint8)):
                crops[position] = pixels
    return torch.stack(crops)
