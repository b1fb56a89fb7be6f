"""Duplicates you can trust: `retrieve duplicates` (through its CLI) beside perceptual hashes.

    python bench/duplicates.py --work /tmp/dupbench [--limit 400] [--edits 3] \
        [--pythonpath /work/lead] [--tool-only | --peers-only] [--models untrained,trained] \
        [--out results.md] [--json results.json]

The collection (built once under ``--work``, reused while its parameters are the same):

- ``--limit`` *sources*, drawn (seeded) from Imagenette val, each with ``--edits`` edited copies
  of distinct kinds, drawn from the nine of issue 21 with this file's own randomised strengths
  (``edit_image``; nothing is imported from the library's calibration, so the benchmark is not
  the calibration's own test): JPEG at quality 10-30, shrunk to 0.30-0.37, an off-centre crop
  keeping 0.65-0.78 of each side, a mirror, a rotation by 90/180/270 degrees, a border or
  letterbox, greyscale, a caption bar (drawn over the picture or added to it), brightness and
  contrast both moved by 20-45%; all but the JPEG kind saved as JPEG at quality 85-95.
- the hardest negatives val holds: each source's ``--neighbours`` nearest other val images by
  fc7 (``--mining-weights``, untrained by default) and by pHash over the 8 flips/rotations;
  untouched, as originals beside the sources.
- ``--second-shots`` synthetic re-shoots, scored apart (see ``second_shot``).

Ground truth: a source and its copies form one group; every pair inside a group is a true pair
(a mirrored and a cropped copy of one photo are copies of each other). A method's answer is every
pair inside each group it reports (the tool: its ``--json`` groups of kind ``exact`` or ``copy``,
today's ``near`` read as ``copy``; a hash: the connected components of the pairs within its
threshold, the same rule). Scored: pair precision / recall / F1, recall per kind of edit
(original-to-copy pairs). Pairs of two *original* Imagenette files are listed apart (val may hold
real copies: see the contact sheet) and scored both ways: as false positives, and left out.
The hash peers (pHash = imagededup's default, pHash over the 8 isometries, dHash, PDQ and PDQ over
the 8 isometries) are each swept over their threshold; reported at their usual default and at
the sweep's highest recall with precision >= 0.99. The tool runs in a subprocess
(``retrieve index``, ``retrieve duplicates --json``) with ``--pythonpath`` first on its path, so
it can be another worktree's code; untrained (``random:0``) and with a checkpoint of
``retrieve train ORIGINALS --time-budget 2m`` (trained once, reused from ``--work``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT / "bench", ROOT):  # unless a caller has placed them (duplicates_scale.py)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

KINDS = ("jpeg", "shrink", "crop", "mirror", "rotate", "border", "grey", "caption", "tone")
TOOL_KINDS = {"exact": "exact", "copy": "copy", "near": "copy"}  # today's `near` is a copy
WORDS = ("when", "we", "were", "there", "last", "summer", "best", "day", "ever", "wow", "lol")
CLI = "from retrieval.cli.main import cli; cli()"
# Real second shots Imagenette val holds, found by eye on this bench's contact sheet: one
# parachute display photographed moments apart (three photos), and another display (two). They
# join the collection as originals and are also reported apart.
REAL_SECOND_SHOTS = (
    ("n03888257/n03888257_12842.JPEG", "n03888257/n03888257_36390.JPEG"),
    ("n03888257/n03888257_12842.JPEG", "n03888257/n03888257_5442.JPEG"),
    ("n03888257/n03888257_36390.JPEG", "n03888257/n03888257_5442.JPEG"),
    ("n03888257/n03888257_14090.JPEG", "n03888257/n03888257_4580.JPEG"),
)


# -- the edits: this file's own, with their own random strengths ---------------------------------


def edit_image(
    image: Image.Image, kind: str, rng: np.random.Generator
) -> tuple[Image.Image, str, int]:
    """(edited image, what was done, JPEG quality to save it at) for one kind of edit."""
    w, h = image.size
    quality = int(rng.integers(85, 96))
    if kind == "jpeg":
        q = int(rng.integers(10, 31))
        return image, f"jpeg q{q}", q
    if kind == "shrink":
        f = float(rng.uniform(0.30, 0.37))
        small = image.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.LANCZOS)
        return small, f"shrink to {f:.2f}", quality
    if kind == "crop":
        fw, fh = rng.uniform(0.65, 0.78, size=2)
        cw, ch = round(w * fw), round(h * fh)
        # off centre: the window sits in the outer third of its slack on both axes
        at = [float(rng.choice([rng.uniform(0, 0.33), rng.uniform(0.67, 1.0)])) for _ in "xy"]
        left, top = round(at[0] * (w - cw)), round(at[1] * (h - ch))
        box = (left, top, left + cw, top + ch)
        return image.crop(box), f"crop {fw:.2f}x{fh:.2f} at {at[0]:.2f},{at[1]:.2f}", quality
    if kind == "mirror":
        return ImageOps.mirror(image), "mirror", quality
    if kind == "rotate":
        angle = int(rng.choice([90, 180, 270]))
        return image.rotate(angle, expand=True), f"rotate {angle}", quality
    if kind == "border":
        colour = _colour(rng)
        if rng.random() < 0.5:
            side = max(2, round(min(w, h) * rng.uniform(0.04, 0.15)))
            return ImageOps.expand(image, side, colour), f"border {side}px", quality
        if rng.random() < 0.5:  # letterbox: bars above and below
            bar = round(h * rng.uniform(0.15, 0.3))
            canvas, at, what = (w, h + 2 * bar), (0, bar), f"letterbox {bar}px"
        else:
            bar = round(w * rng.uniform(0.15, 0.3))
            canvas, at, what = (w + 2 * bar, h), (bar, 0), f"pillarbox {bar}px"
        out = Image.new("RGB", canvas, colour)
        out.paste(image, at)
        return out, what, quality
    if kind == "grey":
        return image.convert("L"), "greyscale", quality
    if kind == "caption":
        captioned, what = _caption(image, rng)
        return captioned, what, quality
    if kind == "tone":
        b = float(rng.choice([-1, 1]) * rng.uniform(0.2, 0.45))
        c = float(rng.choice([-1, 1]) * rng.uniform(0.2, 0.45))
        out = ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(1 + b)).enhance(1 + c)
        return out, f"brightness {b:+.2f} contrast {c:+.2f}", quality
    raise ValueError(f"unknown edit {kind!r}")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    pick = rng.integers(0, 3)
    if pick == 0:
        return (0, 0, 0)
    if pick == 1:
        return (255, 255, 255)
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _caption(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A meme/messenger caption: a bar of text over the picture or added above/below it."""
    w, h = image.size
    bar = max(12, round(h * rng.uniform(0.12, 0.22)))
    fill = (255, 255, 255) if rng.random() < 0.5 else (0, 0, 0)
    ink = (0, 0, 0) if fill == (255, 255, 255) else (255, 255, 255)
    top = rng.random() < 0.5
    over = rng.random() < 0.5
    if over:  # over the picture
        out, y = image.copy(), 0 if top else h - bar
    else:  # added to the canvas
        out = Image.new("RGB", (w, h + bar), fill)
        out.paste(image, (0, bar if top else 0))
        y = 0 if top else h
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, y, w, y + bar), fill=fill)
    text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 5))))
    font = ImageFont.load_default(size=max(8, round(bar * 0.6)))
    draw.text((round(w * 0.04), y + round(bar * 0.15)), text, fill=ink, font=font)
    where = f"{'over' if over else 'added'} at the {'top' if top else 'bottom'}"
    return out, f"caption {where}, bar {bar / h:.0%} of the height"


def second_shot(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Two synthetic 'second shots' of one scene: the camera panned by 20-35% of the width
    between them, each view with its own small perspective change, exposure and sensor noise.
    Neither view contains the other, so neither is an edit of the other; but the overlap holds the
    same pixels at the same instant (no parallax, no motion), which makes it harder than a real
    re-shoot for a pixel-level verifier and easier for nothing. An approximation, said so."""
    w, h = image.size
    pan = rng.uniform(0.20, 0.35)
    vw, vh = w * (1 - pan), h * rng.uniform(0.85, 0.95)
    views = []
    for left in (0.0, w * pan):
        top = rng.uniform(0, h - vh)
        quad = np.array([[left, top], [left, top + vh], [left + vw, top + vh], [left + vw, top]])
        quad += rng.normal(0, 0.02 * w, size=quad.shape)
        quad = np.clip(quad, 0, [w - 1, h - 1])
        view = image.transform(
            (round(vw), round(vh)),
            Image.Transform.QUAD,
            tuple(quad.ravel()),
            Image.Resampling.BICUBIC,
        )
        view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.9, 1.1))
        noisy = np.asarray(view, np.float32) + rng.normal(0, 3, size=(round(vh), round(vw), 3))
        views.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return views[0], views[1]


# -- the collection ------------------------------------------------------------------------------


@dataclass
class Item:
    """One file of the collection: an original, an edited copy of one, or a second shot."""

    path: str
    role: str  # "original", "copy", "second"
    source: int  # index of its original (copies and originals); the pair's number (second shots)
    kind: str = ""  # the edit (copies)
    what: str = ""  # the edit's parameters


@dataclass
class Collection:
    folder: str
    items: list[Item]
    sources: list[int]  # item numbers of the originals that have copies
    params: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Collection:
        data = json.loads(path.read_text())
        return cls(
            data["folder"], [Item(**i) for i in data["items"]], data["sources"], data["params"]
        )


def val_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpeg", ".jpg", ".png"})


def build_collection(args: argparse.Namespace, log: Callable[[str], None]) -> Collection:
    """Sources, their edited copies, their hardest negatives and the second shots, on disk."""
    params = {
        "images": str(args.images),
        "limit": args.limit,
        "edits": args.edits,
        "neighbours": args.neighbours,
        "second_shots": args.second_shots,
        "seed": args.seed,
        "mining_weights": args.mining_weights,
        "real_second_shots": [list(p) for p in REAL_SECOND_SHOTS],
    }
    manifest = args.work / "collection.json"
    if manifest.exists() and not args.fresh:
        saved = Collection.load(manifest)
        if saved.params == params:
            return saved
    folder = args.work / "collection"
    shutil.rmtree(folder, ignore_errors=True)
    paths = val_images(args.images)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(paths))
    sources = sorted(order[: args.limit].tolist())
    shots = order[args.limit : args.limit + args.second_shots].tolist()
    started = time.perf_counter()
    negatives = hardest_negatives(paths, sources, set(shots), args, log)
    log(f"mined {len(negatives)} hardest negatives in {time.perf_counter() - started:.0f} s")
    where = {p.relative_to(args.images).as_posix(): i for i, p in enumerate(paths)}
    real_shots = {where[r] for pair in REAL_SECOND_SHOTS for r in pair if r in where}
    originals = sorted(set(sources) | negatives | (real_shots - set(shots)))
    items, number = [], {}
    for i in originals:
        target = folder / "originals" / paths[i].relative_to(args.images)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths[i], target)
        number[i] = len(items)
        items.append(Item(str(target), "original", len(items)))
    deck: list[str] = []
    for i in sources:
        image = Image.open(paths[i]).convert("RGB")
        kinds: list[str] = []
        while len(kinds) < args.edits:  # a shuffled deck of the nine keeps the kinds balanced
            if not deck:
                deck = list(rng.permutation(KINDS))
            pick = next((k for k in deck if k not in kinds), None)
            if pick is None:
                deck = list(rng.permutation(KINDS))
                continue
            deck.remove(pick)
            kinds.append(pick)
        for kind in kinds:
            edited, what, quality = edit_image(image, kind, rng)
            target = folder / "copies" / paths[i].parent.name / f"{paths[i].stem}-{kind}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            edited.save(target, quality=quality)
            items.append(Item(str(target), "copy", number[i], kind, what))
    for n, i in enumerate(shots):
        a, b = second_shot(Image.open(paths[i]).convert("RGB"), rng)
        for view, tag in ((a, "a"), (b, "b")):
            target = folder / "second-shots" / f"{paths[i].stem}-{tag}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            view.save(target, quality=92)
            items.append(Item(str(target), "second", n))
    collection = Collection(str(folder), items, [number[i] for i in sources], params)
    collection.save(manifest)
    return collection


def hardest_negatives(
    paths: list[Path], sources: list[int], avoid: set[int], args, log: Callable[[str], None]
) -> set[int]:
    """Each source's nearest other val images by fc7 and by pHash over the 8 isometries."""
    k = args.neighbours
    if k == 0:
        return set()
    cache = args.work / f"mining-{args.mining_weights.replace(':', '-')}.npz"
    if cache.exists():
        saved = np.load(cache)
        fc7, phash8 = saved["fc7"], saved["phash8"]
    else:
        fc7 = mining_fc7(paths, args, log)
        phash8 = np.stack([hash_isometries(Image.open(p).convert("RGB"), "phash") for p in paths])
        np.savez(cache, fc7=fc7, phash8=phash8)
    chosen: set[int] = set()
    src = np.asarray(sources)
    squared = (fc7**2).sum(1)
    d_fc7 = squared[src, None] + squared[None, :] - 2 * fc7[src] @ fc7.T
    d_hash = hamming(phash8[src], phash8, isometries=True)
    for d in (d_fc7, d_hash):
        d = d.astype(np.float64)
        d[np.arange(len(src)), src] = np.inf
        if avoid:
            d[:, sorted(avoid)] = np.inf
        for row in np.argsort(d, axis=1, kind="stable")[:, :k]:
            chosen.update(row.tolist())
    return chosen - set(sources)


def mining_fc7(paths: list[Path], args, log: Callable[[str], None]) -> np.ndarray:
    """fc7 of every val image, by the bench tree's own library (mining only; the tool under test
    runs in its own subprocess)."""
    from retrieval import Index
    from retrieval.build.options import IndexOptions

    started = time.perf_counter()
    with Index.create(
        args.work / "mining-index", args.images, IndexOptions(weights=args.mining_weights)
    ) as ix:
        rows = ix.rows(limit=None)
        by_path = {os.path.abspath(r.path): r.id for r in rows}
        ids = [by_path[os.path.abspath(p)] for p in paths]
        vectors = np.asarray(ix.vectors(ids), np.float32)
    shutil.rmtree(args.work / "mining-index", ignore_errors=True)
    log(
        f"fc7 of {len(paths)} val images ({args.mining_weights}) in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return vectors


# -- the hash peers ------------------------------------------------------------------------------

ISOMETRIES = (
    None,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)


def hash_isometries(image: Image.Image, method: str) -> np.ndarray:
    """(8, words) uint64: ``method``'s hash of the image under each of the 8 flips/rotations
    (row 0: the image itself)."""
    if method == "pdq":
        import pdqhash

        codes, _ = pdqhash.compute_dihedral(np.asarray(image.convert("RGB")))
        # pdqhash's order differs from ISOMETRIES'; only the set of 8 matters, row 0 is identity
        bits = np.stack([np.asarray(c, np.uint8) for c in codes])
    else:
        import imagehash

        fn = {"phash": imagehash.phash, "dhash": imagehash.dhash}[method]
        views = [image if t is None else image.transpose(t) for t in ISOMETRIES]
        bits = np.stack([fn(v).hash.ravel().astype(np.uint8) for v in views])
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray, isometries: bool = False, block: int = 256) -> np.ndarray:
    """Hamming distances between the rows of ``a`` (n, 8, words) and ``b`` (m, 8, words):
    (n, m) uint16. ``isometries``: the least over the 8 flips/rotations of either side (the hash
    of one image's transform against the other's own hash, both ways)."""
    out = np.empty((len(a), len(b)), np.uint16)
    b0 = b[:, 0]
    for s in range(0, len(a), block):
        a0 = a[s : s + block, 0]
        d = np.bitwise_count(a0[:, None, :] ^ b0[None, :, :]).sum(-1, dtype=np.uint16)
        if isometries:
            for t in range(1, 8):
                at, bt = a[s : s + block, t], b[:, t]
                np.minimum(
                    d, np.bitwise_count(at[:, None] ^ b0[None]).sum(-1, dtype=np.uint16), out=d
                )
                np.minimum(
                    d, np.bitwise_count(a0[:, None] ^ bt[None]).sum(-1, dtype=np.uint16), out=d
                )
        out[s : s + block] = d
    return out


@dataclass
class Peer:
    name: str
    method: str  # phash, dhash, pdq
    isometries: bool
    default: int  # the threshold its own tool uses
    default_note: str
    sweep_to: int


PEERS = (
    Peer("pHash", "phash", False, 10, "imagededup's default", 24),
    Peer("pHash, 8 isometries", "phash", True, 10, "imagededup's default", 24),
    Peer("dHash", "dhash", False, 10, "imagededup's default", 24),
    Peer("PDQ", "pdq", False, 31, "ThreatExchange's default", 100),
    Peer("PDQ, 8 isometries", "pdq", True, 31, "ThreatExchange's default", 100),
)


# -- scoring -------------------------------------------------------------------------------------


def components_from_groups(n: int, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Component label per item: the groups merged where they share an item (union-find);
    an item in no group is its own component."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for g in groups:
        for other in g[1:]:
            ra, rb = root(g[0]), root(other)
            if ra != rb:
                parent[rb] = ra
    return np.array([root(i) for i in range(n)])


def components_from_edges(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def score(collection: Collection, label: np.ndarray) -> dict:
    """Pair precision / recall / F1 of a grouping (component label per item), with and without the
    pairs of two originals, recall per kind of edit, and the second shots it joined."""
    items = collection.items
    main = np.array([it.role != "second" for it in items])
    source = np.array([it.source for it in items])[main]
    original = np.array([it.role == "original" for it in items])[main]
    comp = np.unique(label[main], return_inverse=True)[1]

    def pairs_within(keys: np.ndarray) -> int:
        counts = np.unique(keys, return_counts=True)[1].astype(np.int64)
        return int((counts * (counts - 1) // 2).sum())

    found = pairs_within(comp)
    tp = pairs_within(comp * (len(items) + 1) + source)  # same component and same source
    both_original = pairs_within(comp[original])  # originals have distinct sources: never true
    copy = main[main] & ~original
    group_sizes = np.unique(source[copy], return_counts=True)[1].astype(np.int64) + 1
    truth = int((group_sizes * (group_sizes - 1) // 2).sum())
    by_kind: dict[str, list[int]] = {k: [0, 0] for k in KINDS}
    for i, it in enumerate(items):
        if it.role == "copy":
            by_kind[it.kind][0] += int(label[i] == label[it.source])
            by_kind[it.kind][1] += 1
    shots: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        if it.role == "second":
            shots.setdefault(it.source, []).append(i)
    joined = sum(int(label[a] == label[b]) for a, b in shots.values())
    at = {Path(it.path).as_posix(): i for i, it in enumerate(items) if it.role == "original"}
    real = [
        (at[x], at[y])
        for x, y in (
            (f"{collection.folder}/originals/{a}", f"{collection.folder}/originals/{b}")
            for a, b in collection.params.get("real_second_shots", [])
        )
        if x in at and y in at
    ]
    real_joined = sum(int(label[a] == label[b]) for a, b in real)

    def prf(found_pairs: int) -> dict:
        p = tp / found_pairs if found_pairs else 1.0
        r = tp / truth if truth else 0.0
        return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}

    return {
        "pairs": found,
        "true_pairs": tp,
        "truth": truth,
        "original_pairs": both_original,
        **prf(found),
        "without_original_pairs": prf(found - both_original),
        "recall_by_kind": {k: v[0] / v[1] for k, v in by_kind.items() if v[1]},
        "copies_by_kind": {k: v[1] for k, v in by_kind.items() if v[1]},
        "second_shots_joined": joined,
        "second_shots": len(shots),
        "real_second_shots_joined": real_joined,
        "real_second_shots": len(real),
    }


def original_pairs(collection: Collection, label: np.ndarray) -> list[tuple[int, int]]:
    """The pairs of two originals that a grouping puts together (at most 200 per method)."""
    originals = [i for i, it in enumerate(collection.items) if it.role == "original"]
    by_comp: dict[int, list[int]] = {}
    for i in originals:
        by_comp.setdefault(int(label[i]), []).append(i)
    pairs = [(a, b) for g in by_comp.values() for x, a in enumerate(g) for b in g[x + 1 :]]
    return pairs[:200]


def sweep_peer(collection: Collection, peer: Peer, codes: np.ndarray) -> dict:
    """The peer at its default threshold and at its highest recall with precision >= 0.99."""
    started = time.perf_counter()
    d = hamming(codes, codes, isometries=peer.isometries)
    a, b = np.nonzero(np.triu(d <= peer.sweep_to, k=1))
    dist = d[a, b]
    n = len(collection.items)
    points = {}
    for t in range(peer.sweep_to + 1):
        keep = dist <= t
        label = components_from_edges(n, a[keep], b[keep])
        points[t] = (score(collection, label), label)
    seconds = time.perf_counter() - started
    ok = [t for t, (s, _) in points.items() if s["precision"] >= 0.99]
    best = max(ok, key=lambda t: (points[t][0]["recall"], -t)) if ok else None
    if best is None:  # nothing reaches 0.99: the most precise point, said so
        best = max(points, key=lambda t: (points[t][0]["precision"], points[t][0]["recall"]))
    return {
        "name": peer.name,
        "default": {"threshold": peer.default, **points[peer.default][0]},
        "at_099": {"threshold": best, "reached": bool(ok), **points[best][0]},
        "labels": {"default": points[peer.default][1], "at_099": points[best][1]},
        "sweep": {t: [s["precision"], s["recall"], s["f1"]] for t, (s, _) in points.items()},
        "pairwise_seconds": seconds,
    }


def run_peers(collection: Collection, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    started = time.perf_counter()
    methods = ["phash", "dhash"]
    if importlib.util.find_spec("pdqhash") is not None:
        methods.append("pdq")
    else:  # PDQ where installable: pdqhash is an sdist that needs a C++ compiler
        log("pdqhash is not installed (pip install pdqhash): PDQ is left out of this run")
    codes = {m: [] for m in methods}
    for it in collection.items:
        image = Image.open(it.path).convert("RGB")
        for m in codes:
            codes[m].append(hash_isometries(image, m))
    hashed = time.perf_counter() - started
    files = len(collection.items)
    log(f"hashed {files} files x 8 isometries x {len(codes)} hashes in {hashed:.0f} s")
    peers = [p for p in PEERS if p.method in codes]
    results = [sweep_peer(collection, p, np.stack(codes[p.method])) for p in peers]
    return results, {"hash_seconds": hashed}


# -- the tool, through its CLI -------------------------------------------------------------------


def tool_env(pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    return env


def retrieve(args, *cli_args: str, log_to: Path) -> tuple[str, float]:
    """Run ``retrieve CLI_ARGS`` with the tool's code; (stdout, seconds). stderr goes to a log."""
    command = [args.python, "-c", CLI, *cli_args]
    started = time.perf_counter()
    with open(log_to, "a") as err:
        err.write(f"$ retrieve {' '.join(cli_args)}\n")
        err.flush()
        # `python -c` puts the working directory first on sys.path: run in the tool's tree, or a
        # bench started in another checkout would import that checkout's code
        done = subprocess.run(
            command,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=tool_env(args.pythonpath),
            cwd=args.pythonpath or ROOT,
        )
    if done.returncode != 0:
        raise SystemExit(f"retrieve {cli_args[0]} failed (exit {done.returncode}); see {log_to}")
    return done.stdout, time.perf_counter() - started


def train_checkpoint(args, collection: Collection, log: Callable[[str], None]) -> Path:
    """A checkpoint of ``retrieve train ORIGINALS --time-budget`` (made once, reused)."""
    if args.checkpoint:
        return args.checkpoint
    import hashlib

    key = hashlib.sha256(json.dumps(collection.params, sort_keys=True).encode()).hexdigest()[:8]
    path = args.work / f"model-{args.time_budget}-{key}.pt"
    if not path.exists():
        originals = Path(collection.folder) / "originals"
        _, seconds = retrieve(
            args,
            "train",
            str(originals),
            "-o",
            str(path),
            "--time-budget",
            args.time_budget,
            log_to=args.work / "tool.log",
        )
        log(f"trained {path.name} in {seconds:.0f} s")
    return path


def run_tool(args, collection: Collection, weights: str, name: str, log) -> dict:
    index = args.work / f"index-{name}"
    shutil.rmtree(index, ignore_errors=True)
    logfile = args.work / "tool.log"
    _, indexed = retrieve(
        args,
        "index",
        collection.folder,
        "--index",
        str(index),
        "--weights",
        weights,
        log_to=logfile,
    )
    before = logfile.stat().st_size
    out, searched = retrieve(args, "duplicates", "--index", str(index), "--json", log_to=logfile)
    with open(logfile) as f:  # what the tool said on stderr (its summary: candidates, verified)
        f.seek(before)
        said = [line.strip() for line in f if line.strip() and not line.startswith("$ ")]
    number = {os.path.realpath(it.path): i for i, it in enumerate(collection.items)}
    groups, kinds, evidence = [], {}, []
    for line in out.splitlines():
        if not line.startswith("{"):
            continue
        group = json.loads(line)
        kind = TOOL_KINDS.get(group.get("kind"))
        kinds[group.get("kind")] = kinds.get(group.get("kind"), 0) + 1
        if kind is None or "members" not in group:
            continue
        members = [number[os.path.realpath(m["path"])] for m in group["members"]]
        groups.append(members)
        proof = [m["evidence"] for m in group["members"] if m.get("evidence")]
        evidence.append({**{k: v for k, v in group.items() if k != "members"}, "evidence": proof})
    label = components_from_groups(len(collection.items), groups)
    log(f"tool ({name}): index {indexed:.0f} s, duplicates {searched:.0f} s, groups {kinds}")
    return {
        "name": f"retrieve duplicates ({name})",
        "weights": weights,
        "index_seconds": indexed,
        "duplicates_seconds": searched,
        "group_kinds": kinds,
        "tool_said": said[-8:],
        "evidence_sample": evidence[:5],
        "label": label,
        **score(collection, label),
        **mistakes(collection, label, groups, evidence),
    }


def mistakes(collection: Collection, label: np.ndarray, groups, evidence) -> dict:
    """What to tune on: the false pairs inside the tool's groups (with the group's evidence) and
    the original-to-copy pairs it missed (with the edit's parameters); 300 of each at most."""
    items = collection.items
    false = []
    for members, proof in zip(groups, evidence):
        for x, a in enumerate(members):
            for b in members[x + 1 :]:
                if items[a].source != items[b].source and len(false) < 300:
                    false.append({"a": items[a].path, "b": items[b].path, "group": proof})
    missed = [
        {"original": items[it.source].path, "copy": it.path, "kind": it.kind, "what": it.what}
        for i, it in enumerate(items)
        if it.role == "copy" and label[i] != label[it.source]
    ]
    return {"false_pairs_found": false, "missed_copies": missed[:300]}


# -- the report ----------------------------------------------------------------------------------


def contact_sheet(
    collection: Collection, flagged: dict[tuple[int, int], list[str]], path: Path
) -> None:
    """Each pair of originals some method called copies: the two thumbnails and who said so."""
    pairs = sorted(flagged.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:60]
    if not pairs:
        return
    thumb, cols, caption = 160, 3, 44
    cell_w, cell_h = 2 * thumb + 16, thumb + caption
    rows = (len(pairs) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for n, ((a, b), who) in enumerate(pairs):
        x, y = (n % cols) * cell_w, (n // cols) * cell_h
        for k, i in enumerate((a, b)):
            im = Image.open(collection.items[i].path).convert("RGB")
            im.thumbnail((thumb, thumb))
            sheet.paste(im, (x + k * (thumb + 4), y))
        names = " / ".join(Path(collection.items[i].path).stem for i in (a, b))
        draw.text((x, y + thumb + 2), names, fill="black", font=font)
        draw.text((x, y + thumb + 16), ", ".join(who)[:60], fill="darkred", font=font)
    sheet.save(path)


def row(name: str, point: str, s: dict, seconds: str = "") -> str:
    w = s["without_original_pairs"]
    return (
        f"| {name} | {point} | {s['pairs']} | {s['pairs'] - s['true_pairs']} | "
        f"{s['precision']:.3f} | {s['recall']:.3f} | "
        f"{s['f1']:.3f} | {s['original_pairs']} | {w['precision']:.3f} | {w['f1']:.3f} | "
        f"{s['second_shots_joined']}/{s['second_shots']} | "
        f"{s['real_second_shots_joined']}/{s['real_second_shots']} | {seconds} |"
    )


def report(collection, tools, peers, lines: list[str]) -> list[str]:
    lines += [
        "",
        "| method | operating point | pairs | false pairs | precision | recall | F1 | pairs of 2 "
        "originals | precision w/o them | F1 w/o them | synthetic second shots joined | real "
        "second shots joined | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    columns = []
    for t in tools:
        lines.append(
            row(
                t["name"], "its own", t, f"{t['index_seconds']:.0f} + {t['duplicates_seconds']:.0f}"
            )
        )
        columns.append((t["name"].replace("retrieve duplicates ", "retrieve "), t))
    for p in peers:
        d, best = p["default"], p["at_099"]
        lines.append(row(p["name"], f"{d['threshold']} bits ({'default'})", d))
        mark = "" if best["reached"] else " (0.99 not reached: most precise)"
        lines.append(row(p["name"], f"{best['threshold']} bits, P>=0.99{mark}", best))
        columns.append((f"{p['name']} @{best['threshold']}", best))
    lines += [
        "",
        "Recall per kind of edit (original-to-copy pairs; the tool at its own point, each hash at "
        "its highest recall with precision >= 0.99):",
        "",
        "| edit | copies | " + " | ".join(name for name, _ in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    counts = next(iter(columns))[1]["copies_by_kind"] if columns else {}
    for kind in KINDS:
        if kind in counts:
            cells = " | ".join(f"{s['recall_by_kind'].get(kind, 0):.3f}" for _, s in columns)
            lines.append(f"| {kind} | {counts[kind]} | {cells} |")
    return lines + acceptance(tools, peers)


def acceptance(tools: list[dict], peers: list[dict]) -> list[str]:
    """Issue 21's acceptance, each line measured in this run."""
    if not tools:
        return []
    best = max(peers, key=lambda p: p["at_099"]["f1"]) if peers else None
    out = ["", "Issue 21's acceptance, as measured here:", ""]
    for t in tools:
        kinds = t["recall_by_kind"]
        worst = min(kinds, key=kinds.get)
        checks = [
            (f"precision {t['precision']:.3f} >= 0.98", t["precision"] >= 0.98),
            (f"F1 {t['f1']:.3f} >= 0.95", t["f1"] >= 0.95),
            (
                f"recall >= 0.9 for every edit (lowest: {worst} {kinds[worst]:.3f})",
                kinds[worst] >= 0.9,
            ),
            (
                f"second shots joined: synthetic {t['second_shots_joined']}, real "
                f"{t['real_second_shots_joined']} (0 wanted)",
                t["second_shots_joined"] + t["real_second_shots_joined"] == 0,
            ),
        ]
        if best is not None:
            f1 = best["at_099"]["f1"]
            checks.append(
                (f"F1 >= best hash peer + 0.10 ({best['name']} {f1:.3f})", t["f1"] >= f1 + 0.10)
            )
        cells = "; ".join(f"{text}: {'met' if ok else 'NOT met'}" for text, ok in checks)
        out.append(f"- {t['name']}: {cells}")
    by_name = {t["name"]: t for t in tools}
    untrained = next((t for n, t in by_name.items() if "untrained" in n), None)
    trained = next((t for n, t in by_name.items() if "(trained" in n), None)
    if untrained and trained:
        fa = trained["pairs"] - trained["true_pairs"]
        fb = untrained["pairs"] - untrained["true_pairs"]
        out.append(
            f"- the trained model's false pairs {fa} <= untrained's {fb}: "
            f"{'met' if fa <= fb else 'NOT met'}"
        )
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--images", type=Path, default=Path("/work/shared/datasets/imagenette2-224/val"))
    add("--work", type=Path, required=True, help="collection, indexes, checkpoint, logs")
    add("--limit", type=int, default=400, help="sources (originals that get copies)")
    add("--edits", type=int, default=3, help="edited copies per source, distinct kinds")
    add("--neighbours", type=int, default=3, help="hardest negatives per source, per signal")
    add("--second-shots", type=int, default=30)
    add("--seed", type=int, default=0)
    add("--mining-weights", default="random:0", help="fc7 that picks the hardest negatives")
    add("--models", default="untrained,trained", help="tool runs: untrained, trained or both")
    add("--checkpoint", type=Path, default=None, help="use this checkpoint as 'trained'")
    add("--time-budget", default="2m", help="retrieve train --time-budget for 'trained'")
    add("--pythonpath", default=os.environ.get("TOOL_PYTHONPATH"), help="the tool's code first")
    add("--python", default=sys.executable, help="interpreter that runs the tool")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--tool-only", action="store_true", help="skip the hash peers")
    only.add_argument("--peers-only", action="store_true", help="skip the tool")
    add("--fresh", action="store_true", help="rebuild the collection even if its params match")
    add("--out", type=Path, default=None, help="the Markdown report")
    add("--json", type=Path, default=None, help="the results as JSON [WORK/results.json]")
    add("--sheet", type=Path, default=None, help="contact sheet [WORK/original-pairs.png]")
    args = parser.parse_args(argv)
    args.images, args.work = args.images.resolve(), args.work.resolve()
    if not args.images.is_dir():
        parser.error(f"--images {args.images} is not a folder")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    from search import machine

    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    lines = ["# Duplicates you can trust (bench/duplicates.py)", "", *machine()]
    started = time.perf_counter()
    collection = build_collection(args, log)
    roles = {
        r: sum(it.role == r for it in collection.items) for r in ("original", "copy", "second")
    }
    commit = subprocess.run(
        ["git", "-C", args.pythonpath or str(ROOT), "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
    ).stdout.strip()[:90]
    changed = subprocess.run(
        ["git", "-C", args.pythonpath or str(ROOT), "status", "--porcelain", "retrieval"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    commit += " + uncommitted changes" if changed else ""
    lines += [
        f"- collection: {len(collection.sources)} sources from Imagenette val (seed {args.seed}), "
        f"{roles['copy']} edited copies ({args.edits} each, distinct kinds), "
        f"{roles['original'] - len(collection.sources)} hardest negatives (each source's "
        f"{args.neighbours} nearest by fc7 {args.mining_weights} and by pHash over 8 isometries), "
        f"{roles['second']} second-shot views ({roles['second'] // 2} pairs, scored apart): "
        f"{len(collection.items)} files",
        f"- the tool's code: {args.pythonpath or ROOT} ({commit})",
    ]
    tools, peers = [], []
    if not args.peers_only:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name == "untrained":
                weights = "random:0"
            elif name == "trained":
                weights = str(train_checkpoint(args, collection, log))
            else:
                raise SystemExit(f"--models: untrained or trained, not {name!r}")
            tools.append(run_tool(args, collection, weights, name, log))
            t = tools[-1]  # at once, so a run cut short still tells
            log(
                f"{t['name']}: pairs {t['pairs']}, false {t['pairs'] - t['true_pairs']}, precision "
                f"{t['precision']:.3f}, recall {t['recall']:.3f}, F1 {t['f1']:.3f}; by edit "
                + ", ".join(f"{k} {v:.2f}" for k, v in t["recall_by_kind"].items())
                + f"; second shots {t['second_shots_joined']} + {t['real_second_shots_joined']}"
            )
    peer_info = {}
    if not args.tool_only:
        peers, peer_info = run_peers(collection, log)
    lines = report(collection, tools, peers, lines)
    flagged: dict[tuple[int, int], list[str]] = {}
    for t in tools:
        for pair in original_pairs(collection, t["label"]):
            flagged.setdefault(pair, []).append(
                t["name"].replace("retrieve duplicates ", "retrieve ")
            )
    for p in peers:
        for pair in original_pairs(collection, p["labels"]["at_099"]):
            flagged.setdefault(pair, []).append(f"{p['name']} @{p['at_099']['threshold']}")
    sheet = args.sheet or args.work / "original-pairs.png"
    contact_sheet(collection, flagged, sheet)
    lines += [
        "",
        f"- pairs of two originals called copies by any method above (at P>=0.99 for hashes): "
        f"{len(flagged)}" + (f"; contact sheet {sheet}" if flagged else ""),
    ]
    for (a, b), who in sorted(flagged.items(), key=lambda kv: -len(kv[1]))[:15]:
        names = [Path(collection.items[i].path).name for i in (a, b)]
        lines.append(f"  - {names[0]} / {names[1]}: {', '.join(who)}")
    for t in tools:
        if t["tool_said"]:
            lines.append(f"- {t['name']} said (stderr): " + " / ".join(t["tool_said"][-3:])[:400])
    if peer_info:
        lines.append(
            f"- hashing all files (3 hashes x 8 isometries): {peer_info['hash_seconds']:.0f} s"
        )
    lines += [
        f"- whole benchmark {time.perf_counter() - started:.0f} s; load average at end: "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    results = {
        "machine": lines[2:5],
        "params": collection.params,
        "files": {**roles, "total": len(collection.items)},
        "tool_code": f"{args.pythonpath or ROOT} ({commit})",
        "tools": [{k: v for k, v in t.items() if k != "label"} for t in tools],
        "peers": [{k: v for k, v in p.items() if k != "labels"} for p in peers],
        "original_pairs": [
            {"a": collection.items[a].path, "b": collection.items[b].path, "by": who}
            for (a, b), who in flagged.items()
        ],
    }
    (args.json or args.work / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
