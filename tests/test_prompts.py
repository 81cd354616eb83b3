"""Prompts files (.txt / .jsonl) and seed assignment."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from pdengine.engine.prompts import MAX_SEED, PromptFileError, PromptSpec, assign_seeds, read_prompts


def write(tmp_path, name: str, text: str | bytes):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_txt_skips_blanks_and_comments(tmp_path):
    path = write(
        tmp_path, "p.txt", "# header\n\n  a cat surfing  \n\t\n   # indented comment\nrain on #glass\r\n"
    )
    specs = read_prompts(path)
    assert specs == [PromptSpec("a cat surfing", line=3), PromptSpec("rain on #glass", line=6)]


def test_jsonl_fields_and_paths(tmp_path):
    sub = tmp_path / "set"
    sub.mkdir()
    absolute = str(tmp_path / "abs.png")
    lines = [
        json.dumps({"prompt": "a dog", "first_frame": "dog.png", "last_frame": "../end.png", "seed": 3}),
        "",
        json.dumps({"prompt": "a tree", "first_frame": absolute, "last_frame": None}),
        json.dumps({"prompt": "only text"}),
    ]
    path = write(sub, "p.jsonl", "\n".join(lines) + "\n")
    specs = read_prompts(path)
    assert specs == [
        PromptSpec("a dog", str(sub / "dog.png"), str(tmp_path / "end.png"), 3, line=1),
        PromptSpec("a tree", absolute, None, None, line=3),
        PromptSpec("only text", line=4),
    ]
    assert all(s.first_frame is None or os.path.isabs(s.first_frame) for s in specs)


def test_relative_frames_resolve_against_prompts_folder_not_cwd(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    write(tmp_path / "a", "p.jsonl", '{"prompt": "x", "first_frame": "img/f.png"}\n')
    monkeypatch.chdir(tmp_path)
    (spec,) = read_prompts("a/p.jsonl")
    assert spec.first_frame == str(tmp_path / "a" / "img" / "f.png")


def test_line_numbers_survive_unicode_line_separators(tmp_path):
    # U+2028 is legal inside a JSON string; it must not count as a line break.
    text = json.dumps({"prompt": "one\u2028two"}, ensure_ascii=False) + "\n{bad json}\n"
    path = write(tmp_path, "p.jsonl", text)
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: invalid JSON"):
        read_prompts(path)


def test_bom_is_tolerated(tmp_path):
    path = write(tmp_path, "p.jsonl", '\ufeff{"prompt": "x"}\n'.encode())
    assert read_prompts(path) == [PromptSpec("x", line=1)]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "ok"', "invalid JSON"),
        ("# a comment", "invalid JSON"),
        ('["a cat"]', "expected a JSON object, got list"),
        ('"a cat"', "expected a JSON object, got str"),
        ('{"first_frame": "a.png"}', 'missing "prompt"'),
        ('{"prompt": ""}', '"prompt" is empty'),
        ('{"prompt": "   "}', '"prompt" is empty'),
        ('{"prompt": 5}', '"prompt" must be a string, got int'),
        ('{"prompt": null}', '"prompt" must be a string, got null'),
        ('{"prompt": "x", "promt": "y"}', 'unknown key "promt"; did you mean "prompt"?'),
        ('{"prompt": "x", "lastframe": "y"}', 'unknown key "lastframe"; did you mean "last_frame"?'),
        ('{"prompt": "x", "zzz": 1}', 'unknown key "zzz" (allowed: prompt, first_frame, last_frame, seed)'),
        ('{"prompt": "x", "first_frame": 3}', '"first_frame" must be a string path, got int'),
        ('{"prompt": "x", "last_frame": ""}', '"last_frame" is an empty path'),
        ('{"prompt": "x", "seed": true}', '"seed" must be an integer, got bool'),
        ('{"prompt": "x", "seed": 1.0}', '"seed" must be an integer, got float'),
        ('{"prompt": "x", "seed": "7"}', '"seed" must be an integer, got str'),
        ('{"prompt": "x", "seed": -1}', '"seed" must be in [0, 2**64 - 1], got -1'),
        ('{"prompt": "x", "seed": 18446744073709551616}', '"seed" must be in'),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    # The bad record sits on line 4, after a valid record and a blank line.
    path = write(tmp_path, "prompts.jsonl", '{"prompt": "fine"}\n\n{"prompt": "also fine"}\n' + line + "\n")
    with pytest.raises(PromptFileError) as e:
        read_prompts(path)
    assert str(e.value).startswith(f"{path}:4: ")
    assert message in str(e.value)


def test_max_seed_is_accepted(tmp_path):
    path = write(tmp_path, "p.jsonl", json.dumps({"prompt": "x", "seed": MAX_SEED}))
    assert read_prompts(path)[0].seed == 2**64 - 1


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.txt", "# only comments\n\n", "p.txt: no prompts in file"),
        ("p.jsonl", "\n  \n", "p.jsonl: no prompts in file"),
        ("p.jsonl", "", "p.jsonl: no prompts in file"),
        ("p.csv", "a,b\n", "p.csv: prompts file must end in .txt or .jsonl, got '.csv'"),
        ("prompts", "a cat\n", "prompts: prompts file must end in .txt or .jsonl, got 'no suffix'"),
        ("p.txt", b"caf\xe9\n", "p.txt: not UTF-8 text"),
    ],
)
def test_file_level_errors(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(PromptFileError, match=re.escape(message)):
        read_prompts(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(PromptFileError, match=re.escape(f"{tmp_path / 'nope.txt'}: prompts file not found")):
        read_prompts(tmp_path / "nope.txt")
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(PromptFileError, match="dir.txt: not a file"):
        read_prompts(tmp_path / "dir.txt")


def test_thousands_of_lines_parse_quickly(tmp_path):
    n = 20_000
    lines = [json.dumps({"prompt": f"prompt {i}", "first_frame": f"f{i}.png", "seed": i}) for i in range(n)]
    path = write(tmp_path, "big.jsonl", "\n".join(lines))
    start = time.perf_counter()
    specs = read_prompts(path)
    elapsed = time.perf_counter() - start
    assert len(specs) == n and specs[-1] == PromptSpec(
        f"prompt {n - 1}", str(tmp_path / f"f{n - 1}.png"), None, n - 1, line=n
    )
    assert elapsed < 5.0, f"{n} lines took {elapsed:.2f} s"


def test_assign_seeds_own_seed_wins_else_base_plus_index():
    specs = [PromptSpec("a"), PromptSpec("b", seed=99), PromptSpec("c"), PromptSpec("d", seed=0)]
    assert assign_seeds(specs, 1000) == [1000, 99, 1002, 0]
    # A spec's default seed depends on its position in the whole file only, not on its neighbours.
    specs[1].seed = None
    assert assign_seeds(specs, 1000) == [1000, 1001, 1002, 0]
    assert assign_seeds([], 5) == []


@pytest.mark.parametrize("base", [-1, True, 1.5, "3"])
def test_assign_seeds_rejects_bad_base(base):
    with pytest.raises(ValueError, match="base_seed must be a non-negative int"):
        assign_seeds([PromptSpec("a")], base)


def test_assign_seeds_overflow():
    assert assign_seeds([PromptSpec("a")], MAX_SEED) == [MAX_SEED]
    with pytest.raises(ValueError, match="exceeds the largest seed"):
        assign_seeds([PromptSpec("a"), PromptSpec("b")], MAX_SEED)
