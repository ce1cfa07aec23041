"""The four views: identical completion ids, aligned hidden states equal to a direct per-example
computation, position ids computed per view, tokenizer checks."""

import os

import pytest
import torch

from vgs_train.data import synthetic
from vgs_train.data.examples import load_jsonl
from vgs_train.loops.embedded import build_tokenizer
from vgs_train.models.modeling import check_same_tokenizer
from vgs_train.models.tiny import TinyModelConfig, build_processor, build_tiny_model
from vgs_train.pipeline.rollout import HFRolloutEngine
from vgs_train.pipeline.views import (
    PromptBuilder,
    build_views,
    decoder_hidden,
    four_view_hidden,
    position_ids_for,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    synthetic.write_task(str(d), 6, seed=3, size=32)
    tok = build_tokenizer("task")
    proc = build_processor(tok, 32 * 32, 64 * 64)
    student = build_tiny_model(TinyModelConfig(), tok, seed=1)
    teacher = build_tiny_model(TinyModelConfig(hidden_size=96, num_attention_heads=6, intermediate_size=192),
                               tok, seed=2)
    rows = load_jsonl(str(d / "train.jsonl"))
    # a second image size in the batch makes the image prompts differ in length too
    from PIL import Image

    rows[1].image = Image.open(rows[1].image).convert("RGB").resize((64, 32))
    return tok, proc, student, teacher, rows


def _views(world, n=4, max_new_tokens=10, seed=0):
    tok, proc, student, teacher, rows = world
    b = PromptBuilder(proc)
    img, txt = b.encode(rows[:n], True), b.encode(rows[:n], False)
    eng = HFRolloutEngine(tok, max_new_tokens=max_new_tokens,
                          vocab_rows=student.get_output_embeddings().weight.shape[0])
    torch.manual_seed(seed)
    comp, mask = eng.generate(student, img, do_sample=True)
    return build_views(img, txt, comp, mask), eng


def test_views_share_completion_ids(world):
    v, eng = _views(world)
    tok = world[0]
    s_img, s_txt = v.image["response_start"], v.text["response_start"]
    assert s_img > s_txt  # the image view's prompt is longer
    T = v.completion_ids.shape[1]
    assert torch.equal(v.image["input_ids"][:, s_img:s_img + T], v.completion_ids)
    assert torch.equal(v.text["input_ids"][:, s_txt:s_txt + T], v.completion_ids)
    assert torch.equal(v.image["mm_token_type_ids"][:, s_img:], torch.zeros_like(v.completion_ids))
    img_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert (v.image["input_ids"] == img_id).any() and not (v.text["input_ids"] == img_id).any()
    assert "pixel_values" not in v.text and "image_grid_thw" in v.image
    # no vision tokens are ever sampled
    assert not torch.isin(v.completion_ids, torch.tensor(eng.blocked)).any()
    # the mask stops after the first EOS
    for row, m in zip(v.completion_ids, v.mask):
        ends = [i for i, t in enumerate(row.tolist()) if t in eng.eos_ids]
        if ends:
            assert m[:ends[0] + 1].all() and not m[ends[0] + 1:].any()


def _direct_hidden(model, proc, example, completion, with_image):
    """One example, no padding, positions computed by the model itself from scratch."""
    b = PromptBuilder(proc)
    enc = b.encode([example], with_image)
    ids = torch.cat([enc["input_ids"], completion[None]], 1)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
              mm_token_type_ids=torch.cat([enc["mm_token_type_ids"], torch.zeros_like(completion[None])], 1))
    if with_image:
        kw.update(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
    base = model.model
    base.rope_deltas = None
    h = base(**kw).last_hidden_state[0]
    P = enc["input_ids"].shape[1]
    return h[P - 1: P - 1 + completion.numel()]


def test_gathered_hidden_equal_direct(world):
    tok, proc, student, teacher, rows = world
    v, _ = _views(world)
    hs, hsp, ht, htp = four_view_hidden(student, teacher, v)
    assert hs.shape[:2] == v.mask.shape and ht.shape[-1] == 96 and hs.shape[-1] == 64
    assert hs.requires_grad and not ht.requires_grad
    for i in range(v.mask.shape[0]):
        n = int(v.mask[i].sum())
        comp = v.completion_ids[i, :n]
        for got, model, with_image in ((hs, student, True), (hsp, student, False),
                                       (ht, teacher, True), (htp, teacher, False)):
            want = _direct_hidden(model, proc, rows[i], comp, with_image)
            torch.testing.assert_close(got[i, :n], want, atol=2e-5, rtol=1e-4)


def test_position_ids_per_view(world):
    v, _ = _views(world)
    student = world[2]
    pi = position_ids_for(student, v.image)
    pt = position_ids_for(student, v.text)
    assert pi.shape[0] == 4 and pt.shape[0] == 4
    # text view: plain positions over its own (unpadded) tokens, identical in all rows of M-RoPE
    attn = v.text["attention_mask"]
    want = (attn.cumsum(-1) - 1).clamp(min=0)
    for r in range(4):
        assert torch.equal(pt[r][attn.bool()], want[attn.bool()])
    # image view: M-RoPE differs between rows at image tokens
    img = v.image["mm_token_type_ids"].bool()
    assert not torch.equal(pi[2][img], pi[3][img]) or not torch.equal(pi[1][img], pi[2][img])
    assert student.model.rope_deltas is None  # no stale state from the other view leaks


def test_generation_matches_training_forward(world):
    """On-policy consistency: the logits the student sampled from equal the training forward's."""
    tok, proc, student, teacher, rows = world
    b = PromptBuilder(proc)
    img = b.encode(rows[:3], True)
    eng = HFRolloutEngine(tok, max_new_tokens=6, vocab_rows=student.get_output_embeddings().weight.shape[0])
    student.model.rope_deltas = None
    out = student.generate(**{k: img[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids",
                                                  "pixel_values", "image_grid_thw")},
                           max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                           min_new_tokens=6, eos_token_id=eng.eos_ids, pad_token_id=eng.pad_id)
    comp = out.sequences[:, img["input_ids"].shape[1]:]
    v = build_views(img, b.encode(rows[:3], False), comp, torch.ones_like(comp, dtype=torch.bool))
    h = decoder_hidden(student, v.image)
    s = v.image["response_start"]
    logits = student.get_output_embeddings()(h[:, s - 1:s - 1 + comp.shape[1]])
    gen_logits = torch.stack(out.logits if getattr(out, "logits", None) else out.scores, 1)
    torch.testing.assert_close(logits.argmax(-1), gen_logits.argmax(-1))


def test_mismatched_tokenizers_fail_clearly(world):
    tok = world[0]
    other = build_tokenizer("task")
    other.add_tokens(["<extra_token_x>"])
    with pytest.raises(ValueError, match="student and teacher tokenizers differ"):
        check_same_tokenizer(tok, other)
    assert check_same_tokenizer(tok, build_tokenizer("task")) == len(tok)
    small = build_tiny_model(TinyModelConfig(vocab_multiple=1), tok)
    small.resize_token_embeddings(len(tok) - 5)
    with pytest.raises(ValueError, match="lm_head has"):
        check_same_tokenizer(tok, tok, small)


def test_prompt_lengths_match_the_encoded_prompts(world):
    """Counted from the text and the image header, equal to the processor's own encoding (two image sizes),
    and the processor-less fallback (encode each prompt) agrees."""
    import dataclasses

    from PIL import Image

    tok, proc, _, _, rows = world
    rows = rows[:3] + [dataclasses.replace(rows[3], image=Image.new("RGB", (64, 64)))]
    b = PromptBuilder(proc)
    want = [int(b.encode([r], True)["attention_mask"].sum()) for r in rows]
    assert want[3] > want[2]  # the larger image has more image tokens
    assert b.prompt_lengths(rows) == want

    class NoCount:  # a processor without _get_num_multimodal_tokens
        def __init__(self, p):
            self.tokenizer = p.tokenizer
            self.p = p

        def __call__(self, **kw):
            return self.p(**kw)

        def apply_chat_template(self, *a, **kw):
            return self.p.apply_chat_template(*a, **kw)

    assert PromptBuilder(NoCount(proc)).prompt_lengths(rows) == want
