"""Prompt views and response-aligned hidden states.

Two prompt views per example: with the image (``image``) and text-only (``text``: same system prompt,
the image item removed). The completion token ids sampled by the student on the image view are appended
*unchanged* to both views (never decoded and re-encoded). Prompts are left-padded, completions
right-padded, so completion token t sits at column ``P_view + t`` in each view and the decoder hidden
state that predicts it at column ``P_view + t - 1``: the four views align on the same response tokens.
Position ids are computed per view from that view's own tokens (3-D M-RoPE for the image view, plain
positions for the text view); they are never reused across views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.examples import Example, image_size, load_image

# App. B.4 of the paper (its exact wording was lost in the text extraction; this restates it): reasoning
# inside <reason>...</reason>, then the final answer.
REASONING_SYSTEM_PROMPT = (
    "You are a helpful assistant. First think step by step about the image and the question, and write "
    "your reasoning between <reason> and </reason>. Then give only the final answer after </reason>."
)


class PromptBuilder:
    """Builds both views with the processor's chat template and tokenises them (left padding)."""

    def __init__(self, processor, system_prompt: str | None = None):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.system_prompt = system_prompt or REASONING_SYSTEM_PROMPT
        self.tokenizer.padding_side = "left"

    def messages(self, question: str, with_image: bool) -> list[dict]:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
        return [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
                {"role": "user", "content": content}]

    def render(self, question: str, with_image: bool) -> str:
        return self.processor.apply_chat_template(self.messages(question, with_image), tokenize=False,
                                                  add_generation_prompt=True)

    def prompt_lengths(self, examples: list[Example]) -> list[int]:
        """Tokens of each image-view prompt, without decoding any image: the text's tokens with the image
        placeholder counted as the processor will expand it for the image's size (read from its header)."""
        texts = [self.render(ex.question, with_image=True) for ex in examples]
        n_text = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if count is None:  # a processor that cannot count: encode each prompt with its image
            return [int(self.encode([ex], with_image=True)["attention_mask"].sum()) for ex in examples]
        sizes = [image_size(ex.image) for ex in examples]
        n_image = count(image_sizes=[(h, w) for w, h in sizes])["num_image_tokens"]
        return [t - 1 + i for t, i in zip(n_text, n_image)]  # the one placeholder token becomes i tokens

    def encode(self, examples: list[Example], with_image: bool) -> dict:
        texts = [self.render(ex.question, with_image) for ex in examples]
        kwargs = dict(text=texts, return_tensors="pt", padding=True, padding_side="left")
        if with_image:
            kwargs["images"] = [load_image(ex.image) for ex in examples]
        enc = dict(self.processor(**kwargs))
        if "mm_token_type_ids" not in enc:  # processors without it (text-only view of some models)
            enc["mm_token_type_ids"] = torch.zeros_like(enc["input_ids"])
        enc.pop("token_type_ids", None)
        return enc


def append_completion(prompt: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> dict:
    """Prompt (left-padded) + completion ids (unchanged); mm_token_type_ids padded with zeros (text)."""
    out = dict(prompt)
    out["input_ids"] = torch.cat([prompt["input_ids"], completion_ids.to(prompt["input_ids"])], dim=1)
    out["attention_mask"] = torch.cat([prompt["attention_mask"], completion_mask.to(prompt["attention_mask"])], 1)
    mm = prompt["mm_token_type_ids"]
    out["mm_token_type_ids"] = torch.cat([mm, mm.new_zeros(completion_ids.shape)], dim=1)
    out["response_start"] = prompt["input_ids"].shape[1]
    return out


def _base(model):
    inner = getattr(model, "module", model)  # DDP / accelerate wrappers
    return inner, getattr(inner, inner.base_model_prefix, inner)


def position_ids_for(model, inputs: dict) -> torch.Tensor | None:
    """Position ids computed from this view's own tokens. [4, B, L] for Qwen3-VL (text row + 3 M-RoPE
    rows), [3, B, L] for Qwen2/2.5-VL; None for models without M-RoPE (they compute their own)."""
    inner, base = _base(model)
    if hasattr(base, "rope_deltas"):
        base.rope_deltas = None  # stale state from a previous call (generation or the other view)
    if not hasattr(base, "get_rope_index"):
        return None
    attn = inputs["attention_mask"]
    text_pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    if inputs.get("image_grid_thw") is not None:
        pos3, _ = base.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                      image_grid_thw=inputs["image_grid_thw"], attention_mask=attn)
    else:
        pos3 = text_pos.unsqueeze(0).expand(3, -1, -1)
    if getattr(inner.config, "model_type", "") == "qwen3_vl":
        return torch.cat([text_pos.unsqueeze(0), pos3], dim=0)
    return pos3


MODEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def decoder_hidden(model, inputs: dict) -> torch.Tensor:
    """Final (post-norm) decoder hidden states [B, L, H] of ``model`` on ``inputs``.

    Calls the (possibly wrapped) model itself, so DDP/FSDP hooks run, with ``logits_to_keep=1`` so
    no full-vocabulary logits are computed; the hidden states are captured from the base model."""
    _, base = _base(model)
    captured = {}

    def hook(_m, _a, out):
        captured["h"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    handle = base.register_forward_hook(hook)
    try:
        kw = {k: inputs[k] for k in MODEL_KEYS if inputs.get(k) is not None}
        pos = position_ids_for(model, inputs)
        if pos is not None:
            kw["position_ids"] = pos
        model(**kw, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured["h"]


def response_hidden(model, inputs: dict, num_response: int) -> torch.Tensor:
    """Hidden states that predict the ``num_response`` completion tokens: [B, T, H]."""
    h = decoder_hidden(model, inputs)
    s = inputs["response_start"]
    return h[:, s - 1: s - 1 + num_response]


def backbone_response_hidden(model, view: dict, n_completion: int) -> torch.Tensor:
    """Hidden states that predict the ``n_completion`` completion tokens, [B, C, H], from the decoder
    *backbone* of the unwrapped ``model`` (not its root module): what runs inside a redirected forward of the
    wrapped root (TRL's, and the verl engine's under FSDP2), where calling the root again would re-enter it.
    ``view``: a view dict (``append_completion``) with ``response_start``."""
    from accelerate.utils import is_peft_model

    if is_peft_model(model):
        model = model.base_model.model
    backbone = model.base_model
    kw = {k: view[k] for k in ("input_ids", "attention_mask", *MULTIMODAL_KEYS) if view.get(k) is not None}
    pos = position_ids_for(model, view)
    if pos is not None:
        kw["position_ids"] = pos
    h = backbone(**kw, use_cache=False).last_hidden_state
    s = view["response_start"]
    return h[:, s - 1: s - 1 + n_completion]


# inputs of a decoder backbone besides ids and mask that an image view may carry
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclass
class ViewBatch:
    """The two views of a batch with the same completion ids appended to both."""

    image: dict
    text: dict
    completion_ids: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] bool, True = response token that counts (up to and including EOS)

    def to(self, device) -> ViewBatch:
        def mv(d):
            return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in d.items()}

        return ViewBatch(mv(self.image), mv(self.text), self.completion_ids.to(device), self.mask.to(device))


def build_views(image_prompt: dict, text_prompt: dict, completion_ids, completion_mask) -> ViewBatch:
    mask = completion_mask.bool()
    return ViewBatch(append_completion(image_prompt, completion_ids, mask),
                     append_completion(text_prompt, completion_ids, mask), completion_ids, mask)


def four_view_hidden(student, teacher, views: ViewBatch):
    """Student image/text-only hidden states (with grad) and teacher image/text-only (no grad, eval)."""
    T = views.completion_ids.shape[1]
    hs = response_hidden(student, views.image, T)
    hsp = response_hidden(student, views.text, T)
    with torch.no_grad():
        ht = response_hidden(teacher, views.image, T)
        htp = response_hidden(teacher, views.text, T)
    return hs, hsp, ht, htp


def repeat_prompt(enc: dict, n: int) -> dict:
    """Repeat each prompt ``n`` times (samples per prompt), images included."""
    if n == 1:
        return enc
    out = {}
    for k, v in enc.items():
        if k == "pixel_values":
            thw = enc["image_grid_thw"]
            sizes = (thw.prod(-1)).tolist()
            chunks = torch.split(v, sizes)
            out[k] = torch.cat([c for c in chunks for _ in range(n)])
        elif torch.is_tensor(v):
            out[k] = v.repeat_interleave(n, dim=0)
        else:
            out[k] = v
    return out
