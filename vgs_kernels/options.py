"""The loss keywords, declared once.

``VGSKeywords`` is the one list: each keyword's type, default, meaning and whether it is a training setting
(one a trainer's config carries, as opposed to a per-call switch). Everything else is derived from it:

* ``VGSOptions``, the validated frozen record every backend reads (generated from the list, checks below);
* the keyword-only parameters of ``vgs_loss`` / ``fused_linear_vgs_loss`` (:func:`takes_loss_keywords` puts
  them, and the per-batch tensors of ``BatchKeywords``, into the functions' signatures and docstrings; type
  checkers read them through ``Unpack[CallKeywords]``);
* ``VGSLoss``'s constructor, the training config's ``loss`` section, the TRL config's ``vgs_*`` fields and the
  verl engine's ``override_config.vgs_*`` keys (``SETTINGS``), and the README's keyword table
  (:func:`keyword_table`).

A new keyword is one line here (plus its check, if it needs one) and the code that reads it
(docs/design.md); tests/test_keywords.py fails when a surface misses it.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from dataclasses import dataclass, make_dataclass
from dataclasses import field as _field
from typing import Annotated, Any, TypedDict, get_args, get_origin, get_type_hints

import torch

from . import modes as _modes

MODES = tuple(_modes.MODES)
# sequence / token: means (the paper's trajectory average / over all valid tokens); sum: the caller
# normalises; none: per-token losses shaped like the mask (vgs_loss only)
REDUCTIONS = ("sequence", "token", "sum", "none")
VDS_SCOPES = ("global", "local")
# Smallest accepted temperature: logits are divided by tau, and the finite stand-in for -inf logits
# (torch_rows.NEG_LOGIT = -1e30) must stay finite in fp32 (|x| < 3.4e38) after the division, with
# room for the visual-target logits x_sp + x_t - x_tp (up to ~3x larger).
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class Option:
    """One keyword's default and meaning (markdown, for the README table and the docstrings).

    setting: a training setting, carried by the trainers' configs (False: a per-call switch)."""

    default: Any
    doc: str
    setting: bool = True


class VGSKeywords(TypedDict, total=False):
    """The loss keywords of ``vgs_loss``, ``fused_linear_vgs_loss`` and ``VGSLoss``."""

    mode: Annotated[str, Option("vgs", _modes.summary())]  # the objectives: vgs_kernels.modes
    alpha: Annotated[float, Option(2.0, "weight of the steered term (the visual term in `vgs` mode)")]
    beta: Annotated[float, Option(0.01, "weight of the gated term")]
    gamma: Annotated[float, Option(
        1.0, "gradient-norm normaliser multiplying the loss (paper: 0.41 for 2B, 0.36 for 4B students at α = 2)")]
    quantile: Annotated[float, Option(
        0.7, "gate = VDS > its `quantile`-quantile over valid tokens (the top 30 %)")]
    adaptive_quantiles: Annotated[tuple[float, float], Option(
        (0.4, 0.7), "the ramp's ends in `adaptive` mode")]
    threshold: Annotated[float | tuple[float, float] | None, Option(
        None, "a fixed gate threshold instead of the quantile (`adaptive`: a pair (low, high))")]
    vds_scope: Annotated[str, Option(
        "global", "`global`: quantile over all ranks' tokens when `torch.distributed` is initialised (an "
        "all-gather inside every call: see [the VDS collective](#micro-batches-dynamic-batching-and-the-vds-"
        "collective)); `local`: this rank's")]
    temperature: Annotated[float, Option(1.0, "τ dividing every logit row (at least 1e-6)")]
    reduction: Annotated[str, Option(
        "sequence", "`sequence`: mean per sequence, then over non-empty sequences; `token`: mean over valid "
        "tokens; `sum`: γ·Σ weight·objective over valid tokens (you normalise, e.g. by a global token count); "
        "`none` (`vgs_loss` only): per-token losses shaped like the mask, 0 on masked tokens, differentiable "
        "for any upstream gradient")]
    vocab_size: Annotated[int | None, Option(
        None, "use ids [0, N) only (Qwen's lm_head has 151936 rows, its tokenizer fewer)", setting=False)]
    detach_target_prior: Annotated[bool, Option(
        True, "stop-gradient on z_sp inside r; False adds (r − p)/τ to z_sp's gradient")]
    return_per_token: Annotated[bool, Option(
        False, "also return `out.per_token`: [B, T] std, vis, lang, vds, gate, objective", setting=False)]
    process_group: Annotated[Any, Option(
        None, "with `vds_scope=\"global\"`: the group whose ranks' VDS the quantile gathers (None: the default "
        "group)", setting=False)]
    sync_metrics: Annotated[bool, Option(
        True, "False: `out.metrics` stay 0-d device tensors (no `.item()` host sync for them; `threshold` stays "
        "a float)", setting=False)]


class BatchKeywords(TypedDict, total=False):
    """The per-batch tensors both loss functions take besides the loss keywords (no gradient flows into them)."""

    weights: Annotated[torch.Tensor | None, Option(
        None, "float tensor shaped like the mask: per-token multipliers of the objective before the reduction (no "
        "gradient into them); without a mask, weight 0 = masked", setting=False)]
    cu_seqlens: Annotated[torch.Tensor | None, Option(
        None, "`[S + 1]` int offsets of packed sequences in `[N, V]` / `[N, H]` rows: `sequence` reduction per "
        "packed sequence, exactly the padded `[B, T]` call's loss and gradients", setting=False)]
    gate: Annotated[torch.Tensor | None, Option(
        None, "bool tensor shaped like the mask: the gate of the gated term instead of `VDS > θ` (not with "
        "`threshold`, not in `adaptive` mode); no collective", setting=False)]


class CallKeywords(BatchKeywords, VGSKeywords, total=False):
    """Every keyword the loss functions take through ``**keywords``: the per-batch tensors and the loss keywords."""


def _declared(spec) -> tuple[dict[str, Option], dict[str, Any]]:
    hints = get_type_hints(spec, include_extras=True)
    return ({name: hint.__metadata__[0] for name, hint in hints.items()},
            {name: hint.__origin__ for name, hint in hints.items()})


OPTIONS, TYPES = _declared(VGSKeywords)
BATCH, _BATCH_TYPES = _declared(BatchKeywords)
NAMES = tuple(OPTIONS)
# the keywords a trainer's config carries (the others are per-call switches its loop sets itself)
SETTINGS = tuple(name for name, opt in OPTIONS.items() if opt.setting)


def setting_fields(prefix: str = "", *, exclude: tuple[str, ...] = (), types: dict[str, Any] | None = None):
    """The training settings as ``dataclasses.make_dataclass`` fields ``(prefix + name, type, field)``, for a
    trainer's config: the default, and the meaning as ``metadata["help"]`` (what ``HfArgumentParser``
    prints). A pair is a list in a config (YAML and argparse have no tuples); ``types`` overrides a type
    where the config's parser needs another."""
    out = []
    for name in SETTINGS:
        if name in exclude:
            continue
        tp, default = (types or {}).get(name, TYPES[name]), OPTIONS[name].default
        meta = {"help": _plain(OPTIONS[name].doc)}
        if get_origin(tp) is tuple:
            out.append((prefix + name, list[get_args(tp)[0]], _field(default_factory=lambda d=default: list(d),
                                                                      metadata=meta)))
        else:
            out.append((prefix + name, tp, _field(default=default, metadata=meta)))
    return out


class _Checks:
    """The checks of ``VGSOptions`` (its fields are generated from ``VGSKeywords``)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.vds_scope not in VDS_SCOPES:
            raise ValueError(f"vds_scope must be one of {VDS_SCOPES}, got {self.vds_scope!r}")
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not _finite(value):
                raise ValueError(f"{name} must be a finite number (not a bool), got {value!r}")
        if not _finite(self.temperature) or not self.temperature > 0:
            raise ValueError(f"temperature must be a finite number > 0 (not a bool), got {self.temperature!r}")
        if self.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature must be >= {MIN_TEMPERATURE:g} (smaller values overflow the finite "
                f"stand-in for -inf logits in fp32), got {self.temperature!r}"
            )
        for name in ("detach_target_prior", "return_per_token", "sync_metrics"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool (True or False), got {value!r}")
        if not _in_open_unit(self.quantile):
            raise ValueError(f"quantile must lie in (0, 1), got {self.quantile!r}")
        aq = self.adaptive_quantiles
        if (
            not isinstance(aq, (tuple, list))
            or len(aq) != 2
            or not all(_in_open_unit(q) for q in aq)
            or not aq[0] < aq[1]
        ):
            raise ValueError(
                "adaptive_quantiles must be a pair (low, high) with 0 < low < high < 1, "
                f"got {aq!r}"
            )
        object.__setattr__(self, "adaptive_quantiles", (float(aq[0]), float(aq[1])))
        self._check_threshold()
        self._check_process_group()
        if self.vocab_size is not None and (
            isinstance(self.vocab_size, bool)
            or not isinstance(self.vocab_size, int)
            or self.vocab_size < 1
        ):
            raise ValueError(f"vocab_size must be a positive int or None, got {self.vocab_size!r}")

    def _check_threshold(self) -> None:
        t = self.threshold
        if t is None:
            return
        if isinstance(t, (tuple, list)):
            if not _modes.MODES[self.mode].ramped:
                raise ValueError(
                    f"threshold must be a single float in mode={self.mode!r}; a pair "
                    f"(theta_low, theta_high) is only meaningful in mode='adaptive', got {t!r}"
                )
            if len(t) != 2 or not all(_finite(x) for x in t) or not t[0] <= t[1]:
                raise ValueError(
                    f"threshold must be a pair (theta_low, theta_high) with low <= high, got {t!r}"
                )
            object.__setattr__(self, "threshold", (float(t[0]), float(t[1])))
            return
        if not _finite(t):
            raise ValueError(f"threshold must be None, a finite float or (adaptive) a pair, got {t!r}")
        if _modes.MODES[self.mode].ramped:
            raise ValueError(
                f"mode={self.mode!r} needs two thresholds: pass threshold=(theta_low, theta_high) "
                f"or None to use adaptive_quantiles, got {t!r}"
            )
        object.__setattr__(self, "threshold", float(t))

    def _check_process_group(self) -> None:
        pg = self.process_group
        if pg is None:
            return
        if self.vds_scope != "global":
            raise ValueError(
                "process_group is only used with vds_scope='global' (the VDS quantile over the group's "
                f"ranks); vds_scope={self.vds_scope!r} gathers nothing"
            )
        import torch.distributed as dist

        if not (dist.is_available() and isinstance(pg, dist.ProcessGroup)):
            raise ValueError(f"process_group must be a torch.distributed ProcessGroup or None, got {pg!r}")

    @classmethod
    def from_keywords(cls, keywords: dict[str, Any], caller: str):
        """``VGSOptions(**keywords)``, a misspelt keyword refused as Python refuses one, naming ``caller``."""
        _check_names(keywords, NAMES, caller)
        return cls(**keywords)

    def keywords(self) -> dict[str, Any]:
        """The options as loss keywords (``vgs_loss(..., **opts.keywords())``)."""
        return {name: getattr(self, name) for name in NAMES}


VGSOptions = make_dataclass(
    "VGSOptions",
    [(name, TYPES[name], _field(default=opt.default)) for name, opt in OPTIONS.items()],
    bases=(_Checks,),
    frozen=True,
    namespace={"__module__": __name__, "__doc__": """The loss keywords, validated once and shared by every backend.

    Fields: ``VGSKeywords`` (name, type, default, meaning; docs/math.md for the maths). ``threshold`` is
    ``None`` (use quantiles of the batch's VDS), a float (the gate threshold theta), or, in
    ``mode="adaptive"`` only, a pair ``(theta_low, theta_high)`` for the ramp. ``alpha``, ``beta``, ``gamma``
    are finite numbers and ``temperature`` a finite number ``>= MIN_TEMPERATURE``; none of them may be a
    bool. ``detach_target_prior``, ``return_per_token`` and ``sync_metrics`` must be real bools (a string
    such as ``"no"`` is rejected, not read as true). ``process_group`` is refused with ``vds_scope="local"``,
    where nothing is gathered. A bad value raises ValueError naming the keyword.
    """},
)


def split_keywords(keywords: dict[str, Any], caller: str):
    """A loss function's ``**keywords`` -> ((weights, cu_seqlens, gate), VGSOptions); a misspelt keyword is a
    TypeError naming ``caller``."""
    _check_names(keywords, tuple(BATCH) + NAMES, caller)
    batch = tuple(keywords.get(name) for name in BATCH)
    return batch, VGSOptions(**{k: v for k, v in keywords.items() if k in OPTIONS})


def takes_loss_keywords(fn):
    """Give ``fn``, which takes the per-batch tensors and the loss keywords as ``**keywords``, their
    keyword-only parameters in its signature (``help()``, ``inspect.signature``, IDE call tips) and their
    meanings in its docstring."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if not params or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
        raise TypeError(f"{fn.__qualname__} must end with **keywords to take the loss keywords")
    declared = [(BATCH, _BATCH_TYPES), (OPTIONS, TYPES)]
    keywords = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt.default, annotation=types[name])
                for options, types in declared for name, opt in options.items()]
    fn.__signature__ = sig.replace(parameters=params[:-1] + keywords)
    doc = [(fn.__doc__ or "").rstrip(), ""]
    for title, options in (("Per-batch tensors", BATCH), ("Loss keywords", OPTIONS)):
        doc += [f"    {title}:"] + [f"        {name} (default {_default(opt)}): {_plain(opt.doc)}"
                                     for name, opt in options.items()]
    fn.__doc__ = "\n".join(doc) + "\n"
    return fn


def keyword_table() -> str:
    """The README's keyword tables (markdown): the loss keywords, then the per-batch tensors."""
    out = []
    for options in (OPTIONS, BATCH):
        rows = ["| keyword | default | meaning |", "|---|---|---|"]
        rows += [f"| `{name}` | {_default(opt, markdown=True)} | {opt.doc} |" for name, opt in options.items()]
        out.append("\n".join(rows))
    return ("\n\nBoth functions also take the per-batch tensors (keywords too; `VGSLoss` takes them in its "
            "forward):\n\n").join(out)


def _check_names(keywords: dict[str, Any], names: tuple[str, ...], caller: str) -> None:
    for name in keywords:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the keywords are {', '.join(names)}"
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}{hint}")


def _default(opt: Option, markdown: bool = False) -> str:
    value = opt.default
    return f"`{value!r}`".replace("'", '"') if markdown and isinstance(value, str) else repr(value)


def _plain(doc: str) -> str:
    """Markdown to docstring text: no backticks, links as their text."""
    return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", doc).replace("`", "")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _in_open_unit(q: object) -> bool:
    return _finite(q) and 0.0 < q < 1.0
