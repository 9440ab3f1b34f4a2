"""
Per-sample squared gradients of a linear layer y = x Wᵀ, without ever holding the per-sample gradients.

Sample n has inputs X_n [T, in] and output gradients G_n [T, out] (rows of padding tokens are zero and
add nothing). Its gradient and the two things we want from it:

    ∇_W ℓ_n = G_nᵀ X_n                          [out, in]
    fisher  = Σ_n (G_nᵀ X_n)²                   elementwise, [out, in]: the empirical Fisher diagonal (× N)
    sq_n    = ‖G_nᵀ X_n‖²_F                     [N]: per-sample gradient norms², a memorization score

Materializing N per-sample gradients costs N × out × in memory (32 samples of GPT-2's c_fc: 290 MiB per
layer). The kernel instead gives each program one [BLOCK_O, BLOCK_I] tile of W; it loops over the samples,
forms that tile of G_nᵀ X_n with tl.dot over blocks of T, squares it into the Fisher accumulator and
writes the tile's Σ of squares to a [N, tiles] buffer that is summed afterwards (deterministic, unlike
atomics). Extra memory: that buffer; the work is that of the mini-batch gradient Σ_n G_nᵀ X_n.

The norms alone have a Gram form that needs no [out, in] tile at all:

    ‖G_nᵀ X_n‖²_F = Σ_{t,s} (x_t · x_s)(g_t · g_s) = sum(X_n X_nᵀ ⊙ G_n G_nᵀ)

costing T²(in + out) multiply-adds per sample instead of T·in·out, and holding 2T² numbers instead of
in·out: less memory when 2T² < in·out, less time when T(in + out) < in·out.
Neither the kernel nor the twin uses it; the Fisher needs the tiles anyway.

fp32 or bf16 inputs, fp32 accumulation. On a GPU, tl.dot multiplies fp32 tiles in tf32 (10-bit mantissa):
expect relative differences of about 1e-3 from the fp32 twin (the tests allow 1e-2).
"""

import os

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # no Triton: the kernel below can be defined but not run; the twin runs
    from types import SimpleNamespace
    triton, tl = SimpleNamespace(jit=lambda fn: fn), SimpleNamespace(constexpr=None)
    HAVE_TRITON = False

BLOCK_O, BLOCK_I, BLOCK_T = 64, 64, 32
SAMPLES = 8  # samples per chunk in the twin: it holds SAMPLES × out × in per-sample gradients


@triton.jit
def _fisher_kernel(x_ptr, g_ptr, fisher_ptr, partial_ptr, N, T, IN, OUT,
                   x_sn, x_st, g_sn, g_st,
                   BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, UPCAST: tl.constexpr):
    pid_o, pid_i = tl.program_id(0), tl.program_id(1)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    fisher = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for n in range(N):
        x_n = x_ptr + n * x_sn
        g_n = g_ptr + n * g_sn
        grad = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)  # this tile of G_nᵀ X_n
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            gt = tl.load(g_n + t[None, :] * g_st + o[:, None], mask=(o[:, None] < OUT) & (t[None, :] < T), other=0.0)
            xt = tl.load(x_n + t[:, None] * x_st + i[None, :], mask=(t[:, None] < T) & (i[None, :] < IN), other=0.0)
            if UPCAST:  # the Triton 3.9 interpreter multiplies bf16 tiles as raw integers; fp32 there
                gt, xt = gt.to(tl.float32), xt.to(tl.float32)
            grad = tl.dot(gt, xt, grad)  # [BLOCK_O, BLOCK_T] @ [BLOCK_T, BLOCK_I]
        sq = grad * grad  # out-of-range rows and columns are 0: masked loads
        fisher += sq
        tl.store(partial_ptr + (n * tl.num_programs(0) + pid_o) * tl.num_programs(1) + pid_i, tl.sum(sq))
    tl.store(fisher_ptr + o[:, None] * IN + i[None, :], fisher, mask=(o[:, None] < OUT) & (i[None, :] < IN))


def per_sample_grad_sq(x, g):
    """x [N,T,in], g [N,T,out] -> (fisher [out,in] fp32 = Σ_n (g_nᵀ x_n)², sq_norms [N] fp32); Triton."""
    assert HAVE_TRITON, "per_sample_grad_sq needs Triton; per_sample_grad_sq_ref is the PyTorch twin"
    x, g = x.contiguous(), g.contiguous()
    (N, T, IN), OUT = x.shape, g.shape[2]
    grid = (triton.cdiv(OUT, BLOCK_O), triton.cdiv(IN, BLOCK_I))
    fisher = torch.empty(OUT, IN, device=x.device, dtype=torch.float32)
    partial = torch.empty(N, grid[0] * grid[1], device=x.device, dtype=torch.float32)
    _fisher_kernel[grid](x, g, fisher, partial, N, T, IN, OUT, x.stride(0), x.stride(1), g.stride(0), g.stride(1),
                         BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I, BLOCK_T=BLOCK_T,
                         UPCAST=os.environ.get("TRITON_INTERPRET") == "1")
    return fisher, partial.sum(1)


def per_sample_grad_sq_ref(x, g):
    """PyTorch twin of per_sample_grad_sq: per-sample gradients SAMPLES at a time."""
    N, OUT, IN = x.shape[0], g.shape[2], x.shape[2]
    fisher = torch.zeros(OUT, IN, device=x.device, dtype=torch.float32)
    sq_norms = torch.empty(N, device=x.device, dtype=torch.float32)
    for s in range(0, N, SAMPLES):
        sq = torch.einsum("nto,nti->noi", g[s:s + SAMPLES].float(), x[s:s + SAMPLES].float()).square()
        fisher += sq.sum(0)
        sq_norms[s:s + SAMPLES] = sq.sum((1, 2))
    return fisher, sq_norms
