"""Tiny, offline, seeded model parts and a tiny PixelDance model folder.

Used by the test suite and by `pdengine ... --model tiny-random` until a trained demo model exists.
Nothing here downloads anything: every part is built from a small config with seeded random weights,
so the same seed always gives byte-identical files. The outputs of such a model are noise.

Folder layout (diffusers style)::

    model_index.json
    unet/          config.json + diffusion_pytorch_model.safetensors   (pdengine.model.UNet3D)
    vae/           diffusers AutoencoderKL
    text_encoder/  transformers CLIPTextModel
    tokenizer/     transformers CLIPTokenizer (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json)
    scheduler/     diffusers DDIMScheduler (scheduler_config.json)
    README.md      says plainly that the weights are random

The "modelscope" layout is the same folder shaped for diffusers' `TextToVideoSDPipeline` (the
ModelScope text-to-video pipeline), our reference for end-to-end parity tests.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

logger = logging.getLogger(__name__)

Layout = Literal["pixeldance", "modelscope"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Padding choice: we pad with `<|endoftext|>` (as SD 1.x and OpenAI CLIP do) rather than SD 2's "!".
# The text encoder pools at the *first* eos position, so padding with eos is harmless, and it keeps the
# pad token a special token that never collides with prompt text.
PAD_TOKEN = EOS_TOKEN
MODEL_MAX_LENGTH = 77
TEXT_HIDDEN_SIZE = 32
TINY_RANDOM_NAME = "tiny-random"

# Words that get merges, so common prompts tokenize to one token per word (a handful of tokens per
# prompt instead of one per letter).
_WORDS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "white", "black",
    "circle", "square", "ball", "box", "cat", "dog", "bird", "car", "man", "woman", "tree", "sky", "sea",
    "moves", "move", "runs", "walks", "jumps", "flies", "turns", "zoom", "camera", "pan",
    "to", "the", "left", "right", "up", "down", "in", "on", "of", "and", "with", "is", "at",
    "slowly", "fast", "small", "big",
)  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte-level table: every byte maps to a printable unicode character.

    Printable latin-1 bytes map to themselves; the rest (controls, space, ...) are shifted to 256+n so
    that no byte maps to whitespace or a control character (BPE files must be plain text).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges: repeatedly merge the adjacent pair with the lowest rank (leftmost on ties)."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges that turn each (lowercase ASCII) word into the single token `word</w>`.

    Each word is tokenized with the merges so far and, while it is still several tokens, a merge of
    its first two tokens is appended. Appended merges rank below every earlier one, so they never
    change how an earlier word tokenizes (an earlier word always has a better-ranked merge available
    until it is one token). Without this, naive per-word merges clash: "tree" would start merging at
    "re" because "red" made (r, e) a merge.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not (word.isascii() and word.isalpha() and word.islower()):
            raise ValueError(f"merge words must be lowercase ASCII letters: {word!r}")
        while len(symbols := _bpe([*word[:-1], word[-1] + "</w>"], ranks)) > 1:
            ranks[symbols[0], symbols[1]] = len(merges)
            merges.append((symbols[0], symbols[1]))
    return merges


def tiny_vocab_and_merges(words: Iterable[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny CLIP vocab (token -> id) and merges; `words` (default: a small built-in list) each become
    one token.

    Id layout follows OpenAI CLIP: the 256 byte characters, the same with `</w>`, the merge results,
    then `<|startoftext|>` and `<|endoftext|>` last.
    """
    chars = list(_bytes_to_unicode().values())
    merges = _word_merges(_WORDS if words is None else words)
    # Two merges can make the same string ("re"+"d</w>", "r"+"ed</w>"): one id for both.
    tokens = dict.fromkeys([*chars, *(c + "</w>" for c in chars), *(a + b for a, b in merges)])
    return {tok: i for i, tok in enumerate([*tokens, BOS_TOKEN, EOS_TOKEN])}, merges


def write_tiny_tokenizer(directory: str | os.PathLike[str], words: Iterable[str] | None = None) -> Path:
    """Write a real `transformers.CLIPTokenizer` with a tiny hand-made BPE vocab into `directory`.

    Byte-level BPE with every byte in the vocab, so any unicode prompt tokenizes (no unknown tokens).
    Writes vocab.json + merges.txt (the classic CLIP files) and, through `save_pretrained`, the
    tokenizer.json / tokenizer_config.json that transformers loads. `directory` must be new or empty
    (from_pretrained would prefer a stale tokenizer.json over the files written here). `words`: the
    vocabulary that gets one token per word (e.g. every word of a caption set).
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    if directory.is_dir() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty")
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab_and_merges(words)
    (directory / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (directory / "merges.txt").write_text(merges_text, encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(
        directory,
        model_max_length=MODEL_MAX_LENGTH,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )
    tokenizer.save_pretrained(directory)
    return directory


def tiny_text_encoder(
    vocab_size: int,
    seed: int = 0,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> CLIPTextModel:
    """Seeded tiny `CLIPTextModel` (hidden 32, 2 layers, 4 heads, 77 positions).

    Special-token ids default to the tiny tokenizer's layout (bos, eos last; pad = eos).
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    bos = vocab_size - 2 if bos_token_id is None else bos_token_id
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    pad = eos if pad_token_id is None else pad_token_id
    for name, value in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)):
        if not 0 <= value < vocab_size:
            raise ValueError(f"{name}={value} is outside the vocab (size {vocab_size})")
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=64,
        projection_dim=TEXT_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return perturb_parameters_(model.eval(), seed)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """Seeded tiny `AutoencoderKL`: 4 levels, so 8x spatial downsampling and 4 latent channels like SD's."""
    import torch
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
            sample_size=64,
            scaling_factor=0.18215,
        )
    return perturb_parameters_(vae.eval(), seed)


def perturb_parameters_(module: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Fill every all-zero parameter of `module` in place with seeded `randn * scale`; return `module`.

    Zero-initialised layers (output convs, temporal layers, norm biases) make a random model blind to
    whole code paths, so tests could pass with those paths broken. Parameters are visited in sorted-name
    order with one CPU generator, so the result depends only on `seed` and the module's structure.
    """
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            if torch.count_nonzero(param) == 0:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * scale
                param.copy_(noise.to(device=param.device, dtype=param.dtype))
    return module


def _ddim_scheduler():  # -> diffusers.DDIMScheduler
    from diffusers import DDIMScheduler

    from .schedulers import SD_SCHEDULE

    # Stable Diffusion / ModelScope training schedule, DDIM sampling.
    return DDIMScheduler.from_config(SD_SCHEDULE)


def _pdengine_version() -> str:
    from importlib.metadata import version

    return version("pixeldance-engine")


def _model_index(layout: Layout) -> dict[str, object]:
    import diffusers

    common = {
        "_pdengine_version": _pdengine_version(),
        # Read by `pdengine generate`, which then says plainly that the output is noise.
        "_random_weights": True,
        "_diffusers_version": diffusers.__version__,
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    if layout == "pixeldance":
        return {"_class_name": "PixelDancePipeline", **common, "unet": ["pdengine", "UNet3D"]}
    return {"_class_name": "TextToVideoSDPipeline", **common, "unet": ["diffusers", "UNet3DConditionModel"]}


_README = """\
# Tiny random {layout} model

Written by `pdengine.engine.tiny.write_tiny_pipeline(seed={seed}, unet_in_channels={in_channels},
layout="{layout}")`.

**These weights are random.** Every part (UNet, VAE, CLIP text encoder, a hand-made tiny tokenizer)
was built from a tiny config with seeded random weights, nothing was trained or downloaded. Anything
sampled with this model is noise. It exists to test the engine end to end, quickly and offline.
"""


def write_tiny_pipeline(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    unet_in_channels: int = 8,
    layout: Layout = "pixeldance",
    overwrite: bool = False,
) -> Path:
    """Write a complete tiny model folder with seeded random weights to `out_dir` and return it.

    layout "pixeldance": our UNet3D with `unet_in_channels` = 2 x 4 latent channels (noisy latent
    concatenated with the image instructions). layout "modelscope": the folder diffusers'
    `TextToVideoSDPipeline.from_pretrained` loads; its UNet takes the plain latent, so in_channels must be 4.
    The folder is built beside `out_dir` and renamed into place at the end, so a crash leaves nothing
    half-written. An existing non-empty `out_dir` is an error unless `overwrite=True`.
    """
    if layout not in ("pixeldance", "modelscope"):
        raise ValueError(f"layout must be 'pixeldance' or 'modelscope', got {layout!r}")
    if layout == "modelscope" and unet_in_channels != 4:
        raise ValueError(f"the modelscope layout needs unet_in_channels=4, got {unet_in_channels}")
    if unet_in_channels < 1:
        raise ValueError(f"unet_in_channels must be positive, got {unet_in_channels}")
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_parts(tmp, seed=seed, unet_in_channels=unet_in_channels, layout=layout)
        _move_into_place(tmp, out_dir, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty (pass overwrite=True to replace it)")


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    # Checked again: another process may have written out_dir while we were building.
    _check_target(out_dir, overwrite)
    old: Path | None = None
    if out_dir.is_dir():
        # Move the old folder aside first: rename() cannot replace a non-empty directory.
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)


def _write_parts(root: Path, *, seed: int, unet_in_channels: int, layout: Layout) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(root / "tokenizer"))
    text_encoder = tiny_text_encoder(
        len(tokenizer),
        seed,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    tiny_vae(seed).save_pretrained(root / "vae", safe_serialization=True)
    _tiny_unet(seed, unet_in_channels).save_pretrained(root / "unet")
    _ddim_scheduler().save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(_model_index(layout), indent=2) + "\n")
    readme = _README.format(layout=layout, seed=seed, in_channels=unet_in_channels)
    (root / "README.md").write_text(readme, encoding="utf-8")


def _tiny_unet(seed: int, in_channels: int):  # -> pdengine.model.UNet3D
    import torch

    from pdengine.model import UNet3D

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet3D.from_preset("tiny", in_channels=in_channels, cross_attention_dim=TEXT_HIDDEN_SIZE)
    return perturb_parameters_(unet.eval(), seed)


def write_tiny_sd_pipeline(out_dir: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> Path:
    """A tiny random Stable Diffusion (text-to-image) folder that diffusers' `StableDiffusionPipeline`
    loads: the same tiny VAE, text encoder and tokenizer as the PixelDance folder, and a 2D UNet shaped
    like the `tiny` UNet3D preset without its temporal layers. Used to test `--t2i-model` (the paper
    makes first frames with SD) and, later, inflating a 2D UNet into a UNet3D."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp / "tokenizer-src"))
        text_encoder = tiny_text_encoder(
            len(tokenizer), seed, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(
                sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, attention_head_dim=8,
                cross_attention_dim=TEXT_HIDDEN_SIZE,
            )
        pipe = StableDiffusionPipeline(
            vae=tiny_vae(seed), text_encoder=text_encoder, tokenizer=tokenizer,
            unet=perturb_parameters_(unet.eval(), seed), scheduler=_ddim_scheduler(), safety_checker=None,
            feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        )
        build = tmp / "sd"
        pipe.save_pretrained(build, safe_serialization=True)
        (build / "README.md").write_text(
            "# Tiny random Stable Diffusion model\n\n**These weights are random**: images made with it are "
            "noise. Written by `pdengine.engine.tiny.write_tiny_sd_pipeline` for tests.\n", encoding="utf-8")
        _move_into_place(build, out_dir, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def tiny_random_dir() -> Path:
    """Where the cached tiny-random model lives: `$PDENGINE_CACHE` (default ~/.cache/pdengine) / tiny-random."""
    cache = os.environ.get("PDENGINE_CACHE") or Path.home() / ".cache" / "pdengine"
    return Path(cache).expanduser() / TINY_RANDOM_NAME


def ensure_tiny_random() -> Path:
    """Return the cached tiny-random PixelDance folder, building it (seed 0) if it is missing or stale.

    A folder written by another pdengine version is rebuilt, since the UNet format may have changed.
    """
    path = tiny_random_dir()
    index = path / "model_index.json"
    if index.is_file():
        written_by = json.loads(index.read_text()).get("_pdengine_version")
        if written_by == _pdengine_version():
            return path
        logger.warning(
            "rebuilding %s: written by pdengine %s, this is %s", path, written_by, _pdengine_version()
        )
        return write_tiny_pipeline(path, seed=0, overwrite=True)
    try:
        return write_tiny_pipeline(path, seed=0)
    except FileExistsError:
        # Another process finished the same deterministic build first; its folder is complete.
        if index.is_file():
            return path
        raise
