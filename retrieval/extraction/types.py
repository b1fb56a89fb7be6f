"""What extraction takes and gives: options, one record per file, stage timings, batches.

Kept free of torch so that the CLI, the index and the planner can name them without paying for
the model's imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from retrieval.images.decode import DEFAULT_MAX_MEGAPIXELS

if TYPE_CHECKING:
    from retrieval.images.hashes import ImageSignature

# Below this many files, starting worker processes costs more than it saves.
MIN_FILES_FOR_WORKERS = 64
# Default batch sizes: on the CPU 32, 64 and 128 ran alike; a GPU needs more work per launch.
CPU_BATCH = 64
GPU_BATCH = 256


@dataclass(frozen=True)
class ExtractOptions:
    """How to run extraction; ``None`` means the default measured best for this machine."""

    device: str = "auto"
    batch_size: int | None = None  # None: CPU_BATCH or GPU_BATCH
    workers: int | None = None  # CPU: decoder processes; CUDA: reader threads
    precision: str | None = None  # fp32 or bf16; None: the index's own (fp32 for a new one)
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    channels_last: bool = True
    threads: int | None = None  # torch threads for the CPU model; None: every core
    compile: bool = False  # torch.compile the model (a one-off warm-up of tens of seconds)
    # Also sign each image the CPU decodes (FileRecord.signature) from the decode the model
    # gets, without opening the file again. The build asks per run (``Embedder.files``).
    sign: bool = False


@dataclass
class FileRecord:
    """What the reader learnt about one file, whether or not it could be used."""

    position: int
    path: str
    size: int = -1
    mtime_ns: int = -1
    sha256: str = ""
    reason: str | None = None  # None: decoded and in this batch's features
    detail: str = ""
    signature: ImageSignature | None = None  # when ExtractOptions.sign and decoded by Pillow

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass
class StageTimes:
    """Seconds spent in each stage; reader stages are summed over workers (busy time)."""

    read: float = 0.0
    decode: float = 0.0
    preprocess: float = 0.0
    model: float = 0.0
    write: float = 0.0
    sign: float = 0.0
    wall: float = 0.0
    images: int = 0
    skipped: int = 0
    # Which road each image took: decoded by nvjpeg, decoded by Pillow (every image on the CPU
    # path; on the CUDA path those not for nvjpeg: PNG, progressive, large, CMYK), and decoded
    # by Pillow because nvjpeg failed on it (a count that should be zero).
    gpu_decoded: int = 0
    cpu_decoded: int = 0
    gpu_fallback: int = 0

    def add(self, other: StageTimes) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def decode_roads(self) -> str:
        """'N on the GPU, M on the CPU, K on the CPU after the GPU failed', or '' off CUDA."""
        if not (self.gpu_decoded or self.gpu_fallback):
            return ""
        return (
            f"{self.gpu_decoded} decoded on the GPU, {self.cpu_decoded} on the CPU, "
            f"{self.gpu_fallback} on the CPU after the GPU failed"
        )

    def summary(self) -> str:
        rate = self.images / self.wall if self.wall > 0 else 0.0
        roads = self.decode_roads()
        return (
            f"{self.images} images in {self.wall:.1f}s ({rate:.1f} images/s); busy time: "
            f"read {self.read:.1f}s, decode {self.decode:.1f}s, preprocess {self.preprocess:.1f}s "
            f"(summed over workers), model {self.model:.1f}s, write {self.write:.1f}s"
            + (f"; {roads}" if roads else "")
        )


@dataclass
class ExtractedBatch:
    """One batch out of the pipeline: every file's record, and fc7 rows for the good ones."""

    records: list[FileRecord]
    features: np.ndarray  # (number of ok records, 4096) float32, in record order
    times: StageTimes = field(default_factory=StageTimes)
