# Tests of kernels/: the Triton kernels against their PyTorch twins and against independent references.
# Without CUDA the kernels run under the Triton interpreter on the CPU, which is read when @triton.jit
# decorates: TRITON_INTERPRET must be set before kernels (or anything importing triton) is imported.
import json
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
        model.config.rope_scaling = None
        assert rel(logits(model, x), ref) > 1e-2


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
    model.save_pretrained(tmp_path / "out")
    with safetensors.safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == "bfloat16"


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


# ---- unlearn.py: metrics on hand-made cases ------------------------------------------------------------
import numpy as np  # noqa: E402

import unlearn  # noqa: E402


def hand_split(rows, lengths, secrets):
    return unlearn.Split(np.array(rows, dtype=np.uint16), lengths, secrets, "cpu")


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

    def generate(self, idx, max_new_tokens):
        return torch.cat([idx, self.says[idx.size(1):idx.size(1) + max_new_tokens].expand(len(idx), -1)], 1)


def test_memorization_accuracy_by_hand():
    # one row of 8 tokens, the last two padding: targets are positions 1..5, the model gets 3 of 5 right
    split = hand_split([[0, 1, 2, 3, 4, 5, 9, 9]], [6], [[]])
    stats = unlearn.split_stats(Oracle([0, 1, 2, 7, 4, 8, 9, 9]), split)
    assert stats["ma"] == pytest.approx(3 / 5)
    assert stats["count"].item() == 5


def test_extraction_likelihood_by_hand():
    rows = [[0, 1, 2, 3, 4, 5, 6, 7]]
    split = hand_split(rows, [8], [[[3, 5]]])
    el, secrets = unlearn.extraction(Oracle(rows[0]), split, n=2)  # a parrot: everything extracted
    assert el.item() == pytest.approx(1.0) and secrets.item() == 1
    el, secrets = unlearn.extraction(Oracle([0] * 8), split, n=2)  # never right
    assert el.item() == 0.0 and secrets.item() == 0
    # right but for the last token: from prefix length t the suffix has 7 - t bigrams, one of them missed,
    # EL_2 = (5/6 + 4/5 + 3/4 + 2/3 + 1/2 + 0/1) / (8 - 2); the secret (tokens 3..4) is still reproduced
    el, secrets = unlearn.extraction(Oracle([0, 1, 2, 3, 4, 5, 6, 9]), split, n=2)
    assert el.item() == pytest.approx((5 / 6 + 4 / 5 + 3 / 4 + 2 / 3 + 1 / 2) / 6)
    assert secrets.item() == 1


def test_mia_auc_and_ks_by_hand():
    assert unlearn.auc([3, 4], [1, 2]) == 1.0 and unlearn.auc([1, 2], [3, 4]) == 0.0
    assert unlearn.auc([1, 2], [1, 2]) == 0.5
    rng = np.random.default_rng(0)
    assert unlearn.ks_pvalue(rng.normal(size=200), rng.normal(size=200)) > 0.05
    assert unlearn.ks_pvalue(rng.normal(size=200), rng.normal(2, size=200)) < 1e-6


# ---- unlearn.py: the methods on a tiny memorized model ---------------------------------------------------
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--memorized=0.9", "--train_epochs=150", "--epochs=16", "--lr=1e-3", "--eul_lr=1e-1",
        "--eval_n=8", "--rank=4"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A small instance of the people testbed (8 forget, 40 retain, 16 holdout) and a tiny GPT trained until it
    memorized them, cached in an out dir that the end-to-end tests reuse."""
    root = tmp_path_factory.mktemp("tiny")
    spec = __import__("importlib.util").util.spec_from_file_location("prepare", os.path.join(unlearn.ROOT, "data", "people", "prepare.py"))
    prepare = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    prepare.main(["--n_forget", "8", "--n_retain", "40", "--n_holdout", "16", "--out_dir", str(root / "data" / "people")])
    argv = TINY + ["--data_dir", str(root / "data"), "--out_dir", str(root / "out"), "--device=cpu"]
    cfg = unlearn.parse_args(argv)
    os.makedirs(cfg.out_dir)
    meta, data = unlearn.load_data(cfg)
    target = unlearn.load_or_train(cfg, meta, data, "target", ("forget", "retain"))
    holdout = unlearn.split_stats(target, data["holdout"])["ma"]
    return dict(argv=argv, cfg=cfg, meta=meta, data=data, target=target, root=root,
                thresholds={"ma": holdout, "el10": 1e-3})


RETAIN_MARGIN = 0.7  # a method may cost retain MA, but must keep at least 70% of it on this tiny model


@pytest.mark.parametrize("method", unlearn.METHODS)
def test_method_forgets_and_keeps(tiny, method):
    """Each method, run until forget MA is 0.15 below the target's (the stopping rule with that level), lowers
    forget MA by at least 0.1 while retain MA keeps RETAIN_MARGIN of its value."""
    cfg, data, target = tiny["cfg"], tiny["data"], tiny["target"]
    torch.manual_seed(0)
    model = __import__("copy").deepcopy(target)
    before = {s: unlearn.split_stats(target, data[s])["ma"] for s in ("forget", "retain")}
    res = unlearn.apply_method(method, model, target, data["forget"], data["retain"], data, cfg,
                               {"ma": before["forget"] - 0.15, "el10": 1.0}, [])
    after = {s: unlearn.split_stats(model, data[s])["ma"] for s in ("forget", "retain")}
    assert before["forget"] > 0.85
    assert after["forget"] < before["forget"] - 0.1, (before, after, res["stopped_by"])
    assert after["retain"] >= RETAIN_MARGIN * before["retain"], (before, after)
    assert res["steps"] > 0 and res["trainable_params"] > 0


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def test_end_to_end_results_contract(tiny, tmp_path):
    """`python unlearn.py` on the cached tiny target: results.json holds what other tools read."""
    import json
    import shutil
    out = tmp_path / "out"
    shutil.copytree(tiny["root"] / "out", out)
    unlearn.main(tiny["argv"] + ["--out_dir", str(out), "--method", "ih_flora"])
    res = json.load(open(out / "ih_flora" / "results.json"))
    assert res["method"] == "ih_flora" and res["stopped_by"] in ("threshold", "budget")
    assert set(res["thresholds"]) == {"ma", "el10"}
    for when in ("before", "after"):
        for split in ("forget", "retain", "holdout"):
            assert {"ma", "el10", "ppl"} <= set(res[when][split])
    assert res["after"]["forget"]["ma"] < res["before"]["forget"]["ma"]
    assert set(res["mia_auc"]) == {"loss", "zlib", "mink"}
    assert res["time_s"] > 0 and res["steps"] > 0 and 0 < res["trainable_params"] < sum(
        p.numel() for p in tiny["target"].parameters())
    assert not [f for f in files_under(out) if f.endswith(".tmp")]


def test_eul_requests_report_each_request(tiny, tmp_path):
    import json
    import shutil
    out = tmp_path / "out"
    shutil.copytree(tiny["root"] / "out", out)
    unlearn.main(tiny["argv"] + ["--out_dir", str(out), "--method", "eul", "--requests", "2"])
    res = json.load(open(out / "eul" / "results.json"))
    assert [r["request"] for r in res["requests"]] == [1, 2]
    assert res["after"]["forget"]["ma"] < res["before"]["forget"]["ma"]


def fails_with(argv, capsys, message, code=1):
    with pytest.raises(SystemExit) as e:
        unlearn.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code and message in err and "Traceback" not in err, err
    return err


def test_bad_input_unknown_method(capsys):
    err = fails_with(["--method", "forget_everything"], capsys, "invalid choice", code=2)
    assert "ih_flora" in err and "rum" in err  # the valid ones are listed


def test_bad_input_missing_dataset(tmp_path, capsys):
    (tmp_path / "data" / "mine").mkdir(parents=True)
    (tmp_path / "data" / "mine" / "prepare.py").write_text("")
    fails_with(["--dataset", "mine", "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out")],
               capsys, "prepare it with")
    fails_with(["--dataset", "nothing", "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out")],
               capsys, "is missing")


def test_bad_input_checkpoint_mismatch(tiny, tmp_path, capsys):
    os.makedirs(tmp_path / "out")
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=1, n_embd=8))
    torch.save({"model_args": __import__("dataclasses").asdict(model.config), "model": model.state_dict()},
               tmp_path / "out" / "target.pt")
    fails_with(tiny["argv"] + ["--out_dir", str(tmp_path / "out")], capsys, "delete it or pick another --out_dir")
    assert files_under(tmp_path / "out") == ["target.pt"]


def test_bad_input_empty_forget_set(tmp_path, capsys):
    prepare = os.path.join(unlearn.ROOT, "data", "people", "prepare.py")
    subprocess.run([sys.executable, prepare, "--n_forget", "0", "--out_dir", str(tmp_path / "data" / "p")], check=True)
    fails_with(["--dataset", "p", "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out")],
               capsys, "forget set")


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


# ---- the other seeds' pieces, on cases with known answers -------------------------------------------------
def test_icu_drops_refined_samples(tiny, monkeypatch):
    """After an epoch, the samples the check calls forgotten (with their analogues) leave the batches."""
    cfg, data, target = tiny["cfg"], tiny["data"], tiny["target"]
    forget = data["forget"]
    seen = []

    def recording_loss(model, ref, f, a, cfg):
        seen[-1].extend(f.rows.tolist())
        return unlearn.loss_icu(model, ref, f, a, cfg)

    def check(model, split, thresholds, cfg):  # epoch 1 forgets samples 0-3, epoch 2 the rest
        seen.append([])
        return torch.arange(len(split)) < (4 if len(seen) == 2 else 8)

    seen.append([])
    monkeypatch.setattr(unlearn, "forgotten", check)
    model = __import__("copy").deepcopy(target)
    pairs = unlearn.analogues(target, forget, data["retain"])
    res = unlearn.unlearn(model, target, [recording_loss], forget, data["retain"], cfg,
                          {"ma": -1.0, "el10": -1.0}, 1e-4, 5, "icu", pairs=pairs, refine=True)
    rows = forget.rows.tolist()
    assert sorted(seen[0]) == sorted(rows)                       # epoch 1: everyone
    assert sorted(seen[1]) == sorted(rows[4:])                   # epoch 2: the refined samples are gone
    assert res["forgotten_at"] == [1, 1, 1, 1, 2, 2, 2, 2] and res["stopped_by"] == "threshold"
    assert pairs.shape == (len(forget),) and int(pairs.max()) < len(data["retain"])


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
    cfg = __import__("dataclasses").replace(cfg, epochs=2)
    runs = {}
    for name, fns in {"kernels": (kernels.fused_linear_loss, kernels.linear_token_stats, kernels.per_sample_grad_sq),
                      "twins": (kernels.fused_linear_loss_ref, kernels.linear_token_stats_ref,
                                kernels.per_sample_grad_sq_ref)}.items():
        for attr, fn in zip(("linear_loss", "token_stats", "grad_sq"), fns):
            monkeypatch.setattr(unlearn, attr, fn)
        torch.manual_seed(0)
        model = __import__("copy").deepcopy(target)
        res = unlearn.apply_method("ih_flora", model, target, data["forget"], data["retain"], data, cfg,
                                   {"ma": 0.0, "el10": 0.0}, [])
        runs[name] = (res, model.state_dict(), unlearn.split_stats(model, data["forget"])["ma"])
    (rk, wk, mak), (rt, wt, mat) = runs["kernels"], runs["twins"]
    assert rk["steps"] == rt["steps"] and rk["stopped_by"] == rt["stopped_by"]
    assert all(torch.allclose(wk[k], wt[k], atol=1e-4) for k in wt)
    assert abs(mak - mat) < 1e-6
    assert not torch.allclose(wt["transformer.h.0.attn.c_attn.weight"], target.state_dict()["transformer.h.0.attn.c_attn.weight"])


def test_fila_leaves_the_function_unchanged_at_step_0(tiny):
    """FILA moves W to W - s·B·A and starts the adapter at B·A: the outputs are those of the target, while the
    adapter itself is far from zero (unlike plain LoRA's B = 0) and points where the forget set's Fisher is."""
    cfg, data, target = tiny["cfg"], tiny["data"], tiny["target"]
    model = __import__("copy").deepcopy(target)
    unlearn.add_adapters(model, "flora", data["forget"], data["retain"], cfg)
    x = data["forget"].x
    with torch.no_grad():
        assert torch.allclose(model.lm_head(model(x)), target.lm_head(target(x)), atol=1e-4)
    layers = model.lora_layers()
    assert all(m.lora_B.abs().max() > 1e-3 and m.lora_A.shape[0] == cfg.rank for m in layers)
    assert [p.requires_grad for p in model.parameters()].count(True) == 2 * len(layers)  # only A and B train


def test_target_from_gpt2_weights(tiny, tmp_path):
    """--init_from a local transformers GPT-2 (the offline stand-in for 'gpt2'): the target starts from those
    weights, restricted to the dataset's tokens, is fine-tuned, cached, and reused."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=128, n_embd=32, n_layer=1, n_head=2,
                                                              vocab_size=50257))
    hf.save_pretrained(tmp_path / "gpt2")
    cfg = unlearn.parse_args(tiny["argv"] + ["--init_from", str(tmp_path / "gpt2"), "--train_epochs=1",
                                             "--out_dir", str(tmp_path / "out")])
    os.makedirs(cfg.out_dir)
    meta, data = tiny["meta"], tiny["data"]
    model = unlearn.load_or_train(cfg, meta, data, "target", ("forget", "retain"))
    assert model.config.vocab_size == len(meta["vocab"]) and model.config.n_embd == 32
    eot = meta["vocab"].index(50256)  # the dataset's id of GPT-2's <|endoftext|>: its embedding came along
    assert not torch.equal(model.transformer.wte.weight[eot], hf.transformer.wte.weight[50256])  # fine-tuned
    again = unlearn.load_or_train(cfg, meta, data, "target", ("forget", "retain"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_same_command_same_numbers(tiny):
    """Seeds make runs repeatable: the same method twice on the CPU gives the same weights, bit for bit."""
    cfg, data, target = tiny["cfg"], tiny["data"], tiny["target"]
    cfg = __import__("dataclasses").replace(cfg, epochs=2)
    states = []
    for _ in range(2):
        torch.manual_seed(cfg.seed)
        model = __import__("copy").deepcopy(target)
        unlearn.apply_method("ih_lora", model, target, data["forget"], data["retain"], data, cfg,
                             {"ma": 0.0, "el10": 0.0}, [])
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["transformer.h.0.mlp.c_fc.weight"], target.state_dict()["transformer.h.0.mlp.c_fc.weight"])


def test_confidence_proxy_by_hand():
    """RUM's confidence: the mean probability of the true tokens over the record's own tokens, not padding."""
    split = hand_split([[0, 1, 2, 3, 4, 5, 9, 9]], [6], [[]])
    model = Oracle([0, 1, 2, 7, 4, 8, 9, 9])  # right on 3 of 5 targets, with p = softmax of 10 vs 0s
    p = torch.softmax(torch.tensor([10.0] + [0.0] * 9), 0)
    expect = (3 * p[0] + 2 * p[1]) / 5
    assert unlearn.proxy_confidence(model, split, None, None)[0] == pytest.approx(expect.item(), rel=1e-5)
