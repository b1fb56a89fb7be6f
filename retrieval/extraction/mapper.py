"""Batches of uint8 crops -> fc7, on one device, at the precision the user chose.

The mapper stage of the pipeline (reader -> decoder -> mapper -> writer, as clip-retrieval
splits it). It owns what makes the model fast without changing what it computes: batched
inference under ``inference_mode``, channels_last (oneDNN's and cuDNN's preferred conv layout),
and optionally ``torch.compile``. Precisions that do change the numbers are opt-in:

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

import torch
from torch import nn

from retrieval.devices import fast_bf16
from retrieval.errors import RetrieveError
from retrieval.model.alexnet import copies_per_channel, folded_fc6_weight, run_classifier
from retrieval.model.weights import LoadedModel

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_classifier(self.features(x), self.avgpool, self.head, self.folded_fc6)


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
        self._forward = torch.compile(module, dynamic=False) if compile else module
        self.out_features = model.fc7_dim

    def __call__(self, crops: torch.Tensor, pad_to: int | None = None) -> torch.Tensor:
        """fc7 of a batch; ``pad_to`` keeps a compiled model on one batch shape (no recompile)."""
        count = crops.shape[0]
        if self.compiled and pad_to and count < pad_to:
            filler = crops[-1:].expand(pad_to - count, *crops.shape[1:])
            crops = torch.cat([crops, filler])
        batch = self.preprocessing.normalize(crops).to(self._dtype)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self._autocast
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            fc7 = self._forward(batch)
        return fc7[:count].float()
