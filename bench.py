"""
Benchmarks of kernels/ against the PyTorch baselines; prints markdown tables of measured figures only.

    python bench.py            GPT-2 shapes on a GPU (bf16)
    python bench.py --cpu      small shapes, fp32, twins only (the default without CUDA); --e2e adds (c)

(a) per-token loss (CE, IH, KL to a reference), forward + backward (grads of hidden and weight), .sum() as
    the upstream loss: kernel | PyTorch eager (all logits materialized) | torch.compile of the eager code |
    Liger-Kernel (CE). Time, and on a GPU the peak allocated memory.
(m) CPU only: peak memory of the same forward + backward at N = 8192, H = 128, V = 8192, eager vs twin, as the
    peak RSS (VmHWM) of a fresh process per case (`python bench.py --case "kl twin (chunked)"`), also above a
    process that only built the inputs; and their ratio.
(f) fisher() (FILA's per-sample Fisher + norms, as unlearn.py runs it) vs one plain forward + backward of the
    mean NLL on the same batch vs the naive loop of one backward per sample, on the default model and a
    GPT-2-small-shaped one (random weights and tokens: the cost does not depend on them).
(b) GPU only: Fisher diagonal and per-sample grad norms of GPT-2 124M's linears, 32 sequences x 200 tokens:
    kernel | torch.func vmap(grad) (all per-sample gradients materialized) | squared mini-batch gradient
    (FILA's official estimate, not the same quantity: it is what the kernel replaces, at its cost)
(p) mixed precision: one full-weight step (forward, mean NLL, backward, AdamW) under --dtype bfloat16 (autocast,
    fp32 master weights: unlearn.autocast + model.mixed_precision) against fp32, same model and tokens.
(n) CPU: torchrun's data parallelism as unlearn.py runs it (FSDP2 over gloo for a full-weight step): time per
    step of 2 processes against 1 at the same global batch, each process one thread (OMP_NUM_THREADS=1), on
    the default target's shape and a GPT-2-small-shaped model (random weights and tokens). `--parts n`.
(c) end-to-end: unlearn.py's ih_flora (FILA's Fisher + unlearning loop) on the cached default target model,
    with the kernels and with the twins swapped in (on a machine without CUDA only the twins run).
CPU parts added for issue 21 (run with OMP_NUM_THREADS=1: two threads on a shared 2-core machine distort ratios):
(e) EL_10 on TDEC rows with a random GPT-Neo-125M-shaped model, metrics.extraction or (--el_impl old) the former
    one, kept here as extraction_by_generate; time against the compute floor (generated tokens x 2 x params at the
    measured matmul rate). (s) one decode step of generate() at batch 8 after a 20-token prompt. (v) FILA's SVD, exact vs svd_lowrank.
(r) peak RSS of FILA's two Fisher passes at a Llama-3.2-1B shape (--fila_layers of its 16 layers).
(t) the GPU memory table, computed from parameter counts (no GPU needed).
Time: median over --repeats runs after one warm-up run (which also compiles); (f) takes its methods in
round robin. Memory: peak GPU memory
allocated during one run above what was allocated before it; on the CPU, (m) only.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import kernels

# ----------------------------------------------------------------------------- measuring

def measure(fn, repeats, cuda):
    """(median ms, peak extra MiB or None) of fn(); 'OOM' as the time if it runs out of GPU memory."""
    try:
        fn()  # warm-up: Triton / torch.compile compile here
        times = [timed(fn, cuda) for _ in range(repeats)]
        mem = None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            mem = (torch.cuda.max_memory_allocated() - base) / 2**20
        return statistics.median(times), mem
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM", None


def row(*cells):
    print("| " + " | ".join(str(c) for c in cells) + " |")


def fmt(ms, mem):
    ms = ms if isinstance(ms, str) else f"{ms:.2f}"
    return ms, "n/a" if mem is None else f"{mem:.0f}"

# ----------------------------------------------------------------------------- (a) loss

def eager_loss(hidden, weight, targets, loss):
    """The plain PyTorch way: all N x V logits at once."""
    z = (hidden @ weight.T).float()
    if loss == "ce":
        return F.cross_entropy(z, targets, reduction="none")
    p = z.softmax(-1)
    top = p.topk(2, -1)  # the runner-up is the best token that is not the target
    p_r = torch.where(top.indices[:, 0] == targets, top.values[:, 1], top.values[:, 0])
    return 1 + p.gather(1, targets[:, None])[:, 0] - p_r


def eager_kl(hidden, weight, ref_hidden, ref_weight):
    """The plain PyTorch way (unlearn.py's before linear_kl): both models' N x V log-softmaxes."""
    with torch.no_grad():
        logq = (ref_hidden @ ref_weight.T).float().log_softmax(-1)
    logp = (hidden @ weight.T).float().log_softmax(-1)
    return F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1)


def loss_inputs(N, H, V, dtype, dev):
    """hidden, weight (both trained), targets, and a reference model's hidden and weight (frozen, close by)."""
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(N, H, device=dev, generator=g).to(dtype).requires_grad_()
    weight = (0.02 * torch.randn(V, H, device=dev, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=dev, generator=g)
    ref_hidden = (hidden.detach() + 0.1 * torch.randn(N, H, device=dev, generator=g).to(dtype))
    ref_weight = (weight.detach() + 0.002 * torch.randn(V, H, device=dev, generator=g).to(dtype))
    return hidden, weight, targets, ref_hidden, ref_weight


def loss_methods(loss, hidden, weight, targets, ref_hidden, ref_weight, cuda, compiled=None, liger=None):
    """name -> function giving the per-token loss [N] of `loss` (ce, ih, kl) by each method."""
    fused = "Triton kernel" if cuda else "twin (chunked)"
    if loss == "kl":
        methods = {fused: lambda: kernels.linear_kl(hidden, weight, ref_hidden, ref_weight),
                   "eager": lambda: eager_kl(hidden, weight, ref_hidden, ref_weight)}
        if compiled:
            methods["torch.compile"] = lambda: compiled["kl"](hidden, weight, ref_hidden, ref_weight)
        return methods
    methods = {fused: lambda: kernels.linear_loss(hidden, weight, targets, loss),
               "eager": lambda: eager_loss(hidden, weight, targets, loss)}
    if compiled:
        methods["torch.compile"] = lambda: compiled["loss"](hidden, weight, targets, loss)
    if loss == "ce" and liger is not None and cuda:
        methods["Liger FLCE"] = lambda: liger(weight, hidden, targets)
    return methods


def bench_loss(shapes, dtype, dev, repeats, cuda):
    print("\n### (a) per-token loss, forward + backward\n")
    row("loss", "N", "H", "V", "method", "time (ms)", "peak extra (MiB)")
    row(*["---"] * 7)
    compiled = dict(loss=torch.compile(eager_loss), kl=torch.compile(eager_kl))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    except Exception as e:  # noqa: BLE001 (not installed, or no GPU)
        liger, why = None, f"{type(e).__name__}: {e}"
    for N, H, V in shapes:
        hidden, weight, targets, ref_hidden, ref_weight = loss_inputs(N, H, V, dtype, dev)
        for loss in ("ce", "ih", "kl"):
            for name, f in loss_methods(loss, hidden, weight, targets, ref_hidden, ref_weight, cuda, compiled,
                                        liger).items():
                def step():
                    f().sum().backward()
                    hidden.grad = weight.grad = None  # the grads count in the peak, not in the baseline
                row(loss, N, H, V, name, *fmt(*measure(step, repeats, cuda)))
        del hidden, weight, targets, ref_hidden, ref_weight
    if liger is None or not cuda:
        print(f"\nLiger-Kernel not run: {why if liger is None else 'no CUDA'}")


MEMORY_CASES = ["inputs", "ce eager", "ce twin (chunked)", "ih eager", "ih twin (chunked)", "kl eager",
                "kl twin (chunked)"]


def memory_case(case, N, H, V):
    """Run in a fresh process: build the inputs, one forward + backward of `case`, print the max RSS."""
    hidden, weight, targets, ref_hidden, ref_weight = loss_inputs(N, H, V, torch.float32, "cpu")
    if case != "inputs":
        loss, method = case.split(" ", 1)
        loss_methods(loss, hidden, weight, targets, ref_hidden, ref_weight, False)[method]().sum().backward()
    print(json.dumps(dict(case=case, maxrss_mib=peak_rss_mib())))


def peak_rss_mib():
    """This process's peak RSS. Linux's VmHWM belongs to the memory map made at exec; getrusage's ru_maxrss
    (the fallback elsewhere) also counts the parent's RSS copied at fork, which bench's own parent inflates."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which the twins'
# freed 8 MiB chunk buffers stay in the heap, fragmented, and count in the RSS as if they were live. A fixed
# threshold (as a caching allocator reusing its blocks would behave) makes RSS follow the live memory: both
# are reported, the ratio from the second.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def bench_loss_memory(N, H, V):
    print(f"\n### (m) peak memory of forward + backward, max RSS of a fresh process per case, N = {N}, H = {H}, "
          f"V = {V}, fp32\n")
    peak = {}
    for env in ({}, FIXED_MMAP):
        for case in MEMORY_CASES:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", case, "--shape", f"{N},{H},{V}"],
                                 check=True, capture_output=True, text=True, env={**os.environ, **env}).stdout
            peak[case, bool(env)] = json.loads(out.strip().splitlines()[-1])["maxrss_mib"]
    row("loss", "method", "max RSS, glibc default (MiB)", "max RSS, mmap threshold 1 MiB (MiB)",
        "the same above inputs only (MiB)", "eager / this")
    row(*["---"] * 6)
    above = {case: peak[case, True] - peak["inputs", True] for case in MEMORY_CASES}
    for case in MEMORY_CASES:
        loss, method = case.split(" ", 1) if case != "inputs" else ("—", "inputs only")
        ratio = f"{above[f'{loss} eager'] / max(above[case], 1e-9):.1f}x" if case != "inputs" else ""
        row(loss, method, f"{peak[case, False]:.0f}", f"{peak[case, True]:.0f}", f"{above[case]:.0f}", ratio)

# ----------------------------------------------------------------------------- (b) Fisher

GPT2_LINEARS = [("attn c_attn", 768, 2304), ("attn c_proj", 768, 768), ("mlp c_fc", 768, 3072), ("mlp c_proj", 3072, 768)]

MODEL_FWD_BWD_MS = None  # one plain forward + backward of the model on the same batch, set by model_fwd_bwd()


def model_fwd_bwd(n_seq, n_tok, n_layers, vocab, dev, dtype, repeats, cuda):
    """Time of one forward + backward of a GPT-2 124M-shaped model (n_layers blocks of width 768) on
    n_seq x n_tok tokens with the summed CE loss: the unit the Fisher times are compared with."""
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=max(n_tok, 64), vocab_size=vocab, n_layer=n_layers, n_head=12, n_embd=768))
    model.to(dev, dtype)
    idx = torch.randint(0, vocab, (n_seq, n_tok + 1), device=dev)

    def step():
        h = model(idx[:, :-1])
        kernels.linear_loss(h.flatten(0, 1), model.lm_head.weight, idx[:, 1:].flatten()).sum().backward()
        model.zero_grad(set_to_none=True)
    return measure(step, repeats, cuda)[0]


def vmap_fisher(x, g):
    """All N per-sample gradients at once with torch.func, then squared and summed."""
    W = torch.zeros(g.shape[2], x.shape[2], device=x.device, dtype=torch.float32)
    sample_loss = lambda W, xn, gn: ((xn.float() @ W.T) * gn.float()).sum()  # its grad is gnᵀ xn
    G = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(W, x, g)
    sq = G.square()
    return sq.sum(0), sq.sum((1, 2))


def minibatch_fisher(x, g):
    """FILA's official estimate: the square of the summed (mini-batch) gradient."""
    G = g.flatten(0, 1).float().T @ x.flatten(0, 1).float()
    return G.square()


def bench_fisher(n_seq, n_tok, n_layers, dtype, dev, repeats, cuda):
    print(f"\n### (b) Fisher diagonal + per-sample norms, {n_seq} sequences x {n_tok} tokens\n")
    methods = {("Triton kernel" if cuda else "twin (sample chunks)"): kernels.grad_sq,
               "vmap(grad) materialized": vmap_fisher,
               "squared mini-batch grad": minibatch_fisher}
    g = torch.Generator(device=dev).manual_seed(0)
    data = {}  # one x, g pair per layer and linear, as a real model has
    for name, IN, OUT in GPT2_LINEARS:
        data[name] = [(torch.randn(n_seq, n_tok, IN, device=dev, generator=g).to(dtype),
                       torch.randn(n_seq, n_tok, OUT, device=dev, generator=g).to(dtype)) for _ in range(n_layers)]
    if MODEL_FWD_BWD_MS is not None:
        print(f"(one forward + backward of the whole model on these tokens: {MODEL_FWD_BWD_MS:.1f} ms)\n")
    row("linear", "in -> out", "layers", "method", "time (ms)", "peak extra (MiB)", "x model fwd+bwd")
    row(*["---"] * 7)
    ratio = lambda ms: "—" if MODEL_FWD_BWD_MS is None or isinstance(ms, str) else f"{ms / MODEL_FWD_BWD_MS:.2f}"
    for method, f in methods.items():
        for name, IN, OUT in GPT2_LINEARS:
            x, gr = data[name][0]
            ms, mem = measure(lambda: f(x, gr), repeats, cuda)
            row(name, f"{IN} -> {OUT}", 1, method, *fmt(ms, mem), ratio(ms))
        ms, mem = measure(lambda: [f(x, gr) for pairs in data.values() for x, gr in pairs], repeats, cuda)
        row(f"all {len(GPT2_LINEARS)}", "", n_layers, method, *fmt(ms, mem), ratio(ms))

# ----------------------------------------------------------------------------- (f) fisher() on whole models

def per_sample_loop(model, split, layers):
    """The naive Fisher: one forward + backward per sample of its mean NLL, its weight gradients squared."""
    import unlearn
    fisher, sq = {m: torch.zeros_like(m.weight) for m in layers}, []
    for n in range(len(split)):
        model.zero_grad(set_to_none=True)
        unlearn.nll(model, split.take([n])).backward()
        for m in layers:
            fisher[m] += m.weight.grad ** 2
        sq.append(sum((m.weight.grad ** 2).sum() for m in layers))
    model.zero_grad(set_to_none=True)
    return fisher, torch.stack(sq)


def bench_fisher_models(models, dev, repeats, cuda):
    """models: (name, GPTConfig, samples, tokens). One batch of `samples` sequences of `tokens` tokens."""
    import numpy as np
    import unlearn
    from model import GPT
    print("\n### (f) fisher() on a whole model vs one forward + backward vs a per-sample loop\n")
    row("model", "samples x tokens", "method", "time (ms)", "x forward + backward")
    row(*["---"] * 5)
    for name, config, n_seq, n_tok in models:
        torch.manual_seed(0)
        model = GPT(config).to(dev)
        rows = np.random.default_rng(0).integers(0, config.vocab_size, (n_seq, n_tok + 1))
        kind = np.ones_like(rows)
        kind[:, 0] = 0  # every token scored but the first (a prepared row's bos)
        split = unlearn.Split(rows, kind, dev)
        layers = model.lora_layers()

        def fwd_bwd():
            unlearn.nll(model, split).backward()
            model.zero_grad(set_to_none=True)
        methods = {"forward + backward (mean NLL)": fwd_bwd,
                   "fisher(): Fisher + norms": lambda: unlearn.fisher(model, split, layers, batch_size=n_seq),
                   "fisher(diag=False): norms only": lambda: unlearn.fisher(model, split, layers, batch_size=n_seq,
                                                                            diag=False),
                   "per-sample loop": lambda: per_sample_loop(model, split, layers)}
        # round robin (one warm-up round, then `repeats` rounds): a load that drifts over minutes, as on a
        # shared machine, then shifts every method alike instead of skewing their ratios
        times = {method: [] for method in methods}
        for _ in range(repeats + 1):
            for method, f in methods.items():
                times[method].append(timed(f, cuda))
        base = statistics.median(times["forward + backward (mean NLL)"][1:])
        for method, t in times.items():
            ms = statistics.median(t[1:])
            row(name, f"{n_seq} x {n_tok}", method, f"{ms:.0f}", f"{ms / base:.2f}")
        del model


def timed(fn, cuda):
    """ms of one fn() call."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- (c) end to end

def bench_end_to_end(cuda, repeats):
    """ih_flora as unlearn.py runs it (FILA init from the Fisher, then the loop with its stopping rule), on
    the default data and cached target (trained first when missing), kernels vs twins."""
    import copy
    import metrics
    import unlearn
    print("\n### (c) ih_flora end to end (Fisher + FILA + unlearning until the stopping rule), default data\n")
    cfg = unlearn.parse_args(["--device", "cuda" if cuda else "cpu"])
    os.makedirs(cfg.out_dir, exist_ok=True)
    meta, data = unlearn.load_data(cfg, unlearn.load_tokenizer("gpt2"))
    target, events = unlearn.load_or_train(cfg, meta, data, "target", ("forget", "retain"))
    data["forget"].events = events
    thresholds = {"ma": metrics.split_stats(target, data["holdout"])["ma"], "el10": 1e-3}
    paths = {"kernels": (kernels.fused_linear_loss, kernels.linear_token_stats, kernels.per_sample_grad_sq),
             "twins": (kernels.fused_linear_loss_ref, kernels.linear_token_stats_ref, kernels.per_sample_grad_sq_ref)}
    rows = []
    for name, (loss, stats, fisher) in paths.items():
        if name == "kernels" and not cuda:
            continue
        unlearn.linear_loss, unlearn.token_stats, unlearn.grad_sq = loss, stats, fisher
        res = {}

        def once():
            torch.manual_seed(cfg.seed)
            res.update(unlearn.apply_method("ih_flora", copy.deepcopy(target), target, data["forget"], data["retain"],
                                            data, cfg, thresholds, []))
        ms, mem = measure(once, max(1, repeats // 2), cuda)
        rows.append((name, res["stopped_by"], res["steps"], *fmt(ms / 1000 if not isinstance(ms, str) else ms, mem)))
    row("path", "stopped by", "steps", "time (s)", "peak extra (MiB)")
    row(*["---"] * 5)
    for r in rows:
        row(*r)

# ----------------------------------------------------------------------------- (n) torchrun, FSDP2

DIST_SHAPES = {"default": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=2396, block_size=70, seq=60),
               "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024, seq=64)}


def dist_case(shape, batch, steps):
    """One process of (n), alone or under torchrun: full-weight gradient-descent steps as unlearn.unlearn()
    takes them (share of the batch, NLL, backward, gradients added up, clip, AdamW); rank 0 prints the median
    ms per step as JSON."""
    import unlearn
    from common import Split
    from model import GPT, GPTConfig, dist_setup, rank, shard, share, sync_grads, world
    spec = dict(DIST_SHAPES[shape])
    seq = spec.pop("seq")
    cfg = unlearn.parse_args(["--device", "cpu", "--batch_size", str(batch), "--dtype", "float32"])
    dist_setup(cfg.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**spec))
    if world() > 1:
        shard(model, unlearn.model_dtype(cfg))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    rows = torch.randint(0, spec["vocab_size"], (batch, seq + 1))
    split = Split(rows.numpy(), torch.ones_like(rows).numpy(), "cpu")

    def step():
        part = share(split)
        (unlearn.nll(model, part) * part.weight).backward()
        sync_grads(model, params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # warm-up
    times = []
    for _ in range(steps):
        if world() > 1:
            torch.distributed.barrier()
        times.append(timed(step, False))
    if rank() == 0:
        print(json.dumps({"ms": statistics.median(times)}))
    if world() > 1:
        torch.distributed.destroy_process_group()


def bench_torchrun(steps):
    """(n): the same global batch on 1 process, then 2 under torchrun, each with one thread."""
    print("\n### (n) torchrun: time per full-weight step, 2 processes (FSDP2, gloo) vs 1, same global batch, "
          "1 thread each\n")
    row("model", "global batch x tokens", "1 process (ms)", "2 processes (ms)", "ratio 2 / 1")
    row(*["---"] * 5)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for shape, batch in (("default", 8), ("gpt2-small", 8)):
        ms = []
        for n in (1, 2):
            case = ["bench.py", "--dist_case", shape, "--batch", str(batch), "--steps", str(steps)]
            launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571"] if n == 2 else []
            out = subprocess.run([sys.executable, *launch, *case], env=env, capture_output=True, text=True, check=True)
            ms.append(json.loads(out.stdout.strip().splitlines()[-1])["ms"])
        row(shape, f"{batch} x {DIST_SHAPES[shape]['seq']}", f"{ms[0]:.0f}", f"{ms[1]:.0f}", f"{ms[1] / ms[0]:.2f}")


# ----------------------------------------------------------------------------- (d) model vs transformers

def bench_models(dev, dtype, repeats, cuda, batch=4, seq=256):
    """model.py against transformers' own implementation of the same checkpoint: forward + backward of the
    next-token CE on the same random batch, same weights (ours loaded from theirs), same dtype;
    median of `repeats` interleaved runs after a warm-up round. GPT-2 small (124M) and a Llama of about the
    same size (GQA 12/4 heads, untied head, vocabulary 32000)."""
    import tempfile
    import transformers
    from model import GPT
    configs = {
        "GPT-2 124M": transformers.GPT2Config(n_positions=1024, n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
        "Llama 125M": transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                               num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                                               max_position_embeddings=2048, tie_word_embeddings=False),
    }
    print(f"\n### (d) model.py vs transformers {transformers.__version__}: forward + backward, {batch} x {seq} tokens\n")
    row("model", "params", "ours (ms)", "transformers (ms)", "transformers / ours")
    row(*["---"] * 5)
    for name, config in configs.items():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dev, dtype).train()
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            ours = GPT.from_pretrained(folder, dtype=dtype, device=dev).train()
        idx = torch.randint(0, config.vocab_size, (batch, seq + 1), device=dev)
        x, y = idx[:, :-1], idx[:, 1:].flatten()
        steps = {"ours": (ours, lambda: F.cross_entropy(ours.lm_head(ours(x)).flatten(0, 1).float(), y)),
                 "hf": (hf, lambda: F.cross_entropy(hf(x).logits.flatten(0, 1).float(), y))}
        ms = {who: [] for who in steps}
        for r in range(repeats + 1):  # interleaved, so that a change of load on a shared machine hits both
            for who, (model, loss) in steps.items():
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss().backward()
                if cuda:
                    torch.cuda.synchronize()
                model.zero_grad(set_to_none=True)
                if r:  # the first round is the warm-up
                    ms[who].append(1000 * (time.perf_counter() - t0))
        ms = {who: statistics.median(t) for who, t in ms.items()}
        params = sum(p.numel() for p in ours.parameters()) / 1e6
        row(name, f"{params:.0f}M", f"{ms['ours']:.0f}", f"{ms['hf']:.0f}", f"{ms['hf'] / ms['ours']:.2f}")
        del hf, ours

# ----------------------------------------------------------------------------- (p) bf16 vs fp32

def bench_precision(shapes, dev, repeats, cuda):
    """Time of one full-weight step as unlearn.py takes it, under --dtype float32 and --dtype bfloat16 (the
    model stored in bf16, its trained weights made fp32 by mixed_precision, the step under autocast), on random
    tokens; interleaved rounds, the first a warm-up, median of the rest."""
    import unlearn
    from model import GPT, mixed_precision
    print("\n### (p) full-weight step, bf16 (autocast, fp32 master weights) vs fp32\n")
    row("model", "batch", "fp32 (ms)", "bf16 (ms)", "bf16 / fp32")
    row(*["---"] * 5)
    for name, config, batch, seq in shapes:
        steps = {}
        for dtype in ("float32", "bfloat16"):
            cfg = unlearn.Config(device=dev, dtype=dtype)
            torch.manual_seed(0)
            model = GPT(config).to(dev, getattr(torch, dtype)).train()
            opt = torch.optim.AdamW(mixed_precision(model), lr=1e-5)
            idx = torch.randint(0, config.vocab_size, (batch, seq + 1), device=dev)
            scale = torch.full((batch * seq,), 1.0 / (batch * seq), device=dev)

            def step(model=model, opt=opt, cfg=cfg, idx=idx, scale=scale):
                with unlearn.autocast(cfg):
                    h = model(idx[:, :-1]).flatten(0, 1)
                    loss = kernels.linear_loss(h, model.lm_head.weight, idx[:, 1:].flatten(), scale=scale)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            steps[dtype] = step
        ms = {k: [] for k in steps}
        for r in range(repeats + 1):  # interleaved, so that a change of load on a shared machine hits both
            for k, step in steps.items():
                t = timed(step, cuda)
                if r:
                    ms[k].append(t)
        f32, b16 = statistics.median(ms["float32"]), statistics.median(ms["bfloat16"])
        row(name, f"{batch} x {seq}", f"{f32:.0f}", f"{b16:.0f}", f"{b16 / f32:.2f}")
# ----------------------------------------------------------------------------- (e) EL_10 at GPT-Neo-125M shapes

def neo_125m():
    """A random-init model of GPT-Neo-125M's shape (12 x 768, 12 heads, global/local windows of 256, vocab 50257)."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=2048, vocab_size=50257, n_layer=12, n_head=12, n_embd=768, qkv_bias=False,
                         fused_qkv=False, window=(0, 256) * 6, attn_scale=1.0)).eval()


def tdec_forget(n_rows, n_tokens=202):
    """The first n_rows of TDEC's lm_extraction_32_0 forget set (GPT-2 ids: bos, 200 tokens, eot), prepared by
    data/tdec/prepare.py into a temporary folder; n_tokens < 202: each row cut to its first n_tokens."""
    import tempfile
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    import common
    with tempfile.TemporaryDirectory() as tmp:
        _, _, arrays = common.prepared(tmp, "tdec", common.load("gpt2"), "lm_extraction_32_0")
        f = arrays["forget"]
        return common.Split(f["ids"][:n_rows, :n_tokens], f["kind"][:n_rows, :n_tokens], "cpu")


def extraction_by_generate(model, split, n=10, first=1):
    """The former metrics.extraction (kept here as the reference, not in metrics.py): one generate() of every row
    per prefix length t, each to the split's width L: sum over t of (L - t) sequential decode steps."""
    N, L = split.rows.shape
    lengths, lo, starts = split.lengths, getattr(split, "start", 1) + first, {}
    for i, spans in enumerate(split.secrets()):
        for s, e in spans:
            starts.setdefault(s, []).append((i, e))
    el, extracted = torch.zeros(N), [[] for _ in range(N)]
    for t in sorted(set(range(lo, int(lengths.max()) - n + 1)) | set(starts)):
        gen = model.generate(split.rows[:, :t], L - t)[:, t:]
        if lo <= t <= L - n:
            g, m = gen.unfold(1, n, 1), split.rows[:, t:].unfold(1, n, 1)
            valid = torch.arange(m.size(1))[None] <= (lengths - t - n)[:, None]
            same = (g[:, :, None] == m[:, None]).all(-1) & valid[:, :, None] & valid[:, None]
            el += same.any(2).sum(1) / valid.sum(1).clamp_min(1)
        for i, e in starts.get(t, []):
            extracted[i].append(bool((gen[i, :e - t] == split.rows[i, t:e]).all()))
    return el / (lengths - (lo - first) - n - first + 1).clamp_min(1), extracted


def matmul_gflops(m=256, k=768, n=3072, repeats=20):
    """The machine's fp32 matmul rate at the decode's shapes (a chunk of prefixes x GPT-Neo-125M's MLP), GFLOP/s."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    t0 = time.process_time()  # CPU time, like the EL figures it is compared with
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.process_time() - t0) / 1e9


def bench_el(n_rows, impl, out, n_tokens=202):
    """EL_10 of n_rows TDEC rows on the random GPT-Neo-125M: `new` (metrics.extraction) or `old` (the reference
    above, through whatever model.generate this tree has). Time, forward calls (= sequential decode steps, plus
    the prefills), generated tokens, and the compute floor: generated tokens x 2 x params at the measured rate."""
    import metrics
    model, split = neo_125m(), tdec_forget(n_rows, n_tokens)
    calls = [0]
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    t0, c0 = time.perf_counter(), time.process_time()
    el, extracted = (metrics.extraction if impl == "new" else extraction_by_generate)(model, split, 10)
    s, cpu = time.perf_counter() - t0, time.process_time() - c0  # CPU time: what a loaded machine does not inflate
    L, n = split.rows.size(1), 10
    tokens = sum(int(l) - t for l in split.lengths.tolist() for t in range(2, int(l) - n + 1))  # what EL needs
    params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()  # matmul weights
    rate = matmul_gflops()
    floor = tokens * 2 * params / rate / 1e9
    row("impl", "rows x positions", "wall (s)", "CPU (s)", "forward calls", "generated tokens needed", "matmul GFLOP/s",
        "floor (s)", "CPU / floor")
    row(*["---"] * 9)
    row(impl, f"{n_rows} x {L}", f"{s:.1f}", f"{cpu:.1f}", calls[0], tokens, f"{rate:.1f}", f"{floor:.1f}", f"{cpu / floor:.2f}")
    if out:
        with open(out, "w") as f:
            json.dump(dict(impl=impl, rows=n_rows, seconds=s, cpu_seconds=cpu, el=el.tolist(), extracted=extracted), f)


def bench_decode_step(batch, prompt=100, new=20):
    """CPU ms of one decode step of model.generate at batch `batch` on the random GPT-Neo-125M: (generate of new + 1
    tokens - generate of 1 token) / new, after a prompt of `prompt` TDEC tokens; median of 3."""
    model, split = neo_125m(), tdec_forget(batch)
    idx = split.rows[:, :prompt]
    def cpu_ms(fn):  # CPU time: what a loaded machine does not inflate
        c0 = time.process_time()
        fn()
        return 1000 * (time.process_time() - c0)
    with torch.no_grad():
        one = statistics.median(cpu_ms(lambda: model.generate(idx, 1)) for _ in range(3))
        many = statistics.median(cpu_ms(lambda: model.generate(idx, new + 1)) for _ in range(3))
    row("batch", "prompt", "decode step (CPU ms)")
    row(*["---"] * 3)
    row(batch, prompt, f"{(many - one) / new:.1f}")


# ----------------------------------------------------------------------------- (v) FILA's SVD

def bench_svd(rank=8):
    """FILA's per-layer SVD of diag(w)·W: exact (torch.linalg.svd) vs randomized (torch.svd_lowrank, q = r,
    FILA's code) at GPT-2-small and Llama-3.2-1B linear shapes: time, and how much of the exact rank-r
    approximation's captured energy (sum of the top r singular values squared) the randomized one captures."""
    row("shape (out x in)", "exact (ms)", "svd_lowrank q=r (ms)", "exact / lowrank", "energy captured, lowrank / exact")
    row(*["---"] * 5)
    for out, inp in ((768, 768), (3072, 768), (2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)):
        torch.manual_seed(0)
        W = torch.randn(out, inp) / inp ** 0.5 * torch.rand(out, 1)  # rows of unequal weight, as diag(w)·W
        exact = statistics.median(timed(lambda: torch.linalg.svd(W, full_matrices=False), False) for _ in range(3))
        low = statistics.median(timed(lambda: torch.svd_lowrank(W, q=rank), False) for _ in range(3))
        S = torch.linalg.svd(W, full_matrices=False)[1][:rank]
        U, _, V = torch.svd_lowrank(W, q=rank)
        captured = (U.T @ W @ V).square().sum() / S.square().sum()  # ‖U_rᵀ W V_r‖² / Σ top-r s²
        row(f"{out} x {inp}", f"{exact:.0f}", f"{low:.1f}", f"{exact / low:.0f}", f"{captured:.3f}")


# ----------------------------------------------------------------------------- (r) FILA's peak memory

def bench_fila_memory(n_layer, rows=32, tokens=64):
    """Peak RSS of this (fresh) process through FILA's two Fisher passes as fila_init runs them (forget, then
    retain, both diagonals kept: the peak of the initialisation; the SVDs after it add one layer's factors) on a
    random model of Llama-3.2-1B's shape cut to n_layer of its 16 layers, fp32, forget and retain each `rows`
    random sequences of `tokens` (one Fisher batch of 32: what the former path held for all layers at once):
    VmHWM, and the same above the RSS before the first pass."""
    import unlearn
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=2048, vocab_size=128256, n_layer=n_layer, n_head=32, n_kv_head=8, n_embd=2048,
                          n_inner=8192, bias=False, fused_qkv=False, mlp="swiglu", norm="rmsnorm", pos="rope",
                          rope_theta=500000.0)).eval()
    model.requires_grad_(False)
    split = lambda: unlearn.Split(torch.randint(0, 128256, (rows, tokens)).numpy(),
                                  (torch.arange(tokens) > 0).expand(rows, -1).numpy(), "cpu")
    forget, retain, layers = split(), split(), model.lora_layers()
    before = vm("VmRSS")
    t0 = time.perf_counter()
    F_f, _ = unlearn.fisher(model, forget, layers)
    F_r, _ = unlearn.fisher(model, retain, layers)
    s = time.perf_counter() - t0
    peak = vm("VmHWM")
    fisher_mib = 8 * sum(m.weight.numel() for m in layers) / 2**20
    row("model", "rows x tokens", "RSS before (MiB)", "peak RSS (MiB)", "peak above before (MiB)",
        "of which the two fp32 diagonals (MiB)", "time (s)")
    row(*["---"] * 7)
    row(f"Llama-3.2-1B shape, {n_layer} of 16 layers", f"{rows} x {tokens}", f"{before:.0f}", f"{peak:.0f}",
        f"{peak - before:.0f}", f"{fisher_mib:.0f}", f"{s:.0f}")


def vm(field):
    """/proc/self/status's field in MiB (VmRSS: now; VmHWM: the peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


# ----------------------------------------------------------------------------- (t) the memory table, computed

def memory_table(gpu=80e9, tokens=32 * 200):
    """GPU memory of each kind of run, computed (not measured) from parameter counts of model.py's GPT built on
    the meta device and the bytes the code allocates for them; bf16 weights; activations excluded except
    fisher()'s hooks (bf16, at `tokens`). FILA: before = both fp32 diagonals on the GPU and every layer's output
    gradient held to the end of the backward; now = fila_init's rule (diagonals on the GPU only while both fit a
    quarter of the free memory) and one layer's gradient at a time. Full-weight: fp32 master weights, gradients
    and AdamW's two moments (16 B a trained parameter) and the frozen bf16 target."""
    from model import GPT, GPTConfig
    neo = lambda L, d, h: GPTConfig(block_size=2048, vocab_size=50257, n_layer=L, n_head=h, n_embd=d, qkv_bias=False,
                                    fused_qkv=False, window=(0, 256) * (L // 2), attn_scale=1.0)
    llama = lambda L, d, h, kv, inner, V, tie: GPTConfig(
        block_size=4096, vocab_size=V, n_layer=L, n_head=h, n_kv_head=kv, n_embd=d, n_inner=inner, bias=False,
        qkv_bias=False, fused_qkv=False, mlp="swiglu", norm="rmsnorm", pos="rope", tie_embeddings=tie)
    models = [("GPT-Neo 125M", neo(12, 768, 12)), ("GPT-Neo 1.3B", neo(24, 2048, 16)), ("GPT-Neo 2.7B", neo(32, 2560, 20)),
              ("Llama-3.2-1B", llama(16, 2048, 32, 8, 8192, 128256, True)),
              ("Llama-3.2-3B", llama(28, 3072, 24, 8, 8192, 128256, True)),
              ("Llama-2-7B", llama(32, 4096, 32, 32, 11008, 32000, False)),
              ("Llama-3.1-8B", llama(32, 4096, 32, 8, 14336, 128256, False))]
    row("model", "params P", "adapted linears", "LoRA / EUL run", "FILA init, before", "FILA init, now (GPU)",
        "now: host memory", "full-weight run")
    row(*["---"] * 8)
    gb = lambda x: f"{x / 1e9:.1f} GB" if x else "-"
    for name, c in models:
        with torch.device("meta"):
            m = GPT(c)
        P = sum(p.numel() for p in m.parameters())
        lin = m.lora_layers()
        P_lin = sum(l.weight.numel() for l in lin)
        a, d = m.transformer.h[0].attn, c.n_embd
        held_in = c.n_layer * (d + a.n_head * a.head_dim + d + (c.n_inner or 4 * d)) * tokens * 2  # q|k|v, gate|up share
        fisher_gpu = 8 * P_lin if 8 * P_lin <= (gpu - 2 * P) / 4 else 0
        before = 2 * P + 8 * P_lin + held_in + sum(l.out_features for l in lin) * tokens * 2
        now = 2 * P + fisher_gpu + held_in + max(l.out_features for l in lin) * tokens * 2 + 8 * max(l.weight.numel() for l in lin)
        row(name, f"{P / 1e9:.2f}B", f"{P_lin / 1e9:.2f}B", gb(2 * P), gb(before), gb(now),
            gb(8 * P_lin if not fisher_gpu else 0), gb(18 * P))


# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="small shapes on the CPU (the default without CUDA)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--case", choices=MEMORY_CASES, help="(m) internal: one memory case, in a fresh process")
    parser.add_argument("--shape", default="8192,128,8192", help="(m) N,H,V")
    parser.add_argument("--models", action="store_true", help="only (d): model.py vs transformers (also part of --cpu)")
    parser.add_argument("--e2e", action="store_true", help="(c) on the CPU too (trains the target when missing)")
    parser.add_argument("--parts", default="a,m,f,d,p", help="on the CPU: which of a, m, f, d, p, e, s, v, r, t, n to run")
    parser.add_argument("--fila_layers", type=int, default=4, help="(r) layers of the Llama-1B-shaped model")
    parser.add_argument("--el_rows", type=int, default=32, help="(e) TDEC rows")
    parser.add_argument("--el_tokens", type=int, default=202, help="(e) positions of each row kept (202: all)")
    parser.add_argument("--el_impl", choices=("new", "old"), default="new", help="(e) metrics.extraction or the former one")
    parser.add_argument("--el_out", default="", help="(e) write the per-sample EL and extraction here (json)")
    parser.add_argument("--dist_case", choices=DIST_SHAPES, help="(n) internal: one process of a torchrun case")
    parser.add_argument("--batch", type=int, default=8, help="(n) internal: the global batch")
    parser.add_argument("--steps", type=int, default=10, help="(n) steps timed")
    args = parser.parse_args()
    if args.dist_case:
        dist_case(args.dist_case, args.batch, args.steps)
        sys.exit()
    if args.case:
        memory_case(args.case, *map(int, args.shape.split(",")))
        sys.exit()
    if args.models:
        cuda = torch.cuda.is_available() and not args.cpu
        if cuda:
            bench_models("cuda", torch.bfloat16, args.repeats, cuda)
        else:
            bench_models("cpu", torch.float32, 3, cuda, batch=2, seq=128)
        raise SystemExit
    from model import GPTConfig
    gpt2_small = GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)
    people = GPTConfig(block_size=70, vocab_size=2396, n_layer=4, n_head=4, n_embd=128)  # the default target
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        dev, dtype = "cuda", torch.bfloat16
        print(f"## {torch.cuda.get_device_name()}, bf16, GPT-2 shapes")
        bench_loss([(8192, 768, 50257), (16384, 768, 50257), (8192, 2048, 50257), (16384, 2048, 50257)],
                   dtype, dev, args.repeats, cuda)
        bench_fisher_models([("default (4 x 128, vocab 2396)", people, 32, 60),
                             ("GPT-2 small (12 x 768, vocab 50257)", gpt2_small, 32, 200)], dev, args.repeats, cuda)
        MODEL_FWD_BWD_MS = model_fwd_bwd(32, 200, 12, 50257, dev, dtype, args.repeats, cuda)
        bench_fisher(32, 200, 12, dtype, dev, args.repeats, cuda)
        bench_precision([("GPT-2 small (12 x 768, vocab 50257)", gpt2_small, 8, 512)], dev, args.repeats, cuda)
    else:
        dev, dtype = "cpu", torch.float32
        print(f"## CPU, small shapes, twins only (Triton needs CUDA); fp32, {torch.get_num_threads()} threads")
        if "a" in args.parts:
            bench_loss([(1024, 128, 8192)], dtype, dev, args.repeats, cuda)
        if "m" in args.parts:
            bench_loss_memory(*map(int, args.shape.split(",")))
        if "f" in args.parts:
            bench_fisher_models([("default (4 x 128, vocab 2396)", people, 32, 60),
                                 ("GPT-2 small (12 x 768, vocab 50257)", gpt2_small, 4, 64)], dev, args.repeats, cuda)
        if "d" in args.parts:
            bench_models(dev, dtype, 3, cuda, batch=2, seq=128)
        if "p" in args.parts:
            bench_precision([("default (4 x 128, vocab 2396)", people, 32, 60),
                             ("GPT-2 small (12 x 768, vocab 50257)", gpt2_small, 2, 64)], dev, args.repeats, cuda)
        if "e" in args.parts:
            bench_el(args.el_rows, args.el_impl, args.el_out, args.el_tokens)
        if "s" in args.parts:
            bench_decode_step(8, prompt=20)
        if "v" in args.parts:
            bench_svd()
        if "r" in args.parts:
            bench_fila_memory(args.fila_layers)
        if "t" in args.parts:
            memory_table()
        if "n" in args.parts:
            bench_torchrun(args.steps)
    if cuda:
        bench_models(dev, dtype, args.repeats, cuda)
    if cuda or args.e2e:
        bench_end_to_end(cuda, args.repeats)
