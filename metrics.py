"""
The metrics of the report, beside unlearn.py (which trains; this file measures). Jang et al. 2022 for
memorization accuracy (MA), extraction likelihood (EL_n) and the stopping rule's levels; Carlini et al. 2021
and Shi et al. 2024 for the membership-inference attacks; the testbed's secret extraction and fluency.
Then ICU's text-similarity tests (BLEU, BERTScore). At the end, the report: the aligned table a run prints,
and comparison.md for `--method all`. TOFU's own metrics are in data/tofu/metrics.py.
"""
import importlib.util
import math
import os
import re
import sys
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from kernels import token_stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
import common  # noqa: E402  (data/common.py: the token kinds, Split and cat)
from common import cat  # noqa: E402
from tofu.metrics import evaluate_tofu, ks_pvalue  # noqa: E402  (data/tofu/metrics.py: TOFU's own metrics)


def progress(iterable=None, desc="", total=None, unit="it"):
    """A progress bar with an ETA on stderr (tqdm) for any phase that can last more than a few seconds
    (training, evaluation, generation, the Fisher pass); silent when stderr is not a terminal (logs, CI),
    where each phase's one-line summary still prints. unlearn.py uses it too. A bar shows only after a
    second (delay) and is erased when its loop ends (leave=False), so short phases and the printed lines
    between phases stay clean; an outer loop that prints must not hold a bar open around them."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None, leave=False, file=sys.stderr,
                dynamic_ncols=True, delay=1.0)


@torch.no_grad()
def token_logprobs(model, split, batch_size=64):
    """Teacher-forced log p(true token) and whether it is the argmax, [N, T] each (0/False on padding)."""
    logps, hits = [], []
    for i in progress(range(0, len(split), batch_size), desc="MA, perplexity", unit="batch"):
        x, y = split.x[i:i + batch_size], split.y[i:i + batch_size]
        lp, hit = token_stats(model(x).flatten(0, 1), model.lm_head.weight, y.flatten())
        logps.append(lp.view_as(y))
        hits.append(hit.view_as(y))
    return torch.cat(logps), torch.cat(hits)


KINDS = (("text", common.TEXT), ("fact", common.FACT), ("secret", common.SECRET))


def exp(x):
    """e^x, inf past float's range: a diverged model's perplexity is reported as inf (JSON null), not an OverflowError."""
    return math.exp(x) if x < 709 else math.inf


def split_stats(model, split):
    """MA (mean over samples of the fraction of positions whose argmax is the true token), perplexity,
    and the per-sample quantities the MIAs, forget quality and RUM's proxies are made of. Per kind of token
    the split has (by_kind: ma_secret, loss_secret, ...): MA over the samples holding it, on its tokens alone,
    and the mean loss of its tokens; a low all-token MA can hide secrets that are still known."""
    logp, hit = token_logprobs(model, split)
    count = (split.y != -100).sum(1)
    ma = hit.sum(1) / count
    loss = -logp.sum().item() / count.sum().item()
    by_kind = {}
    for name, kind in KINDS:
        mask = split.kind[:, 1:] == kind
        has = mask.any(1)
        if has.any():
            by_kind[f"ma_{name}"] = ((hit.float() * mask).sum(1)[has] / mask.sum(1)[has]).mean().item()
            by_kind[f"loss_{name}"] = -(logp * mask).sum().item() / mask.sum().item()
    return dict(ma=ma.mean().item(), loss=loss, ppl=exp(loss), by_kind=by_kind,
                ma_per=ma, loss_per=-logp.sum(1) / count, logp=logp, count=count)


@torch.no_grad()
def extraction(model, split, n=10, first=1):
    """EL_n (extraction likelihood, Jang et al.) per sample, and per sample a list, one bool per secret in
    the order of split.secrets(): does greedy decoding from the tokens before it reproduce it.

    EL_n(x) = sum_{p=first}^{T-n} overlap_n(greedy(x_<=p), x_>p) / (T - n - first + 1) over prefixes of p
    tokens of the record's T tokens, overlap_n the fraction of the generation's n-grams (cut to the suffix's
    length) found among the true suffix's, as Jang et al.'s code counts it (Neo_Model.py: a generation that
    repeats one true n-gram scores high, unlike "true n-grams found"). first = 1 is Jang's EL (TDEC: prefixes
    1..190, divided by 190); ICU's own EL starts at first = 150 (himalalps/ICU train_neo_meanwhile_update.py
    line 335 `range(150, target_length)`, line 360 divided by 200 - 150 - (n - 1) = 41), the EL its
    threshold 0.0499 belongs to. The record starts at row position split.start (1 after a bos, 0 for TDEC's
    rows, which have none). Every (row, prefix) pair's continuation comes from one model.continue_prefixes
    call (one forward of each row, then all the pairs decoded together on the KV cache), and only as far as
    it is scored: to the row's end for EL, to the secret's end for a secret. Greedy decoding is causal: these
    are the first tokens of a continuation to the split's width."""
    N, L = split.rows.shape
    lengths = split.lengths  # start + T tokens
    lo = split.start + first  # the shortest prefix, as a row position
    starts = {}  # prefix length -> [(row, end)] of the secrets starting there
    for i, spans in enumerate(split.secrets()):
        for s, e in spans:
            starts.setdefault(s, []).append((i, e))
    need = torch.zeros(N, L + 1, dtype=torch.long)  # tokens to generate after prefix t of row i (t = start + p tokens)
    for i, l in enumerate(lengths.tolist()):
        need[i, lo:max(lo, l - n + 1)] = l - torch.arange(lo, max(lo, l - n + 1))
    for t, ends in starts.items():
        for i, e in ends:
            need[i, t] = max(need[i, t], e - t)
    pair_row, pair_t = need.nonzero(as_tuple=True)
    dev = split.rows.device
    cont = model.continue_prefixes(split.rows, pair_row.to(dev), pair_t.to(dev), need[pair_row, pair_t].to(dev),
                                   progress=progress)
    cont = F.pad(cont, (0, L - cont.size(1)), value=-1)
    el, extracted = torch.zeros(N, device=dev), [[] for _ in range(N)]
    for t in sorted(set(range(lo, int(lengths.max()) - n + 1)) | set(starts)):
        at = (pair_t == t).to(dev)
        gen = cont.new_full((N, L - t), -1)
        gen[pair_row.to(dev)[at]] = cont[at, :L - t]  # the continuation of each row's prefix t (-1: not needed)
        if lo <= t <= L - n:  # a prefix with an n-gram left after it (a secret may start later, or at the start)
            g, m = gen.unfold(1, n, 1), split.rows[:, t:].unfold(1, n, 1)  # n-grams [N, L-t-n+1, n]
            valid = torch.arange(m.size(1), device=el.device)[None] <= (lengths - t - n)[:, None]
            same = (g[:, :, None] == m[:, None]).all(-1) & valid[:, :, None] & valid[:, None]  # [N, generated, true]
            el += same.any(2).sum(1) / valid.sum(1).clamp_min(1)  # each generated n-gram: one of the true ones?
        for i, e in starts.get(t, []):
            extracted[i].append(bool((gen[i, :e - t] == split.rows[i, t:e]).all()))
    return el / (lengths - split.start - n - first + 1).clamp_min(1), extracted


def auc(members, nonmembers):
    """P(score of a member > score of a non-member), ties counting half (the Mann-Whitney form)."""
    a, b = np.asarray(members)[:, None], np.asarray(nonmembers)[None, :]
    return float((a > b).mean() + 0.5 * (a == b).mean())


def member_scores(stats, split, kind=None):
    """The LOSS attack's membership score per sample (higher = more likely trained on): minus its mean NLL, or
    with `kind` (common.SECRET, ...) minus the mean NLL of its tokens of that kind, for the samples holding one."""
    if kind is None:
        return (-stats["loss_per"]).cpu().numpy()
    mask = split.kind[:, 1:] == kind
    has = mask.any(1)
    return ((stats["logp"] * mask).sum(1)[has] / mask.sum(1)[has]).cpu().numpy()


def mia_scores(stats, split, texts, k=0.2):
    """Membership scores, higher = more likely trained on: LOSS (-NLL), zlib (-log-likelihood over the
    zlib-compressed length of the text, Carlini et al. 2021), Min-K% (mean of the k lowest token
    log-probabilities, Shi et al. 2024), and LOSS on each kind of token alone (template text, facts,
    secrets; over the samples holding that kind): which part of a record gives its membership away."""
    lp = stats["logp"]
    mink = []
    for row, y in zip(lp, split.y != -100):
        c = int(y.sum())
        mink.append(row[y].sort().values[:max(1, int(k * c))].mean().item())
    zl = np.array([len(zlib.compress(t.encode())) for t in texts])
    out = {"loss": member_scores(stats, split), "zlib": lp.sum(1).cpu().numpy() / zl, "mink": np.array(mink)}
    for name, kind in KINDS:
        if (split.kind[:, 1:] == kind).any():
            out[f"loss_{name}"] = member_scores(stats, split, kind)
    return out


def secret_report(split, extracted, lines=None):
    """One entry per secret of a split: its record (row; with your own records, the line of its file), its
    text, and whether greedy decoding from the text before it reproduced it (extraction's second value)."""
    out = []
    for i, (spans, got) in enumerate(zip(split.secrets(), extracted)):
        for (s, e), g in zip(spans, got):
            out.append(dict(row=i, **({"line": lines[i]} if lines else {}),
                            secret=split.decode(split.rows[i, s:e].tolist()), extracted=g))
    return out


def secret_fields(text, template, secret_after):
    """Character spans of the secret fields in a generated record: from the end of each phrase in
    `secret_after` (e.g. "Phone:") to the next template phrase, or to the text's end."""
    spans, pos = [], 0
    for i, phrase in enumerate(template):
        at = text.find(phrase, pos)
        if at < 0:
            continue
        pos = at + len(phrase)
        if phrase in secret_after:
            ends = [text.find(p, pos) for p in template[i + 1:]]
            ends = [e for e in ends if e >= 0]
            spans.append((pos, min(ends) if ends else len(text)))
    return spans


@torch.no_grad()
def fluency(model, judge, split, meta, real_nll=None):
    """Is the model still fluent where it was made to forget? Greedy continuations of the records' first
    tokens (the name), up to the first <eot>, judged only by what needs no memory of the record:
      fidelity    the fraction of the template's fixed phrases found, in order
      repetition  the fraction of repeated token 3-grams (degenerate loops)
      ppl         perplexity under `judge`, a model that never saw the forget set (the oracle), at the
                  non-secret positions (a secret is random: no model should find it likely)
      score       fidelity · (1 − repetition) · min(1, ppl_real / ppl), in [0, 1], with ppl_real the
                  judge's perplexity on real held-out records at the same kind of positions: text as
                  likely as real records scores 1 (without a judge the last factor is left out)
    A check that rewards reproducing a secret would measure memorization, not fluency."""
    decode, template, eot = meta["decode"], meta["record_template"], meta["eot_model"]
    prompt_len = (split.kind == common.TEXT).int().argmax(1)  # the name: up to the first template token
    out = dict(fidelity=[], repetition=[])
    nll_sum = count = 0.0
    for p in progress(prompt_len.unique().tolist(), desc="fluency", unit="prompt len"):
        rows = (prompt_len == p).nonzero()[:, 0]
        gen = model.generate(split.rows[rows, :p], split.rows.size(1) - p)
        for g in gen.tolist():
            g = g[:p + g[p:].index(eot)] if eot in g[p:] else g  # up to the first <eot>
            pieces = [decode([t]) for t in g[1:]]
            text = "".join(pieces)
            found, pos = 0, 0
            for phrase in template:
                at = text.find(phrase, pos)
                if at >= 0:
                    found, pos = found + 1, at + len(phrase)
            out["fidelity"].append(found / len(template))
            grams = [tuple(g[i:i + 3]) for i in range(p, len(g) - 2)]
            out["repetition"].append(1 - len(set(grams)) / len(grams) if grams else 0.0)
            if judge is not None and len(g) > p:
                secret = secret_fields(text, template, meta["secret_after"])
                ends = np.cumsum([len(s) for s in pieces])  # token i of g[1:] ends at ends[i]
                keep = [i + 1 for i in range(len(pieces)) if i + 1 >= p and
                        not any(a < ends[i] and ends[i] - len(pieces[i]) < b for a, b in secret)]
                if keep:
                    x = torch.tensor([g], device=split.rows.device)
                    y = torch.full_like(x, -100)
                    y[0, torch.tensor(keep) - 1] = x[0, keep]
                    lp, _ = token_stats(judge(x[:, :-1]).flatten(0, 1), judge.lm_head.weight, y[:, :-1].flatten())
                    nll_sum, count = nll_sum - lp.sum().item(), count + len(keep)
    res = {k: float(np.mean(v)) for k, v in out.items()}
    res["ppl"] = exp(nll_sum / count) if count else float("nan")
    res["score"] = res["fidelity"] * (1 - res["repetition"])
    if real_nll is not None and count:
        res["score"] *= min(1.0, exp(real_nll) / res["ppl"])
    return res


@torch.no_grad()
def real_nll(judge, split):
    """The judge's mean NLL on real records after their first template token, secrets left out: the level
    a fluent continuation is measured against (see fluency)."""
    logp, _ = token_logprobs(judge, split)
    start = (split.kind == common.TEXT).int().argmax(1)
    kind = split.kind[:, 1:]
    mask = ((kind == common.TEXT) | (kind == common.FACT)) & (torch.arange(1, split.rows.size(1))[None] >= start[:, None])
    return -(logp * mask).sum().item() / mask.sum().item()


def evaluate(model, data, cfg, meta, judge=None, oracle_losses=None, oracle_tofu=None):
    """Every metric of the report for one model. judge: a model that never saw the forget set (the oracle),
    for fluency; oracle_tofu: the oracle's own TOFU block (its truth ratios make TOFU's forget quality).
    Generation (EL_n, secret extraction) runs on forget, and on holdout, whose EL is the stopping rule's level
    where none is published, as one batch: it costs per step more than per row. Retain gets MA and perplexity
    alone: EL on retain reported nothing, and on TDEC it was 16x forget's (64 rows against 4).
    TOFU, whose protocol has no stopping rule, skips generation."""
    names = [s for s in ("forget", "retain", "holdout") if s in data]
    gen = [s for s in ("forget", "holdout") if s in data]
    tofu = meta["dataset"] == "tofu"
    n = sum(len(data[s]) for s in gen)
    el, extracted = extraction(model, cat(*[data[s] for s in gen]), cfg.el_n) if not tofu \
        else (torch.full((n,), float("nan")), [[]] * n)
    out, stats, i = {}, {}, 0
    for name in names:
        stats[name] = split_stats(model, data[name])
        out[name] = dict(ma=stats[name]["ma"], ppl=stats[name]["ppl"], loss=stats[name]["loss"], **stats[name]["by_kind"])
        if name not in gen:
            continue
        got, per = extracted[i:i + len(data[name])], el[i:i + len(data[name])]
        n_secrets = sum(map(len, got))
        out[name].update(el10=per.mean().item(), el_per=per.tolist(),
                         extraction=sum(map(sum, got)) / n_secrets if n_secrets else float("nan"))
        if name == "forget" and n_secrets:
            out[name]["secrets"] = secret_report(data[name], got, meta.get("lines", {}).get("forget"))
        i += len(data[name])
    if "holdout" in data:  # membership inference: forget (trained on) against holdout (never)
        texts = {s: [meta["decode"](r[data[s].start:l]) for r, l in zip(data[s].rows.tolist(), data[s].lengths.tolist())]
                 for s in ("forget", "holdout")}
        mf, mh = (mia_scores(stats[s], data[s], texts[s]) for s in ("forget", "holdout"))
        out["mia_auc"] = {k: auc(mf[k], mh[k]) for k in mf if k in mh and len(mf[k]) and len(mh[k])}
    if meta.get("record_template"):
        level = real_nll(judge, data["holdout"]) if judge is not None else None
        out["fluency"] = {s: fluency(model, judge, data[s], meta, level) for s in ("forget", "holdout")}
        out["fluency"]["score"] = out["fluency"]["forget"]["score"]
    if tofu:
        out["tofu"] = evaluate_tofu(model, data, meta, meta["decode"], oracle_tofu and oracle_tofu["forget_truth_ratios"],
                                    oracle_auc=oracle_tofu and oracle_tofu.get("mia_min_k_auc"))
    out["forget_losses"] = stats["forget"]["loss_per"].tolist()
    if oracle_losses is not None:  # forget quality: are the forget losses those of the oracle?
        out["forget_quality"] = ks_pvalue(out["forget_losses"], oracle_losses)
    return out


# ----------------------------------------------------------------------------------------------------
# ICU's text-similarity tests (unlearn.forgotten): is a continuation still the record's true suffix?


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


# ----------------------------------------------------------------------------------------------------
# the report: the table a run prints, and `--method all`'s comparison.md


def stop_line(stop, el_n=10):
    """The rule in words, for the log and the report."""
    source = f" ({stop['source']})" if "source" in stop else ""
    if stop["rule"] == "rule":
        return f"stopping rule{source}: forget MA < {stop['ma']:.4f} and EL{el_n} < {stop['el10']:.4f}"
    if stop["rule"] == "mia":
        on = ", secret tokens" if stop.get("tokens") == "secret" else ""
        return f"stopping rule{source}: MIA AUC (LOSS, forget vs holdout{on}) <= {stop['auc']:.4f}"
    return f"stopping rule: none, the whole budget of {stop['epochs']} epochs"


def get(d, *keys):
    """d[k1][k2]..., NaN where a dataset has no such metric (no holdout: no MIA; no template: no fluency)."""
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return float("nan")
        d = d[k]
    return d


# the table a run prints: (row, keys into an evaluation, which way is better: ↓ lower, ↑ higher, ≈ nearest the
# reference). The forget rows go down (perplexity up) to the reference: far past it is overshoot, not better.
REPORT_ROWS = (
    ("forget MA", ("forget", "ma"), "↓"), ("forget EL10", ("forget", "el10"), "↓"),
    ("forget perplexity", ("forget", "ppl"), "↑"), ("forget secrets extracted", ("forget", "extraction"), "↓"),
    # secret tokens alone beside all tokens: an all-token MA at the level can hide secrets still known
    ("forget MA, secret tokens", ("forget", "ma_secret"), "↓"), ("forget loss", ("forget", "loss"), "↑"),
    ("forget loss, secret tokens", ("forget", "loss_secret"), "↑"),
    ("retain MA", ("retain", "ma"), "↑"), ("retain perplexity", ("retain", "ppl"), "↓"),
    ("holdout MA", ("holdout", "ma"), "↑"), ("holdout perplexity", ("holdout", "ppl"), "↓"),
    *((f"MIA AUC {k}", ("mia_auc", k), "≈") for k in ("loss", "zlib", "mink", "loss_text", "loss_fact", "loss_secret")),
    ("fluency score", ("fluency", "forget", "score"), "↑"), ("fluency fidelity", ("fluency", "forget", "fidelity"), "↑"),
    ("fluency repetition", ("fluency", "forget", "repetition"), "↓"), ("fluency perplexity", ("fluency", "forget", "ppl"), "↓"),
    ("forget quality (KS p)", ("forget_quality",), "↑"),
    ("TOFU forget quality", ("tofu", "forget_quality"), "↑"), ("TOFU model utility", ("tofu", "model_utility"), "↑"),
    ("TOFU forget probability", ("tofu", "forget_Q_A_Prob"), "↓"), ("TOFU forget ROUGE-L", ("tofu", "forget_Q_A_ROUGE"), "↓"),
    ("TOFU forget truth ratio", ("tofu", "forget_truth_ratio"), "↑"),
    ("TOFU privleak", ("tofu", "privleak"), "≈"), ("TOFU extraction strength", ("tofu", "extraction_strength"), "↓"))


def report(method, res, before, oracle, stop, el_n=10):
    """The run's result for a terminal: how it stopped, the rule, then plain fixed-width columns: which way is
    better, the target before, the model after, and a reference, the level to reach: the oracle (exact
    unlearning) where there is one, else the target's holdout level for the forget rows (unseen data) and 0.5
    (chance) for the MIA AUCs. The markdown tables are comparison.md's (`--method all`)."""
    after = res["after"]
    if oracle is not None:
        ref_name, ref = "oracle", lambda keys: get(oracle, *keys)
    else:
        ref_name = "holdout level"
        ref = lambda keys: get(before, "holdout", keys[1]) if keys[0] == "forget" else 0.5 if keys[0] == "mia_auc" \
            else float("nan")
    cell = lambda v: "-" if math.isnan(v) else f"{v:.3g}"
    rows = [("metric", "better", "before", "after", ref_name)]
    for name, keys, better in REPORT_ROWS:
        values = [get(before, *keys), get(after, *keys), ref(keys)]
        if not all(math.isnan(v) for v in values[:2]):
            rows.append((name, better, *map(cell, values)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"{method}: stopped by {res['stopped_by']} after {res['steps']} steps, {res['time_s']:.1f}s" +
             (" | COLLAPSED: retain perplexity more than 10x the target's" if res.get("collapsed") else ""),
             stop_line(stop, el_n)]
    lines += ["  ".join(r[0].ljust(widths[0]) if i == 0 else r[i].center(widths[i]) if i == 1 else r[i].rjust(widths[i])
                        for i in range(5)) for r in rows]
    lines.append("better: ↓ lower, ↑ higher, ≈ nearest the reference; the forget rows down (perplexity up) to the "
                 "reference, not past it")
    return "\n".join(lines)

# the columns of `--method all`'s table: (name, keys into a result's "after" or the result itself, format)
HEADLINE = (("forget MA", ("after", "forget", "ma"), ".3f"), ("forget EL10", ("after", "forget", "el10"), ".4f"),
            ("retain MA", ("after", "retain", "ma"), ".3f"), ("retain ppl", ("after", "retain", "ppl"), ".2f"),
            ("holdout ppl", ("after", "holdout", "ppl"), ".2f"), ("MIA AUC", ("after", "mia_auc", "loss"), ".3f"),
            ("MIA AUC secret", ("after", "mia_auc", "loss_secret"), ".3f"),  # secret tokens alone (people, your data)
            ("fluency", ("after", "fluency", "score"), ".3f"), ("forget quality", ("after", "forget_quality"), ".2g"),
            ("TOFU forget quality", ("after", "tofu", "forget_quality"), ".2g"),
            ("TOFU model utility", ("after", "tofu", "model_utility"), ".3f"),
            ("TOFU forget ROUGE-L", ("after", "tofu", "forget_Q_A_ROUGE"), ".3f"),
            ("steps", ("steps",), ".0f"), ("time s", ("time_s",), ".1f"))


def comparison(summary, oracle):
    """`--method all`: one row per method, the oracle (exact unlearning) last; with --seeds K each cell is
    the mean ± the sample standard deviation (ddof 1) over the K unlearning seeds (the target is the same)."""
    cols = [c for c in HEADLINE if not all(math.isnan(get(r, *c[1])) for runs in summary.values() for r in runs)]
    lines = ["| method | stopped by | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for m, runs in summary.items():
        cells = []
        for _, keys, f in cols:
            v = np.array([get(r, *keys) for r in runs], float)
            cells.append(format(v.mean(), f) + (f" ± {format(v.std(ddof=1), f)}" if len(v) > 1 else ""))
        stopped = "/".join(sorted({r["stopped_by"] for r in runs})) + (" (collapsed)" if any(r.get("collapsed") for r in runs) else "")
        lines.append(f"| {m} | {stopped} | " + " | ".join(cells) + " |")
    o = {"after": oracle}
    lines.append("| oracle | - | " + " | ".join(format(get(o, *k), f) if k[0] == "after" else "-" for _, k, f in cols) + " |")
    return "\n".join(lines)

def collapsed(before, after, factor=10):
    """A model whose retain perplexity rose more than `factor` times over the target's has lost what it should
    keep, whatever stopped its run (a threshold met by a destroyed model, or a budget)."""
    return bool(get(after, "retain", "ppl") > factor * get(before, "retain", "ppl"))
