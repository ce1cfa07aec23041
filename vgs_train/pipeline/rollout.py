"""Rollout generation. ``HFRolloutEngine`` samples with HF ``generate``; an engine is any object with
``generate(model, prompt_inputs, *, do_sample) -> (completion_ids [B, T], completion_mask [B, T])`` so a
vLLM engine can replace it (register it in ``ENGINES``)."""

from __future__ import annotations

import torch

from ..config import RolloutConfig

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def completion_mask_from(ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """True up to and including the first EOS (all True when no EOS: truncated)."""
    is_eos = torch.zeros_like(ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= ids == e
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return ~after


class HFRolloutEngine:
    def __init__(self, tokenizer, *, max_new_tokens: int = 48, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, vocab_rows: int | None = None):
        self.tokenizer = tokenizer
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        ids = tokenizer.convert_tokens_to_ids
        self.eos_ids = sorted({i for i in (ids("<|im_end|>"), ids("<|endoftext|>"), tokenizer.eos_token_id)
                               if i is not None and i >= 0})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        unk = tokenizer.unk_token_id
        self.blocked = sorted({i for i in (ids(t) for t in VISION_TOKENS) if i is not None and i != unk})
        n = len(tokenizer)
        if vocab_rows and vocab_rows > n:  # lm_head rows beyond the tokenizer's ids are never sampled
            self.blocked += list(range(n, vocab_rows))

    @torch.no_grad()
    def generate(self, model, prompt: dict, *, do_sample: bool = True, max_new_tokens: int | None = None):
        inner = getattr(model, "module", model)
        was_training = inner.training
        inner.eval()
        base = getattr(inner, inner.base_model_prefix, inner)
        if hasattr(base, "rope_deltas"):
            base.rope_deltas = None
        kw = {k: prompt[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                     "image_grid_thw") if prompt.get(k) is not None}
        sampling = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k) \
            if do_sample else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        try:
            out = inner.generate(**kw, max_new_tokens=max_new_tokens or self.max_new_tokens,
                                 eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                                 suppress_tokens=self.blocked or None, use_cache=True, **sampling)
        finally:
            inner.train(was_training)
        completion = out[:, prompt["input_ids"].shape[1]:]
        if completion.shape[1] == 0:
            completion = completion.new_full((out.shape[0], 1), self.eos_ids[0])
        mask = completion_mask_from(completion, self.eos_ids)
        completion = completion.masked_fill(~mask, self.pad_id)
        return completion, mask


ENGINES = {"hf": HFRolloutEngine}  # the names are config.ROLLOUT_ENGINES (checked at load time)


def build_engine(rc: RolloutConfig, tokenizer, vocab_rows: int | None = None):
    """The ``rollout.engine`` of a config with its sampling settings; ``vocab_rows``: the student's lm_head
    rows (those beyond the tokenizer are never sampled)."""
    return ENGINES[rc.engine](tokenizer, max_new_tokens=rc.max_new_tokens, temperature=rc.temperature,
                              top_p=rc.top_p, top_k=rc.top_k, vocab_rows=vocab_rows)
