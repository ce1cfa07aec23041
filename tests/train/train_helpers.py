"""Shared helpers of the vgs_train tests (offline, CPU, seconds): tiny config overrides, a tiny world (a
random teacher and student whose hidden sizes differ, on a few synthetic rows), its pipeline, and
hand-written (materialised) KL terms as the oracle."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = [
    "embedded.n_train=24", "embedded.n_eval=6", "embedded.teacher_sft_steps=2", "embedded.student_sft_steps=2",
    "embedded.sft_batch_size=4", "rollout.max_new_tokens=8", "optim.batch_size=2", "optim.lr=1e-3",
    "run.progress=false", "run.tensorboard=false", "run.save_every=0", "eval.at_end=false", "eval.k=0",
]


def tiny_overrides(cache_dir, out_dir=None, *extra):
    o = TINY + [f"embedded.cache_dir={cache_dir}"]
    if out_dir is not None:
        o.append(f"run.out_dir={out_dir}")
    return o + list(extra)


def build_world(tmp_dir, n_rows=8):
    from vgs_train.data import synthetic
    from vgs_train.data.examples import load_jsonl
    from vgs_train.loops.embedded import build_tokenizer
    from vgs_train.models.tiny import TinyModelConfig, build_processor, build_tiny_model

    synthetic.write_task(str(tmp_dir), n_rows, seed=5, size=32)
    tok = build_tokenizer("task")
    proc = build_processor(tok, 32 * 32, 32 * 32)
    student = build_tiny_model(TinyModelConfig(), tok, seed=1)
    teacher = build_tiny_model(TinyModelConfig(hidden_size=96, num_attention_heads=6, intermediate_size=192),
                               tok, seed=2).requires_grad_(False)
    rows = load_jsonl(os.path.join(str(tmp_dir), "train.jsonl"))
    return {"tok": tok, "proc": proc, "student": student, "teacher": teacher, "rows": rows, "vocab": len(tok)}


def pipeline(world, max_new_tokens=8, **loss_kwargs):
    """A Pipeline over the world's models (the engine samples at most ``max_new_tokens``)."""
    from vgs_train.pipeline.pipe import Pipeline
    from vgs_train.pipeline.rollout import HFRolloutEngine
    from vgs_train.pipeline.views import PromptBuilder

    eng = HFRolloutEngine(world["tok"], max_new_tokens=max_new_tokens,
                          vocab_rows=world["student"].get_output_embeddings().weight.shape[0])
    return Pipeline(world["student"], world["teacher"], PromptBuilder(world["proc"]), eng, world["vocab"],
                    dict(loss_kwargs))


def sample(world, n=4, max_new_tokens=8, seed=0, samples_per_prompt=1):
    torch.manual_seed(seed)
    return pipeline(world, max_new_tokens).sample(world["rows"][:n], samples_per_prompt).views


def kl(log_a, log_b):
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def direct_terms(world, views, temperature=1.0):
    """Per-token std, vis, lang, vds [B, T] by hand from materialised logits (autograd graph kept)."""
    from vgs_train.pipeline.views import four_view_hidden

    s, t, V = world["student"], world["teacher"], world["vocab"]
    hs, hsp, ht, htp = four_view_hidden(s, t, views)
    ws, wt = s.get_output_embeddings().weight[:V], t.get_output_embeddings().weight[:V]
    zs, zsp = hs @ ws.T / temperature, hsp @ ws.T / temperature
    zt, ztp = (ht @ wt.T / temperature).detach(), (htp @ wt.T / temperature).detach()
    ls, lsp = torch.log_softmax(zs, -1), torch.log_softmax(zsp, -1)
    lt, ltp = torch.log_softmax(zt, -1), torch.log_softmax(ztp, -1)
    lr = torch.log_softmax(zsp.detach() + zt - ztp, -1)
    return {"std": kl(ls, lt), "vis": kl(ls, lr), "lang": kl(lsp, ltp), "vds": kl(lt, ltp).detach()}


def sequence_mean(x, mask):
    m = mask.float()
    per_seq = (x * m).sum(1) / m.sum(1).clamp(min=1)
    return per_seq[m.sum(1) > 0].mean()


def flat_grad(loss, params, retain_graph=True):
    gs = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double() for g, p in zip(gs, params)])
