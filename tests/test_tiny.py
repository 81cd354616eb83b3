"""Tiny seeded model parts and folders (pdengine.engine.tiny)."""

import json
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pdengine.engine import tiny

SENTENCE = "a red circle moves to the left"
UNICODE_PROMPTS = [
    "Ünïcödé façade — naïve café",
    "東京の猫が走る 🐱🚀",
    "Ωμέγα ΣΊΣΥΦΟΣ, עברית, नमस्ते, عربى",
    "e\u0301 (combining accent) + ﬁ ligature + 𝔘𝔫𝔦 + ½ + \x00\x07 controls",
    "tabs\tand\nnewlines   and   many    spaces",
]
PARTS = {
    "unet": ["config.json", "diffusion_pytorch_model.safetensors"],
    "vae": ["config.json", "diffusion_pytorch_model.safetensors"],
    "text_encoder": ["config.json", "model.safetensors"],
    "tokenizer": ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"],
    "scheduler": ["scheduler_config.json"],
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny.write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_state_matches_file(module: torch.nn.Module, weights: Path) -> None:
    """The loaded module holds exactly the saved tensors: same keys, same values (nothing re-initialised)."""
    saved = load_file(weights)
    state = module.state_dict()
    assert set(state) == set(saved)
    for name, tensor in saved.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


# --- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_round_trip(tokenizer):
    ids = tokenizer(SENTENCE).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == len(SENTENCE.split()) + 2  # one token per word thanks to the merges
    assert tokenizer.decode(ids, skip_special_tokens=True) == SENTENCE
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.bos_token == "<|startoftext|>"


def test_tokenizer_merge_words_are_single_tokens(tokenizer):
    for word in tiny._WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"], word


def test_tokenizer_vocab_covers_every_byte():
    vocab, merges = tiny.tiny_vocab_and_merges()
    chars = tiny._bytes_to_unicode().values()
    assert len(set(chars)) == 256
    for c in chars:
        assert c in vocab and c + "</w>" in vocab
    for a, b in merges:
        assert a + b in vocab
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert vocab["<|endoftext|>"] == len(vocab) - 1 and vocab["<|startoftext|>"] == len(vocab) - 2


@pytest.mark.parametrize("prompt", UNICODE_PROMPTS)
def test_tokenizer_any_unicode(tokenizer, prompt):
    ids = tokenizer(prompt).input_ids
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    # unk is <|endoftext|>: no special id inside means every character was covered by byte tokens.
    assert not specials & set(ids[1:-1])
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    # CLIP normalises (NFC, lowercase, whitespace runs) and drops whitespace between words. casefold on
    # both sides: tokenizers lowercases char by char, Python's lower() knows the Greek final sigma.
    expected = unicodedata.normalize("NFC", prompt)
    assert "".join(decoded.split()).casefold() == "".join(expected.split()).casefold()


def test_tokenizer_pads_and_truncates_to_77(tokenizer):
    long_prompt = " ".join([SENTENCE] * 30)
    for prompt in (SENTENCE, long_prompt):
        ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=77).input_ids
        assert len(ids) == 77
    short = tokenizer(SENTENCE, padding="max_length", max_length=77).input_ids
    n = len(SENTENCE.split()) + 2
    assert short[n:] == [tokenizer.pad_token_id] * (77 - n)


def test_tokenizer_reloads_identically(tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    with pytest.raises(FileExistsError, match="not empty"):
        tiny.write_tiny_tokenizer(Path(tokenizer.name_or_path))

    tokenizer.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    for prompt in [SENTENCE, *UNICODE_PROMPTS]:
        assert again(prompt).input_ids == tokenizer(prompt).input_ids


# --- model parts -------------------------------------------------------------------------------------


def test_text_encoder_matches_tokenizer_and_keeps_global_rng(tokenizer):
    rng = torch.get_rng_state()
    encoder = tiny.tiny_text_encoder(len(tokenizer), seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    cfg = encoder.config
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    ids = tokenizer([SENTENCE], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder(ids)
    assert out.last_hidden_state.shape == (1, 77, 32)
    assert torch.isfinite(out.last_hidden_state).all()


def test_vae_downsamples_by_8_and_keeps_global_rng():
    rng = torch.get_rng_state()
    vae = tiny.tiny_vae(seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    image = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent = vae.encode(image).latent_dist.mode()
        decoded = vae.decode(latent).sample
    assert latent.shape == (1, 4, 8, 6)
    assert decoded.shape == image.shape
    assert vae.config.scaling_factor == 0.18215


def test_perturb_parameters_fills_zero_params_deterministically():
    def make() -> torch.nn.Module:
        torch.manual_seed(123)
        net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.GroupNorm(2, 6), torch.nn.Linear(6, 3))
        torch.nn.init.zeros_(net[2].weight)
        torch.nn.init.zeros_(net[2].bias)
        return net

    before = dict(make().named_parameters())
    a, b, c = (
        tiny.perturb_parameters_(make(), 7),
        tiny.perturb_parameters_(make(), 7),
        tiny.perturb_parameters_(make(), 8),
    )

    # Reference: the documented rule, written out (sorted names, one generator, zero params only).
    gen = torch.Generator().manual_seed(7)
    for name, param in sorted(a.named_parameters()):
        if torch.count_nonzero(before[name]) == 0:
            expected = torch.randn(param.shape, generator=gen) * 0.02
        else:
            expected = before[name]
        torch.testing.assert_close(param.detach(), expected.detach(), rtol=0, atol=0, msg=name)
        assert torch.count_nonzero(param) > 0, name
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert torch.equal(pa, pc) == (torch.count_nonzero(before[name]) > 0), name


# --- folders -----------------------------------------------------------------------------------------


def test_pipeline_folder_has_every_part(tiny_pipeline_dir):
    for part, files in PARTS.items():
        for name in files:
            assert (tiny_pipeline_dir / part / name).is_file(), f"{part}/{name}"
    assert "random" in (tiny_pipeline_dir / "README.md").read_text().lower()
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == "PixelDancePipeline"
    assert index["unet"] == ["pdengine", "UNet3D"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert "_pdengine_version" in index
    # Only the finished folder is left in the parent: no temp folder.
    assert [p.name for p in tiny_pipeline_dir.parent.iterdir()] == [tiny_pipeline_dir.name]


def test_pipeline_parts_reload(tiny_pipeline_dir):
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from pdengine.model import UNet3D

    root = tiny_pipeline_dir
    unet = UNet3D.from_pretrained(root / "unet")
    _assert_state_matches_file(unet, root / "unet" / "diffusion_pytorch_model.safetensors")
    unet_config = json.loads((root / "unet" / "config.json").read_text())
    assert unet_config["_class_name"] == "UNet3DConditionModel"
    assert (unet_config["in_channels"], unet_config["out_channels"]) == (8, 4)
    assert unet_config["cross_attention_dim"] == 32

    vae = AutoencoderKL.from_pretrained(root / "vae")
    _assert_state_matches_file(vae, root / "vae" / "diffusion_pytorch_model.safetensors")
    encoder = CLIPTextModel.from_pretrained(root / "text_encoder")
    _assert_state_matches_file(encoder, root / "text_encoder" / "model.safetensors")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    assert encoder.config.vocab_size == len(tokenizer)
    assert encoder.config.eos_token_id == tokenizer.eos_token_id
    assert encoder.config.hidden_size == unet_config["cross_attention_dim"]

    scheduler = DDIMScheduler.from_pretrained(root / "scheduler")
    reference = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    for key in ("beta_schedule", "beta_start", "beta_end", "clip_sample", "set_alpha_to_one", "steps_offset"):
        assert scheduler.config[key] == reference.config[key], key
    torch.testing.assert_close(scheduler.alphas_cumprod, reference.alphas_cumprod, rtol=0, atol=0)


def test_pipeline_weights_have_no_all_zero_tensor(tiny_pipeline_dir):
    for part in ("unet", "vae", "text_encoder"):
        for path in (tiny_pipeline_dir / part).glob("*.safetensors"):
            for name, tensor in load_file(path).items():
                assert torch.count_nonzero(tensor) > 0, f"{part}: {name}"


def test_modelscope_folder_loads_in_diffusers(tiny_modelscope_dir):
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    index = json.loads((tiny_modelscope_dir / "model_index.json").read_text())
    assert index["_class_name"] == "TextToVideoSDPipeline"
    assert index["unet"] == ["diffusers", "UNet3DConditionModel"]
    pipe = TextToVideoSDPipeline.from_pretrained(tiny_modelscope_dir)
    assert type(pipe.unet) is UNet3DConditionModel
    assert pipe.unet.config.in_channels == 4
    _assert_state_matches_file(
        pipe.unet, tiny_modelscope_dir / "unet" / "diffusion_pytorch_model.safetensors"
    )
    frames = pipe(
        SENTENCE,
        num_inference_steps=2,
        height=32,
        width=32,
        num_frames=3,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert frames.shape == (1, 3, 3, 32, 32)
    assert torch.isfinite(frames).all()


def test_build_is_deterministic(tiny_pipeline_dir, tmp_path):
    same = _files(tiny.write_tiny_pipeline(tmp_path / "same", seed=0))
    assert same == _files(tiny_pipeline_dir)
    other = _files(tiny.write_tiny_pipeline(tmp_path / "other", seed=1))
    assert set(other) == set(same)
    for name in same:
        if name.endswith(".safetensors"):
            assert other[name] != same[name], name
            a, b = load_file(tmp_path / "same" / name), load_file(tmp_path / "other" / name)
            assert any(not torch.equal(a[k], b[k]) for k in a), name


def test_overwrite_protection(tmp_path):
    out = tmp_path / "model"
    out.mkdir()  # an empty folder is fine to fill
    tiny.write_tiny_pipeline(out, seed=0)
    before = _files(out)
    with pytest.raises(FileExistsError, match="not empty"):
        tiny.write_tiny_pipeline(out, seed=1)
    assert _files(out) == before
    (out / "stale.txt").write_text("old")
    tiny.write_tiny_pipeline(out, seed=1, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert _files(out) != before
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        tiny.write_tiny_pipeline(tmp_path / "file", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "model"]


def test_crash_leaves_nothing(tmp_path, monkeypatch):
    def broken():
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(tiny, "_ddim_scheduler", broken)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny.write_tiny_pipeline(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        tiny.write_tiny_pipeline(tmp_path / "a", layout="sd")
    with pytest.raises(ValueError, match="in_channels=4"):
        tiny.write_tiny_pipeline(tmp_path / "b", layout="modelscope", unet_in_channels=8)
    with pytest.raises(ValueError, match="outside the vocab"):
        tiny.tiny_text_encoder(10, eos_token_id=10)
    assert list(tmp_path.iterdir()) == []


def test_tiny_random_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("PDENGINE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tiny.tiny_random_dir() == tmp_path / "home" / ".cache" / "pdengine" / "tiny-random"

    monkeypatch.setenv("PDENGINE_CACHE", str(tmp_path / "cache"))
    path = tiny.ensure_tiny_random()
    assert path == tiny.tiny_random_dir() == tmp_path / "cache" / "tiny-random"
    built = _files(path)
    assert json.loads(built["model_index.json"])["_class_name"] == "PixelDancePipeline"
    assert json.loads(built["unet/config.json"])["in_channels"] == 8

    calls = []
    monkeypatch.setattr(tiny, "write_tiny_pipeline", lambda *a, **k: calls.append(a))
    assert tiny.ensure_tiny_random() == path and calls == []  # cached: not rebuilt
    monkeypatch.undo()

    # A folder from another pdengine version is rebuilt (the UNet format may have changed).
    monkeypatch.setenv("PDENGINE_CACHE", str(tmp_path / "cache"))
    index = json.loads(built["model_index.json"])
    (path / "model_index.json").write_text(json.dumps({**index, "_pdengine_version": "0.0.0-old"}))
    assert tiny.ensure_tiny_random() == path
    assert _files(path) == built
