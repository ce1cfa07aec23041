import pytest
import yaml

from vgs_train.cli import calibrate_main, train_main
from vgs_train.config import TrainConfig, load_config


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"loss": {"method": "opd", "alpha": 1.5}, "optim": {"lr": 2e-4}}))
    cfg = load_config(str(p), ["loss.beta=0.05", "run.max_steps=7", "loss.adaptive_quantiles=[0.3, 0.8]"])
    assert cfg.loss.method == "opd" and cfg.loss.alpha == 1.5 and cfg.loss.beta == 0.05
    assert cfg.optim.lr == 2e-4 and cfg.run.max_steps == 7
    assert cfg.loss_kwargs()["mode"] == "standard"
    assert cfg.loss_kwargs()["adaptive_quantiles"] == (0.3, 0.8)
    assert load_config(None, ["loss.method=vgs-adaptive"]).loss_mode == "adaptive"
    assert load_config(None, ["loss.method=language-steering"]).loss_mode == "language"
    assert isinstance(load_config(), TrainConfig)


def test_unknown_key_names_it_and_lists_valid(tmp_path):
    with pytest.raises(ValueError) as e:
        load_config(None, ["loss.alpah=2"])
    msg = str(e.value)
    assert "loss.alpah" in msg and "alpha" in msg and "beta" in msg
    p = tmp_path / "c.yaml"
    p.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ValueError, match=r"unknown config key 'optimizer'.*optim"):
        load_config(str(p))


@pytest.mark.parametrize("item,match", [
    ("loss.method=kd", "loss.method must be one of"),
    ("loss.method=grpo", "samples_per_prompt"),
    ("run.max_steps=0", "run.max_steps"),
    ("run.max_steps=abc", "expects an integer"),
    ("optim.lr=-1", "optim.lr"),
    ("run.progress=maybe", "true/false"),
    ("rollout.engine=vllm", "rollout.engine"),
    ("nokeyvalue", "key=value"),
])
def test_bad_values(item, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [item])


def test_cli_reports_config_errors(capsys):
    assert train_main(["loss.nope=1"]) == 2
    assert "unknown config key 'loss.nope'" in capsys.readouterr().err
    assert train_main(["--print-config", "loss.method=opd"]) == 0
    assert "method: opd" in capsys.readouterr().out
    assert calibrate_main(["loss.nope=1"]) == 2


@pytest.mark.parametrize("items,match", [
    (["run.log_every=0"], r"run\.log_every must be a positive integer"),
    (["run.max_steps=-3"], r"run\.max_steps must be a positive integer"),
    (["run.save_every=-1"], r"run\.save_every must be an integer >= 0"),
    (["eval.every=-1"], r"eval\.every must be an integer >= 0"),
    (["eval.limit=-1"], r"eval\.limit must be an integer >= 0"),
    (["eval.batch_size=0"], r"eval\.batch_size must be a positive integer"),
    (["eval.max_new_tokens=0"], r"eval\.max_new_tokens must be a positive integer"),
    (["eval.k=1"], r"eval\.k must be 0 .* >= 2"),
    (["eval.k=-1"], r"eval\.k must be 0 .* >= 2"),
    (["optim.betas=[0.9]"], r"optim\.betas must be a list of 2 numbers in \[0, 1\)"),
    (["optim.betas=[0.9, 1.0]"], r"optim\.betas"),
    (["optim.betas=[x, 0.9]"], r"optim\.betas"),
    (["optim.batch_size=0"], r"optim\.batch_size"),
    (["optim.grad_accum=0"], r"optim\.grad_accum"),
    (["optim.lr=-1e-5"], r"optim\.lr"),
    (["optim.lr=.nan"], r"optim\.lr"),
    (["rollout.top_p=0"], r"rollout\.top_p must be in \(0, 1\]"),
    (["rollout.top_p=1.5"], r"rollout\.top_p"),
    (["rollout.temperature=0"], r"rollout\.temperature"),
    (["rollout.top_k=-1"], r"rollout\.top_k must be an integer >= 0"),
    (["rollout.max_new_tokens=0"], r"rollout\.max_new_tokens"),
    (["grpo.epsilon=-0.1"], r"grpo\.epsilon must be a number"),
    (["grpo.epsilon=abc"], r"grpo\.epsilon"),
    (["grpo.epsilon_high=abc"], r"grpo\.epsilon_high must be a number"),
    (["grpo.epsilon_high=-1"], r"grpo\.epsilon_high"),
    (["grpo.lam=1.5"], r"grpo\.lam must be in \[0, 1\]"),
    (["grpo.lam=-0.1"], r"grpo\.lam"),
    (["grpo.iterations=0"], r"grpo\.iterations"),
    # the loss options, checked by vgs_kernels' VGSOptions at load time, name their loss. key
    (["loss.quantile=1.5"], r"^loss\.quantile must lie in \(0, 1\)"),
    (["loss.adaptive_quantiles=[0.7, 0.4]"], r"^loss\.adaptive_quantiles"),
    (["loss.vds_scope=nope"], r"^loss\.vds_scope"),
    (["loss.reduction=nope"], r"^loss\.reduction"),
    (["loss.reduction=sum"], r"^loss\.reduction must be one of .*sequence.*token.* in vgs-train"),
    (["loss.temperature=0"], r"^loss\.temperature"),
    (["loss.alpha=.nan"], r"^loss\.alpha"),
    (["loss.beta=.inf"], r"^loss\.beta"),
    (["loss.gamma=.nan"], r"^loss\.gamma"),
    (["loss.threshold=[0.1, 0.2]"], r"^loss\.threshold.*loss\.method=vgs"),
    (["loss.method=vgs-adaptive", "loss.threshold=0.3"], r"^loss\.threshold.*two thresholds"),
    (["loss.threshold=abc"], r"^loss\.threshold"),
    (["loss.chunk_size=0"], r"^loss\.chunk_size"),
    (["loss.backend=gpu"], r"^loss\.backend"),
    # a periodic evaluation needs eval data (the end-of-run one is skipped without it)
    (["eval.every=5", "data.eval="], r"eval\.every=5 .* data\.eval is empty"),
])
def test_bad_values_name_the_key(items, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, items)


def test_good_edge_values_load():
    cfg = load_config(None, ["eval.k=0", "optim.betas=[0, 9e-1]", "grpo.epsilon_high=3e-1", "rollout.top_p=1",
                             "loss.threshold=1e-3", "grpo.lam=0", "run.save_every=0", "eval.limit=0"])
    assert cfg.eval.k == 0 and cfg.optim.betas == [0.0, 0.9] and cfg.grpo.epsilon_high == 0.3
    assert cfg.loss.threshold == 0.001 and cfg.loss_kwargs()["threshold"] == 0.001
    assert load_config(None, ["eval.k=2"]).eval.k == 2
    assert load_config(None, ["loss.method=vgs-adaptive", "loss.threshold=[0.1, 0.2]"]).loss.threshold == [0.1, 0.2]
    # gamma auto / a preset are not numbers: the loss-option check skips them
    assert load_config(None, ["loss.gamma=auto"]).loss.gamma == "auto"
    assert load_config(None, ["loss.gamma=qwen3-vl-2b"]).gamma_value() == 0.41
    # pure GRPO has no distillation term: its (unused) threshold is not checked against a mode
    load_config(None, ["loss.method=grpo", "rollout.samples_per_prompt=2", "loss.threshold=[0.1, 0.2]"])
    assert load_config(None, ["eval.every=5", "data.eval=", "eval.every=0"]).data.eval == ""


def test_yaml_syntax_errors_are_value_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("run:\n  max_steps: [1,\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*not valid YAML"):
        load_config(str(p))
    with pytest.raises(ValueError, match=r"override 'loss\.alpha=\[1,'.*not valid YAML"):
        load_config(None, ["loss.alpha=[1,"])
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_config(str(tmp_path))


def test_model_paths(tmp_path):
    # not part of the default validation: configs with placeholder paths (configs/paper) still load
    assert load_config(None, ["model.student=/no/such/model"]).model.student == "/no/such/model"
    for value, match in (("/no/such/model", r"model\.student: no such directory: /no/such/model$"),
                         ("./nope", r"model\.student: no such directory: \./nope$"),
                         ("nope", r"model\.student: no such directory: nope"),
                         ("a/b/c", r"model\.student: no such directory: a/b/c")):
        with pytest.raises(ValueError, match=match):
            load_config(None, [f"model.student={value}"], check_paths=True)
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ValueError, match=r"model\.teacher: not a directory"):
        load_config(None, [f"model.teacher={f}"], check_paths=True)
    # a folder, "tiny" and hub ids (NAMESPACE/NAME, from the local HF cache) pass
    cfg = load_config(None, [f"model.student={tmp_path}", "model.teacher=Qwen/Qwen3-VL-8B-Instruct"],
                      check_paths=True)
    assert cfg.model.teacher == "Qwen/Qwen3-VL-8B-Instruct"
    load_config(None, [], check_paths=True)


@pytest.mark.parametrize("prog", ["vgs-train", "vgs-calibrate", "vgs-analyze"])
def test_cli_user_errors_exit_2_without_traceback(prog, tmp_path, capsys):
    from vgs_train.cli import analyze_main

    main = {"vgs-train": train_main, "vgs-calibrate": calibrate_main, "vgs-analyze": analyze_main}[prog]
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: {alpha: 2\n")
    cases = [([str(bad)], "not valid YAML"), (["loss.alpha=[1,"], "not valid YAML"),
             ([str(tmp_path)], "is a directory"), ([str(tmp_path / "missing.yaml")], "missing.yaml"),
             (["model.student=/no/such/model"], "model.student: no such directory: /no/such/model"),
             (["model.teacher=./no/such"], "model.teacher: no such directory"),
             (["loss.nope=1"], "unknown config key 'loss.nope'")]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"{prog}: error: ") and msg in err and "Traceback" not in err, (argv, err)


def test_rollout_engine_names_are_the_registry():
    from vgs_train.config import ROLLOUT_ENGINES
    from vgs_train.pipeline.rollout import ENGINES

    assert set(ROLLOUT_ENGINES) == set(ENGINES)
