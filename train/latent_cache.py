"""Latent cache (`pdengine cache-latents`): encode a dataset once with the frozen VAE and text encoder.

The VAE and the text encoder never train, so their outputs can be computed once and read back by the
trainer instead of decoding videos and running both encoders every step. Caching freezes one clip per
video (the dataset's current epoch and seed); cache again with `set_epoch` for other clips.

Folder layout::

    index.json              written last: shards, counts, shapes, dtype, source, skipped, VAE scaling
    shard-00000.safetensors latents (n, C, F, h, w) (F = 1 for images), text (n, L, D),
                            source_index (n,) int64; metadata "captions" and "source_indices" (JSON)

Every file is written under a temporary name and renamed into place, and `index.json` comes last, so
a folder with an index is a complete cache.
"""

from __future__ import annotations

import bisect
import json
import operator
import os
import uuid
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from .data import DatasetError

CACHE_FORMAT = "pdengine-latent-cache"
CACHE_VERSION = 1
INDEX_NAME = "index.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"cache dtype must be one of {list(_DTYPES)}, got {dtype}")


def _replace_atomic(path: Path, write) -> None:
    # Hidden, unique and in the same folder, so os.replace is an atomic rename on one filesystem.
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir}: folder is not empty (pass overwrite=True to replace a cache)")
        if not (out_dir / INDEX_NAME).is_file():
            raise FileExistsError(f"{out_dir}: not empty and holds no {INDEX_NAME}: refusing to write a cache "
                                  "over files that are not one")
        # The old index goes first: until the new one is written the folder is not a valid cache.
        (out_dir / INDEX_NAME).unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


class _Encoder:
    """Batches items, runs the two encoders, checks shapes, hands back CPU tensors in the cache dtype."""

    def __init__(self, pipeline_like, device: torch.device, dtype: torch.dtype):
        self.pipe, self.device, self.dtype = pipeline_like, device, dtype
        self.latent_shape: tuple[int, ...] | None = None
        self.text_shape: tuple[int, ...] | None = None
        self.kind: str | None = None

    def __call__(self, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        clips = []
        for item in items:
            if "video" in item:
                kind, clip = "video", item["video"]  # (3, F, H, W)
            elif "image" in item:
                kind, clip = "image", item["image"].unsqueeze(1)  # (3, 1, H, W)
            else:
                raise ValueError(f"dataset item {item.get('index')} has neither 'video' nor 'image'")
            if self.kind is not None and kind != self.kind:
                raise ValueError("dataset mixes video and image items; cache them separately")
            self.kind = kind
            clips.append(clip)
        shapes = {tuple(c.shape) for c in clips}
        if len(shapes) != 1:
            raise ValueError(f"dataset items differ in shape {sorted(shapes)}; every item must be one size")
        clip = torch.stack(clips)  # (B, 3, F, H, W)
        b, _, f, h, w = clip.shape
        # The VAE is an image model: a video's frames are a batch of images.
        images = clip.permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w).to(self.device)
        lat = self.pipe.encode_images(images)
        if lat.ndim != 4 or lat.shape[0] != b * f:
            raise ValueError(f"encode_images returned shape {tuple(lat.shape)} for {b * f} images; "
                             "expected (N, C, h, w)")
        lat = lat.reshape(b, f, *lat.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C, F, h, w)
        text = self.pipe.encode_text([item["caption"] for item in items])
        if text.ndim != 3 or text.shape[0] != b:
            raise ValueError(f"encode_text returned shape {tuple(text.shape)} for {b} captions; expected (N, L, D)")
        for name, got in (("latent", tuple(lat.shape[1:])), ("text", tuple(text.shape[1:]))):
            want = getattr(self, f"{name}_shape")
            if want is not None and got != want:
                raise ValueError(f"{name} shape changed from {want} to {got} within one cache")
            setattr(self, f"{name}_shape", got)
        return (lat.detach().to("cpu", self.dtype).contiguous(),
                text.detach().to("cpu", self.dtype).contiguous())


def cache_latents(
    dataset: Dataset,
    pipeline_like,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 256,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Encode every item of `dataset` into safetensors shards under `out_dir`; returns `out_dir`.

    `dataset` yields {"video" (3, F, H, W) | "image" (3, H, W) in [-1, 1], "caption", "index"} or None
    (skipped: counted in the index, not fatal). `pipeline_like` provides `encode_images` (N, 3, H, W) ->
    scaled latents (N, C, h, w) and `encode_text` list[str] -> (N, L, D), as `PixelDancePipeline`
    does; its `scaling_factor` (if any) is recorded. Latents and text are stored in `dtype`.
    Raises DatasetError when no item at all could be encoded.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dtype_name = _dtype_name(dtype)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    encoder = _Encoder(pipeline_like, torch.device(device), dtype)
    skipped_before = Counter(getattr(dataset, "skipped", {}))

    shards: list[dict] = []
    lat_parts: list[torch.Tensor] = []
    text_parts: list[torch.Tensor] = []
    captions: list[str] = []
    sources: list[int] = []
    skipped_total = 0

    def flush_shard() -> None:
        name = shard_name(len(shards))
        tensors = {
            "latents": torch.cat(lat_parts),
            "text": torch.cat(text_parts),
            "source_index": torch.tensor(sources, dtype=torch.int64),
        }
        metadata = {"format": CACHE_FORMAT, "captions": json.dumps(captions),
                    "source_indices": json.dumps(sources)}
        _replace_atomic(out_dir / name, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        shards.append({"file": name, "count": len(sources)})
        for part in (lat_parts, text_parts, captions, sources):
            part.clear()

    def encode(batch: list[dict]) -> None:
        lat, text = encoder(batch)
        start = 0
        while start < len(batch):
            # Fill the open shard up to shard_size; a batch may straddle two shards.
            take = min(len(batch) - start, shard_size - len(sources))
            lat_parts.append(lat[start:start + take])
            text_parts.append(text[start:start + take])
            captions.extend(item["caption"] for item in batch[start:start + take])
            sources.extend(int(item["index"]) for item in batch[start:start + take])
            start += take
            if len(sources) == shard_size:
                flush_shard()

    indices = range(len(dataset))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="cache-latents", unit="item")
    batch: list[dict] = []
    for i in indices:
        item = dataset[i]
        if item is None:
            skipped_total += 1
            continue
        batch.append(item)
        if len(batch) == batch_size:
            encode(batch)
            batch = []
    if batch:
        encode(batch)
    if sources:
        flush_shard()
    count = sum(s["count"] for s in shards)
    if count == 0:
        raise DatasetError(f"cache-latents: none of the {len(dataset)} items could be read "
                           f"(skipped: {dict(Counter(getattr(dataset, 'skipped', {})) - skipped_before)})")

    # Reasons are known when the dataset counts them in this process (it does: no workers here).
    reasons = dict(Counter(getattr(dataset, "skipped", {})) - skipped_before)
    scaling = getattr(pipeline_like, "scaling_factor", None)
    shift = getattr(pipeline_like, "shift_factor", None)
    data_file = getattr(dataset, "data_file", None)
    index = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "kind": encoder.kind,
        "count": count,
        "shards": shards,
        "latent_shape": list(encoder.latent_shape),  # (C, F, h, w) per item
        "text_shape": list(encoder.text_shape),  # (L, D) per item
        "dtype": dtype_name,
        "source": str(Path(data_file).resolve()) if data_file is not None else None,
        "source_items": len(dataset),
        "skipped": {"total": skipped_total, "by_reason": reasons},
        "scaling_factor": float(scaling) if scaling is not None else None,
        "shift_factor": float(shift) if shift is not None else None,
        "epoch": getattr(dataset, "epoch", None),
        "seed": getattr(dataset, "seed", None),
    }
    _replace_atomic(out_dir / INDEX_NAME, lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"))
    # Shards of an overwritten, larger cache are no longer indexed: remove them.
    listed = {s["file"] for s in shards}
    for stale in out_dir.glob("shard-*.safetensors"):
        if stale.name not in listed:
            stale.unlink()
    return out_dir


def read_index(cache_dir: str | os.PathLike) -> dict:
    """Load and check a cache's index.json; raises DatasetError naming what is wrong."""
    root = Path(cache_dir)
    path = root / INDEX_NAME
    if not root.is_dir():
        raise DatasetError(f"{root}: latent cache folder not found")
    if not path.is_file():
        raise DatasetError(f"{root}: no {INDEX_NAME}; not a latent cache, or cache-latents did not finish")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
        raise DatasetError(f"{path}: not a {CACHE_FORMAT} index")
    if index.get("version") != CACHE_VERSION:
        raise DatasetError(f"{path}: cache version {index.get('version')!r}, this code reads {CACHE_VERSION}")
    for key, kind in (("shards", list), ("latent_shape", list), ("text_shape", list), ("count", int),
                      ("dtype", str)):
        if not isinstance(index.get(key), kind):
            raise DatasetError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    if len(index["latent_shape"]) != 4 or len(index["text_shape"]) != 2:
        raise DatasetError(f"{path}: latent_shape must be (C, F, h, w) and text_shape (L, D)")
    for k, shard in enumerate(index["shards"]):
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str)
                and isinstance(shard.get("count"), int) and shard["count"] > 0):
            raise DatasetError(f"{path}: shard entry {k} must be {{'file': str, 'count': int > 0}}")
        if not (root / shard["file"]).is_file():
            raise DatasetError(f"{path}: shard {shard['file']} is missing")
    if sum(s["count"] for s in index["shards"]) != index["count"]:
        raise DatasetError(f"{path}: shard counts do not add up to count={index['count']}")
    if index["count"] == 0:
        raise DatasetError(f"{path}: the cache holds no items")
    return index


class LatentCacheDataset(Dataset):
    """Items of a latent cache: {"latents" (C, F, h, w) float32, "text" (L, D) float32, "caption",
    "index" (position in the cache), "source_index" (row of the source table)}.

    Shards open lazily, one `safe_open` handle each, and only the requested row is read. A key may be
    an (index, epoch) pair like the other datasets' (the epoch is ignored: a cache holds one clip).
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(cache_dir)
        self.index = read_index(self.root)
        self.shards: list[dict] = self.index["shards"]
        self.latent_shape = tuple(self.index["latent_shape"])
        self.text_shape = tuple(self.index["text_shape"])
        self.scaling_factor = self.index.get("scaling_factor")
        self._starts: list[int] = []
        total = 0
        for shard in self.shards:
            self._starts.append(total)
            total += shard["count"]
        self._len = total
        self._open: dict[int, tuple[object, list[str], list[int]]] = {}

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict:
        # DataLoader workers get a copy without open handles; each opens its own.
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    def _shard(self, k: int) -> tuple[object, list[str], list[int]]:
        if k in self._open:
            return self._open[k]
        info = self.shards[k]
        path = self.root / info["file"]
        try:
            handle = safe_open(str(path), framework="pt")
            meta = handle.metadata() or {}
            keys = set(handle.keys())
        except (SafetensorError, OSError) as e:
            raise DatasetError(f"{path}: cannot read shard: {e}") from e
        if not {"latents", "text"} <= keys:
            raise DatasetError(f"{path}: shard lacks 'latents' and/or 'text' tensors (has {sorted(keys)})")
        n = info["count"]
        for name, shape in (("latents", self.latent_shape), ("text", self.text_shape)):
            got = tuple(handle.get_slice(name).get_shape())
            if got != (n, *shape):
                raise DatasetError(f"{path}: tensor {name!r} has shape {got}, index.json says {(n, *shape)}")
        try:
            captions = json.loads(meta["captions"])
            sources = json.loads(meta["source_indices"])
        except (KeyError, json.JSONDecodeError) as e:
            raise DatasetError(f"{path}: shard metadata lacks valid 'captions'/'source_indices' ({e})") from None
        if not (isinstance(captions, list) and len(captions) == n and isinstance(sources, list)
                and len(sources) == n):
            raise DatasetError(f"{path}: shard metadata does not list {n} captions and source indices")
        self._open[k] = (handle, captions, sources)
        return self._open[k]

    def __getitem__(self, key) -> dict:
        index = operator.index(key[0] if isinstance(key, tuple) else key)
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for a cache of {self._len} items")
        k = bisect.bisect_right(self._starts, index) - 1
        handle, captions, sources = self._shard(k)
        j = index - self._starts[k]
        return {
            "latents": handle.get_slice("latents")[j:j + 1][0].to(torch.float32),
            "text": handle.get_slice("text")[j:j + 1][0].to(torch.float32),
            "caption": captions[j],
            "index": index,
            "source_index": int(sources[j]),
        }

