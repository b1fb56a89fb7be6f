"""One object computes every fc7 the project makes for an index.

An :class:`Embedder` binds a model (checked against the index's identity, so its preprocessing is
the recorded one), one precision and one device, resolved once, with the mapper that holds the
numeric policy (fixed shapes, IEEE fp32 on CUDA). Files (a run, an update, a query by path),
bytes and PIL images (uploads, the server), flipped queries and the fp32 agreement check all go
through it, so the same image gets the same vector by every road.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.extraction.types import ExtractedBatch, ExtractOptions, FileRecord

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from retrieval.extraction.mapper import Fc7Mapper
    from retrieval.model.weights import LoadedModel


class Embedder:
    """fc7 of files, bytes or images for one model, precision and device."""

    def __init__(
        self, loaded: LoadedModel, precision: str, options: ExtractOptions = ExtractOptions()
    ) -> None:
        from retrieval.extraction import make_mapper

        self.loaded = loaded
        self.options = dataclasses.replace(options, precision=precision)
        self.mapper: Fc7Mapper = make_mapper(loaded, self.options)

    @property
    def precision(self) -> str:
        return self.mapper.precision

    @property
    def device(self) -> torch.device:
        return self.mapper.device

    def at_precision(self, precision: str) -> Embedder:
        """The same model and device at another precision (this one if it is the same)."""
        if precision == self.precision:
            return self
        return Embedder(self.loaded, precision, self.options)

    def files(self, paths: Sequence[Path], *, sign: bool = False) -> Iterator[ExtractedBatch]:
        """fc7 of image files in order, a batch at a time (memory flat for any number).
        ``sign``: each record also carries the image's signature where the CPU decoded it."""
        from retrieval.extraction import extract_fc7

        options = dataclasses.replace(self.options, sign=sign)
        yield from extract_fc7([Path(p) for p in paths], self.loaded, options, self.mapper)

    def all_files(self, paths: Sequence[Path]) -> tuple[np.ndarray, list[FileRecord]]:
        """fc7 of a handful of files at once: features of the good ones and every record."""
        from retrieval.extraction import extract_images

        return extract_images([Path(p) for p in paths], self.loaded, self.options, self.mapper)

    def crops(self, crops: torch.Tensor) -> np.ndarray:
        """fc7 of uint8 crops the files' own decode made (``reader.crop_file``), for a
        caller that embeds the same pixels more than once (the bf16 agreement check)."""
        return self.mapper(crops.to(self.device)).cpu().numpy()

    def images(
        self, images: Sequence[bytes | Image.Image], *, flip: bool = False
    ) -> tuple[np.ndarray, list[FileRecord]]:
        """fc7 of encoded bytes or PIL images, decoded as files are; ``flip``: the mean of each
        image's fc7 and its mirror image's."""
        from retrieval.extraction import embed_decoded

        return embed_decoded(images, self.mapper, self.options.max_megapixels, flip=flip)
