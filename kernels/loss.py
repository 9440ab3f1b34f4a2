"""
Per-token loss over the vocabulary, straight from the hidden states and the lm_head weight.

For a token with hidden state h, target y and logits z = W h (V of them), p = softmax(z):

    lse   = log Σ_v exp(z_v)
    CE    = lse − z_y                                  = −log p_y
    v*    = argmax_{v≠y} z_v                           (the runner-up: best token that is not the target)
    IH    = 1 + p_y − p_v*                             in [0, 2]  (inverted hinge, Cha et al. 2025)

    dCE/dz = p − e_y
    dIH/dz = p_y (e_y − p) − p_v* (e_v* − p)

With an upstream gradient g_t per token (masks, NPO's sequence weights, a mean...), dL/dz_t = g_t · dloss_t/dz_t,
and then dL/dh = dz W, dL/dW = dzᵀ h. A tie z_y = z_v* needs nothing special: IH = 1 and the formula holds.

Materializing all N × V logits is what we avoid (8 sequences × 1024 tokens × 50257 fp32 logits = 1.5 GiB,
and autograd keeps a softmax of the same size). The scheme is Liger-Kernel's fused linear cross-entropy:
  forward, per chunk of CHUNK tokens:
    z = h_chunk @ Wᵀ                     cuBLAS (torch.matmul), [CHUNK, V]: the only big buffer
    one Triton program per row makes ONE online pass over z (flash-attention style), keeping
    the running max m and the running Σ exp(z − m) (hence lse), the true logit z_y and the best
    logit among v ≠ y with its index (the runner-up).  Only these O(N) statistics are kept.
  backward, per chunk again (z is recomputed rather than stored, like flash attention):
    z = h_chunk @ Wᵀ;  a Triton kernel overwrites z with g_t · dloss_t/dz using the saved lse;
    dh_chunk = dz @ W,  dW += dzᵀ @ h_chunk.
The backward cannot be folded into the forward (as Liger does for a mean loss) because dW depends on the
per-token g, unknown until backward. Extra memory is O(CHUNK × V); compute is 4 matmuls instead of 3.
bf16 inputs give bf16 logits (cuBLAS accumulates in fp32); all softmax statistics are fp32.

`linear_token_stats` reuses the forward pass for evaluation: log p(target) and whether argmax == target.
The `_ref` twins are plain PyTorch with the same signatures: the references for the tests, and what runs
on a machine without CUDA.
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # no Triton (e.g. a laptop): the kernels below can be defined but not run; the twins run
    from types import SimpleNamespace
    triton, tl = SimpleNamespace(jit=lambda fn: fn), SimpleNamespace(constexpr=None)
    HAVE_TRITON = False

CHUNK = 1024     # tokens per chunk: the [CHUNK, V] logits buffer is the extra memory (200 MiB fp32 at V = 50257)
BLOCK_V = 4096   # vocabulary entries per step of the online pass (the tests shrink both to hit ragged edges)


# -----------------------------------------------------------------------------
# Triton kernels: one program per row of a [rows, V] logits chunk

@triton.jit
def _stats_kernel(z_ptr, z_stride, y_ptr, lse_ptr, zy_ptr, zr_ptr, r_ptr, V, ignore_index,
                  BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_ptr += row * z_stride
    y = tl.load(y_ptr + row)
    m = float("-inf")   # running max of z
    s = 0.0             # running Σ exp(z − m)
    zy = 0.0            # true logit (stays 0 for an ignored token)
    zr = float("-inf")  # runner-up logit: best over v ≠ y
    r = 0               # its index
    for start in range(0, V, BLOCK_V):
        v = start + tl.arange(0, BLOCK_V)
        z = tl.load(z_ptr + v, mask=v < V, other=float("-inf")).to(tl.float32)
        # online log-sum-exp: rescale the old sum to the new max, so exp never overflows
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        zy += tl.sum(tl.where(v == y, z, 0.0), axis=0)
        # runner-up: the block's best with the target masked out; ties keep the lowest index, as torch.argmax
        best, idx = tl.max(tl.where(v == y, float("-inf"), z), axis=0, return_indices=True)
        r = tl.where(best > zr, start + idx, r)
        zr = tl.maximum(zr, best)
    tl.store(lse_ptr + row, m + tl.log(s))
    tl.store(zy_ptr + row, zy)
    tl.store(zr_ptr + row, zr)
    tl.store(r_ptr + row, r)


@triton.jit
def _grad_kernel(z_ptr, z_stride, y_ptr, g_ptr, lse_ptr, zy_ptr, zr_ptr, r_ptr, V, ignore_index,
                 IH: tl.constexpr, BLOCK_V: tl.constexpr):
    # overwrites the logits z with g · dloss/dz; no online pass needed, lse is known from the forward
    row = tl.program_id(0).to(tl.int64)
    z_ptr += row * z_stride
    y = tl.load(y_ptr + row)
    g = tl.where(y == ignore_index, 0.0, tl.load(g_ptr + row))
    lse = tl.load(lse_ptr + row)
    if IH:
        r = tl.load(r_ptr + row)
        p_y = tl.exp(tl.load(zy_ptr + row) - lse)
        p_r = tl.exp(tl.load(zr_ptr + row) - lse)
    for start in range(0, V, BLOCK_V):
        v = start + tl.arange(0, BLOCK_V)
        p = tl.exp(tl.load(z_ptr + v, mask=v < V, other=0.0).to(tl.float32) - lse)
        if IH:  # p_y (e_y − p) − p_r (e_r − p)
            dz = (p_r - p_y) * p + tl.where(v == y, p_y, 0.0) - tl.where(v == r, p_r, 0.0)
        else:   # p − e_y
            dz = p - tl.where(v == y, 1.0, 0.0)
        tl.store(z_ptr + v, (g * dz).to(z_ptr.dtype.element_ty), mask=v < V)


# -----------------------------------------------------------------------------
# Triton path

def _online_stats(hidden, weight, targets, ignore_index):
    """lse, z_y, z_r (runner-up logit), r (runner-up index) per token, one [CHUNK, V] chunk at a time."""
    N, V = hidden.shape[0], weight.shape[0]
    lse, zy, zr = (torch.empty(N, device=hidden.device, dtype=torch.float32) for _ in range(3))
    r = torch.empty(N, device=hidden.device, dtype=torch.int32)
    for s in range(0, N, CHUNK):
        e = min(s + CHUNK, N)
        z = hidden[s:e] @ weight.T
        _stats_kernel[(e - s,)](z, z.stride(0), targets[s:e], lse[s:e], zy[s:e], zr[s:e], r[s:e],
                                V, ignore_index, BLOCK_V=BLOCK_V, num_warps=8)
    return lse, zy, zr, r


class _FusedLinearLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, targets, ih, ignore_index):
        lse, zy, zr, r = _online_stats(hidden, weight, targets, ignore_index)
        loss = 1 + torch.exp(zy - lse) - torch.exp(zr - lse) if ih else lse - zy
        loss = loss.masked_fill(targets == ignore_index, 0.0)
        ctx.save_for_backward(hidden, weight, targets, lse, zy, zr, r)
        ctx.ih, ctx.ignore_index = ih, ignore_index
        return loss

    @staticmethod
    @once_differentiable  # no double backward
    def backward(ctx, dloss):
        hidden, weight, targets, lse, zy, zr, r = ctx.saved_tensors
        N, V = hidden.shape[0], weight.shape[0]
        dloss = dloss.float().contiguous()  # the grad of a .sum() arrives as a stride-0 view
        dh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dW = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, N, CHUNK):
            e = min(s + CHUNK, N)
            z = hidden[s:e] @ weight.T  # recomputed, then turned into dL/dz in place
            _grad_kernel[(e - s,)](z, z.stride(0), targets[s:e], dloss[s:e], lse[s:e], zy[s:e], zr[s:e], r[s:e],
                                   V, ctx.ignore_index, IH=ctx.ih, BLOCK_V=BLOCK_V, num_warps=8)
            if dh is not None:
                dh[s:e] = z @ weight
            if dW is not None:
                dW += z.T @ hidden[s:e]  # fp32 accumulator across chunks, also for bf16
        return dh, None if dW is None else dW.to(weight.dtype), None, None, None


def fused_linear_loss(hidden, weight, targets, loss="ce", ignore_index=-100):
    """Per-token CE or IH [N] fp32 of logits hidden [N,H] @ weight[V,H]ᵀ, 0 at ignore_index; Triton."""
    assert HAVE_TRITON, "fused_linear_loss needs Triton; fused_linear_loss_ref is the PyTorch twin"
    assert loss in ("ce", "ih"), loss
    return _FusedLinearLoss.apply(hidden, weight, targets.contiguous(), loss == "ih", ignore_index)


@torch.no_grad()
def linear_token_stats(hidden, weight, targets, ignore_index=-100):
    """(log p(target) [N] fp32, argmax == target [N] bool), 0 / False at ignore_index; Triton."""
    assert HAVE_TRITON, "linear_token_stats needs Triton; linear_token_stats_ref is the PyTorch twin"
    targets = targets.contiguous()
    lse, zy, zr, r = _online_stats(hidden, weight, targets, ignore_index)
    ignored = targets == ignore_index
    # argmax == y: y beats the runner-up, or ties it and comes first (torch.argmax returns the first max)
    correct = ((zy > zr) | ((zy == zr) & (targets < r))) & ~ignored
    return (zy - lse).masked_fill(ignored, 0.0), correct


# -----------------------------------------------------------------------------
# PyTorch twins: the same signatures, the same chunking (checkpointed so that backward keeps memory flat)

def _chunk_loss_ref(hidden, weight, targets, ih, ignore_index):
    z = (hidden @ weight.T).float()
    if not ih:
        return F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="none")
    valid = targets != ignore_index
    y = targets.where(valid, 0)[:, None]
    p = z.softmax(-1)
    p_y = p.gather(1, y)[:, 0]
    p_r = p.scatter(1, y, -1.0).max(-1).values  # runner-up: the target masked out
    return torch.where(valid, 1 + p_y - p_r, 0.0)


def fused_linear_loss_ref(hidden, weight, targets, loss="ce", ignore_index=-100):
    """PyTorch twin of fused_linear_loss."""
    assert loss in ("ce", "ih"), loss
    out = []
    for s in range(0, hidden.shape[0], CHUNK):
        args = (hidden[s:s + CHUNK], weight, targets[s:s + CHUNK], loss == "ih", ignore_index)
        # checkpoint: keep no chunk's logits for backward, recompute them there
        out.append(checkpoint(_chunk_loss_ref, *args, use_reentrant=False) if torch.is_grad_enabled()
                   else _chunk_loss_ref(*args))
    return torch.cat(out)


@torch.no_grad()
def linear_token_stats_ref(hidden, weight, targets, ignore_index=-100):
    """PyTorch twin of linear_token_stats."""
    logp, correct = [], []
    for s in range(0, hidden.shape[0], CHUNK):
        z = (hidden[s:s + CHUNK] @ weight.T).float()
        y = targets[s:s + CHUNK]
        valid = y != ignore_index
        lp = z.log_softmax(-1).gather(1, y.where(valid, 0)[:, None])[:, 0]
        logp.append(torch.where(valid, lp, 0.0))
        correct.append((z.argmax(-1) == y) & valid)
    return torch.cat(logp), torch.cat(correct)
