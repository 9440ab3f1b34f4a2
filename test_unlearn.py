# Tests of kernels/: the Triton kernels against their PyTorch twins and against independent references.
# Without CUDA the kernels run under the Triton interpreter on the CPU, which is read when @triton.jit
# decorates: TRITON_INTERPRET must be set before kernels (or anything importing triton) is imported.
import json
import math
import os
import re
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F

import kernels
from model import GPT, GPTConfig
from kernels import fisher as kfisher
from kernels import kl as kkl
from kernels import loss as kloss

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not kernels.HAVE_TRITON, reason="Triton is not installed")


def rel(a, b):
    """Max abs difference, relative to the largest entry of the reference."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture
def small_blocks(monkeypatch):
    # 32-token chunks and 256-wide vocabulary steps, so that N = 70 and V = 1001 leave ragged edges
    for module in (kloss, kkl):
        monkeypatch.setattr(module, "CHUNK", 32)
        monkeypatch.setattr(module, "BLOCK_V", 256)


# ----------------------------------------------------------------------------- loss

def independent_loss(hidden, weight, targets, loss):
    """All N x V logits at once, the runner-up by topk: nothing shared with the twin. fp32 logits from the
    (upcast) inputs, as the kernels form them from bf16 inputs."""
    z = hidden.float() @ weight.float().T
    valid = targets != -100
    y = torch.where(valid, targets, 0)
    logp = z.log_softmax(-1)
    if loss == "ce":
        out = -logp.gather(1, y[:, None])[:, 0]
    else:
        r = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).topk(1).indices
        out = 1 + logp.gather(1, y[:, None])[:, 0].exp() - logp.gather(1, r)[:, 0].exp()
    return torch.where(valid, out, 0.0)


def loss_and_grads(fn, hidden, weight, targets, loss, w):
    h = hidden.detach().clone().requires_grad_()
    W = weight.detach().clone().requires_grad_()
    out = fn(h, W, targets, loss)
    (out * w).sum().backward()  # non-uniform (and negative) per-token upstream gradients
    return out.detach(), h.grad, W.grad


# tolerances: (values, absolute) and (grads, relative to the largest entry). bf16: dL/dz is stored in
# bf16 and multiplied in bf16, ~0.5% per entry; the Triton interpreter also truncates fp32 -> bf16 where
# a GPU rounds to nearest, which doubles that. Seen on the CPU: ~1e-2 on the grads, < 1e-6 on the values.
# On a GPU the unchunked bf16 matmul of the independent reference may round a logit differently: looser.
TOL = {torch.float32: dict(twin=(1e-4, 1e-5), indep=(1e-4, 1e-4)),
       torch.bfloat16: dict(twin=(1e-4, 3e-2), indep=(5e-2, 3e-2))}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["ce", "ih"])
def test_linear_loss(small_blocks, loss, dtype):
    torch.manual_seed(0)
    N, H, V = 70, 48, 1001
    hidden = torch.randn(N, H, device=DEV).to(dtype)
    weight = (0.3 * torch.randn(V, H, device=DEV)).to(dtype)
    targets = torch.randint(0, V, (N,), device=DEV)
    targets[::9] = -100
    w = torch.randn(N, device=DEV)
    k = loss_and_grads(kernels.fused_linear_loss, hidden, weight, targets, loss, w)
    t = loss_and_grads(kernels.fused_linear_loss_ref, hidden, weight, targets, loss, w)
    i = loss_and_grads(independent_loss, hidden, weight, targets, loss, w)
    assert k[0].dtype == torch.float32 and k[0].shape == (N,)
    assert (k[0][::9] == 0).all() and (t[0][::9] == 0).all()
    for ref, name in ((t, "twin"), (i, "indep")):
        atol, gtol = TOL[dtype][name]
        assert (k[0] - ref[0]).abs().max() < atol, name
        assert rel(k[1], ref[1]) < gtol and rel(k[2], ref[2]) < gtol, name
    assert rel(t[1], i[1]) < TOL[dtype]["indep"][1] and rel(t[2], i[2]) < TOL[dtype]["indep"][1]
    if loss == "ih":
        assert (k[0] >= 0).all() and (k[0] <= 2).all()


@needs_triton
@pytest.mark.parametrize("fn", [kernels.fused_linear_loss, kernels.fused_linear_loss_ref])
def test_ih_logit_gradient_and_ties(monkeypatch, fn):
    # weight = I makes the logits exactly the hidden states, so dL/dhidden = dL/dz: test the formula itself
    monkeypatch.setattr(kloss, "BLOCK_V", 16)  # V = 40: three vocabulary steps per row
    torch.manual_seed(1)
    N, V = 8, 40
    z = 3 * torch.randn(N, V, device=DEV)
    y = torch.randint(0, V, (N,), device=DEV)
    y[0], y[1], y[2] = 5, 30, -100
    z[0, 5] = z[0, 33] = z[0].max() + 1  # tie, target first, runner-up in another block
    z[1, 30] = z[1, 2] = z[1].max() + 1  # tie, runner-up first
    w = torch.rand(N, device=DEV) + 0.5
    _, dz, _ = loss_and_grads(fn, z, torch.eye(V, device=DEV), y, "ih", w)
    ih = fn(z, torch.eye(V, device=DEV), y, "ih")
    assert ih[0] == 1 and ih[1] == 1 and ih[2] == 0
    assert ((ih >= 0) & (ih <= 2)).all() and torch.isfinite(dz).all()
    # p_y (e_y − p) − p_v* (e_v* − p), v* = argmax over v ≠ y
    p = z.softmax(-1)
    yc = y.clamp(min=0)
    r = z.scatter(1, yc[:, None], float("-inf")).argmax(-1)
    e_y, e_r = F.one_hot(yc, V).float(), F.one_hot(r, V).float()
    p_y, p_r = p.gather(1, yc[:, None]), p.gather(1, r[:, None])
    expect = (p_y * (e_y - p) - p_r * (e_r - p)) * w[:, None]
    expect[2] = 0
    assert r[0] == 33 and r[1] == 2
    assert (dz - expect).abs().max() < 1e-6


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_stats(small_blocks, dtype):
    torch.manual_seed(2)
    N, H, V = 70, 48, 1001
    weight = (0.3 * torch.randn(V, H, device=DEV)).to(dtype)
    targets = torch.randint(0, V, (N,), device=DEV)
    hidden = torch.randn(N, H, device=DEV)
    hidden[::2] += 2 * weight[targets[::2]].float()  # half the tokens predicted right
    hidden = hidden.to(dtype)
    targets[::7] = -100
    logp, correct = kernels.linear_token_stats(hidden, weight, targets)
    logp_t, correct_t = kernels.linear_token_stats_ref(hidden, weight, targets)
    z = hidden.float() @ weight.float().T
    valid = targets != -100
    y = targets.clamp(min=0)
    logp_i = torch.where(valid, z.log_softmax(-1).gather(1, y[:, None])[:, 0], 0.0)
    correct_i = (z.argmax(-1) == targets) & valid
    assert logp.dtype == torch.float32 and correct.dtype == torch.bool
    assert (correct == correct_t).all()  # same logits, same rule for ties
    assert 10 < correct.sum() < N - 10 and not correct[::7].any() and (logp[::7] == 0).all()
    assert (logp - logp_t).abs().max() < 1e-4
    assert (logp - logp_i).abs().max() < (1e-4 if dtype == torch.float32 else 1e-1)
    if dtype == torch.float32:
        assert (correct == correct_i).all()


@needs_triton
def test_token_stats_ties(monkeypatch):
    # exact ties through weight = I: argmax == target follows torch.argmax (first index wins)
    monkeypatch.setattr(kloss, "BLOCK_V", 16)
    z = torch.randn(4, 40, device=DEV)
    z[:, [3, 25]] = 5.0
    y = torch.tensor([3, 25, 7, -100], device=DEV)
    logp, correct = kernels.linear_token_stats(z, torch.eye(40, device=DEV), y)
    assert correct.tolist() == [True, False, False, False]
    assert correct.tolist() == ((z.argmax(-1) == y) & (y != -100)).tolist()
    assert (logp[:3] - z.log_softmax(-1)[[0, 1, 2], y[:3]]).abs().max() < 1e-6


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["ce", "ih"])
def test_linear_loss_scaled(small_blocks, loss, dtype):
    # scale given: Σ_t scale_t loss_t with the gradients formed in the forward, against the per-token path
    torch.manual_seed(5)
    N, H, V = 40, 24, 600  # still ragged: 32-token chunks, 256-wide vocabulary steps
    hidden = torch.randn(N, H, device=DEV).to(dtype)
    weight = (0.3 * torch.randn(V, H, device=DEV)).to(dtype)
    targets = torch.randint(0, V, (N,), device=DEV)
    targets[::9] = -100
    scale = torch.randn(N, device=DEV)  # negative weights too (GA's −NLL)
    for fn in (kernels.fused_linear_loss, kernels.fused_linear_loss_ref):
        h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        total = fn(h, W, targets, loss, scale=scale)
        (3 * total).backward()  # an upstream gradient other than 1
        _, dh, dW = loss_and_grads(kernels.fused_linear_loss_ref, hidden, weight, targets, loss, 3 * scale)
        ref = (kernels.fused_linear_loss_ref(hidden, weight, targets, loss) * scale).sum()
        assert total.shape == () and total.dtype == torch.float32
        assert (total - ref).abs() < 1e-4 * N
        assert h.grad.dtype == dtype and W.grad.dtype == dtype
        assert rel(h.grad, dh) < TOL[dtype]["twin"][1] and rel(W.grad, dW) < TOL[dtype]["twin"][1], fn.__name__
    with torch.no_grad():  # no grad wanted: the plain forward
        assert (kernels.fused_linear_loss(hidden, weight, targets, loss, scale=scale) - ref).abs() < 1e-4 * N


@pytest.mark.parametrize("fn", [kernels.fused_linear_loss, kernels.fused_linear_loss_ref,
                                kernels.linear_token_stats, kernels.linear_token_stats_ref])
def test_loss_rejects_bad_targets_and_dtypes(fn):
    if not kernels.HAVE_TRITON and fn in (kernels.fused_linear_loss, kernels.linear_token_stats):
        pytest.skip("Triton is not installed")
    h, W = torch.randn(6, 8, device=DEV), torch.randn(20, 8, device=DEV)
    for bad in (20, 25, -1):  # a target >= V would otherwise give loss = lse without complaint
        with pytest.raises(ValueError, match="targets"):
            fn(h, W, torch.tensor([0, 3, bad, 19, -100, 1], device=DEV))
    with pytest.raises(AssertionError, match="fp32 or bf16"):
        fn(h.half(), W.half(), torch.zeros(6, dtype=torch.long, device=DEV))


def test_chunk_rows():
    # the chunk's logits about the size of the hidden states, 256 <= rows <= N
    assert kloss.chunk_rows(8192, 128, 8192) == 256
    assert kloss.chunk_rows(100, 16, 50) == 100
    assert kloss.chunk_rows(1 << 16, 4096, 32000) == 16384 and 16384 * 32000 >= (1 << 16) * 4096


# ----------------------------------------------------------------------------- KL

def independent_kl(hidden, weight, ref_hidden, ref_weight, symmetric=False, bf16_logits=False):
    """All N x V logits at once, autograd for the gradients; fp32 logits from the (upcast) inputs, or rounded
    to bf16 (bf16_logits, what a bf16 matmul returns)."""
    cast = (lambda z: z.bfloat16().float()) if bf16_logits else (lambda z: z)
    logp = cast(hidden.float() @ weight.float().T).log_softmax(-1)
    logq = cast(ref_hidden.detach().float() @ ref_weight.detach().float().T).log_softmax(-1)
    if symmetric:
        return ((logq.exp() - logp.exp()) * (logq - logp)).sum(-1)
    return F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1)


def kl_and_grads(fn, hidden, weight, ref_hidden, ref_weight, w, shared):
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_h = ref_hidden.clone().requires_grad_()  # must get no gradient: the reference is frozen
    out = fn(h, W, ref_h, (None if fn is not independent_kl else W.detach()) if shared else ref_weight)
    (out * w).sum().backward()
    assert ref_h.grad is None or not ref_h.grad.any()
    return out.detach(), h.grad, W.grad


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared", [False, True])
def test_linear_kl(small_blocks, dtype, shared):
    torch.manual_seed(6)
    N, H, V = 40, 24, 600  # 32-token chunks, 256-wide vocabulary steps: ragged at both ends
    hidden = torch.randn(N, H, device=DEV).to(dtype)
    weight = (0.3 * torch.randn(V, H, device=DEV)).to(dtype)
    ref_hidden = (hidden.float() + 0.5 * torch.randn(N, H, device=DEV)).to(dtype)  # close, as θ0 and θ are
    ref_weight = (weight.float() + 0.1 * torch.randn(V, H, device=DEV)).to(dtype)
    w = torch.randn(N, device=DEV)
    args = (hidden, weight, ref_hidden, ref_weight, w, shared)
    k = kl_and_grads(kernels.fused_linear_kl, *args)
    t = kl_and_grads(kernels.fused_linear_kl_ref, *args)
    i = kl_and_grads(independent_kl, *args)
    assert k[0].dtype == torch.float32 and k[0].shape == (N,) and (i[0] > 1e-3).all()
    for ref, name in ((t, "twin"), (i, "indep")):
        atol, gtol = TOL[dtype][name]
        assert (k[0] - ref[0]).abs().max() < atol, name
        assert rel(k[1], ref[1]) < gtol and rel(k[2], ref[2]) < gtol, name
    assert rel(t[1], i[1]) < TOL[dtype]["indep"][1] and rel(t[2], i[2]) < TOL[dtype]["indep"][1]
    # the symmetric form (RUM's holdout proxy): no gradient, same values
    rw = weight if shared else ref_weight
    sym_i = independent_kl(hidden, weight, ref_hidden, rw, symmetric=True)
    for fn in (kernels.fused_linear_kl, kernels.fused_linear_kl_ref):
        sym = fn(hidden.clone().requires_grad_(), weight, ref_hidden, None if shared else ref_weight, symmetric=True)
        assert not sym.requires_grad and (sym - sym_i).abs().max() < TOL[dtype]["indep"][0], fn.__name__
    # KL(q ‖ q) = 0: the model equal to its reference
    same = kernels.fused_linear_kl(hidden[:8], weight, hidden[:8], None)
    assert same.abs().max() < 1e-5


def cosine(a, b):
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def near_reference(seed=3, N=40, H=64, V=600):
    """bf16 inputs of a model a small KL (~1e-3) from its reference, logits of std ~4: their differences are
    smaller than bf16's rounding of a logit (2^-6 at 4 to 8)."""
    torch.manual_seed(seed)
    hidden = torch.randn(N, H, device=DEV).bfloat16()
    weight = (0.5 * torch.randn(V, H, device=DEV)).bfloat16()
    ref_hidden = (hidden.float() + 0.01 * torch.randn(N, H, device=DEV)).bfloat16()
    return hidden, weight, ref_hidden


@pytest.mark.parametrize("fn", [kernels.fused_linear_kl_ref, pytest.param(kernels.fused_linear_kl, marks=needs_triton)])
@pytest.mark.parametrize("shared", [False, True])
def test_linear_kl_bf16_near_the_reference(small_blocks, fn, shared):
    """bf16 inputs, fp32 logits: value and gradient of a small KL match the fp32 computation on the same inputs
    (logits rounded to bf16 instead: cosine ~0.5, KL tens of % off, checked below as the reason for the test)."""
    hidden, weight, ref_hidden = near_reference()
    w = torch.randn(len(hidden), device=DEV)
    args = (w, shared)
    exact = kl_and_grads(independent_kl, hidden.float(), weight.float(), ref_hidden.float(), weight.float(), *args)
    assert 2e-4 < exact[0].mean() < 3e-3
    got = kl_and_grads(fn, hidden, weight, ref_hidden, weight.clone(), *args)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    assert (got[0] - exact[0]).abs().max() < 0.02 * exact[0].abs().max()
    assert cosine(got[1], exact[1]) > 0.99 and cosine(got[2], exact[2]) > 0.99
    rounded = kl_and_grads(__import__("functools").partial(independent_kl, bf16_logits=True),
                           hidden, weight, ref_hidden, weight, w, False)
    assert cosine(rounded[1], exact[1]) < 0.9


@pytest.mark.parametrize("fn", [kernels.fused_linear_loss_ref, pytest.param(kernels.fused_linear_loss, marks=needs_triton)])
@pytest.mark.parametrize("loss", ["ce", "ih"])
def test_linear_loss_bf16_against_fp32(small_blocks, fn, loss):
    """CE and IH from bf16 inputs (fp32 logits) against the fp32 computation on the same inputs."""
    hidden, weight, _ = near_reference()
    targets = torch.randint(0, weight.shape[0], (len(hidden),), device=DEV)
    w = torch.randn(len(hidden), device=DEV)
    exact = loss_and_grads(independent_loss, hidden.float(), weight.float(), targets, loss, w)
    got = loss_and_grads(fn, hidden, weight, targets, loss, w)
    assert (got[0] - exact[0]).abs().max() < 1e-3
    assert cosine(got[1], exact[1]) > 0.99 and cosine(got[2], exact[2]) > 0.99


def test_dispatchers_under_autocast(small_blocks):
    """Under autocast the dispatchers give the kernels bf16 inputs (mixed fp32 / bf16 is what a model with fp32
    master weights and a bf16 reference hands them) and the kernels keep their fp32 logits."""
    hidden, weight, ref_hidden = near_reference()
    with torch.autocast(DEV, dtype=torch.bfloat16):
        kl = kernels.linear_kl(hidden.float(), weight.float(), ref_hidden, weight)
        ce = kernels.linear_loss(hidden.float(), weight, torch.zeros(len(hidden), dtype=torch.long, device=DEV))
    assert torch.equal(kl, kernels.linear_kl(hidden, weight, ref_hidden, weight))
    assert torch.equal(ce, kernels.linear_loss(hidden, weight, torch.zeros(len(hidden), dtype=torch.long, device=DEV)))


def test_linear_kl_dispatch(small_blocks):
    h, W, hr = torch.randn(40, 16), torch.randn(101, 16), torch.randn(40, 16)
    assert torch.equal(kernels.linear_kl(h, W, hr, W), kernels.fused_linear_kl_ref(h, W, hr, None))
    assert torch.equal(kernels.linear_kl(h, W, hr, 2 * W, symmetric=True),
                       kernels.fused_linear_kl_ref(h, W, hr, 2 * W, symmetric=True))


# ----------------------------------------------------------------------------- Fisher

def independent_fisher(x, g):
    """One autograd backward per sample: W.grad = g_nᵀ x_n."""
    fisher, sq = 0, []
    for xn, gn in zip(x.float(), g.float()):
        W = torch.zeros(g.shape[2], x.shape[2], device=x.device, requires_grad=True)
        (xn @ W.T).backward(gn)
        fisher = fisher + W.grad ** 2
        sq.append((W.grad ** 2).sum())
    return fisher, torch.stack(sq)


@needs_triton
@pytest.mark.parametrize("dtype,programs", [(torch.float32, 1), (torch.float32, 8), (torch.bfloat16, 528)])
def test_fisher(monkeypatch, dtype, programs):
    # 2 x 2 tiles; PROGRAMS 1: one group of 5 samples; 8: groups of 3 and 2 (ragged); 528: one sample each
    monkeypatch.setattr(kfisher, "PROGRAMS", programs)
    torch.manual_seed(3)
    N, T, IN, OUT = 5, 37, 80, 72  # not multiples of the 64 x 64 tiles or the 32-token steps
    x = torch.randn(N, T, IN, device=DEV).to(dtype)
    g = torch.randn(N, T, OUT, device=DEV).to(dtype)
    x[1, 30:], g[1, 30:] = 0, 0  # padding tokens
    g[3] = 0                     # a sample with no gradient at all
    fisher, sq = kernels.per_sample_grad_sq(x, g)
    fisher_t, sq_t = kernels.per_sample_grad_sq_ref(x, g)
    fisher_i, sq_i = independent_fisher(x, g)
    assert fisher.shape == (OUT, IN) and sq.shape == (N,) and fisher.dtype == sq.dtype == torch.float32
    tol = 1e-2 if DEV == "cuda" else 1e-5  # on a GPU, tl.dot takes fp32 tiles in tf32
    for f, s in ((fisher_t, sq_t), (fisher_i, sq_i)):
        assert rel(fisher, f) < tol and rel(sq, s) < tol
    assert sq[3] == 0
    # padding more tokens with zeros changes nothing
    pad = lambda a: torch.cat([a, torch.zeros_like(a[:, :9])], 1)
    fisher_p, sq_p = kernels.per_sample_grad_sq(pad(x), pad(g))
    assert rel(fisher_p, fisher) < 1e-6 and rel(sq_p, sq) < 1e-6


def test_grad_norms_gram(monkeypatch):
    # the Gram ("ghost norm") form where 2T² < in·out, the tile path's norms elsewhere; padding rows are 0
    monkeypatch.setattr(kfisher, "GRAM_NUMBERS", 2 * 2 * 7 * 7)  # two samples per Gram chunk: 5 = 2 + 2 + 1
    torch.manual_seed(7)
    for T, IN, OUT in ((7, 12, 9), (9, 4, 5)):  # 98 < 108: Gram; 162 >= 20: tiles
        x, g = torch.randn(5, T, IN, device=DEV), torch.randn(5, T, OUT, device=DEV)
        x[2, 4:], g[2, 4:] = 0, 0
        _, sq_i = independent_fisher(x, g)
        for tile_path in (kernels.per_sample_grad_sq_ref, kernels.per_sample_grad_sq):
            if tile_path is kernels.per_sample_grad_sq and (not kernels.HAVE_TRITON or 2 * T * T < IN * OUT):
                continue
            assert rel(kernels.per_sample_grad_norms(x, g, tile_path), sq_i) < 1e-5
        assert rel(kernels.grad_norms(x.to(torch.bfloat16), g.to(torch.bfloat16)), sq_i) < 3e-2


def test_fisher_twin_chunks(monkeypatch):
    monkeypatch.setattr(kfisher, "SAMPLES", 2)  # 5 samples: chunks of 2, 2, 1
    x, g = torch.randn(5, 7, 12), torch.randn(5, 7, 9)
    fisher, sq = kernels.per_sample_grad_sq_ref(x, g)
    fisher_i, sq_i = independent_fisher(x, g)
    assert rel(fisher, fisher_i) < 1e-5 and rel(sq, sq_i) < 1e-5


def per_sample_loop_fisher(model, split, layers):
    """The naive way: one backward per sample of its mean NLL, its weight gradients squared."""
    fisher, sq = {m: 0 for m in layers}, []
    for n in range(len(split)):
        model.zero_grad(set_to_none=True)
        h, y = model(split.x[n:n + 1]), split.y[n]
        logits = (h[0] @ model.lm_head.weight.T)[y != -100]
        F.cross_entropy(logits, y[y != -100]).backward()
        for m in layers:
            fisher[m] = fisher[m] + m.weight.grad ** 2
        sq.append(sum((m.weight.grad ** 2).sum() for m in layers))
    model.zero_grad(set_to_none=True)
    return {m: f / len(split) for m, f in fisher.items()}, torch.stack(sq)


@pytest.mark.parametrize("path", ["twins", "kernels"])
def test_fisher_of_model_against_per_sample_loop(monkeypatch, path):
    import numpy as np
    import unlearn
    if path == "kernels":
        if not kernels.HAVE_TRITON:
            pytest.skip("Triton is not installed")
        monkeypatch.setattr(unlearn, "grad_sq", kernels.per_sample_grad_sq)
    torch.manual_seed(8)
    model = GPT(GPTConfig(block_size=16, vocab_size=29, n_layer=1, n_head=2, n_embd=16)).to(DEV)
    rows = np.random.default_rng(0).integers(0, 29, (5, 13))
    kind = (np.arange(13)[None] < np.array([13, 9, 13, 4, 11])[:, None]).astype(np.uint8)
    kind[:, 0] = 0
    split = unlearn.Split(rows, kind, DEV)  # padded rows: ignored targets
    layers = model.lora_layers()
    fisher_i, sq_i = per_sample_loop_fisher(model, split, layers)
    fisher, sq = unlearn.fisher(model, split, layers, batch_size=2)  # batches of 2, 2, 1
    assert set(fisher) == set(layers)
    for m in layers:
        assert rel(fisher[m], fisher_i[m]) < (1e-2 if DEV == "cuda" else 1e-4)
    assert rel(sq, sq_i) < (1e-2 if DEV == "cuda" else 1e-4)
    none, sq_g = unlearn.fisher(model, split, layers, batch_size=2, diag=False)  # Gram norms where cheaper
    assert none is None and rel(sq_g, sq_i) < 1e-4
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- dispatch, import, compile

def test_dispatchers_use_twins_on_cpu(small_blocks):
    torch.manual_seed(4)
    h, W, y = torch.randn(40, 16), torch.randn(101, 16), torch.randint(0, 101, (40,))
    assert torch.equal(kernels.linear_loss(h, W, y, "ih"), kernels.fused_linear_loss_ref(h, W, y, "ih"))
    assert all(torch.equal(a, b) for a, b in zip(kernels.token_stats(h, W, y), kernels.linear_token_stats_ref(h, W, y)))
    x, g = torch.randn(3, 5, 8), torch.randn(3, 5, 6)
    assert all(torch.equal(a, b) for a, b in zip(kernels.grad_sq(x, g), kernels.per_sample_grad_sq_ref(x, g)))


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
            "import torch, kernels\n"
            "assert not kernels.HAVE_TRITON\n"
            "h = torch.randn(10, 8, requires_grad=True)\n"
            "kernels.linear_loss(h, torch.randn(50, 8), torch.randint(0, 50, (10,)), 'ih').sum().backward()\n"
            "kernels.grad_sq(torch.randn(2, 3, 4), torch.randn(2, 3, 5))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env,
                   cwd=os.path.dirname(os.path.abspath(kernels.__file__)) + "/..")


COMPILE_ALL = """
import sys, warnings; warnings.simplefilter("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import fisher, kl, loss

def compile(kernel, sig, consts, num_warps):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    for arch in (80, 90):  # A100, H100
        triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=num_warps))

# every variant the launchers can ask for: each input dtype, each constexpr flag and block size, num_warps
rows = dict(z_stride="i32", y_ptr="*i64", lse_ptr="*fp32", zy_ptr="*fp32", zr_ptr="*fp32", r_ptr="*i32",
            V="i32", ignore_index="i32")
for dt in ("fp32", "bf16"):
    compile(loss._stats_kernel, dict(z_ptr=f"*{dt}", **rows), dict(BLOCK_V=loss.BLOCK_V), 8)
    for ih in (False, True):
        compile(loss._grad_kernel, dict(z_ptr=f"*{dt}", g_ptr="*fp32", **rows), dict(IH=ih, BLOCK_V=loss.BLOCK_V), 8)
    pair = dict(z_ptr=f"*{dt}", zr_ptr=f"*{dt}", z_stride="i32", zr_stride="i32")
    compile(kl._kl_stats_kernel, dict(**pair, lse_ptr="*fp32", lse_ref_ptr="*fp32", kl_ptr="*fp32", sym_ptr="*fp32",
                                      V="i32"), dict(BLOCK_V=kl.BLOCK_V), 8)
    compile(kl._kl_grad_kernel, dict(**pair, g_ptr="*fp32", lse_ptr="*fp32", lse_ref_ptr="*fp32", V="i32"),
            dict(BLOCK_V=kl.BLOCK_V), 8)
    # sample strides past 2^31 arrive as i64; one sample per group arrives as the constant 1 (specialized)
    for stride, per_group in (("i32", "i32"), ("i64", 1)):
        sig = dict(x_ptr=f"*{dt}", g_ptr=f"*{dt}", fisher_ptr="*fp32", partial_ptr="*fp32", N="i32", T="i32",
                   IN="i32", OUT="i32", x_sn=stride, x_st="i32", g_sn=stride, g_st="i32")
        consts = dict(BLOCK_O=fisher.BLOCK_O, BLOCK_I=fisher.BLOCK_I, BLOCK_T=fisher.BLOCK_T, UPCAST=False)
        if per_group == 1:
            consts["per_group"] = 1
        else:
            sig["per_group"] = per_group
        sig = {k: sig[k] for k in ("x_ptr", "g_ptr", "fisher_ptr", "partial_ptr", "N", "T", "IN", "OUT", "per_group",
                                   "x_sn", "x_st", "g_sn", "g_st") if k in sig}
        compile(fisher._fisher_kernel, sig, consts, 4)
print("compiled")
"""


@needs_triton
@pytest.mark.skipif(DEV == "cuda", reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_h100():
    # The interpreter does not type-check like the compiler: compile every kernel variant to sm_80 and sm_90 code
    # (Triton ships ptxas, no GPU needed). In a fresh process: once the interpreter has run, it has patched
    # triton.language for the whole process. Uses Triton internals, hence a skip if they moved.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE_ALL], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(kernels.__file__)) + "/..")
    if run.returncode and "ImportError" in run.stderr:
        pytest.skip(f"Triton internals moved: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0 and run.stdout.strip() == "compiled", run.stderr


# ---- model.py ----------------------------------------------------------------------------------------
from model import GPT, GPTConfig  # noqa: E402


@pytest.fixture
def single_thread():
    """The model tests run thousands of tiny ops: with 2 threads on a shared machine, every op can wait for a
    descheduled OpenMP worker (seen: 8 s instead of 0.03 s for one generate()). One thread for them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


one_thread = pytest.mark.usefixtures("single_thread")


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=24, vocab_size=37, n_layer=2, n_head=2, n_embd=16)).eval()


@one_thread
def test_kv_cache_generation_equals_full_recomputation():
    model = tiny_gpt()
    idx = torch.randint(0, 37, (3, 5))
    out = model.generate(idx, 10)
    ref = idx
    for _ in range(10):  # no cache: recompute the whole sequence each step
        ref = torch.cat([ref, model.lm_head(model(ref)[:, -1]).argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


@one_thread
def test_lora_merge_and_remove():
    model = tiny_gpt()
    x = torch.randint(0, 37, (2, 8))
    for m in model.lora_layers():
        m.add_lora(4, 8)
        torch.nn.init.normal_(m.lora_B)
    with_adapter = model(x)
    for m in model.lora_layers():
        m.merge()
    assert torch.allclose(model(x), with_adapter, atol=1e-5)
    for m in model.lora_layers():
        m.remove_lora()  # merged: the function stays
    assert torch.allclose(model(x), with_adapter, atol=1e-5)
    assert not torch.allclose(with_adapter, tiny_gpt()(x), atol=1e-3)
    fresh = tiny_gpt()
    for m in fresh.lora_layers():
        m.add_lora(4, 8)
        torch.nn.init.normal_(m.lora_B)
        m.remove_lora()  # not merged: the layer as it was
    assert torch.allclose(fresh(x), tiny_gpt()(x), atol=1e-5)


# Real checkpoints: for each family a random transformers model saved to a folder stands in for the hub one.
# Weights drawn with std 0.3 (norms around 1) so that attention is far from uniform and the logits peaked:
# a wrong mask, scale or rotary layout changes the argmax, not just the 6th digit.
FAMILIES = {
    "gpt2": ("GPT2LMHeadModel", dict(n_positions=64, n_embd=32, n_layer=2, n_head=4, vocab_size=101,
                                     bos_token_id=0, eos_token_id=0)),
    "gpt_neo": ("GPTNeoForCausalLM", dict(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, window_size=5,
                                          attention_types=[[["global", "local"], 1]], max_position_embeddings=64,
                                          bos_token_id=0, eos_token_id=0)),
    "llama": ("LlamaForCausalLM", dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
                                       tie_word_embeddings=False, max_position_embeddings=64)),
    "llama3": ("LlamaForCausalLM", dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                                        max_position_embeddings=64, rope_theta=10000.0, rope_scaling=dict(
                                            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=16))),
    # transformers' bias fields, one at a time: attention_bias on q, k, v and o; mlp_bias on gate, up and down
    "llama_attention_bias": ("LlamaForCausalLM", dict(vocab_size=101, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                      max_position_embeddings=64, attention_bias=True)),
    "llama_mlp_bias": ("LlamaForCausalLM", dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                                max_position_embeddings=64, mlp_bias=True)),
}


def hf_checkpoint(family, folder):
    """(transformers model, folder it was saved to), random weights with std 0.3."""
    transformers = pytest.importorskip("transformers")
    cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    hf = getattr(transformers, cls)(getattr(transformers, cls.replace("LMHeadModel", "Config")
                                            .replace("ForCausalLM", "Config"))(**kwargs)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if re.search(r"(norm|ln_.*)\.weight$", name):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    hf.save_pretrained(folder)
    return hf, str(folder)


def logits(model, x):
    with torch.no_grad():
        return model.lm_head(model(x))


@one_thread
@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_matches_transformers(family, tmp_path):
    hf, folder = hf_checkpoint(family, tmp_path)
    model = GPT.from_pretrained(folder)
    x = torch.randint(0, 101, (3, 24))
    hf.set_attn_implementation("eager")  # to see its attention weights
    with torch.no_grad():
        out = hf(x, output_attentions=True)
    ref = out.logits
    assert rel(logits(model, x), ref) < 1e-5
    for a in out.attentions:  # far from uniform: past position 8, uniform weights would be <= 1/9
        assert a.max(-1).values[..., 8:].mean() > 0.3
    assert model.config.tie_embeddings == (model.lm_head.weight is model.transformer.wte.weight)
    if family == "llama":  # the sharded form: model.safetensors.index.json and its shards
        hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
        assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
        assert torch.equal(logits(GPT.from_pretrained(str(tmp_path / "sharded")), x), logits(model, x))
    if family == "llama3":  # the scaling is not a no-op here: without it the logits move
        plain = GPT.from_pretrained(folder)
        plain.config.rope_scaling = None  # before its first forward: the model keeps its RoPE tables
        assert rel(logits(plain, x), ref) > 1e-2


@one_thread
@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_generation_matches_transformers_greedy(family, tmp_path):
    """Our greedy decoding on the KV cache = transformers' greedy decoding by full recomputation (a loop by
    hand, not hf.generate), 18 new tokens: well past GPT-Neo's window of 5."""
    hf, folder = hf_checkpoint(family, tmp_path)
    model = GPT.from_pretrained(folder)
    idx = torch.randint(0, 101, (2, 6))
    ref = idx
    with torch.no_grad():
        for _ in range(18):
            ref = torch.cat([ref, hf(ref).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(model.generate(idx, 18), ref)


def add_adapters(model):
    """LoRA with nonzero B on every linear."""
    torch.manual_seed(1)
    for m in model.lora_layers():
        m.add_lora(2, 4)
        torch.nn.init.normal_(m.lora_B, std=0.1)


@one_thread
@pytest.mark.parametrize("family", list(FAMILIES) + ["scratch"])
def test_save_pretrained_round_trip(family, tmp_path):
    """save_pretrained (LoRA merged on the way out) then transformers' own loading: the same logits; the
    checkpoint's config fields are kept; the model in memory is left unmerged."""
    transformers = pytest.importorskip("transformers")
    if family == "scratch":  # a from-scratch GPT-2-style model gets a synthesized GPT-2 config
        model = tiny_gpt()
    else:
        _, folder = hf_checkpoint(family, tmp_path / "src")
        model = GPT.from_pretrained(folder)
    add_adapters(model)
    x = torch.randint(0, model.config.vocab_size, (2, 20))
    ours = logits(model, x)
    model.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == (["out"] if family == "scratch" else ["out", "src"])  # no leftovers
    assert not any(m.merged for m in model.lora_layers()) and torch.equal(logits(model, x), ours)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert rel(reloaded(x).logits, ours) < 1e-5
    if family != "scratch":
        saved = json.load(open(tmp_path / "out" / "config.json"))
        source = json.load(open(tmp_path / "src" / "config.json"))
        assert {k: v for k, v in saved.items() if k != "dtype"} == {k: v for k, v in source.items() if k != "dtype"}
    model.save_pretrained(tmp_path / "out")  # over an existing folder: replaced whole
    assert sorted(os.listdir(tmp_path / "out")) == sorted(["config.json", "model.safetensors"] + (
        ["generation_config.json"] if family != "scratch" else []))


@one_thread
def test_bf16_load_and_save(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    _, folder = hf_checkpoint("llama", tmp_path / "src")
    model = GPT.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = torch.randint(0, 101, (2, 12))
    ref = logits(GPT.from_pretrained(folder), x)
    assert rel(logits(model, x), ref) < 0.1  # bf16 rounding, not a different model

    def saved_dtypes(folder):
        with safetensors.safe_open(folder / "model.safetensors", "pt") as f:
            return {f.get_tensor(k).dtype for k in f.keys()}, json.load(open(folder / "config.json"))["dtype"]
    # by default the checkpoint's own dtype (fp32 here), whatever the model computed in; or the one asked for
    model.save_pretrained(tmp_path / "own")
    assert saved_dtypes(tmp_path / "own") == ({torch.float32}, "float32")
    model.save_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert saved_dtypes(tmp_path / "out") == ({torch.bfloat16}, "bfloat16")
    # a bf16 checkpoint trained with fp32 master weights goes out in bf16 again
    master = GPT.from_pretrained(tmp_path / "out")
    assert {p.dtype for p in master.parameters()} == {torch.float32}
    master.save_pretrained(tmp_path / "again")
    assert saved_dtypes(tmp_path / "again") == ({torch.bfloat16}, "bfloat16")


@one_thread
@pytest.mark.parametrize("merged", [False, True])
def test_adapters_off_gives_the_base_model(tmp_path, merged):
    _, folder = hf_checkpoint("llama", tmp_path)
    model = GPT.from_pretrained(folder)
    x = torch.randint(0, 101, (2, 12))
    base = logits(model, x)
    add_adapters(model)
    for b in model.transformer.h:  # an EUL-style layer after the MLP
        b.adapter = torch.nn.Linear(32, 32)
    if merged:
        for m in model.lora_layers():
            m.merge()
    adapted = logits(model, x)
    assert rel(adapted, base) > 1e-2
    with model.adapters_off():
        assert rel(logits(model, x), base) < 1e-5
        with model.adapters_off():  # nested: still off after the inner one ends
            pass
        assert rel(logits(model, x), base) < 1e-5
    assert torch.equal(logits(model, x), adapted)
    with pytest.raises(ValueError, match="EUL"):
        model.save_pretrained(tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


@one_thread
def test_activation_checkpointing_same_gradients(tmp_path):
    _, folder = hf_checkpoint("gpt_neo", tmp_path)
    x = torch.randint(0, 101, (2, 12))
    grads = []
    for ckpt in (False, True):
        model = GPT.from_pretrained(folder).train()
        model.checkpointing = ckpt
        model.lm_head(model(x)).logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


@one_thread
def test_from_pretrained_bad_input(tmp_path):
    _, folder = hf_checkpoint("gpt2", tmp_path / "ok")
    config = json.load(open(os.path.join(folder, "config.json")))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps(dict(config, model_type="bert")))
    with pytest.raises(ValueError, match="'bert' is not supported: only gpt2, gpt_neo, llama"):
        GPT.from_pretrained(str(tmp_path / "bert"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        GPT.from_pretrained(str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no model.safetensors"):
        GPT.from_pretrained(str(tmp_path / "noweights"))
    with pytest.raises(ValueError, match="cannot download .* pass a local folder"):  # offline here: fast
        GPT.from_pretrained(str(tmp_path / "no-such-folder"))


@one_thread
def test_from_pretrained_reads_every_key(tmp_path):
    """A checkpoint key the model does not read is an error naming it (here a Llama's o_proj bias under a config
    without attention_bias: silently skipped, the logits would be wrong); GPT-2's mask buffers and a stored tied
    lm_head are not weights of their own and load."""
    from safetensors.torch import load_file, save_file
    _, folder = hf_checkpoint("llama", tmp_path / "llama")
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    tensors["model.layers.1.self_attn.o_proj.bias"] = torch.ones(32)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"holds model\.layers\.1\.self_attn\.o_proj\.bias, which this model has no place"):
        GPT.from_pretrained(folder)
    hf, folder = hf_checkpoint("gpt2", tmp_path / "gpt2")
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}  # the hub's gpt2 layout, no prefix
    tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    tensors["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    x = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        assert rel(logits(GPT.from_pretrained(folder), x), hf(x).logits) < 1e-5


# ---- unlearn.py: metrics on hand-made cases ------------------------------------------------------------
import numpy as np  # noqa: E402

import unlearn  # noqa: E402
import metrics  # noqa: E402  (metrics.py: MA, EL, MIA, fluency)
import tofu.metrics as tofu  # noqa: E402  (data/ is on the path: unlearn.py puts it there)
unlearn.people = __import__("importlib").import_module("people.prepare")


def hand_split(rows, lengths, secrets, start=1):
    """A Split from rows, each row's length (positions 1..length-1 are scored) and its secret spans; start 0:
    rows without a bos (TDEC's), whose first token is the record's own and is not scored."""
    kind = np.zeros((len(rows), len(rows[0])), dtype=np.uint8)
    for i, (l, spans) in enumerate(zip(lengths, secrets)):
        kind[i, 1:l] = 1
        for s, e in spans:
            kind[i, s:e] = 3
    return unlearn.Split(np.array(rows), kind, "cpu", start)


class Oracle(torch.nn.Module):
    """A stand-in model that predicts a fixed token sequence: hidden states are one-hot rows and the
    lm_head is the identity, so argmax(logits) at position i is `says[i + 1]` whatever the input."""

    def __init__(self, says, vocab=10):
        super().__init__()
        self.says = torch.tensor(says)
        self.lm_head = torch.nn.Linear(vocab, vocab, bias=False)
        self.lm_head.weight.data = torch.eye(vocab) * 10

    def forward(self, idx):
        return F.one_hot(self.says[1:idx.size(1) + 1], self.lm_head.in_features).float().expand(len(idx), -1, -1)

    def generate(self, idx, max_new_tokens, beams=1):
        return torch.cat([idx, self.says[idx.size(1):idx.size(1) + max_new_tokens].expand(len(idx), -1)], 1)

    def continue_prefixes(self, rows, row, start, steps, budget=None, progress=None):
        return self.says[(start[:, None] + torch.arange(int(steps.max()))).clamp_max(len(self.says) - 1)]


def test_memorization_accuracy_by_hand():
    # one row of 8 tokens, the last two padding: targets are positions 1..5, the model gets 3 of 5 right
    split = hand_split([[0, 1, 2, 3, 4, 5, 9, 9]], [6], [[]])
    stats = metrics.split_stats(Oracle([0, 1, 2, 7, 4, 8, 9, 9]), split)
    assert stats["ma"] == pytest.approx(3 / 5)
    assert stats["count"].item() == 5


def test_extraction_likelihood_by_hand():
    rows = [[0, 1, 2, 3, 4, 5, 6, 7]]
    split = hand_split(rows, [8], [[[3, 5]]])
    el, secrets = metrics.extraction(Oracle(rows[0]), split, n=2)  # a parrot: everything extracted
    assert el.item() == pytest.approx(1.0) and secrets == [[True]]
    el, secrets = metrics.extraction(Oracle([0] * 8), split, n=2)  # never right
    assert el.item() == 0.0 and secrets == [[False]]
    # right but for the last token. Row 0 is bos, then T = 7 tokens: prefixes of p = 1..5 tokens (row prefix
    # t = p + 1), the suffix has 7 - t bigrams, one of them missed: EL_2 = (4/5 + 3/4 + 2/3 + 1/2 + 0/1) / 5;
    # the secret (tokens 3..4) is still reproduced
    el, secrets = metrics.extraction(Oracle([0, 1, 2, 3, 4, 5, 6, 9]), split, n=2)
    assert el.item() == pytest.approx((4 / 5 + 3 / 4 + 2 / 3 + 1 / 2) / 5)
    assert secrets == [[True]]
    # Jang et al. count the generation's n-grams found among the true ones: a loop on the true bigram (2, 3)
    # scores 3 of its 5 bigrams from t = 2 (and 0 after), where "true bigrams found" would give 1/5
    el, _ = metrics.extraction(Oracle([0, 1, 2, 3, 2, 3, 2, 3]), split, n=2)
    assert el.item() == pytest.approx((3 / 5) / 5)


def test_extraction_likelihood_icu_prefixes_by_hand():
    """ICU's EL: prefixes of p >= first tokens only, divided by their count (TDEC: 150..190, / 41), where Jang's
    runs over p = 1..T-n (/ 190); a row without a bos (start 0, TDEC's) counts the record from position 0."""
    per_prefix = [4 / 5, 3 / 4, 2 / 3, 1 / 2, 0 / 1]  # T = 7, n = 2, right but for the last token: p = 1..5
    with_bos = hand_split([[0, 1, 2, 3, 4, 5, 6, 7]], [8], [[]])
    no_bos = hand_split([[1, 2, 3, 4, 5, 6, 7]], [7], [[]], start=0)
    for split, says in ((with_bos, [0, 1, 2, 3, 4, 5, 6, 9]), (no_bos, [1, 2, 3, 4, 5, 6, 9])):
        el_jang = metrics.extraction(Oracle(says), split, n=2)[0].item()
        el_icu = metrics.extraction(Oracle(says), split, n=2, first=3)[0].item()
        assert el_jang == pytest.approx(sum(per_prefix) / 5)       # 0.543
        assert el_icu == pytest.approx(sum(per_prefix[2:]) / 3)    # 0.389: the same model, another EL


from bench import extraction_by_generate  # noqa: E402  (the former metrics.extraction, kept in bench.py as the reference)


# the three families' attention and positions, built directly: GPT-2; GPT-Neo with a local window of 5 (shorter
# than the rows) and no attention scaling; Llama with RoPE (llama3 scaling) and grouped-query attention
FAMILY_CONFIGS = {
    "gpt2": dict(),
    "gpt_neo": dict(qkv_bias=False, fused_qkv=False, window=(0, 5), attn_scale=1.0),
    "llama": dict(bias=False, fused_qkv=False, n_kv_head=1, mlp="swiglu", norm="rmsnorm", pos="rope", rope_theta=500.0,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8), tie_embeddings=False),
}


def peaked_gpt(family):
    """A random model of the family with weights of std 0.3: peaked logits, continuations that differ by prefix."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, vocab_size=11, n_layer=2, n_head=2, n_embd=16, **FAMILY_CONFIGS[family])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.normal_(0, 0.3)
    return model


@one_thread
@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_continue_prefixes_equals_generate_per_prefix(family):
    """Each pair's continuation = generate() on its prefix alone, whatever the chunking (a 3-pair budget)."""
    model = peaked_gpt(family)
    rows = torch.randint(0, 11, (3, 20))
    row, start = torch.tensor([0, 2, 1, 0, 2, 1, 0]), torch.tensor([1, 2, 5, 9, 13, 17, 3])
    steps = torch.tensor([19, 3, 15, 11, 7, 3, 1])  # start + steps <= 20: within the rows
    per_pair = 2 * 2 * 20 * 8 * 4 * 19 // 20  # layers x (k, v) x positions x n_embd x fp32 bytes, for 19 positions
    out = model.continue_prefixes(rows, row, start, steps, budget=3 * per_pair)
    assert out.shape == (7, 19)
    for k in range(7):
        ref = model.generate(rows[row[k:k + 1], :start[k]], int(steps[k]))[0, start[k]:]
        assert torch.equal(out[k, :steps[k]], ref) and (out[k, steps[k]:] == -1).all()


@one_thread
@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_extraction_equals_generate_per_prefix(family):
    """EL_n and the secrets extracted, per sample, equal the former implementation's: rows of different lengths
    (a prefix continues to the split's width there, the score stops at the row's end), secrets at the start,
    inside, and at the end of a row, GPT-Neo windows shorter than the rows, Llama's RoPE."""
    model = peaked_gpt(family)
    torch.manual_seed(1)
    rows = torch.randint(0, 11, (4, 20))
    rows[0] = model.generate(rows[:1, :1], 19)[0]  # a row the model reproduces: EL 1, both secrets out
    rows[1, :8] = rows[0, :8]  # the same beginning, then another text: partly reproduced
    split = hand_split(rows.tolist(), [20, 14, 9, 17], [[[1, 3], [10, 12]], [[5, 9]], [], [[14, 17]]])
    for n, first in ((2, 1), (4, 1), (2, 6)):  # Jang's prefixes, and a restricted range (ICU's kind)
        el, extracted = metrics.extraction(model, split, n, first)
        el_ref, extracted_ref = extraction_by_generate(model, split, n, first)
        assert torch.equal(el, el_ref) and extracted == extracted_ref
        assert el[0] == 1.0 and extracted[0] == [True, True] and (first > 1 or 0 < el[1] < 1)


def test_mia_auc_and_ks_by_hand():
    assert metrics.auc([3, 4], [1, 2]) == 1.0 and metrics.auc([1, 2], [3, 4]) == 0.0
    assert metrics.auc([1, 2], [1, 2]) == 0.5
    rng = np.random.default_rng(0)
    assert unlearn.ks_pvalue(rng.normal(size=200), rng.normal(size=200)) > 0.05
    assert unlearn.ks_pvalue(rng.normal(size=200), rng.normal(2, size=200)) < 1e-6


# ---- unlearn.py: the methods on a tiny memorized model ---------------------------------------------------
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--train_epochs=30", "--patience=0", "--epochs=16", "--lr=1e-3",
        "--lora_lr=1e-2", "--eul_lr=1e-1", "--rank=4"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A small instance of the people testbed (8 forget, 40 retain, 16 holdout) and a tiny GPT trained until it
    memorized them, cached in an out dir that the end-to-end tests reuse."""
    root = tmp_path_factory.mktemp("tiny")
    spec = __import__("importlib.util").util.spec_from_file_location("prepare", os.path.join(unlearn.ROOT, "data", "people", "prepare.py"))
    prepare = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    prepare.main(["--n_forget", "8", "--n_retain", "100", "--n_holdout", "16", "--out_dir", str(root / "data" / "people" / "gpt2")])
    argv = TINY + ["--data_dir", str(root / "data"), "--out_dir", str(root / "out"), "--device=cpu"]
    cfg = unlearn.parse_args(argv)
    os.makedirs(cfg.out_dir)
    meta, data = unlearn.load_data(cfg, unlearn.load_tokenizer("gpt2"))
    target, events = unlearn.load_or_train(cfg, meta, data, "target", ("forget", "retain"))
    data["forget"].events = events
    holdout = metrics.split_stats(target, data["holdout"])["ma"]
    return dict(argv=argv, cfg=cfg, meta=meta, data=data, target=target, root=root,
                thresholds={"rule": "rule", "ma": holdout, "el10": 1e-3})


RETAIN_MARGIN = 0.7  # a method may cost retain MA, but must keep at least 70% of it on this tiny model


# SimNPO at open-unlearning's defaults weighs its forget term 1/8 of the retain term, and its push per token is
# divided by the record's length; RMU trains one 64 x 256 matrix of the tiny model: both need a higher rate to
# move within the tiny budget (at 1e-3, 16 epochs: forget MA 0.982 -> 0.980 and 0.982). Its LoRA and FILA
# variants found no rate on the tiny model that forgets without collapse (lora_lr 3e-2: forget MA 0.97 after 40
# epochs; 5e-2 and 1e-1: retain MA 0.03-0.30 within 2 epochs), so this test leaves them out; the other tests
# and the `all` runs on people exercise them.
FAST = {"simnpo": 1e-2, "rmu": 3e-2}


@pytest.mark.parametrize("method", [m for m in unlearn.METHODS if m not in ("simnpo_lora", "simnpo_flora")])
def test_method_forgets_and_keeps(tiny, method):
    """Each method, run until forget MA is 0.15 below the target's (the stopping rule with that level), lowers
    forget MA by at least 0.1 while retain MA keeps RETAIN_MARGIN of its value."""
    cfg, data, target = tiny["cfg"], tiny["data"], tiny["target"]
    cfg = __import__("dataclasses").replace(cfg, lr=FAST.get(method, cfg.lr))
    torch.manual_seed(0)
    model = __import__("copy").deepcopy(target)
    before = {s: metrics.split_stats(target, data[s])["ma"] for s in ("forget", "retain")}
    res = unlearn.apply_method(method, model, target, data["forget"], data["retain"], data, cfg,
                               {"rule": "rule", "ma": before["forget"] - 0.15, "el10": 1.0}, [])
    after = {s: metrics.split_stats(model, data[s])["ma"] for s in ("forget", "retain")}
    assert before["forget"] > 0.85
    assert after["forget"] < before["forget"] - 0.1, (before, after, res["stopped_by"])
    assert after["retain"] >= RETAIN_MARGIN * before["retain"], (before, after)
    assert res["steps"] > 0 and res["trainable_params"] > 0


class Logits(torch.nn.Module):
    """A stand-in model whose hidden states are a leaf tensor (any input) and whose lm_head is the identity:
    its logits are `z` itself, and every gradient lands on z.grad. blocks=: the same z (RMU's inner layer)."""

    def __init__(self, z):
        super().__init__()
        self.z = torch.nn.Parameter(z)
        self.lm_head = torch.nn.Linear(z.size(-1), z.size(-1), bias=False)
        self.lm_head.weight.data = torch.eye(z.size(-1))
        self.lm_head.weight.requires_grad_(False)

    def forward(self, idx, blocks=None):
        return self.z[:len(idx), :idx.size(1)]


def test_simnpo_loss_value_and_gradient_by_hand():
    """SimNPO's forget term where every true token has logit 3 and the others 0: each scored token costs
    m = -log p, p = e³/(e³ + V - 1), so each sample's mean loss is m and the term is γ·(2/β)·softplus(-β·m); its
    gradient on a scored position's true logit is -2γ·(1 - σ(β·m))·(p - 1)/(n·B) > 0 (gradient descent lowers
    the true token), and zero where nothing is scored."""
    V, beta, gamma = 5, 4.5, 0.125
    f = hand_split([[0, 1, 2, 3, 4], [0, 2, 2, 1, 4]], [5, 3], [[], []])  # 4 and 2 scored tokens
    r = hand_split([[0, 3, 3, 3, 3]], [5], [[]])
    z = torch.zeros(2, 4, V)
    z.scatter_(2, f.y.clamp_min(0)[..., None], 3.0)
    model = Logits(z)
    p = math.exp(3) / (math.exp(3) + V - 1)
    m = -math.log(p)
    loss = unlearn.loss_simnpo(model, None, f, r, None)
    retain = unlearn.nll(model, r)  # the retain term reads z[:1] too: take it out
    assert (loss - retain).item() == pytest.approx(gamma * 2 / beta * math.log1p(math.exp(-beta * m)), rel=1e-4)
    g_all = torch.autograd.grad(loss, model.z)[0]
    g = g_all - torch.autograd.grad(unlearn.nll(model, r), model.z)[0]
    push = -2 * gamma * (1 - 1 / (1 + math.exp(-beta * m)))  # dL/dm of one sample, before the mean over B = 2
    for row, n in ((0, 4), (1, 2)):
        for t in range(n):
            y = f.y[row, t].item()
            assert g[row, t, y].item() == pytest.approx(push / 2 / n * (p - 1), rel=1e-3)
            assert g[row, t, y].item() > 0
    assert g[1, 2:].abs().max().item() == 0.0  # not scored: no gradient


def test_rmu_loss_value_and_gradient_by_hand():
    """RMU: γ·d(h_f, c) + α·d(h_r, h_r^θ0), d the mean over the width of the squared difference, averaged over a
    sample's scored positions, then over samples. Its gradient on a forget activation, 2γ(h - c)/(width·n·B), points
    from c to h (descent moves h toward c); positions that are not scored get none."""
    torch.manual_seed(0)
    width = 6
    f = hand_split([[0, 1, 2, 3], [0, 1, 2, 3]], [4, 3], [[], []])  # 3 and 2 scored positions
    r = hand_split([[0, 1, 2, 3]], [4], [[]])
    h = torch.randn(2, 3, width)
    model, ref = Logits(h.clone()), Logits(h[:1] + 1.0)  # the frozen model: 1 away in every coordinate
    control = torch.randn(width)
    loss = unlearn.loss_rmu(model, ref, f, r, None, layer=0, control=control)
    forget = ((h[0] - control) ** 2).mean(-1).mean() / 2 + ((h[1, :2] - control) ** 2).mean(-1).mean() / 2
    assert loss.item() == pytest.approx(forget.item() + 1.0, rel=1e-5)  # retain: (h - (h + 1))² = 1 everywhere
    g = torch.autograd.grad(loss, model.z)[0]
    # z[0] is also the retain sample's activation: its retain gradient is -2/(width·3) everywhere on it
    expect = torch.zeros(2, 3, width)
    expect[0] = 2 * (h[0] - control) / (width * 3 * 2) - 2 / (width * 3)
    expect[1, :2] = 2 * (h[1, :2] - control) / (width * 2 * 2)
    assert torch.allclose(g, expect, atol=1e-6)
    assert g[1, 2].abs().max().item() == 0.0


def test_stop_mia_stops_when_the_auc_crosses(tiny):
    """--stop mia: gradient ascent raises the forget losses until the LOSS attack's AUC (forget vs holdout) is at
    most the level; the run stops after the first epoch that crosses it, and not before."""
    cfg, data, target = tiny["cfg"], tiny["data"], tiny["target"]
    level = 0.55
    stop = unlearn.stopping_rule(__import__("dataclasses").replace(cfg, stop="mia"), None, data, None)
    assert (stop["rule"], stop["auc"], stop["holdout"]) == ("mia", level, data["holdout"])
    c = __import__("dataclasses").replace(cfg, batch_size=len(data["forget"]), epochs=40)  # one step an epoch

    def auc_of(model):
        lf, lh = (metrics.split_stats(model, data[s])["loss_per"].numpy() for s in ("forget", "holdout"))
        return metrics.auc(-lf, -lh)
    assert auc_of(target) > 0.9
    runs = []
    for s, epochs in ((stop, 40), ({"rule": "budget"}, None)):
        model = __import__("copy").deepcopy(target)
        res = unlearn.unlearn(model, target, [unlearn.loss_ga], data["forget"], data["retain"], c, s, 1e-3,
                              epochs or runs[0][0]["steps"] - 1)
        runs.append((res, auc_of(model)))
    (res, auc_stop), (res_before, auc_before) = runs
    assert res["stopped_by"] == "mia" and res["steps"] < 40 and auc_stop <= level
    assert res_before["stopped_by"] == "budget" and auc_before > level  # one epoch earlier: not yet


def test_stop_mia_on_secret_tokens(tiny):
    """--stop mia with --forget_tokens secret: the level is the oracle's AUC on secret tokens + 0.05, and the
    check's AUC is the evaluation's `loss_secret` AUC (forget vs holdout on their secret tokens alone), not the
    all-token one; the check holds just above that AUC and not at it minus a hair."""
    import dataclasses
    cfg, data, target = tiny["cfg"], tiny["data"], tiny["target"]
    c = dataclasses.replace(cfg, stop="mia", forget_tokens="secret")
    oracle = {"mia_auc": {"loss": 0.3, "loss_secret": 0.4}}
    stop = unlearn.stopping_rule(c, None, data, oracle)
    assert (stop["tokens"], stop["auc"]) == ("secret", 0.45) and "secret tokens" in metrics.stop_line(stop)
    assert unlearn.stopping_rule(dataclasses.replace(c, forget_tokens="all"), None, data, oracle)["auc"] == 0.3 + 0.05
    model = __import__("copy").deepcopy(target)  # two epochs of ascent on the secrets: the two attacks disagree
    unlearn.unlearn(model, target, [unlearn.loss_ga], data["forget"], data["retain"],
                    dataclasses.replace(c, batch_size=len(data["forget"])), {"rule": "budget"}, 1e-2, 2)
    stats = {s: metrics.split_stats(model, data[s]) for s in ("forget", "holdout")}
    texts = {s: [""] * len(data[s]) for s in ("forget", "holdout")}
    f, h = (metrics.mia_scores(stats[s], data[s], texts[s]) for s in ("forget", "holdout"))
    secret = metrics.auc(f["loss_secret"], h["loss_secret"])  # the evaluation's MIA AUC on secret tokens
    assert abs(secret - metrics.auc(f["loss"], h["loss"])) > 1e-3  # the two attacks differ on this model
    for level, done in ((secret + 1e-6, True), (secret - 1e-6, False)):
        ok, line = unlearn.forget_check(model, data["forget"], dict(stop, auc=level), c)
        assert ok == done and f"MIA AUC secret {secret:.3f}" in line


@pytest.mark.parametrize("method", ["ga", "npo", "simnpo", "ih", "rmu", "icu", "ih_flora"])
def test_forget_tokens_secret_leaves_other_tokens_without_gradient(tiny, method):
    """--forget_tokens secret: in every forward of a forget batch with gradients (the forgetting term; FILA's
    Fisher), the positions that predict a non-secret token get no gradient, and secret ones do."""
    cfg, data, target = tiny["cfg"], tiny["data"], tiny["target"]
    forget = data["forget"]
    c = __import__("dataclasses").replace(cfg, forget_tokens="secret", epochs=1, batch_size=len(forget))
    model = __import__("copy").deepcopy(target)
    seen = []

    def hook(m, inp, out):
        if out.requires_grad:
            out.retain_grad()
            seen.append((inp[0], out))
    model.register_forward_hook(hook)
    torch.manual_seed(0)
    unlearn.apply_method(method, model, target, forget, data["retain"], data, c, {"rule": "budget"}, [])
    rows = {tuple(r) for r in forget.x.tolist()}
    checked = 0
    for x, out in seen:
        if out.grad is None or not all(tuple(r) in rows for r in x.tolist()):
            continue  # a retain (or analogue) batch
        idx = [forget.x.tolist().index(r) for r in x.tolist()]
        kind = forget.kind[idx, 1:]
        g = out.grad.abs().sum(-1)
        assert g[(kind != unlearn.common.SECRET)].max().item() == 0.0
        assert g[kind == unlearn.common.SECRET].min().item() > 0.0
        checked += 1
    assert checked >= 1


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def test_end_to_end_results_contract(tiny, tmp_path, capsys):
    """`python unlearn.py` on the cached tiny target: results.json holds what other tools read; the plan comes
    before the work, the table after it; no progress bar where stderr is not a terminal."""
    import json
    import shutil
    out = tmp_path / "out"
    shutil.copytree(tiny["root"] / "out", out)
    unlearn.main(tiny["argv"] + ["--out_dir", str(out), "--method", "ih_flora"])
    printed = capsys.readouterr()
    assert printed.err == ""  # tqdm stays silent off a terminal: no bars, no carriage returns in logs
    assert printed.out.index("plan: ih_flora") < printed.out.index("target: reusing") < printed.out.index("stopped by")
    assert "  results: " + str(out / "ih_flora" / "results.json") in printed.out
    assert "metric" in printed.out and "holdout level" in printed.out  # the table, with its reference column
    res = json.load(open(out / "ih_flora" / "results.json"))
    assert res["method"] == "ih_flora" and res["stopped_by"] in ("threshold", "budget")
    assert set(res["thresholds"]) == {"ma", "el10", "source"} and res["thresholds"]["source"] == "holdout"
    assert res["stop"] == dict(rule="rule", **res["thresholds"]) and res["config"]["stop"] == "rule"  # the default
    for when in ("before", "after"):
        for split in ("forget", "retain", "holdout"):  # generation (EL) on forget and holdout alone
            assert {"ma", "ppl"} <= set(res[when][split]) and ("el10" in res[when][split]) == (split != "retain")
    assert res["after"]["forget"]["ma"] < res["before"]["forget"]["ma"]
    assert {"loss", "zlib", "mink", "loss_text", "loss_fact", "loss_secret"} <= set(res["after"]["mia_auc"])
    assert res["time_s"] > 0 and res["steps"] > 0 and 0 < res["trainable_params"] < sum(
        p.numel() for p in tiny["target"].parameters())
    assert not [f for f in files_under(out) if f.endswith(".tmp")]


def test_stop_rule_name_and_level_in_results(tiny, tmp_path):
    """--stop mia without an oracle: the level 0.55, in results.json with the rule's name; --stop budget: every
    epoch runs (2 epochs of 2 batches of 4)."""
    import json
    import shutil
    out = tmp_path / "out"
    shutil.copytree(tiny["root"] / "out", out)
    unlearn.main(tiny["argv"] + ["--out_dir", str(out), "--method", "ga", "--stop", "mia"])
    res = json.load(open(out / "ga" / "results.json"))
    assert res["stop"] == {"rule": "mia", "auc": 0.55, "source": "no oracle: 0.55", "tokens": "all"}
    assert res["stopped_by"] in ("mia", "budget") and (res["stopped_by"] == "mia") == (res["after"]["mia_auc"]["loss"] <= 0.55)
    unlearn.main(tiny["argv"] + ["--out_dir", str(out), "--method", "ga", "--stop", "budget", "--epochs", "2",
                                 "--batch_size", "4"])
    res = json.load(open(out / "ga" / "results.json"))
    assert res["stop"] == {"rule": "budget", "epochs": 2} and res["stopped_by"] == "budget" and res["steps"] == 4


def test_bad_input_stop_and_forget_tokens(tofu01, tmp_path, capsys):
    """TOFU has no holdout, no published levels and no secret tokens: --stop mia, --stop rule and
    --forget_tokens secret are one line each, before any model is trained. (TDEC marks its suffixes secret.)"""
    os.makedirs(tmp_path / "data" / "tofu")
    os.symlink(tofu01, tmp_path / "data" / "tofu" / "gpt2-forget01")
    argv = ["--dataset", "tofu", "--forget_set", "forget01", "--data_dir", str(tmp_path / "data"),
            "--out_dir", str(tmp_path / "out")]
    fails_with(argv + ["--stop", "mia"], capsys, "--stop mia compares forget with holdout, and tofu has no holdout")
    fails_with(argv + ["--stop", "rule"], capsys, "--stop rule needs the level of unseen data")
    fails_with(argv + ["--forget_tokens", "secret"], capsys, "tofu marks no secret tokens")
    fails_with(argv + ["--stop", "never"], capsys, "invalid choice", code=2)
    assert not (tmp_path / "out").exists()


def test_eul_requests_report_each_request(tiny, tmp_path):
    import json
    import shutil
    out = tmp_path / "out"
    shutil.copytree(tiny["root"] / "out", out)
    unlearn.main(tiny["argv"] + ["--out_dir", str(out), "--method", "eul", "--requests", "2"])
    res = json.load(open(out / "eul" / "results.json"))
    assert [r["request"] for r in res["requests"]] == [1, 2]
    assert res["after"]["forget"]["ma"] < res["before"]["forget"]["ma"]


def test_seeds_run_each_seed_on_the_same_target(tiny, tmp_path):
    """--seeds 2: two unlearning runs (seeds 1337, 1338) on one target; results.json keeps both headlines and
    its full record is the first seed's."""
    import json
    import shutil
    out = tmp_path / "out"
    shutil.copytree(tiny["root"] / "out", out)
    unlearn.main(tiny["argv"] + ["--out_dir", str(out), "--method", "gd", "--seeds", "2", "--epochs", "2"])
    res = json.load(open(out / "gd" / "results.json"))
    assert [s["seed"] for s in res["seeds"]] == [1337, 1338]
    assert res["seeds"][0]["forget MA"] == res["after"]["forget"]["ma"]
    assert res["seeds"][0]["retain ppl"] != res["seeds"][1]["retain ppl"]  # other retain batches, another model


def test_comparison_shows_mean_and_sample_std():
    run = lambda ma: {"stopped_by": "threshold", "steps": 4, "time_s": 1.0, "after": {"forget": {"ma": ma}}}
    md = unlearn.comparison({"ga": [run(0.4), run(0.6)], "gd": [run(0.5)]}, {"forget": {"ma": 0.45}})
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()}
    assert "| threshold | 0.500 ± 0.141 | 4 ± 0 |" in rows["ga"]  # std of (0.4, 0.6) with ddof 1
    assert "| threshold | 0.500 | 4 |" in rows["gd"] and "| - | 0.450 | - |" in rows["oracle"]


def fails_with(argv, capsys, message, code=1):
    with pytest.raises(SystemExit) as e:
        unlearn.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code and message in err and "Traceback" not in err, err
    return err


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        unlearn.main(["-h"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert all(f"--{f.name}" in out for f in __import__("dataclasses").fields(unlearn.Config))
    assert "~30% more time" in out  # the Config comments, % and all
    assert "(default: )" not in out and "(default: 1337)" in out  # a default only where there is one
    assert "design notes" not in out.lower()  # nothing the project does not contain


def test_report_table_has_reference_and_directions():
    """The run's final table: plain fixed-width columns (every line of the table as wide), which way is better,
    and the reference: the oracle, else the target's holdout level for the forget rows and chance for MIA."""
    ev = lambda ma, ppl, auc: {"forget": {"ma": ma, "el10": 0.01, "ppl": ppl}, "retain": {"ma": 0.5, "ppl": 8.0},
                               "holdout": {"ma": 0.4, "el10": 0.002, "ppl": 9.0}, "mia_auc": {"loss": auc}}
    res = {"stopped_by": "threshold", "steps": 12, "time_s": 3.0, "after": ev(0.39, 10.0, 0.7)}
    rule = {"rule": "rule", "ma": 0.4, "el10": 0.002, "source": "holdout"}
    for oracle, ref_name, ref_ma, ref_auc in ((None, "holdout level", "0.4", "0.5"),
                                              (ev(0.35, 11.0, 0.45), "oracle", "0.35", "0.45")):
        text = unlearn.report("ga", res, ev(0.9, 2.0, 1.0), oracle, rule)
        lines = text.splitlines()
        assert lines[0] == "ga: stopped by threshold after 12 steps, 3.0s"
        assert lines[1] == "stopping rule (holdout): forget MA < 0.4000 and EL10 < 0.0020"
        table = lines[2:-1]
        assert table[0].split() == ["metric", "better", "before", "after"] + ref_name.split()
        assert len({len(line) for line in table}) == 1  # aligned: plain text, not markdown
        rows = {" ".join(line.split()[:-4]): line.split()[-4:] for line in table[1:]}  # name: better, 3 values
        assert rows["forget MA"] == ["↓", "0.9", "0.39", ref_ma]
        assert rows["forget perplexity"] == ["↑", "2", "10", "11" if oracle else "9"]
        assert rows["retain perplexity"] == ["↓", "8", "8", "8" if oracle else "-"]
        assert rows["MIA AUC loss"] == ["≈", "1", "0.7", ref_auc]
        assert "↓ lower, ↑ higher, ≈ nearest the reference" in lines[-1]


def test_bad_input_unknown_method(capsys):
    err = fails_with(["--method", "forget_everything"], capsys, "invalid choice", code=2)
    assert "ih_flora" in err and "rum" in err  # the valid ones are listed


def test_bad_input_missing_dataset(tmp_path, capsys):
    err = fails_with(["--dataset", "nothing", "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out")],
                     capsys, "is missing")
    assert "people" in err and "tofu" in err  # the known datasets are listed
    assert not (tmp_path / "out").exists()  # nothing left behind


def test_bad_input_corrupted_checkpoint_and_stale_cache(tiny, tmp_path, capsys):
    """A corrupted target.pt is one line; one made from other settings (here another seed) is retrained."""
    import shutil
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "target.pt").write_bytes(b"not a checkpoint")
    fails_with(tiny["argv"] + ["--out_dir", str(out)], capsys, "delete it to train again")
    shutil.copy(tiny["root"] / "out" / "target.pt", out / "target.pt")
    cfg = unlearn.parse_args(tiny["argv"] + ["--out_dir", str(out), "--seed", "7", "--train_epochs=1"])
    model, _ = unlearn.load_or_train(cfg, tiny["meta"], tiny["data"], "target", ("forget", "retain"))
    assert "training again" in capsys.readouterr().out
    again = torch.load(out / "target.pt", weights_only=True)
    assert again["fingerprint"] != torch.load(tiny["root"] / "out" / "target.pt", weights_only=True)["fingerprint"]


def test_bad_input_empty_forget_set(tmp_path, capsys):
    prepare = os.path.join(unlearn.ROOT, "data", "people", "prepare.py")
    subprocess.run([sys.executable, prepare, "--n_forget", "0", "--n_retain", "100", "--n_holdout", "2", "--out_dir",
                    str(tmp_path / "data" / "people" / "gpt2")], check=True)
    fails_with(["--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out")], capsys, "forget set")


def test_bad_input_numbers_and_options(tiny, capsys):
    for flag, value, message in (("--lr", "-1", "--lr must be a positive number"), ("--lora_lr", "nan", "positive"),
                                 ("--patience", "-2", "0 or more"), ("--dtype", "float16", "float32 or bfloat16"),
                                 ("--rum_plan", "best", "neggrad+"), ("--seeds", "0", "at least 1")):
        fails_with(tiny["argv"] + [flag, value], capsys, message)
    err = fails_with(tiny["argv"] + ["--lr", "fast"], capsys, "invalid float value", code=2)
    assert len(err.strip().splitlines()) == 1  # one line, not the whole usage
    fails_with(["--train_epochs", "0"], capsys, "give --init_from")


def test_bad_input_checkpoints(tmp_path, capsys):
    """--init_from: a folder without config.json, an unsupported model_type, a hub id that cannot be reached;
    --oracle_from with another tokenizer. One line each, and the out dir is not left behind."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    fails_with(["--init_from", str(tmp_path / "empty"), "--out_dir", str(out)], capsys, "")
    assert not out.exists()
    ckpt = tmp_path / "ckpt"
    bpe_checkpoint(ckpt, "gpt2")
    cfg = __import__("json").load(open(ckpt / "config.json"))
    bert = tmp_path / "bert"
    shutil = __import__("shutil")
    shutil.copytree(ckpt, bert)
    __import__("json").dump(dict(cfg, model_type="bert"), open(bert / "config.json", "w"))
    err = fails_with(["--init_from", str(bert), "--out_dir", str(out), "--data_dir", str(tmp_path / "data")], capsys, "bert")
    assert "gpt2" in err and "llama" in err
    assert not (tmp_path / "data").exists()  # refused before any data was prepared for it
    fails_with(["--init_from", "no-such-org/no-such-model-xyz", "--out_dir", str(out)], capsys, "local folder")
    fails_with(["--init_from", str(ckpt), "--oracle_from", "gpt2", "--out_dir", str(out)], capsys, "another tokenizer")
    short = tmp_path / "short"  # a context shorter than the records
    bpe_checkpoint(short, "gpt2", context=16)
    tag = unlearn.common.load(str(short)).tag
    subprocess.run([sys.executable, os.path.join(unlearn.ROOT, "data", "people", "prepare.py"), "--tokenizer", str(short),
                    "--n_forget", "2", "--n_retain", "40", "--n_holdout", "2", "--out_dir",
                    str(tmp_path / "data" / "people" / tag)], check=True, capture_output=True)
    fails_with(["--init_from", str(short), "--out_dir", str(out), "--data_dir", str(tmp_path / "data")], capsys,
               "has a context of 16 tokens, shorter than")
    assert not out.exists()


def test_bad_input_nonfinite_loss(tiny, tmp_path, capsys):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(tiny["root"] / "out", out)
    fails_with(tiny["argv"] + ["--out_dir", str(out), "--method", "ga", "--lr=1e30", "--batch_size=4"], capsys, "the loss became")
    assert files_under(out) == files_under(tiny["root"] / "out")  # no results.json, nothing half-written


def test_bad_input_unwritable_out_dir(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    fails_with(["--out_dir", str(tmp_path / "file" / "out")], capsys, "cannot write to --out_dir")


def test_bad_input_requests_and_sizes(tiny, capsys):
    fails_with(tiny["argv"] + ["--requests", "0"], capsys, "--requests must be at least 1")
    fails_with(tiny["argv"] + ["--batch_size", "0"], capsys, "--batch_size must be at least 1")
    fails_with(tiny["argv"] + ["--requests", "99"], capsys, "more than the 8 forget samples")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_bad_input_cuda_without_gpu(tiny, capsys):
    fails_with(tiny["argv"] + ["--device", "cuda"], capsys, "no CUDA GPU")


# ---- caches keyed by content (issue 17) ------------------------------------------------------------------
def save_bpe_tokenizer(folder, vocab_size):
    """A byte-level BPE trained on people records, saved as transformers files (different sizes: other ids)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer
    import random
    rng = random.Random(0)
    texts = ["".join(t for t, _ in unlearn.people.person(rng, f"{f} {l}"))
             for f in unlearn.people.FIRST for l in unlearn.people.LAST]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                               bos_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok


def test_prepared_data_keyed_by_tokenizer_content(tmp_path, monkeypatch, capsys):
    """Two folders named m with different tokenizers: --init_from m from each prepares its own ids (the first's
    would decode to garbage with the second); --init_from . caches under the folder's name, not data/people/."""
    common = unlearn.common
    for sub, size in (("a", 300), ("b", 420)):
        save_bpe_tokenizer(tmp_path / sub / "m", size)
    data_dir = str(tmp_path / "data")
    decoded = []
    for sub in ("a", "b", "a"):
        monkeypatch.chdir(tmp_path / sub)
        tok = common.load("m")
        folder, meta, arrays = common.prepared(data_dir, "people", tok)
        assert folder == os.path.join(data_dir, "people", "m")
        row, kind = arrays["forget"]["ids"][0], arrays["forget"]["kind"][0]
        decoded.append(tok.decode(row[1:(kind > 0).nonzero()[0][-1]].tolist()))
        assert " was born on " in decoded[-1] and "Phone:" in decoded[-1]
    out = capsys.readouterr().out
    assert out.count("prepared with another tokenizer than this m") == 2
    assert decoded[0] == decoded[1] == decoded[2]  # the same record, tokenized by each
    common.prepared(data_dir, "people", tok)
    assert "preparing" not in capsys.readouterr().out  # unchanged: reused
    monkeypatch.chdir(tmp_path / "b" / "m")
    folder, _, _ = common.prepared(data_dir, "people", common.load("."))
    assert folder == os.path.join(data_dir, "people", "m")
    assert unlearn.parse_args(["--init_from", "."]).out_dir == os.path.join("out", "people-m")


def test_prepared_data_keyed_by_source_files(tmp_path, monkeypatch, capsys):
    """A dataset's source files are part of the key: editing one (here a forget_sets.json beside a copy of
    people's prepare.py) prepares again and says why."""
    common = unlearn.common
    (tmp_path / "src" / "toy").mkdir(parents=True)
    __import__("shutil").copy(os.path.join(unlearn.ROOT, "data", "people", "prepare.py"), tmp_path / "src" / "toy")
    (tmp_path / "src" / "toy" / "forget_sets.json").write_text('{"a": [1, 2]}')
    os.symlink(os.path.join(unlearn.ROOT, "data", "gpt2.tiktoken"), tmp_path / "src" / "gpt2.tiktoken")
    monkeypatch.setattr(common, "HERE", str(tmp_path / "src"))
    tok = common.load("gpt2")
    common.prepared(str(tmp_path / "data"), "toy", tok)
    assert "is missing; preparing" in capsys.readouterr().out
    common.prepared(str(tmp_path / "data"), "toy", tok)
    assert "preparing" not in capsys.readouterr().out
    (tmp_path / "src" / "toy" / "forget_sets.json").write_text('{"a": [1, 3]}')
    common.prepared(str(tmp_path / "data"), "toy", tok)
    assert "prepared from other files of data/toy/" in capsys.readouterr().out


@one_thread
def test_target_cache_keyed_by_checkpoint_content(tmp_path):
    """A checkpoint rewritten in place changes the target's fingerprint (weights part only), whole-file hashed
    or, for big files, by header and slices; the data and settings parts stay."""
    from safetensors.torch import load_file, save_file
    _, folder = hf_checkpoint("gpt2", tmp_path / "ckpt")
    cfg = unlearn.parse_args(["--init_from", folder])
    split = hand_split([[0, 1, 2, 3]], [4], [[]])
    before = unlearn.fingerprint(cfg, {}, [split])
    sliced = unlearn.common.checkpoint_key(folder, whole=0, slices=4, slice_size=64)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    tensors = {k: v + 0.01 for k, v in tensors.items()}  # other weights, same names, shapes and sizes
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    after = unlearn.fingerprint(cfg, {}, [split])
    assert after["weights"] != before["weights"] and {k: after[k] for k in ("data", "settings")} == \
        {k: before[k] for k in ("data", "settings")}
    assert unlearn.common.checkpoint_key(folder, whole=0, slices=4, slice_size=64) != sliced
    assert unlearn.fingerprint(cfg, {}, [split]) == after  # the same files, the same key


# ---- no silently wrong numbers, no lost output (issue 17) -------------------------------------------------
def copy_out(tiny, tmp_path):
    out = tmp_path / "out"
    __import__("shutil").copytree(tiny["root"] / "out", out)
    return out


@pytest.mark.parametrize("patience", [0, 3])
def test_bad_input_diverging_target(tiny, tmp_path, capsys, patience):
    """--train_lr 1000: the target's loss becomes NaN; one line names the phase and step, nothing is cached
    (with early stopping too, where the NaN holdout loss used to end in a TypeError)."""
    out = tmp_path / "out"
    err = fails_with(tiny["argv"] + ["--out_dir", str(out), "--train_lr", "1000", f"--patience={patience}",
                                     "--train_epochs=3"], capsys, "target: the training loss became")
    assert "step" in err and "nothing was cached" in err
    assert files_under(out) == []


def test_bad_input_nonfinite_fisher(tiny):
    """A model with a NaN weight: FILA's Fisher stops with one line, its hooks removed and grads restored."""
    model = __import__("copy").deepcopy(tiny["target"])
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    layers = model.lora_layers()
    with pytest.raises(unlearn.UserError, match="fisher: the loss .* not finite at batch 1"):
        unlearn.fisher(model, tiny["data"]["forget"], layers)
    assert all(not m._forward_hooks for m in layers) and all(p.requires_grad for p in model.parameters())


def test_diverged_unlearning_is_reported_collapsed(tiny, tmp_path):
    """--lora_lr 10 destroys the model: no OverflowError from its perplexity (inf, null in JSON), and
    results.json and the table say collapsed whatever stopped the run."""
    out = copy_out(tiny, tmp_path)
    unlearn.main(tiny["argv"] + ["--out_dir", str(out), "--method", "ih_lora", "--lora_lr", "10", "--epochs", "2"])
    res = json.load(open(out / "ih_lora" / "results.json"))
    assert res["collapsed"] is True
    assert res["after"]["retain"]["ppl"] is None or res["after"]["retain"]["ppl"] > 10 * res["before"]["retain"]["ppl"]
    assert metrics.exp(1e4) == float("inf")
    run = lambda ppl: {"stopped_by": "threshold", "steps": 1, "time_s": 1.0, "after": {"retain": {"ppl": ppl}}}
    assert not unlearn.collapsed(run(2.0)["after"] | {}, run(19.0)["after"])
    assert unlearn.collapsed(run(2.0)["after"], run(21.0)["after"])
    md = unlearn.comparison({"ga": [dict(run(21.0), collapsed=True)], "gd": [run(3.0)]}, {"retain": {"ppl": 2.0}})
    assert "| ga | threshold (collapsed) |" in md and "| gd | threshold |" in md


def test_bad_input_prepared_files(tiny, tmp_path, capsys):
    """A truncated cached split and a deleted one: one line each, naming the file."""
    shutil = __import__("shutil")
    data = tmp_path / "data"
    shutil.copytree(tiny["root"] / "data", data)
    split = data / "people" / "gpt2" / "forget.npz"
    split.write_bytes(split.read_bytes()[:100])
    argv = tiny["argv"] + ["--data_dir", str(data), "--out_dir", str(tmp_path / "out")]
    fails_with(argv, capsys, f"cannot read {split}")
    split.unlink()
    fails_with(argv, capsys, f"cannot read {split}")
    assert not (tmp_path / "out").exists()


def test_bad_input_options_issue17(tiny, tmp_path, capsys):
    """--el_n beyond the records; --forget_set for a dataset without forget sets (unlearn.py's line, not
    prepare.py's usage); booleans other than true/false/1/0/yes/no."""
    fails_with(tiny["argv"] + ["--el_n", "500"], capsys, "--el_n 500 is not shorter than the forget records")
    err = fails_with(tiny["argv"] + ["--forget_set", "X"], capsys, "dataset 'people' has no forget sets")
    assert "usage" not in err
    for value in ("on", "y", "maybe"):
        err = fails_with(tiny["argv"] + ["--oracle", value], capsys, "expected true, false, 1, 0, yes or no", code=2)
        assert len(err.strip().splitlines()) == 1
    assert unlearn.parse_args(["--oracle", "yes"]).oracle and not unlearn.parse_args(["--oracle=0"]).oracle


def test_bad_input_tokenizer_larger_than_vocabulary(tmp_path, capsys):
    """A checkpoint whose tokenizer (400 tokens) outgrows its model's vocabulary (100): one line, not an
    index error deep in the embedding."""
    transformers = pytest.importorskip("transformers")
    ckpt = tmp_path / "ckpt"
    save_bpe_tokenizer(ckpt, 400)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=128, n_embd=16, n_layer=1, n_head=2,
                                                         vocab_size=100, bos_token_id=0, eos_token_id=0)).save_pretrained(ckpt)
    tok = unlearn.common.load(str(ckpt))
    unlearn.people.main(["--tokenizer", str(ckpt), "--n_forget", "2", "--n_retain", "20", "--n_holdout", "2",
                         "--out_dir", str(tmp_path / "data" / "people" / tok.tag)])
    fails_with(["--init_from", str(ckpt), "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out"),
                "--train_epochs=1"], capsys, "beyond the 100 of")


def test_tokenizer_hub_id_fails_without_retries(monkeypatch):
    """A hub id goes through huggingface_hub's snapshot (one fast failure offline), never straight to
    AutoTokenizer.from_pretrained(id), whose per-file retries took ~50 s."""
    transformers = pytest.importorskip("transformers")
    asked = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name, **kw: asked.append(name))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot load the tokenizer of 'no-such-org/no-such-model-xyz'"):
        unlearn.common.load("no-such-org/no-such-model-xyz")
    assert "no-such-org/no-such-model-xyz" not in asked


def test_leftovers_of_killed_runs(tmp_path, monkeypatch, capsys):
    """Temporary names carry the pid, so two runs into one out dir never share one; at start, what a dead run
    left is removed (one line each) and a live run's is kept."""
    common = unlearn.common
    mine = common.tmp_name(str(tmp_path / "results.json"))
    monkeypatch.setattr(os, "getpid", lambda: 4194304 + 7)  # above Linux's pid_max: no such process
    dead = common.tmp_name(str(tmp_path / "results.json"))
    monkeypatch.undo()
    assert mine != dead
    (tmp_path / "ga").mkdir()
    leftovers = [dead, str(tmp_path / ".ga.4194311.tmp"), str(tmp_path / "ga" / ".saving-4194311-ab12cd34"),
                 str(tmp_path / "target.pt.4194311.tmp"), str(tmp_path / "ga" / ".saving-old1x2y")]
    for path in leftovers:
        os.mkdir(path) if "saving" in path or path.endswith(".ga.4194311.tmp") else open(path, "w").close()
    open(mine, "w").close()
    common.clean_leftovers(str(tmp_path))
    err = capsys.readouterr().err
    assert all(not os.path.exists(p) and f"removed {p}" in err for p in leftovers)
    assert os.path.exists(mine)  # a live run's (this one)


def local_gpt2(folder):
    """A random tiny GPT-2 with GPT-2's vocabulary, saved as a folder named gpt2: what --init_from gpt2 reads
    offline from the current directory."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=128, n_embd=16, n_layer=1, n_head=2))
    hf.save_pretrained(folder)


def test_init_from_local_gpt2_exports_a_tokenizer_atomically(tmp_path, monkeypatch):
    """--init_from gpt2 with a local folder named gpt2 (tiktoken tokenizer): the run ends with results.json and
    model/ with a transformers GPT-2 tokenizer that encodes as tiktoken does, folder permissions from the
    umask, generation_config.json also when the target is cached. A kill inside the next export (raised in
    the tokenizer's save) leaves the previous results.json and model/ as they were, and no temporary files."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    local_gpt2(tmp_path / "gpt2")
    unlearn.people.main(["--n_forget", "4", "--n_retain", "100", "--n_holdout", "4", "--out_dir",
                         str(tmp_path / "data" / "people" / "gpt2")])
    argv = ["--init_from", "gpt2", "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out"),
            "--method", "ga_lora", "--train_epochs=1", "--train_lr=1e-3", "--epochs=1", "--rank=2",
            "--device=cpu"]
    umask = os.umask(0o027)
    try:
        unlearn.main(argv)
    finally:
        os.umask(umask)
    # a cached target keeps the checkpoint's generation config for later exports
    assert json.loads(torch.load(tmp_path / "out" / "target.pt", weights_only=True)["hf_generation_config"])
    model_dir = tmp_path / "out" / "ga_lora" / "model"
    res = json.load(open(tmp_path / "out" / "ga_lora" / "results.json"))
    assert res["model_dir"] == str(model_dir)
    assert oct(os.stat(model_dir).st_mode & 0o777) == oct(0o750)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(model_dir))
    text = "Ada Berg was born on 1987-04-12 in Porto. Email: kq7w.zr@fastmail.net"
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert hf_tok.encode(text) == unlearn.common.load("gpt2").encode(text) and hf_tok.eos_token_id == 50256
    assert transformers.AutoModelForCausalLM.from_pretrained(model_dir) is not None
    before = {f: open(os.path.join(d, f), "rb").read() for d in (tmp_path / "out" / "ga_lora", model_dir)
              for f in os.listdir(d) if os.path.isfile(os.path.join(d, f))}

    def killed(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(unlearn.common, "save_tokenizer", killed)
    with pytest.raises(KeyboardInterrupt):
        unlearn.main(argv)  # its export is killed
    after = {f: open(os.path.join(d, f), "rb").read() for d in (tmp_path / "out" / "ga_lora", model_dir)
             for f in os.listdir(d) if os.path.isfile(os.path.join(d, f))}
    assert after == before
    assert sorted(os.listdir(tmp_path / "out")) == ["ga_lora", "target.pt"]


def test_bad_input_torchrun(tiny, monkeypatch, capsys):
    """Under torchrun: more processes than --batch_size (each needs a share of a step's batch), RUM's neggrad+
    plan (forget and retain batches of different sizes); and anywhere,
    --dtype bfloat16 on a GPU that does not compute in bf16 (both checked before anything runs)."""
    monkeypatch.setattr(unlearn, "world", lambda: 4)
    fails_with(tiny["argv"] + ["--batch_size", "2"], capsys, "torchrun runs 4 processes, more than --batch_size 2")
    fails_with(tiny["argv"] + ["--method", "rum", "--rum_plan", "neggrad+"], capsys, "neggrad+ cannot run under torchrun")
    fails_with(tiny["argv"] + ["--method", "rmu"], capsys, "rmu cannot run under torchrun")
    monkeypatch.setattr(unlearn, "world", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    fails_with(tiny["argv"] + ["--device", "cuda", "--dtype", "bfloat16"], capsys, "(Tesla V100) does not compute in bf16")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method,extra", [("npo", ["--requests", "2"]), ("ih_lora", [])])
def test_torchrun_two_processes_match_one(tiny, tmp_path, capsys, method, extra):
    """`python -m torch.distributed.run --nproc_per_node 2 unlearn.py ...` (gloo on the CPU) is the same command
    as one process: the same loss every epoch, the same metrics after, one results.json. --batch_size 3 splits
    batches 2 + 1 rows. npo: FSDP2 shards the model; two requests of 4 rows are two unlearning loops on the
    same sharded model, each epoch ending on a batch of one row, which the second rank computes with weight 0.
    ih_lora: the model replicated, its adapter gradients all-reduced."""
    import json
    import shutil
    argv = tiny["argv"] + ["--method", method, "--epochs", "3", "--batch_size", "3", *extra]
    losses, results = {}, {}
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        shutil.copytree(tiny["root"] / "out", out)  # the cached target: both runs start from it
        if n == 1:
            unlearn.main(argv + ["--out_dir", str(out)])
            text = capsys.readouterr().out
        else:
            p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                                str(free_port()), os.path.join(unlearn.ROOT, "unlearn.py"), *argv, "--out_dir", str(out)],
                               env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
            assert p.returncode == 0, p.stderr[-3000:]
            text = p.stdout
        losses[n] = [float(v) for v in re.findall(rf"^{method}: epoch \d+ \| loss (\S+)", text, re.M)]
        results[n] = json.load(open(out / method / "results.json"))
        assert text.count("wrote ") == 1 and not [f for f in files_under(out) if ".tmp" in f or ".probe" in f]
    assert len(losses[1]) >= 2 and losses[2] == pytest.approx(losses[1], rel=1e-3, abs=1e-4)
    assert results[2]["steps"] == results[1]["steps"] and results[2]["stopped_by"] == results[1]["stopped_by"]
    for split in ("forget", "retain", "holdout"):
        assert results[2]["after"][split]["ma"] == pytest.approx(results[1]["after"][split]["ma"], abs=1e-3)
    assert results[2]["after"]["fluency"]["score"] == pytest.approx(results[1]["after"]["fluency"]["score"], abs=1e-2)
    assert results[1]["after"]["forget"]["ma"] < results[1]["before"]["forget"]["ma"] - 0.02  # it did unlearn


# ---- the other seeds' pieces, on cases with known answers -------------------------------------------------
def test_icu_drops_refined_samples(tiny):
    """Before the first epoch and after each, the samples the check calls forgotten (with their analogues)
    leave the batches."""
    cfg, data, target = tiny["cfg"], tiny["data"], tiny["target"]
    forget = data["forget"]
    seen, calls = [], []

    def recording_loss(model, ref, f, a, cfg):
        seen[-1].extend(f.rows.tolist())
        return unlearn.loss_icu(model, ref, f, a, cfg)

    def check(model):  # before unlearning sample 0 is forgotten already, after epoch 1 samples 0-3, after 2 all
        calls.append(None)
        seen.append([])
        return torch.arange(len(forget)) < {1: 1, 2: 4}.get(len(calls), 8)

    model = __import__("copy").deepcopy(target)
    pairs = unlearn.analogues(target, forget, data["retain"])
    res = unlearn.unlearn(model, target, [recording_loss], forget, data["retain"], cfg,
                          {"rule": "budget"}, 1e-4, 5, "icu", pairs=pairs, refine=check)
    rows = forget.rows.tolist()
    assert sorted(seen[0]) == sorted(rows[1:])                   # epoch 1: all but the one forgotten before
    assert sorted(seen[1]) == sorted(rows[4:])                   # epoch 2: the refined samples are gone
    assert res["forgotten_at"] == [0, 1, 1, 1, 2, 2, 2, 2] and res["stopped_by"] == "forgotten"
    assert pairs.shape == (len(forget),) and int(pairs.max()) < len(data["retain"])


def test_icu_masks_forgotten_samples_in_fixed_batches(tiny):
    """As ICU's code: every epoch batches all forget samples and masks the forgotten ones out of the loss (a
    batch left empty takes no step), rather than re-forming batches from the samples left."""
    data, target = tiny["data"], tiny["target"]
    cfg = __import__("dataclasses").replace(tiny["cfg"], batch_size=2)
    forget, masked = data["forget"], {0, 5}
    index = {tuple(r): i for i, r in enumerate(forget.rows.tolist())}
    steps = []

    def loss(model, ref, f, a, cfg):
        steps.append(sorted(index[tuple(r)] for r in f.rows.tolist()))
        return unlearn.loss_icu(model, ref, f, a, cfg)
    pairs = unlearn.analogues(target, forget, data["retain"])
    res = unlearn.unlearn(__import__("copy").deepcopy(target), target, [loss], forget, data["retain"], cfg,
                          {"rule": "budget"}, 1e-4, 2, "icu", pairs=pairs,
                          refine=lambda m: torch.tensor([i in masked for i in range(len(forget))]))
    gen, expect = torch.Generator().manual_seed(cfg.seed), []
    for _ in range(2):  # the same shuffles: each epoch's batches of all 8, less the masked samples
        expect += [k for k in (sorted(set(b.tolist()) - masked) for b in unlearn.batches(len(forget), 2, gen)) if k]
    assert steps == expect and res["steps"] == len(expect)
    assert any(len(s) == 1 for s in steps)  # a batch kept its place with one sample masked: not re-formed


def test_epochs_over_retain_eul_order_and_neggrad_plus(tiny):
    """EUL: a retain epoch (no forget rows; as many retain batches as a forget epoch, a named departure), then
    a forget epoch (no retain rows), as the paper orders them. RUM's NegGrad+: an epoch is a pass over the
    retain set, the forget batches cycled. ga reads no retain rows: its tokens are the forget set's alone."""
    data, target, cfg = tiny["data"], tiny["target"], tiny["cfg"]
    forget, retain = data["forget"], data["retain"]
    log = []

    def recorded(fn):
        @__import__("functools").wraps(fn)  # keeps the loss's `uses` and `epoch`
        def loss(model, ref, f, r, cfg):
            log.append((fn.__name__, None if f is None else len(f), None if r is None else len(r)))
            return fn(model, ref, f, r, cfg)
        return loss
    never = {"rule": "budget"}
    per_epoch = -(-len(retain) // cfg.batch_size)
    model = __import__("copy").deepcopy(target)
    unlearn.unlearn(model, target, [recorded(unlearn.loss_eul_retain), recorded(unlearn.loss_eul_forget)], forget,
                    retain, cfg, never, 1e-4, 2)
    assert log == [("loss_eul_retain", None, len(forget)), ("loss_eul_forget", len(forget), None)]  # one batch each
    log.clear()
    res = unlearn.unlearn(model, target, [recorded(unlearn.loss_neggrad_plus(0.99))], forget, retain, cfg, never, 1e-4, 1)
    assert res["steps"] == per_epoch and all(f == len(forget) for _, f, _ in log)
    res = unlearn.unlearn(model, target, [unlearn.loss_ga], forget, retain, cfg, never, 1e-4, 2)
    assert res["tokens"] == 2 * int((forget.y != -100).sum())


def test_bleu_by_hand():
    """ICU's BLEU (nltk's sentence_bleu: 1-4-grams weighted 1/4, brevity penalty, no smoothing, lowercased
    Treebank words), against values worked out by hand."""
    assert metrics.bleu("The cat sat on the mat.", "the cat sat on the mat .") == pytest.approx(1.0)
    # candidate 5 words, reference 6: p1..p4 = 4/5, 3/4, 2/3, 1/2; brevity penalty exp(1 - 6/5)
    expect = np.exp(1 - 6 / 5) * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert metrics.bleu("a b c d e f", "a b c d x") == pytest.approx(expect)
    assert metrics.bleu("a b c d", "a b c x") < 1e-10             # no common 4-gram: ~0 without smoothing
    assert metrics.bleu("a b c d", "") == 0.0


def test_icu_forgotten_test_by_hand():
    """ICU's per-sample test: the prompt is the record up to its first secret, the reference the rest of the
    record (not the closing <eot>), the continuation as long as the reference; forgotten when BLEU < 0.01."""
    row = [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]  # <eot> record <eot>, the secret at tokens 4-5
    split = hand_split([row, row], [10, 10], [[[4, 6]], []])  # the second row: no secret
    split.decode, split.eot = lambda ids: " ".join(f"w{i}" for i in ids), 0
    assert unlearn.icu_cuts(split, suffix_len=3) == [4, 6]      # no secret: suffix_len before the record's end
    gone, bleu, f1 = unlearn.forgotten(Oracle(row), split, beams=1)  # a parrot remembers everything
    assert bleu.tolist() == [1.0, 1.0] and not gone.any() and f1 is None  # no BERTScore on this machine
    # right but for the last suffix token: p1..p4 = 4/5, 3/4, 2/3, 1/2, BLEU 0.2^(1/4), still remembered
    gone, bleu, _ = unlearn.forgotten(Oracle(row[:8] + [9, 0]), split.take([0]), beams=1)
    assert bleu.item() == pytest.approx(0.2 ** 0.25) and not gone.any()
    gone, bleu, _ = unlearn.forgotten(Oracle([0] * 10), split, beams=1)  # says nothing of the record
    assert gone.all() and bleu.max() < 0.01
    # prefix_len / suffix_len (TDEC's 50 / 50): a 2-token prompt before the cut, 3 tokens generated after it
    asked = []
    parrot = Oracle(row)
    parrot.generate = lambda idx, n, beams=1: asked.append((idx.tolist(), n)) or Oracle.generate(parrot, idx, n)
    gone, bleu, _ = unlearn.forgotten(parrot, split.take([1]), prefix_len=2, suffix_len=3, beams=1)
    assert asked == [([[4, 5]], 3)]
    assert bleu.item() == 0.0 and gone.all()  # 3 words: no 4-gram at all, BLEU 0


def test_beam_continuation_matches_a_plain_beam_search():
    """2-beam continuation on the KV cache (beams reordered) against a beam search that recomputes every
    sequence from scratch; one beam is greedy decoding."""
    torch.manual_seed(3)
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=16, vocab_size=7, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # varied next-token distributions, so that beams and greedy part ways (2 of 6 rows)
    prompts = torch.randint(7, (6, 3))
    got = model.generate(prompts, 5, beams=2)[:, 3:]
    for p, g in zip(prompts, got):
        beams = [(0.0, p.tolist())]
        for _ in range(5):
            grown = []
            for score, seq in beams:
                with torch.no_grad():
                    logp = model.lm_head(model(torch.tensor([seq]))[0, -1]).log_softmax(-1)
                grown += [(score + logp[v].item(), seq + [v]) for v in range(7)]
            beams = sorted(grown, key=lambda b: -b[0])[:2]
        assert g.tolist() == beams[0][1][3:]
    assert not torch.equal(got, model.generate(prompts, 5, beams=1)[:, 3:])  # the test tells them apart


def test_full_batch_is_one_update_an_epoch(tiny):
    """Jang et al.'s setting: --batch_size at least the forget set takes one full-batch update an epoch, then
    the check; smaller batches take several. The rule compares strictly (<), as their code does."""
    cfg, data, target = tiny["cfg"], tiny["data"], tiny["target"]
    never = {"rule": "budget"}
    for batch_size, steps in ((len(data["forget"]), 3), (100, 3), (3, 9)):
        model = __import__("copy").deepcopy(target)
        c = __import__("dataclasses").replace(cfg, batch_size=batch_size)
        res = unlearn.unlearn(model, target, [unlearn.loss_ga], data["forget"], data["retain"], c, never, 1e-4, 3)
        assert res["steps"] == steps and res["stopped_by"] == "budget"
    ma = metrics.split_stats(target, data["forget"])["ma"]
    assert not unlearn.forget_check(target, data["forget"], {"rule": "rule", "ma": ma, "el10": 2.0}, cfg)[0]  # equal: not below
    assert unlearn.forget_check(target, data["forget"], {"rule": "rule", "ma": ma + 1e-6, "el10": 2.0}, cfg)[0]


def test_fila_official_importance_by_hand(monkeypatch):
    """FILA as its code has it: I = F_f / (1e-5 + F_r), raw row weights w = sqrt(Σ_j I), B's rows over w + 1e-5.
    Here the absolute ε decides which row the rank-1 adapter takes, where the normalised variant picks the other."""
    layer = __import__("model").LoRALinear(2, 2, bias=False)
    W = torch.tensor([[1.0, 0.0], [0.0, 1.2]])
    F_f = torch.tensor([[1e-5, 0.0], [1e-5, 0.0]])
    F_r = torch.tensor([[1e-8, 1e-8], [1e-6, 1e-6]])
    monkeypatch.setattr(unlearn, "fisher", lambda model, split, layers, on=None: ({layer: F_f if split == "f" else F_r}, None))
    model = type("M", (), {"lora_layers": lambda self: [layer]})()
    deltas = {}
    for kind in ("official", "normalised"):
        layer.weight.data, layer.lora_A = W.clone(), None
        unlearn.fila_init(model, "f", "r", unlearn.Config(rank=1, fila=kind))
        deltas[kind] = (layer.scale * layer.lora_B @ layer.lora_A).detach()  # the adapter's start s·B·A
        assert torch.equal(layer.merged_weight(), W)  # the function is unchanged: the start is subtracted in the layer
    # official: w = sqrt(1e-5 / (1e-5 + 1e-8)) and sqrt(1e-5 / (1e-5 + 1e-6)): row 1 wins (1.2·w1 > w0);
    # the adapter is s·B·A = diag(1/(w + 1e-5))·(rank-1 part of diag(w)·W) = e1·1.2·w1/(w1 + 1e-5)·e1ᵀ
    w1 = (1e-5 / (1e-5 + 1e-6)) ** 0.5
    assert torch.allclose(deltas["official"], torch.tensor([[0.0, 0.0], [0.0, 1.2 * w1 / (w1 + 1e-5)]]), atol=1e-6)
    # normalised (ε = 1e-6·mean F_r): w ∝ sqrt(1e-5/1e-8), sqrt(1e-5/1e-6) = 31.6, 3.16: row 0 wins
    assert torch.allclose(deltas["normalised"], torch.tensor([[1.0, 0.0], [0.0, 0.0]]), atol=1e-5)


def test_eul_fusion_is_the_closed_form():
    torch.manual_seed(0)
    xs = [torch.randn(40, 6, dtype=torch.float64), torch.randn(25, 6, dtype=torch.float64) * 3]
    ws = [torch.randn(3, 6, dtype=torch.float64) for _ in xs]
    fused = unlearn.fuse(ws, [x.t() @ x for x in xs])
    # independent: least squares on the stacked inputs, targets each request's outputs
    ls = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ w.t() for x, w in zip(xs, ws)])).solution.t()
    assert torch.allclose(fused, ls, atol=1e-6)
    assert torch.allclose(unlearn.fuse(ws[:1], [xs[0].t() @ xs[0]]), ws[0], atol=1e-6)  # one request: unchanged


def test_rum_thirds_partition_the_forget_set():
    scores = np.random.default_rng(0).normal(size=11)
    low, mid, high = unlearn.thirds(scores)
    assert sorted(torch.cat([low, mid, high]).tolist()) == list(range(11))
    assert sorted(len(t) for t in (low, mid, high)) == [3, 4, 4]
    assert scores[low].max() < scores[mid].min() and scores[mid].max() < scores[high].min()


def test_spearman_by_hand():
    assert unlearn.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert unlearn.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their average rank: ranks [1.5, 1.5, 3] and [1, 2, 3] -> Pearson 0.866...
    assert unlearn.spearman([5, 5, 9], [1, 2, 3]) == pytest.approx(np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1])


@needs_triton
def test_kernels_and_twins_give_the_same_run(tiny, monkeypatch):
    """One code path in unlearn.py: the same ih_flora run (FILA's Fisher, IH + CE losses, MA) through the
    Triton kernels (interpreted on the CPU) and through the twins ends with the same weights and metrics."""
    cfg, data, target = tiny["cfg"], tiny["data"], tiny["target"]
    # a small learning rate: Adam turns float rounding in a near-zero gradient into a step of ±lr, so the two
    # paths may part by a few lr on some entries whatever the kernels' accuracy
    cfg = __import__("dataclasses").replace(cfg, epochs=2, lora_lr=1e-5)
    runs = {}
    for name, fns in {"kernels": (kernels.fused_linear_loss, kernels.linear_token_stats, kernels.per_sample_grad_sq),
                      "twins": (kernels.fused_linear_loss_ref, kernels.linear_token_stats_ref,
                                kernels.per_sample_grad_sq_ref)}.items():
        for attr, fn in zip(("linear_loss", "token_stats", "grad_sq"), fns):
            monkeypatch.setattr(metrics if attr == "token_stats" else unlearn, attr, fn)
        torch.manual_seed(0)
        model = __import__("copy").deepcopy(target)
        res = unlearn.apply_method("ih_flora", model, target, data["forget"], data["retain"], data, cfg,
                                   {"rule": "budget"}, [])
        runs[name] = (res, model.state_dict(), metrics.split_stats(model, data["forget"])["ma"])
    (rk, wk, mak), (rt, wt, mat) = runs["kernels"], runs["twins"]
    assert rk["steps"] == rt["steps"] and rk["stopped_by"] == rt["stopped_by"]
    diff = max((wk[k] - wt[k]).abs().max().item() for k in wt)
    assert diff < 1e-4, diff  # the adapters move by ~1e-5 a step: 16 steps
    assert abs(mak - mat) < 1e-6
    assert not torch.allclose(wt["transformer.h.0.attn.c_attn.weight"], target.state_dict()["transformer.h.0.attn.c_attn.weight"])


def test_fila_leaves_the_function_unchanged_at_step_0(tiny):
    """FILA starts the adapter at B·A and subtracts that start (W - s·B·A in FILA's code): the outputs are those
    of the target, while the adapter itself is far from zero (unlike plain LoRA's B = 0) and points where the
    forget set's Fisher is."""
    cfg, data, target = tiny["cfg"], tiny["data"], tiny["target"]
    model = __import__("copy").deepcopy(target)
    unlearn.add_adapters(model, "flora", data["forget"], data["retain"], cfg)
    x = data["forget"].x
    with torch.no_grad():
        assert torch.allclose(model.lm_head(model(x)), target.lm_head(target(x)), atol=1e-4)
    layers = model.lora_layers()
    assert all(m.lora_B.abs().max() > 1e-3 and m.lora_A.shape[0] == cfg.rank for m in layers)
    assert [p.requires_grad for p in model.parameters()].count(True) == 2 * len(layers)  # only A and B train


def bf16_setup(tiny, **changes):
    """The tiny target in bf16 (the run's dtype under --dtype bfloat16) and its config."""
    cfg = __import__("dataclasses").replace(tiny["cfg"], dtype="bfloat16", **changes)
    return cfg, __import__("copy").deepcopy(tiny["target"]).to(torch.bfloat16)


def test_fila_start_and_adapters_off_are_the_target_in_bf16(tiny):
    """Under --dtype bfloat16 FILA's start (adapters at their initial values) and adapters_off() compute the
    target's logits bit for bit: W is left as it is, the start s·B0·A0 is subtracted in the layer."""
    cfg, target = bf16_setup(tiny)
    model = __import__("copy").deepcopy(target)
    x = tiny["data"]["forget"].x
    with unlearn.autocast(cfg), torch.no_grad():
        unlearn.add_adapters(model, "flora", tiny["data"]["forget"], tiny["data"]["retain"], cfg)
        want = target.lm_head(target(x))
        assert torch.equal(model.lm_head(model(x)), want)
        with model.adapters_off():
            assert torch.equal(model.lm_head(model(x)), want)
    layers = model.lora_layers()
    assert all(m.lora_A.dtype == m.lora_B.dtype == torch.float32 and m.weight.dtype == torch.bfloat16 for m in layers)
    assert all(m.lora_B.abs().max() > 1e-3 for m in layers)  # far from zero: the cancellation is not trivial


@pytest.mark.parametrize("method", ["ga", "kl_lora"])
def test_bf16_trains_fp32_master_weights(tiny, monkeypatch, method):
    """--dtype bfloat16: what trains (all of θ; the LoRA adapters) and AdamW's moments are fp32, what is frozen
    (θ0, the LoRA base) stays bf16."""
    cfg, target = bf16_setup(tiny, epochs=1)
    opts = []

    class Spy(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opts.append(self)
    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    model = __import__("copy").deepcopy(target)
    with unlearn.autocast(cfg):
        unlearn.apply_method(method, model, target, tiny["data"]["forget"], tiny["data"]["retain"], tiny["data"], cfg,
                             {"rule": "budget"}, [])
    (opt,) = opts
    params = opt.param_groups[0]["params"]
    assert params and all(p.dtype == torch.float32 for p in params)
    assert all(opt.state[p][k].dtype == torch.float32 for p in params for k in ("exp_avg", "exp_avg_sq"))
    assert {p.dtype for p in target.parameters()} == {torch.bfloat16}
    # full weights: θ is the fp32 master; LoRA: merged into the bf16 base, which stays bf16
    assert {p.dtype for p in model.parameters()} == {torch.float32 if method == "ga" else torch.bfloat16}


def test_bf16_full_weight_run_moves_like_fp32(tiny):
    """A short full-weight run at a small learning rate under --dtype bfloat16 (bf16 compute, fp32 master
    weights) moves the weights as the fp32 run from the same bf16 target does, and ends with the same metrics.
    With bf16 weights most of such a step rounds away (issue 16: 35% of the fp32 update's norm at lr 5e-6)."""
    cfg, target = bf16_setup(tiny, epochs=5, lr=2e-5)
    data = tiny["data"]
    start = {k: v.float() for k, v in target.state_dict().items()}
    runs = {}
    for dtype in ("float32", "bfloat16"):
        c = __import__("dataclasses").replace(cfg, dtype=dtype)
        ref = target if dtype == "bfloat16" else __import__("copy").deepcopy(target).float()
        model = __import__("copy").deepcopy(ref)
        torch.manual_seed(0)
        with unlearn.autocast(c):
            unlearn.apply_method("kl", model, ref, data["forget"], data["retain"], data, c, {"rule": "budget"}, [])
            ma = {s: metrics.split_stats(model, data[s])["ma"] for s in ("forget", "retain")}
        delta = torch.cat([(v.float() - start[k]).flatten() for k, v in model.state_dict().items()])
        runs[dtype] = delta, ma
    (d32, ma32), (d16, ma16) = runs["float32"], runs["bfloat16"]
    ratio, cos = (d16.norm() / d32.norm()).item(), F.cosine_similarity(d16, d32, dim=0).item()
    print(f"update norm ratio {ratio:.3f}, cosine {cos:.3f}, MA fp32 {ma32}, bf16 {ma16}")
    assert 0.9 < ratio < 1.1 and cos > 0.9, (ratio, cos)  # bf16 weights: 0.32 and 0.24
    assert all(abs(ma16[s] - ma32[s]) < 0.02 for s in ma32), (ma32, ma16)


def bpe_checkpoint(folder, family, context=256):
    """A random-init transformers model of `family` and a small byte-level BPE tokenizer trained on people
    records, saved to `folder`: the offline stand-in for a hub checkpoint (gpt2, a Llama...)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer
    sys.path.insert(0, os.path.join(unlearn.ROOT, "data", "people"))
    import random
    import prepare as people
    rng = random.Random(0)
    texts = ["".join(t for t, _ in people.person(rng, f"{f} {l}")) for f in people.FIRST for l in people.LAST]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                               bos_token="<|endoftext|>")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                                          rope_theta=5000.0, tie_word_embeddings=False, eos_token_id=0, bos_token_id=0)
        hf = transformers.LlamaForCausalLM(config)
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=context, n_embd=32, n_layer=2, n_head=2,
                                                                  vocab_size=len(tok), eos_token_id=0, bos_token_id=0))
    hf.save_pretrained(folder)
    return tok


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ih_flora_from_a_checkpoint_folder(tmp_path, family):
    """--init_from a transformers folder: data tokenized with its own tokenizer (full vocabulary), the target
    fine-tuned from it, unlearned, and <out_dir>/ih_flora/model/ loadable by transformers with the same logits.
    With --seeds 2 the exported model is the first seed's, whose numbers results.json's `after` holds."""
    transformers = pytest.importorskip("transformers")
    ckpt = tmp_path / "ckpt"
    tok = bpe_checkpoint(ckpt, family)
    tag = unlearn.common.load(str(ckpt)).tag
    subprocess.run([sys.executable, os.path.join(unlearn.ROOT, "data", "people", "prepare.py"), "--tokenizer", str(ckpt),
                    "--n_forget", "4", "--n_retain", "60", "--n_holdout", "8", "--out_dir",
                    str(tmp_path / "data" / "people" / tag)], check=True, capture_output=True)
    out = tmp_path / "out"
    argv = ["--init_from", str(ckpt), "--data_dir", str(tmp_path / "data"), "--out_dir", str(out),
            "--train_epochs=2", "--train_lr=1e-3", "--epochs=2", "--rank=2", "--device=cpu", "--seeds=2"]
    unlearn.main(argv)
    res = __import__("json").load(open(out / "ih_flora" / "results.json"))
    assert res["model_dir"] == str(out / "ih_flora" / "model") and res["steps"] > 0 and res["model_seed"] == 1337
    cfg = unlearn.parse_args(argv)
    _, data = unlearn.load_data(cfg, unlearn.load_tokenizer(str(ckpt)))
    exported = metrics.split_stats(GPT.from_pretrained(str(out / "ih_flora" / "model")).eval(), data["forget"])["ppl"]
    assert exported == pytest.approx(res["after"]["forget"]["ppl"], rel=1e-6)
    assert res["seeds"][1]["forget MA"] != res["seeds"][0]["forget MA"] or \
        res["seeds"][1]["retain ppl"] != pytest.approx(res["seeds"][0]["retain ppl"], rel=1e-6)  # the seeds differ
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "ih_flora" / "model").eval()
    ours = GPT.from_pretrained(str(out / "ih_flora" / "model")).eval()
    assert ours.config.vocab_size == len(tok)  # the checkpoint's full vocabulary, not the data's
    x = torch.tensor([tok.encode("Ada Berg was born on")])
    with torch.no_grad():
        assert torch.allclose(ours.lm_head(ours(x)), hf(x).logits, atol=1e-4)
        assert not torch.allclose(hf(x).logits, transformers.AutoModelForCausalLM.from_pretrained(ckpt)(x).logits, atol=1e-3)
    assert transformers.AutoTokenizer.from_pretrained(out / "ih_flora" / "model").encode("Ada Berg") == tok.encode("Ada Berg")


def test_same_command_same_numbers(tiny):
    """Seeds make runs repeatable: the same method twice on the CPU gives the same weights, bit for bit."""
    cfg, data, target = tiny["cfg"], tiny["data"], tiny["target"]
    cfg = __import__("dataclasses").replace(cfg, epochs=2)
    states = []
    for _ in range(2):
        torch.manual_seed(cfg.seed)
        model = __import__("copy").deepcopy(target)
        unlearn.apply_method("ih_lora", model, target, data["forget"], data["retain"], data, cfg,
                             {"rule": "budget"}, [])
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["transformer.h.0.mlp.c_fc.weight"], target.state_dict()["transformer.h.0.mlp.c_fc.weight"])


def test_learning_events_and_their_proxies_by_hand():
    """RUM's learning events of one training epoch: per sample, means over its own tokens (not padding) of
    p(y), max p, entropy and argmax accuracy; the proxies average them over epochs and orient them."""
    split = hand_split([[0, 1, 2, 3, 4, 5, 9, 9]], [6], [[]])
    model = Oracle([0, 1, 2, 7, 4, 8, 9, 9])  # right on 3 of 5 targets, with p = softmax of 10 vs 0s
    p = torch.softmax(torch.tensor([10.0] + [0.0] * 9), 0)
    ev = unlearn.learning_events(model, split)
    assert ev["confidence"].item() == pytest.approx(((3 * p[0] + 2 * p[1]) / 5).item(), rel=1e-5)
    assert ev["max_confidence"].item() == pytest.approx(p[0].item(), rel=1e-5)
    assert ev["entropy"].item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-4)
    assert ev["accuracy"].item() == pytest.approx(3 / 5)
    split.events = {k: torch.stack([v, 3 * v]).mean(0) for k, v in ev.items()}  # two epochs, averaged
    assert unlearn.proxy_confidence(None, split, None, None)[0] == pytest.approx(2 * ev["confidence"].item(), rel=1e-5)
    assert unlearn.proxy_entropy(None, split, None, None)[0] == pytest.approx(-2 * ev["entropy"].item(), rel=1e-5)
    split.events = None
    with pytest.raises(unlearn.UserError, match="learning events"):
        unlearn.proxy_accuracy(None, split, None, None)


def test_fluency_by_hand(tiny):
    """The secret fields of a generated record are found from the template; the target and a model that
    recites the template without secrets both keep fidelity 1 and no repetition."""
    text = "Ada Berg was born on 1990-01-02 in Porto and works as a baker. Phone: 123-4567-8901. Email: ab.c@x.net. Account: X"
    spans = metrics.secret_fields(text, unlearn.people.TEMPLATE, unlearn.people.SECRET_AFTER)
    assert [text[a:b] for a, b in spans] == [" 123-4567-8901. ", " ab.c@x.net. ", " X"]
    meta = dict(tiny["meta"], record_template=unlearn.people.TEMPLATE, secret_after=unlearn.people.SECRET_AFTER)
    f = metrics.fluency(tiny["target"], tiny["target"], tiny["data"]["forget"], meta, real_nll=10.0)
    assert f["fidelity"] == pytest.approx(1.0) and f["repetition"] < 0.05 and f["score"] > 0.9
    g = metrics.fluency(tiny["target"], tiny["target"], tiny["data"]["forget"], meta, real_nll=0.0)
    assert g["score"] < f["score"]  # a perplexity far above the real records' costs score


def test_rum_budgets_add_up():
    for epochs in (1, 3, 4, 30, 31):
        b = unlearn.budgets(epochs, [1, 1, 2])
        assert (sum(b) == epochs or epochs < 3) and min(b) >= 1
    assert unlearn.budgets(30, [1, 1, 2]) == [8, 7, 15]  # 31 before: 8 + 8 + 15 for 30


# ---- benchmarks: TDEC and TOFU data (data/tdec, data/tofu) and TOFU's metrics -------------------------------
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
sys.path.insert(0, DATA)
import common  # noqa: E402


def load_prepare(dataset):
    spec = importlib.util.spec_from_file_location(f"{dataset}_prepare", os.path.join(DATA, dataset, "prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prepare_fails(mod, argv, capsys, message):
    """A bad input: exit status not 0, one line naming the problem, and no prepared output left behind."""
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    err = str(e.value.code) + capsys.readouterr().err
    assert e.value.code not in (0, None) and message in err and "Traceback" not in err, err
    out_dir = argv[argv.index("--out_dir") + 1]
    assert not os.path.exists(os.path.join(out_dir, "meta.json"))
    return err


@pytest.fixture(scope="module")
def tdec32(tmp_path_factory):
    out = tmp_path_factory.mktemp("tdec")
    load_prepare("tdec").main(["--out_dir", str(out)])
    return out


def test_tdec_prepare_rows_kinds_and_meta(tdec32):
    meta = json.load(open(tdec32 / "meta.json"))
    sets = json.load(open(os.path.join(DATA, "tdec", "forget_sets.json")))
    samples = np.concatenate([np.load(os.path.join(DATA, "tdec", f"train_{p}.npy"))
                              for p in ("preprefix", "prefix", "suffix")], 1).astype(np.int64)
    forget = np.load(tdec32 / "forget.npz")
    ids, kind = forget["ids"], forget["kind"]
    assert ids.shape == kind.shape == (32, 201) and meta["splits"]["forget"] == 32
    # GPT-2 ids as they are, Jang's order, no bos (their inputs are the sample alone), then the format's eot
    assert (ids[:, :200] == samples[sets["lm_extraction_32_0"]]).all() and meta["row_start"] == 0
    assert (ids[:, 200] == common.GPT2_EOT).all()
    # Jang et al. score the sample's tokens 1..199; the suffix (tokens 150..199) is the secret
    assert (kind[:, :1] == 0).all() and (kind[:, 1:150] == 1).all() and (kind[:, 150:200] == 3).all() and (kind[:, 200] == 0).all()
    retain = set(meta["doc_ids"]["retain"])
    assert len(retain) == 128 and not retain & set(i for v in sets.values() for i in v)
    assert (np.load(tdec32 / "retain.npz")["ids"][:, :200] == samples[meta["doc_ids"]["retain"]]).all()
    analogues = meta["doc_ids"]["analogues"]
    assert len(analogues) == 15000 - 128 and not set(analogues) & set(sets["lm_extraction_128_0"])
    assert np.load(tdec32 / "analogues.npz")["ids"].shape == (14872, 201) and meta["analogues"]["split"] == "analogues"
    p = meta["protocol"]
    assert (p["ma"], p["el10"], p["comparison"], p["both"]) == (0.2994, 0.0499, "<", True) and "Neo_Model.py" in p["source"]
    assert p["icu"]["ma"] == 0.5994 and p["icu"]["el_first"] == 150 and meta["holdout"] is None and not os.path.exists(tdec32 / "holdout.npz")
    assert "shipped" in meta["source"] and meta["reencoded"] is False


def test_tdec_icu_cut_and_el_prefixes(tdec32):
    """ICU on TDEC: the per-sample test continues tokens 100-149 for 50 tokens against tokens 150-199 (the
    sample's last token is scored: no closing eot to leave out), and ICU's EL runs prefixes of 150..190 tokens,
    divided by 41, where Jang's runs 1..190 (/ 190)."""
    f = np.load(tdec32 / "forget.npz")
    split = unlearn.Split(f["ids"][:2], f["kind"][:2], "cpu", start=0)
    split.decode, split.eot = lambda ids: " ".join(map(str, ids)), common.GPT2_EOT
    assert unlearn.icu_cuts(split) == [150, 150] and unlearn.record_ends(split) == [200, 200]
    asked = []

    class Mute:  # says token 0 forever, and records what it was asked
        def generate(self, idx, n, beams=1):
            asked.append((idx.clone(), n))
            return torch.cat([idx, torch.zeros(len(idx), n, dtype=idx.dtype)], 1)

        def continue_prefixes(self, rows, row, start, steps, budget=None, progress=None):
            asked.append((start.clone(), steps.clone()))
            return torch.zeros(len(row), int(steps.max()), dtype=rows.dtype)
    unlearn.forgotten(Mute(), split, beams=1)
    assert asked[0][1] == 50 and torch.equal(asked[0][0], split.rows[:, 100:150])
    for first, prefixes in ((150, range(150, 191)), (1, range(1, 191))):
        asked.clear()
        metrics.extraction(Mute(), split, 10, first)
        assert len(asked) == 1 and sorted(set(asked[0][0].tolist())) == list(prefixes)  # every prefix, one call


def test_tdec_prepare_reencodes_other_tokenizers(tmp_path, monkeypatch, capsys):
    """A tokenizer that is not GPT-2's BPE: decode each part with GPT-2's BPE, re-encode, say so. (A GPT-2
    tokenizer flagged otherwise, so the text must come back the same.)"""
    mod = load_prepare("tdec")
    g = common.gpt2()
    other = common.Tokenizer("other/tok", g.encode, g.decode, g.bos, g.eot, g.vocab_size, False)
    monkeypatch.setattr(mod.common, "load", lambda name: other)
    mod.main(["--tokenizer", "other/tok", "--forget_set", "lm_extraction_4_1", "--out_dir", str(tmp_path)])
    assert "re-encoding it with other/tok" in capsys.readouterr().out
    meta = json.load(open(tmp_path / "meta.json"))
    assert meta["reencoded"] and meta["splits"]["forget"] == 4
    f = np.load(tmp_path / "forget.npz")
    sets = json.load(open(os.path.join(DATA, "tdec", "forget_sets.json")))
    pre = np.load(os.path.join(DATA, "tdec", "train_preprefix.npy"))
    for row, kind, doc in zip(f["ids"], f["kind"], sets["lm_extraction_4_1"]):
        n = int((kind > 0).sum()) + 1  # the sample's tokens: the scored ones and the first
        assert g.decode(row[:n].tolist()).startswith(g.decode(pre[doc].tolist()))
        assert kind[0] == 0 and (kind[n:] == 0).all() and kind[n - 1] == 3


def test_tdec_prepare_bad_input(tmp_path, monkeypatch, capsys):
    mod = load_prepare("tdec")
    out = str(tmp_path / "out")
    err = prepare_fails(mod, ["--forget_set", "lm_extraction_64_0", "--out_dir", out], capsys, "unknown forget set")
    assert "lm_extraction_128_4" in err and "lm_extraction_1_0" in err  # the valid ones are listed
    src = tmp_path / "src"
    shutil.copytree(os.path.join(DATA, "tdec"), src, ignore=shutil.ignore_patterns("prepare.py", "gpt2", "__pycache__"))
    monkeypatch.setattr(mod, "HERE", str(src))
    os.remove(src / "train_suffix.npy")
    prepare_fails(mod, ["--out_dir", out], capsys, "train_suffix.npy is missing")
    shutil.copy(os.path.join(DATA, "tdec", "train_suffix.npy"), src)
    data = (src / "train_prefix.npy").read_bytes()
    (src / "train_prefix.npy").write_bytes(data[:len(data) // 2])  # truncated
    prepare_fails(mod, ["--out_dir", out], capsys, "truncated")
    np.save(src / "train_prefix.npy", np.load(os.path.join(DATA, "tdec", "train_prefix.npy"))[:, :49])  # wrong shape
    prepare_fails(mod, ["--out_dir", out], capsys, "expected (15000, 50)")
    a = np.load(os.path.join(DATA, "tdec", "train_prefix.npy"))
    a[0, 0] ^= 1
    np.save(src / "train_prefix.npy", a)  # one token changed: the challenge's md5 catches it
    prepare_fails(mod, ["--out_dir", out], capsys, "md5")
    shutil.copy(os.path.join(DATA, "tdec", "train_prefix.npy"), src)
    (src / "forget_sets.json").write_text((src / "forget_sets.json").read_text()[:500])
    prepare_fails(mod, ["--out_dir", out], capsys, "forget_sets.json is not valid JSON")
    assert not os.listdir(tmp_path / "out") if os.path.exists(tmp_path / "out") else True


@pytest.fixture(scope="module")
def tofu01(tmp_path_factory):
    out = tmp_path_factory.mktemp("tofu")
    load_prepare("tofu").main(["--forget_set", "forget01", "--out_dir", str(out)])
    return out


def read_jsonl(name):
    return [json.loads(l) for l in open(os.path.join(DATA, "tofu", f"{name}.json"))]


def test_tofu_prepare_answer_only_loss(tofu01):
    """open-unlearning's plain format for GPT-2: "Question: q\\nAnswer: a" + eos tokenized as one string, the
    loss on the tokens after len(tokenize("Question: q\\nAnswer: ")), i.e. the answer and eos."""
    g = common.gpt2()
    meta = json.load(open(tofu01 / "meta.json"))
    assert meta["template"] == "plain" and meta["retain_set"] == "retain99" and meta["protocol"]["rule"] == "fixed budget"
    sizes = dict(forget=40, retain=3960, forget_answer=40, forget_para=40, forget_pert=200, retain_answer=400,
                 retain_pert=2000, ra_answer=100, ra_pert=300, wf_answer=117, wf_pert=351, wf_prompt=117)
    assert all(meta["splits"][k] == v for k, v in sizes.items())
    recs = read_jsonl("forget01")
    f = np.load(tofu01 / "forget.npz")
    for row, kind, r in zip(f["ids"], f["kind"], recs):
        prompt = "Question: " + r["question"] + "\nAnswer: "
        full = [g.eot] + g.encode(prompt + r["answer"]) + [g.eot]
        assert row[:len(full)].tolist() == full and (kind[len(full):] == 0).all()
        n_prompt = 1 + len(g.encode(prompt))
        assert (kind[:n_prompt] == 0).all() and (kind[n_prompt:len(full)] == 1).all()
    pert = np.load(tofu01 / "forget_pert.npz")
    recs_p = read_jsonl("forget01_perturbed")
    row, kind = pert["ids"][7], pert["kind"][7]  # record 1, its perturbed answer 2 (5 a record)
    text = g.decode(row[kind > 0].tolist())
    assert text.endswith("<|endoftext|>") and recs_p[1]["perturbed_answer"][2].endswith(text[:-13].strip())
    prompts = np.load(tofu01 / "forget_prompt.npz")["ids"]
    n = meta["eval"]["forget"]["prompt_lengths"][3]
    assert g.decode(prompts[3, :n].tolist()) == "<|endoftext|>Question: " + recs_p[3]["question"] + "\nAnswer: "
    assert meta["eval"]["forget"]["answers"][3] == recs_p[3]["answer"] and meta["eval"]["ra"]["n_pert"] == 3


def test_tofu_prepare_bad_input(tmp_path, monkeypatch, capsys):
    mod = load_prepare("tofu")
    out = str(tmp_path / "out")
    err = prepare_fails(mod, ["--forget_set", "forget20", "--out_dir", out], capsys, "unknown forget set")
    assert "forget01, forget05, forget10" in err
    src = tmp_path / "src"
    shutil.copytree(os.path.join(DATA, "tofu"), src, ignore=shutil.ignore_patterns("prepare.py", "gpt2", "__pycache__"))
    monkeypatch.setattr(mod, "HERE", str(src))
    lines = (src / "forget01.json").read_text().splitlines(True)
    (src / "forget01.json").write_text("".join(lines[:5]) + json.dumps({"question": "Who?"}) + "\n" + "".join(lines[6:]))
    prepare_fails(mod, ["--forget_set", "forget01", "--out_dir", out], capsys, "forget01.json line 6: a record without an answer")
    (src / "forget01.json").write_text("".join(lines)[:3000])  # cut in the middle of a record
    prepare_fails(mod, ["--forget_set", "forget01", "--out_dir", out], capsys, "not valid JSON")
    (src / "forget01.json").write_text("".join(lines[:30]))  # cut at a line end
    prepare_fails(mod, ["--forget_set", "forget01", "--out_dir", out], capsys, "has 30 records, expected 40")
    (src / "forget01.json").write_text("".join(lines))
    os.remove(src / "world_facts_perturbed.json")
    prepare_fails(mod, ["--forget_set", "forget01", "--out_dir", out], capsys, "world_facts_perturbed.json is missing")


# TOFU's metrics, by hand from the formulas (open-unlearning src/evals/metrics/memorization.py, utils.py)
def test_tofu_probability_is_length_normalised():
    # three answers: log-prob sums over 4, 2 and 5 tokens
    p = tofu.tofu_prob([-2.0, -0.5, -10.0], [4, 2, 5])
    assert np.allclose(p, [math.exp(-0.5), math.exp(-0.25), math.exp(-2.0)], rtol=1e-12)
    assert np.allclose(tofu.tofu_prob([[-1.0, -3.0]], [[1, 3]]), [[math.exp(-1), math.exp(-1)]])


def test_tofu_truth_ratio_forms_by_hand():
    # question 1: p(correct) 0.5, perturbed 0.25 and 0.04 -> geometric mean 0.1 -> R = 0.2
    # question 2: p(correct) 0.2, perturbed 0.2 and 0.8 -> geometric mean 0.4 -> R = 2.0
    loss = lambda p: -np.log(p)  # truth_ratios takes each answer's avg_loss
    r = tofu.truth_ratios(loss([0.5, 0.2]), loss([[0.25, 0.04], [0.2, 0.8]]))
    assert np.allclose(r, [0.2 / (1 + 2e-10), 2.0 / (1 + 5e-10)], rtol=1e-12)  # geometric, not arithmetic (0.29, 2.5)
    assert tofu.truth_ratio_stat(r, "closer_to_1_better") == pytest.approx((0.2 + 0.5) / 2)  # min(R, 1/R)
    assert tofu.truth_ratio_stat(r, "true_better") == pytest.approx((0.8 + 0.0) / 2)  # max(0, 1 - R)
    with pytest.raises(ValueError):
        tofu.truth_ratio_stat(r, "mean")


def test_tofu_truth_ratio_with_a_huge_loss_by_hand():
    """open-unlearning averages the perturbed answers' avg_loss before the exp: one perturbed answer at 800
    nats (probability below float64's 1e-308) and one at 10 give exp(-405) / (exp(-5) + 1e-10), not 0."""
    r = tofu.truth_ratios([5.0], [[800.0, 10.0]])
    assert r[0] > 0 and r[0] == pytest.approx(math.exp(-405) / (math.exp(-5) + 1e-10), rel=1e-12)
    assert math.exp(-800) == 0.0  # what a product of probabilities would have made of it: R = 0


def test_tofu_extraction_strength_and_privleak_by_hand():
    """extraction strength: 1 - k/n, k the first position from which every argmax is right, 1/n where none
    is (their loop's end); privleak from the Min-K% (k = 0.4) AUC of forget against holdout."""
    hits = [[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1, 1]]  # k = 0, 3, (3: none), 2
    assert tofu.extraction_strength(hits) == pytest.approx((1 + 1 / 4 + 1 / 4 + 3 / 5) / 4)
    # Min-K 40%: 5 tokens -> the 2 lowest; 2 tokens -> 1 (at least one)
    scores = tofu.min_k_scores([[-1.0, -5.0, -0.1, -3.0, -0.2], [-2.0, -0.5]])
    assert scores.tolist() == pytest.approx([4.0, 2.0])
    # forget scores [1, 2], holdout [2, 3]: P(holdout > forget) = 3/4 + ties 1/4 · 1/2 = 0.875;
    # privleak against a retain model's 0.6: ((1 - 0.875) - 0.4) / 0.4 · 100 = -68.75; against 0.5: -75
    auc, leak = tofu.privleak([1.0, 2.0], [2.0, 3.0], 0.6)
    assert auc == pytest.approx(0.875) and leak == pytest.approx(-68.75, rel=1e-8)
    assert tofu.privleak([1.0, 2.0], [2.0, 3.0])[1] == pytest.approx(-75.0, rel=1e-8)


def test_tofu_normalised_probability_and_harmonic_mean_by_hand():
    # 0.6 / (0.6 + 0.1 + 0.1 + 0.2) = 0.6 and 0.1 / (0.1 + 0.9) = 0.1: the sum over the perturbed answers
    assert tofu.tofu_prob_normalised([0.6, 0.1], [[0.1, 0.1, 0.2], [0.3, 0.3, 0.3]]) == pytest.approx(0.35)
    assert tofu.harmonic_mean([0.5, 0.25, 1.0]) == pytest.approx(3 / 7)
    assert tofu.harmonic_mean([0.2, 0.4, 0.8]) == pytest.approx(0.34285714285714286, rel=1e-12)  # scipy.stats.hmean
    assert tofu.harmonic_mean([0.5, 0.0, 0.3]) == 0.0  # as scipy.stats.hmean


def test_ks_2samp_pvalue_matches_scipy():
    """Values from scipy 1.17.1, scipy.stats.ks_2samp(a, b).pvalue (method 'auto' = exact at these sizes),
    computed once and written here; the asymptotic ks_pvalue misses most of them by 10% or more."""
    cases = [
        (np.linspace(0, 1, 400) ** 2, np.linspace(0.05, 1.05, 400), 2.776495661774257e-16),
        (np.linspace(0, 1, 40) ** 2, np.linspace(0.1, 1.1, 40), 0.01430154804770646),
        (np.linspace(0, 1, 30) ** 2, np.linspace(0.1, 1.1, 45), 0.012657056536752991),  # unequal sizes
        (np.linspace(0, 1, 400), np.linspace(0, 1, 400) ** 3, 8.116767699925149e-27),
        (np.round(np.linspace(0, 1, 40), 1), np.round(np.linspace(0.2, 1.2, 40), 1), 0.404587405685253),  # ties
        ([5, 0.5], [0.1, 0.05], 1 / 3),  # by hand: D = 1, 2 of the C(4, 2) = 6 paths reach it
        ([5, 0.5, 3], [0.1, 0.05, 4], 0.6),
    ]
    for a, b, want in cases:
        assert tofu.ks_pvalue(a, b) == pytest.approx(want, rel=1e-9)
    assert tofu.ks_pvalue([1, 2, 3], [1, 2, 3]) == 1.0


def test_rouge_l_recall_settings():
    # LCS 3 of the answer's 6 tokens; with the stemmer "running" matches "runs" (2/3 without it)
    assert tofu.rouge_l_recall(["the cat sat", "he running fast"], ["the cat sat on the mat", "He runs fast"]).tolist() == [0.5, 1.0]


def tofu_case():
    """Fixed per-answer log-probabilities (count 2 each) for two questions a split, and their hand values."""
    lp = lambda probs: (2 * np.log(np.asarray(probs, float)), np.full(np.shape(probs), 2))
    stats = {
        "forget_answer": lp([0.5, 0.3]), "forget_para": lp([0.5, 0.2]), "forget_pert": lp([[0.25, 0.04], [0.2, 0.8]]),
        "retain_answer": lp([0.9, 0.7]), "retain_para": lp([0.5, 0.2]), "retain_pert": lp([[0.25, 0.04], [0.2, 0.8]]),
        "ra_answer": lp([0.6, 0.1]), "ra_pert": lp([[0.1, 0.1, 0.4], [0.3, 0.3, 0.3]]),
        "wf_answer": lp([0.5, 0.5]), "wf_pert": lp([[0.5, 0.5, 0.5], [0.125, 0.125, 1.0]]),
    }
    rouge = {"forget": [1.0, 0.5], "retain": [0.8, 0.6], "ra": [1.0, 1.0], "wf": [0.5, 0.25]}
    ra_tr = [(0.1 * 0.1 * 0.4) ** (1 / 3) / 0.6, 0.3 / 0.1]
    parts = dict(retain_Q_A_Prob=0.8, retain_Q_A_ROUGE=0.7, retain_Truth_Ratio=0.4,
                 ra_Q_A_Prob_normalised=(0.6 / 1.2 + 0.1 / 1.0) / 2, ra_Q_A_ROUGE=1.0,
                 ra_Truth_Ratio=(max(0, 1 - ra_tr[0]) + max(0, 1 - ra_tr[1])) / 2,
                 wf_Q_A_Prob_normalised=(0.5 / 2.0 + 0.5 / 1.75) / 2, wf_Q_A_ROUGE=0.375,
                 wf_Truth_Ratio=(0.0 + 0.5) / 2)  # R = 0.5/0.5 = 1 and (1/64)^(1/3)/0.5 = 0.5
    return stats, rouge, parts


def test_tofu_metrics_block_by_hand():
    stats, rouge, parts = tofu_case()
    out = tofu.tofu_metrics(stats, rouge)
    assert out["forget_Q_A_Prob"] == pytest.approx(0.4) and out["forget_Q_A_ROUGE"] == pytest.approx(0.75)
    assert out["forget_truth_ratio"] == pytest.approx(0.35) and out["forget_quality"] is None
    for k, v in parts.items():
        assert out["model_utility_parts"][k] == pytest.approx(v, rel=1e-8), k
    assert out["model_utility"] == pytest.approx(9 / sum(1 / v for v in parts.values()), rel=1e-8)
    assert list(out["model_utility_parts"]) == list(tofu.TOFU_UTILITY)
    # forget quality: the KS test on R (privacy.py ks_test); R = [0.2, 2] against an oracle's [10, 20]: D = 1,
    # p = 1/3 (test above); against itself p = 1
    assert tofu.tofu_metrics(stats, rouge, [10.0, 20.0])["forget_quality"] == pytest.approx(1 / 3)
    assert tofu.tofu_metrics(stats, rouge, out["forget_truth_ratios"])["forget_quality"] == 1.0


def test_evaluate_tofu_plumbing(tofu01):
    """evaluate_tofu on a random GPT over a few questions of the prepared TOFU: its log-probabilities are
    those of full logits, its greedy answers those of one prompt at a time, its block the formulas' above.
    The token ids are renumbered into the few the questions use, so the model's vocabulary stays small."""
    g = common.gpt2()
    meta = json.load(open(tofu01 / "meta.json"))
    keep = {"forget": [0, 1, 2], "retain": [5, 9], "ra": [0, 3], "wf": [1, 2]}
    splits, ev = {}, {}
    for s, e in meta["eval"].items():
        idx, k = keep[s], e["n_pert"]
        for kind_ in ("answer", "para", "prompt", "pert"):
            if kind_ in e:
                d = np.load(tofu01 / f"{e[kind_]}.npz")
                rows = [j * k + m for j in idx for m in range(k)] if kind_ == "pert" else idx
                splits[e[kind_]] = {"ids": d["ids"][rows], "kind": d["kind"][rows]}
        ev[s] = dict(e, n=len(idx), prompt_lengths=[e["prompt_lengths"][j] for j in idx], answers=[e["answers"][j] for j in idx])
    vocab = np.unique(np.concatenate([d["ids"].ravel() for d in splits.values()]))
    for d in splits.values():
        d["ids"] = np.searchsorted(vocab, d["ids"])
    eot = int(np.searchsorted(vocab, g.eot))
    decode = lambda ids: g.decode(vocab[ids].tolist())
    meta = dict(meta, eval=ev, eot=eot)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=160, vocab_size=len(vocab), n_layer=1, n_head=2, n_embd=16)).eval()
    total, count = tofu.answer_logprobs(model, splits["forget_answer"])
    rows, kind = (torch.as_tensor(splits["forget_answer"][k].astype(np.int64)) for k in ("ids", "kind"))
    with torch.no_grad():
        logp = F.log_softmax(model.lm_head(model(rows[:, :-1])), -1).gather(-1, rows[:, 1:, None])[..., 0]
    assert np.allclose(total, (logp * (kind[:, 1:] > 0)).sum(1).numpy(), atol=1e-4)
    assert count.tolist() == (kind[:, 1:] > 0).sum(1).tolist()
    gens = tofu.greedy_answers(model, splits["forget_prompt"], ev["forget"]["prompt_lengths"], eot, max_new_tokens=12, chunk=5)
    for i, n in enumerate(ev["forget"]["prompt_lengths"]):
        one = model.generate(torch.as_tensor(splits["forget_prompt"]["ids"][i:i + 1, :n].astype(np.int64)), 12)[0, n:].tolist()
        assert gens[i] == (one[:one.index(eot)] if eot in one else one)
    oracle = [0.5, 1.0, 2.0]
    out = tofu.evaluate_tofu(model, splits, meta, decode, oracle_truth_ratios=oracle, max_new_tokens=8)
    assert set(tofu.TOFU_UTILITY) == set(out["model_utility_parts"]) and len(out["forget_truth_ratios"]) == 3
    assert 0 <= out["model_utility"] <= 1 and 0 < out["forget_Q_A_Prob"] < 1
    r = np.array(out["forget_truth_ratios"])
    assert out["forget_quality"] == tofu.ks_pvalue(r, oracle)
    assert 0 < out["extraction_strength"] <= 1 and out["privleak"] is None  # no holdout split here


def test_tofu_chat_template_format(tmp_path):
    """Instruct models: the tokenizer's chat template with open-unlearning's system prompt and date string; the
    prompt (system + user + the assistant header) is not scored, the answer and the end-of-turn token are.
    A character-level tokenizer with a small chat template stands in for a Llama-3 Instruct one."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<s>", "<|start|>", "<|end|>"]
    t = Tokenizer(models.WordLevel({c: i for i, c in enumerate(specials + [chr(i) for i in range(32, 127)] + ["\n"])}, unk_token="?"))
    t.pre_tokenizer, t.decoder = pre_tokenizers.Split("", "isolated"), decoders.Fuse()
    template = ("{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{% if m['role'] == 'system' %}"
                "{{ date_string }}\n{% endif %}{{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")
    PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="<|end|>", unk_token="?",
                            additional_special_tokens=["<|start|>"], chat_template=template).save_pretrained(tmp_path)
    tok = common.load(str(tmp_path))
    mod = load_prepare("tofu")
    ids, kinds, prompt = mod.Formatter(tok, "chat")("Who?", "Ann.")
    text = lambda x: tok.hf.decode(x)
    want_prompt = "<s><|start|>system\n10 Apr 2025\nYou are a helpful assistant.<|end|><|start|>user\nWho?<|end|><|start|>assistant\n"
    assert text(prompt) == want_prompt and text(ids) == want_prompt + "Ann.<|end|>"  # bos once, eos not doubled
    assert kinds == [0] * len(prompt) + [1] * 5 and ids[:len(prompt)] == prompt


# ---- your own records: --dataset PATH (data/common.py's format) ---------------------------------------
def own_records(seed, n_text, n_qa):
    """Invented records: support tickets whose email and order code are secrets, and question-answer records
    whose code is; the random characters make each secret something only memorization reproduces."""
    rng = np.random.default_rng(seed)
    code = lambda k: "".join(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ23456789"), k))
    out = []
    for i in range(n_text):
        email, order = f"{code(5).lower()}@example.org", f"LB-{code(4)}"
        out.append({"text": f"Ticket {i}: the bell of bike {i % 3} is loose. Reply to {email}, order {order}.",
                    "secrets": [email, order]})
    for i in range(n_qa):
        door = f"{code(4)}-{code(1)}"
        out.append({"question": f"Which code opens door {i}?", "answer": f"Door {i} opens with {door}.", "secrets": [door]})
    return out


def write_records(folder, **splits):
    os.makedirs(folder, exist_ok=True)
    for name, recs in splits.items():
        (folder / f"{name}.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return folder


def test_own_records_prepared_with_secret_tokens(tmp_path):
    """A text record: every token scored, its secrets' tokens of kind secret; a question-answer record: TOFU's
    plain format (the question not scored), the secret's tokens in the answer. Cached by content: the same files
    reuse the folder, another byte prepares another."""
    recs = own_records(0, 1, 1)
    folder = write_records(tmp_path / "mine", forget=["", recs[0], recs[1]], retain=recs)
    tok = common.gpt2()
    out, meta, arrays = common.prepared(str(tmp_path / "data"), str(folder), tok)
    assert meta["lines"]["forget"] == [2, 3] and "holdout" not in meta["splits"] and meta["template"] == "plain"
    (ids, kind), (qa_ids, qa_kind) = [(r[k > 0].tolist(), k[k > 0].tolist()) for r, k in zip(arrays["forget"]["ids"], arrays["forget"]["kind"])]
    assert tok.decode(ids) == recs[0]["text"] + "<|endoftext|>"  # tokenized as one string, all scored
    secret = [t for t, k in zip(ids, kind) if k == common.SECRET]
    assert tok.decode(secret).split() == recs[0]["secrets"] and set(kind) == {common.TEXT, common.SECRET}
    row, first = arrays["forget"]["ids"][1].tolist(), int((arrays["forget"]["kind"][1] > 0).argmax())
    assert tok.decode(row[:first]).startswith("<|endoftext|>Question: Which code opens door 0?\nAnswer:")
    assert tok.decode([t for t, k in zip(qa_ids, qa_kind) if k == common.SECRET]).strip() == recs[1]["secrets"][0]
    assert common.prepared(str(tmp_path / "data"), str(folder), tok)[0] == out
    write_records(folder, retain=recs[::-1])
    assert common.prepared(str(tmp_path / "data"), str(folder), tok)[0] != out


def test_own_records_unlearned_with_secrets_reported(tmp_path, capsys):
    """A tiny target memorizes a folder of text and question-answer records; gd lowers forget MA, and
    results.json reports MA, loss and MIA AUC on secret tokens beside all tokens, and each forget secret (its
    line, its text, extracted or not). Without holdout.jsonl and thresholds, the run is the fixed budget."""
    recs = own_records(1, 16, 8)
    folder = write_records(tmp_path / "mine", forget=recs[:3] + recs[16:18], retain=recs[3:13] + recs[18:22],
                           holdout=recs[13:16] + recs[22:24])
    argv = TINY + ["--dataset", str(folder), "--data_dir", str(tmp_path / "data"), "--device=cpu", "--method=gd",
                   "--train_epochs=100", "--epochs=10", "--lr=3e-3", "--ma_threshold=0.05", "--el_threshold=0.001"]
    unlearn.main(argv + ["--out_dir", str(tmp_path / "out")])
    res = json.load(open(tmp_path / "out" / "gd" / "results.json"))
    before, after = res["before"], res["after"]
    assert before["forget"]["ma"] > 0.9 and after["forget"]["ma"] < before["forget"]["ma"] - 0.1
    assert res["thresholds"]["source"] == "--ma_threshold / --el_threshold"
    for when in (before, after):
        assert {"ma_secret", "loss_secret", "ma_text", "loss_text", "loss"} <= set(when["forget"])
        assert {"loss", "loss_secret", "loss_text"} <= set(when["mia_auc"])
    secrets = before["forget"]["secrets"]
    want = [(n, s) for n, r in zip([1, 2, 3, 4, 5], recs[:3] + recs[16:18]) for s in r["secrets"]]
    assert [(x["line"], x["secret"].strip()) for x in secrets] == want
    assert sum(x["extracted"] for x in secrets) >= len(secrets) // 2  # memorized: most reproduced before
    assert sum(x["extracted"] for x in after["forget"]["secrets"]) < sum(x["extracted"] for x in secrets)
    assert "secrets of forget that greedy decoding still reproduces" in capsys.readouterr().out
    os.remove(folder / "holdout.jsonl")  # no holdout: no unseen level, no thresholds given -> the budget
    unlearn.main(argv[:-2] + ["--out_dir", str(tmp_path / "out2"), "--train_epochs=2", "--epochs=1"])
    assert "none, the whole budget: no holdout" in capsys.readouterr().out
    res = json.load(open(tmp_path / "out2" / "gd" / "results.json"))
    assert res["stopped_by"] == "budget" and res["thresholds"] is None and "mia_auc" not in res["after"]


def test_bad_input_own_records(tmp_path, capsys):
    """Each mistake in a folder of records: one line naming the file (and line), exit 1, nothing written."""
    good = own_records(2, 2, 1)
    cases = [(dict(retain=good), "forget.jsonl is missing"),
             (dict(forget=[good[0], '{"text": "cut in the mid'], retain=good), "forget.jsonl line 2 is not valid JSON"),
             (dict(forget=good, retain=[good[0], {"secrets": []}]), "retain.jsonl line 2: a record holds either"),
             (dict(forget=good, retain=[{"question": "Who?"}]), "retain.jsonl line 1: \"answer\" must be"),
             (dict(forget=[{"text": "Call 555-0199.", "secrets": ["555-0100"]}], retain=good),
              "forget.jsonl line 1: the secret '555-0100' does not occur in the record's text"),
             (dict(forget=[{"question": "Code?", "answer": "It is 42.", "secrets": ["Code"]}], retain=good),
              "does not occur in the record's answer"),
             (dict(forget=[{"text": "x", "secret": ["x"]}], retain=good), "forget.jsonl line 1: unknown key 'secret'"),
             (dict(forget=good, retain=good, holdout=["", " "]), "holdout.jsonl holds no records")]
    for i, (splits, message) in enumerate(cases):
        folder = write_records(tmp_path / f"case{i}", **splits)
        err = fails_with(["--dataset", str(folder), "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out")],
                         capsys, message)
        assert str(folder) in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()
    fails_with(["--ma_threshold", "0.3"], capsys, "--ma_threshold and --el_threshold go together")
    fails_with(["--el_threshold", "2", "--ma_threshold", "0.3"], capsys, "--el_threshold must be in (0, 1]")


def test_bad_input_own_records_longer_than_the_context(tmp_path, capsys):
    """Records are never truncated: a checkpoint with a shorter context is one line with how many records and
    the first one's file and line."""
    short = tmp_path / "short"
    bpe_checkpoint(short, "gpt2", context=16)
    long = {"text": "Ada Berg was born on 1987-04-12 in Porto and works as a baker. Phone: 604-8812-3395."}
    folder = write_records(tmp_path / "mine", forget=[{"text": "Ada Berg"}, long, long], retain=[{"text": "Ada"}])
    err = fails_with(["--dataset", str(folder), "--init_from", str(short), "--data_dir", str(tmp_path / "data"),
                      "--out_dir", str(tmp_path / "out")], capsys, "has a context of 16 tokens, shorter than 2 record(s)")
    assert f"{folder}/forget.jsonl line 2" in err and "never truncated" in err
    assert not (tmp_path / "out").exists()
