"""TRL integration: VGSDistillationTrainer runs 2 optimizer steps offline on tiny Qwen3-VL models."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

from vgs_train.integrations import __doc__ as _doc  # noqa: F401  (the package imports without TRL)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

try:
    import trl  # noqa: F401
    from trl import DistillationTrainer  # noqa: F401

    TRL_ERR = None
except Exception as e:  # noqa: BLE001
    TRL_ERR = f"TRL with DistillationTrainer is not importable ({e}); pip install \".[trl]\" from a checkout"


def _example():
    spec = importlib.util.spec_from_file_location("trl_vgs_example", os.path.join(ROOT, "examples", "trl_vgs.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_text_only_prompt_drops_images():
    pytest.importorskip("trl", reason="TRL not installed")
    if TRL_ERR:
        pytest.skip(TRL_ERR)
    from vgs_train.integrations.trl import text_only_prompt

    conv = [{"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "image", "image": None}, {"type": "text", "text": "q"}]}]
    assert text_only_prompt(conv) == [{"role": "system", "content": "s"},
                                      {"role": "user", "content": [{"type": "text", "text": "q"}]}]
    assert conv[1]["content"][0]["type"] == "image"  # the input is not modified


def direct_loss(student, teacher, inputs, *, vocab_size, **loss_kwargs):
    """An oracle independent of the adapter's views: each row's image and text-only sequences rebuilt from
    TRL's batch without padding, hidden states from the models' own forward (positions computed by the
    model from scratch), then ``fused_linear_vgs_loss`` on the response positions."""
    import torch

    from vgs_kernels import fused_linear_vgs_loss

    comp, cmask = inputs["completion_ids"], inputs["completion_mask"].bool()
    B, C = comp.shape
    pixels = torch.split(inputs["pixel_values"], inputs["image_grid_thw"].prod(-1).tolist())
    out = {}
    for name, model in (("s", student), ("t", teacher)):
        for view in ("image", "text"):
            rows = []
            for i in range(B):
                key = "prompt" if view == "image" else "text_prompt"
                keep = inputs[f"{key}_mask"][i].bool()
                prompt = inputs[f"{key}_ids"][i][keep]
                ids = torch.cat([prompt, comp[i]])[None]
                kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
                if view == "image":
                    mm = inputs["mm_token_type_ids"][i][torch.cat([keep, torch.ones(C, dtype=torch.bool)])]
                    kw.update(pixel_values=pixels[i], image_grid_thw=inputs["image_grid_thw"][i:i + 1],
                              mm_token_type_ids=mm[None])
                base = model.model
                base.rope_deltas = None
                with torch.no_grad():
                    h = base(**kw).last_hidden_state[0]
                rows.append(h[len(prompt) - 1: len(prompt) - 1 + C])
            out[name + view] = torch.stack(rows)
    return fused_linear_vgs_loss(out["simage"], out["stext"], student.get_output_embeddings().weight,
                                 out["timage"], out["ttext"], teacher.get_output_embeddings().weight, cmask,
                                 vocab_size=vocab_size, **loss_kwargs)


@pytest.mark.skipif(TRL_ERR is not None, reason=str(TRL_ERR))
def test_vgs_distillation_trainer_two_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    import torch

    from vgs_train.integrations.trl import VGSDistillationTrainer

    calls = []
    orig = VGSDistillationTrainer._vgs_in_forward

    def spy(self, unwrapped, inputs):
        loss, metrics, counts = orig(self, unwrapped, inputs)
        # the text-only view is shorter (no image tokens) and shares the completion
        assert inputs["text_prompt_ids"].shape[1] < inputs["prompt_ids"].shape[1]
        assert not (inputs["text_prompt_ids"] == unwrapped.config.image_token_id).any()
        # = the image prompt with its <|vision_start|> ... <|vision_end|> span removed (same template)
        vs, ve = unwrapped.config.vision_start_token_id, unwrapped.config.vision_end_token_id
        for ids, m, tids, tm in zip(inputs["prompt_ids"], inputs["prompt_mask"], inputs["text_prompt_ids"],
                                    inputs["text_prompt_mask"]):
            ids = ids[m.bool()].tolist()
            a, b = ids.index(vs), ids.index(ve)
            assert ids[:a] + ids[b + 1:] == tids[tm.bool()].tolist()
        # lm_head rows beyond the tokenizer are never sampled
        assert (inputs["completion_ids"][inputs["completion_mask"].bool()] < self.vgs_vocab_size).all()
        # the adapter's loss = a direct fused_linear_vgs_loss call on hidden states rebuilt row by row
        want = direct_loss(unwrapped, self.accelerator.unwrap_model(self.teacher_model), inputs,
                           vocab_size=self.vgs_vocab_size, **self.vgs_kwargs)
        torch.testing.assert_close(loss.detach(), want.loss, rtol=1e-4, atol=1e-6)
        for k in ("std", "vis", "lang", "vds", "threshold"):
            assert metrics[k] == pytest.approx(want.metrics[k], rel=1e-4, abs=1e-6), k
        calls.append((float(loss.detach()), metrics))
        return loss, metrics, counts

    monkeypatch.setattr(VGSDistillationTrainer, "_vgs_in_forward", spy)
    student_before = None
    ex = _example()
    orig_setup = ex.tiny_setup

    def setup(out_dir, n):
        nonlocal student_before
        s, t, p, rows = orig_setup(out_dir, 4)
        for m in (s, t):  # lm_head rows beyond the tokenizer, as Qwen's 151936 rows for 151669 ids
            m.resize_token_embeddings(len(p.tokenizer) + 64)
        student_before = {k: v.clone() for k, v in s.state_dict().items()}
        return s, t, p, rows

    monkeypatch.setattr(ex, "tiny_setup", setup)
    trainer = ex.main(["--tiny", "--output_dir", str(tmp_path), "--max-steps", "2", "--per_device_train_batch_size",
                       "2", "--gradient_accumulation_steps", "1", "--max_completion_length", "6",
                       "--vgs_gamma", "0.41"])
    assert trainer.state.global_step == 2
    assert len(calls) == 2
    for loss, m in calls:
        assert math.isfinite(loss) and loss >= 0
        assert {"std", "vis", "lang", "vds", "gate_fraction", "threshold"} <= set(m)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("vgs/vis" in h for h in logged)
    after = trainer.model.state_dict()
    changed = [k for k, v in student_before.items() if not torch.equal(v, after[k])]
    assert any("lm_head" in k or "embed_tokens" in k for k in changed) and any("layers" in k for k in changed)
    assert trainer.vgs_kwargs["gamma"] == 0.41 and trainer.vgs_vocab_size == len(trainer._tokenizer)
    rows = trainer.model.get_output_embeddings().weight.shape[0]
    assert rows == trainer.vgs_vocab_size + 64
    assert set(range(trainer.vgs_vocab_size, rows)) <= set(trainer.generation_config.suppress_tokens)


@pytest.mark.skipif(TRL_ERR is not None, reason=str(TRL_ERR))
def test_views_carry_every_multimodal_input_and_refuse_scaled_logits():
    from types import SimpleNamespace

    import torch

    from vgs_train.integrations.trl import VGSDistillationTrainer, check_plain_logits

    B, P, Q, C = 2, 5, 3, 4
    inputs = {"prompt_ids": torch.ones(B, P, dtype=torch.long), "prompt_mask": torch.ones(B, P, dtype=torch.long),
              "completion_ids": torch.full((B, C), 7), "completion_mask": torch.ones(B, C, dtype=torch.long),
              "text_prompt_ids": torch.ones(B, Q, dtype=torch.long),
              "text_prompt_mask": torch.ones(B, Q, dtype=torch.long),
              "pixel_values": torch.randn(8, 3), "image_grid_thw": torch.tensor([[1, 2, 2]] * B),
              "pixel_attention_mask": torch.ones(B, 4), "token_type_ids": torch.ones(B, P + C, dtype=torch.long),
              "mm_token_type_ids": torch.ones(B, P + C, dtype=torch.long)}
    img, txt = VGSDistillationTrainer._views(None, inputs)
    for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask", "token_type_ids", "mm_token_type_ids"):
        assert img[k] is inputs[k], k
    assert not {"pixel_values", "image_grid_thw", "pixel_attention_mask"} & set(txt)
    assert txt["token_type_ids"].shape == (B, Q + C) and not txt["token_type_ids"].any()
    assert txt["mm_token_type_ids"].shape == (B, Q + C) and not txt["mm_token_type_ids"].any()
    assert (img["response_start"], txt["response_start"]) == (P, Q)
    del inputs["mm_token_type_ids"]
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        VGSDistillationTrainer._views(None, inputs)
    check_plain_logits(SimpleNamespace(logit_scale=None, final_logit_softcapping=None), "student")
    for attr, value in (("final_logit_softcapping", 30.0), ("logit_scale", 0.5), ("logits_scaling", 4.0)):
        with pytest.raises(ValueError, match=f"teacher model scales or softcaps its logits.*{attr}"):
            check_plain_logits(SimpleNamespace(**{attr: value}), "teacher")


@pytest.mark.slow
@pytest.mark.skipif(TRL_ERR is not None, reason=str(TRL_ERR))
def test_vgs_distillation_trainer_two_processes(tmp_path):
    """The example under torchrun with 2 CPU processes (gloo, DDP): global VDS threshold, scaled loss and
    the metric all-reduce run inside TRL's loop without hanging."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), os.path.join(ROOT, "examples", "trl_vgs.py"), "--tiny", "--output_dir",
           str(tmp_path), "--max-steps", "2", "--max_completion_length", "6"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    assert "'vgs/vis'" in log and "'train_loss'" in log, log[-3000:]


def test_lm_head_padding_is_suppressed_on_every_generation_path():
    """transformers' generate gets suppress_tokens; TRL's vLLM path (SamplingParams from the
    generation_kwargs VLLMGeneration holds) gets allowed_token_ids below the tokenizer size."""
    if TRL_ERR:
        pytest.skip(TRL_ERR)
    import inspect
    from types import SimpleNamespace

    from trl.generation.vllm_generation import VLLMGeneration

    from vgs_train.integrations.trl import suppress_lm_head_padding

    # TRL builds vLLM's sampling parameters from this attribute in both modes (colocate and server)
    assert inspect.getsource(VLLMGeneration.generate).count("self.generation_kwargs") >= 2
    user_kwargs = {"allowed_token_ids": [1, 5, 9, 12]}
    trainer = SimpleNamespace(
        generation_kwargs={"suppress_tokens": [3]}, generation_config=SimpleNamespace(suppress_tokens=[3]),
        use_vllm=True, vllm_generation=SimpleNamespace(generation_kwargs=user_kwargs))
    suppress_lm_head_padding(trainer, vocab_size=10, rows=13)
    assert trainer.generation_kwargs["suppress_tokens"] == [3, 10, 11, 12]
    assert trainer.generation_config.suppress_tokens == [3, 10, 11, 12]
    assert trainer.vllm_generation.generation_kwargs["allowed_token_ids"] == [1, 5, 9]
    assert user_kwargs == {"allowed_token_ids": [1, 5, 9, 12]}  # the user's args are not modified
    trainer.vllm_generation.generation_kwargs = None
    suppress_lm_head_padding(trainer, vocab_size=10, rows=13)
    assert trainer.vllm_generation.generation_kwargs == {"allowed_token_ids": list(range(10))}


@pytest.mark.skipif(TRL_ERR is not None, reason=str(TRL_ERR))
def test_the_documented_command_trains_two_optimizer_steps(tmp_path):
    """``python examples/trl_vgs.py --tiny --max-steps 2``, exactly as the README gives it (run in a scratch
    folder: its outputs go to runs/trl-vgs there)."""
    import json
    import subprocess

    from test_readme_commands import readme_command

    cmd = readme_command("python examples/trl_vgs.py")
    assert cmd == "python examples/trl_vgs.py --tiny --max-steps 2"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, cmd.split()[1]), *cmd.split()[2:]], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    state = json.loads((tmp_path / "runs" / "trl-vgs" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert "2 optimizer steps" in r.stdout


@pytest.mark.skipif(TRL_ERR is not None, reason=str(TRL_ERR))
def test_a_yaml_config_sets_the_loss_keywords_that_reach_the_loss(tmp_path, monkeypatch):
    """vgs_alpha / vgs_beta / vgs_mode from a YAML read by TRL's parser reach fused_linear_vgs_loss, are saved
    with the training arguments, and a bad value is refused naming its field."""
    import vgs_train.integrations.trl as adapter
    from vgs_train.integrations.trl import VGSDistillationConfig

    cfg = tmp_path / "vgs.yaml"
    cfg.write_text("vgs_mode: adaptive\nvgs_alpha: 0.75\nvgs_beta: 0.2\nvgs_gamma: 0.36\nmax_completion_length: 5\n")
    seen = []
    orig = adapter.head_loss

    def spy(hidden, s_head, t_head, mask, **kw):
        seen.append(kw)
        return orig(hidden, s_head, t_head, mask, **kw)

    monkeypatch.setattr(adapter, "head_loss", spy)
    ex = _example()
    trainer = ex.main(["--config", str(cfg), "--tiny", "--max-steps", "1", "--output_dir", str(tmp_path / "out")])
    assert trainer.state.global_step == 1 and seen
    assert {k: seen[0][k] for k in ("mode", "alpha", "beta", "gamma")} == dict(mode="adaptive", alpha=0.75, beta=0.2,
                                                                            gamma=0.36)
    assert trainer.args.max_completion_length == 5  # the YAML's, not --tiny's default
    saved = trainer.args.to_dict()
    assert saved["vgs_alpha"] == 0.75 and saved["vgs_mode"] == "adaptive"
    with pytest.raises(ValueError, match="vgs_mode"):
        VGSDistillationConfig(output_dir=str(tmp_path), use_cpu=True, vgs_mode="sideways")
