"""`pdengine generate` as a plain function: check every input, load the model once, sample in
micro-batches, write each video as soon as its batch is done (temp name, then rename) and append one
manifest line per video."""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .pipeline import SampleSettings, check_model_folder
from .prompts import PromptSpec, assign_seeds

FORMATS = ("mp4", "gif", "png")
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
BUILTIN_MODELS = ("demo", "tiny-random")
DEMO_DIR = Path(__file__).resolve().parent / "demo"  # the shipped demo model (package data)
FALLBACK_FRAMES, FALLBACK_SIZE = 16, 256  # when neither the command line nor the model folder says
FALLBACK_GUIDANCE = 7.5


class GenerateError(ValueError):
    """Bad input to `generate`, found before any model is loaded."""


@dataclass
class GenerateJob:
    specs: list[PromptSpec]
    model: str
    out_dir: Path
    settings: SampleSettings = field(default_factory=SampleSettings)
    seed: int = 0
    batch_size: int | str = 1  # or "auto": the largest batch whose peak GPU memory fits
    clips: int = 1
    fps: float = 4.0
    fmt: str = "mp4"
    device: str | None = None
    dtype: str | None = None
    t2i_model: str | None = None
    backend: str = "torch"
    cuda_graph: bool = True
    compile: bool = False  # torch.compile (Inductor) the static CUDA sampler's UNet before capture


def demo_model_dir() -> Path:
    """The shipped demo model's folder (`--model demo`)."""
    if not (DEMO_DIR / "model_index.json").is_file():
        raise GenerateError(f"the demo model is missing from this installation ({DEMO_DIR}): reinstall "
                            "pixeldance-engine, or pass --model DIR")
    return DEMO_DIR


def resolve_model(name: str) -> Path:
    """A model folder path, or a built-in name (`demo`, shipped; `tiny-random`, built on first use)."""
    if name == "demo":
        return demo_model_dir()
    if name == "tiny-random":
        from .tiny import ensure_tiny_random

        return ensure_tiny_random()
    return Path(name).expanduser()


def sample_defaults(name: str) -> dict[str, float]:
    """{"frames", "size", "guidance"} to sample with when the command line does not say: the model folder's
    `_sample_defaults` in model_index.json (the size it was trained at, the guidance measured best for it)
    over FALLBACK_FRAMES / FALLBACK_SIZE / FALLBACK_GUIDANCE."""
    out = {"frames": FALLBACK_FRAMES, "size": FALLBACK_SIZE, "guidance": FALLBACK_GUIDANCE}
    if name == "tiny-random":
        return out
    index = resolve_model(name) / "model_index.json"
    if index.is_file():
        try:
            given = json.loads(index.read_text()).get("_sample_defaults") or {}
        except (OSError, json.JSONDecodeError):
            given = {}  # check_model_folder reports a broken folder with its own message
        out.update({k: type(out[k])(v) for k, v in given.items() if k in out})
    return out


def _vae_scale_factor(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "vae" / "config.json").read_text())
    return 2 ** (len(cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)


def slugify(text: str, max_len: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "video"


def validate_job(job: GenerateJob) -> None:
    """Every check that needs no model weights: runs before anything heavy is loaded."""
    from .media import MediaError, check_image

    if not job.specs:
        raise GenerateError("no prompts given: pass PROMPT arguments or --prompts FILE")
    for spec in job.specs:
        if not spec.prompt.strip():
            where = f" (line {spec.line})" if spec.line else ""
            raise GenerateError(f"empty prompt{where}")
    if job.batch_size != "auto" and (not isinstance(job.batch_size, int) or job.batch_size < 1):
        raise GenerateError(f"--batch-size must be an integer >= 1 or 'auto', got {job.batch_size!r}")
    if job.clips < 1:
        raise GenerateError(f"--clips must be >= 1, got {job.clips}")
    if job.fmt not in FORMATS:
        raise GenerateError(f"--format must be one of {FORMATS}, got {job.fmt!r}")
    if job.fps <= 0:
        raise GenerateError(f"--fps must be > 0, got {job.fps}")
    if job.dtype is not None and job.dtype not in DTYPES:
        raise GenerateError(f"--dtype must be one of {sorted(DTYPES)}, got {job.dtype!r}")
    if job.seed < 0:
        raise GenerateError(f"--seed must be >= 0, got {job.seed}")
    if job.model == "tiny-random":
        scale = 8
    else:
        if job.model not in BUILTIN_MODELS:
            job.model = str(Path(job.model).expanduser())
        model_dir = resolve_model(job.model)
        check_model_folder(model_dir)
        scale = _vae_scale_factor(model_dir)
    try:
        job.settings.validate(scale)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    for spec in job.specs:
        for kind in ("first_frame", "last_frame"):
            path = getattr(spec, kind)
            if path is not None:
                try:
                    check_image(path)
                except MediaError as e:
                    where = f"line {spec.line}: " if spec.line else ""
                    raise GenerateError(f"{where}--{kind.replace('_', '-')}: {e}") from None
    if job.t2i_model is not None and not (Path(job.t2i_model) / "model_index.json").is_file():
        raise GenerateError(f"--t2i-model {job.t2i_model}: not a diffusers model folder (no model_index.json)")
    out = Path(job.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".pdengine-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise GenerateError(f"--out {out} is not writable: {e}") from None


def _torch_dtype(name: str | None, device: str):
    import torch

    if name is None:
        if not device.startswith("cuda"):
            return torch.float32
        # bf16 where the GPU computes it natively (compute capability 8.0+), fp16 on older GPUs
        return torch.bfloat16 if torch.cuda.get_device_capability(torch.device(device))[0] >= 8 else torch.float16
    return getattr(torch, DTYPES[name])


def _pick_device(name: str | None, local_rank: int = 0, world: int = 1) -> str:
    """--device, or this process's GPU when there is one, else cpu. A GPU is always named with its index
    (`torch.cuda.set_device` and CUDA graphs need one): plain "cuda" is the current device, or LOCAL_RANK's
    under torchrun."""
    import torch

    if name is None:
        if not torch.cuda.is_available():
            return "cpu"
        name = "cuda"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GenerateError(f"--device {name}: CUDA is not available on this machine")
    if name == "cuda":  # under torchrun LOCAL_RANK's GPU (modulo the GPUs this rank sees: one each, or all)
        return f"cuda:{local_rank % torch.cuda.device_count() if world > 1 else torch.cuda.current_device()}"
    return name


def _dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def read_manifests(out: Path) -> dict[int, dict]:
    """Records already written in `out` (the merged manifest and any per-rank parts), by video index;
    only those whose output still exists count."""
    done: dict[int, dict] = {}
    for path in sorted(out.glob("manifest*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                idx = int(rec["index"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise GenerateError(f"{path}:{n}: not a manifest record") from None
            if (out / rec.get("file", "")).exists():
                done[idx] = rec
    return done


def merge_manifests(out: Path) -> Path:
    """Fold per-rank manifest parts into `manifest.jsonl`, one line per video, sorted by index."""
    records = read_manifests(out)
    merged = out / "manifest.jsonl"
    tmp = out / ".manifest.jsonl.tmp"
    tmp.write_text("".join(json.dumps(records[i]) + "\n" for i in sorted(records)))
    tmp.replace(merged)
    for part in out.glob("manifest.rank*.jsonl"):
        part.unlink()
    return merged


def run_generate(job: GenerateJob, log: Callable[[str], None] | None = None, resume: bool = False) -> list[dict]:
    """Sample every prompt of the job; returns the manifest records this process wrote.

    Under `torchrun`, rank r takes videos r, r + N, r + 2N, ...; each writes its own manifest part and
    rank 0 merges them when all are done (a video is the same whichever rank makes it: its seed is fixed
    by its index). `resume` skips videos whose manifest record and output file exist.
    """
    import torch
    from tqdm import tqdm

    from .media import frames_to_uint8, load_image, write_video
    from .pipeline import PixelDancePipeline

    log = log or (lambda msg: print(msg, file=sys.stderr))
    validate_job(job)
    out = Path(job.out_dir)
    rank, world, local_rank = _dist_info()
    done_before = read_manifests(out)
    if done_before and not resume:
        raise GenerateError(f"--out {out} already holds {len(done_before)} video(s) with a manifest: pass "
                            "--resume to continue that run, or choose another --out")
    seeds = assign_seeds(job.specs, job.seed)
    for idx, rec in done_before.items():
        if idx >= len(job.specs) or rec.get("prompt") != job.specs[idx].prompt or rec.get("seed") != seeds[idx]:
            raise GenerateError(f"--resume: video {idx} in {out} was made from a different prompt or seed than "
                                "this prompts list: use a fresh --out")
    todo = [i for i in range(len(job.specs)) if i % world == rank and i not in done_before]
    if done_before and rank == 0:
        log(f"resuming: {len(done_before)} video(s) already done, {len(job.specs) - len(done_before)} to go")

    if world > 1:
        import torch.distributed as dist

        # Only a barrier is needed (no tensors cross ranks), so gloo serves CPU and GPU runs alike.
        if not dist.is_initialized():
            # A rank whose share is done (or was done before a --resume) waits at the closing barrier for the
            # others: far longer than gloo's default 30 minutes on a long prompt list.
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    device = _pick_device(job.device, local_rank, world)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # kernels and graphs use the current device
    dtype = _torch_dtype(job.dtype, device)
    model_dir = resolve_model(job.model)
    index = check_model_folder(model_dir)
    if rank == 0 and (index.get("_random_weights") or job.model == "tiny-random"):
        log(f"note: {job.model} has RANDOM weights: the videos it makes are noise (a smoke test of the engine)")
    pipe = PixelDancePipeline.from_pretrained(model_dir, device=device, dtype=dtype, backend=job.backend)
    pipe.use_cuda_graph = job.cuda_graph
    if job.compile:
        if pipe.static_sampler:
            pipe.compile_backend = "inductor"
        elif rank == 0:
            log("note: --compile applies to the static CUDA sampler; this run is on the CPU: not compiled")
    captured = 0.0
    settings = job.settings
    h, w = settings.height, settings.width

    missing_first = [job.specs[i] for i in todo if job.specs[i].first_frame is None]
    if missing_first and job.t2i_model is None:
        log(f"warning: {len(missing_first)} prompt(s) without --first-frame: PixelDance models expect a "
            "first-frame instruction; its slot in c_image is zeros (use --t2i-model DIR to make one from the text)")
    t2i = _load_t2i(job.t2i_model, device, dtype) if (missing_first and job.t2i_model) else None

    if job.batch_size == "auto":
        job.batch_size = auto_batch_size(pipe, settings, limit=max(1, len(todo)), log=log)
    manifest = out / ("manifest.jsonl" if world == 1 else f"manifest.rank{rank}.jsonl")
    ext = "" if job.fmt == "png" else f".{job.fmt}"
    records: list[dict] = []
    noted_sizes: set[str] = set()

    def image(path: str | None) -> torch.Tensor | None:
        if path is None:
            return None
        from PIL import Image

        with Image.open(path) as im:
            size = im.size
        if size != (w, h) and path not in noted_sizes:
            noted_sizes.add(path)
            log(f"note: {path} is {size[0]}x{size[1]}; resized and centre-cropped to {w}x{h}")
        return load_image(path, h, w)

    start_all = time.perf_counter()
    done = 0
    writer = BatchWriter(overlap=overlap_writes(device))
    with writer, tqdm(total=len(todo) * settings.steps * job.clips, unit="step", desc="sampling",
                      file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        for b0 in range(0, len(todo), job.batch_size):
            ids = todo[b0:b0 + job.batch_size]
            batch = [job.specs[i] for i in ids]
            batch_seeds = [seeds[i] for i in ids]
            t0 = time.perf_counter()
            firsts = [image(s.first_frame) for s in batch]
            if t2i is not None:
                firsts = [x if x is not None else _t2i_image(t2i, s.prompt, seed, h, w)
                          for x, s, seed in zip(firsts, batch, batch_seeds)]
            lasts = [image(s.last_frame) for s in batch]
            videos = pipe.generate([s.prompt for s in batch], firsts, lasts, batch_seeds, settings,
                                   clips=job.clips, on_step=lambda i: bar.update(1))
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)  # the batch's time is the GPU's, not the time to queue its work
            # Graph capture (first batch of a bucket) is reported apart from sampling time.
            capture = pipe.capture_seconds - captured
            captured += capture
            if capture > 0:
                log(f"captured the denoising step as a CUDA graph in {capture:.2f} s")
            seconds = (time.perf_counter() - t0 - capture) / len(batch)
            items = []
            for j, (idx, spec, seed) in enumerate(zip(ids, batch, batch_seeds)):
                path = out / f"{idx:05d}_{slugify(spec.prompt)}{ext}"
                record = {
                    "index": idx, "file": path.name, "prompt": spec.prompt, "seed": seed,
                    "first_frame": spec.first_frame, "last_frame": spec.last_frame,
                    "frames": int(videos.shape[2]), "height": h, "width": w, "clips": job.clips,
                    **{k: v for k, v in asdict(settings).items() if k not in ("height", "width", "num_frames")},
                    "frames_per_clip": settings.num_frames, "tau": settings.resolved_tau(),
                    "fps": job.fps, "format": job.fmt, "model": str(job.model), "device": device,
                    "dtype": str(dtype).replace("torch.", ""), "backend": job.backend,
                    "seconds": round(seconds, 3), "capture_seconds": round(capture, 3), "rank": rank,
                    "cuda_graph": bool(pipe.static_sampler and pipe.use_cuda_graph and device.startswith("cuda")),
                    "compiled": pipe.compile_backend is not None,
                }
                items.append((frames_to_uint8(videos[j].permute(1, 0, 2, 3)), path, record))  # on the host now
            done += len(batch)

            def write_batch(items=items, done=done):
                for frames, path, record in items:
                    write_video(frames, path, job.fmt, job.fps)
                    # The video is in place before its manifest line.
                    with manifest.open("a") as fh:
                        fh.write(json.dumps(record) + "\n")
                    records.append(record)
                rate = done / (time.perf_counter() - start_all)
                log(f"[{done}/{len(todo)}] wrote {', '.join(str(it[1].name) for it in items)} ({rate:.3f} videos/s)")

            writer.submit(write_batch)
            bar.set_postfix(videos=f"{done}/{len(todo)}", vps=f"{done / (time.perf_counter() - start_all):.3f}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            merge_manifests(out)
        dist.barrier()
        dist.destroy_process_group()
    elif any(out.glob("manifest.rank*.jsonl")):  # parts left by an interrupted multi-process run
        merge_manifests(out)
    return records


def overlap_writes(device: str) -> bool:
    """Encode and write batch k's videos while batch k+1 samples: on a GPU, where sampling leaves the CPU
    idle (on the CPU the two would only share the same cores)."""
    return device.startswith("cuda")


class BatchWriter:
    """Runs each finished batch's writes (video files, then their manifest lines) on one background thread,
    in order, so encoding overlaps the next batch's sampling (`overlap`); without overlap each batch is
    written before sampling goes on. At most one batch is in flight: submitting waits for the previous one,
    whose error surfaces there. Leaving the with-block waits for the last batch, also when sampling failed
    (its error then wins): a crash loses at most the batch being sampled."""

    def __init__(self, overlap: bool):
        from concurrent.futures import ThreadPoolExecutor

        self.overlap = overlap
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdengine-writer")
        self._pending = None

    def submit(self, fn: Callable[[], None]) -> None:
        self.wait()
        self._pending = self._pool.submit(fn)
        if not self.overlap:
            self.wait()

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
            else:
                try:
                    self.wait()  # flush the batch before the failing one; the sampling error propagates
                except Exception as e:  # noqa: BLE001 - reported, the original error wins
                    print(f"pdengine: writing the previous batch also failed: {e}", file=sys.stderr)
        finally:
            self._pool.shutdown(wait=True)


def auto_batch_size(pipe, settings: SampleSettings, limit: int, log: Callable[[str], None],
                    headroom: float = 0.9) -> int:
    """The largest power-of-two batch (<= limit) whose denoising step + decode fit in `headroom` of the GPU
    memory this process may use (free memory plus what its allocator holds: other processes' use is left
    out), found by running one step of each candidate and reading the allocator's peaks. The captured
    sampler keeps its step's memory pool while the batch decodes, so the step's and the decode's extra
    memory count together. On the CPU there is nothing to measure: 1."""
    import torch

    if pipe.device.type != "cuda":
        log("--batch-size auto: no GPU memory to size against on the CPU; using 1")
        return 1
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(pipe.device)
    budget = free + torch.cuda.memory_reserved(pipe.device)
    probe = SampleSettings(**{**asdict(settings), "steps": 1, "tau": None})
    best, b = 1, 1
    while b <= limit:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(pipe.device)
        torch.cuda.reset_peak_memory_stats(pipe.device)
        try:
            lat = pipe.sample_clip(["probe"] * b, [None] * b, [None] * b,
                                   [torch.Generator().manual_seed(0) for _ in range(b)], probe, static=False)
            step = torch.cuda.max_memory_allocated(pipe.device) - base
            mid = torch.cuda.memory_allocated(pipe.device)
            torch.cuda.reset_peak_memory_stats(pipe.device)
            pipe.decode(lat)
            decode = torch.cuda.max_memory_allocated(pipe.device) - mid
        except RuntimeError as e:  # torch.OutOfMemoryError, or cuBLAS / cuDNN failing to allocate
            if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower() or "ALLOC" in str(e):
                break
            raise
        finally:
            lat = None
        peak = base + step + decode
        log(f"--batch-size auto: batch {b} needs about {peak / 2**30:.2f} GiB of {budget / 2**30:.1f} GiB "
            "(its step and its decode)")
        if peak > headroom * budget:
            break
        best, b = b, b * 2
    torch.cuda.empty_cache()
    log(f"--batch-size auto: using {best}")
    return best


def _load_t2i(path: str, device: str, dtype):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _t2i_image(t2i, prompt: str, seed: int, height: int, width: int):
    """The first frame made from the prompt by a text-to-image model (the paper uses SD 2.1)."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    img = t2i(prompt, height=height, width=width, generator=gen, output_type="pt").images[0]
    return img.float().cpu() * 2 - 1
