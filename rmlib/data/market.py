"""Market-1501: the official folder layout and file naming, and a synthetic look-alike.

Every protocol rule of the data set that is a property of a file lives here, in one place:
  - names are `PPPP_cCsS_FFFFFF_NN.jpg` (person id, camera, sequence, frame, box);
  - person id -1 is junk and is dropped on reading;
  - person id 0 is a distractor: kept in the gallery, never relevant to a query;
  - the old model trains on the first half of the sorted training ids.
The per-query rule (same id and same camera removed) is the evaluator's
(`rmlib.evaluation.retrieval.Protocol.camera`).

Explained in the book: book/market1501.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmlib import RmlibError
from rmlib.outputs import cached, save_npy

MARKET_DIRNAME = "Market-1501-v15.09.15"
SPLIT_FOLDERS = {"train": "bounding_box_train", "gallery": "bounding_box_test", "query": "query"}
JUNK_ID = -1
DISTRACTOR_ID = 0
_NAME = re.compile(r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")


@dataclass(frozen=True)
class MarketSplit:
    """One folder of Market-1501: image paths with their person ids and cameras (1-6)."""

    paths: list[Path]
    pids: np.ndarray
    cams: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def parse_market_name(name: str) -> tuple[int, int]:
    """(person id, camera) of a Market-1501 file name; a clear error for any other name."""
    match = _NAME.match(name)
    if not match:
        raise RmlibError(
            f"{name!r} is not a Market-1501 image name (PPPP_cCsS_FFFFFF_NN.jpg); "
            "remove the file or fix the folder"
        )
    return int(match.group(1)), int(match.group(2))


def _read_split(folder: Path, keep_distractors: bool) -> MarketSplit:
    if not folder.is_dir():
        raise RmlibError(
            f"Market-1501 folder {folder} is missing; put the official "
            f"{MARKET_DIRNAME}/ under RMLIB_DATA (it cannot be downloaded: its licence)"
        )
    paths, pids, cams = [], [], []
    for path in sorted(folder.glob("*.jpg")):
        pid, cam = parse_market_name(path.name)
        if pid == JUNK_ID or (pid == DISTRACTOR_ID and not keep_distractors):
            continue
        paths.append(path)
        pids.append(pid)
        cams.append(cam)
    if not paths:
        raise RmlibError(f"{folder} holds no Market-1501 images; check the folder")
    return MarketSplit(paths, np.asarray(pids, dtype=np.int64), np.asarray(cams, dtype=np.int64))


def load_market1501(root: Path | str) -> dict[str, MarketSplit]:
    """The three splits, `train`, `query` and `gallery`, with junk dropped."""
    base = Path(root) / MARKET_DIRNAME
    if not base.is_dir():
        raise RmlibError(
            f"Market-1501 is not at {base}; put the official {MARKET_DIRNAME}/ there "
            "(or set RMLIB_DATA); it cannot be downloaded automatically (its licence)"
        )
    splits = {
        "train": _read_split(base / SPLIT_FOLDERS["train"], keep_distractors=False),
        "query": _read_split(base / SPLIT_FOLDERS["query"], keep_distractors=False),
        "gallery": _read_split(base / SPLIT_FOLDERS["gallery"], keep_distractors=True),
    }
    return splits


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_images(split: MarketSplit, size: tuple[int, int], cache: Path | None = None
                ) -> np.ndarray:
    """All images of a split resized to (H, W), uint8 (N, 3, H, W); cached as .npy if asked."""
    if cache is not None:
        return cached(cache, lambda: read_images(split, size), save_npy, np.load)
    from PIL import Image

    h, w = size
    out = np.empty((len(split), 3, h, w), dtype=np.uint8)
    for i, path in enumerate(split.paths):
        try:
            with Image.open(path) as img:
                out[i] = np.asarray(img.convert("RGB").resize((w, h), Image.BILINEAR)
                                    ).transpose(2, 0, 1)
        except OSError as exc:
            raise RmlibError(f"{path} is not a readable image ({exc}); replace or remove it"
                             ) from exc
    return out


def market_old_ids(train_pids: np.ndarray) -> np.ndarray:
    """The old model's identities: the first half (rounded down) of the sorted training ids."""
    ids = np.unique(train_pids)
    return ids[: len(ids) // 2]


# Clothing colours (RGB) of the synthetic people: few and far apart, so that people differ
# by their combination of colours, not by a colour of their own.
_PALETTE = np.array([[200, 40, 40], [40, 160, 60], [50, 70, 200], [220, 200, 60],
                     [230, 230, 230], [50, 50, 50], [150, 90, 40], [160, 60, 170]], float)


def _identity_bands(rng: np.random.Generator, n_ids: int, n_train_ids: int, n_colours: int,
                    shared_outfits: bool, split_outfits: bool) -> np.ndarray:
    """Each identity's (head, torso, legs) palette indices; index 0 is drawn per image."""
    combos = np.stack(np.meshgrid(*[np.arange(n_colours)] * 3, indexing="ij"), -1).reshape(-1, 3)
    bands = combos[rng.permutation(len(combos))[np.arange(n_ids) % len(combos)]]
    if split_outfits:  # old ids: lower half of the palette only; the others: any with an upper
        low = combos[(combos < n_colours // 2).all(1)]
        high = combos[~(combos < n_colours // 2).all(1)]
        n_old = n_train_ids // 2
        bands[1:n_old + 1] = low[rng.permutation(len(low))[np.arange(n_old) % len(low)]]
        rest = np.arange(n_old + 1, n_ids)
        bands[rest] = high[rng.permutation(len(high))[np.arange(len(rest)) % len(high)]]
    if shared_outfits:  # test person j wears the outfit of training person j (mod n_train_ids)
        test = np.arange(n_train_ids + 1, n_ids)
        bands[test] = bands[1 + (test - n_train_ids - 1) % n_train_ids]
    return bands


def _paint(rng: np.random.Generator, colours: np.ndarray, stripe: int, size: tuple[int, int],
           cast: np.ndarray, shift: np.ndarray, noise: float) -> np.ndarray:
    """One person image: three bands (a striped torso) on a random background, moved a
    little, under the camera's colour cast, with noise."""
    h, w = size
    img = np.empty((h, w, 3), dtype=np.float64)
    img[:] = rng.uniform(0, 255, size=3)  # background
    top, side = rng.integers(0, h // 8 + 1), rng.integers(0, w // 8 + 1)
    body = h - h // 8
    for band, colour in enumerate(colours):  # head, torso, legs
        rows = slice(top + band * body // 3, top + (band + 1) * body // 3)
        img[rows, side : w - w // 8 + side - 1] = colour
    if stripe:
        rows = np.arange(top + body // 3, top + 2 * body // 3)
        dark = rows[(rows // (2 * stripe)) % 2 == 0]
        img[dark, side : w - w // 8 + side - 1] *= 0.6
    img = img * cast + shift + rng.normal(0, noise, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _market_shots(n_train_ids: int, n_test_ids: int, n_cams: int, per_cam: int,
                  n_distractors: int, n_junk: int) -> Iterator[tuple[str, int, int, int]]:
    """(split, person id, camera, frame) of every image, in the order they are made."""
    frame = 0
    for pid in range(1, n_train_ids + 1):
        for cam in range(1, n_cams + 1):
            for _ in range(per_cam):
                frame += 1
                yield "train", pid, cam, frame
    for pid in range(n_train_ids + 1, n_train_ids + n_test_ids + 1):
        for cam in range(1, n_cams + 1):
            frame += 1
            yield "query", pid, cam, frame
            for _ in range(per_cam):
                frame += 1
                yield "gallery", pid, cam, frame
    for i in range(n_distractors):
        frame += 1
        yield "gallery", DISTRACTOR_ID, 1 + i % n_cams, frame
    for i in range(n_junk):
        frame += 1
        yield "gallery", JUNK_ID, 1 + i % n_cams, frame


def make_synthetic_market(
    root: Path | str,
    n_train_ids: int = 16,
    n_test_ids: int = 16,
    n_cams: int = 4,
    per_cam: int = 2,
    n_distractors: int = 8,
    n_junk: int = 4,
    size: tuple[int, int] = (64, 32),
    seed: int = 0,
    n_colours: int = 6,
    camera_cast: float = 0.6,
    noise: float = 40.0,
    shared_outfits: bool = False,
    split_outfits: bool = False,
) -> Path:
    """Write a small folder in Market-1501's layout and naming, for tests and the smoke profile.

    Each identity is three bands (head, torso, legs) whose colours come from a palette of
    only `n_colours`, so identities share bands and differ in their combination, a small
    colour jitter of their own and a stripe pattern on the torso. Each camera casts its own
    colour (gains up to +-`camera_cast` per channel) and each image gets a random
    background, vertical shift and noise: features that are not trained to ignore the
    camera confuse people across cameras, so the model trained on more identities (the
    new one) does better than the old. Test ids follow the train ids (as in the real
    set); the query holds one image per test id and camera, the gallery the rest plus
    distractors (id 0) and junk (id -1).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = Path(root) / MARKET_DIRNAME
    for folder in SPLIT_FOLDERS.values():
        (base / folder).mkdir(parents=True, exist_ok=True)
    n_ids = n_train_ids + n_test_ids + 1  # index 0: distractors and junk (drawn per image)
    palette = _PALETTE[:n_colours]
    bands = _identity_bands(rng, n_ids, n_train_ids, n_colours, shared_outfits, split_outfits)
    jitter = rng.normal(0, 12, size=(n_ids, 3, 3))
    stripes = rng.integers(0, 3, size=n_ids)  # torso stripe period: none, fine, coarse
    cast = 1 + rng.uniform(-camera_cast, camera_cast, size=(n_cams + 1, 3))
    shift = rng.uniform(-30, 30, size=(n_cams + 1, 3))
    for split, pid, cam, frame in _market_shots(n_train_ids, n_test_ids, n_cams, per_cam,
                                                n_distractors, n_junk):
        if pid > 0:
            colours, stripe = palette[bands[pid]] + jitter[pid], int(stripes[pid])
        else:  # a distractor or junk image: colours of its own
            colours = palette[rng.integers(0, n_colours, 3)] + rng.normal(0, 12, (3, 3))
            stripe = 0
        name = (f"{pid:04d}" if pid >= 0 else "-1") + f"_c{cam}s1_{frame:06d}_00.jpg"
        Image.fromarray(_paint(rng, colours, stripe, size, cast[cam], shift[cam], noise)).save(
            base / SPLIT_FOLDERS[split] / name)
    return base.parent
