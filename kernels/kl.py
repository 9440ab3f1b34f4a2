"""
Per-token KL divergence between a reference model's and the model's next-token distributions, straight from
hidden states and the two output projections, without ever holding N × V logits.

For a token with hidden states h (model) and h' (reference), logits z = W h and z' = W' h' (V of them),
p = softmax(z), q = softmax(z'), lse = log Σ_v exp(z_v), lse' likewise:

    KL(q ‖ p) = Σ_v q_v (log q_v − log p_v) = Σ_v q_v (z'_v − z_v) + lse − lse'
    dKL/dz    = p − q                   (q is a constant: the reference is frozen)
    symmetric = Σ_v (q_v − p_v)(log q_v − log p_v) = Σ_v q_v (z'_v − z_v) − Σ_v p_v (z'_v − z_v)

(the lse terms of the symmetric form cancel, since Σ q = Σ p = 1). Both sums are taken in the same online
pass as the two log-sum-exps (flash-attention style): with running maxima m, m' and running sums
s = Σ exp(z − m), s' = Σ exp(z' − m'), keep

    a = Σ_v exp(z'_v − m') (z'_v − z_v)     rescaled by exp(m'_old − m'_new) whenever m' grows, like s'
    b = Σ_v exp(z_v − m) (z'_v − z_v)       rescaled with m, like s

so that Σ q (z' − z) = a / s' and Σ p (z' − z) = b / s. With an upstream gradient g_t per token,
dL/dz_t = g_t (p_t − q_t), then dL/dh = dz W and dL/dW = dzᵀ h; h' and W' get no gradient.

The scheme is that of loss.py: per chunk of CHUNK tokens, z = h Wᵀ and z' = h' W'ᵀ by cuBLAS (fp32 logits from
bf16 inputs, loss._logits: near θ0 the KL is made of z' − z, smaller than bf16's rounding of z), one Triton
program per row makes the online pass and keeps lse, lse' (O(N) numbers); the backward recomputes both
chunks and a Triton kernel overwrites z with g (p − q) in place. When the projection is shared (LoRA and
EUL leave lm_head frozen: W = W'), [h; h'] @ Wᵀ is one matmul for both. Extra memory: two [CHUNK, V]
logits buffers, instead of the N × V logits, log-softmaxes and their gradients of the eager code.
The `_ref` twin is plain PyTorch (log_softmax and autograd), chunked and checkpointed the same way.
"""

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .loss import HAVE_TRITON, _addmm_fp32, _check_dtypes, _logits as _fp32_logits, chunk_rows, tl, triton

BLOCK_V = 4096  # vocabulary entries per step of the online pass (the tests shrink it to hit ragged edges)
CHUNK = None    # tokens per chunk; None: chunk_rows(N, H, V) (the tests set it to hit ragged edges)


@triton.jit
def _kl_stats_kernel(z_ptr, zr_ptr, z_stride, zr_stride, lse_ptr, lse_ref_ptr, kl_ptr, sym_ptr, V,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_ptr += row * z_stride
    zr_ptr += row * zr_stride
    m, s, b = float("-inf"), 0.0, 0.0     # model: running max, Σ exp(z − m), Σ exp(z − m)(z' − z)
    mr, sr, a = float("-inf"), 0.0, 0.0   # reference: running max, Σ exp(z' − m'), Σ exp(z' − m')(z' − z)
    for start in range(0, V, BLOCK_V):
        v = start + tl.arange(0, BLOCK_V)
        z = tl.load(z_ptr + v, mask=v < V, other=0.0).to(tl.float32)
        zr = tl.load(zr_ptr + v, mask=v < V, other=0.0).to(tl.float32)
        d = zr - z  # 0 past the end
        z, zr = tl.where(v < V, z, float("-inf")), tl.where(v < V, zr, float("-inf"))  # exp(−inf) = 0 there
        m_new = tl.maximum(m, tl.max(z, axis=0))
        e, scale = tl.exp(z - m_new), tl.exp(m - m_new)  # e = 0 past the end
        s = s * scale + tl.sum(e, axis=0)
        b = b * scale + tl.sum(e * d, axis=0)
        m = m_new
        mr_new = tl.maximum(mr, tl.max(zr, axis=0))
        er, scale_r = tl.exp(zr - mr_new), tl.exp(mr - mr_new)
        sr = sr * scale_r + tl.sum(er, axis=0)
        a = a * scale_r + tl.sum(er * d, axis=0)
        mr = mr_new
    lse, lse_ref = m + tl.log(s), mr + tl.log(sr)
    tl.store(lse_ptr + row, lse)
    tl.store(lse_ref_ptr + row, lse_ref)
    tl.store(kl_ptr + row, a / sr + lse - lse_ref)
    tl.store(sym_ptr + row, a / sr - b / s)


@triton.jit
def _kl_grad_kernel(z_ptr, zr_ptr, z_stride, zr_stride, g_ptr, lse_ptr, lse_ref_ptr, V, BLOCK_V: tl.constexpr):
    # overwrites the model's logits z with g (p − q); lse and lse' are known from the forward
    row = tl.program_id(0).to(tl.int64)
    z_ptr += row * z_stride
    zr_ptr += row * zr_stride
    g, lse, lse_ref = tl.load(g_ptr + row), tl.load(lse_ptr + row), tl.load(lse_ref_ptr + row)
    for start in range(0, V, BLOCK_V):
        v = start + tl.arange(0, BLOCK_V)
        p = tl.exp(tl.load(z_ptr + v, mask=v < V, other=0.0).to(tl.float32) - lse)
        q = tl.exp(tl.load(zr_ptr + v, mask=v < V, other=0.0).to(tl.float32) - lse_ref)
        tl.store(z_ptr + v, (g * (p - q)).to(z_ptr.dtype.element_ty), mask=v < V)


# -----------------------------------------------------------------------------
# Triton path

def _logits(hidden, weight, ref_hidden, ref_weight, s, e):
    """(z, z') of tokens s:e, [e − s, V] each, fp32 whatever the inputs (loss._logits: near θ0, z' − z is
    smaller than bf16's rounding of z); one matmul when the projection is shared (ref_weight None)."""
    if ref_weight is None:
        zz = _fp32_logits(torch.cat([hidden[s:e], ref_hidden[s:e]]), weight)
        return zz[:e - s], zz[e - s:]
    return _fp32_logits(hidden[s:e], weight), _fp32_logits(ref_hidden[s:e], ref_weight)


class _LinearKL(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight):
        N, V = hidden.shape[0], weight.shape[0]
        chunk = CHUNK or chunk_rows(N, hidden.shape[1], V)
        lse, lse_ref, kl, sym = (torch.empty(N, device=hidden.device, dtype=torch.float32) for _ in range(4))
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z, zr = _logits(hidden, weight, ref_hidden, ref_weight, s, e)
            _kl_stats_kernel[(e - s,)](z, zr, z.stride(0), zr.stride(0), lse[s:e], lse_ref[s:e], kl[s:e], sym[s:e],
                                       V, BLOCK_V=BLOCK_V, num_warps=8)
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, lse, lse_ref)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(sym)
        return kl, sym

    @staticmethod
    @once_differentiable
    def backward(ctx, dkl, _dsym):
        hidden, weight, ref_hidden, ref_weight, lse, lse_ref = ctx.saved_tensors
        N, V = hidden.shape[0], weight.shape[0]
        dkl = dkl.float().contiguous()  # the grad of a .sum() arrives as a stride-0 view
        dh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dW = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, N, ctx.chunk):
            e = min(s + ctx.chunk, N)
            z, zr = _logits(hidden, weight, ref_hidden, ref_weight, s, e)  # recomputed; z becomes dL/dz
            _kl_grad_kernel[(e - s,)](z, zr, z.stride(0), zr.stride(0), dkl[s:e], lse[s:e], lse_ref[s:e], V,
                                      BLOCK_V=BLOCK_V, num_warps=8)
            dz = z.to(weight.dtype)  # fp32 until here; the matmuls take the inputs' dtype
            if dh is not None:
                dh[s:e] = dz @ weight
            if dW is not None:
                _addmm_fp32(dW, dz.T, hidden[s:e])
        return dh, None if dW is None else dW.to(weight.dtype), None, None


def _args(hidden, weight, ref_hidden, ref_weight):
    _check_dtypes(hidden, weight, ref_hidden, *(() if ref_weight is None else (ref_weight,)))
    # one dtype for both models: z and z' then share it, as the shared-projection matmul needs anyway
    assert ref_hidden.dtype == hidden.dtype and (ref_weight is None or ref_weight.dtype == weight.dtype)
    assert hidden.shape[0] == ref_hidden.shape[0], (hidden.shape, ref_hidden.shape)
    shared = ref_weight is None or ref_weight is weight
    assert shared or ref_weight.shape[0] == weight.shape[0], (weight.shape, ref_weight.shape)
    # the reference is a constant: no gradient flows into it, whatever its requires_grad says
    return hidden, weight, ref_hidden.detach(), None if shared else ref_weight.detach()


def fused_linear_kl(hidden, weight, ref_hidden, ref_weight=None, symmetric=False):
    """KL(q ‖ p) per token [N] fp32, p = softmax(hidden [N,H] @ weight [V,H]ᵀ), q = softmax(ref_hidden [N,H'] @
    ref_weight [V,H']ᵀ); differentiable in hidden and weight. ref_weight None (or weight itself): shared
    projection. symmetric=True: Σ (q − p)(log q − log p) instead, no gradient. Triton."""
    assert HAVE_TRITON, "fused_linear_kl needs Triton; fused_linear_kl_ref is the PyTorch twin"
    kl, sym = _LinearKL.apply(*_args(hidden, weight, ref_hidden, ref_weight))
    return sym if symmetric else kl


# -----------------------------------------------------------------------------
# PyTorch twin: the same signature, the same chunking (checkpointed so that backward keeps memory flat)

def _chunk_kl_ref(hidden, weight, ref_hidden, ref_weight, symmetric):
    logp = (hidden @ weight.T).log_softmax(-1)  # fp32: fused_linear_kl_ref upcasts its inputs
    logq = (ref_hidden @ ref_weight.T).log_softmax(-1)
    if symmetric:
        return ((logq.exp() - logp.exp()) * (logq - logp)).sum(-1)
    return (logq.exp() * (logq - logp)).sum(-1)


def fused_linear_kl_ref(hidden, weight, ref_hidden, ref_weight=None, symmetric=False):
    """PyTorch twin of fused_linear_kl."""
    hidden, weight, ref_hidden, ref_weight = _args(hidden, weight, ref_hidden, ref_weight)
    ref_weight = weight.detach() if ref_weight is None else ref_weight
    # fp32 logits from bf16 inputs (the upcast is exact; autograd casts the gradients back): rounded to bf16,
    # logits that differ by less than their rounding would give a KL and a gradient p − q of noise
    hidden, weight, ref_hidden, ref_weight = (t.float() for t in (hidden, weight, ref_hidden, ref_weight))
    N = hidden.shape[0]
    chunk = CHUNK or chunk_rows(N, hidden.shape[1], weight.shape[0])
    grad = torch.is_grad_enabled() and not symmetric and (hidden.requires_grad or weight.requires_grad)
    out = []
    for s in range(0, N, chunk):
        args = (hidden[s:s + chunk], weight, ref_hidden[s:s + chunk], ref_weight, symmetric)
        out.append(checkpoint(_chunk_kl_ref, *args, use_reentrant=False) if grad else _chunk_kl_ref(*args))
    out = torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
    return out.detach() if symmetric else out
