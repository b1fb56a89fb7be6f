"""The paper's experiment end to end on Fashion-MNIST: train, index, Figure 4, numbers.

Section 6.1 of the paper: train the network for classification, then look at the training images
whose fc7 vectors lie nearest (Euclidean) to a test image's. Here every step goes through the
user's path: the images are written out as ``CLASS/n.png`` folders, ``index_folder`` indexes the
training folder with the checkpoint (labels come from the folder names), and the queries are the
test PNGs. On a 2-core CPU the whole run fits in 10 minutes by training at 64 px for a short
budget; on a GPU it trains the full 224-px network.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from retrieval.devices import fast_bf16, resolve_device
from retrieval.errors import DataError
from retrieval.progress import Progress
from retrieval.training.augment import Augmentation
from retrieval.training.datasets import folder_name
from retrieval.training.idx_files import has_idx_files, load_idx_split
from retrieval.training.loop import describe_epoch, make_recipe, train
from retrieval.training.prepare import RunOptions

log = logging.getLogger(__name__)

SHARED_DATA = Path("..") / "shared" / "datasets" / "fashion-mnist"
REPO_ROOT = Path(__file__).resolve().parents[1]
K = 6
GRID_QUERIES = 5


@dataclass
class DemoSettings:
    """What the demo trains, chosen for the device unless given."""

    device: str
    image_size: int
    epochs: int
    precision: str
    subset: int | None = None  # None: all 60,000 training images
    random_crop: bool = True
    batch_size: int = 128
    dropout: float = 0.5

    def describe(self) -> str:
        size = "the full 224-px model" if self.image_size >= 224 else f"{self.image_size}-px input"
        subset = f" on {self.subset} of the 60,000 training images" if self.subset else ""
        crops = "random crops and flips" if self.random_crop else "flips, no random crops"
        return (
            f"{self.device}: {size}, {self.epochs} epoch(s) of the onecycle recipe{subset} in "
            f"batches of {self.batch_size}, dropout {self.dropout}, {crops}, {self.precision} "
            "arithmetic"
        )


@dataclass
class DemoReport:
    data: str
    out_dir: str
    settings: dict[str, Any]
    checkpoint: str
    index_dir: str
    grid: str
    test_images: int
    top1: float
    top5: float
    precision_at_6: float
    seconds: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items() if k != "total")
        return "\n".join(
            [
                self.note,
                f"test top-1 accuracy: {100 * self.top1:.2f}% (top-5 {100 * self.top5:.2f}%) "
                f"on {self.test_images} test images",
                f"precision@{K}: {self.precision_at_6:.3f} (each test image against the "
                "training-set index, same class = relevant)",
                f"Figure 4 grid: {self.grid}",
                f"checkpoint: {self.checkpoint}; index: {self.index_dir}",
                f"time: {self.seconds.get('total', 0):.0f} s ({stages})",
            ]
        )


def default_settings(device: torch.device) -> DemoSettings:
    """On a GPU the paper's 224-px input; on a CPU what fits 10 minutes on 2 cores.

    The CPU budget: 64-px input (AlexNet's smallest), 2 epochs over a stratified 40,000-image
    subset, no random crops (Fashion-MNIST's items are centred) and no dropout: both slow a
    short run down (and without dropout fc6 is folded at 64 px, see model.run_classifier).
    On a CPU with native bf16 (2-core EPYC with AVX-512 BF16), 40,000 images x 2 epochs in
    batches of 128, test top-1: 86.0% with dropout 0.5, 86.5% with dropout 0.5 and lr 0.02,
    86.9% without dropout (the default; 281 s); batches of 64 with dropout reach 87.3% but take
    1.5x longer. Without bf16 (2-core EPYC, AVX2 only), fp32 on 25,000 images: 85.4% in 253 s
    of training, the whole demo in about 9 minutes.
    """
    if device.type == "cuda":
        return DemoSettings("cuda", image_size=224, epochs=10, precision="auto")
    # bf16 autocast trains ~1.6x faster on CPUs with native bf16 (AVX-512 BF16, AMX).
    precision, subset = ("bf16", 40_000) if fast_bf16(device) else ("fp32", 25_000)
    return DemoSettings("cpu", 64, 2, precision, subset, random_crop=False, dropout=0.0)


def find_data(data_dir: str | Path | None, out_dir: Path) -> Path:
    """``data_dir``, else ../shared/datasets/fashion-mnist, else torchvision's download."""
    if data_dir is not None:
        if not has_idx_files(Path(data_dir)):
            raise DataError(f"{data_dir} does not hold Fashion-MNIST's four idx files")
        return Path(data_dir)
    for base in (Path.cwd(), REPO_ROOT):
        candidate = (base / SHARED_DATA).resolve()
        if has_idx_files(candidate):
            return candidate
    return download(out_dir / "download")


def download(root: Path) -> Path:
    """torchvision's downloader (online only). It checks the upstream .gz checksums, so it is
    never pointed at Debian's recompressed copies; it fetches its own."""
    from torchvision.datasets import FashionMNIST

    try:
        for train_split in (True, False):
            FashionMNIST(str(root), train=train_split, download=True)
    except Exception as exc:  # offline: URLError, OSError, checksum failures
        raise DataError(
            f"Fashion-MNIST not found in {SHARED_DATA} and the download failed ({exc}); "
            "pass --data with a folder holding its four idx files"
        ) from exc
    return root / "FashionMNIST" / "raw"


def write_pngs(data_dir: Path, out: Path) -> dict[str, Path]:
    """train and test images as ``out/{train,test}/<class>/<n>.png`` (skipped if already there)."""
    folders = {}
    for split in ("train", "test"):
        folder = out / split
        folders[split] = folder
        done = folder / ".complete"
        if done.exists():
            continue
        images = load_idx_split(data_dir, split)
        counts = [0] * len(images.classes)
        for name in images.classes:
            (folder / folder_name(name)).mkdir(parents=True, exist_ok=True)
        for pixels, label in zip(images.images[:, 0].numpy(), images.labels.tolist(), strict=True):
            path = folder / folder_name(images.classes[label]) / f"{counts[label]}.png"
            Image.fromarray(pixels, "L").save(path, compress_level=1)
            counts[label] += 1
        done.write_text(f"{len(images)}\n")
    return folders


def run_demo(
    data_dir: str | Path | None = None,
    out_dir: str | Path = "demo-out",
    *,
    epochs: int | None = None,
    image_size: int | None = None,
    device: str = "auto",
    subset: int | None = None,
    progress: Callable[[str], None] | None = None,
    bars: Progress | None = None,
) -> DemoReport:
    """Train on Fashion-MNIST, index its training images, query with its test images."""
    from retrieval.build.options import IndexOptions
    from retrieval.evaluation.retrieval_quality import evaluate_retrieval
    from retrieval.extraction.types import ExtractOptions
    from retrieval.search.index import Index

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = default_settings(resolve_device(device))
    settings.epochs = epochs or settings.epochs
    settings.image_size = image_size or settings.image_size
    if subset is not None:
        settings.subset = subset or None  # 0: all training images
    data = find_data(data_dir, out)

    def say(message: str) -> None:
        log.info("%s", message)
        if progress is not None:
            progress(message)

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        seconds[name] = now - since
        return now

    mark = time.perf_counter()
    say(f"writing the images as PNG folders under {out / 'fashion-mnist'}")
    folders = write_pngs(data, out / "fashion-mnist")
    mark = lap("write_pngs", mark)
    recipe = make_recipe(
        "onecycle",
        image_size=settings.image_size,
        epochs=settings.epochs,
        subset=settings.subset,
        batch_size=settings.batch_size,
        dropout=settings.dropout,
        augmentation=Augmentation(random_crop=settings.random_crop),
        # The settings the demo's numbers were measured with (README): He init, no clipping,
        # the last epoch; the per-epoch fc7 check is left out (the demo measures precision@6
        # on the index itself, and its 10 minutes have no room for a second pass).
        init="kaiming",
        clip_norm=0.0,
        select="top1",
    )
    checkpoint = out / "model.pt"
    options = RunOptions(
        device=settings.device, precision=settings.precision, retrieval_images=0, progress=bars
    )
    # For idx data the validation set is the t10k test split, so the last epoch's centre-crop
    # error is the test error; no second pass over the test images is needed.
    say(f"training AlexNet on {data} ({settings.describe()})")
    trained = train(
        data, checkpoint, recipe, options, on_epoch=lambda row: say(describe_epoch(row, "test"))
    )
    # The checkpoint holds the epoch --select kept: report that epoch's test numbers.
    kept = trained.best["epoch"] if trained.best else len(trained.history)
    tested = trained.history[kept - 1]
    mark = lap("train", mark)
    index_dir = out / "index"
    extract = ExtractOptions(device=settings.device, precision=_extract_precision(settings))
    index_options = IndexOptions(weights=str(checkpoint), rebuild=True, extract=extract)
    say(f"indexing the training images by fc7 into {index_dir}")
    with Index.create(index_dir, folders["train"], index_options) as index:
        mark = lap("index_train", mark)
        # map_depth=K: mAP over the full 60,000-image ranking would cost more than the demo.
        say(f"querying with every test image for precision@{K}")
        quality = evaluate_retrieval(index, folders["test"], k=K, map_depth=K)
        mark = lap("precision_at_6", mark)
        grid, _ = index.grid([folders["test"]], out / "figure4.png", k=K, n=GRID_QUERIES, seed=0)
    lap("grid", mark)
    seconds["total"] = time.perf_counter() - started
    return DemoReport(
        data=str(data),
        out_dir=str(out),
        settings=asdict(settings),
        checkpoint=str(checkpoint),
        index_dir=str(index_dir),
        grid=str(grid),
        test_images=int(tested["val_images"]),
        top1=1 - tested["top1_error"],
        top5=1 - tested["top5_error"],
        precision_at_6=quality.precision_at_k,
        seconds={k: round(v, 1) for k, v in seconds.items()},
        note=f"Fashion-MNIST demo on {settings.describe()}",
    )


def _extract_precision(settings: DemoSettings) -> str:
    if settings.precision == "auto":
        return "bf16" if settings.device == "cuda" else "fp32"
    return settings.precision
