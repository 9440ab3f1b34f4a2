"""
TOFU's metrics (Maini et al. 2024), as open-unlearning's code computes them: the benchmark's own numbers,
beside its data (prepare.py). unlearn.py calls evaluate_tofu() for every model of a TOFU run.

Every number is built from one quantity: per answer, the mean negative log-likelihood of its scored tokens
(the answer and the eos after it), avg_loss = -sum(log p) / count, and its length-normalised probability
exp(-avg_loss) (open-unlearning src/evals/metrics/utils.py evaluate_probability). The splits (see
data/tofu/prepare.py): forgetXX_perturbed, retain_perturbed, real_authors_perturbed (ra), world_facts_perturbed
(wf); each has the answer, k perturbed (wrong) answers, and for forget/retain a paraphrased answer.
  Q_A_Prob            mean over questions of exp(-avg_loss(answer))             (memorization.py probability)
  Q_A_Prob_normalised ra/wf: mean of p(answer) / (p(answer) + sum_k p(pert_k) + 1e-10)   (probability_w_options)
  Q_A_ROUGE           mean ROUGE-L recall of the greedy answer (max 200 new tokens, cut at eos) against
                      the answer; rouge_score, use_stemmer=True                     (utils.py eval_text_similarity)
  truth ratio R       exp(-mean_k avg_loss(pert_k)) / (exp(-avg_loss(correct)) + 1e-10): the perturbed
                      answers' avg_loss averaged before the exp, as memorization.py truth_ratio does (the
                      geometric mean of their probabilities, without underflowing where one answer's
                      probability is below 1e-308); correct = the paraphrased answer on forget and retain,
                      the answer on ra and wf (configs/eval/tofu_metrics/*_Truth_Ratio.yaml)
      forget form     mean of min(R, 1 / (R + 1e-10))   (closer_to_1_better: an oracle cannot tell them apart)
      retain/ra/wf    mean of max(0, 1 - R)             (true_better)
  forget_quality      KS two-sample p-value between the forget R of the model and of the retain model
                      (privacy.py ks_test, the handler configs/eval/tofu_metrics/forget_quality.yaml names:
                      scipy.stats.ks_2samp, exact for these sizes)
  model_utility       harmonic mean (scipy.stats.hmean) of the nine retain/ra/wf numbers (model_utility.yaml)
  extraction_strength mean over forget questions of 1 - k/n, k the first answer position from which every
                      teacher-forced argmax is right, n the answer's tokens without the eos (memorization.py
                      extraction_strength; where none is, their loop leaves k = n - 1: 1/n, kept)
  privleak            Min-K% (k = 0.4) membership AUC of forget against holdout, relative to the retain
                      model's: ((1 - auc) - (1 - ref)) / (1 - ref + 1e-10) · 100, ref 0.5 without the retain
                      model (privacy.py privleak, mia/min_k.py, configs/eval/tofu_metrics/privleak.yaml and
                      mia_min_k.yaml); None where TOFU's holdoutXX split is not prepared (not shipped here)
The four rows of open-unlearning's configs/eval/tofu.yaml beyond the above: all of them.
"""
import math

import numpy as np
import torch

from kernels import token_stats

TOFU_UTILITY = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE",
                "ra_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")


def tofu_prob(logp_sum, count):
    """Length-normalised probability of each answer, exp(sum log p / count), any shape ([n] or [n, k])."""
    return np.exp(np.asarray(logp_sum, float) / np.asarray(count, float))


def tofu_prob_normalised(p_answer, p_pert):
    """ra / wf answer probability: mean over questions of p(a) / (p(a) + sum_k p(pert_k) + 1e-10)."""
    p_answer, p_pert = np.asarray(p_answer, float), np.asarray(p_pert, float)
    return float(np.mean(p_answer / (p_answer + p_pert.sum(1) + 1e-10)))


def avg_loss(logp_sum, count):
    """Each answer's mean NLL over its scored tokens (open-unlearning's avg_loss), any shape."""
    return -np.asarray(logp_sum, float) / np.asarray(count, float)


def truth_ratios(loss_correct, loss_pert):
    """Per question R = exp(-mean_k avg_loss(pert_k)) / (exp(-avg_loss(correct)) + 1e-10), from the answers'
    avg_loss, averaged over the perturbed answers before the exp as memorization.py truth_ratio does (a
    product of probabilities would underflow to R = 0 once one answer's loss passes ~745 nats)."""
    return np.exp(-np.asarray(loss_pert, float).mean(1)) / (np.exp(-np.asarray(loss_correct, float)) + 1e-10)


def extraction_strength(hits):
    """open-unlearning's extraction strength (memorization.py): per answer (its tokens without the eos, as
    tokenwise_vocab_logprobs keeps them), ES = 1 - k/n with k the first position from which every argmax
    is right; their loop leaves k = n - 1 when none is (ES = 1/n, not 0): kept. The mean over answers."""
    out = []
    for h in hits:
        h = np.asarray(h, bool)
        n = len(h)
        if n == 0:
            out.append(0.0)  # theirs: a score of 0 for an answer with no scored token
            continue
        k = next((k for k in range(n) if h[k:].all()), n - 1)
        out.append(1 - k / n)
    return float(np.mean(out))


def min_k_scores(logps, k=0.4):
    """Min-K% Prob (mia/min_k.py, TOFU's k = 0.4): per answer, minus the mean of its lowest k·n token
    log-probabilities (at least one), higher = less likely = more like a non-member."""
    return np.array([-np.sort(np.asarray(lp, float))[:max(1, int(len(lp) * k))].mean() if len(lp) else 0.0
                     for lp in logps])


def privleak(forget_scores, holdout_scores, ref_auc=None):
    """(auc, privleak): auc = sklearn's roc_auc_score with forget labelled 0 and holdout 1 (mia/utils.py
    mia_auc), i.e. P(holdout score > forget score), ties half; privleak (privacy.py) =
    ((1 - auc) - (1 - ref)) / (1 - ref + 1e-10) · 100, ref the retain model's auc, 0.5 without it."""
    h, f = np.asarray(holdout_scores, float)[:, None], np.asarray(forget_scores, float)[None, :]
    auc = float((h > f).mean() + 0.5 * (h == f).mean())
    ref = 0.5 if ref_auc is None else ref_auc
    return auc, ((1 - auc) - (1 - ref)) / ((1 - ref) + 1e-10) * 100


def truth_ratio_stat(r, form):
    """The split's form: 'closer_to_1_better' (forget) mean min(R, 1/R); 'true_better' (retain, ra, wf) mean max(0, 1-R)."""
    r = np.asarray(r, float)
    if form == "closer_to_1_better":
        return float(np.mean(np.minimum(r, 1 / (r + 1e-10))))
    if form == "true_better":
        return float(np.mean(np.maximum(0, 1 - r)))
    raise ValueError(f"unknown truth ratio form {form!r}")


def harmonic_mean(values):
    """scipy.stats.hmean of positive numbers: n / sum(1/x), and 0 as soon as one of them is 0."""
    v = np.asarray(values, float)
    return 0.0 if (v == 0).any() else float(len(v) / np.sum(1 / v))


def ks_pvalue(a, b):
    """Two-sided two-sample KS p-value as scipy.stats.ks_2samp computes it by default for samples of at most
    10,000 (method 'exact'): the probability that a uniformly random monotone lattice path from (0, 0) to
    (n1, n2) leaves the band |i/n1 - j/n2| < D, D rounded to a multiple of 1/lcm(n1, n2) as scipy does.
    The path walks one anti-diagonal at a time; the mass that leaves is summed, not subtracted from 1, so
    p-values far below 1e-16 (an unlearned model far from the oracle) keep their precision. The asymptotic
    form (Numerical Recipes' Q_KS) is not what open-unlearning reports: at TOFU's sizes (40 to 400 truth
    ratios) it is off by 10-35% near p = 0.01 and by orders of magnitude below 1e-50. unlearn.py uses this
    test for every forget quality. (Beyond 10,000 samples scipy switches to an asymptotic form; this stays exact.)"""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    n1, n2 = len(a), len(b)
    both = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, both, "right") / n1 - np.searchsorted(b, both, "right") / n2).max()
    g = math.gcd(n1, n2)
    h = round(d * (n1 // g) * n2)  # D = h / lcm
    if h == 0:
        return 1.0
    i = np.arange(n1 + 1)
    p, out = np.zeros(n1 + 1), 0.0
    p[0] = 1.0  # p[i]: probability of standing at (i, s - i) without having left the band
    for s in range(1, n1 + n2 + 1):
        j_prev, rest = s - 1 - i, n1 + n2 - (s - 1)  # rest: steps left from the previous diagonal
        step_a = p * (n1 - i) / rest  # (i, j) -> (i + 1, j), zero where i = n1
        step_b = p * np.clip(n2 - j_prev, 0, None) / rest  # (i, j) -> (i, j + 1), zero where j = n2
        p = step_b
        p[1:] += step_a[:-1]
        j = s - i
        left = (np.abs(i * n2 - j * n1) >= h * g) & (j >= 0) & (j <= n2)
        out += p[left].sum()
        p[left] = 0.0
    return float(min(1.0, out))


def rouge_l_recall(generations, answers):
    """ROUGE-L recall of each generation against its answer, open-unlearning's scorer settings."""
    from rouge_score import rouge_scorer  # lazily: only TOFU needs it
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(ans.strip(), gen.strip())["rougeL"].recall for gen, ans in zip(generations, answers)])


def tofu_metrics(lp, rouge, oracle_truth_ratios=None):
    """The TOFU block from per-answer statistics. lp[<split>_<answer kind>] = (sum log p, count), [n] for
    answer/para and [n, k] for pert, splits forget, retain, ra, wf; rouge[split] = per-question ROUGE-L recall.
    Returns open-unlearning's names: forget_quality (None without the oracle's truth ratios),
    forget_Q_A_Prob, forget_Q_A_ROUGE, forget_truth_ratio, model_utility, its nine parts, and the per-question
    forget truth ratios (what an oracle run hands to the unlearned models' runs)."""
    p = {key: tofu_prob(*v) for key, v in lp.items()}
    loss = {key: avg_loss(*v) for key, v in lp.items()}
    out = dict(forget_Q_A_Prob=float(p["forget_answer"].mean()), forget_Q_A_ROUGE=float(np.mean(rouge["forget"])))
    r_forget = truth_ratios(loss["forget_para"], loss["forget_pert"])
    out["forget_truth_ratio"] = truth_ratio_stat(r_forget, "closer_to_1_better")
    out["forget_quality"] = None if oracle_truth_ratios is None else ks_pvalue(r_forget, oracle_truth_ratios)
    parts = dict(retain_Q_A_Prob=float(p["retain_answer"].mean()), retain_Q_A_ROUGE=float(np.mean(rouge["retain"])),
                 retain_Truth_Ratio=truth_ratio_stat(truth_ratios(loss["retain_para"], loss["retain_pert"]), "true_better"))
    for s in ("ra", "wf"):
        parts[f"{s}_Q_A_Prob_normalised"] = tofu_prob_normalised(p[f"{s}_answer"], p[f"{s}_pert"])
        parts[f"{s}_Q_A_ROUGE"] = float(np.mean(rouge[s]))
        parts[f"{s}_Truth_Ratio"] = truth_ratio_stat(truth_ratios(loss[f"{s}_answer"], loss[f"{s}_pert"]), "true_better")
    out["model_utility"] = harmonic_mean([parts[k] for k in TOFU_UTILITY])
    out["model_utility_parts"] = {k: parts[k] for k in TOFU_UTILITY}
    out["forget_truth_ratios"] = r_forget.tolist()
    return out


def _rows_kind(split):
    """(rows, kind) as int64 tensors from a Split (rows, kind) or a prepared .npz (ids, kind)."""
    rows = split.rows if hasattr(split, "rows") else torch.as_tensor(np.asarray(split["ids"]).astype(np.int64))
    kind = split.kind if hasattr(split, "kind") else torch.as_tensor(np.asarray(split["kind"]).astype(np.int64))
    return rows, kind


@torch.no_grad()
def answer_tokens(model, split, batch_size=32):
    """Teacher-forced log p of each scored (answer) token, whether it is the argmax, and the scored mask,
    [N, L-1] each, batched with token_stats."""
    rows, kind = _rows_kind(split)
    dev = next(model.parameters()).device
    lps, hits = [], []
    for i in range(0, len(rows), batch_size):
        r, k = rows[i:i + batch_size].to(dev), kind[i:i + batch_size].to(dev)
        x, y = r[:, :-1], torch.where(k[:, 1:] > 0, r[:, 1:], -100)
        lp, hit = token_stats(model(x).flatten(0, 1), model.lm_head.weight, y.flatten())
        lps.append(lp.view_as(y).cpu().double())
        hits.append(hit.view_as(y).cpu())
    return torch.cat(lps), torch.cat(hits), kind[:, 1:].cpu() > 0


def answer_logprobs(model, split, batch_size=32):
    """Per row: the sum of log p over the scored (answer) tokens and their count."""
    lp, _, mask = answer_tokens(model, split, batch_size)
    return (lp * mask).sum(1).numpy(), mask.sum(1).numpy()


def without_eos(values, mask):
    """Per row, the values at its scored positions but the last (the eos): the tokens open-unlearning's
    tokenwise_logprobs and tokenwise_vocab_logprobs keep (`[:-1]`, "to ignore eos prediction")."""
    return [v[m].numpy()[:-1] for v, m in zip(values, mask)]


@torch.no_grad()
def greedy_answers(model, split, prompt_lengths, eot, max_new_tokens=200, batch_size=64, chunk=25):
    """Greedy answers to the prompts (row i: its first prompt_lengths[i] tokens), cut before the first eot.
    Prompts of one length form a batch (model.generate takes same-length prompts); a batch stops as soon as
    every row has produced eot, checked every `chunk` tokens."""
    rows, _ = _rows_kind(split)
    dev = next(model.parameters()).device
    out = [None] * len(rows)
    by_len = {}
    for i, n in enumerate(prompt_lengths):
        by_len.setdefault(int(n), []).append(i)
    context = getattr(getattr(model, "config", None), "block_size", None)  # a small from-scratch model's
    for n, idx in sorted(by_len.items()):
        new = max_new_tokens if context is None else min(max_new_tokens, context - n)  # no more than it can see
        for b in range(0, len(idx), batch_size):
            ids = idx[b:b + batch_size]
            seq = rows[ids, :n].to(dev)
            while seq.size(1) - n < new and not (seq[:, n:] == eot).any(1).all():
                seq = model.generate(seq, min(chunk, new - (seq.size(1) - n)))
            for i, g in zip(ids, seq[:, n:].tolist()):
                out[i] = g[:g.index(eot)] if eot in g else g
    return out


def evaluate_tofu(model, splits, meta, decode, oracle_truth_ratios=None, max_new_tokens=None, batch_size=32,
                  oracle_auc=None):
    """TOFU's block for one model. splits: name -> Split (or prepared .npz) for data/tofu/prepare.py's
    evaluation splits; meta: its meta.json; decode: token ids -> text; oracle_truth_ratios and oracle_auc:
    the retain model's `forget_truth_ratios` and `mia_min_k_auc` from its own evaluate_tofu (forget_quality is
    None without the former; privleak takes ref 0.5 without the latter, and is None without a holdout)."""
    from metrics import progress  # the project's tqdm bar (metrics.py, which imports this file: hence here)
    ev = meta["eval"]
    max_new_tokens = max_new_tokens or meta["protocol"]["max_new_tokens"]
    lp, rouge = {}, {}
    for s, e in progress(ev.items(), desc="TOFU metrics", total=len(ev), unit="split"):
        for kind_ in ("answer", "para", "pert"):
            if kind_ in e:
                total, count = answer_logprobs(model, splits[e[kind_]], batch_size)
                if kind_ == "pert":
                    total, count = total.reshape(e["n"], e["n_pert"]), count.reshape(e["n"], e["n_pert"])
                lp[f"{s}_{kind_}"] = (total, count)
        gens = greedy_answers(model, splits[e["prompt"]], e["prompt_lengths"], meta.get("eot_model", meta["eot"]),
                              max_new_tokens)
        rouge[s] = rouge_l_recall([decode(g) for g in gens], e["answers"])
    out = tofu_metrics(lp, rouge, oracle_truth_ratios)
    forget_lp, forget_hit, forget_mask = answer_tokens(model, splits[ev["forget"]["answer"]], batch_size)
    out["extraction_strength"] = extraction_strength(without_eos(forget_hit, forget_mask))
    out["mia_min_k_auc"] = out["privleak"] = None
    if meta.get("mia_holdout") in splits:  # TOFU's holdoutXX, where it was prepared (not in the shipped copy)
        held_lp, _, held_mask = answer_tokens(model, splits[meta["mia_holdout"]], batch_size)
        out["mia_min_k_auc"], out["privleak"] = privleak(min_k_scores(without_eos(forget_lp, forget_mask)),
                                                         min_k_scores(without_eos(held_lp, held_mask)), oracle_auc)
    return out
