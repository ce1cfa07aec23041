"""Inputs of the training tools, checked before any model loads: JSONL rows, vgs-train's argument parsing
(--resume), vgs-eval's flags, and the RNG fork of evaluation / calibration. No model is loaded here."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from vgs_train.cli import eval_main, parse_train_args, train_main
from vgs_train.data.examples import load_dataset_rows, load_jsonl


# ---------------------------------------------------------------------------------------------- JSONL rows
def _write(tmp_path, rows, name="d.jsonl", image="img.png"):
    (tmp_path / image).write_bytes(b"")  # existence is checked at load time, the bytes when sampled
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(p)


GOOD = {"image": "img.png", "question": "q?", "answer": "a"}


@pytest.mark.parametrize("row,match", [
    ({**GOOD, "answer": None}, r":2: 'answer' must be a string or a number, got None"),
    ({**GOOD, "answer": True}, r":2: 'answer' must be a string or a number, got True"),
    ({**GOOD, "answer": ["a"]}, r":2: 'answer'"),
    ({**GOOD, "question": None}, r":2: 'question' must be a string, got None"),
    ({**GOOD, "question": 3}, r":2: 'question' must be a string"),
    ({**GOOD, "image": None}, r":2: 'image' must be a path"),
    ({**GOOD, "image": {"path": "img.png"}}, r":2: 'image' must be a path"),
    ({**GOOD, "image": ""}, r":2: 'image' must be a path"),
    ({**GOOD, "image": "missing.png"}, r":2: 'image' file not found: .*missing\.png \(relative image paths"),
    ({**GOOD, "image": "/abs/missing.png"}, r":2: 'image' file not found: /abs/missing\.png$"),
    ({**GOOD, "response": 5}, r":2: 'response' must be a string"),
    ({"image": "img.png", "question": "q?"}, r":2: row lacks \['answer'\]"),
    ("[1, 2]", r":2: expected a JSON object .* got list"),
    ('"a string"', r":2: expected a JSON object .* got str"),
    ("7", r":2: expected a JSON object .* got int"),
    ("null", r":2: expected a JSON object .* got NoneType"),
    ("{not json", r":2: not valid JSON"),
])
def test_jsonl_bad_rows_name_the_line_and_field(tmp_path, row, match):
    p = _write(tmp_path, [GOOD, row])
    with pytest.raises(ValueError, match=match) as e:
        load_jsonl(p)
    assert str(e.value).startswith(f"{p}:2: ")
    with pytest.raises(ValueError, match=match):
        load_dataset_rows(p)


def test_jsonl_good_rows_and_image_root(tmp_path):
    p = _write(tmp_path, [GOOD, {**GOOD, "answer": 3, "response": "r"}, "", {**GOOD, "answer": 2.5,
                                                                           "response": None}])
    rows = load_jsonl(p)
    assert [r.answer for r in rows] == ["a", "3", "2.5"] and rows[1].response == "r"
    assert rows[0].image == os.path.join(str(tmp_path), "img.png")
    # relative paths resolve against image_root when given
    (tmp_path / "data").mkdir()
    (tmp_path / "imgs").mkdir()
    p = _write(tmp_path / "data", [GOOD], image="../imgs/unused.png")  # the image lies elsewhere
    with pytest.raises(ValueError, match="file not found"):
        load_jsonl(p)
    (tmp_path / "imgs" / "img.png").write_bytes(b"")
    rows = load_dataset_rows(p, str(tmp_path / "imgs"))
    assert rows[0].image == os.path.join(str(tmp_path / "imgs"), "img.png")
    with pytest.raises(IsADirectoryError, match="not a saved `datasets` dataset"):
        load_dataset_rows(str(tmp_path / "imgs"))


def test_saved_dataset_rows_reject_nulls(tmp_path):
    datasets = pytest.importorskip("datasets")
    good = str(tmp_path / "good")
    datasets.Dataset.from_dict({"image": ["x.png"], "question": ["q"], "answer": [3]}).save_to_disk(good)
    rows = load_dataset_rows(good)
    assert rows[0].answer == "3" and rows[0].question == "q"
    bad = str(tmp_path / "bad")
    datasets.Dataset.from_dict({"image": ["x.png", "y.png"], "question": ["q", "q"],
                                "answer": ["a", None]}).save_to_disk(bad)
    with pytest.raises(ValueError, match=r"row 1: 'answer' must be a string or a number, got None"):
        load_dataset_rows(bad)


# ---------------------------------------------------------------------------------------------- --resume
def _args(argv):
    a = parse_train_args(argv)
    return a.config, a.overrides, a.resume


def test_resume_does_not_swallow_the_config_or_an_override(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    ckpt.mkdir(parents=True)
    odd = tmp_path / "lr=1e-5"  # a checkpoint folder whose name has '='
    odd.mkdir()
    assert _args(["--resume", "configs/tiny.yaml"]) == ("configs/tiny.yaml", [], True)
    assert _args(["--resume", "c.yml", "a.b=1"]) == ("c.yml", ["a.b=1"], True)
    assert _args(["cfg.yaml", "--resume", "run.out_dir=x"]) == ("cfg.yaml", ["run.out_dir=x"], True)
    assert _args(["cfg.yaml", "a=1", "--resume", "b=2", "c=3"]) == ("cfg.yaml", ["a=1", "b=2", "c=3"], True)
    assert _args(["--resume", "run.out_dir=x"]) == (None, ["run.out_dir=x"], True)
    assert _args(["--res", "cfg.yaml"]) == ("cfg.yaml", [], True)  # an abbreviation of --resume
    # a checkpoint PATH, and bare --resume, as before
    assert _args(["--resume", str(ckpt), "cfg.yaml", "a=1"]) == ("cfg.yaml", ["a=1"], str(ckpt))
    assert _args(["cfg.yaml", "--resume", str(ckpt), "a=1"]) == ("cfg.yaml", ["a=1"], str(ckpt))
    assert _args(["cfg.yaml", "--resume", str(odd)]) == ("cfg.yaml", [], str(odd))
    assert _args(["cfg.yaml", "a=1", "--resume"]) == ("cfg.yaml", ["a=1"], True)
    assert _args(["--resume", "--print-config", "a=1"]) == (None, ["a=1"], True)
    assert _args(["cfg.yaml", "a=1"]) == ("cfg.yaml", ["a=1"], False)
    with pytest.raises(SystemExit):
        parse_train_args(["--resume=cfg.yaml"])


def test_train_main_passes_resume_and_overrides(tmp_path, monkeypatch):
    import vgs_train.loops.trainer

    seen = {}

    class FakeTrainer:
        def __init__(self, cfg, resume=False):
            seen.update(cfg=cfg, resume=resume)
            raise ValueError("stop here")

    monkeypatch.setattr(vgs_train.loops.trainer, "Trainer", FakeTrainer)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("loss:\n  method: opd\n")
    assert train_main(["--resume", str(cfg_path), "run.out_dir=x"]) == 2
    assert seen["resume"] is True and seen["cfg"].loss.method == "opd" and seen["cfg"].run.out_dir == "x"
    assert train_main([str(cfg_path), "--resume", "run.out_dir=y"]) == 2
    assert seen["resume"] is True and seen["cfg"].run.out_dir == "y"
    assert train_main([str(cfg_path), "--resume", str(tmp_path)]) == 2
    assert seen["resume"] == str(tmp_path)


@pytest.mark.parametrize("model", ["empty", "nobody-vgs-test/not-in-the-cache"])
def test_train_main_model_load_errors_are_user_errors(tmp_path, capsys, model, monkeypatch):
    # an existing folder that holds no model (ValueError), a hub id missing from the offline cache (OSError)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if model == "empty":
        model = str(tmp_path / "empty")
        os.makedirs(model)
    p = _write(tmp_path, [GOOD])
    rc = train_main([f"model.student={model}", f"model.teacher={model}", f"data.train={p}", "data.eval=",
                     f"run.out_dir={tmp_path / 'run'}", "run.progress=false", "run.tensorboard=false"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("vgs-train: error: ") and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- vgs-eval
@pytest.fixture
def fake_model(monkeypatch):
    """vgs-eval with the model loaders and evaluate() replaced: records evaluate's rows and keywords."""
    import vgs_train.models.modeling
    import vgs_train.pipeline.evaluate

    calls = []

    class M:
        def to(self, _device):
            return self

        def eval(self):
            return self

    def fake_evaluate(model, processor, rows, **kw):
        calls.append({"rows": rows, **kw})
        return {"n": len(rows), "acc@1": 0.5, **({f"acc@{kw['k']}": 1.0} if kw["k"] else {})}

    monkeypatch.setattr(vgs_train.models.modeling, "load_processor", lambda path: object())
    monkeypatch.setattr(vgs_train.models.modeling, "load_model", lambda path: M())
    monkeypatch.setattr(vgs_train.pipeline.evaluate, "evaluate", fake_evaluate)
    return calls


def test_eval_image_root_and_system_prompt(tmp_path, fake_model, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "imgs").mkdir()
    data = _write(tmp_path / "data", [GOOD, GOOD], image="../imgs/unused.png")
    (tmp_path / "imgs" / "img.png").write_bytes(b"")
    model = str(tmp_path)
    assert eval_main([model, data, "--k", "0"]) == 2  # the images are not next to the JSONL
    assert "'image' file not found" in capsys.readouterr().err and not fake_model
    out = str(tmp_path / "r.json")
    assert eval_main([model, data, "--k", "2", "--image-root", str(tmp_path / "imgs"), "--system-prompt",
                      "Answer briefly.", "--json", out]) == 0
    (call,) = fake_model
    assert call["system_prompt"] == "Answer briefly." and call["k"] == 2
    assert [r.image for r in call["rows"]] == [os.path.join(str(tmp_path / "imgs"), "img.png")] * 2
    assert json.load(open(out))[data] == {"n": 2, "acc@1": 0.5, "acc@2": 1.0}
    assert eval_main([model, data, "--k", "0", "--image-root", str(tmp_path / "imgs")]) == 0
    assert fake_model[-1]["system_prompt"] is None  # the default (the paper's reasoning prompt)


@pytest.mark.parametrize("argv,match", [
    (["--k", "1"], "--k must be 0"), (["--k", "-1"], "--k must be 0"), (["--batch-size", "0"], "--batch-size"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--limit", "-1"], "--limit"),
])
def test_eval_bad_flags(tmp_path, fake_model, capsys, argv, match):
    data = _write(tmp_path, [GOOD])
    assert eval_main([str(tmp_path), data, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vgs-eval: error: ") and match in err and not fake_model


def test_eval_missing_model_and_data(tmp_path, capsys):
    data = _write(tmp_path, [GOOD])
    assert eval_main([str(tmp_path / "nope"), data]) == 2
    assert "vgs-eval: error: model: no such directory" in capsys.readouterr().err
    assert eval_main([str(tmp_path), str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    # an existing folder that holds no model; a hub id missing from the offline cache (OSError)
    for model in (str(tmp_path), "nobody-vgs-test/not-in-the-cache"):
        assert eval_main([model, data, "--k", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vgs-eval: error: ") and "Traceback" not in err


def test_evaluate_rejects_k_1_and_negative():
    from vgs_train.pipeline.evaluate import evaluate

    for k in (1, -1, -4):
        with pytest.raises(ValueError, match="k must be 0"):
            evaluate(None, None, [], k=k)


# ---------------------------------------------------------------------------------------------- RNG fork
class _Tok:
    eos_token_id, pad_token_id, unk_token_id = 1, 0, None

    def convert_tokens_to_ids(self, _t):
        return 1

    def __len__(self):
        return 4


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lm = torch.nn.Linear(2, 4)

    def get_output_embeddings(self):
        return self.lm


class _Forked(Exception):
    pass


def test_evaluation_and_calibration_fork_the_cuda_generators_too(monkeypatch):
    """torch.manual_seed inside the fork reseeds every CUDA generator: they must be forked (restored) too,
    or evaluating during training resets the run's CUDA RNG stream."""
    from vgs_train.data.examples import Example
    from vgs_train.data.rng import fork_rng
    from vgs_train.loops.calibrate import calibrate
    from vgs_train.pipeline.evaluate import evaluate
    from vgs_train.pipeline.pipe import Pipeline

    forked = []

    def spy(devices=None, enabled=True, **kw):
        forked.append(list(devices))
        raise _Forked

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.random, "fork_rng", spy)
    with pytest.raises(_Forked):
        fork_rng()
    proc = SimpleNamespace(tokenizer=_Tok())
    rows = [Example("x.png", "q", "a")]
    with pytest.raises(_Forked):
        evaluate(_Model(), proc, rows, k=0, device="cpu")
    with pytest.raises(_Forked):
        calibrate(Pipeline(_Model(), _Model(), None, None, 4), rows, batches=1, batch_size=1)
    assert forked == [[0, 1]] * 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(_Forked):
        fork_rng()
    assert forked[-1] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fork_rng_restores_the_cuda_generator():
    from vgs_train.data.rng import fork_rng

    torch.manual_seed(123)
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
    with fork_rng():
        torch.manual_seed(0)
        torch.rand(3, device="cuda")
        torch.rand(3)
    assert torch.equal(torch.cuda.get_rng_state(), cuda) and torch.equal(torch.get_rng_state(), cpu)
