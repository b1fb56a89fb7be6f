"""Batches of uint8 crops -> fc7, on one device, at the precision the user chose.

The mapper stage of the pipeline (reader -> decoder -> mapper -> writer, as clip-retrieval
splits it). It owns what makes the model fast without changing what it computes: batched
inference under ``inference_mode``, channels_last (oneDNN's and cuDNN's preferred conv layout),
and optionally ``torch.compile``. It also owns what makes the numbers reproducible:

- batch invariance: the model always runs on fixed shapes (``FIXED_SHAPES``: so many images
  through the convolutions, so many rows through fc6 / fc7, zero-padded), whatever the caller's
  batch. CPU and GPU kernels pick their blocking by the batch's shape, not by its other rows, so
  an image gets the same bits alone, in a batch of 7 or among 100, from a file, from bytes, from
  an update or a rebuild (before, with varied batches on a CPU: 2e-8 apart in fp32 and 6e-5 in
  bf16). ``bench/extract.py`` measures what the fixed shapes cost.
- the numeric policy: on CUDA, "fp32" is IEEE fp32 (no TF32) and cuDNN picks its algorithms
  deterministically, set around each call under one lock, not left flipped for the process.

Precisions that do change the numbers are opt-in:

- ``bf16``: the network's weights and activations in bf16 (what autocast computes, bit for bit,
  without converting every weight on every call; autocast itself for the paper's LRN layers),
  on CPUs with AVX-512 BF16 / AMX and on GPUs;
- int8 (dynamic quantisation of fc6 and fc7) is not offered: measured no faster end to end
  (the convolutions dominate) and it reorders the top-6 neighbours; ``bench/extract.py`` keeps
  measuring it with its own quantised mapper.

``bench/extract.py`` measures bf16 and int8 against fp32 and checks the neighbours they give.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Iterator

import torch
from torch import nn

from retrieval.devices import fast_bf16
from retrieval.errors import RetrieveError
from retrieval.model.alexnet import copies_per_channel, folded_fc6_weight, run_classifier
from retrieval.model.weights import LoadedModel

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
# The fixed shapes every image runs at, (images through the convolutions, rows through fc6 /
# fc7) by device and precision. Measured on a 2-core Xeon with AMX (model only, batches of 64,
# best of two; one query alone): fp32 convolves one image as fast as eight (199 against 209
# images/s; 8 / 32 costs a query 60 ms, 1 / 32 31 ms, unpadded 13 ms); bf16 needs eight
# (775 images/s against 435 at one; a query 15.7 ms, unpadded 7 ms); at 32 rows the fc layers
# stream their weights once for many images (8 / 16: bf16 746 images/s, 8 / 32: 844).
FIXED_SHAPES = {("cpu", "fp32"): (1, 32), ("cpu", "bf16"): (8, 32)}
CUDA_SHAPES = (64, 64)
# torch's CUDA numeric flags are process-wide: every call that sets them holds this lock.
_CUDA_FLAGS = threading.Lock()


class _Fc7(nn.Module):
    """The network up to fc7 as one module, so it can be compiled or quantised as a whole.

    fc6's folded weight (``alexnet.run_classifier``) is summed once here, not on every batch:
    the weights do not change during extraction."""

    def __init__(self, features: nn.Module, avgpool: nn.Module, head: nn.Sequential) -> None:
        super().__init__()
        self.features, self.avgpool, self.head = features, avgpool, head
        fc6, cells = head[1], copies_per_channel(avgpool)
        folded = None
        if type(fc6) is nn.Linear and cells and fc6.in_features % cells == 0:
            with torch.no_grad():
                folded = folded_fc6_weight(fc6, fc6.in_features // cells, cells).contiguous()
        self.register_buffer("folded_fc6", folded, persistent=False)

    def classify(self, maps: torch.Tensor) -> torch.Tensor:
        """pool5 maps -> fc7 (avgpool, fc6, fc7 and their ReLUs), row by row independent."""
        return run_classifier(maps, self.avgpool, self.head, self.folded_fc6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


class Fc7Mapper:
    """Call it with ``N x C x H x W`` uint8 crops on ``device``; get ``N x fc7_dim`` float32."""

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device,
        precision: str = "fp32",
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        if precision not in PRECISIONS:
            choices = ", ".join(PRECISIONS)
            raise RetrieveError(f"precision must be one of {choices}, not {precision!r}")
        self.device, self.precision, self.channels_last = device, precision, channels_last
        if precision == "bf16" and not fast_bf16(device):
            log.warning(
                "this CPU has no native bf16 (AVX-512 BF16 or AMX): bf16 is emulated and about "
                "6x slower than fp32 here; leave out --precision bf16"
            )
        self.preprocessing = loaded.preprocessing
        model = loaded.model.to(device).eval()
        head = model.classifier[: model.fc7_end]
        module: nn.Module = _Fc7(model.features, model.avgpool, head).eval()
        # bf16: weights converted once, on a copy (the model's own fp32 weights still serve
        # predict()). The same numbers as autocast, bit for bit, which instead converts every
        # weight on every call: measured 6x slower at batch 1, 1.3x at batch 64 (AMX Xeon).
        # The paper's local response normalisation has no bf16 kernel on a CPU (avg_pool3d);
        # autocast runs it in fp32, so a network with it keeps autocast.
        self._autocast = precision == "bf16" and any(
            isinstance(m, nn.LocalResponseNorm) for m in module.modules()
        )
        self._dtype = torch.float32
        if precision == "bf16" and not self._autocast:
            module = copy.deepcopy(module).to(torch.bfloat16)
            self._dtype = torch.bfloat16
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.compiled = compile
        # Fixed shapes: a compiled model never recompiles.
        self._features = torch.compile(module.features, dynamic=False) if compile else None
        self._head = torch.compile(module.classify, dynamic=False) if compile else None
        self.conv_rows, self.fc_rows = fixed_shapes(device, precision)
        self.out_features = model.fc7_dim

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        """fc7 (float32) of ``N`` uint8 crops, each computed at the fixed shapes alone."""
        count = crops.shape[0]
        if count == 0:
            return torch.zeros((0, self.out_features), dtype=torch.float32, device=self.device)
        features = self._features or self.module.features
        head = self._head or self.module.classify
        with torch.inference_mode(), self._numerics():
            maps = torch.cat([features(self._input(c)) for c in _blocks(crops, self.conv_rows)])
            fc7 = torch.cat([head(block) for block in _blocks(maps[:count], self.fc_rows)])
        return fc7[:count].float()

    def _input(self, crops: torch.Tensor) -> torch.Tensor:
        batch = self.preprocessing.normalize(crops).to(self._dtype)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    @contextlib.contextmanager
    def _numerics(self) -> Iterator[None]:
        """bf16 autocast where the network keeps it; on CUDA, IEEE fp32 (TF32 off) and
        deterministic cuDNN algorithms for this call only, the flags put back after it."""
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self._autocast
            else contextlib.nullcontext()
        )
        if self.device.type != "cuda":
            with autocast:
                yield
            return
        cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
        with _CUDA_FLAGS:
            before = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32)
            cudnn.benchmark, cudnn.deterministic = False, True
            cudnn.allow_tf32 = matmul.allow_tf32 = False
            try:
                # The flags are read as kernels are launched (on this thread), not as they run.
                with torch.cuda.device(self.device), autocast:
                    yield
            finally:
                cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = before


def fixed_shapes(device: torch.device, precision: str) -> tuple[int, int]:
    """(images per convolution call, rows per fc call) for this device and precision."""
    if device.type == "cuda":
        return CUDA_SHAPES
    return FIXED_SHAPES[("cpu", precision)]


def _blocks(batch: torch.Tensor, rows: int) -> Iterator[torch.Tensor]:
    """``batch`` in blocks of exactly ``rows``, the last one zero-padded."""
    for block in batch.split(rows):
        if len(block) < rows:
            block = torch.cat([block, block.new_zeros(rows - len(block), *block.shape[1:])])
        yield block
