"""Input checks: every failure is a ValueError that names the argument and what was expected."""

from __future__ import annotations

import torch

from . import modes

LOGIT_NAMES = ("student_logits", "student_text_logits", "teacher_logits", "teacher_text_logits")
HIDDEN_NAMES = ("student_hidden", "student_text_hidden", "teacher_hidden", "teacher_text_hidden")


def _tensor(name: str, x: object, dims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    return x


def check_pairs(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], dims: tuple[int, ...]):
    """Four [B, T, X] / [N, X] tensors: student pair and teacher pair equal in shape, the leading
    dims equal across all four, one device. Returns the leading shape."""
    for n, t in zip(names, tensors):
        _tensor(n, t, dims)
    s, sp, t, tp = tensors
    if sp.shape != s.shape:
        raise ValueError(
            f"{names[1]} must have the shape of {names[0]} {tuple(s.shape)}, got {tuple(sp.shape)}"
        )
    if tp.shape != t.shape:
        raise ValueError(
            f"{names[3]} must have the shape of {names[2]} {tuple(t.shape)}, got {tuple(tp.shape)}"
        )
    if t.shape[:-1] != s.shape[:-1]:
        raise ValueError(
            f"{names[2]} must have the leading (token) dims of {names[0]} {tuple(s.shape[:-1])}, "
            f"got {tuple(t.shape[:-1])}: align the four views on the same response tokens"
        )
    devices = {x.device for x in tensors}
    if len(devices) > 1:
        raise ValueError(f"{', '.join(names)} must be on one device, got {sorted(map(str, devices))}")
    return tuple(s.shape[:-1])


def check_text_streams(mode: str, names: tuple[str, str], student_text: object, teacher_text: object) -> bool:
    """Whether the text-only (image-free) streams are given. Both may be None with ``mode="standard"``,
    whose loss does not read them (only the vis / lang / vds metrics do)."""
    missing = [n for n, t in zip(names, (student_text, teacher_text)) if t is None]
    if not missing:
        return True
    needs = modes.get(mode).needs_text
    if needs or len(missing) == 1:
        why = (f"mode={mode!r} needs the text-only view" if needs
               else "pass both text-only streams or neither")
        raise ValueError(f"{' and '.join(missing)} is None: {why} (None is allowed for both in mode='standard')")
    return False


def check_nonempty(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], what: str) -> None:
    """The last dim of each tensor (the vocabulary of logits, the hidden size of hidden states)
    must not be empty; ``what`` names it, e.g. ``"vocabulary (V=0)"``."""
    for n, t in zip(names, tensors):
        if t.shape[-1] == 0:
            raise ValueError(f"{n} has an empty {what}, got shape {tuple(t.shape)}")


def check_vocab(vocab_size: int | None, student: tuple[str, int], teacher: tuple[str, int]) -> int:
    """The number of vocabulary ids the loss uses; ``student`` / ``teacher`` are (argument name,
    vocabulary size), e.g. ``("student_logits", 151936)`` or ``("student_weight", 151936)``."""
    (s_name, v_student), (t_name, v_teacher) = student, teacher
    if vocab_size is None:
        if v_student != v_teacher:
            raise ValueError(
                f"{s_name} and {t_name} disagree on the vocabulary ({s_name} has {v_student} ids, "
                f"{t_name} {v_teacher}); pass vocab_size=N to compare ids [0, N) only"
            )
        return v_student
    if vocab_size > min(v_student, v_teacher):
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the vocabulary of {s_name} ({v_student} ids) or "
            f"{t_name} ({v_teacher} ids)"
        )
    return vocab_size


def check_chunk_size(chunk_size: object) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_mask(mask: object, lead: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """mask -> bool [B, T] (a [N] mask for [N, V] inputs becomes [1, N])."""
    if mask is None:
        out = torch.ones(lead, dtype=torch.bool, device=device)
    else:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask must have shape {lead} (the logits' token dims), got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or mask.is_complex() or ((mask != 0) & (mask != 1)).any():
                raise ValueError(f"mask must be bool (or integer 0/1), got dtype {mask.dtype}")
            mask = mask != 0
        out = mask.to(device)
    return out.reshape(1, -1) if len(lead) == 1 else out


def check_weight(name: str, weight: object, hidden_name: str, hidden: torch.Tensor) -> torch.Tensor:
    w = _tensor(name, weight, (2,))
    if w.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{name} must have shape [V, {hidden.shape[-1]}] to match the hidden size of "
            f"{hidden_name}, got {tuple(w.shape)}"
        )
    if w.shape[0] == 0:
        raise ValueError(f"{name} has an empty vocabulary (V=0 rows), got shape {tuple(w.shape)}")
    if w.device != hidden.device:
        raise ValueError(f"{name} must be on {hidden.device} like {hidden_name}, got {w.device}")
    return w


def check_bias(name: str, bias: object, weight_name: str, weight: torch.Tensor) -> torch.Tensor | None:
    if bias is None:
        return None
    b = _tensor(name, bias, (1,))
    if b.shape[0] != weight.shape[0]:
        raise ValueError(f"{name} must have shape [{weight.shape[0]}] like the rows of {weight_name}, got {tuple(b.shape)}")
    if b.device != weight.device:
        raise ValueError(f"{name} must be on {weight.device} like {weight_name}, got {b.device}")
    return b


def raise_non_finite(named_rows: dict[str, torch.Tensor]) -> None:
    """Called when the KLs came out non-finite: name the stream holding NaN or +inf."""
    for name, rows in named_rows.items():
        if torch.isnan(rows).any() or torch.isposinf(rows).any():
            raise ValueError(f"{name} contains NaN or +inf values (-inf entries are allowed)")
    raise ValueError("the VGS divergences are not finite; check the inputs for NaN or +inf")


def check_same_dtype(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    if tensors[0].dtype != tensors[1].dtype:
        raise ValueError(
            f"{names[1]} must have the dtype of {names[0]} ({tensors[0].dtype}), got {tensors[1].dtype}"
        )


def check_token_weights(weights: object, lead: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    """weights= -> fp32 [B, T] ([1, N] for [N, X] inputs), detached; None stays None."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        raise ValueError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise ValueError(f"weights must be a floating-point tensor (per-token multipliers), got dtype {weights.dtype}")
    if tuple(weights.shape) != lead:
        raise ValueError(f"weights must have shape {lead} (the token dims, like the mask), got {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"weights must be on {device} like the inputs, got {weights.device}")
    w = weights.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weights must be finite (found NaN or inf)")
    return w.reshape(1, -1) if len(lead) == 1 else w


def check_cu_seqlens(cu_seqlens: object, lead: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    """cu_seqlens= ([S + 1] int, 0 = cu[0] <= ... <= cu[S] = N) for [N, X] inputs -> long tensor."""
    if cu_seqlens is None:
        return None
    if len(lead) != 1:
        raise ValueError(
            f"cu_seqlens is for packed [N, V] / [N, H] inputs (sequences concatenated without padding); "
            f"the inputs have token dims {lead}: drop cu_seqlens or pass packed rows"
        )
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype == torch.bool or cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
        raise ValueError(f"cu_seqlens must be an integer tensor, got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [S + 1], got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    first, last = (int(x) for x in cu[[0, -1]].tolist())
    if first != 0 or last != lead[0] or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at N={lead[0]} (the packed rows), "
            f"got {cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else (first, '...', last)}"
        )
    return cu


def check_gate(gate: object, lead: tuple[int, ...], device: torch.device, mode: str, threshold: object):
    """gate= (bool like the mask) -> bool [B, T] ([1, N] for [N, X] inputs); None stays None."""
    if gate is None:
        return None
    if modes.get(mode).ramped:
        raise ValueError(
            "gate= replaces the quantile gate of modes 'vgs', 'language' and 'standard'; mode='adaptive' "
            "also needs the ramp's thresholds: pass threshold=(theta_low, theta_high) instead "
            "(vgs_kernels.vds_threshold(..., mode='adaptive') computes them over a batch)"
        )
    if threshold is not None:
        raise ValueError("pass gate= or threshold=, not both (gate= replaces the thresholded gate)")
    if not isinstance(gate, torch.Tensor):
        raise ValueError(f"gate must be a torch.Tensor or None, got {type(gate).__name__}")
    if tuple(gate.shape) != lead:
        raise ValueError(f"gate must have shape {lead} (the token dims, like the mask), got {tuple(gate.shape)}")
    if gate.dtype != torch.bool:
        if gate.is_floating_point() or gate.is_complex() or bool(((gate != 0) & (gate != 1)).any()):
            raise ValueError(f"gate must be bool (or integer 0/1), got dtype {gate.dtype}")
        gate = gate != 0
    out = gate.to(device)
    return out.reshape(1, -1) if len(lead) == 1 else out


# (stream with -inf, stream that must then be -inf too, why an -inf mismatch is an infinite divergence)
SPARSE_PAIRS = (
    (2, 0, "the reverse KL(p || q) is infinite"),
    (3, 1, "the language term KL(p' || q') is infinite"),
    (3, 2, "the VDS KL(q || q') is infinite"),
)


def check_sparse_rows(rows_inf: torch.Tensor, rows_other: torch.Tensor, name_inf: str, name_other: str, why: str,
                      row_ids: torch.Tensor | None = None) -> None:
    """[n, V] rows of two streams: -inf in ``rows_inf`` (probability 0) where ``rows_other`` is finite
    (probability > 0) makes a KL infinite: a ValueError naming the stream, never a ~1e30 loss."""
    bad = torch.isneginf(rows_inf) & ~torch.isneginf(rows_other)
    if not bool(bad.any()):
        return
    r, v = (int(x) for x in bad.nonzero()[0].tolist())
    row = int(row_ids[r]) if row_ids is not None else r
    hint = (" The full teacher logits are needed: a teacher sent as top-k logits with -inf elsewhere gives "
            "probability 0 to tokens the student can sample." if name_inf.startswith("teacher") else "")
    raise ValueError(
        f"{name_inf} has -inf (probability 0) at vocabulary id {v} of token row {row}, where {name_other} has "
        f"probability > 0: {why}.{hint} (-inf is fine where both streams have it, e.g. a shared vocabulary mask.)"
    )


def check_sparse_logits(names: tuple[str, ...], flat: list[torch.Tensor], valid_idx: torch.Tensor, vocab: int,
                        chunk: int) -> None:
    """The four [N, V] logit streams (s, sp, t, tp): every -inf mismatch of :data:`SPARSE_PAIRS` on the
    valid rows. Teacher streams without any -inf (the usual case) cost one min-reduction each (no
    temporary, one host sync for both) and no row copy."""
    if valid_idx.numel() == 0:
        return
    streams = sorted({p[0] for p in SPARSE_PAIRS})
    lows = torch.stack([flat[i][:, :vocab].amin().float() for i in streams]).tolist()
    has_inf = {i: low == float("-inf") for i, low in zip(streams, lows)}
    pairs = [p for p in SPARSE_PAIRS if has_inf[p[0]]]
    for a in range(0, valid_idx.numel() if pairs else 0, chunk):
        idx = valid_idx[a : a + chunk]
        for i, j, why in pairs:
            check_sparse_rows(flat[i].index_select(0, idx)[:, :vocab], flat[j].index_select(0, idx)[:, :vocab],
                              names[i], names[j], why, idx)


def check_sparse_bias(teacher_bias: torch.Tensor | None, student_bias: torch.Tensor | None, vocab: int) -> None:
    """Fused path: an lm_head bias with -inf (a vocabulary mask) on the teacher but not the student."""
    if teacher_bias is None:
        return
    tb = teacher_bias[:vocab].reshape(1, -1)
    sb = torch.zeros_like(tb) if student_bias is None else student_bias[:vocab].reshape(1, -1)
    check_sparse_rows(tb, sb, "teacher_bias", "student_bias", "the reverse KL(p || q) is infinite for every token")
