"""`pdengine eval`: how well a PixelDance model follows its three instructions, on the held-out split of a
`pdengine data synth` set, measured against the rendered ground truth.

Every metric is a plain function on uint8 frames (F, H, W, 3) and a clip's ground truth dict (the
`videos/<id>.json` of `train/synth.py`; positions in pixels, pixel (i, j) centred at (j + 0.5, i + 0.5)).
Thresholds are module constants; lengths are fractions of the frame side so they scale with resolution.

Metric definitions (per video, then averaged over videos):
- first_frame_psnr: 10 log10(255^2 / MSE) of generated frame 0 against the first-frame instruction, over
  all pixels and channels; identical frames give PSNR_MAX_DB instead of infinity (JSON and means stay finite).
- object tracking (`object_stats`): pixels whose RGB Euclidean distance to the object's colour is below
  COLOUR_THRESHOLD; the largest 4-connected blob; its centroid (x, y), pixel count (area) and mean colour.
  A frame with no blob of at least MIN_PIXELS pixels has NaN centre/area ("object lost").
- text following (`follows_text`), with d_min = MIN_TRAVEL x frame side:
  move: net displacement c[F-1] - c[0] has a component along the captioned direction >= d_min that exceeds
  the component across it; bounce: along x or y, some frame k is beyond both ends on the same side by >= d_min,
  i.e. max_k max(min(p_k - p_0, p_k - p_end), min(p_0 - p_k, p_end - p_k)) >= d_min (a reversal);
  grow / shrink: area[F-1] / area[0] >= AREA_TREND, resp. <= 1 / AREA_TREND;
  pan: the summed phase-correlation shifts of consecutive frames (the content's motion) point opposite to
  the camera by >= d_min and exceed their vertical part. A lost object in frame 0 or F-1 fails (pan aside).
  `motion_accuracy` is the share of videos that follow their text.
- last_frame_error_px: Euclidean distance between the tracked centre in the last frame and the ground truth's
  last centre (the last-frame instruction's); a lost object counts as the frame diagonal.
- colour_kept: share of frames where the object is found and its blob's mean colour is within COLOUR_TOL of
  the object colour. shape_kept: share of consecutive frame pairs where the object is found in both and its
  area ratio matches the ground truth's within AREA_JUMP: |(a[k+1] / a[k]) / (A[k+1] / A[k]) - 1| <= AREA_JUMP
  (the ground truth's ratio is 1 except for grow / shrink).
- background_flicker: mean |frame[k+1] - frame[k]| (0-255 levels, all channels) over background pixels, i.e.
  outside discs around the object (ground truth and tracked) in both frames; static-camera clips only
  (NaN for pans).

The command samples each held-out clip with its own first and last frames (decoded from its mp4) and its
caption, once per tau (same seed and noise for every tau), and scores the generated frames. It also
scores the held-out videos themselves ("reference": what a perfect model would get after mp4 coding) and
reports the PSNR of a VAE round trip of the first frames (the best first-frame PSNR the model's VAE allows).

Held-out denoising loss (`heldout_loss`): the model's own training objective (its prediction type, MSE) on
the held-out clips' VAE latents, at the fixed timesteps LOSS_TIMESTEPS with fixed noise (clip i's drawn from
seed + i, the same for every variant), the instructions given clean as at sampling: with first and last
frame ("first_last", tau = T) and first frame only ("first_only", tau = 0); with the caption, the empty prompt, and the opposite caption (`opposite_caption`:
the other direction of a move or pan, shrinks for grows; bounces and stills have none). Lower is better. It
shows what sampling metrics hide at a small scale: whether a model reads its text at all (empty prompt above
caption) and whether it reads the direction words (opposite caption above caption).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import click
import numpy as np

PSNR_MAX_DB = 100.0
COLOUR_THRESHOLD = 60.0  # RGB distance: synthetic object colours are > 85 away from every background
MIN_PIXELS = 4
MIN_TRAVEL = 0.05  # frame sides (3.2 px at 64): the generator's travels are >= 0.1 frame sides
AREA_TREND = 1.2  # the generator's grow/shrink area factor is >= 1.4^2
COLOUR_TOL = 30.0
AREA_JUMP = 0.25
_UNIT = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink", "shrink": "grow"}
LOSS_TIMESTEPS = (100, 300, 500, 700, 900)  # of the 1000-step training schedule


class EvalError(ValueError):
    """Bad input to the evaluation (data folder, model, settings)."""


# ---------------------------------------------------------------------------------------------
# Metrics on arrays
# ---------------------------------------------------------------------------------------------


def _check_video(frames: np.ndarray, name: str = "video") -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3:
        raise EvalError(f"{name}: expected an array (F, H, W, 3), got {getattr(frames, 'shape', type(frames))}")
    if frames.shape[0] == 0:
        raise EvalError(f"{name}: no frames")
    return frames


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8-range images of the same shape; PSNR_MAX_DB when they are identical."""
    if a.shape != b.shape:
        raise EvalError(f"psnr: shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_MAX_DB
    return min(PSNR_MAX_DB, 10.0 * math.log10(255.0**2 / mse))


def first_frame_psnr(video: np.ndarray, first_frame: np.ndarray) -> float:
    """PSNR (dB) of generated frame 0 against the first-frame instruction (H, W, 3)."""
    return psnr(_check_video(video)[0], first_frame)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a 2D boolean mask (the first in raster order on ties)."""
    h, w = mask.shape
    label = np.full(h * w, -1, dtype=np.int64)
    flat = mask.reshape(-1)
    best, best_size = -1, 0
    for start in np.flatnonzero(flat):
        if label[start] >= 0:
            continue
        label[start] = start
        size, queue = 0, deque([start])
        while queue:  # breadth-first flood fill: masks are small (one object's pixels)
            p = queue.popleft()
            size += 1
            r, c = divmod(int(p), w)
            for q, ok in ((p - w, r > 0), (p + w, r < h - 1), (p - 1, c > 0), (p + 1, c < w - 1)):
                if ok and flat[q] and label[q] < 0:
                    label[q] = start
                    queue.append(q)
        if size > best_size:
            best, best_size = start, size
    return (label == best).reshape(h, w) if best >= 0 else np.zeros_like(mask, dtype=bool)


def object_stats(frames: np.ndarray, colour_rgb: Sequence[float], *, threshold: float = COLOUR_THRESHOLD,
                 min_pixels: int = MIN_PIXELS) -> dict[str, np.ndarray]:
    """Colour-segmented object per frame: {"centre": (F, 2) x, y; "area": (F,) pixels; "colour": (F, 3)
    mean RGB of the blob; "found": (F,) bool}. NaN where the object is not found."""
    frames = _check_video(frames)
    f, h, w, _ = frames.shape
    target = np.asarray(colour_rgb, dtype=np.float64)
    dist = np.sqrt(((frames.astype(np.float64) - target) ** 2).sum(-1))
    centre = np.full((f, 2), np.nan)
    area = np.full(f, np.nan)
    colour = np.full((f, 3), np.nan)
    found = np.zeros(f, dtype=bool)
    xs, ys = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    for k in range(f):
        blob = largest_component(dist[k] < threshold)
        n = int(blob.sum())
        if n < min_pixels:
            continue
        found[k] = True
        centre[k] = xs[blob].mean(), ys[blob].mean()
        area[k] = n
        colour[k] = frames[k][blob].astype(np.float64).mean(0)
    return {"centre": centre, "area": area, "colour": colour, "found": found}


def track_object(frames: np.ndarray, colour_rgb: Sequence[float], *, threshold: float = COLOUR_THRESHOLD,
                 min_pixels: int = MIN_PIXELS) -> np.ndarray:
    """Per-frame centre (F, 2) as (x, y) pixels of the object of colour `colour_rgb`; NaN where not found."""
    return object_stats(frames, colour_rgb, threshold=threshold, min_pixels=min_pixels)["centre"]


def phase_shift(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Displacement (dx, dy) in pixels of the content of frame `a` in frame `b` (phase correlation with a
    Hann window and a parabolic sub-pixel peak)."""
    ga = a.astype(np.float64).mean(-1)
    gb = b.astype(np.float64).mean(-1)
    h, w = ga.shape
    window = np.outer(np.hanning(h), np.hanning(w))  # damps the frame borders, which do not shift
    fa = np.fft.fft2((ga - ga.mean()) * window)
    fb = np.fft.fft2((gb - gb.mean()) * window)
    cross = fb * np.conj(fa)
    r = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real
    py, px = np.unravel_index(int(np.argmax(r)), r.shape)

    def refine(m1: float, m0: float, p1: float) -> float:
        denom = m1 - 2 * m0 + p1
        return 0.0 if denom == 0 else 0.5 * (m1 - p1) / denom

    dx = px + refine(r[py, (px - 1) % w], r[py, px], r[py, (px + 1) % w])
    dy = py + refine(r[(py - 1) % h, px], r[py, px], r[(py + 1) % h, px])
    # The correlation is circular: peaks past the middle are negative shifts.
    return float((dx + w / 2) % w - w / 2), float((dy + h / 2) % h - h / 2)


def background_shifts(frames: np.ndarray) -> np.ndarray:
    """(F - 1, 2) content displacement between consecutive frames (`phase_shift`)."""
    frames = _check_video(frames)
    return np.array([phase_shift(frames[k], frames[k + 1]) for k in range(len(frames) - 1)]).reshape(-1, 2)


def _exclusion(h: int, w: int, centres: list[tuple[np.ndarray, float]]) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    out = np.zeros((h, w), dtype=bool)
    for (x, y), radius in centres:
        if np.isfinite(x) and np.isfinite(y) and np.isfinite(radius):
            out |= (xs - x) ** 2 + (ys - y) ** 2 <= radius**2
    return out


def background_flicker(frames: np.ndarray, truth: dict, stats: dict[str, np.ndarray]) -> float:
    """Mean |frame[k+1] - frame[k]| over background pixels of static-camera clips; NaN for pans.

    Background excludes discs around the object in both frames of a pair: radius 1.5 x (its farthest
    point, sqrt(2) s for a square) + 2 px around the ground-truth centre, and 2 x the blob's equivalent
    radius + 2 px around the tracked centre (a generated object may sit elsewhere).
    """
    frames = _check_video(frames)
    if truth["motion"] == "pan" or len(frames) < 2:
        return float("nan")
    f, h, w, _ = frames.shape
    diffs = []
    for k in range(f - 1):
        discs = []
        for j in (k, k + 1):
            discs.append((np.asarray(truth["centre"][j]), 1.5 * math.sqrt(2.0) * truth["half_extent"][j] + 2.0))
            discs.append((stats["centre"][j], 2.0 * math.sqrt(stats["area"][j] / math.pi) + 2.0))
        keep = ~_exclusion(h, w, discs)
        if not keep.any():
            continue
        d = np.abs(frames[k + 1].astype(np.float64) - frames[k].astype(np.float64)).mean(-1)
        diffs.append(float(d[keep].mean()))
    return float(np.mean(diffs)) if diffs else float("nan")


def measure_video(frames: np.ndarray, truth: dict) -> dict[str, np.ndarray]:
    """Everything the metrics need from one video: `object_stats` plus "bg_shift" (F - 1, 2) and "flicker"."""
    frames = _check_video(frames)
    if len(frames) != truth["frames"] or frames.shape[1:3] != (truth["size"], truth["size"]):
        raise EvalError(f"video of shape {frames.shape[:3]} does not match its ground truth "
                        f"({truth['frames']} frames of {truth['size']}x{truth['size']})")
    stats = object_stats(frames, truth["rgb"])
    stats["bg_shift"] = background_shifts(frames)
    stats["flicker"] = np.float64(background_flicker(frames, truth, stats))
    return stats


def follows_text(measure: dict[str, np.ndarray], truth: dict) -> bool:
    """Whether the measured video moves the way its caption says (definitions in the module docstring)."""
    d_min = MIN_TRAVEL * truth["size"]
    motion = truth["motion"]
    if motion == "pan":
        s = measure["bg_shift"].sum(0)
        along = -s[0] if truth["direction"] == "right" else s[0]  # content moves opposite to the camera
        return bool(along >= d_min and along > abs(s[1]))
    c, area = measure["centre"], measure["area"]
    if not (np.isfinite(c[0]).all() and np.isfinite(c[-1]).all()):
        return False
    if motion == "move":
        d = c[-1] - c[0]
        ux, uy = _UNIT[truth["direction"]]
        along, across = d[0] * ux + d[1] * uy, abs(d[0] * uy - d[1] * ux)
        return bool(along >= d_min and along > across)
    if motion == "bounce":
        for axis in (0, 1):
            p = c[:, axis]
            out = np.maximum(np.minimum(p - p[0], p - p[-1]), np.minimum(p[0] - p, p[-1] - p))
            if np.nanmax(out) >= d_min:
                return True
        return False
    if motion in ("grow", "shrink"):
        ratio = area[-1] / area[0]
        return bool(ratio >= AREA_TREND if motion == "grow" else ratio <= 1.0 / AREA_TREND)
    raise EvalError(f"unknown motion {motion!r} in the ground truth")


def motion_accuracy(tracks: Sequence[dict[str, np.ndarray]], truths: Sequence[dict]) -> float:
    """Share (0-1) of videos whose measured motion (`measure_video`) follows the caption."""
    if len(tracks) != len(truths) or not tracks:
        raise EvalError(f"motion_accuracy needs as many tracks as truths, at least one ({len(tracks)}/{len(truths)})")
    return float(np.mean([follows_text(m, t) for m, t in zip(tracks, truths)]))


def last_frame_error_px(track: np.ndarray, truth_last_position: Sequence[float],
                        penalty: float | None = None) -> float:
    """Distance (px) from the tracked centre in the last frame of `track` (F, 2) to the true last centre;
    `penalty` (NaN if None) when the object is lost in that frame."""
    last = np.asarray(track, dtype=np.float64).reshape(-1, 2)[-1]
    if not np.isfinite(last).all():
        return float("nan") if penalty is None else float(penalty)
    return float(np.hypot(*(last - np.asarray(truth_last_position, dtype=np.float64))))


def colour_kept(measure: dict[str, np.ndarray], colour_rgb: Sequence[float], tol: float = COLOUR_TOL) -> float:
    """Share of frames where the object is found with mean colour within `tol` of `colour_rgb`."""
    dist = np.linalg.norm(measure["colour"] - np.asarray(colour_rgb, dtype=np.float64), axis=1)
    return float(np.mean(measure["found"] & (np.nan_to_num(dist, nan=np.inf) <= tol)))


def shape_kept(measure: dict[str, np.ndarray], truth: dict, jump: float = AREA_JUMP) -> float:
    """Share of consecutive frame pairs whose area ratio matches the ground truth's within `jump`."""
    a, ref = measure["area"], np.asarray(truth["area"], dtype=np.float64)
    if len(a) < 2:
        return 1.0
    rel = (a[1:] / a[:-1]) / (ref[1:] / ref[:-1])
    return float(np.mean(np.nan_to_num(np.abs(rel - 1.0), nan=np.inf) <= jump))


def score_video(video: np.ndarray, truth: dict, first_frame: np.ndarray | None = None) -> dict:
    """Every per-video metric of one video against its ground truth (and first-frame instruction)."""
    m = measure_video(video, truth)
    diagonal = math.hypot(video.shape[1], video.shape[2])
    return {
        "id": truth.get("id"),
        "motion": truth["motion"],
        "first_frame_psnr": first_frame_psnr(video, first_frame) if first_frame is not None else float("nan"),
        "follows_text": follows_text(m, truth),
        "last_frame_error_px": last_frame_error_px(m["centre"], truth["centre"][-1], penalty=diagonal),
        "colour_kept": colour_kept(m, truth["rgb"]),
        "shape_kept": shape_kept(m, truth),
        "background_flicker": float(m["flicker"]),
        "object_found": float(np.mean(m["found"])),
    }


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def aggregate(records: Sequence[dict]) -> dict:
    """Means over `score_video` records; motion accuracy overall and per motion kind."""
    if not records:
        raise EvalError("no videos to aggregate")
    out = {"videos": len(records)}
    for key in ("first_frame_psnr", "last_frame_error_px", "colour_kept", "shape_kept", "background_flicker",
                "object_found"):
        out[key] = _nanmean([r[key] for r in records])
    out["motion_accuracy"] = float(np.mean([r["follows_text"] for r in records]))
    kinds = sorted({r["motion"] for r in records})
    out["motion_accuracy_by_kind"] = {
        k: float(np.mean([r["follows_text"] for r in records if r["motion"] == k])) for k in kinds
    }
    return out


# ---------------------------------------------------------------------------------------------
# The evaluation run
# ---------------------------------------------------------------------------------------------


def demo_model_dir() -> Path:
    """The shipped demo model's folder (`--model demo`)."""
    from pdengine.engine.generate import GenerateError
    from pdengine.engine.generate import demo_model_dir as shipped

    try:
        return shipped()
    except GenerateError as e:
        raise EvalError(str(e)) from None


def resolve_model(name: str) -> Path:
    if name == "demo":
        return demo_model_dir()
    from pdengine.engine.pipeline import check_model_folder

    path = Path(name).expanduser()
    check_model_folder(path)
    return path


def parse_taus(values: Sequence[str], steps: int) -> list[int]:
    """tau values as step counts: integers, "T" (all steps) or "T/2"; sorted, without repeats."""
    out = set()
    for value in values:
        for item in str(value).split(","):
            item = item.strip()
            if item == "T":
                tau = steps
            elif item == "T/2":
                tau = steps // 2
            else:
                try:
                    tau = int(item)
                except ValueError:
                    raise EvalError(f"--tau {item!r}: expected an integer, T or T/2") from None
            if not 0 <= tau <= steps:
                raise EvalError(f"--tau {item!r} = {tau} is outside [0, steps = {steps}]")
            out.add(tau)
    if not out:
        raise EvalError("no --tau value given")
    return sorted(out)


def load_heldout(data: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Held-out clips of a synthetic set: [{"id", "path" (absolute), "caption", "truth"}]."""
    root = Path(data)
    table = root / "heldout.csv"
    if not table.is_file():
        raise EvalError(f"--data {root}: no heldout.csv (make the set with `pdengine data synth`)")
    with open(table, newline="", encoding="utf-8") as fp:
        rows = list(csv.DictReader(fp))
    if not rows:
        raise EvalError(f"{table}: no held-out clips")
    missing = {"id", "path", "caption"} - set(rows[0])
    if missing:
        raise EvalError(f"{table}: missing column(s) {sorted(missing)}")
    if limit is not None:
        if limit < 1:
            raise EvalError(f"--limit must be >= 1, got {limit}")
        rows = rows[:limit]
    clips = []
    for row in rows:
        video = root / row["path"]
        truth_path = video.with_suffix(".json")
        if not video.is_file() or not truth_path.is_file():
            raise EvalError(f"{table}: clip {row['id']}: {video} or its ground truth {truth_path.name} is missing")
        truth = json.loads(truth_path.read_text(encoding="utf-8"))
        clips.append({"id": row["id"], "path": video, "caption": row["caption"], "truth": truth})
    sizes = {(c["truth"]["frames"], c["truth"]["size"]) for c in clips}
    if len(sizes) != 1:
        raise EvalError(f"--data {root}: clips of different frame counts/sizes {sorted(sizes)}")
    return clips


def frame_to_tensor(frame: np.ndarray):  # -> torch.Tensor
    """A uint8 frame (H, W, 3) as the pipeline's image instruction: float32 (3, H, W) in [-1, 1]."""
    import torch

    return torch.from_numpy(frame.copy()).permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0


def opposite_caption(truth: dict) -> str | None:
    """The caption of the same clip with the opposite motion (a move or pan the other way, grows for
    shrinks and back), written by the generator's own `caption`; None where the caption names no direction."""
    from dataclasses import replace

    from .synth import ClipSpec, caption

    spec = truth.get("spec")
    motion = truth.get("motion")
    if spec is None or motion not in ("move", "pan", "grow", "shrink"):
        return None
    spec = ClipSpec.from_dict(spec)
    if motion in ("grow", "shrink"):
        return caption(replace(spec, motion=_OPPOSITE[motion]))
    return caption(replace(spec, direction=_OPPOSITE[spec.direction]))


def heldout_loss(pipe, latents, captions: Sequence[str], opposites: Sequence[str | None], *, seed: int = 0,
                 batch_size: int = 8) -> dict:
    """The training objective on held-out latents (B, C, F, h, w), see the module docstring. Returns
    {"prediction_type", "timesteps", "opposite_clips": n, "first_last" / "first_only": {"caption",
    "empty_prompt", "opposite", "caption_on_opposite_clips"}} (means over clips and timesteps; the two
    opposite entries are over the n clips that have an opposite caption, None when n = 0)."""
    import torch

    from pdengine.engine.conditioning import build_c_image
    from pdengine.engine.schedulers import load_scheduler

    from .recipe import PREDICTION_TYPES, regression_target

    b, _, f = latents.shape[:3]
    if len(captions) != b or len(opposites) != b:
        raise EvalError(f"heldout_loss: {b} clips but {len(captions)} captions and {len(opposites)} opposites")
    prediction = pipe.scheduler_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise EvalError(f"heldout_loss: prediction type {prediction!r} is not one the trainer uses")
    abar = load_scheduler(pipe.scheduler_config, kind="ddpm").alphas_cumprod.float()
    if max(LOSS_TIMESTEPS) >= abar.shape[0]:
        raise EvalError(f"heldout_loss: the schedule has {abar.shape[0]} steps, fewer than {max(LOSS_TIMESTEPS) + 1}")
    flip = [i for i, o in enumerate(opposites) if o is not None]
    z0 = latents.float().cpu()

    def noise(rows: list[int]) -> torch.Tensor:  # (len(LOSS_TIMESTEPS), n, C, F, h, w): clip i's from seed + i
        draws = [torch.randn((len(LOSS_TIMESTEPS), *z0.shape[1:]), generator=torch.Generator().manual_seed(seed + i))
                 for i in rows]
        return torch.stack(draws, dim=1)

    def per_clip(keep_last: bool, prompts: list[str], rows: list[int]) -> torch.Tensor:
        """Loss per clip of `rows` (mean over timesteps and elements), each with its prompt."""
        out = torch.zeros(len(rows))
        for s in range(0, len(rows), batch_size):
            idx = rows[s:s + batch_size]
            x0 = z0[idx]
            c_image = build_c_image(x0[:, :, 0], x0[:, :, -1] if keep_last else None, f)
            text = pipe.encode_text(prompts[s:s + batch_size])
            for t, eps in zip(LOSS_TIMESTEPS, noise(idx)):
                a = abar[t]
                z_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
                target = regression_target(x0, eps, a, prediction)
                x = torch.cat([z_t, c_image], dim=1).to(pipe.device, pipe.dtype)
                steps = torch.full((len(idx),), t, dtype=torch.long, device=pipe.device)
                pred = pipe.unet(x, steps, text.to(pipe.device, pipe.dtype)).float().cpu()
                out[s:s + len(idx)] += ((pred - target) ** 2).flatten(1).mean(1) / len(LOSS_TIMESTEPS)
        return out

    result: dict = {"prediction_type": prediction, "timesteps": list(LOSS_TIMESTEPS), "opposite_clips": len(flip)}
    everyone = list(range(b))
    with torch.no_grad():
        for name, keep_last in (("first_last", True), ("first_only", False)):
            cap = per_clip(keep_last, list(captions), everyone)
            entry = {"caption": float(cap.mean()), "empty_prompt": float(per_clip(keep_last, [""] * b, everyone).mean()),
                     "opposite": None, "caption_on_opposite_clips": None}
            if flip:
                entry["opposite"] = float(per_clip(keep_last, [opposites[i] for i in flip], flip).mean())
                entry["caption_on_opposite_clips"] = float(cap[flip].mean())
            result[name] = entry
    return result


def _pick(device: str | None, dtype: str) -> tuple[str, object]:
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: CUDA is not available on this machine")
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def evaluate(model: str, data: str | os.PathLike, *, limit: int | None = None, taus: Sequence[str] = ("0", "T/2", "T"),
             steps: int = 50, guidance: float | None = None, seed: int = 0, batch_size: int = 8, device: str | None = None,
             dtype: str = "auto", save: str | os.PathLike | None = None,
             log: Callable[[str], None] | None = None) -> dict:
    """Sample the held-out clips once per tau and score them; returns the result (see `format_table`).
    `guidance` None: the model folder's (`sample_defaults`)."""
    import torch

    from pdengine.engine.generate import sample_defaults
    from pdengine.engine.media import frames_to_uint8, read_video, write_video
    from pdengine.engine.pipeline import PixelDancePipeline, SampleSettings

    if steps < 1 or batch_size < 1:
        raise EvalError(f"--steps and --batch-size must be >= 1, got {steps} and {batch_size}")
    tau_list = parse_taus(taus, steps)
    clips = load_heldout(data, limit)
    model_dir = resolve_model(model)
    if guidance is None:
        guidance = sample_defaults(str(model_dir))["guidance"]
    device, torch_dtype = _pick(device, dtype)
    log = log or (lambda m: None)
    started = time.perf_counter()

    videos = [read_video(c["path"]) for c in clips]
    frames, size = clips[0]["truth"]["frames"], clips[0]["truth"]["size"]
    for c, v in zip(clips, videos):
        if v.shape[:3] != (frames, size, size):
            raise EvalError(f"{c['path']}: decoded shape {v.shape[:3]} differs from its ground truth")
    reference = aggregate([score_video(v, c["truth"], v[0]) for c, v in zip(clips, videos)])

    pipe = PixelDancePipeline.from_pretrained(model_dir, device=device, dtype=torch_dtype)

    firsts = [frame_to_tensor(v[0]) for v in videos]
    lasts = [frame_to_tensor(v[-1]) for v in videos]
    # Every held-out frame's latent, once: frame 0's give the VAE round trip, all give the held-out loss.
    latents = torch.cat([pipe.encode_images(torch.stack([frame_to_tensor(fr) for fr in v])).permute(1, 0, 2, 3)[None]
                         for v in videos])
    roundtrip = []
    for i in range(0, len(clips), batch_size):
        dec = pipe.decode(latents[i:i + batch_size, :, :1])  # (B, 3, 1, H, W)
        for b in range(dec.shape[0]):
            roundtrip.append(psnr(frames_to_uint8(dec[b].permute(1, 0, 2, 3))[0], videos[i + b][0]))

    loss = heldout_loss(pipe, latents, [c["caption"] for c in clips], [opposite_caption(c["truth"]) for c in clips],
                        seed=seed, batch_size=batch_size)
    log("held-out loss: done")

    by_tau = {}
    for tau in tau_list:
        settings = SampleSettings(num_frames=frames, height=size, width=size, steps=steps, guidance=guidance, tau=tau)
        records = []
        for i in range(0, len(clips), batch_size):
            batch = clips[i:i + batch_size]
            out = pipe.generate([c["caption"] for c in batch], firsts[i:i + batch_size], lasts[i:i + batch_size],
                                [seed + i + j for j in range(len(batch))], settings)
            for j, c in enumerate(batch):
                gen = frames_to_uint8(out[j].permute(1, 0, 2, 3))
                rec = score_video(gen, c["truth"], videos[i + j][0])
                records.append({**rec, "caption": c["caption"]})
                if save is not None:
                    write_video(gen, Path(save) / f"{c['id']}_tau{tau}.mp4", "mp4", c["truth"].get("fps", 4.0))
            log(f"tau={tau}: {min(i + batch_size, len(clips))}/{len(clips)} clips")
        by_tau[str(tau)] = {**aggregate(records), "per_video": records}

    head = by_tau[str(tau_list[-1])]
    result = {
        "model": str(model_dir), "data": str(Path(data)), "videos": len(clips), "frames": frames, "size": size,
        "steps": steps, "guidance": guidance, "seed": seed, "device": device, "dtype": str(torch_dtype).split(".")[-1],
        "taus": tau_list, "headline_tau": tau_list[-1],
        **{k: v for k, v in head.items() if k != "per_video"},
        "last_frame_error_px_by_tau": {t: r["last_frame_error_px"] for t, r in by_tau.items()},
        "motion_accuracy_by_tau": {t: r["motion_accuracy"] for t, r in by_tau.items()},
        "vae_roundtrip_psnr": float(np.mean(roundtrip)),
        "heldout_loss": loss,
        "reference": reference,
        "by_tau": by_tau,
        "seconds": time.perf_counter() - started,
    }
    return result


_COLUMNS = (("first_frame_psnr", "first-frame PSNR (dB)", "{:.2f}"), ("motion_accuracy", "motion acc.", "{:.3f}"),
            ("last_frame_error_px", "last-frame err (px)", "{:.2f}"), ("colour_kept", "colour kept", "{:.3f}"),
            ("shape_kept", "shape kept", "{:.3f}"), ("background_flicker", "bg flicker", "{:.2f}"),
            ("object_found", "object found", "{:.3f}"))


def format_table(result: dict) -> str:
    """Markdown table: one row per tau, and a reference row (the held-out videos themselves)."""
    def cells(scores: dict) -> list[str]:
        return ["n/a" if scores[k] is None or math.isnan(scores[k]) else fmt.format(scores[k])
                for k, _, fmt in _COLUMNS]

    header = ["run", "tau", *(title for _, title, _ in _COLUMNS)]
    rows = [["held-out videos (mp4)", "-", *cells(result["reference"])]]
    for tau, scores in result["by_tau"].items():
        rows.append([Path(result["model"]).name, f"{tau}/{result['steps']}", *cells(scores)])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append(f"\nVAE round trip of the first frames: {result['vae_roundtrip_psnr']:.2f} dB PSNR; "
                 f"{result['videos']} held-out clips, {result['steps']} DDIM steps, guidance {result['guidance']}.")
    if result.get("heldout_loss"):
        lines += ["", loss_table({Path(result["model"]).name: result})]
    return "\n".join(lines)


def loss_table(results: dict[str, dict]) -> str:
    """Markdown table of the held-out denoising loss of one or more eval results (name -> result)."""
    def num(x) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    lines = ["| model | instructions | caption | empty prompt | opposite caption | caption, same clips |",
             "|---|---|---|---|---|---|"]
    for name, res in results.items():
        loss = res["heldout_loss"]
        for key, label in (("first_last", "first + last"), ("first_only", "first only")):
            e = loss[key]
            lines.append(f"| {name} | {label} | {num(e['caption'])} | {num(e['empty_prompt'])} | {num(e['opposite'])} | "
                         f"{num(e['caption_on_opposite_clips'])} |")
    first = next(iter(results.values()))["heldout_loss"]
    lines.append(f"\nHeld-out denoising loss ({first['prediction_type']} MSE, t = "
                 f"{', '.join(map(str, first['timesteps']))}, fixed noise; lower is better); the opposite caption "
                 f"(the other direction, or grows for shrinks) on the {first['opposite_clips']} clips that have one.")
    return "\n".join(lines)


def _json_safe(x):
    """NaN/inf become null (strict JSON); containers are converted recursively."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_json(result: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# CLI (registered by engine/cli.py; module level imports only click, numpy and the stdlib)
# ---------------------------------------------------------------------------------------------

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


@click.command("eval", context_settings=CONTEXT)
@click.option("--model", default="demo", help="PixelDance model folder, or 'demo' (the shipped demo model).")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="A `pdengine data synth` folder.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results here as JSON.")
@click.option("--limit", type=int, help="Only the first N held-out clips.  [default: all]")
@click.option("--tau", "taus", multiple=True, default=("0", "T/2", "T"),
              help="Last-frame steps to evaluate: integers, T (= steps) or T/2 (repeatable or comma-separated).")
@click.option("--steps", default=50, help="DDIM steps T.")
@click.option("--guidance", type=float, help="Classifier-free guidance scale on the text (<= 1: off).  "
                                             "[default: the model's, else 7.5]")
@click.option("--seed", default=0, help="Clip i is sampled with seed + i (the same for every tau).")
@click.option("--batch-size", default=8, help="Clips sampled together.")
@click.option("--device", help="cpu, cuda, cuda:1 ...  [default: cuda if available]")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              help="auto: bf16 on CUDA, fp32 on CPU.")
@click.option("--save", "save_dir", type=click.Path(file_okay=False), help="Also write the generated clips here.")
def eval_command(model, data, json_path, limit, taus, steps, guidance, seed, batch_size, device, dtype, save_dir):
    """Score a model on the held-out synthetic clips: first-frame PSNR, text following, last-frame error."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from pdengine.engine.media import MediaError
    from pdengine.engine.pipeline import ModelFolderError

    for lib in (diffusers_logging, transformers_logging):  # per-file loading bars; this command reports itself
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        result = evaluate(model, data, limit=limit, taus=taus, steps=steps, guidance=guidance, seed=seed,
                          batch_size=batch_size, device=device, dtype=dtype, save=save_dir,
                          log=lambda m: click.echo(m, err=True))
    except (EvalError, MediaError, ModelFolderError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_table(result))
    if json_path:
        click.echo(f"JSON: {write_json(result, json_path)}")
