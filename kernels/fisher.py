"""
Per-sample squared gradients of a linear layer y = x Wᵀ, without ever holding the per-sample gradients.

Sample n has inputs X_n [T, in] and output gradients G_n [T, out] (rows of padding tokens are zero and
add nothing). Its gradient and the two things we want from it:

    ∇_W ℓ_n = G_nᵀ X_n                          [out, in]
    fisher  = Σ_n (G_nᵀ X_n)²                   elementwise, [out, in]: the empirical Fisher diagonal (× N)
    sq_n    = ‖G_nᵀ X_n‖²_F                     [N]: per-sample gradient norms², a memorization score

Materializing N per-sample gradients costs N × out × in memory (32 samples of GPT-2's c_fc: 290 MiB per
layer). The kernel instead gives each program one [BLOCK_O, BLOCK_I] tile of W and one group of samples
(grid: tiles of out × tiles of in × groups); it loops over its samples, forms that tile of G_nᵀ X_n with
tl.dot over blocks of T, squares it into its tile of the group's partial Fisher and writes the tile's Σ of
squares to a [N, tiles] buffer. The partial Fishers [groups, out, in] and the norms' tiles are summed
afterwards by torch in a fixed order: deterministic, unlike atomics. Groups exist so that a small layer
(width 128: 4-16 tiles) still fills a GPU; they are capped at ~PROGRAMS programs in all, so the partial
Fishers stay under PROGRAMS × BLOCK_O × BLOCK_I numbers (8.6 MB). Offsets are 64-bit: N × T × in and
groups × out × in pass 2³¹ at GPT-2 / Llama sizes. The work is that of the mini-batch gradient Σ_n G_nᵀ X_n.

The norms alone have a Gram ("ghost norm") form that needs no [out, in] tile at all:

    ‖G_nᵀ X_n‖²_F = Σ_{t,s} (x_t · x_s)(g_t · g_s) = sum(X_n X_nᵀ ⊙ G_n G_nᵀ)

costing T²(in + out) multiply-adds per sample instead of T·in·out, and holding 2T² numbers instead of
in·out: per_sample_grad_norms uses it when 2T² < in·out (two batched matmuls, cuBLAS or CPU BLAS; no Triton
needed), else the tile path. The Fisher itself needs the tiles.

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
PROGRAMS = 528   # programs to aim for: 4 per SM of an H100 (132 SMs); the sample groups fill up to it
SAMPLES = 8      # samples per chunk in the twin: it holds SAMPLES × out × in per-sample gradients
GRAM_NUMBERS = 1 << 24  # Gram path: samples per chunk such that the two [S, T, T] Grams hold ~this many fp32


@triton.jit
def _fisher_kernel(x_ptr, g_ptr, fisher_ptr, partial_ptr, N, T, IN, OUT, per_group,
                   x_sn, x_st, g_sn, g_st,
                   BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, UPCAST: tl.constexpr):
    pid_o, pid_i, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    fisher = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    n0 = pid_n * per_group
    for n in range(n0, tl.minimum(n0 + per_group, N)):
        n64 = tl.cast(n, tl.int64)  # (the interpreter hands out n as a Python int, the compiler as an i32)
        x_n = x_ptr + n64 * x_sn
        g_n = g_ptr + n64 * g_sn
        grad = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)  # this tile of G_nᵀ X_n
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t64 = t.to(tl.int64)
            gt = tl.load(g_n + t64[None, :] * g_st + o[:, None], mask=(o[:, None] < OUT) & (t[None, :] < T), other=0.0)
            xt = tl.load(x_n + t64[:, None] * x_st + i[None, :], mask=(t[:, None] < T) & (i[None, :] < IN), other=0.0)
            if UPCAST:  # the Triton 3.9 interpreter multiplies bf16 tiles as raw integers; fp32 there
                gt, xt = gt.to(tl.float32), xt.to(tl.float32)
            grad = tl.dot(gt, xt, grad)  # [BLOCK_O, BLOCK_T] @ [BLOCK_T, BLOCK_I]
        sq = grad * grad  # out-of-range rows and columns are 0: masked loads
        fisher += sq
        tile = n64 * tl.num_programs(0) * tl.num_programs(1) + pid_o * tl.num_programs(1) + pid_i
        tl.store(partial_ptr + tile, tl.sum(sq))
    fisher_ptr += pid_n.to(tl.int64) * OUT * IN  # this group's partial Fisher
    tl.store(fisher_ptr + o[:, None].to(tl.int64) * IN + i[None, :], fisher, mask=(o[:, None] < OUT) & (i[None, :] < IN))


def _groups(N, tiles):
    """(samples per group, groups): enough groups that tiles × groups reaches PROGRAMS, at most N."""
    per_group = triton.cdiv(N, max(1, min(N, triton.cdiv(PROGRAMS, tiles))))
    return per_group, triton.cdiv(N, per_group)


def per_sample_grad_sq(x, g):
    """x [N,T,in], g [N,T,out] -> (fisher [out,in] fp32 = Σ_n (g_nᵀ x_n)², sq_norms [N] fp32); Triton."""
    assert HAVE_TRITON, "per_sample_grad_sq needs Triton; per_sample_grad_sq_ref is the PyTorch twin"
    for t in (x, g):
        assert t.dtype in (torch.float32, torch.bfloat16), f"fp32 or bf16 inputs only, got {t.dtype}"
    x, g = x.contiguous(), g.contiguous()
    (N, T, IN), OUT = x.shape, g.shape[2]
    tiles = (triton.cdiv(OUT, BLOCK_O), triton.cdiv(IN, BLOCK_I))
    per_group, groups = _groups(N, tiles[0] * tiles[1])
    fisher = torch.empty(groups, OUT, IN, device=x.device, dtype=torch.float32)
    partial = torch.empty(N, tiles[0] * tiles[1], device=x.device, dtype=torch.float32)
    _fisher_kernel[(*tiles, groups)](x, g, fisher, partial, N, T, IN, OUT, per_group,
                                     x.stride(0), x.stride(1), g.stride(0), g.stride(1),
                                     BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I, BLOCK_T=BLOCK_T,
                                     UPCAST=os.environ.get("TRITON_INTERPRET") == "1")
    return fisher.sum(0), partial.sum(1)


def per_sample_grad_sq_ref(x, g):
    """PyTorch twin of per_sample_grad_sq: per-sample gradients SAMPLES at a time."""
    N, OUT, IN = x.shape[0], g.shape[2], x.shape[2]
    fisher = torch.zeros(OUT, IN, device=x.device, dtype=torch.float32)
    sq_norms = torch.empty(N, device=x.device, dtype=torch.float32)
    for s in range(0, N, SAMPLES):
        sq = torch.bmm(g[s:s + SAMPLES].float().transpose(1, 2), x[s:s + SAMPLES].float()).square_()
        fisher += sq.sum(0)
        sq_norms[s:s + SAMPLES] = sq.sum((1, 2))
    return fisher, sq_norms


def per_sample_grad_norms(x, g, tile_path=per_sample_grad_sq_ref):
    """‖g_nᵀ x_n‖²_F [N] fp32: the Gram form sum(X_n X_nᵀ ⊙ G_n G_nᵀ) when 2T² < in·out (less memory than a
    tile of per-sample gradients, and less work when T(in + out) < in·out), else tile_path(x, g)'s norms."""
    (N, T, IN), OUT = x.shape, g.shape[2]
    if 2 * T * T >= IN * OUT:
        return tile_path(x, g)[1]
    out = torch.empty(N, device=x.device, dtype=torch.float32)
    step = max(1, GRAM_NUMBERS // (2 * T * T))
    for s in range(0, N, step):
        xs, gs = x[s:s + step].float(), g[s:s + step].float()
        out[s:s + step] = (xs @ xs.transpose(1, 2) * (gs @ gs.transpose(1, 2))).sum((1, 2))
    return out
