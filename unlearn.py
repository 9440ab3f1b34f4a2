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
LOSSES = ("ga", "gd", "kl", "npo", "ih")
ADAPTERS = ("", "_lora", "_flora")
METHODS = tuple(l + a for l in LOSSES for a in ADAPTERS)


# ----------------------------------------------------------------------------------------------------
# config: one dataclass, every field a command-line option


@dataclass
class Config:
    method: str = "ih_flora"   # see METHODS, or "all"
    dataset: str = "people"    # a folder under data_dir with meta.json and {forget,retain,holdout}.bin
    data_dir: str = os.path.join(ROOT, "data")
    out_dir: str = ""          # default: out/<dataset>
    device: str = ""           # default: cuda when present, else cpu
    seed: int = 1337
    oracle: bool = False       # also train (or reuse) the model on retain only: exact unlearning
    # the target model (trained from scratch when init_from is "scratch", else fine-tuned from GPT-2 weights)
    init_from: str = "scratch" # "scratch", "gpt2", "gpt2-medium", ... or a local transformers folder
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    train_lr: float = 3e-3
    train_epochs: int = 300    # at most; training stops once train MA >= memorized
    memorized: float = 0.95  # the first token of a record (a name) cannot be memorized: MA tops out below 1
    # unlearning
    batch_size: int = 32
    epochs: int = 30           # the budget; the stopping rule usually ends earlier
    lr: float = 1e-4           # full-weight methods
    lora_lr: float = 1e-3      # adapter methods (_lora, _flora, eul)
    rank: int = 8              # LoRA rank r; alpha = 2r (design notes)
    npo_beta: float = 0.1
    el_n: int = 10             # n of EL_n
    eval_n: int = 64           # retain records used for the (costly) generation metrics


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Config):
        if f.type is bool:  # "--oracle" alone means true
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?",
                           const=True, default=f.default)
        elif f.name == "method":
            p.add_argument("--method", default=f.default, choices=METHODS + ("all",),
                           metavar="METHOD", help="one of: " + ", ".join(METHODS + ("all",)))
        else:
            p.add_argument(f"--{f.name}", type=f.type, default=f.default)
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


def cat(a, b):
    """One split made of two (forget ∪ retain is what the target model is trained on)."""
    new = copy.copy(a)
    new.rows, new.lengths = torch.cat([a.rows, b.rows]), torch.cat([a.lengths, b.lengths])
    new.x, new.y, new.secrets = torch.cat([a.x, b.x]), torch.cat([a.y, b.y]), a.secrets + b.secrets
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
        for idx in batches(len(data), cfg.batch_size, gen):
            lr = cfg.train_lr * min(1.0, (step + 1) / 50)  # short warmup, then constant
            for g in opt.param_groups:
                g["lr"] = lr
            loss = nll(model, data.take(idx))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        if epoch % 10 == 0 or epoch == cfg.train_epochs:
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
    """EL_n (extraction likelihood, Jang et al.) per sample, and the fraction of secrets greedy decoding
    reproduces from the tokens before them.

    EL_n(x) = sum_{t=1}^{T-n} overlap_n(greedy(x_<t), x_>=t) / (T - n), overlap_n the fraction of the true
    suffix's n-grams found in the generation (cut to the suffix's length). Every sample is cut at the same
    t, so each t is one batched generate() on the KV cache."""
    N, L = split.rows.shape
    lengths = split.lengths
    starts = {}  # prefix length -> [(row, end)] of the secrets starting there
    for i, spans in enumerate(split.secrets):
        for s, e in spans:
            starts.setdefault(s, []).append((i, e))
    el, extracted = torch.zeros(N, device=split.rows.device), []
    for t in sorted(set(range(1, int(lengths.max()) - n + 1)) | set(starts)):
        gen = model.generate(split.rows[:, :t], L - t)[:, t:]
        g, m = gen.unfold(1, n, 1), split.rows[:, t:].unfold(1, n, 1)  # n-grams [N, L-t-n+1, n]
        valid = torch.arange(m.size(1), device=el.device)[None] <= (lengths - t - n)[:, None]
        same = (g[:, :, None] == m[:, None]).all(-1) & valid[:, :, None]  # [N, generated, true]
        found = same.any(1) & valid
        el += found.sum(1) / valid.sum(1).clamp_min(1)
        for i, e in starts.get(t, []):
            extracted.append(bool((gen[i, :e - t] == split.rows[i, t:e]).all()))
    el = el / (lengths - n).clamp_min(1)
    return el, (sum(extracted) / len(extracted) if extracted else float("nan"))


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


def evaluate(model, ref, data, cfg, meta, oracle_losses=None, splits=("forget", "retain", "holdout")):
    """Every metric of the report for one model."""
    decode = meta["decode"]
    out, stats = {}, {}
    for name in splits:
        split = data[name] if name != "retain" else data[name].take(range(min(cfg.eval_n, len(data[name]))))
        stats[name] = split_stats(model, data[name])
        el, secrets = extraction(model, split, cfg.el_n)
        out[name] = dict(ma=stats[name]["ma"], el10=el.mean().item(), ppl=stats[name]["ppl"], extraction=secrets)
        out[name]["el_per"] = el.tolist()
    if "holdout" in stats:
        texts = {s: [decode(r[:l]) for r, l in zip(data[s].rows.tolist(), data[s].lengths.tolist())]
                 for s in ("forget", "holdout")}
        mf, mh = mia_scores(stats["forget"], texts["forget"]), mia_scores(stats["holdout"], texts["holdout"])
        out["mia_auc"] = {k: auc(mf[k], mh[k]) for k in mf}
    out["fluency"] = fluency(model, ref, data["forget"], decode, meta.get("format"))
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


def kl_to_ref(model, ref, batch):
    """KL(p_θ0 ‖ p_θ) over the vocabulary, mean over the batch's tokens (full logits of the batch)."""
    mask = batch.y != -100
    logq = (model(batch.x)[mask] @ model.lm_head.weight.t()).float().log_softmax(-1)
    with torch.no_grad():
        logp = (ref(batch.x)[mask] @ ref.lm_head.weight.t()).float().log_softmax(-1)
    return F.kl_div(logq, logp, log_target=True, reduction="batchmean")


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
    """FILA: LoRA that starts in the directions that matter for the forget set, the function unchanged.
        I = F_f / (F_r + ε),  w_i = sqrt(Σ_j I_ij),  U S Vᵀ = rank-r SVD of diag(w)·W,  s = α/r,
        B = diag(1/w)·U·sqrt(S/s),  A = sqrt(S/s)·Vᵀ,  and the frozen base becomes W - s·B·A.
    Choices the paper leaves open: ε = 1e-6·mean(F_r) (scale-free), w normalised to mean 1 and floored at
    1e-3 (so the A/B balance does not depend on the loss scale, and 1/w stays finite)."""
    layers = model.lora_layers()
    F_f, _ = fisher(model, forget, layers)
    F_r, _ = fisher(model, retain, layers)
    r, alpha = cfg.rank, 2 * cfg.rank
    s = alpha / r
    for m in layers:
        imp = F_f[m] / (F_r[m] + 1e-6 * F_r[m].mean())
        w = imp.sum(1).sqrt()
        w = (w / w.mean()).clamp_min(1e-3)
        U, S, Vh = torch.linalg.svd(w[:, None] * m.weight.float(), full_matrices=False)
        root = (S[:r] / s).sqrt()
        B, A = U[:, :r] * root / w[:, None], root[:, None] * Vh[:r]
        m.weight -= (s * B @ A).to(m.weight.dtype)
        m.add_lora(r, alpha, A, B)


def add_adapters(model, adapter, forget, retain, cfg):
    """Freeze the base and put a rank-r LoRA (alpha = 2r) on every attention and MLP linear."""
    model.requires_grad_(False)
    if adapter == "_flora":
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
    """Forget MA and EL_n, and whether both are at or below the holdout's (EL only when MA is: it is costly)."""
    ma = split_stats(model, forget)["ma"]
    el = extraction(model, forget, cfg.el_n)[0].mean().item() if ma <= thresholds["ma"] else float("nan")
    return ma, el, ma <= thresholds["ma"] and el <= thresholds["el10"]


def unlearn(model, ref, loss_fn, forget, retain, cfg, thresholds, lr, epochs, name=""):
    """Minimize loss_fn on (forget batch, random retain batch) pairs, an epoch being one pass over the
    forget set, until forget MA and EL_10 are both at or below the holdout's, or the epoch budget ends.
    Returns (stopped_by, steps, tokens). A non-finite loss stops it with the weights of the last epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = tokens = 0
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        good = [p.detach().clone() for p in params]
        model.train()
        for fi in batches(len(forget), cfg.batch_size, gen):
            f, r = forget.take(fi), retain.take(torch.randint(len(retain), (cfg.batch_size,), generator=gen))
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
        ma, el, done = forget_check(model, forget, thresholds, cfg)
        print(f"{name}: epoch {epoch} | loss {loss.item():.4f} | forget MA {ma:.3f} EL{cfg.el_n} {el:.3f} "
              f"| {time.time() - t0:.1f}s")
        if done:
            return "threshold", steps, tokens
    return "budget", steps, tokens


# ----------------------------------------------------------------------------------------------------
# running a method, the report, main()


def run_method(method, target, data, meta, cfg, thresholds, oracle_losses):
    """One method on a fresh copy of the target model: unlearn, evaluate, return the results."""
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(target)
    base, adapter = (method.split("_", 1)[0], "_" + method.split("_", 1)[1]) if "_" in method else (method, "")
    forget, retain = data["forget"], data["retain"]
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    if adapter:
        add_adapters(model, adapter, forget, retain, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stopped_by, steps, tokens = unlearn(model, target, LOSS_FNS[base], forget, retain, cfg, thresholds,
                                        cfg.lora_lr if adapter else cfg.lr, cfg.epochs, method)
    merge_adapters(model)
    time_s = time.time() - t0
    peak = torch.cuda.max_memory_allocated() if cfg.device == "cuda" else None
    print(f"{method}: stopped by {stopped_by} after {steps} steps, {time_s:.1f}s; evaluating")
    after = evaluate(model, target, data, cfg, meta, oracle_losses)
    return dict(method=method, stopped_by=stopped_by, steps=steps, time_s=time_s, tokens_per_s=tokens / time_s,
                trainable_params=trainable, peak_mem_mb=peak / 2**20 if peak else None, after=after), model


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


def run(cfg):
    try:  # fail now, not after minutes of training, when the out dir cannot be written
        os.makedirs(cfg.out_dir, exist_ok=True)
        probe = os.path.join(cfg.out_dir, ".probe")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --out_dir {cfg.out_dir}: {e.strerror}")
    torch.manual_seed(cfg.seed)
    meta, data = load_data(cfg)
    enc = gpt2_encoding()
    meta["decode"] = lambda ids: enc.decode([meta["vocab"][i] for i in ids])
    target = load_or_train(cfg, meta, data, "target", ("forget", "retain"))
    oracle = load_or_train(cfg, meta, data, "oracle", ("retain",)) if cfg.oracle else None
    print("evaluating the target model")
    before = evaluate(target, target, data, cfg, meta)
    thresholds = {"ma": before["holdout"]["ma"], "el10": before["holdout"]["el10"]}
    print(f"thresholds (the target's holdout level): MA {thresholds['ma']:.3f}, EL{cfg.el_n} {thresholds['el10']:.3f}")
    columns = {"before": before}
    if oracle is not None:
        print("evaluating the oracle")
        columns["oracle"] = evaluate(oracle, target, data, cfg, meta)
        before["forget_quality"] = ks_pvalue(before["forget_losses"], columns["oracle"]["forget_losses"])
    oracle_losses = columns["oracle"]["forget_losses"] if oracle is not None else None
    methods = METHODS if cfg.method == "all" else (cfg.method,)
    summary = {}
    for method in methods:
        res, _ = run_method(method, target, data, meta, cfg, thresholds, oracle_losses)
        res.update(dataset=cfg.dataset, thresholds=thresholds, before=before, mia_auc=res["after"]["mia_auc"],
                   config=asdict(cfg))
        if oracle is not None:
            res["oracle"] = columns["oracle"]
        write_json(os.path.join(cfg.out_dir, method, "results.json"), res)
        summary[method] = res
        print(table({**columns, method: res["after"]}))
        print(f"wrote {os.path.join(cfg.out_dir, method, 'results.json')}")
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
