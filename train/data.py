"""Training data: video-text and image-text datasets over WebVid-style tables, and a resumable sampler.

Table files (`read_table`): CSV with a header row, JSONL (one JSON object per line) or, when `pyarrow`
is installed, Parquet. Media paths are relative to the table file's folder (absolute paths also work).

Videos (`VideoTextDataset`, the paper's recipe: F = 16 consecutive frames at 4 fps):
- The source's frame timeline comes from its packet timestamps (demuxed, not decoded). A start frame
  is drawn among those from which the clip fits, then frame k of the clip is the source frame nearest
  to t0 + k / fps (ties go to the earlier frame, the one on screen at that time). A clip fits when
  t0 + (F - 1) / fps <= the last frame's time: no frame is ever repeated past the end of the source.
- Only the needed frames are decoded: the decoder seeks to the keyframe before t0 and stops at the
  clip's last frame.
- Frames are resized (Lanczos) to cover (H, W) and centre-cropped, the rule of `engine.media.load_image`.
- The start is random but reproducible: it comes from a numpy Generator seeded with (seed, epoch, index).

Skipping, and how a trainer counts skips:
- A missing, corrupt or too-short media file is never fatal: `__getitem__` returns None and the
  dataset's `skipped` counter (reason -> count) goes up. Errors in the table itself (missing column,
  no rows, empty path, unknown extension) raise `DatasetError` at construction, before training.
- `collate_skip_none` drops the Nones of a batch and records how many under the batch's "skipped" key;
  for a batch of Nones only it returns None. The trainer therefore counts
  `batch["skipped"]` for a batch and `loader.batch_size` for a None batch (exact with `ResumableSampler`,
  whose endless stream makes every batch full), and skips the step for a None batch.
- `dataset.skipped` is exact with `num_workers=0` only: with DataLoader workers each worker process
  holds its own copy of the dataset and its counts never reach the main process (use the collate count).

Epochs and workers: DataLoader workers copy the dataset when an iterator is created, so `set_epoch`
reaches them only for iterators created afterwards. `ResumableSampler(..., with_epoch=True)` yields
(index, epoch) keys instead of indices, which the datasets accept too: every clip then depends only on
the sampler's stream, whatever the workers, and a resumed run sees the same clips.
"""

from __future__ import annotations

import csv
import json
import logging
import operator
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, default_collate

from pdengine.engine.media import MediaError, load_image

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif")
TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")

# Skip reasons (keys of `dataset.skipped`).
MISSING = "missing"  # the media file does not exist
CORRUPT = "corrupt"  # it exists but cannot be decoded
TOO_SHORT = "too_short"  # the video is shorter than (frames - 1) / fps seconds
TOO_FEW_FRAMES = "too_few_frames"  # the clip holds fewer than `min_frames` distinct source frames


class DatasetError(ValueError):
    """A dataset that cannot be used (bad table, no rows, bad settings); the message names the file."""


class _Skip(Exception):
    """Internal: this item is skipped for `reason` (one of the constants above)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _rows_csv(path: Path, columns: Sequence[str]) -> list[tuple[int, dict]]:
    # utf-8-sig: spreadsheets often write a byte-order mark before the header.
    with open(path, newline="", encoding="utf-8-sig") as fp:
        reader = csv.DictReader(fp)
        header = reader.fieldnames
        if header is None:
            raise DatasetError(f"{path}: empty file (a CSV needs a header row naming the columns)")
        missing = [c for c in columns if c not in header]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing}; the header has {list(header)}")
        rows = []
        for row in reader:
            line = reader.line_num
            if any(row[c] is None for c in columns):  # DictReader fills short rows with None
                raise DatasetError(f"{path}:{line}: row has fewer fields than the header")
            rows.append((line, {c: row[c] for c in columns}))
    return rows


def _rows_jsonl(path: Path, columns: Sequence[str]) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8-sig") as fp:
        for line, text in enumerate(fp, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{line}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
            missing = [c for c in columns if c not in obj]
            if missing:
                raise DatasetError(f"{path}:{line}: missing key(s) {missing}; the object has {list(obj)}")
            rows.append((line, {c: obj[c] for c in columns}))
    return rows


def _rows_parquet(path: Path, columns: Sequence[str]) -> list[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow), "
                           "or convert the table to CSV/JSONL") from None
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid (a malformed file) is a ValueError
        raise DatasetError(f"{path}: cannot read Parquet file: {e}") from e
    missing = [c for c in columns if c not in names]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; the file has {names}")
    try:
        table = pq.read_table(path, columns=list(columns))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read Parquet file: {e}") from e
    data = table.to_pydict()
    # "Line" numbers of a Parquet file are 1-based row numbers.
    return [(r + 1, {c: data[c][r] for c in columns}) for r in range(table.num_rows)]


def _read_rows(path: str | os.PathLike, columns: Sequence[str], nonempty: Sequence[str]) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DatasetError(f"{path}: unknown table type {suffix!r} (use {', '.join(TABLE_SUFFIXES)})")
    columns = list(dict.fromkeys(columns))
    if not columns:
        raise DatasetError(f"{path}: no columns requested")
    try:
        if suffix == ".csv":
            rows = _rows_csv(path, columns)
        elif suffix == ".jsonl":
            rows = _rows_jsonl(path, columns)
        else:
            rows = _rows_parquet(path, columns)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from None
    if not rows:
        raise DatasetError(f"{path}: no rows")
    for line, row in rows:
        for c in columns:
            if not isinstance(row[c], str):
                raise DatasetError(f"{path}:{line}: column {c!r} must hold text, got {type(row[c]).__name__}")
        for c in nonempty:
            if not row[c].strip():
                raise DatasetError(f"{path}:{line}: column {c!r} is empty")
    return rows


def read_table(path: str | os.PathLike, columns: Sequence[str],
               nonempty: Sequence[str] = ()) -> list[dict[str, str]]:
    """Rows of a CSV (header row), JSONL (one object per line) or Parquet table as {column: text}.

    Each row holds exactly `columns`, whose values must be text; columns in `nonempty` must not be
    blank. Raises `DatasetError` naming the file and line for anything wrong, and for a table without rows.
    """
    return [row for _, row in _read_rows(path, columns, nonempty)]


def _media_paths(data_file: Path, rows: list[tuple[int, dict]], column: str,
                 allowed: Sequence[str], kind: str) -> list[str]:
    root = data_file.parent
    paths = []
    for line, row in rows:
        value = row[column].strip()
        suffix = Path(value).suffix.lower()
        if suffix not in allowed:
            raise DatasetError(f"{data_file}:{line}: {value!r} has an unknown {kind} extension {suffix!r} "
                               f"(supported: {' '.join(sorted(allowed))})")
        paths.append(str(root / value))  # an absolute `value` replaces root
    return paths


# ---------------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------------


def _cover_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (h, w, 3) -> (height, width, 3) by `engine.media.cover_crop` (the rule conditioning images use)."""
    from pdengine.engine.media import cover_crop

    return cover_crop(Image.fromarray(frame, "RGB"), height, width)


def _to_unit_range(frames: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (3, F, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).to(torch.float32)
    return x / 127.5 - 1.0


def _nearest(times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the frame time nearest to each target; ties go to the earlier frame."""
    right = np.clip(np.searchsorted(times, targets), 1, len(times) - 1)
    left = right - 1
    # A small tolerance so float noise cannot flip an exact tie to the later frame.
    take_right = (times[right] - targets) < (targets - times[left]) - 1e-9
    return np.where(take_right, right, left)


def _choose_frames(times: np.ndarray, frames: int, fps: float, rng: np.random.Generator,
                   min_distinct: int | None, path: str) -> np.ndarray:
    """Source frame indices of one clip: a random valid start t0, then nearest frames to t0 + k / fps."""
    offsets = np.arange(frames) / fps
    span = offsets[-1]
    if len(times) == 1:
        valid = np.array([0]) if frames == 1 else np.array([], dtype=np.int64)
    else:
        valid = np.flatnonzero(times + span <= times[-1] + 1e-9)
    if valid.size == 0:
        raise _Skip(TOO_SHORT, f"{path}: {times[-1] - times[0]:.3f} s between its first and last frame, "
                               f"a clip of {frames} frames at {fps:g} fps needs {span:.3f} s")
    start = valid[rng.integers(valid.size)]
    chosen = _nearest(times, times[start] + offsets) if len(times) > 1 else np.zeros(frames, np.int64)
    if min_distinct is not None and len(np.unique(chosen)) < min_distinct:
        raise _Skip(TOO_FEW_FRAMES, f"{path}: clip holds {len(np.unique(chosen))} distinct source frames, "
                                    f"min_frames is {min_distinct}")
    return chosen


def _packet_pts(container: av.container.InputContainer, stream: av.VideoStream) -> list[int] | None:
    """Sorted presentation timestamps of the stream's frames, read from packets without decoding.

    None when some packet has no timestamp (raw streams, some AVI files).
    """
    pts = []
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream flush packet
            continue
        if packet.pts is None:
            return None
        pts.append(packet.pts)
    return sorted(set(pts))


def _decode_pts(container: av.container.InputContainer, stream: av.VideoStream,
                need: list[int], seek: bool) -> dict[int, np.ndarray] | None:
    """Decode the frames whose pts are in `need` (sorted); None when seeking overshot the first one."""
    if seek:
        container.seek(need[0], backward=True, any_frame=False, stream=stream)
    wanted, out = set(need), {}
    first = True
    for frame in container.decode(stream):
        if frame.pts is None:
            raise _Skip(CORRUPT, "decoded frame has no timestamp")
        if first and seek and frame.pts > need[0]:
            return None
        first = False
        if frame.pts in wanted:
            out[frame.pts] = frame.to_ndarray(format="rgb24")
        if frame.pts >= need[-1]:
            break
    return out


def _load_clip(path: str, frames: int, fps: float, rng: np.random.Generator,
               min_distinct: int | None) -> np.ndarray:
    """uint8 (frames, h, w, 3) of one clip of `path` at `fps`; raises _Skip."""
    if not os.path.isfile(path):
        raise _Skip(MISSING, f"{path}: video not found")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise _Skip(CORRUPT, f"{path}: no video stream")
            stream = container.streams.video[0]
            pts = _packet_pts(container, stream)
            if pts is not None:
                if not pts:
                    raise _Skip(CORRUPT, f"{path}: video stream has no frames")
                times = np.asarray(pts, dtype=np.float64) * float(stream.time_base)
                chosen = _choose_frames(times, frames, fps, rng, min_distinct, path)
                need = sorted({pts[j] for j in chosen})
                got = _decode_pts(container, stream, need, seek=True)
                if got is None:  # the seek landed after t0: decode from the start instead
                    with av.open(path) as again:
                        got = _decode_pts(again, again.streams.video[0], need, seek=False)
                if len(got) != len(need):
                    raise _Skip(CORRUPT, f"{path}: {len(need) - len(got)} frame(s) of the clip failed to decode")
                return np.stack([got[pts[j]] for j in chosen])
        # No packet timestamps: decode every frame and time it by its own timestamp or its position.
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            decoded, times_list = [], []
            for k, frame in enumerate(container.decode(stream)):
                if frame.time is not None:
                    times_list.append(frame.time)
                elif rate:
                    times_list.append(k / float(rate))
                else:
                    raise _Skip(CORRUPT, f"{path}: frames have neither timestamps nor a frame rate")
                decoded.append(frame.to_ndarray(format="rgb24"))
    except av.FFmpegError as e:
        raise _Skip(CORRUPT, f"{path}: cannot decode video: {e}") from e
    if not decoded:
        raise _Skip(CORRUPT, f"{path}: video stream has no frames")
    order = np.argsort(np.asarray(times_list), kind="stable")
    times = np.asarray(times_list, dtype=np.float64)[order]
    chosen = _choose_frames(times, frames, fps, rng, min_distinct, path)
    return np.stack([decoded[order[j]] for j in chosen])


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


def _resolution(value: int | tuple[int, int]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in pair)):
        raise DatasetError(f"resolution must be a positive int or a (height, width) pair, got {value!r}")
    return int(pair[0]), int(pair[1])


def _check_seed(seed: int, epoch: int) -> None:
    for name, v in (("seed", seed), ("epoch", epoch)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")


class _TableDataset(Dataset):
    """Shared parts: rows, keys (int or (index, epoch)), per-item generators, skip counting."""

    def __init__(self, seed: int):
        _check_seed(seed, 0)
        self.paths: list[str] = []
        self.captions: list[str] = []
        self.seed, self.epoch = int(seed), 0
        self.skipped: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Draw clips for `epoch` (and `seed`, if given) from now on."""
        seed = self.seed if seed is None else seed
        _check_seed(seed, epoch)
        self.epoch, self.seed = int(epoch), int(seed)

    def generator(self, index: int, epoch: int | None = None) -> np.random.Generator:
        """The random stream of item `index` in `epoch` (the current epoch by default)."""
        epoch = self.epoch if epoch is None else epoch
        _check_seed(self.seed, epoch)
        return np.random.default_rng([self.seed, int(epoch), int(index)])

    def _key(self, key) -> tuple[int, int | None]:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise TypeError(f"a dataset key is an index or an (index, epoch) pair, got {key!r}")
            index, epoch = operator.index(key[0]), operator.index(key[1])
        else:
            index, epoch = operator.index(key), None
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        return index, epoch

    def _skip(self, err: _Skip) -> None:
        self.skipped[err.reason] += 1
        logger.warning("skipping %s (%s)", err, err.reason)


class VideoTextDataset(_TableDataset):
    """Video clips with captions from a WebVid-style table; items are dicts or None (skipped).

    Item: {"video": float32 (3, frames, H, W) in [-1, 1], "caption": str, "index": int}. A key is an
    index, or an (index, epoch) pair from `ResumableSampler(with_epoch=True)`. `min_frames` (None: no
    check) skips clips holding fewer distinct source frames than that, i.e. sources much slower than
    `fps` whose clips would mostly repeat frames.
    """

    def __init__(self, data_file: str | os.PathLike, *, resolution: int | tuple[int, int] = 256,
                 frames: int = 16, fps: float = 4.0, video_column: str = "path",
                 caption_column: str = "caption", min_frames: int | None = None, seed: int = 0):
        super().__init__(seed)
        self.data_file = Path(data_file)
        self.height, self.width = _resolution(resolution)
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise DatasetError(f"frames must be a positive int, got {frames!r}")
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not np.isfinite(fps) or fps <= 0:
            raise DatasetError(f"fps must be a positive number, got {fps!r}")
        if min_frames is not None and (isinstance(min_frames, bool) or not isinstance(min_frames, int)
                                       or not 1 <= min_frames <= frames):
            raise DatasetError(f"min_frames must be None or an int in [1, frames={frames}], got {min_frames!r}")
        self.frames, self.fps, self.min_frames = frames, float(fps), min_frames
        rows = _read_rows(self.data_file, [video_column, caption_column], nonempty=[video_column])
        self.paths = _media_paths(self.data_file, rows, video_column, VIDEO_SUFFIXES, "video")
        self.captions = [row[caption_column] for _, row in rows]

    def sample(self, index: int, rng: np.random.Generator) -> dict | None:
        """Item `index` with its clip start drawn from `rng`; None (and counted) when skipped."""
        try:
            clip = _load_clip(self.paths[index], self.frames, self.fps, rng, self.min_frames)
        except _Skip as err:
            self._skip(err)
            return None
        clip = np.stack([_cover_crop(f, self.height, self.width) for f in clip])
        return {"video": _to_unit_range(clip), "caption": self.captions[index], "index": index}

    def __getitem__(self, key) -> dict | None:
        index, epoch = self._key(key)
        return self.sample(index, self.generator(index, epoch))


class ImageTextDataset(_TableDataset):
    """Images with captions; item {"image": float32 (3, H, W) in [-1, 1], "caption", "index"} or None."""

    def __init__(self, data_file: str | os.PathLike, *, resolution: int | tuple[int, int] = 256,
                 image_column: str = "path", caption_column: str = "caption", seed: int = 0):
        super().__init__(seed)
        self.data_file = Path(data_file)
        self.height, self.width = _resolution(resolution)
        rows = _read_rows(self.data_file, [image_column, caption_column], nonempty=[image_column])
        # Every suffix this Pillow build can open (some registered formats are write-only, e.g. PDF).
        suffixes = tuple(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
        self.paths = _media_paths(self.data_file, rows, image_column, suffixes, "image")
        self.captions = [row[caption_column] for _, row in rows]

    def __getitem__(self, key) -> dict | None:
        index, _ = self._key(key)  # nothing random in an image item
        path = self.paths[index]
        try:
            if not os.path.isfile(path):
                raise _Skip(MISSING, f"{path}: image not found")
            try:
                image = load_image(path, self.height, self.width)
            except MediaError as e:
                raise _Skip(CORRUPT, str(e)) from e
        except _Skip as err:
            self._skip(err)
            return None
        return {"image": image, "caption": self.captions[index], "index": index}


def collate_skip_none(batch: list[dict | None]) -> dict | None:
    """DataLoader collate: drop skipped (None) items, store how many under "skipped" (an int).

    Returns None when every item was skipped (that batch counts `len(batch)` skips).
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    out = default_collate(kept)
    out["skipped"] = len(batch) - len(kept)
    return out


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------


class ResumableSampler(Sampler):
    """Endless, shardable, resumable index stream.

    Epoch e is the permutation `default_rng([seed, e]).permutation(n)`; rank r of `world_size` takes
    every world_size-th entry starting at r, cut to n // world_size entries so every rank's epoch has
    the same length (the few left-over items differ from epoch to epoch). The state is (epoch,
    position within the rank's epoch). With `with_epoch=True` it yields (index, epoch) pairs, which the
    datasets of this module accept as keys.

    A DataLoader draws indices ahead of the training step (prefetching), so `state_dict()` runs ahead
    of what was trained on; save `state_at(samples_consumed)` instead, with the count of this rank's
    samples taken by training since the start of the stream (skipped items count: they used an index).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, *, with_epoch: bool = False):
        for name, v in (("n", n), ("world_size", world_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if n < world_size:
            raise ValueError(f"n={n} items cannot be shared among world_size={world_size} ranks")
        _check_seed(seed, 0)
        self.n, self.seed, self.rank, self.world_size = n, int(seed), rank, world_size
        self.with_epoch = with_epoch
        self.per_epoch = n // world_size
        self.epoch, self.position = 0, 0

    def _shard(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return perm[self.rank::self.world_size][: self.per_epoch]

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        shard_epoch, shard = -1, None
        while True:
            epoch = self.epoch
            if epoch != shard_epoch:
                shard_epoch, shard = epoch, self._shard(epoch)
            index = int(shard[self.position])
            # Advance before yielding: the state always names the next index (position < per_epoch),
            # so state_dict() and state_at() agree at epoch boundaries.
            self.position += 1
            if self.position == self.per_epoch:
                self.epoch, self.position = epoch + 1, 0
            yield (index, epoch) if self.with_epoch else index

    def _state(self, epoch: int, position: int) -> dict:
        return {"epoch": epoch, "position": position, "n": self.n, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size}

    def state_dict(self) -> dict:
        """State after the indices yielded so far."""
        return self._state(self.epoch, self.position)

    def state_at(self, consumed: int) -> dict:
        """State after `consumed` indices from the very start of the stream (epoch 0, position 0)."""
        if isinstance(consumed, bool) or not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"consumed must be a non-negative int, got {consumed!r}")
        return self._state(*divmod(consumed, self.per_epoch))

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; the stream's definition (n, seed, rank, world_size) must match."""
        for key in ("n", "seed", "rank", "world_size"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state.get(key)!r}, this sampler has "
                                 f"{getattr(self, key)!r}: the stream would not continue where it stopped")
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or epoch < 0 or not isinstance(position, int) \
                or not 0 <= position < self.per_epoch:
            raise ValueError(f"sampler state has an invalid epoch/position: {epoch!r}/{position!r}")
        self.epoch, self.position = epoch, position
