"""
Unlearning for language models, end to end, in one file: take a model that memorized some records
(the forget set), make it forget them while it keeps everything else (the retain set), and measure both.

    python unlearn.py                          # ih_flora on the embedded `people` testbed
    python unlearn.py --method ga --lr=3e-4    # any method; --key=value and --key value both work
    python unlearn.py --method all --oracle    # every method on one cached target, with the oracle

Read top to bottom: config, data, target model, metrics, losses, adapters (LoRA, FILA), the unlearning
loop, then the methods of the other papers (ICU, EUL, RUM), the report and main(). The equations are
those of design notes; each function names its paper.
"""
import argparse
import copy
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import time
import zlib
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from kernels import grad_sq, linear_loss, token_stats
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
torch.set_flush_denormal(True)  # on a CPU, the tiny floats unlearning leaves behind would slow math 10-100x
LOSSES = ("ga", "gd", "kl", "npo", "ih")
ADAPTERS = ("", "_lora", "_flora")
METHODS = tuple(l + a for l in LOSSES for a in ADAPTERS) + ("icu", "eul", "rum")


# ----------------------------------------------------------------------------------------------------
# config: one dataclass, every field a command-line option


@dataclass
class Config:
    method: str = "ih_flora"   # see METHODS, or "all"
    dataset: str = "people"    # a folder under data_dir with meta.json and {forget,retain,holdout}.bin
    data_dir: str = os.path.join(ROOT, "data")  # where the dataset folders are
    out_dir: str = ""          # default: out/<dataset>
    device: str = ""           # default: cuda when present, else cpu
    seed: int = 1337           # the same command gives the same numbers
    oracle: bool = False       # also train (or reuse) the model on retain only: exact unlearning
    # the target model (trained from scratch when init_from is "scratch", else fine-tuned from GPT-2 weights)
    init_from: str = "scratch" # "scratch", "gpt2", "gpt2-medium", ... or a local transformers folder
    n_layer: int = 4           # the from-scratch target: blocks, heads, width
    n_head: int = 4
    n_embd: int = 128
    train_lr: float = 1e-2     # AdamW, 50 warmup steps, then constant
    train_batch: int = 32      # records a step while training the target (and RUM's holdout proxy)
    train_epochs: int = 300    # at most; training stops once train MA >= memorized
    memorized: float = 0.95    # the first token of a record (a name) cannot be memorized: MA tops out below 1
    # unlearning
    batch_size: int = 8        # forget samples a step (and as many retain samples)
    epochs: int = 30           # the budget, in passes over the forget set; the stopping rule may end it earlier
    lr: float = 3e-4           # full-weight methods (ga, gd, kl, npo, ih, icu, rum)
    lora_lr: float = 1e-2      # adapter methods (_lora, _flora)
    eul_lr: float = 1e-2       # EUL's layers (more steps than LoRA: at the identity start its KL terms have zero gradient)
    rank: int = 8              # LoRA rank r; alpha = 2r (design notes)
    fila: str = "normalised"   # FILA's init: "official" (its code: ε = 1e-5, raw row weights) or "normalised" (README)
    npo_beta: float = 0.1      # NPO's β
    el_n: int = 10             # n of EL_n
    proxy: str = "confidence"  # rum: the memorization proxy, one of PROXIES
    requests: int = 1          # the forget set as K sequential deletion requests, applied one after another
    eval_n: int = 64           # retain records used for the (costly) generation metrics


def parse_args(argv=None):
    helps = dict(re.findall(r"^    (\w+): .*?# (.*)$", inspect.getsource(Config), re.M))  # the comments above
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Config):
        if f.type is bool:  # "--oracle" alone means true
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?",
                           const=True, default=f.default, help=helps.get(f.name))
        elif f.name == "method":
            p.add_argument("--method", default=f.default, choices=METHODS + ("all",),
                           metavar="METHOD", help="one of: " + ", ".join(METHODS + ("all",)))
        elif f.name == "proxy":
            p.add_argument("--proxy", default=f.default, choices=tuple(PROXIES), help=helps.get(f.name))
        elif f.name == "fila":
            p.add_argument("--fila", default=f.default, choices=("official", "normalised"), help=helps.get(f.name))
        else:
            p.add_argument(f"--{f.name}", type=f.type, default=f.default, help=helps.get(f.name))
    cfg = Config(**vars(p.parse_args(argv)))
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg.out_dir = cfg.out_dir or os.path.join("out", cfg.dataset)
    return cfg


class UserError(Exception):
    """A mistake in the input: main() prints it on one line and exits with status 1."""


# ----------------------------------------------------------------------------------------------------
# data: three splits of token rows [n, seq_len], each row <eot> record <eot> padding


class Split:
    def __init__(self, rows, lengths, secrets, device):
        self.rows = torch.as_tensor(rows.astype(np.int64), device=device)
        self.lengths = torch.as_tensor(lengths, device=device)
        self.secrets = secrets  # per row: [start, end) token spans only memorization can reproduce
        self.x = self.rows[:, :-1]
        pos = torch.arange(1, self.rows.size(1), device=device)
        # predict every token after <eot> up to and including the closing <eot>; padding is ignored
        self.y = torch.where(pos[None] < self.lengths[:, None], self.rows[:, 1:], -100)

    def __len__(self):
        return len(self.rows)

    def take(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        new = copy.copy(self)
        new.rows, new.lengths, new.x, new.y = self.rows[idx], self.lengths[idx], self.x[idx], self.y[idx]
        new.secrets = [self.secrets[i] for i in idx.tolist()]
        return new


def load_data(cfg):
    folder = os.path.join(cfg.data_dir, cfg.dataset)
    if not os.path.exists(os.path.join(folder, "meta.json")):
        prepare = os.path.join(ROOT, "data", cfg.dataset, "prepare.py")
        if not os.path.exists(prepare):
            prepare = os.path.join(folder, "prepare.py")
        if cfg.dataset != "people":
            hint = f"prepare it with: python {prepare}" if os.path.exists(prepare) else "no such dataset"
            raise UserError(f"dataset '{cfg.dataset}' is missing ({folder}/meta.json not found); {hint}")
        print(f"data: {folder} is missing, preparing it with {prepare}")
        spec = importlib.util.spec_from_file_location("prepare", prepare)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(["--out_dir", folder])
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    splits = {}
    for name in ("forget", "retain", "holdout"):
        rows = np.fromfile(os.path.join(folder, f"{name}.bin"), dtype=np.uint16).reshape(-1, meta["seq_len"])
        splits[name] = Split(rows, meta["lengths"][name], meta.get("secrets", {}).get(name) or [[]] * len(rows),
                             cfg.device)
    if len(splits["forget"]) == 0:
        raise UserError(f"the forget set of {folder} is empty: there is nothing to unlearn")
    if len(splits["holdout"]) == 0:
        raise UserError(f"the holdout set of {folder} is empty: it sets the level of 'unseen'")
    return meta, splits


def batches(n, batch_size, gen):
    """Shuffled index batches covering range(n) once."""
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def cat(*splits):
    """One split made of several (forget ∪ retain is what the target model is trained on)."""
    new = copy.copy(splits[0])
    for k in ("rows", "lengths", "x", "y"):
        setattr(new, k, torch.cat([getattr(s, k) for s in splits]))
    new.secrets = [spans for s in splits for spans in s.secrets]
    return new


# ----------------------------------------------------------------------------------------------------
# the target model (trained on forget ∪ retain) and the oracle (retain only), cached on disk


def token_loss(model, x, y, kind="ce"):
    """Per-token loss [B, T] ("ce": -log p(y_t), "ih": inverted hinge) straight from hidden states:
    the kernel computes it chunk by chunk over tokens, so B*T*V logits never exist at once."""
    h = model(x)
    return linear_loss(h.flatten(0, 1), model.lm_head.weight, y.flatten(), kind).view_as(y)


def nll(model, batch):
    """Mean next-token negative log-likelihood over a batch's tokens."""
    return token_loss(model, batch.x, batch.y).sum() / (batch.y != -100).sum()


def train(model, data, cfg, name):
    """AdamW on all weights until the model has memorized its data (train MA >= cfg.memorized)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train_lr, weight_decay=0.0, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed)
    t0, step = time.time(), 0
    for epoch in range(1, cfg.train_epochs + 1):
        model.train()
        for idx in batches(len(data), cfg.train_batch, gen):
            lr = cfg.train_lr * min(1.0, (step + 1) / 50)  # short warmup, then constant
            for g in opt.param_groups:
                g["lr"] = lr
            loss = nll(model, data.take(idx))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        if epoch % 5 == 0 or epoch == cfg.train_epochs:
            ma = split_stats(model, data)["ma"]
            print(f"{name}: epoch {epoch} | loss {loss.item():.3f} | train MA {ma:.3f} | {time.time() - t0:.0f}s")
            if ma >= cfg.memorized:
                break
    model.eval()


def load_or_train(cfg, meta, data, name, splits):
    """The model trained on `splits`, from <out_dir>/<name>.pt when it is there, else trained and saved."""
    path = os.path.join(cfg.out_dir, f"{name}.pt")
    if os.path.exists(path):
        ckpt = torch.load(path, map_location=cfg.device, weights_only=False)
        c = ckpt["model_args"]
        if c["vocab_size"] != len(meta["vocab"]) or c["block_size"] < meta["seq_len"]:
            raise UserError(f"{path} was trained for vocabulary {c['vocab_size']} and block size {c['block_size']}, "
                            f"but {cfg.dataset} has {len(meta['vocab'])} and {meta['seq_len']}: "
                            f"delete it or pick another --out_dir")
        model = GPT(GPTConfig(**c)).to(cfg.device)
        model.load_state_dict(ckpt["model"])
        print(f"{name}: reusing {path}")
        return model.eval()
    print(f"{name}: no checkpoint at {path}, training on {' + '.join(splits)}")
    torch.manual_seed(cfg.seed)
    if cfg.init_from == "scratch":
        model = GPT(GPTConfig(block_size=meta["seq_len"], vocab_size=len(meta["vocab"]),
                              n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
    else:  # GPT-2 weights, restricted to the dataset's tokens and its sequence length
        model = GPT.from_pretrained(cfg.init_from)
        model.restrict_vocab(meta["vocab"])
    model.to(cfg.device)
    train(model, cat(data[splits[0]], data[splits[1]]) if len(splits) == 2 else data[splits[0]], cfg, name)
    tmp = path + ".tmp"  # written whole, then renamed: never a half-written checkpoint
    torch.save({"model_args": asdict(model.config), "model": model.state_dict()}, tmp)
    os.replace(tmp, path)
    return model


# ----------------------------------------------------------------------------------------------------
# metrics (Jang et al. 2022 for MA, EL and the stopping rule; Carlini et al. / Shi et al. for the MIAs)


@torch.no_grad()
def token_logprobs(model, split, batch_size=64):
    """Teacher-forced log p(true token) and whether it is the argmax, [N, T] each (0/False on padding)."""
    logps, hits = [], []
    for i in range(0, len(split), batch_size):
        x, y = split.x[i:i + batch_size], split.y[i:i + batch_size]
        lp, hit = token_stats(model(x).flatten(0, 1), model.lm_head.weight, y.flatten())
        logps.append(lp.view_as(y))
        hits.append(hit.view_as(y))
    return torch.cat(logps), torch.cat(hits)


def split_stats(model, split):
    """MA (mean over samples of the fraction of positions whose argmax is the true token), perplexity,
    and the per-sample quantities the MIAs, forget quality and RUM's proxies are made of."""
    logp, hit = token_logprobs(model, split)
    count = (split.y != -100).sum(1)
    ma = hit.sum(1) / count
    return dict(ma=ma.mean().item(), ppl=math.exp(-logp.sum().item() / count.sum().item()),
                ma_per=ma, loss_per=-logp.sum(1) / count, logp=logp, count=count)


@torch.no_grad()
def extraction(model, split, n=10):
    """EL_n (extraction likelihood, Jang et al.) per sample, and per sample the number of its secrets that
    greedy decoding reproduces from the tokens before them.

    EL_n(x) = sum_{t=1}^{T-n} overlap_n(greedy(x_<t), x_>=t) / (T - n), overlap_n the fraction of the true
    suffix's n-grams found in the generation (cut to the suffix's length). Every sample is cut at the same
    t, so each t is one batched generate() on the KV cache."""
    N, L = split.rows.shape
    lengths = split.lengths
    starts = {}  # prefix length -> [(row, end)] of the secrets starting there
    for i, spans in enumerate(split.secrets):
        for s, e in spans:
            starts.setdefault(s, []).append((i, e))
    el, extracted = torch.zeros(N, device=split.rows.device), torch.zeros(N)
    for t in sorted(set(range(1, int(lengths.max()) - n + 1)) | set(starts)):
        gen = model.generate(split.rows[:, :t], L - t)[:, t:]
        g, m = gen.unfold(1, n, 1), split.rows[:, t:].unfold(1, n, 1)  # n-grams [N, L-t-n+1, n]
        valid = torch.arange(m.size(1), device=el.device)[None] <= (lengths - t - n)[:, None]
        same = (g[:, :, None] == m[:, None]).all(-1) & valid[:, :, None]  # [N, generated, true]
        found = same.any(1) & valid
        el += found.sum(1) / valid.sum(1).clamp_min(1)
        for i, e in starts.get(t, []):
            extracted[i] += bool((gen[i, :e - t] == split.rows[i, t:e]).all())
    return el / (lengths - n).clamp_min(1), extracted


def auc(members, nonmembers):
    """P(score of a member > score of a non-member), ties counting half (the Mann-Whitney form)."""
    a, b = np.asarray(members)[:, None], np.asarray(nonmembers)[None, :]
    return float((a > b).mean() + 0.5 * (a == b).mean())


def mia_scores(stats, texts, k=0.2):
    """Membership scores, higher = more likely trained on: LOSS (-NLL), zlib (-log-likelihood over the
    zlib-compressed length of the text, Carlini et al. 2021), Min-K% (mean of the k lowest token
    log-probabilities, Shi et al. 2024)."""
    lp, count = stats["logp"], stats["count"]
    mink = []
    for row, c in zip(lp, count.tolist()):
        low = row[:c].sort().values[:max(1, int(k * c))]
        mink.append(low.mean().item())
    zl = np.array([len(zlib.compress(t.encode())) for t in texts])
    return {"loss": (-stats["loss_per"]).cpu().numpy(), "zlib": lp.sum(1).cpu().numpy() / zl, "mink": np.array(mink)}


def ks_pvalue(a, b):
    """Two-sample Kolmogorov-Smirnov test p-value (asymptotic form, Numerical Recipes' Q_KS), numpy only."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    both = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, both, "right") / len(a) - np.searchsorted(b, both, "right") / len(b)).max()
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (en + 0.12 + 0.11 / en) * d
    j = np.arange(1, 101)
    return float(np.clip(2 * np.sum((-1.0) ** (j - 1) * np.exp(-2 * j ** 2 * lam ** 2)), 0.0, 1.0)) if lam > 0 else 1.0


@torch.no_grad()
def fluency(model, ref, split, decode, fmt, prompt=4):
    """Greedy continuations of the forget records' first tokens: the fraction that is still a well-formed
    record (the dataset's format regex), and their perplexity under the original model θ0."""
    L = split.rows.size(1)
    gen = model.generate(split.rows[:, :prompt], L - prompt)
    ok = [bool(re.fullmatch(fmt, decode(g[1:]).split("<|endoftext|>")[0])) for g in gen.tolist()] if fmt else []
    y = gen[:, 1:].clone()
    y[:, :prompt - 1] = -100  # score the continuation only
    lp, _ = token_stats(ref(gen[:, :-1]).flatten(0, 1), ref.lm_head.weight, y.flatten())
    return dict(format_ok=sum(ok) / len(ok) if ok else float("nan"),
                ppl_ref=math.exp(-lp.sum().item() / (y != -100).sum().item()))


def evaluate(model, ref, data, cfg, meta, oracle_losses=None):
    """Every metric of the report for one model. The generation metrics of the three splits run as one
    batch (retain: its first eval_n records), since generation costs per step more than per row."""
    names = ("forget", "retain", "holdout")
    gen_splits = [data[s] if s != "retain" else data[s].take(range(min(cfg.eval_n, len(data[s])))) for s in names]
    el, extracted = extraction(model, cat(*gen_splits), cfg.el_n)
    out, stats, i = {}, {}, 0
    for name, split in zip(names, gen_splits):
        stats[name] = split_stats(model, data[name])
        n_secrets = sum(len(s) for s in split.secrets)
        out[name] = dict(ma=stats[name]["ma"], el10=el[i:i + len(split)].mean().item(), ppl=stats[name]["ppl"],
                         extraction=extracted[i:i + len(split)].sum().item() / n_secrets if n_secrets else float("nan"),
                         el_per=el[i:i + len(split)].tolist())
        i += len(split)
    texts = {s: [meta["decode"](r[:l]) for r, l in zip(data[s].rows.tolist(), data[s].lengths.tolist())]
             for s in ("forget", "holdout")}
    mf, mh = mia_scores(stats["forget"], texts["forget"]), mia_scores(stats["holdout"], texts["holdout"])
    out["mia_auc"] = {k: auc(mf[k], mh[k]) for k in mf}
    out["fluency"] = fluency(model, ref, data["forget"], meta["decode"], meta.get("format"))
    out["forget_losses"] = stats["forget"]["loss_per"].tolist()
    if oracle_losses is not None:  # TOFU's forget quality: are the forget losses those of the oracle?
        out["forget_quality"] = ks_pvalue(out["forget_losses"], oracle_losses)
    return out


# ----------------------------------------------------------------------------------------------------
# losses: f a forget batch, r a retain batch, ref the frozen target model θ0; lower is better


def loss_ga(model, ref, f, r, cfg):
    """Gradient ascent (Jang et al. 2022): L = -NLL_θ(f)."""
    return -nll(model, f)


def loss_gd(model, ref, f, r, cfg):
    """Gradient difference: L = -NLL_θ(f) + NLL_θ(r)."""
    return -nll(model, f) + nll(model, r)


def vocab_logprobs(model, batch):
    """log p_θ(v) for every vocabulary entry at the batch's target positions, [tokens, V]: full logits, which
    the KL terms need (the fused kernel covers CE and IH only)."""
    return (model(batch.x)[batch.y != -100] @ model.lm_head.weight.t()).float().log_softmax(-1)


def kl_to_ref(model, ref, batch):
    """KL(p_θ0 ‖ p_θ) over the vocabulary, mean over the batch's tokens."""
    with torch.no_grad():
        logp = vocab_logprobs(ref, batch)
    return F.kl_div(vocab_logprobs(model, batch), logp, log_target=True, reduction="batchmean")


def loss_kl(model, ref, f, r, cfg):
    """L = -NLL_θ(f) + KL(p_θ0 ‖ p_θ) on r: forget, but keep the retain predictions those of θ0."""
    return -nll(model, f) + kl_to_ref(model, ref, r)


def seq_logprob(model, batch):
    """log π(x): the sequence log-likelihood, one per sample."""
    return -token_loss(model, batch.x, batch.y).sum(1)


def loss_npo(model, ref, f, r, cfg):
    """Negative preference optimization (Zhang et al. 2024):
    L = (2/β)·mean_f log(1 + (π_θ(x)/π_θ0(x))^β) + NLL_θ(r); log(1 + e^u) is softplus(u). Bounded below,
    unlike GA: the push fades as the sample's likelihood falls below θ0's."""
    with torch.no_grad():
        ref_logp = seq_logprob(ref, f)
    beta = cfg.npo_beta
    return 2 / beta * F.softplus(beta * (seq_logprob(model, f) - ref_logp)).mean() + nll(model, r)


def loss_ih(model, ref, f, r, cfg):
    """Inverted hinge (Cha et al., ICLR 2025): IH_t = 1 + p_θ(y_t) - max_{v≠y_t} p_θ(v), in [0, 2];
    L = mean_t IH_t(f) + NLL_θ(r). It lowers the true token by raising the runner-up, so the text stays
    fluent where GA's unbounded push makes gibberish. (kernels/loss.py has its gradient in closed form.)"""
    ih = token_loss(model, f.x, f.y, "ih")
    return ih.sum() / (f.y != -100).sum() + nll(model, r)


LOSS_FNS = dict(ga=loss_ga, gd=loss_gd, kl=loss_kl, npo=loss_npo, ih=loss_ih)


# ----------------------------------------------------------------------------------------------------
# adapters: LoRA, and FILA, LoRA initialised from the Fisher information (Cha et al., ICLR 2025)


def fisher(model, split, layers, batch_size=32):
    """Empirical Fisher diagonal F = (1/N) Σ_n (∇_W ℓ_n)² of each layer's weight (ℓ_n: sample n's mean NLL)
    and the per-sample squared gradient norms Σ_layers ‖∇_W ℓ_n‖²_F, from exact per-sample gradients.

    One forward/backward of Σ_n ℓ_n per batch: hooks catch each layer's input x [N, T, in] and output
    gradient g [N, T, out], and ∇_W ℓ_n = g_nᵀ x_n, so kernels.grad_sq forms Σ_n (g_nᵀ x_n)² tile by tile
    without ever holding N per-sample gradients. (FILA's own code squares mini-batch gradients instead.)"""
    inputs, grads = {}, {}

    def hook(m, inp, out):
        inputs[m] = inp[0].detach()
        out.register_hook(lambda g: grads.__setitem__(m, g.detach()))

    handles = [m.register_forward_hook(hook) for m in layers]
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)  # the hooks need a backward pass through every layer
    fish = {m: torch.zeros_like(m.weight, dtype=torch.float32) for m in layers}
    sq_norms = torch.zeros(len(split), device=split.rows.device)
    with torch.enable_grad():
        for i in range(0, len(split), batch_size):
            b = split.take(range(i, min(i + batch_size, len(split))))
            (token_loss(model, b.x, b.y).sum(1) / (b.y != -100).sum(1)).sum().backward()
            for m in layers:
                f, sq = grad_sq(inputs[m], grads[m])
                fish[m] += f
                sq_norms[i:i + len(b)] += sq
    for h in handles:
        h.remove()
    for p, flag in zip(model.parameters(), flags):
        p.requires_grad_(flag)
    model.zero_grad(set_to_none=True)
    return {m: f / len(split) for m, f in fish.items()}, sq_norms


@torch.no_grad()
def fila_init(model, forget, retain, cfg):
    """FILA (Cha et al., ICLR 2025, Sec. 3.2, Eq. 5-6): LoRA that starts in the directions that matter for the
    forget set, the function unchanged.
        I = F_f / (F_r + ε),  w_i = sqrt(Σ_j I_ij),  U S Vᵀ = rank-r SVD of diag(w)·W,  s = α/r,
        B = diag(1/w)·U·sqrt(S/s),  A = sqrt(S/s)·Vᵀ,  and the frozen base becomes W - s·B·A.
    cfg.fila = "official" is their code (csm9493/efficient-llm-unlearning, TOFU/forget.py lines 253-287):
    ε = 1e-5 absolute, raw w, B's rows divided by w + 1e-5. "normalised": ε = 1e-6·mean(F_r) and w scaled
    to mean 1, floored at 1e-3, so the A/B balance (and the effective step of Adam on B·A) does not depend
    on the scale of F (README: measured on this testbed).
    Departures from their code, kept on purpose: F from exact per-sample squared gradients, averaged over
    samples (theirs: squared mini-batch gradients weighted by token counts, averaged over tokens,
    measure_importance.py lines 224-257; the per-sample Fisher is the one the paper defines, and the kernel
    makes it cheap), F_r over the whole retain set (theirs: one random retain sample per forget sample),
    an exact SVD (theirs: torch.svd_lowrank, randomized), and GPT-2's fused q|k|v linear gets one rank-r
    adapter (theirs, on Llama/Phi: q, k, v separately)."""
    layers = model.lora_layers()
    F_f, _ = fisher(model, forget, layers)
    F_r, _ = fisher(model, retain, layers)
    r, alpha = cfg.rank, 2 * cfg.rank
    s = alpha / r
    for m in layers:
        if cfg.fila == "official":
            w = (F_f[m] / (1e-5 + F_r[m])).sum(1).sqrt()
            inv_w = 1 / (w + 1e-5)
        else:
            w = (F_f[m] / (F_r[m] + 1e-6 * F_r[m].mean())).sum(1).sqrt()
            w = (w / w.mean()).clamp_min(1e-3)
            inv_w = 1 / w
        U, S, Vh = torch.linalg.svd(w[:, None] * m.weight.float(), full_matrices=False)
        root = (S[:r] / s).sqrt()
        B, A = U[:, :r] * root * inv_w[:, None], root[:, None] * Vh[:r]
        m.weight -= (s * B @ A).to(m.weight.dtype)
        m.add_lora(r, alpha, A, B)


def add_adapters(model, adapter, forget, retain, cfg):
    """Freeze the base and put a rank-r LoRA (alpha = 2r) on every attention and MLP linear: "lora" starts
    at B = 0, "flora" at FILA's initialisation."""
    model.requires_grad_(False)
    if adapter == "flora":
        fila_init(model, forget, retain, cfg)
    else:
        for m in model.lora_layers():
            m.add_lora(cfg.rank, 2 * cfg.rank)


def merge_adapters(model):
    for m in model.lora_layers():
        if m.lora_A is not None:
            m.merge()
            m.remove_lora()


# ----------------------------------------------------------------------------------------------------
# the unlearning loop, with Jang et al.'s stopping rule


def forget_check(model, forget, thresholds, cfg):
    """Forget MA and EL_n, and whether both are below the holdout's: Jang et al.'s stopping rule with their
    strict comparison (joeljang/knowledge-unlearning, models/Neo_Model.py line 647:
    `ma < ma_threshold and el < el_threshold`). EL only when MA passes: generation is the costly part."""
    ma = split_stats(model, forget)["ma"]
    el = extraction(model, forget, cfg.el_n)[0].mean().item() if ma < thresholds["ma"] else float("nan")
    return ma, el, ma < thresholds["ma"] and el < thresholds["el10"]


def unlearn(model, ref, loss_fns, forget, retain, cfg, thresholds, lr, epochs, name="", pairs=None, refine=None):
    """Minimize the loss on (forget batch, retain batch) pairs, an epoch being one pass over the forget set,
    until forget MA and EL_10 are both below the holdout's (Jang et al.), or the epoch budget ends.

    --batch_size at least the forget set's size is Jang et al.'s setting: one full-batch update an epoch, then
    the check (their README line 51: the effective batch must equal the forget set), with their Adam betas
    (0.9, 0.98) (models/Neo_Model.py, configure_optimizers); smaller batches take several steps an epoch.
    loss_fns: the loss of each epoch, cycled (EUL alternates a retain and a forget epoch; most have one).
    pairs: the retain row paired with each forget row (ICU's analogues); default as many random retain rows.
    refine: a per-sample test, model -> bool [len(forget)] (True: forgotten), run before the first epoch and
    after each (ICU): forgotten samples leave the batches with their analogues; every sample is re-checked,
    so one that comes back re-enters. Returns a dict: stopped_by ("threshold", "budget", or "forgotten": no
    sample left to unlearn), steps, tokens,
    trainable_params, and forgotten_at (ICU: the first epoch each sample was forgotten, 0 = before any).
    A non-finite loss stops everything with the weights of the last epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    full_batch = cfg.batch_size >= len(forget)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **(dict(betas=(0.9, 0.98)) if full_batch else {}))
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = tokens = 0
    active, forgotten_at = torch.arange(len(forget)), [None] * len(forget)
    t0 = time.time()
    if refine is not None:  # ICU's code checks every sample before the first epoch too (val(0, ...))
        gone = refine(model)
        forgotten_at = [0 if g else None for g in gone.tolist()]
        active = (~gone).nonzero().flatten().cpu()
        print(f"{name}: before unlearning | forgotten {int(gone.sum())} of {len(forget)}")
        if len(active) == 0:
            return dict(stopped_by="forgotten", steps=0, tokens=0, trainable_params=sum(p.numel() for p in params),
                        forgotten_at=forgotten_at)
    for epoch in range(1, epochs + 1):
        good = [p.detach().clone() for p in params]
        loss_fn = loss_fns[(epoch - 1) % len(loss_fns)]
        model.train()
        for fi in batches(len(active), cfg.batch_size, gen):
            fi = active[fi]
            ri = pairs[fi] if pairs is not None else torch.randint(len(retain), (len(fi),), generator=gen)
            f, r = forget.take(fi), retain.take(ri)
            loss = loss_fn(model, ref, f, r, cfg)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            if not (torch.isfinite(loss) and torch.isfinite(norm)):
                with torch.no_grad():
                    for p, g in zip(params, good):
                        p.copy_(g)
                raise UserError(f"{name}: the loss became {loss.item()} at step {steps + 1}; stopped, the weights "
                                f"are those after epoch {epoch - 1} (try a lower learning rate)")
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
            tokens += int((f.y != -100).sum() + (r.y != -100).sum())
        model.eval()
        if refine is not None:
            gone = refine(model)
            for i in gone.nonzero().flatten().tolist():
                forgotten_at[i] = epoch if forgotten_at[i] is None else forgotten_at[i]
            active = (~gone).nonzero().flatten().cpu()
        ma, el, done = forget_check(model, forget, thresholds, cfg)
        print(f"{name}: epoch {epoch} | loss {loss.item():.4f} | forget MA {ma:.3f} EL{cfg.el_n} {el:.4f} "
              + (f"| active {len(active)} " if refine is not None else "") + f"| {time.time() - t0:.1f}s")
        if done or len(active) == 0:
            break
    # "forgotten": ICU's own rule, every sample passes the per-sample test (their code: unlearn_cnt < 1)
    stopped_by = "threshold" if done else "forgotten" if len(active) == 0 else "budget"
    return dict(stopped_by=stopped_by, steps=steps, tokens=tokens,
                trainable_params=sum(p.numel() for p in params), forgotten_at=forgotten_at if refine is not None else None)


# ----------------------------------------------------------------------------------------------------
# ICU: iterative contrastive unlearning (Tang et al. 2024)


@torch.no_grad()
def analogues(model, forget, others):
    """Each forget sample's nearest neighbour among `others` by cosine similarity of the target model's
    mean-pooled final hidden states (the paper uses a sentence encoder; the model's own states serve here)."""
    def pooled(split):
        mask = (split.y != -100).unsqueeze(-1).float()
        return F.normalize((model(split.x) * mask).sum(1) / mask.sum(1), dim=-1)
    return (pooled(forget) @ pooled(others).t()).argmax(1).cpu()


def loss_icu(model, ref, f, a, cfg, alpha=0.5, beta=1.0):
    """ICU (Tang et al. 2024): L = -NLL_θ(f) + α·NLL_θ(a) + β·KL(p_θ0 ‖ p_θ)(a), α = 0.5, β = 1.0, with a the
    forget batch's analogues: forget the sample, keep what the model knows about its neighbours."""
    return -nll(model, f) + alpha * nll(model, a) + beta * kl_to_ref(model, ref, a)


def bleu(reference, candidate):
    """Sentence BLEU as ICU's code computes it (himalalps/ICU, train_neo_meanwhile_update.py lines 184-186):
    nltk's sentence_bleu([ref], cand): 1- to 4-grams weighted 1/4, brevity penalty, no smoothing (a missing
    n-gram order gives ~0), on nltk.word_tokenize of the lowercased texts. nltk is imported here only.
    One departure: word_tokenize first splits sentences with punkt, whose data (punkt_tab) is a download;
    here sentences are split after . ! ? and a space, then each goes through the same Treebank tokenizer."""
    import warnings
    from nltk.tokenize import word_tokenize
    from nltk.translate.bleu_score import sentence_bleu

    def words(text):
        return [w for s in re.split(r"(?<=[.!?])\s+", text.lower()) for w in word_tokenize(s, preserve_line=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns for every pair without a common 4-gram: the forgotten ones
        return float(sentence_bleu([words(reference)], words(candidate)))


def have_bertscore(model_type="bert-base-uncased"):
    """Are the bert_score package and the model's weights on this machine? They are never downloaded."""
    if importlib.util.find_spec("bert_score") is None or importlib.util.find_spec("huggingface_hub") is None:
        return False
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(model_type, "config.json"), str)


def bertscore_f1(candidates, references, model_type="bert-base-uncased"):
    """BERTScore F1 per pair (bert_score.score with its defaults, as ICU's utils.py line 81 calls it), or None
    where it is not available offline (have_bertscore)."""
    if not have_bertscore(model_type):
        return None
    from bert_score import score
    return score(candidates, references, model_type=model_type)[2]


@torch.no_grad()
def continuation(model, prompts, n_new, beams=2):
    """The best of `beams` beams (highest sum of token log-probabilities) continuing each prompt [N, T] by
    n_new tokens -> [N, n_new]; beams=1 is greedy decoding. On the KV cache, reordered as beams are chosen.
    Departure from transformers' beam search (what ICU's code calls): <eot> does not end a beam early."""
    if beams == 1:
        return model.generate(prompts, n_new)[:, prompts.size(1):]
    N = len(prompts)
    caches = [[None, None] for _ in model.transformer.h]
    h = model(prompts.repeat_interleave(beams, 0), caches)[:, -1]
    score = torch.full((N, beams), float("-inf"), device=prompts.device)
    score[:, 0] = 0.0  # the beams start as copies: only the first may expand, or the top-k would pick twins
    out = prompts.new_empty(N * beams, 0)
    for i in range(n_new):
        logp = model.lm_head(h).float().log_softmax(-1)  # [N*beams, V]
        V = logp.size(-1)
        score, idx = (score.view(-1, 1) + logp).view(N, beams * V).topk(beams, dim=-1)  # sorted: beam 0 best
        sel = (torch.arange(N, device=idx.device)[:, None] * beams + idx // V).flatten()
        tok = (idx % V).view(-1, 1)
        out = torch.cat([out[sel], tok], 1)
        for c in caches:
            c[0], c[1] = c[0][sel], c[1][sel]
        if i < n_new - 1:
            h = model(tok, caches)[:, -1]
    return out.view(N, beams, -1)[:, 0]


def icu_cuts(split, suffix_len=50):
    """Where each row's prefix ends and its suffix begins. A row with secrets (people): at its first secret,
    so the prefix is the record up to the phone number and the suffix the rest of the record, secrets and
    the words between them (34-42 tokens on the default data; the prompt, 22-26 tokens, is the whole record
    start). Without secrets: suffix_len tokens before the record's end (TDEC's 200-token samples: prefix
    tokens 100-149, suffix 150-199, as ICU's Datasets_mean.py lines 44-49 cut them). Rows are
    <eot> record <eot>."""
    ends = (split.lengths - 1).tolist()  # the closing <eot> belongs to neither
    return [min(s for s, _ in spans) if spans else max(1, e - suffix_len) for spans, e in zip(split.secrets, ends)]


@torch.no_grad()
def forgotten(model, split, decode, prefix_len=50, suffix_len=50, beams=2, max_bleu=0.01, min_f1=0.3):
    """ICU's per-sample test (Tang et al. 2024, iterative unlearning refinement; their code:
    train_neo_meanwhile_update.py lines 151-191): continue the sample's prefix (at most prefix_len tokens
    before the cut, icu_cuts) with 2-beam search for as many tokens as its true suffix has (at most
    suffix_len), and call it forgotten when BLEU(suffix, continuation) < 0.01 or BERTScore F1 < 0.3. The
    continuation is cut at its first <eot> (what follows would be another record). BERTScore runs only where
    bert_score and bert-base-uncased are on the machine (bertscore_f1). Returns (gone [N] bool, bleu [N],
    f1 [N] or None)."""
    cuts, ends = icu_cuts(split, suffix_len), (split.lengths - 1).tolist()
    refs, cands = [None] * len(split), [None] * len(split)
    for cut in sorted(set(cuts)):  # rows cut at the same place share one batched generation
        rows = [i for i, c in enumerate(cuts) if c == cut]
        n = [min(suffix_len, ends[i] - cut) for i in rows]
        gen = continuation(model, split.rows[rows, max(0, cut - prefix_len):cut], max(n), beams).tolist()
        for i, k, g in zip(rows, n, gen):
            refs[i] = decode(split.rows[i, cut:cut + k].tolist())
            cands[i] = decode(g[:k]).split("<|endoftext|>")[0]
    scores = torch.tensor([bleu(r, c) for r, c in zip(refs, cands)])
    gone = scores < max_bleu
    f1 = bertscore_f1(cands, refs)
    if f1 is not None:
        gone |= f1.cpu() < min_f1
    return gone.to(split.rows.device), scores, f1


def record_decoder(cfg):
    """Token ids of the dataset -> text, through meta.json's vocabulary (GPT-2 token ids) and GPT-2's BPE."""
    with open(os.path.join(cfg.data_dir, cfg.dataset, "meta.json")) as f:
        vocab = json.load(f)["vocab"]
    enc = gpt2_encoding()
    return lambda ids: enc.decode([vocab[i] for i in ids])


def unlearn_icu(model, target, forget, retain, cfg, thresholds):
    """ICU on all weights: analogue pairs, and before the first epoch and after every epoch ICU's per-sample
    test (forgotten: BLEU of the 2-beam continuation of its prefix against its true suffix < 0.01; BERTScore
    where available) takes the forgotten samples out of the batches, with their analogues."""
    pairs, decode = analogues(target, forget, retain), record_decoder(cfg)
    ran = "BLEU < 0.01" + (" or BERTScore F1 < 0.3" if have_bertscore() else
                           " (BERTScore not run: bert_score or bert-base-uncased is not on this machine)")
    print(f"icu: per-sample test: {ran}")
    res = unlearn(model, target, [loss_icu], forget, retain, cfg, thresholds, cfg.lr, cfg.epochs, "icu",
                  pairs=pairs, refine=lambda m: forgotten(m, forget, decode)[0])
    res["forgotten_test"] = ran
    return res


# ----------------------------------------------------------------------------------------------------
# EUL: unlearning layers, and their fusion for sequential deletion requests (Chen & Yang, EMNLP 2023)


class UnlearnLayer(torch.nn.Module):
    """h <- h + U·gelu(D·h) after a block's MLP (model.Block.adapter), U = 0 at start: the identity.
    Its width is --rank. No biases, so that fusion is the plain Gram-matrix formula below."""

    def __init__(self, n_embd, width):
        super().__init__()
        self.down = torch.nn.Linear(n_embd, width, bias=False)
        self.up = torch.nn.Linear(width, n_embd, bias=False)
        torch.nn.init.zeros_(self.up.weight)

    def forward(self, h):
        return self.up(F.gelu(self.down(h)))


def loss_eul_forget(model, ref, f, r, cfg, gamma=0.2):
    """EUL's forget epochs: -KL(p_θ0 ‖ p_θ)(f) - γ·NLL_θ(f), γ = 0.2: move away from the teacher on f."""
    return -kl_to_ref(model, ref, f) - gamma * nll(model, f)


def loss_eul_retain(model, ref, f, r, cfg, alpha=0.8, lam=1.0):
    """EUL's retain epochs: α·KL(p_θ0 ‖ p_θ)(r) + λ·NLL_θ(r), α = 0.8, λ = 1.0: stay the teacher on r.
    Alternating the two (design: L = α·KL(r) - KL(f) + λ·NLL(r) - γ·NLL(f)) is the selective
    teacher-student objective; a retain epoch has as many (random) retain batches as a forget epoch."""
    return alpha * kl_to_ref(model, ref, r) + lam * nll(model, r)


@torch.no_grad()
def grams(model, layers, split):
    """G = XᵀX of the inputs X of every linear map of the unlearning layers, over the split's tokens:
    what fusion keeps of a request instead of its data."""
    out, handles = {}, []
    mask = split.y != -100
    for m in [lin for layer in layers for lin in (layer.down, layer.up)]:
        def hook(mod, inp, _):
            x = inp[0][mask].double()
            out[mod] = out.get(mod, 0) + x.t() @ x
        handles.append(m.register_forward_hook(hook))
    model(split.x)
    for h in handles:
        h.remove()
    return out


def fuse(weights, grams_):
    """EUL's data-free fusion of one linear map trained by several requests: the single W closest to every
    W_i on request i's own inputs, argmin_W Σ_i ‖X_i Wᵀ - X_i W_iᵀ‖², in closed form
        W = (Σ_i W_i G_i)(Σ_i G_i)⁻¹,  G_i = X_iᵀX_i
    (design notes write it (Σ G_i)⁻¹ Σ G_i W_i for W acting on the right). A ridge of 1e-6·mean(diag)
    keeps the solve defined when the inputs do not span every direction."""
    G = sum(grams_)
    G = G + 1e-6 * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype, device=G.device)
    WG = sum(W.double() @ Gi for W, Gi in zip(weights, grams_))
    return torch.linalg.solve(G, WG.t()).t().to(weights[0].dtype)  # G symmetric: W G = WG


def unlearn_eul(model, target, forget, retain, cfg, thresholds, requests):
    """One EUL request: a fresh unlearning layer in every block on the frozen base, trained alternating
    forget and retain epochs; its weights and Gram matrices join `requests`, and the model gets the fusion
    of all requests so far (for a single request, the layer itself)."""
    blocks = model.transformer.h
    layers = [UnlearnLayer(model.config.n_embd, cfg.rank).to(cfg.device) for _ in blocks]
    model.requires_grad_(False)
    for b, layer in zip(blocks, layers):
        b.adapter = layer
    result = unlearn(model, target, [loss_eul_forget, loss_eul_retain], forget, retain, cfg, thresholds,
                     cfg.eul_lr, cfg.epochs, "eul")
    g = grams(model, layers, forget)
    requests.append([{k: (getattr(l, k).weight.detach().clone(), g[getattr(l, k)]) for k in ("down", "up")}
                     for l in layers])
    with torch.no_grad():
        for j, layer in enumerate(layers):
            for k in ("down", "up"):
                ws, gs = zip(*[req[j][k] for req in requests])
                getattr(layer, k).weight.copy_(fuse(ws, gs))
    return result


# ----------------------------------------------------------------------------------------------------
# RUM: memorization-aware unlearning with cheap memorization proxies (Zhao & Triantafillou 2024)
# Each proxy scores every forget sample from the target model θ0, higher = more memorized.


def proxy_confidence(target, forget, data, cfg):
    """Mean probability θ0 gives the true tokens (the paper's best cheap proxy)."""
    s = split_stats(target, forget)
    return ((s["logp"].exp() * (forget.y != -100)).sum(1) / s["count"]).cpu().numpy()  # padding: logp 0


def proxy_loss(target, forget, data, cfg):
    """Minus the mean per-token loss under θ0."""
    return (-split_stats(target, forget)["loss_per"]).cpu().numpy()


def proxy_ma(target, forget, data, cfg):
    """The sample's own memorization accuracy."""
    return split_stats(target, forget)["ma_per"].cpu().numpy()


def proxy_el(target, forget, data, cfg):
    """The sample's own EL_10: T greedy generations, the costliest of the cheap proxies."""
    return extraction(target, forget, cfg.el_n)[0].cpu().numpy()


def proxy_gradnorm(target, forget, data, cfg):
    """Minus the per-sample gradient norm over every block linear (kernels.grad_sq): a memorized sample sits
    at a minimum of its own loss, so its gradient is small."""
    return (-fisher(target, forget, target.lora_layers())[1].sqrt()).cpu().numpy()


def proxy_holdout(target, forget, data, cfg, epochs=5):
    """Holdout retraining: fine-tune a copy of θ0 on holdout for a few epochs (lr train_lr/10); memorized
    samples are those whose predictions move most, the symmetric KL between θ0 and the copy per token."""
    tuned = copy.deepcopy(target).train()
    opt = torch.optim.AdamW(tuned.parameters(), lr=cfg.train_lr / 10, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(epochs):
        for idx in batches(len(data["holdout"]), cfg.train_batch, gen):
            nll(tuned, data["holdout"].take(idx)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    tuned.eval()
    with torch.no_grad():
        logp, logq = vocab_logprobs(target, forget), vocab_logprobs(tuned, forget)
        sym = ((logp.exp() - logq.exp()) * (logp - logq)).sum(-1)  # one per target token, row by row
        mask = forget.y != -100
        per_row = torch.zeros(len(mask), device=sym.device).index_add_(0, mask.nonzero()[:, 0], sym)
        return (per_row / mask.sum(1)).cpu().numpy()


PROXIES = dict(confidence=proxy_confidence, loss=proxy_loss, ma=proxy_ma, el=proxy_el, gradnorm=proxy_gradnorm,
               holdout=proxy_holdout)


def spearman(a, b):
    """Spearman's rank correlation, ties given their average rank (numpy only)."""
    def ranks(v):
        v = np.asarray(v, float)
        r = np.empty(len(v))
        r[v.argsort(kind="stable")] = np.arange(len(v))
        _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
        return (np.bincount(inv, weights=r) / counts)[inv]
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def proxy_quality(target, oracle, data, cfg):
    """The paper's table for this testbed: each proxy's Spearman correlation with an expensive reference,
    the per-sample loss gap between the oracle (never saw the sample) and θ0, and its cost in seconds."""
    forget = data["forget"]
    reference = (split_stats(oracle, forget)["loss_per"] - split_stats(target, forget)["loss_per"]).cpu().numpy()
    quality = {}
    for name, proxy in PROXIES.items():
        t0 = time.time()
        scores = proxy(target, forget, data, cfg)
        quality[name] = dict(spearman=spearman(scores, reference), cost_s=time.time() - t0)
    return quality


# (third, loss, share of the epoch budget): the gentlest for the least memorized, the strongest for the most
RUM_PLAN = (("low", "npo", 0.25), ("medium", "ih", 0.25), ("high", "gd", 0.5))


def thirds(scores):
    """Indices of the low / medium / high memorization thirds (sizes differ by at most one)."""
    return [torch.as_tensor(t.copy()) for t in np.array_split(np.argsort(scores, kind="stable"), 3)]


def unlearn_rum(model, target, forget, retain, cfg, thresholds, data):
    """RUM: score the forget set with --proxy, then unlearn its thirds in order low, medium, high, each with
    its own loss and budget (RUM_PLAN) and the stopping rule on that third, all weights at --lr."""
    scores = PROXIES[cfg.proxy](target, forget, data, cfg)
    out = dict(steps=0, tokens=0, trainable_params=0, forgotten_at=None, proxy=cfg.proxy, thirds=[])
    for (name, loss, share), idx in zip(RUM_PLAN, thirds(scores)):
        res = unlearn(model, target, [LOSS_FNS[loss]], forget.take(idx), retain, cfg, thresholds, cfg.lr,
                      max(1, round(share * cfg.epochs)), f"rum {name} ({loss}, {len(idx)} samples)")
        out["steps"] += res["steps"]
        out["tokens"] += res["tokens"]
        out["trainable_params"] = res["trainable_params"]
        out["thirds"].append(dict(third=name, loss=loss, samples=idx.tolist(), stopped_by=res["stopped_by"]))
    out["stopped_by"] = "threshold" if forget_check(model, forget, thresholds, cfg)[2] else "budget"
    return out


# ----------------------------------------------------------------------------------------------------
# running a method, the report, main()


def apply_method(method, model, target, forget, retain, data, cfg, thresholds, eul_requests):
    """Unlearn `forget` from `model` in place with one method; returns unlearn()'s dict."""
    if method == "icu":
        return unlearn_icu(model, target, forget, retain, cfg, thresholds)
    if method == "eul":
        return unlearn_eul(model, target, forget, retain, cfg, thresholds, eul_requests)
    if method == "rum":
        return unlearn_rum(model, target, forget, retain, cfg, thresholds, data)
    loss, _, adapter = method.partition("_")  # "ih_flora" -> inverted hinge on a FILA-initialised LoRA
    if adapter:
        add_adapters(model, adapter, forget, retain, cfg)
    result = unlearn(model, target, [LOSS_FNS[loss]], forget, retain, cfg, thresholds,
                     cfg.lora_lr if adapter else cfg.lr, cfg.epochs, method)
    merge_adapters(model)
    return result


def run_method(method, target, data, meta, cfg, thresholds, oracle_losses):
    """One method on a fresh copy of the target model, the forget set split into cfg.requests sequential
    deletion requests (EUL: one unlearning layer per request, fused after each); evaluate, return results."""
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(target)
    forget, retain = data["forget"], data["retain"]
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    chunks = torch.arange(len(forget)).chunk(cfg.requests)
    total = dict(steps=0, tokens=0, trainable_params=0)
    eul_requests, per_request, forgotten_at = [], [], [None] * len(forget)
    for k, idx in enumerate(chunks, 1):
        res = apply_method(method, model, target, forget.take(idx), retain, data, cfg, thresholds, eul_requests)
        total["steps"] += res["steps"]
        total["tokens"] += res["tokens"]
        total["trainable_params"] = max(total["trainable_params"], res["trainable_params"])
        for i, e in zip(idx.tolist(), res["forgotten_at"] or []):
            forgotten_at[i] = e
        if cfg.requests > 1:  # the state after each request, on everything deleted so far
            so_far = forget.take(torch.cat(chunks[:k]))
            el = extraction(model, so_far, cfg.el_n)[0].mean().item()
            per_request.append(dict(request=k, stopped_by=res["stopped_by"], forget_ma=split_stats(model, so_far)["ma"],
                                    forget_el10=el, retain_ma=split_stats(model, retain)["ma"]))
            print(f"{method}: after request {k}/{cfg.requests} | forget so far MA {per_request[-1]['forget_ma']:.3f} "
                  f"EL{cfg.el_n} {el:.4f} | retain MA {per_request[-1]['retain_ma']:.3f}")
    stopped_by = res["stopped_by"] if cfg.requests == 1 else \
        ("threshold" if forget_check(model, forget, thresholds, cfg)[2] else "budget")
    time_s = time.time() - t0
    peak = torch.cuda.max_memory_allocated() if cfg.device == "cuda" else None
    print(f"{method}: stopped by {stopped_by} after {total['steps']} steps, {time_s:.1f}s; evaluating")
    after = evaluate(model, target, data, cfg, meta, oracle_losses)
    out = dict(method=method, stopped_by=stopped_by, steps=total["steps"], time_s=time_s,
               tokens_per_s=total["tokens"] / time_s, trainable_params=total["trainable_params"],
               peak_mem_mb=peak / 2**20 if peak else None, after=after)
    if method == "icu":
        out["forgotten_at_epoch"] = forgotten_at
        out["forgotten_test"] = res["forgotten_test"]  # which of ICU's tests ran: BLEU, and BERTScore where available
    if method == "rum":
        out["rum"] = {k: res[k] for k in ("proxy", "thirds")}
    if per_request:
        out["requests"] = per_request
    return out, model


def table(columns):
    """The metrics side by side, one column per evaluated model."""
    rows = [(f"{s} {k}", lambda e, s=s, k=k: e[s][k]) for s in ("forget", "retain", "holdout")
            for k in ("ma", "el10", "ppl", "extraction")]
    rows += [(f"MIA AUC {k}", lambda e, k=k: e["mia_auc"][k]) for k in ("loss", "zlib", "mink")]
    rows += [("fluency format ok", lambda e: e["fluency"]["format_ok"]),
             ("fluency ppl under θ0", lambda e: e["fluency"]["ppl_ref"]),
             ("forget quality (KS p)", lambda e: e.get("forget_quality", float("nan")))]
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, get in rows:
        lines.append(f"| {name} | " + " | ".join(f"{get(e):.3f}" for e in columns.values()) + " |")
    return "\n".join(lines)


def write_json(path, obj):
    """Written whole to a temporary file, then renamed: never a half-written results.json."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def comparison(summary, oracle):
    """`--method all`: one row per method, the oracle (exact unlearning) last."""
    cols = [("stopped by", lambda r: r["stopped_by"]), ("steps", lambda r: r["steps"]),
            ("time s", lambda r: f"{r['time_s']:.1f}"), ("forget MA", lambda r: f"{r['after']['forget']['ma']:.3f}"),
            ("forget EL10", lambda r: f"{r['after']['forget']['el10']:.4f}"),
            ("retain MA", lambda r: f"{r['after']['retain']['ma']:.3f}"),
            ("retain ppl", lambda r: f"{r['after']['retain']['ppl']:.2f}"),
            ("MIA AUC (loss)", lambda r: f"{r['after']['mia_auc']['loss']:.3f}"),
            ("format ok", lambda r: f"{r['after']['fluency']['format_ok']:.3f}"),
            ("forget quality", lambda r: f"{r['after'].get('forget_quality', float('nan')):.3g}")]
    rows = dict(summary, oracle=dict(stopped_by="-", steps="-", time_s=0.0, after=oracle))
    lines = ["| method | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(str(get(r)) for _, get in cols) + " |" for m, r in rows.items()]
    return "\n".join(lines)


def plot(summary, oracle, path):
    """Forget EL_10 against retain perplexity and against MIA AUC, one point per method, the oracle a star.
    matplotlib is imported only here; without it the run goes on without the picture."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (label, get) in zip(axes, [("retain perplexity", lambda e: e["retain"]["ppl"]),
                                       ("MIA AUC forget vs holdout (loss)", lambda e: e["mia_auc"]["loss"])]):
        for m, r in summary.items():
            ax.scatter(get(r["after"]), r["after"]["forget"]["el10"], s=18)
            ax.annotate(m, (get(r["after"]), r["after"]["forget"]["el10"]), fontsize=7)
        ax.scatter(get(oracle), oracle["forget"]["el10"], marker="*", s=200, c="k", label="oracle")
        ax.set_xlabel(label)
        ax.set_xscale("log" if "perplexity" in label else "linear")  # collapsed models reach 1e6 and beyond
        ax.set_ylabel("forget EL10")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)
    print(f"wrote {path}")


def run(cfg):
    for name in ("requests", "batch_size", "train_batch", "epochs", "rank"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}, but PyTorch sees no CUDA GPU here; use --device cpu")
    try:  # fail now, not after minutes of training, when the out dir cannot be written
        os.makedirs(cfg.out_dir, exist_ok=True)
        probe = os.path.join(cfg.out_dir, ".probe")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --out_dir {cfg.out_dir}: {e.strerror}")
    torch.manual_seed(cfg.seed)
    meta, data = load_data(cfg)
    if cfg.requests > len(data["forget"]):
        raise UserError(f"--requests {cfg.requests} is more than the {len(data['forget'])} forget samples")
    enc = gpt2_encoding()
    meta["decode"] = lambda ids: enc.decode([meta["vocab"][i] for i in ids])
    target = load_or_train(cfg, meta, data, "target", ("forget", "retain"))
    # the oracle: on request, and always for `all` (marked in the plot) and `rum` (its proxies' reference)
    oracle = load_or_train(cfg, meta, data, "oracle", ("retain",)) if cfg.oracle or cfg.method in ("all", "rum") else None
    print("evaluating the target model")
    before = evaluate(target, target, data, cfg, meta)
    # Jang et al.'s stopping rule: the target's level on unseen data. Our choice: EL_10 is floored at 0.001,
    # since a small holdout can score exactly 0, and one stray 10-gram in the forget set would then block the rule.
    thresholds = {"ma": before["holdout"]["ma"], "el10": max(before["holdout"]["el10"], 1e-3)}
    print(f"thresholds (the target's holdout level): MA {thresholds['ma']:.3f}, EL{cfg.el_n} {thresholds['el10']:.4f}")
    columns = {"before": before}
    if oracle is not None:
        print("evaluating the oracle")
        columns["oracle"] = evaluate(oracle, target, data, cfg, meta)
        before["forget_quality"] = ks_pvalue(before["forget_losses"], columns["oracle"]["forget_losses"])
    oracle_losses = columns["oracle"]["forget_losses"] if oracle is not None else None
    methods = METHODS if cfg.method == "all" else (cfg.method,)
    summary, failed = {}, []
    for method in methods:
        try:
            res, _ = run_method(method, target, data, meta, cfg, thresholds, oracle_losses)
        except UserError as e:  # one method's failure (a non-finite loss) does not end `all`
            if cfg.method != "all":
                raise
            print(f"error: {e}; going on with the other methods", file=sys.stderr)
            failed.append(method)
            continue
        res.update(dataset=cfg.dataset, thresholds=thresholds, before=before, mia_auc=res["after"]["mia_auc"],
                   config=asdict(cfg))
        if oracle is not None:
            res["oracle"] = columns["oracle"]
        if method == "rum":  # the proxies' quality, like the paper's table
            res["rum"]["quality"] = proxy_quality(target, oracle, data, cfg)
            print("| proxy | Spearman vs loss gap (oracle - target) | cost s |\n|---|---|---|")
            for name, q in res["rum"]["quality"].items():
                print(f"| {name} | {q['spearman']:.3f} | {q['cost_s']:.2f} |")
        write_json(os.path.join(cfg.out_dir, method, "results.json"), res)
        summary[method] = res
        print(table({**columns, method: res["after"]}))
        print(f"wrote {os.path.join(cfg.out_dir, method, 'results.json')}")
    if cfg.method == "all":
        md = comparison(summary, columns["oracle"])
        print(md)
        with open(os.path.join(cfg.out_dir, "comparison.md.tmp"), "w") as f:
            f.write(md + "\n")
        os.replace(os.path.join(cfg.out_dir, "comparison.md.tmp"), os.path.join(cfg.out_dir, "comparison.md"))
        plot(summary, columns["oracle"], os.path.join(cfg.out_dir, "comparison.png"))
    if failed:
        raise UserError(f"{', '.join(failed)} stopped on a non-finite loss (see above); the others are reported")
    return summary


def gpt2_encoding():
    sys.path.insert(0, os.path.join(ROOT, "data"))
    from gpt2 import encoding
    return encoding()


def main(argv=None):
    cfg = parse_args(argv)
    try:
        return run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
