"""Tiny Qwen3-VL-architecture models and an offline processor, built from configs (no download)."""

from __future__ import annotations

import torch

from ..config import TinyModelConfig
from ..data.rng import fork_rng

__all__ = ["TinyModelConfig", "build_processor", "build_tiny_model", "image_only_processor", "qwen3vl_config"]


def qwen3vl_config(tiny: TinyModelConfig, tokenizer):
    """A ``Qwen3VLConfig`` for ``tiny`` whose special ids come from ``tokenizer``."""
    from transformers import Qwen3VLConfig

    n = len(tokenizer)
    vocab = -(-n // tiny.vocab_multiple) * tiny.vocab_multiple
    if sum(tiny.mrope_section) * 2 != tiny.head_dim:
        raise ValueError(f"mrope_section {tiny.mrope_section} must sum to head_dim/2 = {tiny.head_dim // 2}")
    if any(i >= tiny.vision_depth for i in tiny.deepstack_visual_indexes):
        raise ValueError(f"deepstack_visual_indexes {tiny.deepstack_visual_indexes} must be below vision_depth")
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=vocab, hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers, num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads, head_dim=tiny.head_dim, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": tiny.rope_theta,
                         "mrope_section": list(tiny.mrope_section), "mrope_interleaved": True},
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tiny.tie_word_embeddings,
    )
    vision = dict(
        depth=tiny.vision_depth, hidden_size=tiny.vision_hidden_size, num_heads=tiny.vision_num_heads,
        intermediate_size=tiny.vision_intermediate_size, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=tiny.hidden_size,
        num_position_embeddings=tiny.num_position_embeddings,
        deepstack_visual_indexes=list(tiny.deepstack_visual_indexes),
    )
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=tiny.tie_word_embeddings,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")], pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_model(tiny: TinyModelConfig, tokenizer, seed: int = 0):
    """A randomly initialised tiny ``Qwen3VLForConditionalGeneration`` (fp32, eval mode)."""
    from transformers import Qwen3VLForConditionalGeneration

    cfg = qwen3vl_config(tiny, tokenizer)
    with fork_rng():
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(cfg)
    gc = model.generation_config
    gc.eos_token_id = cfg.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, 1.0, 1.0, None
    return model.eval()


def build_processor(tokenizer, min_pixels: int = 32 * 32, max_pixels: int = 128 * 128):
    """A ``Qwen3VLProcessor`` with a PIL-backed Qwen2-VL image processor (patch 16, merge 2, temporal 2)
    around ``tokenizer``; no video processor (images only), no torchvision needed."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return image_only_processor(Qwen3VLProcessor, ip, tokenizer, tokenizer.chat_template)


def image_only_processor(processor_cls, image_processor, tokenizer, chat_template=None):
    """Build ``processor_cls`` (e.g. ``Qwen3VLProcessor``) without a video processor.

    transformers' processors insist on a video processor, whose classes need torchvision; images-only
    use does not. Where torchvision is installed a video processor is added normally.
    """
    try:
        import torchvision  # noqa: F401
        from transformers import AutoVideoProcessor  # noqa: F401

        has_tv = True
    except Exception:
        has_tv = False
    if has_tv and "video_processor" in processor_cls.get_attributes():
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        vp = Qwen3VLVideoProcessor(patch_size=image_processor.patch_size, merge_size=image_processor.merge_size,
                                   temporal_patch_size=image_processor.temporal_patch_size)
        return processor_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=vp,
                             chat_template=chat_template)

    attrs = [a for a in processor_cls.get_attributes() if a != "video_processor"]

    class ImageOnly(processor_cls):
        @classmethod
        def get_attributes(cls):
            return attrs

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_cls.__name__  # saved as the real class
    return ImageOnly(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                     chat_template=chat_template)
