"""The verl recipe on the CPU, as deep as verl 0.9 allows (its FSDP engine is registered for CUDA / NPU only):

* the registered loss ``"vgs"`` through verl's own ``distillation_loss()`` (its ``agg_loss``, for every
  ``loss_agg_mode``, with dp_size > 1 normalisers read from the micro-batch, nested response masks) equals
  ``agg_loss`` of the materialised reference's per-token VGS losses, in value and gradient;
* the engine's step on a tiny Qwen3-VL batch in verl's micro-batch layout (nested prompts / responses, per-
  sample multi-modal inputs): its views and hidden states equal ``vgs_train``'s pipeline on the same batch,
  and its loss, through verl's ``distillation_ppo_loss``, equals a direct fused call with verl's coefficients;
* the engine class registers with verl, and the recipe's YAML keys exist in verl's own trainer config."""

from __future__ import annotations

import inspect
import os
import re
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from train_helpers import pipeline

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed (make test adds it)")
from verl.trainer.distillation import losses as verl_losses  # noqa: E402

from vgs_kernels import vgs_loss  # noqa: E402
from vgs_kernels.integrations import verl as vgs_verl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
VERL_MODES = sorted(set(re.findall(r'"((?:token|seq)-[a-z-]+)"', inspect.getsource(core_algos.agg_loss))))
KW = dict(mode="vgs", alpha=1.5, beta=0.3, gamma=0.6, temperature=0.8, vds_scope="local")


def _configs(loss_agg_mode, **loss_overrides):
    vgs_verl.register()
    loss = SimpleNamespace(loss_mode="vgs", loss_max_clamp=None, use_policy_gradient=False, use_task_rewards=False,
                           distillation_loss_coef=1.0, global_batch_info={}, **loss_overrides)
    return (SimpleNamespace(loss_agg_mode=loss_agg_mode, loss_scale_factor=None, global_batch_info={}),
            SimpleNamespace(distillation_loss=loss))


def _batch(seed=0, B=4, R=6, V=50, H=8, Ht=12):
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 6, 1, 5]
    mask = torch.zeros(B, R, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    mask[1, 2] = False  # a masked token inside a response (a tool call's output)
    h = [torch.randn(B, R, d, generator=g) for d in (H, H, Ht, Ht)]
    ws, wt = torch.randn(V, H, generator=g) * 0.5, torch.randn(V, Ht, generator=g) * 0.5
    return h, ws, wt, mask


@pytest.mark.parametrize("mode", VERL_MODES)
def test_the_registered_loss_through_verls_distillation_loss_equals_the_reference(mode):
    config, dcfg = _configs(mode)
    h, ws, wt, mask = _batch()
    data = {"response_mask": torch.nested.as_nested_tensor([m for m in mask.long()], layout=torch.jagged),
            "dp_size": 4, "batch_num_tokens": 57, "global_batch_size": 13}
    hs, hsp = (x.clone().requires_grad_() for x in h[:2])
    w = ws.clone().requires_grad_()
    payload = {"hidden": {"student": hs, "student_text": hsp, "teacher": h[2], "teacher_text": h[3]},
               "student_weight": w, "teacher_weight": wt, "loss_kwargs": KW}
    loss, metrics = verl_losses.distillation_loss(config, dcfg, {"vgs": payload}, data)
    loss.backward()
    # verl filled global_batch_info from the micro-batch, as the adapter read it
    assert config.global_batch_info["dp_size"] == 4 and config.global_batch_info["batch_num_tokens"] == 57
    # reference: per-token VGS losses from materialised logits (autograd), aggregated by verl's agg_loss
    rhs, rhsp = (x.clone().requires_grad_() for x in h[:2])
    rw = ws.clone().requires_grad_()
    per_token = vgs_loss(rhs @ rw.T, rhsp @ rw.T, h[2] @ wt.T, h[3] @ wt.T, mask, reduction="none",
                         backend="reference", **KW).loss
    want = core_algos.agg_loss(loss_mat=per_token, loss_mask=mask, loss_agg_mode=mode, dp_size=4, batch_num_tokens=57,
                               global_batch_size=13, loss_scale_factor=None)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-7)
    for got, ref, name in ((hs.grad, rhs.grad, "student"), (hsp.grad, rhsp.grad, "student_text"), (w.grad, rw.grad,
                                                                                                   "student_weight")):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=name)
    # the per-token losses verl sees (loss min / max, policy-gradient advantages) are the reference's
    assert metrics["distillation/loss_max"].aggregate() == pytest.approx(float(per_token.max()), rel=1e-5)
    assert {"distillation/vgs_std", "distillation/vgs_gate_fraction"} <= set(metrics)


def test_the_per_token_losses_are_verls_policy_gradient_advantages():
    config, dcfg = _configs("token-mean")
    h, ws, wt, mask = _batch(seed=3)
    payload = {"hidden": dict(zip(("student", "student_text", "teacher", "teacher_text"), h)),
               "student_weight": ws, "teacher_weight": wt, "loss_kwargs": KW}
    data = {"response_mask": mask.long(), "dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": 4}
    losses, _ = vgs_verl.vgs_token_losses(config, dcfg, {"vgs": payload}, data)
    ref = vgs_loss(h[0] @ ws.T, h[1] @ ws.T, h[2] @ wt.T, h[3] @ wt.T, mask, reduction="none", backend="reference",
                   **KW).loss
    torch.testing.assert_close(losses.detach(), ref.detach(), rtol=1e-5, atol=1e-7)


def test_clamping_and_reserved_keywords_are_refused():
    config, dcfg = _configs("token-mean", )
    dcfg.distillation_loss.loss_max_clamp = 10.0
    h, ws, wt, mask = _batch()
    payload = {"hidden": dict(zip(("student", "student_text", "teacher", "teacher_text"), h)),
               "student_weight": ws, "teacher_weight": wt, "loss_kwargs": KW}
    data = {"response_mask": mask.long(), "dp_size": 1, "batch_num_tokens": 5, "global_batch_size": 4}
    with pytest.raises(ValueError, match="loss_max_clamp must be null"):
        vgs_verl.vgs_token_losses(config, dcfg, {"vgs": payload}, data)
    dcfg.distillation_loss.loss_max_clamp = None
    with pytest.raises(ValueError, match="batch_num_tokens"):
        vgs_verl.vgs_token_losses(config, dcfg, {"vgs": payload}, {"response_mask": mask.long()})
    payload["loss_kwargs"] = {**KW, "reduction": "token"}
    with pytest.raises(ValueError, match="reduction"):
        vgs_verl.vgs_token_losses(config, dcfg, {"vgs": payload}, data)


def _verl_micro_batch(world, views, n):
    """The batch of ``views`` in verl's no-padding layout: nested prompts and responses, a padded response mask,
    per-sample multi-modal inputs, the global-batch normalisers."""
    img = views.image
    P = img["response_start"]
    prompts = [img["input_ids"][i, :P][img["attention_mask"][i, :P].bool()] for i in range(n)]
    comp, cmask = views.completion_ids, views.mask
    lengths = cmask.sum(1)
    responses = [comp[i, : int(lengths[i])] for i in range(n)]
    pixels = torch.split(img["pixel_values"], img["image_grid_thw"].prod(-1).tolist())
    mm = [{"pixel_values": pixels[i], "image_grid_thw": img["image_grid_thw"][i:i + 1]} for i in range(n)]
    return {"prompts": torch.nested.as_nested_tensor(prompts, layout=torch.jagged),
            "responses": torch.nested.as_nested_tensor(responses, layout=torch.jagged),
            "response_mask": cmask.long(), "multi_modal_inputs": mm,
            "dp_size": 2, "batch_num_tokens": int(cmask.sum()) + 7, "global_batch_size": 2 * n}


def test_the_engine_step_on_a_verl_micro_batch_equals_the_pipeline(world):
    from verl.trainer.distillation.losses import distillation_ppo_loss

    from vgs_train.integrations.verl import vgs_step, views_from_micro_batch

    pipe = pipeline(world, max_new_tokens=6)
    torch.manual_seed(0)
    views = pipe.sample(world["rows"][:3]).views
    data = _verl_micro_batch(world, views, 3)
    student, teacher = world["student"], world["teacher"]
    pad = world["tok"].pad_token_id
    got, mask = views_from_micro_batch(data, student.config, pad)
    assert torch.equal(mask, views.mask)
    # the same token rows as the pipeline's views (left padding may differ in width, never in content)
    for key in ("image", "text"):
        a, b = getattr(got, key), getattr(views, key)
        for i in range(3):
            assert a["input_ids"][i][a["attention_mask"][i].bool()].tolist() == \
                b["input_ids"][i][b["attention_mask"][i].bool()].tolist(), key
    torch.testing.assert_close(got.image["pixel_values"], views.image["pixel_values"])
    # hidden states of the four views equal the pipeline's
    want = pipe.hidden(views)
    from vgs_train.pipeline.views import backbone_response_hidden

    T = views.completion_ids.shape[1]
    for view, model, ref in ((got.image, student, want.student), (got.text, student, want.student_text),
                             (got.image, teacher, want.teacher), (got.text, teacher, want.teacher_text)):
        with torch.no_grad():
            h = backbone_response_hidden(model, view, T)
        torch.testing.assert_close(h[views.mask], ref[views.mask], rtol=1e-4, atol=1e-5)
    # the step through verl's distillation_ppo_loss = a direct fused call with verl's coefficients
    config, dcfg = _configs("seq-mean-token-mean")
    student.config.vgs_alpha, student.config.vgs_beta, student.config.vgs_vds_scope = 1.5, 0.3, "local"
    try:
        loss_fn = partial(distillation_ppo_loss, config=config, distillation_config=dcfg)
        loss, metrics = vgs_step(student, teacher, data, loss_fn, pad_id=pad, vocab_size=world["vocab"])
    finally:
        for k in ("vgs_alpha", "vgs_beta", "vgs_vds_scope"):
            delattr(student.config, k)
    coef = vgs_verl.agg_coefficients(views.mask, "seq-mean-token-mean", vgs_verl.normalisers(config, data))
    direct = pipe.loss(want, views.mask, weights=coef.float(), reduction="sum", alpha=1.5, beta=0.3, vds_scope="local")
    torch.testing.assert_close(loss.detach(), direct.loss.detach(), rtol=1e-5, atol=1e-7)
    assert "distillation/vgs_vis" in metrics


def test_the_engine_registers_and_the_recipe_yaml_fits_verls_config():
    pytest.importorskip("peft", reason="verl's FSDP engine imports peft (make test adds it)")
    from omegaconf import OmegaConf
    from verl.workers.engine.base import EngineRegistry

    from vgs_train.integrations import verl as recipe

    cls = recipe.register()
    assert EngineRegistry._engines[recipe.MODEL_TYPE]["fsdp2"]["cuda"] is cls
    assert verl_losses.get_distillation_loss_fn("vgs") is vgs_verl.vgs_token_losses
    # every key the recipe sets exists in verl's own trainer config (verl rejects unknown keys)
    import verl

    base = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer", "config",
                                       "_generated_ppo_trainer.yaml"))
    ours = OmegaConf.load(os.path.join(ROOT, "examples", "verl", "qwen3vl-8b-to-2b-vgs.yaml"))
    missing = []
    import dataclasses

    from verl.workers.config import HFModelConfig

    model_fields = {f.name for f in dataclasses.fields(HFModelConfig)}  # the model section's dataclass

    def walk(node, ref, path):
        for k, v in node.items():
            if k in ("defaults", "hydra") or (path.endswith("override_config") and str(k).startswith("vgs_")):
                continue
            if path == ".actor_rollout_ref.model" and k in model_fields:
                if OmegaConf.is_dict(v) and k in ref.keys():
                    walk(v, ref[k], f"{path}.{k}")
                continue
            if ref is None or k not in ref.keys():
                missing.append(f"{path}.{k}".lstrip("."))
            elif OmegaConf.is_dict(v) and OmegaConf.is_dict(ref[k]) and not path.endswith("teacher_models"):
                walk(v, ref[k], f"{path}.{k}")

    walk(ours, base, "")
    assert not missing, f"keys verl's trainer config does not have: {missing}"
    assert ours.actor_rollout_ref.model.model_type == recipe.MODEL_TYPE
    assert ours.distillation.distillation_loss.loss_mode == "vgs"
    assert ours.distillation.distillation_loss.loss_max_clamp is None
