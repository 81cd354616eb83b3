"""Training checkpoints: a complete PixelDance model folder plus the trainer's state, written atomically.

Layout under OUT/checkpoints/:

    step-000123/                 one complete checkpoint
        model_index.json         \\
        unet/                     |  a PixelDance model folder: `pdengine generate --model step-000123`
        vae/ text_encoder/        |  (vae/, text_encoder/, tokenizer/ are hard links to, or copies of, the
        tokenizer/ scheduler/    /    source folder's frozen parts; absent when the run has none)
        ema/                     EMA weights as a unet folder (with --ema)
        trainer_state.json       step, epoch, data position, LR schedule, config, losses, skipped counts
        trainer_state.pt         optimizer state and RNG states: tensors and plain containers only,
                                 read back with torch.load(weights_only=True) (no pickled objects)
    latest                       names the newest complete checkpoint (replaced atomically)
    .tmp-step-000124-*/          a checkpoint being written: ignored, removed by the next save
    .del-step-000120-*/          an old checkpoint being deleted: ignored, removed by the next save

A checkpoint is built in a temp folder, every file and folder fsynced, then renamed into place (an
atomic step on POSIX), then `latest` is replaced, and only then are checkpoints beyond the last `keep`
deleted (renamed to `.del-*` first, so a half-deleted one is never mistaken for a complete one). A kill at
any point leaves the previous checkpoint usable; `latest_checkpoint` returns the newest complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"
EMA_DIR = "ema"
FROZEN_PARTS = ("vae", "text_encoder", "tokenizer")
_STEP_RE = re.compile(r"^step-(\d+)$")
# Files whose presence makes a step-* folder a complete checkpoint (it only gets that name once complete;
# this also catches a folder someone copied in by hand, half done).
_REQUIRED = (STATE_JSON, STATE_PT, "model_index.json", "unet/config.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the folder and the problem."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoints_dir(out: str | os.PathLike) -> Path:
    return Path(out) / CHECKPOINTS_DIR


def is_complete(path: Path) -> bool:
    return _STEP_RE.match(path.name) is not None and all((path / f).is_file() for f in _REQUIRED)


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), oldest first."""
    root = checkpoints_dir(out)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None. The highest step wins even when `latest` lags behind
    (a kill between the rename and the pointer update): the rename only happens once it is complete."""
    found = list_checkpoints(out)
    return found[-1][1] if found else None


# ---------------------------------------------------------------------------------------------- writing


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder bottom-up, so the data is on disk before the rename."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file by temp + fsync + replace, then fsync its folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _link_or_copy(src: str, dst: str) -> str:
    # Frozen parts never change during a run: a hard link costs no space per checkpoint. Across file
    # systems (or where links are not allowed) a copy is the only way.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _pdengine_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pixeldance-engine")
    except PackageNotFoundError:
        return "unknown"


def model_index(parts_source: Path | None, scheduler_class: str, extra: dict[str, Any] | None = None) -> dict:
    """model_index.json of a PixelDance folder; the frozen parts' entries are taken from the source folder's
    index when it has one (so their classes stay what they were)."""
    import diffusers

    src_index: dict[str, Any] = {}
    if parts_source is not None and (parts_source / "model_index.json").is_file():
        src_index = json.loads((parts_source / "model_index.json").read_text())
    index: dict[str, Any] = {
        "_class_name": "PixelDancePipeline",
        "_diffusers_version": diffusers.__version__,
        "_pdengine_version": _pdengine_version(),
        "unet": ["pdengine", "UNet3D"],
        "scheduler": ["diffusers", scheduler_class],
    }
    defaults = {"vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"]}
    if parts_source is not None:
        for part in FROZEN_PARTS:
            if (parts_source / part).is_dir():
                index[part] = src_index.get(part, defaults[part])
    index.update(extra or {})
    return index


def write_model_folder(dst: Path, unet, parts_source: Path | None, scheduler_config: dict[str, Any],
                       extra_index: dict[str, Any] | None = None) -> Path:
    """Write `unet` (via save_pretrained), the frozen parts of `parts_source`, the scheduler config and
    model_index.json into `dst` (created). Not atomic by itself: callers build into a temp folder."""
    dst.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(dst / "unet")
    if parts_source is not None:
        for part in FROZEN_PARTS:
            if (parts_source / part).is_dir():
                shutil.copytree(parts_source / part, dst / part, copy_function=_link_or_copy)
    (dst / "scheduler").mkdir(exist_ok=True)
    sched = {k: v for k, v in scheduler_config.items()}
    sched.setdefault("_class_name", "DDIMScheduler")
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    index = model_index(parts_source, sched["_class_name"], extra_index)
    (dst / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return dst


def write_final(out: str | os.PathLike, write: Callable[[Path], None], name: str = "final") -> Path:
    """Build OUT/<name>/ with `write(folder)` in a temp folder, fsync, and swap it into place."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=out))
    try:
        write(tmp)
        _fsync_tree(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".del-{name}-", dir=out))
            os.replace(target, old / name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
        _fsync_path(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def save_checkpoint(out: str | os.PathLike, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Write checkpoint `step` atomically: `write(folder)` fills a temp folder (the model folder, ema/,
    trainer_state.*), which is fsynced and renamed to step-NNNNNN; then `latest` is replaced; then all
    but the newest `keep` checkpoints are deleted. Returns the new checkpoint folder."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    name = checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        write(tmp)
        missing = [f for f in _REQUIRED if not (tmp / f).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {name}: the writer left out {missing}")
        _fsync_tree(tmp)
        target = root / name
        if target.exists():
            # Only possible when a run is redone from an older checkpoint: retire the stale one first.
            _retire(target)
        os.replace(tmp, target)
        _fsync_path(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    atomic_write_text(root / LATEST_NAME, name + "\n")
    for _, old in list_checkpoints(out)[:-keep]:
        _retire(old)
    _remove_leftovers(root)
    return target


def _retire(path: Path) -> None:
    """Delete a checkpoint so that a kill midway never leaves a half-deleted step-* folder."""
    trash = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash)


def _remove_leftovers(root: Path) -> None:
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".del-")) and p.is_dir():
            shutil.rmtree(p)


# ---------------------------------------------------------------------------------------------- reading


def load_trainer_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state.json, trainer_state.pt) of a checkpoint; the .pt is read with weights_only=True."""
    import pickle

    import torch

    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (it needs {', '.join(_REQUIRED)})")
    try:
        state = json.loads((path / STATE_JSON).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / STATE_JSON} is not valid JSON ({e})") from None
    try:
        tensors = torch.load(path / STATE_PT, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        # weights_only=True refuses anything but tensors and plain containers (no code runs on load).
        raise CheckpointError(f"cannot read {path / STATE_PT}: {e}") from e
    return state, tensors
