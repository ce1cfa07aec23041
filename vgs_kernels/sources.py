"""The row sources of the driver (:class:`vgs_kernels.driver.RowSource`): materialised logits
(``vgs_loss``) and logits formed chunk by chunk from hidden states and lm_head weights
(``fused_linear_vgs_loss``).

Memory per chunk of ``c`` rows (``LinearSource``): one [c, W] logits buffer per stream in the
hidden states' dtype, reused from chunk to chunk; the row kernel writes each logit gradient in
place into its stream's buffer (in that dtype), so a chunk holds no gradient buffer and no fp32
copy of the logits. The image stream's buffer has room for c / 2 more rows: the text stream's
gradient rows of the chunk, when they fit (the ~30 % predicted-gated ones of pass 1), are stacked
there, so that one GEMM per chunk accumulates the weight gradient of both streams ([g_s; g_sp]^T [h_s; h_sp]: the fp32 [V, H]
accumulator is read and written once per chunk, not twice). The GEMMs run on the full rows of the lm_head weights (W = their row count, e.g. 151936
for Qwen), the row kernels mask the ids [vocab_size, W). The weight gradient is accumulated in
place into one fp32 [V, H] buffer (never a weight-sized temporary per chunk). fp16 gradients are
scaled by a power of two before they are rounded (the per-row coefficients, ~1/N, would make them
underflow) and the scale is undone where the gradient is accumulated (the fp32 hidden / weight
gradients of ``LinearSource``; ``LogitsSource``'s buffers in the logits' dtype).
"""

from __future__ import annotations

import math

import torch

from .chunks import default_chunk_size
from .driver import Rows
from .gemm import accumulate_mm, mm_fp32

# rows of the image stream's logits buffer beyond a chunk, per chunk row (LinearSource stacks the text stream's
# gradient rows there)
SPARE = 0.5


def _take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Rows of ``x``: a view for a slice, a gathered copy for indices."""
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


class LogitsSource:
    """Rows of four materialised [N, V] logit tensors; gradients go to [N, V] buffers.

    Gradient buffers are in the logits' dtype, allocated on the first gradient of each stream;
    ``needs`` (s, sp) says which student streams want one (a frozen stream gets none). The row
    kernel writes each chunk's gradient into a new [n, width] tensor of the logits' dtype (the
    logits are the caller's, never overwritten).
    """

    def __init__(self, zs, zsp, zt, ztp, vocab: int, needs: tuple[bool, bool] = (True, True)):
        self.rows = zs.shape[0]
        self.vocab = vocab
        self.width = min(zs.shape[1], zt.shape[1])
        self.wants = frozenset(k for k, need in zip(("s", "sp"), needs) if need)
        self.full = {"s": zs, "sp": zsp, "t": zt, "tp": ztp}
        self.views = {k: v[:, : self.width] for k, v in self.full.items()}
        self.grads: dict[str, torch.Tensor] = {}

    def logits(self, rows, streams):
        return [_take(self.views[k], rows) for k in streams]

    def grad_buffer(self, stream, logits):
        return torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)

    def backward(self, parts, scale):
        for part in parts:
            if part.stream not in self.grads:
                self.grads[part.stream] = torch.zeros_like(self.full[part.stream])
            buf = self.grads[part.stream][:, : self.width]
            grad = part.gradient().to(buf.dtype)
            if isinstance(part.rows, slice):
                buf[part.rows].add_(grad, alpha=1.0 / scale)
            else:
                buf.index_add_(0, part.rows, grad, alpha=1.0 / scale)

    def chunk_rows(self, n_rows: int, temps: int) -> int:
        """Rows per chunk (``temps``: the row kernel's own fp32 temporaries per row): per row, 4 gathered logit
        rows (masked batches) and 2 gradient rows, in the logits' dtype."""
        z = self.full["s"]
        return default_chunk_size(n_rows, self.width, z.device, temps, dtype=z.dtype, streams=6)

    def release(self):
        pass


class LinearSource:
    """Rows computed on demand as hidden @ weight.T (+ bias) from [N, H] hidden states.

    The logits of a chunk are computed on the full rows of the weights (``width`` = the smaller
    of the two heads' row counts, >= vocab) into one [chunk, width] buffer per stream, in the
    hidden states' dtype, reused from chunk to chunk; the logit gradients are written in place
    into those buffers (``grad_buffer`` returns the logits). Gradients of the student hidden
    states are accumulated in fp32 [N, H] buffers, of the student weight and bias in fp32 [V, H] /
    [V] buffers, in place (rows [width, V) stay 0). ``needs`` = (hs, hsp, ws, bs) says which of
    them want a gradient: nothing is allocated or computed for the others (a frozen lm_head costs
    no [V, H] buffer and no weight-gradient GEMM).
    """

    def __init__(self, hs, hsp, ws, bs, ht, htp, wt, bt, vocab: int, needs: tuple[bool, bool, bool, bool],
                 alias_text: bool = False):
        self.rows = hs.shape[0]
        self.vocab = vocab
        self.width = width = min(ws.shape[0], wt.shape[0])
        need_hs, need_hsp, need_w, need_b = needs
        need_b = need_b and bs is not None
        # alias_text: the text streams are the image streams (standard mode without the text view):
        # their logits are the image streams' (no GEMM) and they never get a gradient
        self.alias = {"sp": "s", "tp": "t"} if alias_text else {}
        self.need_hidden = {"s": need_hs, "sp": need_hsp and not alias_text}
        # the logit gradients of both streams feed the weight and bias gradients
        self.wants = frozenset(k for k, h in self.need_hidden.items()
                               if k not in self.alias and (h or need_w or need_b))
        self.hidden = {"s": hs, "sp": hsp, "t": ht, "tp": htp}
        ws_v, wt_v = ws[:width], wt[:width]
        bs_v = bs[:width] if bs is not None else None
        bt_v = bt[:width] if bt is not None else None
        self.weight = {"s": ws_v, "sp": ws_v, "t": wt_v, "tp": wt_v}
        self.bias = {"s": bs_v, "sp": bs_v, "t": bt_v, "tp": bt_v}
        self.student_weight, self.student_bias = ws, bs
        self.grad_hidden: dict[str, torch.Tensor] = {}
        # the first weight-gradient GEMM writes the accumulator (beta = 0): no [V, H] zero fill, no first read
        self._grad_weight = torch.empty(ws.shape, device=ws.device) if need_w else None
        self._weight_written = False
        self.grad_bias = torch.zeros(bs.shape, device=bs.device) if need_b else None
        self._work: dict[str, torch.Tensor] = {}  # stream -> [capacity, width] logits buffer
        self._current: dict[str, torch.Tensor] = {}  # stream -> the current chunk's view of it
        # both student streams get gradients: their weight-gradient GEMMs are stacked (see backward)
        self.combine = {"s", "sp"} <= self.wants and (need_w or need_b)

    def _buffer(self, stream: str, n: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._work.get(stream)
        # the image stream's buffer has room for half a chunk of rows below the first: the text
        # stream's gradient rows of the chunk go there when they fit (the ~30 % predicted-gated rows
        # of pass 1), so that both streams' weight gradient is one GEMM
        rows = n + self.spare_rows(n) if stream == "s" and self.combine else n
        if buf is None or buf.shape[0] < rows:
            self._work.pop(stream, None)  # free the smaller buffer first
            buf = self._work[stream] = torch.empty(rows, self.width, device=like.device, dtype=like.dtype)
        return buf[:n]

    def logits(self, rows, streams):
        out: dict[str, torch.Tensor] = {}
        for k in streams:
            src = self.alias.get(k, k)
            if src not in out:
                h = _take(self.hidden[src], rows)
                buf = self._buffer(src, h.shape[0], h)
                w, b = self.weight[src], self.bias[src]
                if b is None:
                    torch.mm(h, w.t(), out=buf)
                else:
                    torch.addmm(b, h, w.t(), out=buf)
                out[src] = buf
        self._current = out
        return [out[self.alias.get(k, k)] for k in streams]

    def grad_buffer(self, stream, logits):
        return logits

    def backward(self, parts, scale):
        """One GEMM per gradient for the parts of a chunk: an image-stream part that is the head of the
        image buffer and a text-stream part that fits the buffer's spare rows are stacked there
        ([g_s; g_sp] against [h_s; h_sp]: the fp32 weight gradient is read and written once per chunk,
        not twice); otherwise one GEMM per part."""
        alpha = 1.0 / scale
        if len(parts) == 2 and self._stackable(parts):
            first, second = parts
            n0 = first.grad.shape[0]
            n1 = second.grad.shape[0] if second.select is None else second.select.numel()
            stacked = self._work["s"][: n0 + n1]
            if second.select is None:
                stacked[n0:].copy_(second.grad)
            else:
                torch.index_select(second.grad, 0, second.select, out=stacked[n0:])
            hidden = torch.cat([_take(self.hidden["s"], first.rows), _take(self.hidden["sp"], second.rows)])
            self._accumulate(stacked, hidden, [(first, 0, n0), (second, n0, n0 + n1)], alpha)
            return
        for part in parts:
            g = part.gradient()
            self._accumulate(g, _take(self.hidden[part.stream], part.rows), [(part, 0, g.shape[0])], alpha)

    @staticmethod
    def spare_rows(n: int) -> int:
        return math.ceil(n * SPARE)

    def chunk_rows(self, n_rows: int, temps: int) -> int:
        """Rows per chunk (``temps``: the row kernel's own fp32 temporaries per row). The logits of a chunk span
        the full rows of the heads: a buffer per stream (2 without the text view); with the weight-gradient
        GEMMs stacked, the image stream's buffer has ``SPARE`` more rows per chunk row, else the gathered
        gradient rows of the predicted-gated rows take one more stream."""
        h = self.hidden["s"]
        if self.alias:
            streams, largest = 2, 1.0
        elif self.combine:
            streams, largest = 4 + SPARE, 1 + SPARE
        else:
            streams, largest = 5, 1.0
        return default_chunk_size(n_rows, self.width, h.device, temps, dtype=h.dtype, streams=streams,
                                  largest=largest)

    def _stackable(self, parts) -> bool:
        first, second = parts
        buf = self._work.get("s")
        n1 = second.grad.shape[0] if second.select is None else second.select.numel()
        return (self.combine and first.stream == "s" and second.stream == "sp" and buf is not None
                and first.grad is self._current.get("s") and first.grad.shape[0] + n1 <= buf.shape[0])

    def _accumulate(self, grad, hidden, spans, alpha) -> None:
        """Hidden-state, weight and bias gradients of the logit gradients ``grad`` [n, width] whose rows
        ``spans`` [(part, begin, end)] belong to the parts' streams and rows; ``hidden`` [n, H]."""
        w = self.weight["s"]  # both student streams share the student lm_head
        wanted = [(p, a, b) for p, a, b in spans if self.need_hidden[p.stream]]
        if wanted:
            lo, hi = min(a for _, a, _ in wanted), max(b for _, _, b in wanted)
            gh_all = mm_fp32(grad[lo:hi], w)
            for part, a, b in wanted:
                if part.stream not in self.grad_hidden:
                    h = self.hidden[part.stream]
                    self.grad_hidden[part.stream] = torch.zeros(h.shape, device=h.device)
                gh = self.grad_hidden[part.stream]
                if isinstance(part.rows, slice):
                    gh[part.rows].add_(gh_all[a - lo:b - lo], alpha=alpha)
                else:
                    gh.index_add_(0, part.rows, gh_all[a - lo:b - lo], alpha=alpha)
        if self._grad_weight is not None:
            accumulate_mm(self._grad_weight[: self.width], grad.t(), hidden, alpha, beta=float(self._weight_written))
            self._weight_written = True
        if self.grad_bias is not None:
            self.grad_bias[: self.width].add_(grad.sum(0, dtype=torch.float32), alpha=alpha)

    @property
    def grad_weight(self) -> torch.Tensor | None:
        """The fp32 [V, H] weight gradient (rows [width, V), and everything when no GEMM ran, zero)."""
        if self._grad_weight is not None:
            if not self._weight_written:
                self._grad_weight.zero_()
                self._weight_written = True
            elif self.width < self._grad_weight.shape[0]:
                self._grad_weight[self.width:].zero_()
        return self._grad_weight

    def release(self):
        self._work.clear()
        self._current = {}
