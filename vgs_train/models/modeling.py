"""Loading HF image-text-to-text models and processors by path, and checking that student and teacher
share a tokenizer."""

from __future__ import annotations

import json
import os

import torch


def load_processor(path: str):
    """``AutoProcessor.from_pretrained(path)``; where that fails only because the processor's video part
    needs torchvision (not installed), rebuild the same processor for images only."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ImportError, ValueError, AttributeError) as first:
        cfg_path = os.path.join(path, "processor_config.json")
        if not os.path.exists(cfg_path):
            raise
        with open(cfg_path) as f:
            pcfg = json.load(f)
        ip_cfg = dict(pcfg.get("image_processor") or {})
        if not ip_cfg:
            pp = os.path.join(path, "preprocessor_config.json")
            if os.path.exists(pp):
                with open(pp) as f:
                    ip_cfg = json.load(f)
        if not ip_cfg or "Qwen2VL" not in ip_cfg.get("image_processor_type", ""):
            raise first
        import transformers
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from .tiny import image_only_processor

        keep = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
                "merge_size", "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size")
        ip = Qwen2VLImageProcessorPil(**{k: v for k, v in ip_cfg.items() if k in keep})
        tok = AutoTokenizer.from_pretrained(path)
        cls = getattr(transformers, pcfg.get("processor_class", "Qwen3VLProcessor"))
        return image_only_processor(cls, ip, tok, tok.chat_template)


def load_model(path: str, dtype=torch.float32, attn_implementation: str = "sdpa"):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)


def check_same_tokenizer(student_tok, teacher_tok, student_model=None, teacher_model=None) -> int:
    """Raise a clear ValueError unless both tokenizers map the same strings to the same ids; returns the
    shared vocabulary size (``len(tokenizer)``, special tokens included) for the loss's ``vocab_size``."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))[:5]
        only_t = sorted(set(tv) - set(sv))[:5]
        diff = sorted((k for k in set(sv) & set(tv) if sv[k] != tv[k]), key=lambda k: sv[k])[:5]
        raise ValueError(
            "student and teacher tokenizers differ: on-policy distillation compares their distributions "
            f"token by token, so they must share one (student {len(sv)} tokens, teacher {len(tv)}; "
            f"only in student: {only_s}; only in teacher: {only_t}; "
            f"different ids: {[(k, sv[k], tv[k]) for k in diff]})")
    n = len(student_tok)
    for name, m in (("student", student_model), ("teacher", teacher_model)):
        if m is not None:
            w = m.get_output_embeddings().weight
            rows = getattr(w, "ds_shape", w.shape)[0]  # ZeRO-3 partitioned init keeps the full shape there
            if rows < n:
                raise ValueError(f"the {name}'s lm_head has {rows} rows, fewer than the tokenizer's {n} ids")
    return n


def lm_head_rows(model) -> int:
    """Rows of ``model``'s lm_head (possibly wrapped, or partitioned by ZeRO-3, which keeps the full shape in
    ``ds_shape``): what a rollout engine must keep from sampling beyond the tokenizer's ids."""
    inner = getattr(model, "module", model)
    w = inner.get_output_embeddings().weight
    return int(getattr(w, "ds_shape", w.shape)[0])
