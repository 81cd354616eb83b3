"""Prompts files for batch sampling: `.txt` (one prompt a line) or `.jsonl` (one object a line).

A `.jsonl` line looks like
    {"prompt": "a cat surfing", "first_frame": "cat.png", "last_frame": "wave.png", "seed": 7}
where only "prompt" is required; image paths are relative to the prompts file's folder.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path

_JSONL_KEYS = ("prompt", "first_frame", "last_frame", "seed")
# torch.Generator.manual_seed accepts seeds up to 2**64 - 1.
MAX_SEED = 2**64 - 1


@dataclass
class PromptSpec:
    """One sampling request; `line` is its 1-based line in the prompts file (for messages)."""

    prompt: str
    first_frame: str | None = None
    last_frame: str | None = None
    seed: int | None = None
    line: int | None = None


class PromptFileError(ValueError):
    """A prompts file that cannot be used; messages read `file:line: what is wrong`."""


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check_seed(seed: object, where: str) -> int:
    # bool is a subclass of int, but `"seed": true` is surely a mistake.
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PromptFileError(f'{where}: "seed" must be an integer, got {_type_name(seed)}')
    if not 0 <= seed <= MAX_SEED:
        raise PromptFileError(f'{where}: "seed" must be in [0, 2**64 - 1], got {seed}')
    return seed


def _parse_jsonl_line(text: str, where: str, base_dir: Path, line: int) -> PromptSpec:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    for key in obj:
        if key not in _JSONL_KEYS:
            close = difflib.get_close_matches(key, _JSONL_KEYS, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else f" (allowed: {', '.join(_JSONL_KEYS)})"
            raise PromptFileError(f'{where}: unknown key "{key}"{hint}')
    if "prompt" not in obj:
        raise PromptFileError(f'{where}: missing "prompt"')
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise PromptFileError(f'{where}: "prompt" must be a string, got {_type_name(prompt)}')
    if not prompt.strip():
        raise PromptFileError(f'{where}: "prompt" is empty')

    frames: dict[str, str | None] = {}
    for key in ("first_frame", "last_frame"):
        value = obj.get(key)
        if value is None:  # absent or null: no such instruction
            frames[key] = None
            continue
        if not isinstance(value, str):
            raise PromptFileError(f'{where}: "{key}" must be a string path, got {_type_name(value)}')
        if not value.strip():
            raise PromptFileError(f'{where}: "{key}" is an empty path')
        # abspath normalises ".." without resolving symlinks, so the user's path stays recognisable.
        frames[key] = os.path.abspath(base_dir / Path(value).expanduser())

    seed = obj.get("seed")
    if seed is not None:
        seed = _check_seed(seed, where)
    return PromptSpec(prompt, frames["first_frame"], frames["last_frame"], seed, line)


def read_prompts(path: str | os.PathLike) -> list[PromptSpec]:
    """Parse a `.txt` or `.jsonl` prompts file into PromptSpecs (see the module docstring).

    `.txt`: one prompt per line; blank lines and lines starting with `#` are skipped.
    `.jsonl`: blank lines are skipped; every other line must be a valid object. A file with no
    prompt at all is an error.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise PromptFileError(f"{p}: prompts file must end in .txt or .jsonl, got {suffix or 'no suffix'!r}")
    if not p.is_file():
        raise PromptFileError(f"{p}: prompts file not found" if not p.exists() else f"{p}: not a file")
    try:
        text = p.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from Windows editors
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None

    base_dir = p.parent.resolve()
    specs: list[PromptSpec] = []
    # split("\n") rather than splitlines(): JSON strings may hold U+2028 and friends, which
    # splitlines() would treat as line breaks and so shift every line number after them.
    for line_no, raw in enumerate(text.split("\n"), start=1):
        stripped = raw.strip()
        if not stripped:
            continue
        if suffix == ".txt":
            if not stripped.startswith("#"):
                specs.append(PromptSpec(stripped, line=line_no))
        else:
            specs.append(_parse_jsonl_line(stripped, f"{p}:{line_no}", base_dir, line_no))
    if not specs:
        raise PromptFileError(f"{p}: no prompts in file")
    return specs


def assign_seeds(specs: list[PromptSpec], base_seed: int) -> list[int]:
    """One seed per spec: its own seed if set, else `base_seed + index` in the full list.

    Indexing by position in the whole file (not in a micro-batch) keeps seeds identical however
    the list is split into batches or resumed.
    """
    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or base_seed < 0:
        raise ValueError(f"base_seed must be a non-negative int, got {base_seed!r}")
    if specs and base_seed + len(specs) - 1 > MAX_SEED:
        raise ValueError(f"base_seed {base_seed} + {len(specs)} prompts exceeds the largest seed 2**64 - 1")
    return [s.seed if s.seed is not None else base_seed + i for i, s in enumerate(specs)]
