"""Evaluation: greedy Acc@1 and sampled Acc@k (T=1.0) with answer extraction from the reasoning format."""

from __future__ import annotations

import torch

from ..config import check_eval_k
from ..data.answers import is_correct
from ..data.examples import Example
from ..data.rng import fork_rng
from .health import truncated_rows
from .rollout import HFRolloutEngine
from .views import PromptBuilder


@torch.no_grad()
def evaluate(model, processor, examples: list[Example], *, k: int = 4, batch_size: int = 64,
             max_new_tokens: int = 48, with_image: bool = True, system_prompt: str | None = None,
             seed: int = 0, device=None, return_completions: bool = False) -> dict:
    """Greedy Acc@1 and, from k samples per prompt at T=1.0, Acc@k (a prompt counts when any of its k samples
    is correct) and Mean@k (the share of correct samples); ``k`` = 0 (greedy only) or >= 2. The global RNG
    states (CPU and CUDA) are left as they were.

    Returns {"n", "acc@1", ["acc@k", "mean@k"], "truncated" (share of greedy responses cut at
    ``max_new_tokens``), "view", "samples" (the first five), and with ``return_completions`` "completions"
    (every greedy text), "correct" (whether each is correct), "truncated_each" (whether each was cut)}."""
    check_eval_k(k, "k")
    builder = PromptBuilder(processor, system_prompt)
    tok = builder.tokenizer
    engine = HFRolloutEngine(tok, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                             vocab_rows=model.get_output_embeddings().weight.shape[0])
    device = device or next(model.parameters()).device
    greedy_ok, sampled_ok, sampled_mean, n, truncated = 0, 0, 0, 0, 0
    samples, completions, correct, cut = [], [], [], []
    with fork_rng():
        torch.manual_seed(seed)
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            enc = {k_: (v.to(device) if torch.is_tensor(v) else v)
                   for k_, v in builder.encode(chunk, with_image).items()}
            ids, mask = engine.generate(model, enc, do_sample=False)
            texts = tok.batch_decode(ids.masked_fill(~mask, tok.pad_token_id), skip_special_tokens=True)
            ok = [is_correct(t, ex.answer) for t, ex in zip(texts, chunk)]
            greedy_ok += sum(ok)
            cut_each = truncated_rows(ids, engine.eos_ids).tolist()
            truncated += sum(cut_each)
            if return_completions:
                completions += texts
                correct += ok
                cut += cut_each
            if len(samples) < 5:
                samples += [{"question": ex.question, "answer": ex.answer, "greedy": t}
                            for ex, t in zip(chunk, texts)][:5 - len(samples)]
            if k > 0:
                any_ok = [False] * len(chunk)
                for _ in range(k):
                    sids, smask = engine.generate(model, enc, do_sample=True)
                    stexts = tok.batch_decode(sids.masked_fill(~smask, tok.pad_token_id), skip_special_tokens=True)
                    s_ok = [is_correct(t, ex.answer) for t, ex in zip(stexts, chunk)]
                    sampled_mean += sum(s_ok)
                    any_ok = [a or b for a, b in zip(any_ok, s_ok)]
                sampled_ok += sum(any_ok)
            n += len(chunk)
    out = {"n": n, "acc@1": greedy_ok / max(n, 1), "truncated": truncated / max(n, 1),
           "view": "image" if with_image else "text", "samples": samples}
    if return_completions:
        out.update(completions=completions, correct=correct, truncated_each=cut)
    if k > 0:
        out[f"acc@{k}"] = sampled_ok / max(n, 1)
        out[f"mean@{k}"] = sampled_mean / max(n * k, 1)
    return out
