"""The data path of one on-policy distillation step, written once (docs/training.md):

    rollout = pipe.sample(rows, n)                 # the student samples n completions per image prompt
    hidden = pipe.hidden(rollout.views)            # four decoder passes at the response positions
    out = pipe.loss(hidden, rollout.views.mask)    # fused_linear_vgs_loss on both lm_heads

The trainer, its GRPO step, vgs-calibrate, vgs-analyze and the demo all go through :class:`Pipeline`;
they differ only in what they do with the loss (a backward, two gradient measurements, per-bin
gradients, averages). The TRL adapter builds its views and hidden states from TRL's batch (TRL has
already tokenised and generated) and computes its loss with :func:`head_loss`, as :meth:`Pipeline.loss` does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from vgs_kernels import VGSOutput, fused_linear_vgs_loss

from ..data.answers import is_correct
from ..models.modeling import check_same_tokenizer, lm_head_rows, load_model, load_processor
from .distributed import gathered_weight, unwrap, whole_init
from .health import truncated_fraction
from .rollout import build_engine
from .views import PromptBuilder, ViewBatch, build_views, four_view_hidden, repeat_prompt, response_hidden


@dataclass
class Rollout:
    """One batch of sampled completions: both prompt views with the completion appended, and the texts."""

    views: ViewBatch
    texts: list[str]  # decoded completions (special tokens dropped)
    answers: list[str]  # the reference answer of each completion's prompt
    truncated: float  # share of completions without an end token (cut at max_new_tokens)
    seconds: float  # wall time of encoding and sampling

    @property
    def accuracy(self) -> float:
        """Share of completions whose final answer matches the reference (``answers.is_correct``)."""
        return sum(is_correct(t, a) for t, a in zip(self.texts, self.answers)) / max(len(self.texts), 1)


class Hidden(NamedTuple):
    """Decoder hidden states [B, T, H] that predict the T completion tokens, in each view."""

    student: torch.Tensor  # image view, with grad
    student_text: torch.Tensor | None  # text-only view, with grad
    teacher: torch.Tensor | None  # image view, no grad
    teacher_text: torch.Tensor | None  # text-only view, no grad


def head_loss(hidden: Hidden, student_head: torch.nn.Module, teacher_head: torch.nn.Module,
              mask: torch.Tensor, *, vocab_size: int | None = None, **loss_kwargs) -> VGSOutput:
    """``fused_linear_vgs_loss`` of the four hidden states with both lm_heads (weights and biases).

    The teacher's head is read whole (``gathered_weight``: a ZeRO-3 / FSDP2 shard is gathered, read-only);
    hidden states move to the student head's device (a ``device_map`` may end the backbone elsewhere).
    ``loss_kwargs``: the loss keywords (mode, alpha, beta, gamma, reduction, ..., return_per_token)."""
    dev = student_head.weight.device

    def on(x):
        return None if x is None else x.to(dev)

    with contextlib.ExitStack() as stack:
        wt = stack.enter_context(gathered_weight(teacher_head.weight))
        bt = getattr(teacher_head, "bias", None)
        bt = stack.enter_context(gathered_weight(bt)) if bt is not None else None
        return fused_linear_vgs_loss(
            on(hidden.student), on(hidden.student_text), student_head.weight, on(hidden.teacher),
            on(hidden.teacher_text), on(wt), on(mask), student_bias=getattr(student_head, "bias", None),
            teacher_bias=on(bt), vocab_size=vocab_size, **loss_kwargs)


def load_pair(student_path: str, teacher_path: str, *, attn_implementation: str = "sdpa",
              teacher_dtype: torch.dtype = torch.float32):
    """(processor, student, teacher, vocab_size): the student's processor, both models (fp32 student; the
    teacher in ``teacher_dtype``, loaded whole even under ZeRO-3's partitioned init: it is replicated and
    inference-only) and the vocabulary size they share (``check_same_tokenizer``)."""
    processor = load_processor(student_path)
    teacher_processor = load_processor(teacher_path)
    student = load_model(student_path, attn_implementation=attn_implementation)
    with whole_init():
        teacher = load_model(teacher_path, dtype=teacher_dtype, attn_implementation=attn_implementation)
    vocab = check_same_tokenizer(getattr(processor, "tokenizer", processor),
                                 getattr(teacher_processor, "tokenizer", teacher_processor), student, teacher)
    return processor, student, teacher, vocab


@dataclass
class Pipeline:
    """Student (possibly wrapped by DDP / FSDP), teacher, prompt builder, rollout engine, vocabulary size and
    loss keywords: everything the three steps need. ``autocast``: a context-manager factory the sampling
    and the decoder passes run under (``accelerator.autocast``; the loss computes in fp32 itself)."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    builder: PromptBuilder
    engine: object  # a rollout engine (vgs_train.pipeline.rollout)
    vocab_size: int
    loss_kwargs: dict = field(default_factory=dict)
    device: torch.device | str | None = None
    autocast: Callable = contextlib.nullcontext
    paths: dict = field(default_factory=dict)  # where the models and data came from (from_config)

    @classmethod
    def from_config(cls, cfg, paths: dict, *, loss_kwargs: dict | None = None, device=None) -> Pipeline:
        """The tools' pipeline (vgs-calibrate, vgs-analyze): the models at ``paths["student"]`` /
        ``paths["teacher"]``, both in fp32 and eval mode (dropout off: gradients are measured, not trained on)
        on ``device`` (default: CUDA if available), the config's rollout settings, ``loss_kwargs`` (default:
        the config's)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        processor, student, teacher, vocab = load_pair(paths["student"], paths["teacher"],
                                                       attn_implementation=cfg.model.attn_implementation)
        student.to(device).eval()
        teacher.to(device).eval().requires_grad_(False)
        builder = PromptBuilder(processor, cfg.data.system_prompt or None)
        return cls(student, teacher, builder, build_engine(cfg.rollout, builder.tokenizer, lm_head_rows(student)),
                   vocab, cfg.loss_kwargs() if loss_kwargs is None else dict(loss_kwargs), device=device,
                   paths=paths)

    @property
    def processor(self):
        return self.builder.processor

    @property
    def student_head(self) -> torch.nn.Module:
        return unwrap(self.student).get_output_embeddings()

    @property
    def teacher_head(self) -> torch.nn.Module:
        return self.teacher.get_output_embeddings()

    def _device(self):
        return self.device or next(unwrap(self.student).parameters()).device

    def sample(self, rows: list, n: int = 1, *, do_sample: bool = True) -> Rollout:
        """``n`` completions per row, sampled by the student on the image prompt (contiguous per row), and
        both views with the completion ids appended unchanged (``views.build_views``)."""
        t0 = time.perf_counter()
        dev = self._device()

        def encode(with_image):
            enc = repeat_prompt(self.builder.encode(rows, with_image=with_image), n)
            return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in enc.items()}

        image, text = encode(True), encode(False)
        with torch.no_grad(), self.autocast():
            completion, mask = self.engine.generate(self.student, image, do_sample=do_sample)
        tok = self.builder.tokenizer
        texts = tok.batch_decode(completion.masked_fill(~mask, tok.pad_token_id), skip_special_tokens=True)
        return Rollout(build_views(image, text, completion, mask), texts, [r.answer for r in rows for _ in range(n)],
                       truncated_fraction(completion, self.engine.eos_ids), time.perf_counter() - t0)

    def hidden(self, views: ViewBatch, *, teacher: bool = True) -> Hidden:
        """The four views' response hidden states (``views.four_view_hidden``); ``teacher=False``: the
        student's image view only (pure GRPO needs no other)."""
        with self.autocast():
            if not teacher:
                return Hidden(response_hidden(self.student, views.image, views.completion_ids.shape[1]),
                              None, None, None)
            return Hidden(*four_view_hidden(self.student, self.teacher, views))

    def loss(self, hidden: Hidden, mask: torch.Tensor, **overrides) -> VGSOutput:
        """:func:`head_loss` with this pipeline's heads, vocabulary size and loss keywords (``overrides``
        replace single keywords, e.g. ``mode="standard"`` or ``return_per_token=True``)."""
        return head_loss(hidden, self.student_head, self.teacher_head, mask, vocab_size=self.vocab_size,
                         **{**self.loss_kwargs, **overrides})
