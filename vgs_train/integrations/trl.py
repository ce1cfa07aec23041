"""VGS in TRL: ``VGSDistillationTrainer``, a subclass of TRL's on-policy ``DistillationTrainer``.

TRL's trainer samples completions from the student (HF generate or vLLM), runs student and teacher on
the image prompt + completion and matches their next-token distributions with a generalized JSD. This
subclass keeps TRL's generation, batching, logging, checkpointing and engine handling, and replaces the
loss with VGS:

1. after TRL tokenises and generates (``_generate_and_score_completions``), the **text-only view** of
   every prompt is built: the same conversation with its image items removed, rendered by the same
   processor and chat template, left-padded;
2. four decoder passes give the hidden states that predict the completion tokens: student with /
   without the image (with grad), teacher with / without the image (no grad). The completion ids are
   appended *unchanged* to both prompt views; position ids are computed per view (3-D M-RoPE for the
   image view);
3. the loss is ``vgs_train.pipeline.pipe.head_loss`` -- the same call the trainer's pipeline makes: both
   lm_heads into ``fused_linear_vgs_loss`` (``vocab_size`` = the tokenizer's size: the lm_head's padding
   rows are excluded from the distributions, and generation never samples them, on transformers' and on
   vLLM's path alike: :func:`suppress_lm_head_padding`).

Where it differs from ``vgs_train.pipeline.pipe.Pipeline`` TRL's batch format forces it: TRL has tokenised the
prompts and generated the completions already (its ``prompt_ids`` / ``completion_ids``, and the image inputs
of its processor call), so steps 1-2 read those tensors instead of sampling; and the backbone passes call
the decoder backbone inside TRL's forward redirection instead of the root model (``Pipeline.hidden``
calls the wrapped root, which TRL's redirected forward must not re-enter).

It relies on ``DistillationTrainer`` internals (``_generate_and_score_completions``, ``vllm_generation``,
``_forward_redirection``): the ``trl`` extra pins TRL 1.16.x, the version the tests run.

The backbone passes run under the accelerator's autocast (``bf16=True`` computes them in bf16; TRL's
forward redirection bypasses the autocast accelerate puts on the model's own ``forward``); the loss
computes in fp32. Models whose logits are scaled or softcapped (``logit_scale``, ``logits_scaling``,
``final_logit_softcapping``, ...) are refused: the kernels take plain ``hidden @ weight.T`` logits.

Multi-process: the loss runs inside the wrapped student's forward (TRL's forward redirection, see
``vgs_train.pipeline.distributed``), the VDS threshold is global (``vds_scope="global"``), and each rank's loss is
scaled by ``global_counts(mask).scale(reduction)`` (``vgs_train.pipeline.distributed``) so that DDP/FSDP gradient
averaging gives the global-batch loss. TRL's ``beta`` (JSD interpolation) is unused.

Example: ``examples/trl_vgs.py``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from vgs_kernels.options import VGSOptions, setting_fields

try:
    from trl import DistillationConfig, DistillationTrainer
    from trl.data_utils import is_conversational, prepare_multimodal_messages
    from trl.trainer.utils import pad
except ImportError as exc:  # pragma: no cover - depends on the optional extra
    raise ImportError(
        "vgs_train.integrations.trl needs TRL 1.16.x (DistillationTrainer): pip install 'trl>=1.16,<1.17' (or this package's trl extra from a checkout)"
    ) from exc

from ..pipeline.distributed import global_counts, prepare_sharded_lm_head, reduce_metrics, run_in_forward
from ..pipeline.pipe import Hidden, head_loss
from ..pipeline.views import MULTIMODAL_KEYS, backbone_response_hidden

# the vgs_* fields: the loss keywords' training settings, from their one declaration
# (vgs_kernels.options.VGSKeywords); a fixed threshold only (argparse takes one type per flag)
_VGSSettings = dataclasses.make_dataclass(
    "_VGSSettings", setting_fields("vgs_", types={"threshold": float | None}))


@dataclasses.dataclass
class VGSDistillationConfig(DistillationConfig, _VGSSettings):
    """TRL's ``DistillationConfig`` with the VGS loss keywords as ``vgs_*`` fields: set them in the YAML a
    ``TrlParser`` reads, or as ``--vgs_alpha 2.0`` on its command line; they are saved with the training
    arguments. (``beta``, TRL's JSD interpolation, is unused: the VGS weight of the gated term is ``vgs_beta``.)
    ``vgs_temperature`` None: TRL's ``temperature``."""

    vgs_temperature: float | None = dataclasses.field(default=None, metadata={
        "help": "tau of the loss (default: temperature)"})
    vgs_chunk_size: int | None = dataclasses.field(default=None, metadata={"help": "token rows per chunk"})
    vgs_backend: str = dataclasses.field(default="auto", metadata={"help": "auto | torch | triton | cpu | cuda"})

    def __post_init__(self):
        super().__post_init__()
        try:  # the same check every backend runs: a bad value fails here, naming its vgs_ field
            VGSOptions(**{k: v for k, v in self.vgs_kwargs().items() if k not in ("chunk_size", "backend")})
        except ValueError as exc:
            raise ValueError(f"vgs_{exc}") from None

    def vgs_kwargs(self) -> dict:
        """The ``fused_linear_vgs_loss`` keywords of the ``vgs_*`` fields (temperature: TRL's when unset)."""
        return _keywords({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, self.temperature)


def default_vgs_kwargs() -> dict:
    """The ``vgs_*`` fields' defaults as loss keywords (temperature None: the trainer's)."""
    return _keywords({f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                      for f in dataclasses.fields(VGSDistillationConfig)}, None)


def _keywords(fields: dict, temperature) -> dict:
    kw = {name[len("vgs_"):]: v for name, v in fields.items() if name.startswith("vgs_")}
    kw["adaptive_quantiles"] = tuple(kw["adaptive_quantiles"])
    if kw["temperature"] is None:
        kw["temperature"] = temperature
    return kw


# inputs of the decoder backbone besides ids and mask (what TRL's image view carries, as in its own loss)
_MM_KEYS = MULTIMODAL_KEYS
# per-token type ids: zeros (text) in the text-only view; the other keys describe the image and are dropped
_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")
# config attributes that scale or softcap a model's logits (TRL's loss applies them; the VGS kernels do not)
_LOGIT_TRANSFORMS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling",
                     "final_logit_softcapping")


def text_only_prompt(prompt: list[dict]) -> list[dict]:
    """The conversation without its image (and video) items; text items unchanged."""
    out = []
    for msg in prompt:
        msg = copy.copy(msg)
        content = msg.get("content")
        if isinstance(content, list):
            msg["content"] = [part for part in content if part.get("type") not in ("image", "video")]
        out.append(msg)
    return out


def check_plain_logits(text_config, role: str) -> None:
    """Refuse a model whose logits are not plain ``hidden @ lm_head.weight.T`` (scaled or softcapped)."""
    bad = {k: getattr(text_config, k) for k in _LOGIT_TRANSFORMS if getattr(text_config, k, None) not in (None, 1, 1.0)}
    if bad:
        raise ValueError(f"VGSDistillationTrainer: the {role} model scales or softcaps its logits ({bad}); "
                         "the VGS kernels take plain hidden @ lm_head.weight.T logits")


def suppress_lm_head_padding(trainer, vocab_size: int, rows: int) -> None:
    """Keep every generation path of a constructed TRL trainer from sampling lm_head rows >= vocab_size.

    transformers' ``generate`` reads ``trainer.generation_kwargs`` / ``generation_config``
    (``suppress_tokens``). TRL's vLLM path (colocate and server) builds ``SamplingParams`` from the
    ``args.generation_kwargs`` it was constructed with, held by ``trainer.vllm_generation``; vLLM has
    no ``suppress_tokens``, so it gets ``allowed_token_ids`` = ids [0, vocab_size) (intersected with
    any the user set).
    """
    if rows <= vocab_size:
        return
    extra = list(range(vocab_size, rows))
    suppress = list(trainer.generation_kwargs.get("suppress_tokens") or []) + extra
    trainer.generation_kwargs["suppress_tokens"] = suppress
    trainer.generation_config.suppress_tokens = suppress
    vllm = getattr(trainer, "vllm_generation", None) if getattr(trainer, "use_vllm", False) else None
    if vllm is not None:
        kwargs = dict(vllm.generation_kwargs or {})
        allowed = kwargs.get("allowed_token_ids")
        kwargs["allowed_token_ids"] = [i for i in (allowed if allowed is not None else range(vocab_size))
                                       if i < vocab_size]
        vllm.generation_kwargs = kwargs  # a copy: the user's args.generation_kwargs stays as given


class VGSDistillationTrainer(DistillationTrainer):
    """TRL ``DistillationTrainer`` with the VGS loss.

    Args (besides ``DistillationTrainer``'s):
        args: a ``VGSDistillationConfig`` carries the loss keywords as ``vgs_*`` fields (settable from YAML /
            the command line through ``TrlParser``, saved with the arguments); a plain ``DistillationConfig``
            gets their defaults: the paper's VGS (alpha 2, beta 0.01, gamma 1.0 -- 0.41 / 0.36 for Qwen3-VL-2B /
            4B), global VDS quantile, sequence reduction, ``temperature`` = ``args.temperature``.
        vgs_kwargs: keywords for ``fused_linear_vgs_loss`` that override the above.
        vocab_size: ids counted by the distributions (default ``len(tokenizer)``).
    """

    # the VGS loss is a mean per micro-batch: let Trainer divide it by the accumulation steps
    loss_is_scaled_for_ga = False
    _tag_names = ["trl", "distillation", "vgs"]
    _name = "VGS Distillation"

    def __init__(self, *args, vgs_kwargs: dict | None = None, vocab_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.teacher_model is None:
            raise ValueError("VGSDistillationTrainer needs a local teacher_model (the text-only teacher view)")
        if isinstance(self.args, VGSDistillationConfig):
            kw = self.args.vgs_kwargs()
        else:
            kw = default_vgs_kwargs()
            kw["temperature"] = self.temperature
        kw.update(vgs_kwargs or {})
        self.vgs_kwargs = kw
        self.vgs_vocab_size = int(vocab_size or len(self._tokenizer))
        for role, m in (("student", self.model), ("teacher", self.teacher_model)):
            check_plain_logits(self.accelerator.unwrap_model(m).config.get_text_config(), role)
        if self._tokenizer.padding_side != "left":
            raise ValueError("VGSDistillationTrainer: set processing_class's tokenizer padding_side = 'left' (TRL "
                             "left-pads the prompts; the views and position ids assume it)")
        # never sample lm_head rows beyond the tokenizer: the distributions exclude them
        w = self.accelerator.unwrap_model(self.model).get_output_embeddings().weight
        rows = int(getattr(w, "ds_shape", w.shape)[0])  # ZeRO-3 keeps the full shape in ds_shape
        suppress_lm_head_padding(self, self.vgs_vocab_size, rows)
        prepare_sharded_lm_head(self.model)

    # ------------------------------------------------------------------ text-only view
    def _text_prompt_ids(self, prompts: list) -> list[list[int]]:
        if not is_conversational({"prompt": prompts[0]}):
            raise ValueError("VGSDistillationTrainer needs conversational prompts (lists of messages)")
        convs = [text_only_prompt(p) for p in prompts]
        if self._is_vlm:  # the same content-block structure TRL gives the image view, minus the image
            convs = [prepare_multimodal_messages(c) for c in convs]
        tok = self.processing_class.apply_chat_template(
            conversation=convs, tools=self.tools or None, chat_template=getattr(self, "chat_template", None),
            add_generation_prompt=True, tokenize=True, return_dict=True, **self.chat_template_kwargs)
        ids = tok["input_ids"]
        if torch.is_tensor(ids):  # some processors pad: drop the padding again
            ids = [row[m.bool()].tolist() for row, m in zip(ids, tok["attention_mask"])]
        return [list(x) for x in ids]

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        device = out["prompt_ids"].device
        ids = [torch.tensor(x, dtype=torch.long) for x in self._text_prompt_ids([x["prompt"] for x in inputs])]
        out["text_prompt_ids"] = pad(ids, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        out["text_prompt_mask"] = pad([torch.ones_like(x) for x in ids], padding_value=0,
                                      padding_side="left").to(device)
        return out

    # ------------------------------------------------------------------ hidden states
    _response_hidden = staticmethod(backbone_response_hidden)

    def _views(self, inputs) -> tuple[dict, dict]:
        comp, cmask = inputs["completion_ids"], inputs["completion_mask"]
        img = {"input_ids": torch.cat([inputs["prompt_ids"], comp], 1),
               "attention_mask": torch.cat([inputs["prompt_mask"], cmask], 1),
               "response_start": inputs["prompt_ids"].shape[1]}
        img.update({k: inputs[k] for k in _MM_KEYS if inputs.get(k) is not None})  # type ids span the completion
        if img.get("image_grid_thw") is not None and "mm_token_type_ids" not in img:
            raise ValueError("the image view has image_grid_thw but no mm_token_type_ids: the M-RoPE positions of "
                             "the image tokens cannot be computed (use a processor that returns mm_token_type_ids)")
        tids = torch.cat([inputs["text_prompt_ids"], comp], 1)
        txt = {"input_ids": tids, "attention_mask": torch.cat([inputs["text_prompt_mask"], cmask], 1),
               "response_start": inputs["text_prompt_ids"].shape[1]}
        txt.update({k: torch.zeros_like(tids) for k in _TYPE_KEYS if k in img})
        return img, txt

    def _vgs_in_forward(self, unwrapped_student, inputs):
        img, txt = self._views(inputs)
        C = inputs["completion_ids"].shape[1]
        mask = inputs["completion_mask"].bool()
        if "tool_mask" in inputs:
            mask = mask & inputs["tool_mask"].bool()
        with self.accelerator.autocast():  # the backbones only: the loss computes in fp32 itself
            hs = self._response_hidden(unwrapped_student, img, C)
            hsp = self._response_hidden(unwrapped_student, txt, C)
            self.teacher_model.eval()
            unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
            with torch.no_grad():
                ht, htp = self._forward_redirection(
                    self.teacher_model, unwrapped_teacher,
                    lambda: (self._response_hidden(unwrapped_teacher, img, C),
                             self._response_hidden(unwrapped_teacher, txt, C)))
        s_head = unwrapped_student.get_output_embeddings()
        t_head = unwrapped_teacher.get_output_embeddings()

        def vgs():  # inside the lm_head's own forward too: ZeRO-3 gathers its weight there (and for backward)
            out = head_loss(Hidden(hs, hsp, ht, htp), s_head, t_head, mask, vocab_size=self.vgs_vocab_size,
                            **self.vgs_kwargs)
            return out.loss, out

        loss, out = run_in_forward(s_head, s_head, vgs)
        counts = global_counts(mask)
        return loss * counts.scale(self.vgs_kwargs.get("reduction", "sequence")), out.metrics, counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        loss, metrics, counts = self._forward_redirection(model, unwrapped, self._vgs_in_forward, unwrapped, inputs)
        mode = "train" if self.model.training else "eval"
        metrics = reduce_metrics(metrics, weight=counts.n_valid_local)  # outside the wrapped forward
        for k in ("std", "vis", "lang", "vds", "gate_fraction", "threshold"):
            if k in metrics:
                self._metrics[mode][f"vgs/{k}"].append(float(metrics[k]))
        return (loss, None) if return_outputs else loss
