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
dW is accumulated in one fp32 [V, H] buffer across chunks, by an fp32-output matmul (no [V, H] temporary
per chunk; on a GPU with bf16 inputs this is torch.addmm(..., out_dtype=torch.float32)).
Precision: a chunk's logits z are fp32 whatever the inputs (bf16 in, fp32 accumulation and output, as Apple's
Cut Cross-Entropy does; _logits). Rounded to bf16 (8 bits of mantissa) a logit of 10 moves by up to 0.03:
more than θ and θ0 differ near the reference, where KL and its gradient p − q are made of such differences
(kl.py). dL/dz is formed in fp32, then rounded to the inputs' dtype for the dh and dW matmuls (~0.4% an entry).
Two ways to get gradients:
  per-token loss [N] (no `scale`): the backward recomputes z, as above, for any upstream g_t (NPO's
    sequence weights are known only in the backward). 4 matmuls per chunk: z twice, dh, dW.
  weighted sum Σ_t scale_t loss_t (`scale` given, a constant, e.g. 1/#tokens for a mean NLL or IH): g = scale
    is known in the forward, so dL/dz, dh and dW are formed there, as Liger does for a mean loss, and the
    backward only multiplies them by the upstream scalar. 3 matmuls per chunk; dh [N, H] and dW are held
    from the forward to the backward.
Extra memory is O(CHUNK × V) (fp32), CHUNK from chunk_rows(N, H, V). Inputs are fp32 or bf16 (asserted), both of
one dtype; all logits and softmax statistics are fp32. A target outside [0, V)
that is not ignore_index raises ValueError (the kernel would otherwise never meet it and return loss = lse).

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

CHUNK = None     # tokens per chunk; None: chunk_rows(N, H, V). The [CHUNK, V] logits buffer is the extra memory
BLOCK_V = 4096   # vocabulary entries per step of the online pass (the tests shrink both to hit ragged edges)


def chunk_rows(N, H, V):
    """Tokens per chunk: enough that the chunk's [rows, V] logits are about as large as the [N, H] hidden
    states (Liger-Kernel's rule: the loss then costs no more memory than its input), at least 256 rows so
    that each matmul stays large enough to run near peak, at most N."""
    rows = 1 << max(0, -(-N * H // V) - 1).bit_length()  # next power of two of ceil(N·H / V)
    return max(1, min(N, max(256, rows)))


def _check_dtypes(*tensors):
    for t in tensors:
        assert t.dtype in (torch.float32, torch.bfloat16), f"fp32 or bf16 inputs only, got {t.dtype}"
    assert len({t.dtype for t in tensors}) == 1, f"inputs of one dtype, got {[t.dtype for t in tensors]}"


def _check_targets(targets, V, ignore_index):
    # one host sync per call: cheap next to the matmuls, and a silent loss = lse is far worse
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        raise ValueError(f"targets must lie in [0, {V}) or equal ignore_index ({ignore_index}); "
                         f"got {targets[bad][:5].tolist()}")


_OUT_DTYPE = [True]  # torch.mm / addmm(..., out_dtype=) on this GPU; cleared the first time torch refuses it


def _logits(hidden, weight):
    """hidden [rows, H] @ weight [V, H]ᵀ as fp32 logits [rows, V]. bf16 inputs: cuBLAS's bf16 matmul with fp32
    accumulation and fp32 output (torch.mm(..., out_dtype=), CUDA only in torch 2.13); elsewhere (the Triton
    interpreter on a CPU) the inputs upcast, which is exact and gives the same fp32 sums."""
    if hidden.dtype == torch.float32:
        return hidden @ weight.T
    if hidden.is_cuda and _OUT_DTYPE[0]:
        try:
            return torch.mm(hidden, weight.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE[0] = False
    return hidden.float() @ weight.float().T


def _addmm_fp32(acc, a, b):
    """acc += a @ b, acc fp32, without a temporary of acc's size: addmm_ in place for fp32 inputs; for bf16
    on a GPU, torch's fp32-output matmul (cuBLAS, bf16 in, fp32 accumulate and out). torch 2.13 has that
    for CUDA only, so a CPU (the Triton interpreter) or a torch without it takes a bf16 temporary."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _OUT_DTYPE[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE[0] = False
    acc += a @ b


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

def _online_stats(hidden, weight, targets, ignore_index, chunk, grad_scale=None, dh=None, dW=None, ih=False):
    """lse, z_y, z_r (runner-up logit), r (runner-up index) per token, one [chunk, V] logits chunk at a time.
    With grad_scale [N] (the per-token g, known in the forward), also dh[s:e] = dz W and dW += dzᵀ h from
    the same chunk of logits, turned into dz in place after its statistics are taken."""
    N, V = hidden.shape[0], weight.shape[0]
    lse, zy, zr = (torch.empty(N, device=hidden.device, dtype=torch.float32) for _ in range(3))
    r = torch.empty(N, device=hidden.device, dtype=torch.int32)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        z = _logits(hidden[s:e], weight)
        _stats_kernel[(e - s,)](z, z.stride(0), targets[s:e], lse[s:e], zy[s:e], zr[s:e], r[s:e],
                                V, ignore_index, BLOCK_V=BLOCK_V, num_warps=8)
        if grad_scale is not None:
            _backward_chunk(z, hidden, weight, targets, grad_scale, lse, zy, zr, r, s, e, ih, ignore_index, dh, dW)
    return lse, zy, zr, r


def _backward_chunk(z, hidden, weight, targets, g, lse, zy, zr, r, s, e, ih, ignore_index, dh, dW):
    """Overwrites the chunk's fp32 logits z with g · dloss/dz, then dh[s:e] = dz W and dW += dzᵀ h (fp32), dz
    in the inputs' dtype for the two matmuls."""
    _grad_kernel[(e - s,)](z, z.stride(0), targets[s:e], g[s:e], lse[s:e], zy[s:e], zr[s:e], r[s:e],
                           weight.shape[0], ignore_index, IH=ih, BLOCK_V=BLOCK_V, num_warps=8)
    dz = z.to(weight.dtype)
    if dh is not None:
        dh[s:e] = dz @ weight
    if dW is not None:
        _addmm_fp32(dW, dz.T, hidden[s:e])


def _token_loss(targets, lse, zy, zr, ih, ignore_index):
    loss = 1 + torch.exp(zy - lse) - torch.exp(zr - lse) if ih else lse - zy
    return loss.masked_fill(targets == ignore_index, 0.0)


def _grad_buffers(hidden, weight, need_h, need_w):
    dh = torch.empty_like(hidden) if need_h else None
    dW = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
    return dh, dW


class _FusedLinearLoss(torch.autograd.Function):
    """Per-token loss [N]; the backward recomputes the logits for any upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ih, ignore_index):
        ctx.chunk = CHUNK or chunk_rows(*hidden.shape, weight.shape[0])
        lse, zy, zr, r = _online_stats(hidden, weight, targets, ignore_index, ctx.chunk)
        ctx.save_for_backward(hidden, weight, targets, lse, zy, zr, r)
        ctx.ih, ctx.ignore_index = ih, ignore_index
        return _token_loss(targets, lse, zy, zr, ih, ignore_index)

    @staticmethod
    @once_differentiable  # no double backward
    def backward(ctx, dloss):
        hidden, weight, targets, lse, zy, zr, r = ctx.saved_tensors
        dloss = dloss.float().contiguous()  # the grad of a .sum() arrives as a stride-0 view
        dh, dW = _grad_buffers(hidden, weight, *ctx.needs_input_grad[:2])
        for s in range(0, hidden.shape[0], ctx.chunk):
            e = min(s + ctx.chunk, hidden.shape[0])
            z = _logits(hidden[s:e], weight)  # recomputed, then turned into dL/dz in place
            _backward_chunk(z, hidden, weight, targets, dloss, lse, zy, zr, r, s, e, ctx.ih, ctx.ignore_index, dh, dW)
        return dh, None if dW is None else dW.to(weight.dtype), None, None, None


def _scaled_grads(ctx, dtotal):
    """The gradients formed in the forward, times the upstream scalar."""
    dh, dW = ctx.saved_tensors
    return (None if dh is None else dh * dtotal.to(dh.dtype),
            None if dW is None else (dW * dtotal).to(ctx.weight_dtype))


class _FusedLinearLossScaled(torch.autograd.Function):
    """Σ_t scale_t loss_t, a scalar; gradients formed in the forward (scale is known there)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, ih, ignore_index):
        chunk = CHUNK or chunk_rows(*hidden.shape, weight.shape[0])
        scale = scale.float().masked_fill(targets == ignore_index, 0.0).contiguous()
        dh, dW = _grad_buffers(hidden, weight, *ctx.needs_input_grad[:2])
        lse, zy, zr, r = _online_stats(hidden, weight, targets, ignore_index, chunk, scale, dh, dW, ih)
        ctx.save_for_backward(dh, dW)
        ctx.weight_dtype = weight.dtype
        return (_token_loss(targets, lse, zy, zr, ih, ignore_index) * scale).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, dtotal):
        return *_scaled_grads(ctx, dtotal), None, None, None, None


def fused_linear_loss(hidden, weight, targets, loss="ce", ignore_index=-100, scale=None):
    """Per-token CE or IH [N] fp32 of logits hidden [N,H] @ weight[V,H]ᵀ, 0 at ignore_index; or, with
    scale [N] (a constant), the scalar Σ_t scale_t loss_t with its gradients formed in the forward. Triton."""
    assert HAVE_TRITON, "fused_linear_loss needs Triton; fused_linear_loss_ref is the PyTorch twin"
    assert loss in ("ce", "ih"), loss
    _check_dtypes(hidden, weight)
    targets = targets.contiguous()
    _check_targets(targets, weight.shape[0], ignore_index)
    if scale is None:
        return _FusedLinearLoss.apply(hidden, weight, targets, loss == "ih", ignore_index)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return (_FusedLinearLoss.apply(hidden, weight, targets, loss == "ih", ignore_index) * scale).sum()
    return _FusedLinearLossScaled.apply(hidden, weight, targets, scale.detach(), loss == "ih", ignore_index)


@torch.no_grad()
def linear_token_stats(hidden, weight, targets, ignore_index=-100):
    """(log p(target) [N] fp32, argmax == target [N] bool), 0 / False at ignore_index; Triton."""
    assert HAVE_TRITON, "linear_token_stats needs Triton; linear_token_stats_ref is the PyTorch twin"
    _check_dtypes(hidden, weight)
    targets = targets.contiguous()
    _check_targets(targets, weight.shape[0], ignore_index)
    chunk = CHUNK or chunk_rows(*hidden.shape, weight.shape[0])
    lse, zy, zr, r = _online_stats(hidden, weight, targets, ignore_index, chunk)
    ignored = targets == ignore_index
    # argmax == y: y beats the runner-up, or ties it and comes first (torch.argmax returns the first max)
    correct = ((zy > zr) | ((zy == zr) & (targets < r))) & ~ignored
    return (zy - lse).masked_fill(ignored, 0.0), correct


# -----------------------------------------------------------------------------
# PyTorch twins: the same signatures, the same chunking (checkpointed so that backward keeps memory flat)

def _chunk_loss_ref(hidden, weight, targets, ih, ignore_index):
    z = hidden @ weight.T  # fp32: the twins upcast their inputs (exact), as fp32 accumulation of bf16 products
    if not ih:
        return F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="none")
    valid = targets != ignore_index
    y = targets.where(valid, 0)[:, None]
    p = z.softmax(-1)
    p_y = p.gather(1, y)[:, 0]
    p_r = p.scatter(1, y, -1.0).max(-1).values  # runner-up: the target masked out
    return torch.where(valid, 1 + p_y - p_r, 0.0)


class _FusedLinearLossScaledRef(torch.autograd.Function):
    """Twin of _FusedLinearLossScaled: autograd's gradients of each chunk's Σ scale·loss, taken in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, ih, ignore_index, chunk):
        need = ctx.needs_input_grad[:2]
        dh, dW = _grad_buffers(hidden, weight, *need)
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for s in range(0, hidden.shape[0], chunk):
            with torch.enable_grad():
                h, W = hidden[s:s + chunk].detach().requires_grad_(need[0]), weight.detach().requires_grad_(need[1])
                part = (_chunk_loss_ref(h, W, targets[s:s + chunk], ih, ignore_index) * scale[s:s + chunk]).sum()
                grads = list(torch.autograd.grad(part, [t for t, n in zip((h, W), need) if n]))
            if need[0]:
                dh[s:s + chunk] = grads.pop(0)
            if need[1]:
                dW += grads.pop(0)
            total += part.detach()
        ctx.save_for_backward(dh, dW)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, dtotal):
        return *_scaled_grads(ctx, dtotal), None, None, None, None, None


def fused_linear_loss_ref(hidden, weight, targets, loss="ce", ignore_index=-100, scale=None):
    """PyTorch twin of fused_linear_loss."""
    assert loss in ("ce", "ih"), loss
    _check_dtypes(hidden, weight)
    _check_targets(targets, weight.shape[0], ignore_index)
    chunk = CHUNK or chunk_rows(*hidden.shape, weight.shape[0])
    hidden, weight = hidden.float(), weight.float()  # fp32 logits (autograd casts the gradients back)
    if scale is not None and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearLossScaledRef.apply(hidden, weight, targets, scale.detach().float(), loss == "ih",
                                               ignore_index, chunk)
    out = []
    for s in range(0, hidden.shape[0], chunk):
        args = (hidden[s:s + chunk], weight, targets[s:s + chunk], loss == "ih", ignore_index)
        # checkpoint: keep no chunk's logits for backward, recompute them there
        out.append(checkpoint(_chunk_loss_ref, *args, use_reentrant=False) if torch.is_grad_enabled()
                   else _chunk_loss_ref(*args))
    out = torch.cat(out)
    return out if scale is None else (out * scale.detach().float()).sum()


@torch.no_grad()
def linear_token_stats_ref(hidden, weight, targets, ignore_index=-100):
    """PyTorch twin of linear_token_stats."""
    _check_dtypes(hidden, weight)
    _check_targets(targets, weight.shape[0], ignore_index)
    chunk = CHUNK or chunk_rows(*hidden.shape, weight.shape[0])
    hidden, weight = hidden.float(), weight.float()  # fp32 logits
    logp, correct = [], []
    for s in range(0, hidden.shape[0], chunk):
        z = hidden[s:s + chunk] @ weight.T
        y = targets[s:s + chunk]
        valid = y != ignore_index
        lp = z.log_softmax(-1).gather(1, y.where(valid, 0)[:, None])[:, 0]
        logp.append(torch.where(valid, lp, 0.0))
        correct.append((z.argmax(-1) == y) & valid)
    return torch.cat(logp), torch.cat(correct)
