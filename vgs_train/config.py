"""Typed training configuration: dataclasses, YAML (``yaml.safe_load``) and dotted ``key=value`` overrides.

The bottom layer of ``vgs_train`` (docs/design.md): it imports no model, view or loop code. It is the one
place that names the methods (``METHODS``, ``GRPO_METHODS``), the loss keywords they pass to the kernels
(:meth:`TrainConfig.loss_kwargs`) and the gamma presets (``GAMMA_PRESETS``).

Unknown keys are errors that name the key and list the valid ones. Plain dataclasses with a small coercion
step, not OmegaConf structured configs or ``HfArgumentParser``: OmegaConf's unknown-key error names the key
but not the valid ones and its type errors span several lines of internals (``reference_type=...``), and
``HfArgumentParser`` reads ``--flags`` into flat dataclasses, not a YAML file of nested sections with dotted
overrides; both would need the same wrapping this module does, plus a dependency.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from vgs_kernels.options import SETTINGS, setting_fields

from .data.rewards import get_reward_fn

# loss.method -> the mode of the VGS loss it distils with (docs/math.md, "Objectives")
METHODS = {"opd": "standard", "vgs": "vgs", "vgs-adaptive": "adaptive", "language-steering": "language"}
# GRPO (paper Sec. 8, Eq. 22) -> the distillation regulariser's mode (None: pure GRPO, no teacher)
GRPO_METHODS = {"grpo": None, "grpo+opd": "standard", "grpo+vgs": "vgs"}
ALL_METHODS = {**METHODS, **GRPO_METHODS}
TRAIN_REDUCTIONS = ("sequence", "token")  # "sum" / "none" are for callers that normalise themselves
ROLLOUT_ENGINES = ("hf",)  # rollout.engine names; vgs_train.pipeline.rollout.ENGINES maps each to its class
# gamma at alpha = 2 from App. A of the paper (the model's name, case-insensitive, as in the config)
GAMMA_PRESETS = {"qwen3-vl-2b": 0.41, "qwen3-vl-4b": 0.36}
PRESET_ALPHA = 2.0


def gamma_preset(name: str, alpha: float) -> float:
    """``GAMMA_PRESETS`` lookup by name (``qwen3-vl-2b`` / ``qwen3-vl-4b``; a model path containing one of
    them, e.g. ``Qwen/Qwen3-VL-2B-Instruct``, also matches). Presets hold only at alpha = 2."""
    key = name.lower()
    hit = [v for k, v in GAMMA_PRESETS.items() if k in key]
    if not hit:
        raise ValueError(f"no gamma preset for {name!r}; presets: {sorted(GAMMA_PRESETS)} (or 'auto', or a number)")
    if abs(alpha - PRESET_ALPHA) > 1e-9:
        raise ValueError(f"gamma preset {name!r} was measured at alpha={PRESET_ALPHA}, not alpha={alpha}; "
                         "use gamma: auto or run vgs-calibrate")
    return hit[0]


def steering_mode(mode: str | None) -> str:
    """The mode whose beta = 0 objective is std + alpha * (its steering term): the distillation mode itself,
    ``vgs`` for the methods without one (``opd``, pure GRPO). What vgs-calibrate and gamma: auto measure."""
    return "vgs" if mode in (None, "standard", "vgs") else mode


@dataclass
class TinyModelConfig:
    """Sizes of a tiny Qwen3-VL (``vgs_train.models.tiny`` builds it; the real models' sizes are in the same fields)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    mrope_section: list = field(default_factory=lambda: [4, 2, 2])
    rope_theta: float = 5_000_000.0
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_num_heads: int = 4
    vision_intermediate_size: int = 128
    deepstack_visual_indexes: list = field(default_factory=lambda: [0])
    num_position_embeddings: int = 64  # a perfect square (8 x 8 patch grid)
    tie_word_embeddings: bool = True
    vocab_multiple: int = 64  # lm_head rows = len(tokenizer) rounded up (Qwen: 151669 ids -> 151936 rows)


@dataclass
class RunConfig:
    out_dir: str = "runs/tiny"
    seed: int = 0
    max_steps: int = 100
    log_every: int = 1
    save_every: int = 50  # checkpoint every N optimizer steps (0 = only at the end / on a signal)
    keep_checkpoints: int = 2
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True


@dataclass
class ModelConfig:
    student: str = "tiny"  # a local HF path, or "tiny" (the embedded default, see `embedded`)
    teacher: str = "tiny"
    dtype: str = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU; or fp32 / bf16
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"


@dataclass
class DataConfig:
    train: str = "synthetic"  # JSONL {image, question, answer} | "hf:NAME[:SPLIT]" | "synthetic"
    eval: str = "synthetic"
    image_root: str = ""  # relative image paths resolve against this (default: the JSONL's folder)
    shuffle: bool = True
    system_prompt: str = ""  # empty = the paper's reasoning prompt (App. B.4)
    max_prompt_length: int = 0  # drop training rows whose image-view prompt is longer (tokens); 0 = no limit


@dataclass
class RolloutConfig:
    engine: str = "hf"  # swappable generation backend (vgs_train.pipeline.rollout.ENGINES)
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    samples_per_prompt: int = 1


# loss.alpha, loss.beta, loss.quantile, ...: the loss keywords' training settings, with their defaults, from
# their one declaration (vgs_kernels.options.VGSKeywords); mode is loss.method's
_LossSettings = dataclasses.make_dataclass("_LossSettings", setting_fields(exclude=("mode",)))


@dataclass
class LossConfig(_LossSettings):
    method: str = "vgs"  # opd | vgs | vgs-adaptive | language-steering | grpo | grpo+opd | grpo+vgs
    gamma: Any = 1.0  # a number, "auto" (measure over the first gamma_calibration_steps, then freeze) or a
    #                   preset name (qwen3-vl-2b = 0.41, qwen3-vl-4b = 0.36; alpha = 2 only)
    gamma_calibration_steps: int = 10
    chunk_size: Any = None
    backend: str = "auto"


@dataclass
class GRPOConfig:
    """GRPO (methods grpo, grpo+opd, grpo+vgs): J = (1 - lam) * J_GRPO - lam * L_distill (Eq. 22).
    The group size G is rollout.samples_per_prompt (>= 2)."""

    lam: float = 0.3  # lambda: weight of the distillation regulariser (0 = pure GRPO, 1 = pure distillation)
    epsilon: float = 0.2  # PPO clip range: ratio clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: Any = None  # default: epsilon
    reward: str = "exact_match"  # exact_match | format_exact_match | "module:function" (completion, answer) -> float
    scale_rewards: bool = True  # divide the group-centred rewards by the group std
    iterations: int = 1  # optimizer steps per rollout batch (> 1 makes the clip active)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    warmup_steps: int = 0  # linear learning-rate warm-up over the first N optimizer steps, then constant
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    batch_size: int = 8  # prompts per micro-batch


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N steps during training (0 = only at the end)
    batch_size: int = 64
    k: int = 4  # sampled Acc@k
    max_new_tokens: int = 48
    limit: int = 0  # evaluate at most this many rows (0 = all)
    at_end: bool = True


@dataclass
class HealthConfig:
    """Thresholds of the training-health signals (``vgs_train.pipeline.health``): warnings, never a stop. "Best" is the
    best window of the run so far among those wholly after ``optim.warmup_steps``."""

    window: int = 10  # steps in the moving window the signals are computed on
    acc_drop: float = 0.5  # warn when windowed rollout accuracy < (1 - acc_drop) x the best window's
    truncated: float = 0.25  # warn when more than this share of the window's responses hit max_new_tokens
    #                          (and more than twice the lowest window's share)
    std_rise: float = 1.5  # warn when windowed std KL > std_rise x the lowest window's (and 0.5 nats above it)
    prior_gap_rise: float = 2.0  # warn when the windowed prior gap > prior_gap_rise x the first window's ...
    prior_gap_margin: float = 0.25  # ... and this many nats above it (methods that build the visual target only)


@dataclass
class EmbeddedConfig:
    """The embedded default (model.student/teacher = "tiny"): synthetic task, offline tokenizer,
    tiny Qwen3-VL teacher/student, prepared once and cached."""

    cache_dir: str = ""  # default: $VGS_TRAIN_CACHE or ~/.cache/vgs_train
    shipped: bool = True  # use the teacher / student shipped with the package where these settings are theirs
    tokenizer_vocab: str = "task"  # task (Qwen BPE restricted to the task's tokens) | full (151,669 ids)
    n_train: int = 6000
    n_eval: int = 200
    image_size: int = 96
    task_seed: int = 1234
    teacher: TinyModelConfig = field(default_factory=lambda: TinyModelConfig(
        hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
        intermediate_size=256))
    student: TinyModelConfig = field(default_factory=TinyModelConfig)
    # The teacher sees (mostly image prompts); the student is a fluent language model with weak vision
    # (mostly text-only prompts): see docs/demo.md. Text-only rows teach each its language prior.
    teacher_sft_steps: int = 800
    teacher_sft_lr: float = 3e-3
    teacher_sft_text_fraction: float = 0.25  # share of each SFT batch on the text-only view
    teacher_phrasing_mix: float = 0.2  # share of the teacher's SFT responses in the student's phrasing
    student_sft_steps: int = 200
    student_sft_lr: float = 3e-3
    student_sft_text_fraction: float = 0.9
    sft_batch_size: int = 32
    sft_seed: int = 0


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)

    def validate(self, check_paths: bool = False) -> TrainConfig:
        """Check every value (errors name the dotted key). ``check_paths``: also require model.student /
        model.teacher to be "tiny", an existing folder or a hub id (the CLIs; see :meth:`check_paths`)."""
        m = self.loss.method
        if m not in ALL_METHODS:
            raise ValueError(f"loss.method must be one of {sorted(ALL_METHODS)}, got {m!r}")
        self._validate_gamma()
        self._validate_loss_options()
        if m in GRPO_METHODS:
            if self.rollout.samples_per_prompt < 2:
                raise ValueError(f"loss.method={m} needs rollout.samples_per_prompt (the GRPO group size G) >= 2, "
                                 f"got {self.rollout.samples_per_prompt}")
            get_reward_fn(self.grpo.reward)
        self._validate_grpo()
        for name, v in (("run.max_steps", self.run.max_steps), ("run.log_every", self.run.log_every),
                        ("optim.grad_accum", self.optim.grad_accum), ("optim.batch_size", self.optim.batch_size),
                        ("rollout.max_new_tokens", self.rollout.max_new_tokens),
                        ("rollout.samples_per_prompt", self.rollout.samples_per_prompt),
                        ("eval.batch_size", self.eval.batch_size), ("eval.max_new_tokens", self.eval.max_new_tokens),
                        ("health.window", self.health.window)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name, v in (("run.save_every", self.run.save_every), ("eval.every", self.eval.every),
                        ("eval.limit", self.eval.limit), ("rollout.top_k", self.rollout.top_k),
                        ("data.max_prompt_length", self.data.max_prompt_length),
                        ("optim.warmup_steps", self.optim.warmup_steps)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        check_eval_k(self.eval.k, "eval.k")
        self._validate_health()
        if self.eval.every > 0 and not self.data.eval:
            raise ValueError(f"eval.every={self.eval.every} evaluates during training but data.eval is empty: "
                             "set data.eval or eval.every=0")
        if not _finite(self.optim.lr) or self.optim.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.optim.lr!r}")
        self.optim.betas = _betas(self.optim.betas)
        if not _finite(self.rollout.temperature) or self.rollout.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0, got {self.rollout.temperature!r}")
        if not _finite(self.rollout.top_p) or not 0.0 < self.rollout.top_p <= 1.0:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.rollout.top_p!r}")
        if self.model.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"model.dtype must be auto, fp32 or bf16, got {self.model.dtype!r}")
        if self.embedded.tokenizer_vocab not in ("task", "full"):
            raise ValueError(f"embedded.tokenizer_vocab must be task or full, got {self.embedded.tokenizer_vocab!r}")
        if self.rollout.engine not in ROLLOUT_ENGINES:
            raise ValueError(f"rollout.engine must be one of {sorted(ROLLOUT_ENGINES)}, got {self.rollout.engine!r}")
        if check_paths:
            self.check_paths()
        return self

    def check_paths(self) -> TrainConfig:
        """model.student / model.teacher: "tiny", an existing model folder, or a hub id NAMESPACE/NAME
        (loaded from the local Hugging Face cache). Not part of the default validation: configs with
        placeholder paths (configs/paper) still load for inspection."""
        for key in ("student", "teacher"):
            value = getattr(self.model, key)
            if value != "tiny":
                check_model_path(value, f"model.{key}")
        return self

    def _validate_health(self) -> None:
        h = self.health
        for key, v, lo, hi in (("acc_drop", h.acc_drop, 0.0, 1.0), ("truncated", h.truncated, 0.0, 1.0),
                               ("std_rise", h.std_rise, 1.0, math.inf), ("prior_gap_rise", h.prior_gap_rise, 1.0, math.inf),
                               ("prior_gap_margin", h.prior_gap_margin, 0.0, math.inf)):
            if not _finite(v) or not lo <= v <= hi:
                raise ValueError(f"health.{key} must be a number in [{lo:g}, {hi:g}], got {v!r}")

    def _validate_grpo(self) -> None:
        g = self.grpo
        if not _finite(g.lam) or not 0.0 <= g.lam <= 1.0:
            raise ValueError(f"grpo.lam must be in [0, 1], got {g.lam!r}")
        if not _finite(g.epsilon) or g.epsilon <= 0:
            raise ValueError(f"grpo.epsilon must be a number > 0, got {g.epsilon!r}")
        if g.epsilon_high is not None:
            eh = _number(g.epsilon_high)
            if eh is None or eh <= 0:
                raise ValueError(f"grpo.epsilon_high must be a number > 0 (or null: grpo.epsilon), "
                                 f"got {g.epsilon_high!r}")
            g.epsilon_high = eh
        if not isinstance(g.iterations, int) or g.iterations < 1:
            raise ValueError(f"grpo.iterations must be a positive integer, got {g.iterations!r}")

    def _validate_loss_options(self) -> None:
        """The loss keywords through ``vgs_kernels.options.VGSOptions`` (the check every backend runs), so a
        bad value fails here naming its ``loss.`` key instead of at the first training step."""
        from vgs_kernels.backends import NAMES
        from vgs_kernels.options import VGSOptions
        from vgs_kernels.validation import check_chunk_size

        lc = self.loss
        thr = lc.threshold
        if isinstance(thr, (list, tuple)):
            thr = tuple(_number(x) if _number(x) is not None else x for x in thr)
        elif _number(thr) is not None:
            thr = _number(thr)
        kw = self.loss_kwargs()  # gamma already checked by _validate_gamma (auto -> 1.0, presets resolved)
        kw.pop("chunk_size"), kw.pop("backend")
        if self.loss_mode is None:  # pure GRPO: no distillation term, the threshold is never used
            thr = None
        try:
            VGSOptions(**{**kw, "threshold": thr})
            check_chunk_size(lc.chunk_size)
        except ValueError as e:
            msg = str(e)
            key = re.match(r"\w*", msg).group(0)
            if key == "mode":  # the mode comes from loss.method: the threshold is what does not fit it
                raise ValueError(f"loss.threshold: {msg} (loss.method={self.loss.method})") from None
            if key == "threshold":
                raise ValueError(f"loss.{msg} (loss.method={self.loss.method})") from None
            if key in {f.name for f in dataclasses.fields(LossConfig)}:
                raise ValueError(f"loss.{msg}") from None
            raise ValueError(f"loss: {msg}") from None
        if thr is not None:  # numeric strings (YAML 1.1: 1e-3) as numbers
            lc.threshold = list(thr) if isinstance(thr, tuple) else thr
        if lc.reduction not in TRAIN_REDUCTIONS:
            raise ValueError(f"loss.reduction must be one of {TRAIN_REDUCTIONS} in vgs-train (the trainer normalises "
                             f"over ranks and accumulation steps itself), got {lc.reduction!r}")
        if lc.backend not in NAMES:
            raise ValueError(f"loss.backend must be one of {NAMES}, got {lc.backend!r}")

    def _validate_gamma(self) -> None:
        g = self.loss.gamma
        if isinstance(g, str) and g != "auto":
            try:
                float(g)
            except ValueError:
                gamma_preset(g, self.loss.alpha)  # raises naming the presets
            else:
                self.loss.gamma = float(g)
        elif isinstance(g, bool) or not isinstance(g, (int, float, str)):
            raise ValueError(f"loss.gamma must be a number, 'auto' or a preset name, got {g!r}")
        if isinstance(self.loss.gamma, (int, float)) and self.loss.gamma <= 0:
            raise ValueError(f"loss.gamma must be > 0, got {g!r}")
        if self.loss.gamma == "auto":
            if self.loss_mode in (None, "standard"):
                raise ValueError(f"loss.gamma=auto normalises the steering term; loss.method={self.loss.method} "
                                 "has none (use a number)")
            if self.loss.gamma_calibration_steps < 1:
                raise ValueError("loss.gamma_calibration_steps must be >= 1")

    @property
    def loss_mode(self) -> str | None:
        """The VGS loss mode (for GRPO methods: the regulariser's mode; None for pure GRPO)."""
        return ALL_METHODS[self.loss.method]

    @property
    def uses_visual_target(self) -> bool:
        """Whether the loss builds the visual target r (every distillation mode but ``standard``)."""
        return self.loss_mode not in (None, "standard")

    @property
    def is_grpo(self) -> bool:
        return self.loss.method in GRPO_METHODS

    def gamma_value(self) -> float:
        """The numeric gamma (presets resolved; ``auto`` -> 1.0 until calibrated)."""
        g = self.loss.gamma
        if g == "auto":
            return 1.0
        if isinstance(g, str):
            return gamma_preset(g, self.loss.alpha)
        return float(g)

    def loss_kwargs(self, *, mode: str | None = None, gamma: float | None = None) -> dict:
        """The ``loss.`` keywords for ``fused_linear_vgs_loss`` (built here only): ``mode`` from loss.method
        unless given, ``gamma`` numeric (presets resolved, ``auto`` -> 1.0 until calibrated) unless given.
        vgs-calibrate and vgs-analyze pass ``mode=steering_mode(cfg.loss_mode), gamma=1.0``."""
        lc = self.loss
        kw = {name: getattr(lc, name) for name in SETTINGS if name != "mode"}
        kw.update(mode=mode or self.loss_mode or "standard", gamma=self.gamma_value() if gamma is None else gamma,
                  chunk_size=lc.chunk_size, backend=lc.backend)
        return {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}

    def cache_dir(self) -> str:
        d = self.embedded.cache_dir or os.environ.get("VGS_TRAIN_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "vgs_train")
        return os.path.abspath(d)


def _number(v) -> float | None:
    """``v`` as a finite float (numbers and numeric strings: YAML 1.1 reads 1e-3 as a string), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return None
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _betas(betas) -> list:
    vals = [_number(b) for b in betas] if isinstance(betas, (list, tuple)) else []
    if len(vals) != 2 or any(b is None or not 0.0 <= b < 1.0 for b in vals):
        raise ValueError(f"optim.betas must be a list of 2 numbers in [0, 1), got {betas!r}")
    return vals


def check_eval_k(k, key: str = "eval.k") -> int:
    """Sampled Acc@k needs k >= 2 (k = 1 would be a second, sampled acc@1); 0 = greedy Acc@1 only."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or k == 1:
        raise ValueError(f"{key} must be 0 (greedy Acc@1 only) or an integer >= 2 (sampled Acc@k), got {k!r}")
    return k


def looks_like_hub_id(path: str) -> bool:
    """``NAMESPACE/NAME`` that is not a local path (those load from the local Hugging Face cache offline)."""
    return (path.count("/") == 1 and not path.startswith(("/", ".")) and all(path.split("/"))
            and not os.path.exists(path))


def check_model_path(path: str, key: str) -> None:
    """A model folder (save_pretrained) that exists, or a hub id; else a ValueError naming ``key``."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{key}: expected a model folder or hub id, got {path!r}")
    if os.path.isdir(path) or looks_like_hub_id(path):
        return
    if os.path.exists(path):
        raise ValueError(f"{key}: not a directory: {path}")
    hint = "" if path.startswith(("/", ".")) else " (nor a hub id NAMESPACE/NAME)"
    raise ValueError(f"{key}: no such directory: {path}{hint}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _coerce(value, tp, key: str):
    """Coerce a YAML/override value to the dataclass field type ``tp``."""
    origin = get_origin(tp)
    if tp is Any or value is None:
        return value
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        return _coerce(value, args[0], key) if len(args) == 1 else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"config key {key!r} expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"config key {key!r} expects an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {key!r} expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"config key {key!r} expects a string, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} expects a list, got {value!r}")
        return list(value)
    return value


def _apply(obj, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {data!r}")
    hints = get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in data.items():
        key = prefix + str(k)
        if k not in names:
            raise ValueError(f"unknown config key {key!r}; valid keys under {prefix.rstrip('.') or 'the top level'}: "
                             f"{', '.join(names)}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {item!r}: the value is not valid YAML ({_one_line(e)})") from None
    return key.strip().split("."), value


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def load_config(path: str | None = None, overrides: list[str] | tuple = (), base: dict | None = None,
                check_paths: bool = False) -> TrainConfig:
    """Defaults <- YAML file <- ``base`` dict <- dotted overrides; then validated (``check_paths``: the model
    paths too, see :meth:`TrainConfig.check_paths`). Errors: ValueError naming the key (YAML syntax
    errors included), FileNotFoundError / IsADirectoryError for ``path``."""
    cfg = TrainConfig()
    if path:
        if os.path.isdir(path):
            raise IsADirectoryError(f"config {path!r} is a directory, not a YAML file")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"config {path!r} is not valid YAML: {_one_line(e)}") from None
        _apply(cfg, data)
    if base:
        _apply(cfg, base)
    for item in overrides:
        keys, value = parse_override(item)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested)
    return cfg.validate(check_paths=check_paths)


def save_config(cfg: TrainConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
