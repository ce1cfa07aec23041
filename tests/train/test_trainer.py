"""The training loop: a step lowers the loss on a fixed batch; exact resume; save_pretrained loads by
path; CLI smoke runs of each method; SIGTERM writes a checkpoint."""

import json
import os

import pytest
import torch
from train_helpers import tiny_overrides

from vgs_train.cli import eval_main, train_main
from vgs_train.config import load_config
from vgs_train.loops.trainer import Trainer
from vgs_train.models.modeling import load_model, load_processor


@pytest.fixture
def cache(embedded_cache):
    return embedded_cache


def _trainer(cache, out, *extra, resume=False):
    cfg = load_config(None, tiny_overrides(cache, out, *extra))
    return Trainer(cfg, resume=resume, verbose=False)


def test_step_on_fixed_batch_lowers_loss(cache, tmp_path):
    from vgs_kernels import fused_linear_vgs_loss
    from vgs_train.pipeline.views import build_views, four_view_hidden

    tr = _trainer(cache, str(tmp_path / "run"), "optim.lr=3e-3")
    rows = tr.rows[:4]
    b = tr.pipe.builder
    img, txt = b.encode(rows, True), b.encode(rows, False)
    torch.manual_seed(0)
    comp, mask = tr.pipe.engine.generate(tr.student, img, do_sample=True)
    views = build_views(img, txt, comp, mask)

    def loss():
        hs, hsp, ht, htp = four_view_hidden(tr.student, tr.teacher, views)
        return fused_linear_vgs_loss(hs, hsp, tr.unwrapped.get_output_embeddings().weight, ht, htp,
                                     tr.teacher.get_output_embeddings().weight, views.mask,
                                     vocab_size=tr.vocab_size, **tr.pipe.loss_kwargs).loss

    first = loss()
    for _ in range(3):
        tr.optimizer.zero_grad()
        loss().backward()
        tr.optimizer.step()
    assert loss().item() < first.item()


def test_resume_continues_exactly(cache, tmp_path):
    full = _trainer(cache, str(tmp_path / "full"), "run.max_steps=3", "loss.method=vgs")
    ref = full.train()
    part = _trainer(cache, str(tmp_path / "part"), "run.max_steps=2", "loss.method=vgs")
    part.train()
    assert os.path.exists(tmp_path / "part" / "checkpoints" / "step_0000002" / "model.safetensors")
    resumed = _trainer(cache, str(tmp_path / "part"), "run.max_steps=3", "loss.method=vgs", resume=True)
    assert resumed.step == 2
    m = resumed.train()
    assert len(m) == 1
    assert m[0]["loss"] == pytest.approx(ref[2]["loss"], rel=1e-5, abs=1e-7)
    assert m[0]["std"] == pytest.approx(ref[2]["std"], rel=1e-5, abs=1e-7)
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    with pytest.raises(FileExistsError, match="--resume"):
        _trainer(cache, str(tmp_path / "part"), "run.max_steps=4")


def test_saved_model_and_processor_load_by_path(cache, tmp_path):
    tr = _trainer(cache, str(tmp_path / "run"), "run.max_steps=1")
    tr.train()
    final = tmp_path / "run" / "final"
    proc = load_processor(str(final))
    model = load_model(str(final))
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(proc).__name__ == "Qwen3VLProcessor"
    assert proc.tokenizer.get_vocab() == tr.tokenizer.get_vocab()
    for (n, a), b in zip(tr.unwrapped.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    rows_path = tr.paths["eval"]
    assert eval_main([str(final), rows_path, "--k", "2", "--limit", "4", "--max-new-tokens", "8",
                      "--json", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())[rows_path]
    assert res["n"] == 4 and 0 <= res["acc@1"] <= 1 and "acc@2" in res


@pytest.mark.parametrize("method", ["opd", "vgs", "vgs-adaptive", "language-steering"])
def test_cli_smoke(cache, tmp_path, method):
    out = tmp_path / method
    rc = train_main(tiny_overrides(cache, str(out), f"loss.method={method}", "run.max_steps=2",
                                   "run.tensorboard=true", "optim.grad_accum=2"))
    assert rc == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for k in ("loss", "std", "vis", "lang", "vds", "gate_fraction", "threshold", "tokens_per_s",
              "time_rollout", "time_forward", "time_loss_backward"):
        assert k in lines[0], k
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    assert (out / "config.yaml").exists() and os.listdir(out / "tb")
    assert (out / "final" / "config.json").exists()
    assert load_config(str(out / "config.yaml")).loss.method == method


def test_sigterm_writes_checkpoint(cache, tmp_path):
    import signal

    tr = _trainer(cache, str(tmp_path / "sig"), "run.max_steps=5")
    orig = tr.train_step

    def step_then_signal():
        m = orig()
        if tr.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return m

    tr.train_step = step_then_signal
    with pytest.raises(SystemExit) as e:
        tr.train()
    assert e.value.code == 128 + signal.SIGTERM
    assert (tmp_path / "sig" / "checkpoints" / "latest").read_text() == "step_0000001"
    assert signal.getsignal(signal.SIGTERM) is not None
    again = _trainer(cache, str(tmp_path / "sig"), "run.max_steps=2", resume=True)
    assert again.step == 1 and again.sampler.index == tr.sampler.index


def test_accumulation_syncs_on_the_last_micro_batch_only(cache, tmp_path, monkeypatch):
    """Gradients are reduced (DDP / FSDP2) and DeepSpeed steps only on the last of grad_accum micro-batches."""
    tr = _trainer(cache, str(tmp_path / "acc"), "run.max_steps=1", "optim.grad_accum=3")
    seen, orig = [], tr.accelerator.backward

    def backward(loss, **kw):
        seen.append(tr.accelerator.sync_gradients)
        return orig(loss, **kw)

    monkeypatch.setattr(tr.accelerator, "backward", backward)
    tr.train_step()
    assert seen == [False, False, True] and tr.accelerator.sync_gradients


def test_checkpoints_once_per_step_and_resume_from_older_one(cache, tmp_path, monkeypatch):
    """save_every dividing max_steps writes the last checkpoint once; resuming an older checkpoint drops the
    later log lines and the stale later checkpoint, and continues exactly."""
    from accelerate import Accelerator

    writes = []
    orig = Accelerator.save_state
    monkeypatch.setattr(Accelerator, "save_state", lambda self, out, **kw: writes.append(out) or orig(self, out, **kw))
    run = tmp_path / "run"
    full = _trainer(cache, str(run), "run.max_steps=3", "run.save_every=1", "run.keep_checkpoints=4")
    ref = full.train()
    ckpts = run / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["latest", "step_0000001", "step_0000002", "step_0000003"]
    assert [os.path.basename(p) for p in writes] == [f"step_000000{i}.tmp" for i in (1, 2, 3)]
    again = _trainer(cache, str(run), "run.max_steps=3", "run.save_every=1", "run.keep_checkpoints=2",
                     resume=str(ckpts / "step_0000001"))
    assert again.step == 1
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    m = again.train()
    assert [x["loss"] for x in m] == pytest.approx([r["loss"] for r in ref[1:]], rel=1e-5, abs=1e-7)
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(os.listdir(ckpts)) == ["latest", "step_0000002", "step_0000003"]


def test_resume_refuses_a_changed_config(cache, tmp_path):
    run = str(tmp_path / "run")
    _trainer(cache, run, "run.max_steps=1").train()
    with pytest.raises(ValueError, match=r"loss.method: 'vgs' -> 'opd'"):
        _trainer(cache, run, "run.max_steps=2", "loss.method=opd", resume=True)
    assert _trainer(cache, run, "run.max_steps=2", "run.log_every=2", resume=True).step == 1  # allowed


def test_grpo_resume_mid_iterations_reuses_the_stored_rollouts(cache, tmp_path):
    grpo = ("loss.method=grpo+vgs", "rollout.samples_per_prompt=2", "grpo.iterations=2", "grpo.epsilon=0.1")
    ref = _trainer(cache, str(tmp_path / "full"), "run.max_steps=2", *grpo).train()
    part = _trainer(cache, str(tmp_path / "part"), "run.max_steps=1", *grpo)
    part.train()
    assert (tmp_path / "part" / "checkpoints" / "step_0000001" / "grpo_buffer_rank0.pt").exists()
    resumed = _trainer(cache, str(tmp_path / "part"), "run.max_steps=2", *grpo, resume=True)
    m = resumed.train()
    assert m[0]["time_rollout"] == 0.0  # the second iteration of the stored batch, not new rollouts
    for k in ("loss", "ratio_mean", "distill_loss"):
        assert m[0][k] == pytest.approx(ref[1][k], rel=1e-5, abs=1e-7), k


def test_max_prompt_length_drops_longer_training_rows(cache, tmp_path):
    tr = _trainer(cache, str(tmp_path / "all"))
    lengths = tr.pipe.builder.prompt_lengths(tr.rows)
    limit = sorted(lengths)[len(lengths) // 2]
    kept = _trainer(cache, str(tmp_path / "some"), f"data.max_prompt_length={limit}")
    assert len(kept.rows) == sum(n <= limit for n in lengths) < len(tr.rows)
    assert max(kept.pipe.builder.prompt_lengths(kept.rows)) <= limit
    with pytest.raises(ValueError, match="data.max_prompt_length=1: every training prompt is longer"):
        _trainer(cache, str(tmp_path / "none"), "data.max_prompt_length=1")
    with pytest.raises(ValueError, match="data.max_prompt_length"):
        load_config(None, ["data.max_prompt_length=-1"])
