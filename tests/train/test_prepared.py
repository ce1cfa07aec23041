"""The prepared teacher and student shipped with the package: their files match the manifest, the default
settings use them, they are the same models under the machine's own instruction set and under emulated AVX2
(where local preparation would not be), and the preparation command writes a set the loader accepts."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
from train_helpers import TINY

from vgs_train.config import load_config
from vgs_train.loops import embedded
from vgs_train.machine import isa_environment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FINGERPRINT = r"""
import hashlib, json, sys
from vgs_train.config import load_config
from vgs_train.loops.embedded import pixels_sha256, prepare_embedded
from vgs_train.machine import describe
from vgs_train.models.modeling import load_model
import os
paths = prepare_embedded(load_config(None, ["embedded.cache_dir=" + sys.argv[1]]), verbose=False)
out = {"cpu_capability": describe()["cpu_capability"], "paths": paths,
       "data": pixels_sha256(os.path.dirname(paths["train"]))}
for m in ("teacher", "student"):
    h = hashlib.sha256()
    for k, v in sorted(load_model(paths[m]).state_dict().items()):
        h.update(k.encode()); h.update(v.detach().contiguous().numpy().tobytes())
    out[m] = h.hexdigest()
print(json.dumps(out))
"""


def test_shipped_files_match_their_manifest_and_the_default_settings():
    manifest = embedded.verify_shipped()
    assert set(manifest["files"]) >= {"teacher/model.safetensors", "student/model.safetensors",
                                      "student/tokenizer.json", "teacher/config.json"}
    cfg = load_config(None, [])
    assert manifest["recipe"] == embedded.stage_keys(cfg, with_versions=False), (
        "the embedded defaults changed: rebuild the shipped models (python -m vgs_train.loops.embedded --write-shipped "
        "vgs_train/prepared)")
    assert set(embedded.shipped_paths(cfg)) == {"teacher", "student"}
    assert embedded.shipped_paths(load_config(None, ["embedded.shipped=false"])) == {}
    # a changed student recipe keeps the shipped teacher and prepares the student
    assert set(embedded.shipped_paths(load_config(None, ["embedded.student_sft_steps=7"]))) == {"teacher"}


def test_the_same_models_and_data_under_both_instruction_sets(tmp_path):
    prints = {}
    for setting in ("default", "avx2"):
        env = isa_environment(setting) | {"PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
        out = subprocess.run([sys.executable, "-c", FINGERPRINT, str(tmp_path / setting)], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        prints[setting] = json.loads(out.stdout.strip().splitlines()[-1])
    assert prints["avx2"]["cpu_capability"] == "AVX2"
    for key in ("teacher", "student", "data"):
        assert prints["default"][key] == prints["avx2"][key], key
    assert prints["default"]["data"] == embedded.read_manifest()["data_pixels_sha256"]
    assert prints["avx2"]["paths"]["student"] == os.path.join(embedded.SHIPPED_DIR, "student")


def test_the_preparation_command_writes_a_set_the_loader_uses(tmp_path, embedded_cache):
    ship = tmp_path / "shipped"
    overrides = [o for o in TINY if o.startswith("embedded.")]
    assert embedded.main(["--write-shipped", str(ship), "--cache", embedded_cache, "--workers", "1",
                          *overrides]) == 0
    cfg = load_config(None, overrides + [f"embedded.cache_dir={tmp_path / 'fresh'}"])
    paths = embedded.prepare_embedded(cfg, verbose=False, shipped_dir=str(ship))
    assert paths["teacher"] == str(ship / "teacher") and paths["student"] == str(ship / "student")
    assert not any(n.startswith(("teacher-", "student-")) for n in os.listdir(tmp_path / "fresh"))
    # the shipped student is the model prepared in the cache, byte for byte
    src = embedded.prepare_embedded(load_config(None, overrides + [f"embedded.cache_dir={embedded_cache}",
                                                                   "embedded.shipped=false"]), verbose=False)
    digest = [hashlib.sha256(open(os.path.join(d, "model.safetensors"), "rb").read()).hexdigest()
              for d in (src["student"], paths["student"])]
    assert digest[0] == digest[1]
    # a damaged file is refused, naming it
    with open(ship / "student" / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    with pytest.raises(RuntimeError, match="student/model.safetensors"):
        embedded.prepare_embedded(cfg, verbose=False, shipped_dir=str(ship))
