"""The objectives of ``mode=``, one row each: everything mode-dependent reads this table (the driver's
coefficients for both passes, the reference's objective, the gate's ramp, the validation, the training
config's methods). A mode made of the existing terms is one ``Mode(...)`` line (docs/design.md).

Per token, with the row kernels' KLs std = KL(p||q), vis = KL(p||r), lang = KL(p'||q') (docs/math.md)::

    objective = std + alpha * [ramp] * <steered> + beta * gate * <gated>

``steered`` / ``gated`` name one of the terms (or None); ``ramped`` multiplies the steered term by the VDS
ramp w_t = clip((vds - theta_low) / (theta_high - theta_low), 0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TERMS = ("std", "vis", "lang")  # the coefficient columns, in the row kernels' stats order


@dataclass(frozen=True)
class Mode:
    name: str
    steered: str | None  # the term weighted by alpha
    gated: str | None  # the term weighted by beta * gate
    ramped: bool = False  # the steered term also weighted by the VDS ramp (needs the batch's quantiles)
    paper: str = ""

    @property
    def needs_text(self) -> bool:
        """Whether the text-only view enters the objective (its streams may be None otherwise)."""
        return self.steered is not None or self.gated is not None

    @property
    def pass1_terms(self) -> tuple[str, ...]:
        """Terms whose coefficients are known before the batch's VDS quantile (pass 1 of the driver)."""
        return ("std",) + ((self.steered,) if self.steered and not self.ramped else ())

    @property
    def gated_lang_only(self) -> bool:
        """Pass 2 touches only the language term (the text-only pair alone): d/dz_sp of KL(p'||q')."""
        return self.gated == "lang" and not self.ramped

    def formula(self) -> str:
        parts = ["std"]
        if self.steered:
            parts.append(f"alpha*{'w_t*' if self.ramped else ''}{self.steered}")
        if self.gated:
            parts.append(f"beta*gate*{self.gated}")
        return " + ".join(parts)


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("standard", steered=None, gated=None, paper="standard on-policy distillation, reverse KL (Eq. 4)"),
    Mode("vgs", steered="vis", gated="lang", paper="VGS-LP (Eq. 17)"),
    Mode("adaptive", steered="vis", gated="lang", ramped=True, paper="adaptive VGS (App. E, Eq. 24-25)"),
    Mode("language", steered="lang", gated="vis", paper="language steering, the inverse ablation (Eq. 19-21)"),
)}


# how the README and the docstrings write the terms
SYMBOLS = {"std": "KL(p‖q)", "vis": "KL(p‖r)", "lang": "KL(p'‖q')"}


def summary() -> str:
    """Every mode's objective in one line of markdown (the ``mode`` keyword's meaning, generated from the table)."""
    parts = []
    for m in MODES.values():
        text = f"`{m.name}`: {SYMBOLS['std']}"
        if m.steered:
            text += f" + α·{'w_t·' if m.ramped else ''}{SYMBOLS[m.steered]}"
        if m.gated:
            text += f" + β·gate·{SYMBOLS[m.gated]}"
        parts.append(text)
    ramp = ("; w_t = clip((VDS − θ_low)/(θ_high − θ_low), 0, 1) with θ_low, θ_high the `adaptive_quantiles`"
            if any(m.ramped for m in MODES.values()) else "")
    return ". ".join(parts) + ramp


def get(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {name!r}")
    return MODES[name]


def coefficients(mode: Mode, alpha: float, beta: float, w: torch.Tensor, gate: torch.Tensor | None = None,
                 ramp: torch.Tensor | None = None) -> torch.Tensor:
    """[n, 3] per-row coefficients of (std, vis, lang) times ``w`` ([n]: reduction weights x gamma).

    Without ``gate`` the pass-1 coefficients (the terms that do not wait for the VDS quantile); with it the
    pass-2 ones (the gated term, and the steered term when ramped: needs ``ramp``)."""
    zeros = torch.zeros_like(w)
    cols = dict.fromkeys(TERMS, zeros)
    if gate is None:
        cols["std"] = w
        if mode.steered and not mode.ramped:
            cols[mode.steered] = alpha * w
    else:
        if mode.steered and mode.ramped:
            cols[mode.steered] = alpha * ramp * w
        if mode.gated:
            cols[mode.gated] = beta * gate * w
    return torch.stack([cols[t] for t in TERMS], dim=1)


def objective(mode: Mode, terms: dict[str, torch.Tensor], alpha: float, beta: float, gate: torch.Tensor,
              ramp: torch.Tensor | None) -> torch.Tensor:
    """The per-token objective from the per-token KLs ``terms`` (std, vis, lang): the reference's formula."""
    out = terms["std"]
    if mode.steered:
        out = out + (alpha * ramp * terms[mode.steered] if mode.ramped else alpha * terms[mode.steered])
    if mode.gated:
        out = out + beta * gate * terms[mode.gated]
    return out
