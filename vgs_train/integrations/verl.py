"""The verl recipe: VGS on-policy distillation in verl 0.9, selected from its YAML.

verl's rollout, batching, advantage and optimizer loop stay verl's; this module plugs into its extension
points (``examples/verl/`` holds the YAML and the launch script; docs/training.md the walk-through):

* **the loss**: ``vgs_kernels.integrations.verl.vgs_token_losses``, registered as verl's distillation loss
  ``"vgs"`` (``distillation.distillation_loss.loss_mode: vgs``); verl's own ``distillation_loss()``
  aggregates it with ``agg_loss`` for the actor's ``loss_agg_mode`` and its normalisers;
* **the engine**: ``VGSEngine``, an ``FSDPEngineWithLMHead`` registered for
  ``actor_rollout_ref.model.model_type: vgs_language_model``. Its training step builds the four views
  from verl's micro-batch (:func:`views_from_micro_batch`: the image view is verl's prompt + response;
  the text-only view is the same prompt with its ``<|vision_start|> ... <|vision_end|>`` spans removed --
  what the chat template renders for the conversation without its image items -- and the same response;
  position ids computed per view), runs the student's decoder backbone on both views and a colocated,
  frozen teacher (no optimizer state) on both, and calls verl's loss function with the hidden states and
  both lm_heads, all inside the student's root forward and its lm_head's forward
  (``vgs_train.pipeline.distributed.run_with_lm_head``: under FSDP2 the whole lm_head weight is there);
* **the settings**: ``actor_rollout_ref.model.override_config.vgs_*`` keys (verl copies them onto the
  student's HF config, where the engine reads them): ``vgs_teacher_path`` (a local folder), and the loss
  keywords' training settings ``vgs_mode``, ``vgs_alpha``, ``vgs_beta``, ``vgs_gamma``, ``vgs_quantile``, ... (every
  one but the reduction, which is verl's ``loss_agg_mode``: ``LOSS_KEYS``), ``vgs_chunk_size``, ``vgs_backend``.

Importing this module registers both (verl imports it in every process through this package's
``verl.plugins`` entry point, or ``actor_rollout_ref.model.external_lib``). Log-probability passes
(``forward_only``) run verl's own forward unchanged.

What runs where: :func:`views_from_micro_batch`, :func:`vgs_step` and the registered loss run on the CPU in
the tests against ``vgs_train``'s pipeline and verl's own ``distillation_loss()``; ``VGSEngine`` itself needs
verl's FSDP engine, which verl 0.9 registers for CUDA / NPU devices only (``EngineRegistry``), so it runs on
GPUs only.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from vgs_kernels.integrations import verl as vgs_verl
from vgs_kernels.options import SETTINGS

from ..pipeline.distributed import run_with_lm_head, unwrap
from ..pipeline.views import backbone_response_hidden, build_views

# the vgs_* override keys: the loss keywords' training settings (vgs_kernels.options.VGSKeywords) but the
# reduction, which is verl's loss_agg_mode, and the kernels' switches
LOSS_KEYS = tuple(k for k in SETTINGS if k != "reduction") + ("chunk_size", "backend")
MODEL_TYPE = "vgs_language_model"


def loss_kwargs_from(hf_config) -> dict:
    """The VGS loss keywords set as ``vgs_<keyword>`` attributes of the student's HF config (verl copies
    ``actor_rollout_ref.model.override_config`` there)."""
    out = {k: getattr(hf_config, f"vgs_{k}") for k in LOSS_KEYS if getattr(hf_config, f"vgs_{k}", None) is not None}
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in out.items()}


# ----------------------------------------------------------------------------- views
def _rows(x: torch.Tensor, lengths: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The sequences of a nested tensor, or of a padded one given each row's ``lengths`` (left-aligned)."""
    if x.is_nested:
        return list(x.unbind())
    return [r[: int(n)] for r, n in zip(x, lengths)]


def _prompt_rows(data) -> list[torch.Tensor]:
    prompts = data["prompts"]
    if prompts.is_nested:
        return list(prompts.unbind())
    keep = data["attention_mask"][:, : prompts.shape[1]].bool()  # left-padded prompts
    return [p[k] for p, k in zip(prompts, keep)]


def _left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(int(r.numel()) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        ids[i, width - r.numel():] = r
        mask[i, width - r.numel():] = 1
    return ids, mask


def strip_vision(ids: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """The prompt ids without their ``start_id ... end_id`` spans (the image items of a Qwen-VL chat)."""
    keep = torch.ones_like(ids, dtype=torch.bool)
    inside = False
    for i, t in enumerate(ids.tolist()):
        if t == start_id:
            inside = True
        if inside:
            keep[i] = False
        if t == end_id:
            inside = False
    return ids[keep]


def views_from_micro_batch(data, hf_config, pad_id: int):
    """(ViewBatch, response mask [bsz, resp_len] bool) of a verl micro-batch: ``prompts`` (nested, or left-
    padded with ``attention_mask``), ``responses`` and ``response_mask`` (nested or right-padded), and
    ``multi_modal_inputs`` (per sample: ``pixel_values``, ``image_grid_thw``)."""
    mask = data["response_mask"]
    mask = (mask.to_padded_tensor(0) if mask.is_nested else mask).bool()
    responses = data["responses"]
    if responses.is_nested:
        lengths = responses.offsets().diff()
        completion = responses.to_padded_tensor(pad_id)
    else:
        keep = data["attention_mask"][:, -responses.shape[1]:]
        lengths, completion = keep.sum(1), responses
    width = max(int(lengths.max()), mask.shape[1])
    completion = torch.nn.functional.pad(completion, (0, width - completion.shape[1]), value=pad_id)[:, :mask.shape[1]]
    completion_mask = torch.arange(completion.shape[1], device=completion.device)[None, :] < lengths[:, None]
    prompts = _prompt_rows(data)
    image_ids, image_mask = _left_pad(prompts, pad_id)
    image = {"input_ids": image_ids, "attention_mask": image_mask,
             "mm_token_type_ids": (image_ids == hf_config.image_token_id).long() & image_mask}
    mm = data.get("multi_modal_inputs", None)
    if mm is not None:  # per-sample dicts, concatenated as verl's engine does for its own forward
        from verl.utils.model import extract_multi_modal_inputs

        inputs = extract_multi_modal_inputs(list(mm))
        for key in ("pixel_values", "image_grid_thw"):
            if inputs.get(key) is not None:
                image[key] = inputs[key].to(image_ids.device)
    text_rows = [strip_vision(p, hf_config.vision_start_token_id, hf_config.vision_end_token_id) for p in prompts]
    text_ids, text_mask = _left_pad(text_rows, pad_id)
    text = {"input_ids": text_ids, "attention_mask": text_mask, "mm_token_type_ids": torch.zeros_like(text_ids)}
    views = build_views(image, text, completion, completion_mask)
    return views, mask & completion_mask


# ----------------------------------------------------------------------------- the step
def vgs_step(student, teacher, data, loss_function, *, pad_id: int, vocab_size: int | None = None, dp_group=None,
             wrapper=None, autocast=contextlib.nullcontext):
    """One training micro-step on a verl micro-batch: the four views' hidden states and verl's loss function
    on them (``loss_function(model_output=..., data=..., dp_group=...)``, verl's ``distillation_ppo_loss``
    with its configs bound), inside ``wrapper``'s (the FSDP2 / DDP-wrapped student; default: ``student``)
    forward and its lm_head's; ``vocab_size``: the tokenizer's ids (Qwen's lm_head has more rows). Returns
    (loss, metrics)."""
    unwrapped = unwrap(student)
    hf_config = unwrapped.config
    views, mask = views_from_micro_batch(data, hf_config, pad_id)
    T = views.completion_ids.shape[1]
    kwargs = loss_kwargs_from(hf_config)
    if kwargs.get("vds_scope", "global") == "global" and dp_group is not None:
        kwargs["process_group"] = dp_group

    def step():
        with autocast():  # the backbones only: the loss computes in fp32 itself
            hs = backbone_response_hidden(unwrapped, views.image, T)
            hsp = backbone_response_hidden(unwrapped, views.text, T)
            with torch.no_grad():
                ht = backbone_response_hidden(teacher, views.image, T)
                htp = backbone_response_hidden(teacher, views.text, T)
        s_head, t_head = unwrapped.get_output_embeddings(), teacher.get_output_embeddings()
        payload = {"hidden": {"student": hs, "student_text": hsp, "teacher": ht, "teacher_text": htp},
                   "student_weight": s_head.weight, "student_bias": getattr(s_head, "bias", None),
                   "teacher_weight": t_head.weight.detach(), "teacher_bias": getattr(t_head, "bias", None),
                   "loss_kwargs": {**kwargs, "vocab_size": vocab_size}}
        return loss_function(model_output={"vgs": payload}, data=data, dp_group=dp_group)

    return run_with_lm_head(wrapper if wrapper is not None else student, unwrapped, step)


def load_teacher(path: str, device, dtype=torch.bfloat16):
    """The frozen teacher (inference only, replicated on every rank, no optimizer state)."""
    from ..models.modeling import load_model

    teacher = load_model(path, dtype=dtype).to(device).eval()
    return teacher.requires_grad_(False)


# ----------------------------------------------------------------------------- registration
def _register_engine():
    from verl.utils.device import get_device_id, get_device_name
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    if MODEL_TYPE in EngineRegistry._engines:
        return EngineRegistry._engines[MODEL_TYPE]["fsdp2"]["cuda"]

    @EngineRegistry.register(model_type=MODEL_TYPE, backend=["fsdp", "fsdp2"], device="cuda")
    class VGSEngine(FSDPEngineWithLMHead):
        """verl's FSDP engine with the VGS training step (log-probability passes unchanged)."""

        _teacher = None

        def teacher(self):
            if self._teacher is None:
                path = getattr(self.model_config.hf_config, "vgs_teacher_path", None)
                if not path:
                    raise ValueError("VGSEngine needs actor_rollout_ref.model.override_config.vgs_teacher_path (a "
                                     "local model folder)")
                self._teacher = load_teacher(path, get_device_id())
            return self._teacher

        def forward_step(self, micro_batch, loss_function, forward_only):
            if forward_only or loss_function is None:
                return super().forward_step(micro_batch, loss_function, forward_only)
            micro_batch = micro_batch.to(get_device_id())
            dtype = getattr(self, "_autocast_dtype", torch.bfloat16)

            def autocast():
                return (contextlib.nullcontext() if dtype == torch.float32
                        else torch.autocast(device_type=get_device_name(), dtype=dtype))

            tok = self.model_config.tokenizer
            loss, metrics = vgs_step(self.module, self.teacher(), micro_batch, loss_function, pad_id=tok.pad_token_id,
                                     vocab_size=len(tok), dp_group=self.get_data_parallel_group(), autocast=autocast)
            return loss, {"model_output": {}, "loss": loss.detach().item(), "metrics": metrics}

    return VGSEngine


def register() -> Any:
    """Register the loss ``"vgs"`` and the engine ``vgs_language_model`` with verl (idempotent)."""
    vgs_verl.register()
    return _register_engine()


try:  # verl imports this module as a plugin (and through external_lib); without verl the pieces still import
    import verl  # noqa: F401
except ImportError:  # pragma: no cover
    pass
else:
    try:
        register()
    except Exception as _exc:  # noqa: BLE001 -- verl swallows plugin errors: say what failed
        import warnings

        warnings.warn(f"vgs_train.integrations.verl: registering the VGS loss / engine with verl failed: {_exc!r}",
                      stacklevel=1)
