"""
Unlearning for language models, end to end: take a model that memorized some records
(the forget set), make it forget them while it keeps everything else (the retain set), and measure both.

    python unlearn.py                          # ih_flora on the embedded `people` testbed
    python unlearn.py --method ga --lr=3e-4    # any method; --key=value and --key value both work
    python unlearn.py --method all --oracle    # every method on one cached target, with the oracle

Read top to bottom: config, data, target model, losses, adapters (LoRA, FILA), the unlearning loop, then
the methods of the other papers (ICU, EUL, RUM), running a method and main(). Beside it: the metrics and the
report's tables in metrics.py, the helpers for running on N processes (torchrun) at the end of model.py,
writing results.json and the exported model in data/common.py.
Each function names its paper and equation.
"""
import argparse
import copy
import hashlib
import inspect
import json
import math
import os
import re
import sys
import time
import dataclasses
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from kernels import grad_norms, grad_sq, linear_kl, linear_loss
from model import GPT, GPTConfig, mixed_precision  # model.py: the decoder, and running on N processes (torchrun)
from model import agree, dist_setup, gathered, main_first, rank, shard, share, sync_grads, whole, world, world_sum

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
import common  # noqa: E402  (data/common.py: tokenizers and the prepared data format)
from common import Split, cat  # noqa: E402  (a split in memory: token rows and what each position holds)
from tofu.metrics import ks_pvalue  # noqa: E402  (data/tofu/metrics.py: TOFU's own metrics)
from metrics import auc, evaluate, extraction, member_scores, progress, split_stats  # noqa: E402  (metrics.py: MA, EL, MIA, fluency)
from metrics import HEADLINE, collapsed, comparison, get, report, stop_line  # noqa: E402  (and the report)
from metrics import bertscore_f1, bleu, have_bertscore  # noqa: E402  (and ICU's text-similarity tests)

ROOT = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_PROBE = "Unlearning: 0123456789 café, naïve — 😀 <code>x = y[i] + 1</code>"  # same ids, same tokenizer
torch.set_flush_denormal(True)  # on a CPU, the tiny floats unlearning leaves behind would slow math 10-100x
LOSSES = ("ga", "gd", "kl", "npo", "simnpo", "ih")
ADAPTERS = ("", "_lora", "_flora")
METHODS = tuple(l + a for l in LOSSES for a in ADAPTERS) + ("rmu", "icu", "eul", "rum")
STOPS = ("rule", "budget", "mia")


# ----------------------------------------------------------------------------------------------------
# config: one dataclass, every field a command-line option


@dataclass
class Config:
    method: str = "ih_flora"   # see METHODS, or "all"
    dataset: str = "people"    # people (the embedded testbed), tdec, tofu, or a folder of your own records (data/common.py)
    data_dir: str = os.path.join(ROOT, "data")  # where the prepared datasets are cached, one folder per tokenizer
    out_dir: str = ""          # default: out/<dataset>, or out/<dataset>-<checkpoint> with --init_from
    device: str = ""           # default: cuda when present, else cpu
    seed: int = 1337           # the same command on the same machine and thread count gives the same numbers
    oracle: bool = False       # also train (or reuse) the model on retain only: exact unlearning
    # the target model: trained from scratch, or a pretrained checkpoint fine-tuned on the data (or taken as it is)
    init_from: str = "scratch" # "scratch", or a transformers checkpoint: hub id (gpt2, EleutherAI/gpt-neo-125m, ...) or folder
    oracle_from: str = ""      # a ready oracle checkpoint (TOFU's retain models) instead of training one on retain
    forget_set: str = ""       # the dataset's forget set (tdec: lm_extraction_32_0, ...; tofu: forget01|05|10); default its own
    dtype: str = ""            # float32 or bfloat16; default bf16 on a GPU that supports it, else fp32
    checkpointing: bool = False  # activation checkpointing in full-weight training (big models: less memory, ~30% more time)
    n_layer: int = 4           # the from-scratch target: blocks, heads, width
    n_head: int = 4
    n_embd: int = 128
    train_lr: float = 1e-2     # AdamW, weight decay 0.1, 50 warmup steps, then constant
    train_batch: int = 32      # records a step while training the target (and RUM's holdout proxy)
    train_epochs: int = 100    # at most; with a holdout, training stops when its loss stops improving; 0: the checkpoint as it is
    patience: int = 3          # epochs without a better holdout loss before training stops (the best epoch is kept); 0: all epochs
    # unlearning
    batch_size: int = 8        # forget samples a step (and as many retain samples)
    epochs: int = 30           # the budget, in passes over the forget set; the stopping rule may end it earlier
    ma_threshold: float = 0.0  # the stopping rule's forget MA level; 0: the target's MA on holdout (TDEC: published)
    el_threshold: float = 0.0  # the stopping rule's forget EL_n level; 0: the target's on holdout (TDEC: published)
    stop: str = ""             # rule (Jang et al.'s MA/EL), budget (all --epochs) or mia (forget looks unseen to the LOSS attack); default rule, TOFU budget
    forget_tokens: str = "all" # all, or secret: the forgetting terms see the secret tokens only (datasets that mark them)
    lr: float = 3e-4           # full-weight methods (ga, gd, kl, npo, ih, icu, rum)
    lora_lr: float = 1e-3      # adapter methods (_lora, _flora); FILA's paper: 1e-4 to 2e-4 (RESULTS.md: too slow here)
    eul_lr: float = 1e-2       # EUL's layers (more steps than LoRA: at the identity start its KL terms have zero gradient)
    rank: int = 8              # LoRA rank r; alpha = 2r (LoRA's common choice, FILA's code)
    fila: str = "normalised"   # FILA's init: "official" (its code: ε = 1e-5, raw row weights) or "normalised" (RESULTS.md)
    npo_beta: float = 0.1      # NPO's β
    el_n: int = 10             # n of EL_n
    proxy: str = "confidence"  # rum: the memorization proxy, one of PROXIES
    rum_plan: str = "mixed"    # rum: a loss per third (npo, ih, gd), or "neggrad+" for every third as RUM's code (RESULTS.md)
    requests: int = 1          # the forget set as K sequential deletion requests, applied one after another
    seeds: int = 1             # run each method with K unlearning seeds (seed, seed+1, ...): tables show mean ± std


def parse_args(argv=None):
    helps = dict(re.findall(r"^    (\w+): .*?# (.*)$", inspect.getsource(Config), re.M))  # the comments above
    for f in fields(Config):  # the default where there is one ("" means "chosen at run time": the comment says how)
        shown = "" if f.default == "" else f" (default: {f.default})"
        helps[f.name] = (helps.get(f.name, "") + shown).replace("%", "%%")  # argparse formats help with %
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.error = lambda msg: (print(f"error: {msg} (python unlearn.py -h lists the options)", file=sys.stderr), sys.exit(2))
    for f in fields(Config):
        if f.type is bool:  # "--oracle" alone means true
            p.add_argument(f"--{f.name}", type=boolean, nargs="?", const=True, default=f.default, help=helps.get(f.name))
        elif f.name == "method":
            p.add_argument("--method", default=f.default, choices=METHODS + ("all",),
                           metavar="METHOD", help=f"one of: {', '.join(METHODS + ('all',))} (default: {f.default})")
        elif f.name == "proxy":
            p.add_argument("--proxy", default=f.default, choices=tuple(PROXIES), help=helps.get(f.name))
        elif f.name == "fila":
            p.add_argument("--fila", default=f.default, choices=("official", "normalised"), help=helps.get(f.name))
        elif f.name == "stop":
            p.add_argument("--stop", default=f.default, choices=STOPS, help=helps.get(f.name))
        elif f.name == "forget_tokens":
            p.add_argument("--forget_tokens", default=f.default, choices=("all", "secret"), help=helps.get(f.name))
        else:
            p.add_argument(f"--{f.name}", type=f.type, default=f.default, help=helps.get(f.name))
    cfg = Config(**vars(p.parse_args(argv)))
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tag = "" if cfg.init_from == "scratch" else "-" + common.Tokenizer(cfg.init_from, *[None] * 6).tag
    name = os.path.basename(os.path.abspath(cfg.dataset))  # a folder of your own records: out/<its name>
    cfg.out_dir = cfg.out_dir or os.path.join("out", name + tag)
    return cfg


def boolean(text):
    """true/false, 1/0, yes/no; anything else ("on", "y", "maybe") is refused, not read as false."""
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true, false, 1, 0, yes or no, got {text!r}")
    return text.lower() in ("true", "1", "yes")


class UserError(Exception):
    """A mistake in the input: main() prints it on one line and exits with status 1."""


# ----------------------------------------------------------------------------------------------------
# data: the prepared splits, each a common.Split: token rows [n, seq_len] (bos, record, eot, padding) and
# what each position holds (not scored, text, fact, secret)


def load_tokenizer(name):
    try:
        return common.load(name)
    except ValueError as e:
        raise UserError(str(e))


def load_data(cfg, tok):
    """The dataset's splits in the prepared format, tokenized with `tok`; prepared (common.prepared runs
    data/<dataset>/prepare.py) into data_dir/<dataset>/<tokenizer>[-<forget_set>]/ the first time. A
    from-scratch model gets a dense vocabulary of the tokens the data uses (meta["vocab"]: its ids in the
    tokenizer), a pretrained one the tokenizer's own."""
    try:
        folder, meta, arrays = common.prepared(cfg.data_dir, cfg.dataset, tok, cfg.forget_set)
    except ValueError as e:
        raise UserError(str(e))
    meta["max_id"] = max(int(a["ids"].max()) for a in arrays.values() if a["ids"].size)
    if cfg.init_from == "scratch":  # a dense vocabulary: a tiny model needs no embedding for unused tokens
        meta["vocab"] = np.unique(np.concatenate([a["ids"].ravel() for a in arrays.values()])).tolist()
        dense = np.zeros(max(meta["vocab"]) + 1, dtype=np.int64)
        dense[meta["vocab"]] = np.arange(len(meta["vocab"]))
        to_model = lambda ids: dense[ids]
        meta["decode"] = lambda ids: tok.decode([meta["vocab"][i] for i in ids])
    else:
        meta["vocab"], to_model, meta["decode"] = None, lambda ids: ids, tok.decode
    meta["eot_model"] = int(to_model(np.array([meta["eot"]]))[0])
    # rows start with a bos, or with the record itself where the dataset says so (TDEC, as Jang's and ICU's inputs)
    splits = {name: Split(to_model(a["ids"]), a["kind"], cfg.device, meta.get("row_start", 1)) for name, a in arrays.items()}
    for split in splits.values():
        split.decode, split.eot = meta["decode"], meta["eot_model"]
    meta["lengths"] = {name: split.lengths.tolist() for name, split in splits.items()}  # bos, record, eot
    if len(splits["forget"]) == 0:
        raise UserError(f"the forget set of {folder} is empty: there is nothing to unlearn")
    longest = int(splits["forget"].lengths.max()) - 1  # tokens after bos
    if cfg.el_n >= longest:
        raise UserError(f"--el_n {cfg.el_n} is not shorter than the forget records (the longest has {longest} "
                        f"tokens): there is no {cfg.el_n}-gram to extract")
    return meta, splits


def batches(n, batch_size, gen):
    """Shuffled index batches covering range(n) once."""
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


# ----------------------------------------------------------------------------------------------------
# the target model (trained on forget ∪ retain) and the oracle (retain only), cached on disk


def token_loss(model, x, y, kind="ce"):
    """Per-token loss [B, T] ("ce": -log p(y_t), "ih": inverted hinge) straight from hidden states:
    the kernel computes it chunk by chunk over tokens, so B*T*V logits never exist at once."""
    h = model(x)
    return linear_loss(h.flatten(0, 1), model.lm_head.weight, y.flatten(), kind).view_as(y)


def mean_loss(model, batch, kind="ce"):
    """The mean per-token loss over a batch's scored tokens. The weights 1/#tokens are known in the forward,
    so the kernel forms the gradients there (3 matmuls a chunk instead of 4, see kernels/loss.py).
    #tokens: the whole step's batch's (whole(): under torchrun each rank holds a share of it)."""
    y = batch.y.flatten()
    scale = torch.full(y.shape, 1.0 / whole(batch)[0], device=y.device)
    return linear_loss(model(batch.x).flatten(0, 1), model.lm_head.weight, y, kind, scale=scale)


def nll(model, batch):
    """Mean next-token negative log-likelihood over a batch's tokens."""
    return mean_loss(model, batch)


def train(model, data, holdout, cfg, name, watch=None):
    """AdamW (weight decay 0.1, 50 warmup steps) on all weights. With a holdout: epoch after epoch until the
    holdout loss has not improved for cfg.patience epochs, keeping the best weights, so the model learns what
    the records have in common, and memorizes only what it sees again and again (the forget canaries).
    Without one (TOFU, a fine-tuning protocol), cfg.train_epochs epochs.
    watch: a split whose learning events (RUM's proxies) are recorded after every epoch and averaged."""
    params = mixed_precision(model)
    opt = torch.optim.AdamW(params, lr=cfg.train_lr, weight_decay=0.1, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed)
    early = holdout is not None and cfg.patience > 0
    t0, step, best, since_best, events = time.time(), 0, (float("inf"), None, 0), 0, []
    for epoch in range(1, cfg.train_epochs + 1):
        model.train()
        for idx in progress(batches(len(data), cfg.train_batch, gen), desc=f"{name} epoch {epoch}", unit="step"):
            for g in opt.param_groups:
                g["lr"] = cfg.train_lr * min(1.0, (step + 1) / 50)
            loss = nll(model, data.take(idx))
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            if not (torch.isfinite(loss) and torch.isfinite(norm)):  # stop here: nothing diverged is cached
                raise UserError(f"{name}: the training loss became {loss.item()} (gradient norm {norm.item()}) at epoch "
                                f"{epoch}, step {step + 1}; nothing was cached (try a lower --train_lr)")
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        model.eval()
        if watch is not None:
            events.append(learning_events(model, watch))
        line = f"{name}: epoch {epoch} | train loss {loss.item():.3f}"
        if early:
            held = split_stats(model, holdout)["loss"]
            if not math.isfinite(held):
                raise UserError(f"{name}: the holdout loss became {held} after epoch {epoch}; nothing was cached "
                                f"(try a lower --train_lr)")
            line += f" | holdout loss {held:.3f}"
            if held < best[0]:
                best, since_best = (held, copy.deepcopy(model.state_dict()), epoch), 0
            else:
                since_best += 1
        print(f"{line} | {time.time() - t0:.0f}s")
        if early and since_best >= cfg.patience:
            break
    if early:
        print(f"{name}: keeping epoch {best[2]} (holdout loss {best[0]:.3f})")
        model.load_state_dict(best[1])
        events = events[:best[2]]
    return {k: torch.stack([e[k] for e in events]).mean(0) for k in events[0]} if events else {}


def fingerprint(cfg, meta, splits):
    """What a cached model depends on, in three parts, so that a mismatch can say which changed and retrain:
    its training data, its training settings, and the weights it starts from (common.checkpoint_key)."""
    h = hashlib.sha256()
    for s in splits:
        h.update(s.rows.cpu().numpy().tobytes() + s.kind.cpu().numpy().tobytes())
    keys = ("init_from", "dtype", "n_layer", "n_head", "n_embd", "train_lr", "train_batch", "train_epochs", "patience", "seed")
    settings = hashlib.sha256(json.dumps([getattr(cfg, k) for k in keys] + [meta.get("forget_repeats", 1)]).encode())
    weights = "scratch"
    if cfg.init_from != "scratch":
        from model import resolve
        try:
            weights = common.checkpoint_key(resolve(cfg.init_from))
        except ValueError as e:
            raise UserError(str(e))
    return dict(data=h.hexdigest()[:16], settings=settings.hexdigest()[:16], weights=weights)


def model_dtype(cfg):
    """The run's dtype: the models' stored weights (the target, θ0, every frozen base) and the compute dtype."""
    if cfg.dtype:
        return getattr(torch, cfg.dtype)
    # bf16 halves the weights' memory where the GPU computes in it natively; fp32 on the CPU (and for the tests)
    return torch.bfloat16 if cfg.device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32


# Mixed precision (Micikevicius et al. 2018), in two places: autocast(cfg) chooses the compute dtype of the whole
# run (main() enters it once), mixed_precision(model) (model.py) makes the parameters about to be trained fp32.


def autocast(cfg):
    """Under --dtype bfloat16, every op of the run computes in bf16 (matmuls) or fp32 (what autocast keeps
    there), whatever the dtype of the weights; a no-op in fp32. No weight cache: the one context spans
    optimizer steps, and a cached bf16 copy of a weight would not see them."""
    device = cfg.device.split(":")[0]
    return torch.autocast(device, dtype=torch.bfloat16, enabled=model_dtype(cfg) == torch.bfloat16, cache_enabled=False)


def check_checkpoint(name):
    """A checkpoint's config.json read and checked (model_type, activation, rope...) without its weights."""
    from model import config_from_hf, read_json, resolve
    try:
        config_from_hf(read_json(resolve(name), "config.json"))
    except ValueError as e:
        raise UserError(str(e))


def pretrained(cfg, name, meta):
    """A transformers checkpoint (hub id or folder) as our GPT, in the run's dtype."""
    print(f"loading {name}")
    try:
        model = GPT.from_pretrained(name, dtype=model_dtype(cfg)).to(cfg.device)
    except ValueError as e:
        raise UserError(str(e))
    if meta["max_id"] >= model.config.vocab_size:
        raise UserError(f"the data holds token id {meta['max_id']}, beyond the {model.config.vocab_size} of {name}'s "
                        f"vocabulary: its tokenizer ({meta['vocab_size']} tokens) is not this model's")
    check_context(meta, name, model.config.block_size)
    return model


def check_context(meta, name, limit):
    """Records are never truncated (a truncated secret would be measured as forgotten): a model whose context
    is shorter than a record is a mistake in the input, told with how many records and the first one (with your
    own records: its file and line)."""
    if limit >= meta["seq_len"]:
        return
    over = [(s, i, n) for s in ("forget", "retain", "holdout") for i, n in enumerate(meta["lengths"].get(s, ())) if n > limit]
    if not over:
        raise UserError(f"{name} has a context of {limit} tokens, shorter than the {meta['seq_len']} of the data's rows")
    s, i, n = over[0]
    where = os.path.join(meta["dataset"], meta["files"][s]) + f" line {meta['lines'][s][i]}" if "lines" in meta else f"{s} row {i}"
    raise UserError(f"{name} has a context of {limit} tokens, shorter than {len(over)} record(s) (the first: {where}, "
                    f"{n} tokens with bos and eot); records are never truncated: shorten or split them")


def load_or_train(cfg, meta, data, name, splits):
    """The model trained on `splits` (the target: forget ∪ retain, each forget record meta["forget_repeats"]
    times; the oracle: retain alone), from <out_dir>/<name>.pt when it was made from the same data and
    settings, else trained and saved. From a pretrained checkpoint with --train_epochs 0 the target is the
    checkpoint itself (TDEC: GPT-Neo memorized the Pile samples in pretraining)."""
    train_on = [data[s] for s in splits for _ in range(meta.get("forget_repeats", 1) if s == "forget" else 1)]
    if cfg.init_from != "scratch" and cfg.train_epochs == 0:
        return pretrained(cfg, cfg.init_from, meta).eval(), {}
    path, fp = os.path.join(cfg.out_dir, f"{name}.pt"), fingerprint(cfg, meta, train_on)
    if os.path.exists(path):
        try:
            ckpt = torch.load(path, map_location=cfg.device, weights_only=True)
            model = GPT(GPTConfig(**ckpt["model_args"])).to(cfg.device, model_dtype(cfg))
            model.load_state_dict(ckpt["model"])
            model.hf_config = json.loads(ckpt.get("hf_config", "null"))
            model.hf_generation_config = json.loads(ckpt.get("hf_generation_config", "null"))
        except Exception as e:  # corrupted, or from another version of this code
            raise UserError(f"cannot read {path} ({type(e).__name__}); delete it to train again")
        if ckpt.get("fingerprint") == fp:
            print(f"{name}: reusing {path}")
            return model.eval(), ckpt.get("events", {})
        old = ckpt.get("fingerprint") if isinstance(ckpt.get("fingerprint"), dict) else {}
        what = dict(data="data", settings="training settings", weights=f"weights (the files of {cfg.init_from} changed)")
        changed = [what[k] for k in fp if old.get(k) != fp[k]] if old else ["code (an older version of unlearn.py)"]
        print(f"{name}: {path} was made from other {' and '.join(changed)}; training again")
    print(f"{name}: training on {' + '.join(splits)}")
    torch.manual_seed(cfg.seed)
    if cfg.init_from == "scratch":
        model = GPT(GPTConfig(block_size=meta["seq_len"], vocab_size=len(meta["vocab"]),
                              n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)).to(cfg.device)
    else:
        model = pretrained(cfg, cfg.init_from, meta)
    model.checkpointing = cfg.checkpointing
    events = train(model, cat(*train_on), data.get("holdout"), cfg, name, watch=data["forget"] if name == "target" else None)
    model.checkpointing = False
    model.to(model_dtype(cfg))  # trained with fp32 master weights, kept (and frozen from now on) in the run's dtype
    tmp = common.tmp_name(path)  # written whole, then renamed: never a half-written checkpoint
    torch.save({"model_args": asdict(model.config), "model": model.state_dict(), "fingerprint": fp,
                "events": events, "hf_config": json.dumps(model.hf_config),
                "hf_generation_config": json.dumps(model.hf_generation_config)}, tmp)
    os.replace(tmp, path)
    return model, events


# ----------------------------------------------------------------------------------------------------
# losses: f a forget batch, r a retain batch, ref the frozen target model θ0; lower is better


def loss_ga(model, ref, f, r, cfg):
    """Gradient ascent (Jang et al. 2022): L = -NLL_θ(f)."""
    return -nll(model, f)


loss_ga.uses = ("forget",)  # no retain batch (unlearn() reads `uses`)


def loss_gd(model, ref, f, r, cfg):
    """Gradient difference: L = -NLL_θ(f) + NLL_θ(r)."""
    return -nll(model, f) + nll(model, r)


def kl_to_ref(model, ref, batch):
    """KL(p_θ0 ‖ p_θ) over the vocabulary, mean over the batch's tokens, by kernels.linear_kl: no N × V logits.
    A frozen lm_head (LoRA, EUL) equals θ0's: then one matmul serves both models."""
    mask = batch.y != -100
    with torch.no_grad():
        ref_h = ref(batch.x)[mask]
    h = model(batch.x)[mask]  # first: an FSDP model's lm_head weight is whole only after its forward
    W, ref_W = model.lm_head.weight, ref.lm_head.weight
    return linear_kl(h, W, ref_h, None if torch.equal(W, ref_W) else ref_W).sum() / whole(batch)[0]


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
    return 2 / beta * F.softplus(beta * (seq_logprob(model, f) - ref_logp)).sum() / whole(f)[1] + nll(model, r)


def loss_simnpo(model, ref, f, r, cfg, beta=4.5, gamma=0.125, delta=0.0):
    """SimNPO (Fan et al. 2024, "Simplicity prevails"): NPO without θ0, on the length-normalised loss:
        L = γ·(2/β)·mean_f -log σ(β·(NLL_θ(x)/|x| - δ)) + NLL_θ(r),
    NLL_θ(x)/|x| the sample's mean token loss. The forget push, -2γ·(1 - σ(β(m - δ))) per unit of a sample's
    mean loss m, fades as m grows past δ: bounded, like NPO, with no reference model to run. As open-unlearning
    computes it (locuslab/open-unlearning, src/trainer/unlearn/simnpo.py lines 18-20 and 30) with its defaults
    (configs/trainer/SimNPO.yaml lines 6-10: δ 0, β 4.5, γ 0.125, α 1.0 on an NLL retain term). The paper
    writes the margin outside β (σ(β·m - γ)); with δ = 0 the two agree."""
    per_token = token_loss(model, f.x, f.y)  # 0 where not scored
    mean = per_token.sum(1) / (f.y != -100).sum(1).clamp_min(1)
    return gamma * 2 / beta * -F.logsigmoid(beta * (mean - delta)).sum() / whole(f)[1] + nll(model, r)


def loss_ih(model, ref, f, r, cfg):
    """Inverted hinge (Cha et al., ICLR 2025): IH_t = 1 + p_θ(y_t) - max_{v≠y_t} p_θ(v), in [0, 2];
    L = mean_t IH_t(f) + NLL_θ(r). It lowers the true token by raising the runner-up, so the text stays
    fluent where GA's unbounded push makes gibberish. (kernels/loss.py has its gradient in closed form.)"""
    return mean_loss(model, f, "ih") + nll(model, r)


LOSS_FNS = dict(ga=loss_ga, gd=loss_gd, kl=loss_kl, npo=loss_npo, simnpo=loss_simnpo, ih=loss_ih)


# ----------------------------------------------------------------------------------------------------
# adapters: LoRA, and FILA, LoRA initialised from the Fisher information (Cha et al., ICLR 2025)


def fisher(model, split, layers, batch_size=32, diag=True, on=None):
    """Empirical Fisher diagonal F = (1/N) Σ_n (∇_W ℓ_n)² of each layer's weight (ℓ_n: sample n's mean NLL)
    and the per-sample squared gradient norms Σ_layers ‖∇_W ℓ_n‖²_F, from exact per-sample gradients.

    One forward/backward of Σ_n ℓ_n per batch: hooks catch each layer's input x [N, T, in] and output
    gradient g [N, T, out], and ∇_W ℓ_n = g_nᵀ x_n, so kernels.grad_sq forms Σ_n (g_nᵀ x_n)² tile by tile
    without ever holding N per-sample gradients. (FILA's own code squares mini-batch gradients instead.)
    Each layer's contribution is taken in the backward, as soon as its output gradient exists, and its input
    and gradient are let go then: one layer's gradient lives at a time, not every layer's until the end.
    The diagonals are accumulated in fp32 on the device `on` (default: the model's; "cpu" keeps them in host
    memory, each batch's contribution copied over layer by layer: what lets FILA initialise an 8B model on one
    GPU, see fila_init). diag=False: the norms alone (None for the Fisher), by kernels.grad_norms' Gram form
    where it is cheaper."""
    inputs, span = {}, None

    def take(m, g):
        x = inputs.pop(m)
        if diag:
            f, sq = grad_sq(x, g)
            fish[m] += f.to(fish[m].device)
        else:
            sq = grad_norms(x, g)
        sq_norms[span] += sq

    def hook(m, inp, out):
        inputs[m] = inp[0].detach()
        out.register_hook(lambda g: take(m, g.detach()))

    handles = [m.register_forward_hook(hook) for m in layers]
    # the hooks need the activations' gradients, not the weights': the backward runs from the embeddings'
    # output with every weight frozen, so no layer forms its (discarded) mini-batch weight gradient
    handles.append(model.transformer.wte.register_forward_hook(lambda m, inp, out: out.detach().requires_grad_()))
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    fish = {m: torch.zeros_like(m.weight, dtype=torch.float32, device=on) for m in layers} if diag else None
    sq_norms = torch.zeros(len(split), device=split.rows.device)
    try:
        with torch.enable_grad():
            for i in progress(range(0, len(split), batch_size), desc="Fisher" if diag else "gradient norms", unit="batch"):
                b = split.take(range(i, min(i + batch_size, len(split))))
                span = slice(i, i + len(b))
                # Σ_n ℓ_n with per-token weights 1/#tokens(n), known now: the loss op forms its grads in the forward
                scale = (1 / (b.y != -100).sum(1, keepdim=True)).expand_as(b.y)
                loss = linear_loss(model(b.x).flatten(0, 1), model.lm_head.weight, b.y.flatten(), scale=scale.flatten())
                loss.backward()  # the hooks take each layer's contribution on the way
                if not (torch.isfinite(loss) and torch.isfinite(sq_norms[span]).all()):
                    raise UserError(f"fisher: the loss ({loss.item()}) or the squared gradients are not finite at batch "
                                    f"{i // batch_size + 1} of {len(split)} samples: the model has diverged")
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return (None if fish is None else {m: f.div_(len(split)) for m, f in fish.items()}), sq_norms


EXACT_SVD = 1024  # FILA's SVD is exact up to this smaller side (GPT-2 small: 768), randomized above (bench.py --parts v)


@torch.no_grad()
def fila_init(model, forget, retain, cfg):
    """FILA (Cha et al., ICLR 2025, Sec. 3.2, Eq. 5-6): LoRA that starts in the directions that matter for the
    forget set, the function unchanged.
        I = F_f / (F_r + ε),  w_i = sqrt(Σ_j I_ij),  U S Vᵀ = rank-r SVD of diag(w)·W,  s = α/r,
        B = diag(1/w)·U·sqrt(S/s),  A = sqrt(S/s)·Vᵀ,  and the frozen base becomes W - s·B·A
    (here kept factored: W stays the target's and the adapter adds s·(B·A − B0·A0), model.LoRALinear, so
    that the start and adapters_off() are the target exactly, in bf16 too; their code subtracts in W).
    cfg.fila = "official" is their code (csm9493/efficient-llm-unlearning, TOFU/forget.py lines 253-287):
    ε = 1e-5 absolute, raw w, B's rows divided by w + 1e-5. "normalised": ε = 1e-6·mean(F_r) and w scaled
    to mean 1, floored at 1e-3, so the A/B balance (and the effective step of Adam on B·A) does not depend
    on the scale of F (RESULTS.md: measured on this testbed).
    Departures from their code, kept on purpose: F from exact per-sample squared gradients, averaged over
    samples (theirs: squared mini-batch gradients weighted by token counts, averaged over tokens,
    measure_importance.py lines 224-257; the per-sample Fisher is the one the paper defines, and the kernel
    makes it cheap), F_r over the whole retain set (theirs: one random retain sample per forget sample),
    an exact SVD where it is cheap, a layer's smaller side up to EXACT_SVD (theirs: torch.svd_lowrank with
    q = r everywhere, randomized; used here above that size, as theirs), and GPT-2's fused q|k|v linear gets
    one rank-r adapter (theirs, on Llama/Phi: q, k, v separately).
    Memory: the two fp32 diagonals (8 bytes an adapted weight) stay on the GPU while they fit in a quarter of
    its free memory, else in host memory (each batch's contribution copied over; 64 GB for an 8B model), and
    each layer's pair moves to the device only for its own initialisation."""
    layers = model.lora_layers()
    dev = on = layers[0].weight.device
    if dev.type == "cuda" and 8 * sum(m.weight.numel() for m in layers) > torch.cuda.mem_get_info(dev)[0] // 4:
        on = torch.device("cpu")
    F_f, _ = fisher(model, forget, layers, on=on)
    F_r, _ = fisher(model, retain, layers, on=on)
    r, alpha = cfg.rank, 2 * cfg.rank
    s = alpha / r
    for m in layers:
        f_f, f_r = F_f.pop(m).to(dev), F_r.pop(m).to(dev)
        if cfg.fila == "official":
            w = (f_f / (1e-5 + f_r)).sum(1).sqrt()
            inv_w = 1 / (w + 1e-5)
        else:
            w = (f_f / (f_r + 1e-6 * f_r.mean())).sum(1).sqrt()
            w = (w / w.mean()).clamp_min(1e-3)
            inv_w = 1 / w
        W = w[:, None] * m.weight.float()
        if min(W.shape) <= EXACT_SVD:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        else:  # FILA's code: randomized, q = r, 2 power iterations (bench.py --parts v: against the exact one)
            U, S, V = torch.svd_lowrank(W, q=r)
            Vh = V.T
        root = (S[:r] / s).sqrt()
        B, A = U[:, :r] * root * inv_w[:, None], root[:, None] * Vh[:r]
        m.add_lora(r, alpha, A, B)  # the start B0·A0 = B·A is subtracted in the layer, W left as it is


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
# the unlearning loop, and when it stops (--stop)


def forget_check(model, forget, stop, cfg):
    """Has unlearning gone far enough? (done, a line for the log), by the rule of --stop (stop["rule"]):
      rule    Jang et al.: forget MA and EL_n both below the level of unseen data, with their strict
              comparison (joeljang/knowledge-unlearning, models/Neo_Model.py line 647:
              `ma < ma_threshold and el < el_threshold`); EL only when MA passes: generation is the costly part
      mia     the forget records look unseen: the LOSS attack's AUC, forget against holdout (one forward pass
              of each), at most stop["auc"] (the oracle's AUC + 0.05, or 0.55 without an oracle); with
              --forget_tokens secret on the secret tokens alone, what the run was asked to make unseen
      budget  never: every epoch of --epochs runs (TOFU's protocol)"""
    stats = split_stats(model, forget)
    line = f"forget MA {stats['ma']:.3f}"
    if stop["rule"] == "budget":
        return False, line
    if stop["rule"] == "mia":
        kind, held = common.SECRET if stop.get("tokens") == "secret" else None, stop["holdout"]
        auc_ = auc(member_scores(stats, forget, kind), member_scores(split_stats(model, held), held, kind))
        return agree(auc_ <= stop["auc"]), f"{line} | MIA AUC{' secret' if kind else ''} {auc_:.3f}"
    # the EL its threshold belongs to: Jang's (prefixes from 1), or ICU's own on TDEC (from 150, el_first)
    el = extraction(model, forget, cfg.el_n, stop.get("el_first", 1))[0].mean().item() \
        if stats["ma"] < stop["ma"] else float("nan")
    el_text = "-" if math.isnan(el) else f"{el:.4f}"  # EL is generated only once MA passes
    return agree(stats["ma"] < stop["ma"] and el < stop["el10"]), f"{line} EL{cfg.el_n} {el_text}"


def stopped_by_rule(stop):
    """results.json's stopped_by when the rule holds: "threshold" (Jang et al.'s MA/EL) or "mia"."""
    return "threshold" if stop["rule"] == "rule" else stop["rule"]


def stopping_rule(cfg, thresholds, data, oracle):
    """What --stop ends unlearning on (results.json records it): the rule's name and its level. thresholds: the
    MA/EL level of unseen data (thresholds_for); oracle: the oracle's metrics, or None."""
    if cfg.stop == "budget":
        return dict(rule="budget", epochs=cfg.epochs)
    if cfg.stop == "rule":
        return dict(rule="rule", **thresholds)
    # --forget_tokens secret: the attack on the secret tokens alone (RESULTS.md: on all tokens the run stops
    # with the secrets overshot, less likely than unseen ones: AUC 0.31-0.38 against the oracle's 0.46)
    tokens, on = cfg.forget_tokens, " on secret tokens" if cfg.forget_tokens == "secret" else ""
    if oracle is not None:  # the level membership inference reaches on a model that never saw the forget set
        key = "loss_secret" if tokens == "secret" else "loss"
        return dict(rule="mia", auc=oracle["mia_auc"][key] + 0.05, source=f"the oracle's LOSS AUC{on} + 0.05",
                    tokens=tokens, holdout=data["holdout"])
    return dict(rule="mia", auc=0.55, source=f"no oracle: 0.55{on}", tokens=tokens, holdout=data["holdout"])


def unlearn(model, ref, loss_fns, forget, retain, cfg, stop, lr, epochs, name="", pairs=None, refine=None,
            betas=None, clip=1.0):
    """Minimize the loss on (forget batch, retain batch) pairs, an epoch being one pass over the forget set,
    until the stopping rule holds after an epoch (forget_check), or the epoch budget ends.
    --forget_tokens secret: the forget batches score their secret tokens alone (Split.only), so every
    forgetting term leaves the template and facts the records share with retain alone.

    --batch_size at least the forget set's size is Jang et al.'s setting: one full-batch update an epoch, then
    the check (their README line 51: the effective batch must equal the forget set), with their Adam betas
    (0.9, 0.98) (models/Neo_Model.py, configure_optimizers); smaller batches take several steps an epoch.
    betas: the method's own (ICU's code: (0.9, 0.98) always); clip: the gradient-norm clip, None for none
    (Jang's and ICU's code clip nothing; the project's other methods clip at 1.0).
    loss_fns: the loss of each epoch, cycled (EUL alternates a retain and a forget epoch; most have one). A loss
    says which rows it reads (`uses`, default both: no batch is made of rows it ignores) and what its epoch is
    a pass over (`epoch`: "forget" by default; "retain" for RUM's NegGrad+, whose forget batches then cycle:
    RUM's neggrad.py `zip(r_loader, cycle(f_loader))`).
    pairs: the retain row paired with each forget row (ICU's analogues); default as many random retain rows.
    refine: a per-sample test, model -> bool [len(forget)] (True: forgotten), run before the first epoch and
    after each (ICU): as ICU's code, every epoch still batches all samples and masks the forgotten ones (and
    their analogues) out of the loss, skipping a batch left empty; every sample is re-checked, so one that
    comes back re-enters. Returns a dict: stopped_by ("threshold", "mia", "budget", or "forgotten": no
    sample left to unlearn), steps, tokens (of the rows the losses read), trainable_params, and forgotten_at (ICU: the
    first epoch each sample was forgotten, 0 = before any). A non-finite loss stops everything with the
    weights of the last epoch."""
    if isinstance(model, FSDPModule):  # torchrun: an evaluation forward leaves the root's whole weights in place
        model.reshard()                 # of its shards, and the optimizer must hold the shards
    params = mixed_precision(model)
    full_batch = cfg.batch_size >= len(forget)
    betas = betas or ((0.9, 0.98) if full_batch else (0.9, 0.999))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=betas)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = tokens = 0
    keep, forgotten_at = torch.ones(len(forget), dtype=torch.bool), [None] * len(forget)
    t0 = time.time()
    if refine is not None:  # ICU's code checks every sample before the first epoch too (val(0, ...))
        gone = agree(refine(model).cpu())
        forgotten_at = [0 if g else None for g in gone.tolist()]
        keep = ~gone
        print(f"{name}: before unlearning | forgotten {int(gone.sum())} of {len(forget)}")
        if not keep.any():
            return dict(stopped_by="forgotten", steps=0, tokens=0, trainable_params=sum(p.numel() for p in params),
                        forgotten_at=forgotten_at)
    for epoch in range(1, epochs + 1):
        good = [p.detach().clone() for p in params]
        loss_fn = loss_fns[(epoch - 1) % len(loss_fns)]
        uses = getattr(loss_fn, "uses", ("forget", "retain"))
        if getattr(loss_fn, "epoch", "forget") == "retain":  # a pass over retain, the forget batches cycled
            fbs = batches(len(forget), cfg.batch_size, gen)
            plan = [(fbs[i % len(fbs)], ri) for i, ri in enumerate(batches(len(retain), cfg.batch_size, gen))]
        else:
            plan = [(fi, None) for fi in batches(len(forget), cfg.batch_size, gen)]
        model.train()
        for fi, ri in progress(plan, desc=f"{name} epoch {epoch}", unit="step"):
            fi = fi[keep[fi]]  # ICU: the forgotten samples are masked out of their batch
            if len(fi) == 0:
                continue
            if ri is None:
                ri = pairs[fi] if pairs is not None else torch.randint(len(retain), (len(fi),), generator=gen)
            # --forget_tokens secret: the forget rows score their secrets alone; torchrun: this rank's rows (share)
            f = forget.take(fi).only(common.SECRET) if cfg.forget_tokens == "secret" else forget.take(fi)
            f = share(f) if "forget" in uses else None
            r = share(retain.take(ri)) if "retain" in uses else None
            loss = loss_fn(model, ref, f, r, cfg) * (f if f is not None else r).weight
            loss.backward()
            sync_grads(model, params)
            loss = world_sum(loss)  # the whole batch's loss
            norm = torch.nn.utils.clip_grad_norm_(params, clip or float("inf"))  # inf: the norm, nothing clipped
            if not (torch.isfinite(loss) and torch.isfinite(norm)):
                with torch.no_grad():
                    for p, g in zip(params, good):
                        p.copy_(g)
                raise UserError(f"{name}: the loss became {loss.item()} at step {steps + 1}; stopped, the weights "
                                f"are those after epoch {epoch - 1} (try a lower learning rate)")
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
            tokens += sum(b.whole[0] for b in (f, r) if b is not None)
        model.eval()
        if refine is not None:
            gone = agree(refine(model).cpu())
            for i in gone.nonzero().flatten().tolist():
                forgotten_at[i] = epoch if forgotten_at[i] is None else forgotten_at[i]
            keep = ~gone
        done, line = forget_check(model, forget, stop, cfg)
        print(f"{name}: epoch {epoch} | loss {loss.item():.4f} | {line} "
              + (f"| active {int(keep.sum())} " if refine is not None else "") + f"| {time.time() - t0:.1f}s")
        if done or not keep.any():
            break
    # "forgotten": ICU's own rule, every sample passes the per-sample test (their code: unlearn_cnt < 1)
    stopped_by = stopped_by_rule(stop) if done else "forgotten" if not keep.any() else "budget"
    return dict(stopped_by=stopped_by, steps=steps, tokens=tokens,
                trainable_params=sum(p.numel() for p in params), forgotten_at=forgotten_at if refine is not None else None)


# ----------------------------------------------------------------------------------------------------
# RMU: representation misdirection for unlearning (Li et al. 2024, the WMDP paper)


def activation_loss(h, target, mask, rows):
    """RMU's distance: the squared difference averaged over the width, summed over each sample's scored
    positions and divided by their number, then averaged over the step's `rows` samples (open-unlearning,
    rmu.py lines 108-117)."""
    per_position = (h.float() - target.float()).pow(2).mean(-1) * mask
    return (per_position.sum(1) / mask.sum(1).clamp_min(1)).sum() / rows


def loss_rmu(model, ref, f, r, cfg, layer, control, alpha=1.0, gamma=1.0):
    """RMU (Li et al. 2024): at one layer's output h_l, steer the forget tokens' activations to a fixed random
    vector c and hold the retain tokens' to the frozen model's:
        L = γ·d(h_l(f), c) + α·d(h_l(r), h_l^θ0(r)),  d = activation_loss,  γ = α = 1
    (open-unlearning configs/trainer/RMU.yaml lines 7-10, its retain term EMBED_DIFF; rmu.py lines 139-171).
    The positions are those that predict a scored token (theirs: the scored tokens' own positions, one later:
    here the hidden state that carries a token into the next is the one made to forget it)."""
    h_f = model(f.x, blocks=layer + 1)
    h_r = model(r.x, blocks=layer + 1)
    with torch.no_grad():
        ref_r = ref(r.x, blocks=layer + 1)
    return gamma * activation_loss(h_f, control.to(h_f.dtype), f.y != -100, whole(f)[1]) + \
        alpha * activation_loss(h_r, ref_r, r.y != -100, whole(r)[1])


RMU_NOT_DISTRIBUTED = ("rmu cannot run under torchrun: it runs only the blocks up to its steered layer, and the "
                       "sharded blocks above it would wait for a backward that never comes; run it on one process")


def unlearn_rmu(model, target, forget, retain, cfg, stop, steering=2.0):
    """RMU on a few MLPs below one layer. Its choices, as open-unlearning's WMDP experiment sets them
    (configs/experiment/unlearn/wmdp/default.yaml lines 49-56, after the WMDP repository's rmu/unlearn.py):
    the output of layer 7 of zephyr-7b's 32 (0-based: a quarter of the way up) is steered, and only the MLP
    down-projections of layers 5, 6, 7 train; steering coefficient 2 (also RMU.yaml line 8); the control
    vector c = coefficient · u/‖u‖, u uniform in [0, 1)^d, drawn once (rmu.py lines 100-106). Adapted to any
    depth: the block ceil(L/4) - 1 (32 layers: 7 as theirs; GPT-2 small's 12: 2; the 4-layer testbed: 0) and
    the down-projections (c_proj) of it and of up to two blocks below it, weights only, as theirs. (RMU.yaml
    itself trains every weight on TOFU; the WMDP choice is the method's own.) No _lora / _flora variant:
    RMU already trains a few chosen matrices whole, and a low-rank adapter on them adds nothing to read."""
    if world() > 1:  # `all` under torchrun: reported as failed, the other methods go on
        raise UserError(RMU_NOT_DISTRIBUTED)
    layer = math.ceil(model.config.n_layer / 4) - 1
    model.requires_grad_(False)
    for block in model.transformer.h[max(0, layer - 2):layer + 1]:
        block.mlp.c_proj.weight.requires_grad_(True)
    u = torch.rand(model.config.n_embd, generator=torch.Generator().manual_seed(cfg.seed)).to(cfg.device)
    control = steering * u / u.norm()
    loss = lambda model, ref, f, r, cfg: loss_rmu(model, ref, f, r, cfg, layer, control)
    return unlearn(model, target, [loss], forget, retain, cfg, stop, cfg.lr, cfg.epochs, "rmu")


# ----------------------------------------------------------------------------------------------------
# ICU: iterative contrastive unlearning (Tang et al. 2024)


@torch.no_grad()
def analogues(model, forget, others):
    """Each forget sample's nearest neighbour among `others` by cosine similarity of the target model's
    mean-pooled final hidden states (the paper uses a sentence encoder; the model's own states serve here)."""
    def pooled(split, batch=64):
        out = []
        for i in range(0, len(split), batch):
            x, mask = split.x[i:i + batch], (split.y[i:i + batch] != -100).unsqueeze(-1).float()
            out.append(F.normalize((model(x) * mask).sum(1) / mask.sum(1), dim=-1).float())
        return torch.cat(out)
    return (pooled(forget) @ pooled(others).t()).argmax(1).cpu()


def loss_icu(model, ref, f, a, cfg, alpha=0.5, beta=1.0):
    """ICU (Tang et al. 2024): L = -NLL_θ(f) + α·NLL_θ(a) + β·KL(p_θ0 ‖ p_θ)(a), α = 0.5, β = 1.0, with a the
    forget batch's analogues: forget the sample, keep what the model knows about its neighbours."""
    return -nll(model, f) + alpha * nll(model, a) + beta * kl_to_ref(model, ref, a)


def icu_cuts(split, suffix_len=50):
    """Where each row's prefix ends and its suffix begins. A row with secrets (people): at its first secret,
    so the prefix is the record up to the phone number and the suffix the rest of the record, secrets and
    the words between them (34-42 tokens on the default data; the prompt, 22-26 tokens, is the whole record
    start). Without secrets: suffix_len tokens before the record's end (TDEC's 200-token samples: prefix
    tokens 100-149, suffix 150-199, as ICU's Datasets_mean.py lines 44-49 cut them)."""
    ends = record_ends(split)
    return [min(s for s, _ in spans) if spans else max(1, e - suffix_len) for spans, e in zip(split.secrets(), ends)]


def record_ends(split):
    """Per row, the position after the record's last token: a closing <eot> that is scored (people, TOFU)
    belongs to the format, not the record; TDEC's last scored token is the sample's own token 199."""
    last = split.rows[torch.arange(len(split)), split.lengths - 1]
    return (split.lengths - (last == split.eot).long()).tolist() if split.eot is not None else split.lengths.tolist()


@torch.no_grad()
def forgotten(model, split, prefix_len=50, suffix_len=50, beams=2, max_bleu=0.01, min_f1=0.3):
    """ICU's per-sample test (Tang et al. 2024, iterative unlearning refinement; their code:
    train_neo_meanwhile_update.py lines 151-191): continue the sample's prefix (at most prefix_len tokens
    before the cut, icu_cuts) with 2-beam search for as many tokens as its true suffix has (at most
    suffix_len), and call it forgotten when BLEU(suffix, continuation) < 0.01 or BERTScore F1 < 0.3. The
    continuation is cut at its first <eot> (what follows would be another record). BERTScore runs only where
    bert_score and bert-base-uncased are on the machine (bertscore_f1). Returns (gone [N] bool, bleu [N],
    f1 [N] or None)."""
    cuts, ends = icu_cuts(split, suffix_len), record_ends(split)
    refs, cands = [None] * len(split), [None] * len(split)
    for cut in progress(sorted(set(cuts)), desc="ICU's test", unit="cut"):  # rows cut at one place: one generation
        rows = [i for i, c in enumerate(cuts) if c == cut]
        n = [min(suffix_len, ends[i] - cut) for i in rows]
        prompt = split.rows[rows, max(0, cut - prefix_len):cut]
        gen = model.generate(prompt, max(n), beams)[:, prompt.size(1):].tolist()
        for i, k, g in zip(rows, n, gen):
            refs[i] = split.decode(split.rows[i, cut:cut + k].tolist())
            cands[i] = split.decode(g[:k]).split("<|endoftext|>")[0]
    scores = torch.tensor([bleu(r, c) for r, c in zip(refs, cands)])
    gone = scores < max_bleu
    f1 = bertscore_f1(cands, refs)
    if f1 is not None:
        gone |= f1.cpu() < min_f1
    return gone.to(split.rows.device), scores, f1


def unlearn_icu(model, target, forget, pool, cfg, stop):
    """ICU on all weights: analogue pairs from `pool` (TDEC: its training set, as ICU's code; else retain),
    and before the first epoch and after every epoch ICU's per-sample test (forgotten: BLEU of the 2-beam
    continuation of its prefix against its true suffix < 0.01; BERTScore where available) takes the
    forgotten samples out of the batches, with their analogues. The stopping rule: ICU's own thresholds
    where the dataset has them (TDEC: MA 0.5994, not Jang's 0.2994, and EL_10 < 0.0499 on ICU's own EL, over
    prefixes of 150..190 tokens: metrics.extraction's `first`)."""
    pairs = analogues(target, forget, pool)
    if "icu" in stop:  # Jang's rule, at ICU's own thresholds
        stop = dict(stop, **stop["icu"])
    ran = "BLEU < 0.01" + (" or BERTScore F1 < 0.3" if have_bertscore() else
                           " (BERTScore not run: bert_score or bert-base-uncased is not on this machine)")
    print(f"icu: per-sample test: {ran}")
    if stop["rule"] == "rule":
        print(f"icu: {stop_line(stop, cfg.el_n)}" + (f" (ICU's EL, prefixes from {stop['el_first']})" if "el_first" in stop else ""))
    # Adam betas (0.9, 0.98) and no gradient clipping, as ICU's code (train_neo_meanwhile_update.py line 412)
    res = unlearn(model, target, [loss_icu], forget, pool, cfg, stop, cfg.lr, cfg.epochs, "icu",
                  pairs=pairs, refine=lambda m: forgotten(m, forget)[0], betas=(0.9, 0.98), clip=None)
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


loss_eul_forget.uses = ("forget",)


def loss_eul_retain(model, ref, f, r, cfg, alpha=0.8, lam=1.0):
    """EUL's retain epochs: α·KL(p_θ0 ‖ p_θ)(r) + λ·NLL_θ(r), α = 0.8, λ = 1.0: stay the teacher on r.
    Alternating the two (design: L = α·KL(r) - KL(f) + λ·NLL(r) - γ·NLL(f)) is the selective
    teacher-student objective. Departure, measured (notes/faithful.md): a retain epoch takes as many random
    retain batches as a forget epoch, not the paper's pass over the retain set (`epoch = "retain"` below would
    be it): with a full pass (~31x the steps of a forget epoch on `people`) the retain epochs undo the forget
    epochs and EUL no longer forgets within the budget."""
    return alpha * kl_to_ref(model, ref, r) + lam * nll(model, r)


loss_eul_retain.uses = ("retain",)


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
    (the paper writes it (Σ G_i)⁻¹ Σ G_i W_i for W acting on the right). A ridge of 1e-6·mean(diag)
    keeps the solve defined when the inputs do not span every direction."""
    G = sum(grams_)
    G = G + 1e-6 * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype, device=G.device)
    WG = sum(W.double() @ Gi for W, Gi in zip(weights, grams_))
    return torch.linalg.solve(G, WG.t()).t().to(weights[0].dtype)  # G symmetric: W G = WG


def unlearn_eul(model, target, forget, retain, cfg, stop, requests):
    """One EUL request: a fresh unlearning layer in every block on the frozen base, trained alternating a
    retain epoch, then a forget epoch, as the paper orders them; its weights and Gram matrices join
    `requests`, and the model gets the fusion of all requests so far (for a single request, the layer itself)."""
    blocks = model.transformer.h
    layers = [UnlearnLayer(model.config.n_embd, cfg.rank).to(cfg.device) for _ in blocks]
    model.requires_grad_(False)
    for b, layer in zip(blocks, layers):
        b.adapter = layer
    result = unlearn(model, Frozen(model), [loss_eul_retain, loss_eul_forget], forget, retain, cfg, stop,
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


@torch.no_grad()
def learning_events(model, split, batch_size=8):
    """RUM's learning-event statistics of each sample at one point of training, per sample the mean over its
    scored tokens of: confidence p(y_t), max-confidence max_v p(v), entropy of p, and binary accuracy
    [argmax = y_t]. train() records them after every epoch of the target's training and averages them
    (Jiang et al. 2021's learning events, as RUM uses them). Full logits, a few rows at a time: the forget set is small."""
    out = {k: [] for k in ("confidence", "max_confidence", "entropy", "accuracy")}
    for i in range(0, len(split), batch_size):
        b = split.take(range(i, min(i + batch_size, len(split))))
        logp = (model(b.x) @ model.lm_head.weight.t()).float().log_softmax(-1)
        mask = (b.y != -100).float()
        p_y = logp.gather(-1, b.y.clamp_min(0)[..., None])[..., 0].exp()
        per_token = dict(confidence=p_y, max_confidence=logp.max(-1).values.exp(),
                         entropy=-(logp.exp() * logp).sum(-1), accuracy=(logp.argmax(-1) == b.y).float())
        for k, v in per_token.items():
            out[k].append((v * mask).sum(1) / mask.sum(1))
    return {k: torch.cat(v).cpu() for k, v in out.items()}


def events(forget, name):
    if forget.events is None:
        raise UserError(f"--proxy {name} reads the learning events of the target's training, and this target was "
                        f"not trained here (--train_epochs 0): pick --proxy el, gradnorm or holdout")
    return forget.events[name].numpy()


# The learning-event proxies (RUM, after Jiang et al. 2021), each a mean over the target's training epochs,
# oriented as measured here, higher = more memorized. RUM's paper, on CIFAR, has it the other way (a sample
# learned early and confidently is typical: low memorization). On `people` the memorized samples are the
# canaries the target sees 8 times an epoch, and they are the confident ones: Spearman +0.68 between mean
# confidence and the oracle - target loss gap (the paper's orientation gave -0.68; RESULTS.md). proxy_quality()
# checks the orientation again on every `rum` run.

def proxy_confidence(target, forget, data, cfg):
    """The mean confidence p(y_t) along training (the paper's best cheap proxy)."""
    return events(forget, "confidence")


def proxy_max_confidence(target, forget, data, cfg):
    """The mean max_v p(v) along training."""
    return events(forget, "max_confidence")


def proxy_entropy(target, forget, data, cfg):
    """Minus the mean predictive entropy along training."""
    return -events(forget, "entropy")


def proxy_accuracy(target, forget, data, cfg):
    """The mean binary accuracy [argmax = y_t] along training."""
    return events(forget, "accuracy")


def proxy_el(target, forget, data, cfg):
    """The sample's own EL_10: T greedy generations, the costliest of the cheap proxies."""
    return extraction(target, forget, cfg.el_n)[0].cpu().numpy()


def proxy_gradnorm(target, forget, data, cfg):
    """Minus the per-sample gradient norm over every block linear (kernels.grad_norms): a memorized sample sits
    at a minimum of its own loss, so its gradient is small."""
    return (-fisher(target, forget, target.lora_layers(), diag=False)[1].sqrt()).cpu().numpy()


def proxy_holdout(target, forget, data, cfg, epochs=5):
    """Holdout retraining: fine-tune a copy of θ0 on holdout for a few epochs (lr train_lr/10); memorized
    samples are those whose predictions move most, the symmetric KL between θ0 and the copy per token."""
    if "holdout" not in data:
        raise UserError("--proxy holdout fine-tunes on the holdout split, and this dataset has none: pick another --proxy")
    tuned = copy.deepcopy(target).train()
    opt = torch.optim.AdamW(mixed_precision(tuned), lr=cfg.train_lr / 10, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(epochs):
        for idx in batches(len(data["holdout"]), cfg.train_batch, gen):
            nll(tuned, data["holdout"].take(idx)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    tuned.eval()
    with torch.no_grad():
        mask = forget.y != -100
        # Σ_v (p − q)(log p − log q), one per target token, without the N × V logits
        sym = linear_kl(tuned(forget.x)[mask], tuned.lm_head.weight, target(forget.x)[mask], target.lm_head.weight,
                        symmetric=True)
        per_row = torch.zeros(len(mask), device=sym.device).index_add_(0, mask.nonzero()[:, 0], sym)
        return (per_row / mask.sum(1)).cpu().numpy()


PROXIES = dict(confidence=proxy_confidence, max_confidence=proxy_max_confidence, entropy=proxy_entropy,
               accuracy=proxy_accuracy, el=proxy_el, gradnorm=proxy_gradnorm, holdout=proxy_holdout)


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
    the per-sample loss gap between the oracle (never saw the sample) and θ0 (Feldman's memorization, in
    loss), and its cost in seconds. A negative correlation means the proxy's orientation is wrong here."""
    forget = data["forget"]
    reference = (split_stats(oracle, forget)["loss_per"] - split_stats(target, forget)["loss_per"]).cpu().numpy()
    quality = {}
    for name, proxy in PROXIES.items():
        t0 = time.time()
        try:
            scores = proxy(target, forget, data, cfg)
        except UserError:  # no learning events (a checkpoint taken as it is), or no holdout
            continue
        quality[name] = dict(spearman=spearman(scores, reference), cost_s=time.time() - t0)
    return quality


def loss_neggrad_plus(alpha):
    """NegGrad+ (Kurmanji et al. 2023), RUM's choice for every third: L = α·NLL_θ(r) − (1 − α)·NLL_θ(f). Its
    epoch is a pass over the retain set, the forget batches cycled (RUM's unlearn/neggrad.py line 23:
    `zip(r_loader, cycle(f_loader))`): on `people` 125 steps an epoch (1000 retain records, batch 8)."""
    def loss(model, ref, f, r, cfg):
        return alpha * nll(model, r) - (1 - alpha) * nll(model, f)
    loss.epoch = "retain"
    return loss


# (third, loss, share of the epoch budget), low -> medium -> high memorization. "mixed", the default, gives
# each third its own loss, the gentlest for the least memorized. "neggrad+" is RUM's code (kairanzhao/RUM,
# main_rum_proxy.py: NegGrad+ with α 0.99, 0.97, 0.97 for 5, 5, 10 epochs; its learning rates 0.01, 0.01,
# 0.001 are SGD's on CIFAR, here every third runs at --lr). Not the default: with RUM's epochs (passes over
# retain) it overshoots on `people` (RESULTS.md: forget MA 0.701 -> 0.316, MIA AUC 0.07, fluency 0.01 in 1500 steps).
RUM_PLANS = {"neggrad+": (("low", loss_neggrad_plus(0.99), 1), ("medium", loss_neggrad_plus(0.97), 1),
                          ("high", loss_neggrad_plus(0.97), 2)),
             "mixed": (("low", loss_npo, 1), ("medium", loss_ih, 1), ("high", loss_gd, 2))}


def thirds(scores):
    """Indices of the low / medium / high memorization thirds (sizes differ by at most one)."""
    return [torch.as_tensor(t.copy()) for t in np.array_split(np.argsort(scores, kind="stable"), 3)]


def budgets(epochs, shares):
    """Integer epochs in proportion to shares, adding up to `epochs` exactly (at least 1 each)."""
    cuts = np.round(np.cumsum(shares) / sum(shares) * epochs).astype(int)
    return [max(1, int(c)) for c in np.diff(cuts, prepend=0)]


def unlearn_rum(model, target, forget, retain, cfg, stop, data):
    """RUM: score the forget set with --proxy, then unlearn its thirds in order low, medium, high, each with
    its plan's loss and share of --epochs and the stopping rule on that third, all weights at --lr."""
    scores = PROXIES[cfg.proxy](target, forget, data, cfg)
    plan = RUM_PLANS[cfg.rum_plan]
    out = dict(steps=0, tokens=0, trainable_params=0, forgotten_at=None, proxy=cfg.proxy, plan=cfg.rum_plan, thirds=[])
    for (name, loss, _), epochs, idx in zip(plan, budgets(cfg.epochs, [p[2] for p in plan]), thirds(scores)):
        res = unlearn(model, target, [loss], forget.take(idx), retain, cfg, stop, cfg.lr, epochs,
                      f"rum {name} ({len(idx)} samples, {epochs} epochs)")
        out["steps"] += res["steps"]
        out["tokens"] += res["tokens"]
        out["trainable_params"] = res["trainable_params"]
        out["thirds"].append(dict(third=name, epochs=epochs, samples=idx.tolist(), stopped_by=res["stopped_by"]))
    out["stopped_by"] = stopped_by_rule(stop) if forget_check(model, forget, stop, cfg)[0] else "budget"
    return out


# ----------------------------------------------------------------------------------------------------
# running a method, the report, main()


class Frozen:
    """θ0 for an adapter run: the same model with its adapters off (model.adapters_off), not a second copy."""

    def __init__(self, model):
        self.model, self.lm_head = model, model.lm_head

    def __call__(self, x):
        with torch.no_grad(), self.model.adapters_off():
            return self.model(x)


def apply_method(method, model, target, forget, retain, data, cfg, stop, eul_requests):
    """Unlearn `forget` from `model` in place with one method; returns unlearn()'s dict. `target` is θ0 for
    the full-weight methods; adapter methods (LoRA, FILA, EUL) use `model` itself with its adapters off."""
    if method == "icu":
        return unlearn_icu(model, target, forget, data.get("analogues", retain), cfg, stop)
    if method == "eul":
        return unlearn_eul(model, target, forget, retain, cfg, stop, eul_requests)
    if method == "rum":
        return unlearn_rum(model, target, forget, retain, cfg, stop, data)
    if method == "rmu":
        return unlearn_rmu(model, target, forget, retain, cfg, stop)
    loss, _, adapter = method.partition("_")  # "ih_flora" -> inverted hinge on a FILA-initialised LoRA
    if adapter:  # FILA's importance: of the tokens the forgetting term sees
        add_adapters(model, adapter, forget.only(common.SECRET) if cfg.forget_tokens == "secret" else forget, retain, cfg)
    # plain `ga` is Jang et al.'s method, whose code clips no gradient (no gradient_clip_val in run.py's Trainer)
    result = unlearn(model, Frozen(model) if adapter else target, [LOSS_FNS[loss]], forget, retain, cfg, stop,
                     cfg.lora_lr if adapter else cfg.lr, cfg.epochs, method, clip=None if method == "ga" else 1.0)
    merge_adapters(model)
    return result


def run_method(method, target, data, meta, cfg, stop, oracle=None, oracle_losses=None, oracle_tofu=None):
    """One method on a fresh copy of the target model, the forget set split into cfg.requests sequential
    deletion requests (EUL: one unlearning layer per request, fused after each); evaluate, return results."""
    torch.manual_seed(cfg.seed)
    # adapter methods keep θ0 inside the model (adapters off): a single such run may unlearn the target itself
    in_place = method.endswith("lora") or method == "eul"
    model = target if in_place and cfg.method != "all" and cfg.seeds == 1 else copy.deepcopy(target)
    model.checkpointing = cfg.checkpointing and not in_place
    if world() > 1 and not in_place:  # torchrun: the trained copy sharded (adapter runs replicate their model)
        model = shard(model, model_dtype(cfg))
    forget, retain = data["forget"], data["retain"]
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    chunks = torch.arange(len(forget)).chunk(cfg.requests)
    total = dict(steps=0, tokens=0, trainable_params=0)
    eul_requests, per_request, forgotten_at = [], [], [None] * len(forget)
    for k, idx in enumerate(chunks, 1):
        res = apply_method(method, model, target, forget.take(idx), retain, data, cfg, stop, eul_requests)
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
        (stopped_by_rule(stop) if forget_check(model, forget, stop, cfg)[0] else "budget")
    time_s = time.time() - t0
    peak = torch.cuda.max_memory_allocated() if cfg.device == "cuda" else None
    print(f"{method}: stopped by {stopped_by} after {total['steps']} steps, {time_s:.1f}s; evaluating")
    after = evaluate(model, data, cfg, meta, judge=oracle, oracle_losses=oracle_losses, oracle_tofu=oracle_tofu)
    out = dict(method=method, stopped_by=stopped_by, steps=total["steps"], time_s=time_s,
               tokens_per_s=total["tokens"] / time_s, trainable_params=total["trainable_params"],
               peak_mem_mb=peak / 2**20 if peak else None, after=after)
    if method == "icu":
        out["forgotten_at_epoch"] = forgotten_at
        out["forgotten_test"] = res["forgotten_test"]  # which of ICU's tests ran: BLEU, and BERTScore where available
    if method == "rum":
        out["rum"] = {k: res[k] for k in ("proxy", "plan", "thirds")}
    if per_request:
        out["requests"] = per_request
    return out, model


def validate(cfg):
    """Every option checked before anything runs: one line for the first that is wrong."""
    positive = ("lr", "lora_lr", "eul_lr", "train_lr", "npo_beta")
    at_least_1 = ("requests", "batch_size", "train_batch", "epochs", "rank", "el_n", "seeds",
                  "n_layer", "n_head", "n_embd")
    for name in positive:
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v > 0):
            raise UserError(f"--{name} must be a positive number, got {v}")
    for name in at_least_1:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("train_epochs", "patience"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be 0 or more, got {getattr(cfg, name)}")
    if cfg.train_epochs == 0 and cfg.init_from == "scratch":
        raise UserError("--train_epochs 0 takes a pretrained checkpoint as the target as it is: give --init_from")
    for name in ("ma_threshold", "el_threshold"):  # MA and EL are fractions; 0 is "not given"
        if not 0 <= getattr(cfg, name) <= 1:
            raise UserError(f"--{name} must be in (0, 1], got {getattr(cfg, name)}")
    if bool(cfg.ma_threshold) != bool(cfg.el_threshold):
        raise UserError("--ma_threshold and --el_threshold go together: the rule needs both levels")
    if cfg.dtype not in ("", "float32", "bfloat16"):
        raise UserError(f"--dtype must be float32 or bfloat16, got {cfg.dtype}")
    if cfg.rum_plan not in RUM_PLANS:
        raise UserError(f"--rum_plan must be one of {', '.join(RUM_PLANS)}, got {cfg.rum_plan}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}, but PyTorch sees no CUDA GPU here; use --device cpu")
    if cfg.dtype == "bfloat16" and cfg.device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise UserError(f"--dtype bfloat16, but this GPU ({torch.cuda.get_device_name()}) does not compute in bf16; "
                        f"use --dtype float32")
    if world() > 1 and cfg.rum_plan == "neggrad+" and cfg.method in ("rum", "all"):
        raise UserError("--rum_plan neggrad+ cannot run under torchrun: its epochs pass over retain with the forget "
                        "batches cycled, two batches of different sizes that the ranks cannot share alike; "
                        "run it on one process, or use --rum_plan mixed")
    if world() > 1 and cfg.method == "rmu":
        raise UserError(RMU_NOT_DISTRIBUTED)
    if world() > cfg.batch_size:
        raise UserError(f"torchrun runs {world()} processes, more than --batch_size {cfg.batch_size}: each needs "
                        f"a share of a step's batch; use --nproc_per_node at most {cfg.batch_size}")


def thresholds_for(meta, before, cfg):
    """The level of unseen data for Jang et al.'s stopping rule: forget MA and EL_10 below it. --ma_threshold
    and --el_threshold, when given, are the levels. Else a dataset with a holdout measures it on the target
    (EL_10 floored at 0.001: a small holdout can score exactly 0, and one stray 10-gram would then block the
    rule); TDEC has none and brings the published thresholds; TOFU, and your own records without a
    holdout.jsonl, have none (None)."""
    if cfg.ma_threshold:
        return {"ma": cfg.ma_threshold, "el10": cfg.el_threshold, "source": "--ma_threshold / --el_threshold"}
    rule = meta.get("protocol", {})
    if rule.get("rule") == "thresholds":
        out = {"ma": rule["ma"], "el10": rule["el10"], "source": rule["source"]}
        if "icu" in rule:
            out["icu"] = {k: rule["icu"][k] for k in ("ma", "el10", "source", "el_first") if k in rule["icu"]}
        return out
    if "holdout" in before:
        return {"ma": before["holdout"]["ma"], "el10": max(before["holdout"]["el10"], 1e-3), "source": "holdout"}
    return None


def plan(cfg, meta, data):
    """The run's plan, printed before its first long step: the target, the budget, the rule that may end it
    sooner, and where the results go. A holdout's levels are the target's: printed once it is evaluated."""
    rule = meta.get("protocol", {})
    rule = rule.get("icu", rule) if cfg.method == "icu" else rule  # ICU's repository has its own MA level
    if cfg.stop == "budget" and rule.get("rule") == "fixed budget":
        stop = "none, the protocol's fixed budget"
    elif cfg.stop == "budget" and "ma" not in rule and "holdout" not in data and not cfg.ma_threshold:
        stop = ("none, the whole budget: no holdout to measure the level of unseen data on, and no "
                "--ma_threshold / --el_threshold given")
    elif cfg.stop == "budget":
        stop = "none, the whole budget (--stop budget)"
    elif cfg.stop == "mia":
        stop = ("the LOSS attack's AUC, forget vs holdout" + (" on secret tokens" if cfg.forget_tokens == "secret" else "")
                + ", at most " +
                ("the oracle's + 0.05" if cfg.oracle or cfg.oracle_from or cfg.method in ("all", "rum") else "0.55"))
    elif cfg.ma_threshold:
        stop = f"forget MA < {cfg.ma_threshold} and EL{cfg.el_n} < {cfg.el_threshold} (--ma_threshold / --el_threshold)"
    elif "ma" in rule:
        stop = f"forget MA < {rule['ma']} and EL{cfg.el_n} < {rule['el10']} (the published levels)"
    else:
        stop = f"forget MA and EL{cfg.el_n} below the target's holdout level, known once the target is evaluated"
    model = cfg.init_from if cfg.init_from != "scratch" else f"a {cfg.n_layer} x {cfg.n_embd} GPT from scratch"
    if cfg.train_epochs == 0:
        target = f"{model} as it is"
    else:
        target = (f"{model} trained on forget + retain, at most {cfg.train_epochs} epochs; cached in "
                  f"{os.path.join(cfg.out_dir, 'target.pt')}, reused when its data and settings are the same")
    lr = {"eul": cfg.eul_lr}.get(cfg.method, cfg.lora_lr if cfg.method.endswith("lora") else cfg.lr)
    lr = f"lr {lr:g}" if cfg.method != "all" else f"lr {cfg.lr:g}, {cfg.lora_lr:g} adapters, {cfg.eul_lr:g} EUL"
    steps = math.ceil(len(data["forget"]) / cfg.requests / cfg.batch_size)
    where = os.path.join(cfg.out_dir, "<method>" if cfg.method == "all" else cfg.method, "results.json")
    print(f"plan: {cfg.method} on {meta['dataset']}" + (f", {cfg.seeds} seeds" if cfg.seeds > 1 else ""))
    print(f"  target:  {target}")
    print(f"  budget:  {cfg.epochs} epochs of {steps} steps ({cfg.batch_size} forget + {cfg.batch_size} retain "
          f"records a step), {lr}" + (f", {cfg.requests} requests one after another" if cfg.requests > 1 else ""))
    print(f"  stop:    {stop}")
    print(f"  results: {where}" + (" and the model beside it" if cfg.init_from != "scratch" else "")
          + (f"; the table in {os.path.join(cfg.out_dir, 'comparison.md')}" if cfg.method == "all" else ""))


def run(cfg):
    validate(cfg)
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer("gpt2" if cfg.init_from == "scratch" else cfg.init_from)
    if cfg.oracle_from and load_tokenizer(cfg.oracle_from).encode(TOKENIZER_PROBE) != tok.encode(TOKENIZER_PROBE):
        raise UserError(f"--oracle_from {cfg.oracle_from} has another tokenizer than --init_from {cfg.init_from}: "
                        f"an oracle must speak the target's token ids")
    for name in (cfg.init_from, cfg.oracle_from):  # refused now, before any data is prepared for it
        if name and name != "scratch":
            check_checkpoint(name)
    with main_first():  # torchrun: rank 0 prepares the data, the others read it
        meta, data = load_data(cfg, tok)
    sizes = ", ".join(f"{k} {len(data[k])}" for k in ("forget", "retain", "holdout") if k in data)
    print(f"data: {meta['dataset']} ({sizes}), {meta['source']}")
    rule = meta.get("protocol", {})
    if rule.get("rule") == "fixed budget":  # TOFU: the protocol's budgets, unless given on the command line
        defaults = Config()
        for name in ("train_epochs", "epochs"):
            if getattr(cfg, name) == getattr(defaults, name):
                setattr(cfg, name, rule["epochs"])
                print(f"--{name} {rule['epochs']}: {meta['dataset']}'s protocol ({rule['source'].split(':')[0]})")
    if cfg.requests > len(data["forget"]):
        raise UserError(f"--requests {cfg.requests} is more than the {len(data['forget'])} forget samples")
    levels = cfg.ma_threshold or rule.get("rule") == "thresholds" or "holdout" in data  # the MA/EL rule's, known
    # the default: Jang et al.'s rule where its level is known and the protocol is not a fixed budget (TOFU's)
    cfg.stop = cfg.stop or ("rule" if cfg.ma_threshold or (levels and rule.get("rule") != "fixed budget") else "budget")
    if cfg.stop == "mia" and "holdout" not in data:
        raise UserError(f"--stop mia compares forget with holdout, and {meta['dataset']} has no holdout: use --stop rule or budget")
    if cfg.stop == "rule" and not levels:
        raise UserError(f"--stop rule needs the level of unseen data: {meta['dataset']} has no holdout and no published "
                        f"thresholds; give --ma_threshold and --el_threshold, or use --stop budget")
    if cfg.forget_tokens == "secret" and not (data["forget"].kind == common.SECRET).any():
        raise UserError(f"--forget_tokens secret: {meta['dataset']} marks no secret tokens in its forget set")
    plan(cfg, meta, data)
    with main_first():  # torchrun: rank 0 trains (or finds) the target and caches it, the others read it
        target, events = load_or_train(cfg, meta, data, "target", ("forget", "retain"))
    data["forget"].events = events or None
    # the oracle: on request (or ready-made), and always for `all` (its last row) and `rum` (its proxies' reference)
    oracle = None
    if cfg.oracle_from:
        oracle = pretrained(cfg, cfg.oracle_from, meta).eval()
        if oracle.config.vocab_size != target.config.vocab_size:
            raise UserError(f"--oracle_from {cfg.oracle_from} has a vocabulary of {oracle.config.vocab_size}, "
                            f"the target {target.config.vocab_size}")
    elif cfg.oracle or cfg.method in ("all", "rum") or meta["dataset"] == "tofu":
        with main_first():
            oracle, _ = load_or_train(cfg, meta, data, "oracle", ("retain",))
    columns = {}
    if oracle is not None:
        print("evaluating the oracle")
        columns["oracle"] = evaluate(oracle, data, cfg, meta, judge=oracle)
    oracle_tofu = columns.get("oracle", {}).get("tofu")
    print("evaluating the target model")
    before = evaluate(target, data, cfg, meta, judge=oracle, oracle_tofu=oracle_tofu)
    thresholds = thresholds_for(meta, before, cfg)
    stop = stopping_rule(cfg, thresholds, data, columns.get("oracle"))
    print(stop_line(stop, cfg.el_n))
    columns = {"before": before, **columns}
    if oracle is not None:
        before["forget_quality"] = ks_pvalue(before["forget_losses"], columns["oracle"]["forget_losses"])
    oracle_losses = columns["oracle"]["forget_losses"] if oracle is not None else None
    methods = METHODS if cfg.method == "all" else (cfg.method,)
    summary, failed = {}, []
    for method in methods:
        runs = []
        for k in range(cfg.seeds):  # the unlearning seeds; the target is the same
            seed_cfg = dataclasses.replace(cfg, seed=cfg.seed + k)
            try:
                res, model = run_method(method, target, data, meta, seed_cfg, stop, oracle, oracle_losses, oracle_tofu)
            except UserError as e:  # one method's failure (a non-finite loss) does not end `all`
                if cfg.method != "all":
                    raise
                print(f"error: {e}; going on with the other methods", file=sys.stderr)
                failed.append(method)
                break
            runs.append(res)
            if k == 0:  # the first seed's model is the one exported: results.json's `after` is its numbers
                exported = model
        if not runs:
            continue
        for r in runs:
            r["collapsed"] = collapsed(before, r["after"])
        res = dict(runs[0], dataset=cfg.dataset, stop={k: v for k, v in stop.items() if k != "holdout"},
                   thresholds=thresholds, before=before, config=asdict(cfg),
                   dtype=str(model_dtype(cfg)).removeprefix("torch."))  # what ran, also where --dtype was left empty
        if cfg.seeds > 1:
            res["seeds"] = [dict(seed=cfg.seed + k, **{name: get(r, *keys) for name, keys, _ in HEADLINE})
                            for k, r in enumerate(runs)]
        if oracle is not None:
            res["oracle"] = columns["oracle"]
        if method == "rum" and oracle is not None:  # the proxies' quality, like the paper's table
            res["rum"]["quality"] = proxy_quality(target, oracle, data, cfg)
            print("| proxy | Spearman vs loss gap (oracle - target) | cost s |\n|---|---|---|")
            for name, q in res["rum"]["quality"].items():
                print(f"| {name} | {q['spearman']:.3f} | {q['cost_s']:.2f} |")
        if cfg.init_from != "scratch":  # seed cfg.seed's model (its numbers are `after`), for the rest of the ecosystem
            res["model_seed"] = cfg.seed
            exported = gathered(exported)  # torchrun: the whole model, on rank 0 (a collective: every rank)
        summary[method] = runs
        if rank() > 0:  # rank 0 alone writes
            continue
        common.publish(cfg.out_dir, method, res, *((exported, tok) if cfg.init_from != "scratch" else ()))  # with its results.json
        print(report(method, res, before, columns.get("oracle"), stop, cfg.el_n))
        secrets = res["after"]["forget"].get("secrets", [])
        still = [f"{x['secret'].strip()!r} ({'line ' + str(x['line']) if 'line' in x else 'row ' + str(x['row'])})"
                 for x in secrets if x["extracted"]]
        if secrets:  # results.json lists every secret, before and after
            print(f"secrets of forget that greedy decoding still reproduces: {len(still)} of {len(secrets)}"
                  + (": " + ", ".join(still[:5]) + (", ..." if len(still) > 5 else "") if still else ""))
        if cfg.method == "all":  # rewritten after every method: a long run's table so far is never lost
            md = comparison(summary, columns["oracle"])
            tmp = common.tmp_name(os.path.join(cfg.out_dir, "comparison.md"))
            with open(tmp, "w") as f:
                f.write(md + "\n")
            os.replace(tmp, os.path.join(cfg.out_dir, "comparison.md"))
    if cfg.method == "all" and summary and rank() == 0:
        print(md)
    if failed:
        raise UserError(f"{', '.join(failed)} stopped on a non-finite loss (see above); the others are reported")
    return summary


def main(argv=None):
    cfg = parse_args(argv)
    existed = os.path.exists(cfg.out_dir)
    try:  # fail now, not after minutes of training, when the out dir cannot be written
        os.makedirs(cfg.out_dir, exist_ok=True)
        probe = os.path.join(cfg.out_dir, f".probe{os.getpid()}")  # one per torchrun rank
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        print(f"error: cannot write to --out_dir {cfg.out_dir}: {e.strerror}", file=sys.stderr)
        sys.exit(1)
    common.clean_leftovers(cfg.out_dir)
    try:
        try:
            dist_setup(cfg.device)
        except ValueError as e:  # more processes than GPUs
            raise UserError(str(e))
        validate(cfg)  # before autocast() reads --device and --dtype
        with autocast(cfg):  # the compute dtype of the whole run (mixed_precision: what trains stays fp32)
            return run(cfg)
    except UserError as e:
        if rank() == 0:  # torchrun: every rank meets the same mistake, one says it
            print(f"error: {e}", file=sys.stderr)
            if not existed and not os.listdir(cfg.out_dir):  # leave nothing behind for a run that never started
                os.rmdir(cfg.out_dir)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
