"""The loss keywords are declared once (vgs_kernels.options.VGSKeywords); every public surface carries them."""

import dataclasses
import inspect
import os

import pytest

from vgs_kernels import VGSLoss, fused_linear_vgs_loss, vgs_loss
from vgs_kernels.options import BATCH, NAMES, OPTIONS, SETTINGS, VGSOptions, keyword_table
from vgs_train.config import LossConfig
from vgs_train.integrations.verl import LOSS_KEYS
from vgs_train.tools import readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _trl_fields() -> dict:
    trl = pytest.importorskip("vgs_train.integrations.trl")
    return {f.name: f for f in dataclasses.fields(trl.VGSDistillationConfig)}


def missing(names, settings) -> dict[str, list[str]]:
    """For each public surface, the declared keywords it lacks (or whose default differs)."""
    out = {}
    for fn in (vgs_loss, fused_linear_vgs_loss):
        params = inspect.signature(fn).parameters
        out[fn.__name__] = [n for n in names if n not in params or params[n].default != _default(n)]
        out[fn.__name__ + " docstring"] = [n for n in names if f"        {n} (default" not in fn.__doc__]
    out["VGSOptions"] = [n for n in names if n not in VGSOptions.__dataclass_fields__]
    loss_cfg = {f.name: f for f in dataclasses.fields(LossConfig)}
    out["vgs-train loss."] = [n for n in settings if n != "mode" and n not in loss_cfg]
    trl = _trl_fields()
    out["TRL vgs_*"] = [n for n in settings if f"vgs_{n}" not in trl]
    out["verl override_config.vgs_*"] = [n for n in settings if n != "reduction" and n not in LOSS_KEYS]
    start, end = readme.markers("keywords")
    section = _readme().split(start)[1].split(end)[0]
    out["README keyword table"] = [n for n in names if f"| `{n}` |" not in section]
    return {k: v for k, v in out.items() if v}


def _default(name):
    return OPTIONS[name].default


def test_every_declared_keyword_is_on_every_surface():
    assert missing(NAMES, SETTINGS) == {}


def test_the_per_batch_tensors_are_on_every_call():
    start, end = readme.markers("keywords")
    section = _readme().split(start)[1].split(end)[0]
    for fn in (vgs_loss, fused_linear_vgs_loss, VGSLoss.forward):
        params = inspect.signature(fn).parameters
        assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY and params[n].default is None for n in BATCH), fn
    assert all(f"| `{n}` |" in section for n in BATCH)
    assert all(f"        {n} (default None)" in vgs_loss.__doc__ for n in BATCH)


def test_a_keyword_missing_from_the_surfaces_is_reported():
    # what a new declaration without its surfaces would look like: every surface reports it
    got = missing(NAMES + ("new_keyword",), SETTINGS + ("new_keyword",))
    assert set(got) >= {"vgs_loss", "fused_linear_vgs_loss", "VGSOptions", "vgs-train loss.", "TRL vgs_*",
                        "verl override_config.vgs_*", "README keyword table"}
    assert all(v == ["new_keyword"] for v in got.values()), got


def test_defaults_agree_across_surfaces():
    cfg = LossConfig()
    for n in SETTINGS:
        if n != "mode":
            got = getattr(cfg, n)
            assert (tuple(got) if isinstance(got, list) else got) == _default(n), n
    trl = _trl_fields()
    for n in SETTINGS:
        f = trl[f"vgs_{n}"]
        got = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if n == "temperature":  # None: TRL's own temperature
            assert got is None
        else:
            assert (tuple(got) if isinstance(got, list) else got) == _default(n), n
    assert VGSLoss().options == VGSOptions()


def test_readme_keyword_table_is_the_generated_one():
    src = _readme()
    assert readme.replace_section(src, "keywords", keyword_table()) == src, (
        "README's keyword table is stale: run python -m vgs_train.tools.readme README.md")
