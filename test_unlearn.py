# Tests of kernels/: the Triton kernels against their PyTorch twins and against independent references.
# Without CUDA the kernels run under the Triton interpreter on the CPU, which is read when @triton.jit
# decorates: TRITON_INTERPRET must be set before kernels (or anything importing triton) is imported.
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F

import kernels
from kernels import fisher as kfisher
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
    monkeypatch.setattr(kloss, "CHUNK", 32)
    monkeypatch.setattr(kloss, "BLOCK_V", 256)


# ----------------------------------------------------------------------------- loss

def independent_loss(hidden, weight, targets, loss):
    """All N x V logits at once, the runner-up by topk: nothing shared with the twin. The logits are
    rounded to the input dtype, as a bf16 matmul does: otherwise the runner-up of a near-tie may differ."""
    z = (hidden.float() @ weight.float().T).to(hidden.dtype).float()
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fisher(dtype):
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


def test_fisher_twin_chunks(monkeypatch):
    monkeypatch.setattr(kfisher, "SAMPLES", 2)  # 5 samples: chunks of 2, 2, 1
    x, g = torch.randn(5, 7, 12), torch.randn(5, 7, 9)
    fisher, sq = kernels.per_sample_grad_sq_ref(x, g)
    fisher_i, sq_i = independent_fisher(x, g)
    assert rel(fisher, fisher_i) < 1e-5 and rel(sq, sq_i) < 1e-5


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
import warnings; warnings.simplefilter("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import fisher, loss

def compile(kernel, sig, consts):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))

rows = dict(z_stride="i32", y_ptr="*i64", lse_ptr="*fp32", zy_ptr="*fp32", zr_ptr="*fp32", r_ptr="*i32",
            V="i32", ignore_index="i32")
for dt in ("fp32", "bf16"):
    compile(loss._stats_kernel, dict(z_ptr=f"*{dt}", **rows), dict(BLOCK_V=loss.BLOCK_V))
    for ih in (False, True):
        compile(loss._grad_kernel, dict(z_ptr=f"*{dt}", g_ptr="*fp32", **rows), dict(IH=ih, BLOCK_V=loss.BLOCK_V))
    compile(fisher._fisher_kernel,
            dict(x_ptr=f"*{dt}", g_ptr=f"*{dt}", fisher_ptr="*fp32", partial_ptr="*fp32", N="i32", T="i32",
                 IN="i32", OUT="i32", x_sn="i32", x_st="i32", g_sn="i32", g_st="i32"),
            dict(BLOCK_O=fisher.BLOCK_O, BLOCK_I=fisher.BLOCK_I, BLOCK_T=fisher.BLOCK_T, UPCAST=False))
"""


@needs_triton
@pytest.mark.skipif(DEV == "cuda", reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_h100():
    # The interpreter does not type-check like the compiler: compile every kernel variant to sm_90 code
    # (Triton ships ptxas, no GPU needed). In a fresh process: once the interpreter has run, it has patched
    # triton.language for the whole process. Uses Triton internals, hence a skip if they moved.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE_ALL], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(kernels.__file__)) + "/..")
    if run.returncode and "ImportError" in run.stderr:
        pytest.skip(f"Triton internals moved: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr


# ---- model.py ----------------------------------------------------------------------------------------
from model import GPT, GPTConfig  # noqa: E402


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=24, vocab_size=37, n_layer=2, n_head=2, n_embd=16)).eval()


def test_kv_cache_generation_equals_full_recomputation():
    model = tiny_gpt()
    idx = torch.randint(0, 37, (3, 5))
    out = model.generate(idx, 10)
    ref = idx
    for _ in range(10):  # no cache: recompute the whole sequence each step
        ref = torch.cat([ref, model.lm_head(model(ref)[:, -1]).argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


def test_lora_merge_unmerge_round_trip():
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
        m.unmerge()
        m.remove_lora()
    assert torch.allclose(model(x), tiny_gpt()(x), atol=1e-5)
    assert not torch.allclose(with_adapter, tiny_gpt()(x), atol=1e-3)
