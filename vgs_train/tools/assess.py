"""Measuring one model on the embedded task, for the demo and the study: greedy and sampled accuracy (overall,
per question type, with and without the image), the phrasing of its greedy answers, degenerate answers, its
divergences to the teacher, and the outcome flags of a distillation run (collapsed, no gain)."""

from __future__ import annotations

import re

import torch

from ..data import synthetic
from ..data.rng import fork_rng
from .stats import accuracy_se

SAMPLES = 4  # sampled accuracy: the mean over this many samples per question at T = 1
_REPEAT = re.compile(r"\b(\w+)(?:\W+\1\b){2,}", re.IGNORECASE)  # one word three times in a row


def looping(text: str) -> bool:
    """A word repeated three times in a row ("I see a a a", "picture picture picture")."""
    return _REPEAT.search(text) is not None


@torch.no_grad()
def distill_gap(student, teacher, processor, rows, loss_kwargs: dict, *, batch_size: int = 50,
                max_new_tokens: int = 40, seed: int = 0) -> dict:
    """Mean std / vis / lang KL and the teacher's VDS of ``student`` against ``teacher`` per response token
    of the student's own samples (T = 1) to ``rows``, and the prior gap (``vgs_train.pipeline.health.prior_gap``)."""
    from ..models.modeling import lm_head_rows
    from ..pipeline.health import prior_gap_terms
    from ..pipeline.pipe import Pipeline
    from ..pipeline.rollout import HFRolloutEngine
    from ..pipeline.views import PromptBuilder

    builder = PromptBuilder(processor)
    tok = builder.tokenizer
    engine = HFRolloutEngine(tok, max_new_tokens=max_new_tokens, vocab_rows=lm_head_rows(student))
    pipe = Pipeline(student, teacher, builder, engine, len(tok), {**loss_kwargs, "mode": "vgs", "return_per_token": True})
    sums, count, gap_sum, gap_n = {"std": 0.0, "vis": 0.0, "lang": 0.0, "vds": 0.0}, 0, 0.0, 0
    with fork_rng():
        torch.manual_seed(seed)
        for i in range(0, len(rows), batch_size):
            views = pipe.sample(rows[i:i + batch_size]).views
            out = pipe.loss(pipe.hidden(views), views.mask)
            n = int(views.mask.sum())
            for k in sums:
                sums[k] += out.metrics[k] * n
            count += n
            total, n_low = prior_gap_terms(out.per_token, views.mask)
            gap_sum += float(total)
            gap_n += n_low
    res = {k: v / max(count, 1) for k, v in sums.items()}
    res["prior_gap"] = gap_sum / gap_n if gap_n else float("nan")
    return res


@torch.no_grad()
def own_phrasing_preference(model, processor, rows, *, batch_size: int = 50) -> float:
    """How much ``model`` prefers the student's words to the teacher's for its reasoning, as a soft score:
    the mean over ``rows`` (image view) of P(own) / (P(own) + P(teacher's)), P the probability of the
    phrasing's opening ("<reason>I see a" against "<reason>The picture shows a"). Not a share of answers
    (``assess``'s ``own_phrasing_share`` is): a preference of 0.6 can mean every greedy answer in the
    student's words."""
    from ..loops.embedded import encode_targets
    from ..pipeline.views import PromptBuilder, append_completion, response_hidden

    builder = PromptBuilder(processor)
    tok = builder.tokenizer
    openings = [synthetic.reference_response(synthetic.PHRASINGS[p].split("{")[0].rstrip(), "")
                .replace("</reason>", "") for p in ("student", "teacher")]
    total = 0.0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        enc = builder.encode(chunk, with_image=True)
        logp = []
        for text in openings:
            ids, mask = encode_targets(tok, [text] * len(chunk))
            ids, mask = ids[:, :-1], mask[:, :-1]  # without the end token encode_targets appends
            h = response_hidden(model, append_completion(enc, ids, mask), ids.shape[1])
            lp = torch.log_softmax(model.get_output_embeddings()(h).float(), -1)
            logp.append(lp.gather(-1, ids[..., None])[..., 0].masked_fill(~mask, 0).sum(1))
        total += float(torch.sigmoid(logp[0] - logp[1]).sum())
    return total / len(rows)


def _share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else float("nan")


def assess(model, teacher, processor, rows, loss_kwargs: dict, max_new_tokens: int, *, with_image: bool = True,
           gap: bool = True, sampled: bool = True, text_only: bool = True) -> dict:
    """One model on ``rows`` (with the image unless ``with_image`` is False):

    * ``acc`` greedy accuracy; ``acc_by_type`` {colour, shape}; ``acc_sampled`` the mean accuracy of
      ``SAMPLES`` samples per question at T = 1 (``sampled``); ``acc_text`` greedy accuracy without the
      image (``text_only``, image view only);
    * ``own_phrasing_share`` / ``teacher_phrasing_share``: the share of greedy answers whose reasoning opens
      in the student's / the teacher's words; ``own_phrasing_pref`` the soft preference (image view only);
    * ``truncated`` the share of greedy answers that never end; ``degenerate`` the share that never end or
      repeat a word three times in a row;
    * with ``gap``: the divergences to ``teacher`` on the student's own samples (:func:`distill_gap`)."""
    from ..pipeline.evaluate import evaluate

    k = SAMPLES if sampled else 0
    r = evaluate(model, processor, rows, k=k, max_new_tokens=max_new_tokens, with_image=with_image,
                 return_completions=True)
    texts = r["completions"]
    kinds = [synthetic.phrasing_of(t) for t in texts]
    types = [synthetic.question_type(row.question) for row in rows]
    out = {"acc": r["acc@1"], "n": r["n"],
           "acc_by_type": {t: _share(ok for ok, ty in zip(r["correct"], types) if ty == t)
                           for t in synthetic.QUESTION_TYPES},
           "truncated": r["truncated"],
           "degenerate": _share(cut or looping(t) for cut, t in zip(r["truncated_each"], texts)),
           "own_phrasing_share": kinds.count("student") / len(kinds),
           "teacher_phrasing_share": kinds.count("teacher") / len(kinds), "sample": texts[0]}
    if sampled:
        out["acc_sampled"] = r[f"mean@{k}"]
    if with_image:
        out["own_phrasing_pref"] = own_phrasing_preference(model, processor, rows)
        if text_only:
            out["acc_text"] = evaluate(model, processor, rows, k=0, max_new_tokens=max_new_tokens,
                                       with_image=False)["acc@1"]
    if gap:
        out.update(distill_gap(model, teacher, processor, rows, loss_kwargs, max_new_tokens=max_new_tokens))
    return out


def outcome(run: dict, initial: dict, window: int) -> dict:
    """The outcome flags of a distillation ``run`` (its ``assess`` result and its ``history``) against the
    ``initial`` student's ``assess`` result:

    * ``collapsed``: most greedy answers degenerate (never end, or loop), or the rollout accuracy of the last
      ``window`` training steps is near 0 (< 0.05): the run is broken, whatever its accuracy;
    * ``no_gain``: not collapsed, and greedy accuracy under the initial student's + 2 standard errors (what
      the evaluation's noise alone could give)."""
    tail = [m["rollout_acc"] for m in run["history"][-window:] if m["rollout_acc"] == m["rollout_acc"]]
    final_rollout_acc = sum(tail) / len(tail) if tail else float("nan")
    collapsed = run["degenerate"] > 0.5 or final_rollout_acc < 0.05
    bar = initial["acc"] + 2 * accuracy_se(initial["acc"], initial["n"])
    return {"collapsed": bool(collapsed), "no_gain": bool(not collapsed and run["acc"] < bar),
            "final_rollout_acc": final_rollout_acc, "no_gain_bar": bar}
