"""Pretraining the demo's tiny text encoder on its caption grammar (train/text_pretrain.py)."""

import torch
from transformers import CLIPTokenizer

from pdengine.engine.tiny import tiny_text_encoder, write_tiny_tokenizer
from pdengine.train.synth import all_captions, caption, sample_spec, vocabulary
from pdengine.train.text_pretrain import pretrain_text_encoder, visible_words


def test_all_captions_holds_every_caption_the_generator_writes():
    import numpy as np

    space = set(all_captions())
    for i in range(300):
        rng = np.random.default_rng([9, i])
        spec = sample_spec(rng, "still" if i % 4 == 0 else None)
        assert caption(spec, rng) in space
    assert {w for c in space for w in c.split()} == set(vocabulary())


def test_visible_words_against_a_loop():
    eos, bos, vocab = 9, 8, 10
    ids = torch.tensor([[bos, 3, 1, 3, eos, eos, eos], [bos, eos, eos, eos, eos, eos, eos], [bos, 2, 5, 4, 6, 7, eos]])
    got = visible_words(ids, [bos, eos], vocab, eos)
    for n in range(ids.shape[0]):
        for p in range(ids.shape[1]):
            seen, done = set(), False
            for q in range(p + 1):
                tok = int(ids[n, q])
                done |= tok == eos
                if not done and tok not in (bos, eos):
                    seen.add(tok)
            assert set(torch.nonzero(got[n, p]).flatten().tolist()) == seen, (n, p)


def _encoder(folder, seed=0):
    tok = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(folder, words=vocabulary()))
    te = tiny_text_encoder(len(tok), seed, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    return tok, te


def _pad_states(te, tok, prompts):
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return te(ids).last_hidden_state[:, 12:]  # padding positions of these short captions


def test_pretraining_makes_every_padding_position_carry_the_words(tmp_path):
    captions = [c for c in all_captions() if c.startswith(("a red circle", "a blue square", "the camera"))]
    tok, te = _encoder(tmp_path / "a")
    pair = ["a red circle moves to the left", "a red circle moves to the right"]

    def separation():  # distance of the two captions' padding states, relative to their size
        h = _pad_states(te, tok, pair)
        return ((h[0] - h[1]).norm(dim=-1) / h[0].norm(dim=-1)).mean().item()

    before = separation()
    stats = pretrain_text_encoder(te, tok, captions, steps=150, seed=0)
    assert stats["captions"] == len(captions) + 1 and stats["steps"] == 150
    assert stats["exact"] >= 0.99 and stats["loss"] < 0.05
    assert separation() > 5 * before
    assert not any(p.requires_grad for p in te.parameters()) and not te.training
    # deterministic for a seed
    tok2, te2 = _encoder(tmp_path / "b", seed=0)
    pretrain_text_encoder(te2, tok2, captions, steps=150, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(te.state_dict().values(), te2.state_dict().values()))
