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
