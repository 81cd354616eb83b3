"""Pretraining the demo's tiny CLIP text encoder on its caption grammar, before it is frozen.

PixelDance reads a *pretrained* frozen CLIP: every hidden state of a caption already says what the caption
is about. A randomly initialised CLIPTextModel does not: its causal layers spread each word thinly over the
later positions, so in the ~70 padding positions (most of what cross-attention sees) "left" and "right"
differ by 5% of the state's norm, "grows" and "shrinks" by 9% (the earlier demo's encoder, mean over positions).
The earlier demo UNet, trained on that encoder (6,000 steps), read the colour words but not the motion words: its
held-out loss did not move when "left" becomes "right" or "grows" becomes "shrinks" (engine/demo/README.md). After pretraining as below
(600 steps on all 183 captions: 79 s on one CPU core, every (caption, position) read back exactly) the two
pairs differ by 71% and 81%.

The stand-in for CLIP's pretraining here: a linear head on *every* output position predicts the bag of
words that position can see (the caption's word tokens up to it, causal; at EOS and the padding after it,
the whole caption), binary cross-entropy per word the captions use. The empty prompt's positions predict
nothing. Afterwards the head is thrown away and the encoder is frozen; each padding position then carries
every word of its caption in a linearly readable form, whatever the UNet attends to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def visible_words(input_ids: torch.Tensor, special_ids: Sequence[int], vocab_size: int,
                  eos_token_id: int) -> torch.Tensor:
    """Targets (N, L, V): position p of caption n is multi-hot over the word tokens (ids not in
    `special_ids`) among its tokens 0..p, and positions after its first EOS repeat the EOS position's."""
    n, length = input_ids.shape
    word = torch.ones_like(input_ids, dtype=torch.bool)
    for sid in special_ids:
        word &= input_ids != sid
    is_eos = input_ids == eos_token_id
    # 0 before the first EOS, 1 at and after it: words after the first EOS (there are none in a padded
    # caption, but a user's ids may hold them) are not visible to the positions that follow.
    after_eos = is_eos.int().cumsum(1) > 0
    one_hot = F.one_hot(input_ids, vocab_size).float() * (word & ~after_eos).unsqueeze(-1).float()
    return (one_hot.cumsum(1) > 0).float()


def pretrain_text_encoder(text_encoder, tokenizer, captions: Sequence[str], *, steps: int = 600,
                          lr: float = 1e-2, seed: int = 0) -> dict:
    """Train `text_encoder` (a transformers CLIPTextModel) in place on `captions` (the empty prompt is added)
    with the objective of the module docstring; returns {"steps", "loss" (final), "exact" (share of
    (caption, position) pairs whose thresholded prediction equals the target), "captions"}. Deterministic
    for a seed at a given CPU thread count. The encoder is left in eval mode with gradients off."""
    if steps < 1:
        raise ValueError(f"text-encoder pretraining needs steps >= 1, got {steps}")
    prompts = sorted(set(captions) | {""})
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    config = text_encoder.config
    special = sorted({config.bos_token_id, config.eos_token_id, config.pad_token_id})
    target = visible_words(ids, special, config.vocab_size, config.eos_token_id)
    target = target[..., target.flatten(0, 1).any(0)]  # only the tokens the captions use: one column each
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(config.hidden_size, target.shape[-1])
    text_encoder.train().requires_grad_(True)
    params = [*text_encoder.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        logits = head(text_encoder(ids).last_hidden_state)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    text_encoder.eval().requires_grad_(False)
    with torch.no_grad():
        pred = head(text_encoder(ids).last_hidden_state) > 0
        exact = (pred == target.bool()).all(-1).float().mean()
    return {"steps": steps, "loss": loss.item(), "exact": float(exact), "captions": len(prompts)}
