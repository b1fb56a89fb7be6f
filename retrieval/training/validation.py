"""A trained classifier on labelled images: top-1 / top-5 as the paper reports them (section 6).

Two ways to look at a test image, both from the paper's "shorter side to R, central R x R patch":
the centre crop alone (what ``retrieve index`` feeds the network), and the paper's ten patches,
"the four corner patches and the center patch as well as their horizontal reflections", whose
softmax outputs are averaged (section 4.1, torchvision's ``TenCrop``).
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

from retrieval.metrics import (
    informative_ks,
    mean_average_precision,
    precision_at_k,
    topk_correct,
)
from retrieval.model.alexnet import AlexNet
from retrieval.progress import Progress, silent
from retrieval.training.augment import BatchTransform
from retrieval.training.imagesets import ImageSet

log = logging.getLogger(__name__)

RETRIEVAL_K = 6  # the paper's Figure 4 shows six neighbours


def autocast_for(
    device: torch.device, precision: str = "auto"
) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA by default (or where asked for), plain fp32 otherwise."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


@torch.no_grad()
def classify(
    model: AlexNet,
    images: ImageSet,
    transform: BatchTransform,
    side: int,
    batch_size: int,
    device: torch.device,
    *,
    precision: str = "auto",
    ten_crop: bool = False,
    workers: int = 0,
    desc: str = "evaluating",
    fc7: list[torch.Tensor] | None = None,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (centre crop) or mean softmax over ten crops, and the labels, for every image;
    with ``fc7`` (a list) the centre crops' fc7 rows are appended to it, from the same pass.

    Images that cannot be decoded are skipped (with a warning) and do not count.
    """
    was_training = model.training
    model.eval()
    order = torch.arange(len(images))
    outputs, labels = [], []
    autocast = autocast_for(device, precision)
    steps = -(-len(images) // batch_size)
    report = progress or silent
    report(desc, 0, steps)
    for step, (pixels, batch_labels) in enumerate(
        images.batches(order, batch_size, side, workers=workers), 1
    ):
        report(desc, step, steps)
        pixels = pixels.to(device)
        with autocast:
            if ten_crop:
                crops = TF.ten_crop(pixels, [transform.image_size])  # 10 x (N x C x S x S)
                x = transform(torch.cat(crops), train=False)
                probs = model(x).float().softmax(dim=1).view(10, len(pixels), -1)
                out = probs.mean(dim=0)
            else:
                # The folded path: the same numbers as model(x), faster at small sizes.
                rows = model.forward_folded(transform(pixels, train=False), fc7=True)
                out = model.forward_head(rows).float()
                if fc7 is not None:
                    fc7.append(rows.float().cpu())
        outputs.append(out.cpu())
        labels.append(batch_labels)
    model.train(was_training)
    if not outputs:
        return torch.zeros((0, 0)), torch.zeros(0, dtype=torch.long)
    return torch.cat(outputs), torch.cat(labels)


def validate(
    model: AlexNet,
    images: ImageSet,
    transform: BatchTransform,
    side: int,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    workers: int = 0,
    database: ImageSet | None = None,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Loss and top-1 / top-5 error of the centre crops (the paper reports errors); with a
    ``database`` (training images) also fc7 retrieval quality: each validation image ranks the
    database by Euclidean distance, same class = relevant (``retrieval_quality``)."""
    started = time.perf_counter()
    rows: list[torch.Tensor] = []
    kwargs = {"precision": precision, "workers": workers, "progress": progress}
    logits, labels = classify(
        model, images, transform, side, batch_size, device, fc7=rows, **kwargs
    )
    correct = topk_correct(logits, labels, informative_ks(logits.shape[1]))
    n = max(len(labels), 1)
    result = {
        "val_loss": float(F.cross_entropy(logits, labels)) if len(labels) else float("nan"),
        **{f"top{k}_error": 1 - hits / n for k, hits in correct.items()},
    }
    if database is not None and rows:
        db_rows: list[torch.Tensor] = []
        _, db_labels = classify(
            model,
            database,
            transform,
            side,
            batch_size,
            device,
            fc7=db_rows,
            desc="fc7 of the training sample",
            **kwargs,
        )
        if db_rows:
            result.update(retrieval_quality(torch.cat(rows), labels, torch.cat(db_rows), db_labels))
    result["val_seconds"] = time.perf_counter() - started
    result["val_images"] = len(labels)
    return result


def retrieval_quality(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    database: torch.Tensor,
    database_labels: torch.Tensor,
    k: int = RETRIEVAL_K,
) -> dict[str, float]:
    """precision@k and mAP (over the whole database ranking) of Euclidean fc7 neighbours."""
    order = torch.cdist(queries.double(), database.double()).argsort(dim=1)
    ranked = database_labels[order].numpy()
    wanted = query_labels.numpy()
    k = min(k, ranked.shape[1])
    return {
        f"precision@{RETRIEVAL_K}": precision_at_k(ranked, wanted, k),
        "map": mean_average_precision(ranked, wanted),
    }
