"""Which device to run on: ``auto`` is CUDA when present, else the CPU."""

from __future__ import annotations

import torch

from .errors import RetrieveError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for ``device``; asking for CUDA where there is none is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RetrieveError(f"--device {device}: no CUDA device is available here; use cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise RetrieveError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 arithmetic is native here: any CUDA GPU torch runs on, or a CPU with
    AVX-512 BF16 / AMX. Elsewhere oneDNN emulates it, about 6x slower than fp32."""
    if device.type == "cuda":
        return True
    return bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
