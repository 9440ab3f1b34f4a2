"""
TOFU (Maini et al. 2024): 200 fictitious authors x 20 question-answer pairs. A model fine-tuned on all of them
(full) must forget 1, 5 or 10% of the authors (forget01/05/10) and keep the rest (retain99/95/90); the retain
model, trained on retainYY only, is the reference. Formatted as open-unlearning (locuslab/open-unlearning)
formats TOFU for the model, in the prepared format of data/common.py, one folder per tokenizer.

    python data/tofu/prepare.py                                  # forget10 / retain90, GPT-2, plain format
    python data/tofu/prepare.py --forget_set forget01 --tokenizer /path/to/Llama-3.2-1B-Instruct
    python data/tofu/prepare.py --download                       # read the hub's locuslab/TOFU instead

Each row is one question-answer record: the prompt is not scored (kind 0), the answer and the end-of-sequence
token after it are (kind 1): the loss on the answer only. How the text is built (common.Formatter, after
open-unlearning's src/data/utils.py preprocess_chat_instance, with the model's configs/model/*.yaml template_args):
  plain  base models and GPT-2: "Question: " + q + "\\n" + "Answer: " + a, tokenized as one string (with the
         tokenizer's special tokens), then eos; the prompt is "Question: q\\nAnswer: " tokenized alone, and
         the first len(prompt) tokens are not scored. (Joint tokenization can merge the prompt's last space
         into the answer's first token, which is then not scored either: open-unlearning does the same.)
  chat   instruct models: tokenizer.apply_chat_template([system "You are a helpful assistant.", user q,
         assistant a]) with date_string "10 Apr 2025" (their Llama-3.x-Instruct configs); the prompt is the
         same chat without the answer and with the generation prompt.
  llama2-chat  "[INST] " + q + " [/INST]" + a (their Llama-2-7b-chat-hf config: no chat template).

Splits: forget (forgetXX), retain (retainYY, forget + retain = full, the target's training data), and the
evaluation splits TOFU's metrics need (see meta.json "eval"): for forgetXX_perturbed, retain_perturbed,
real_authors_perturbed and world_facts_perturbed, `<name>_answer` (question + answer), `<name>_para`
(question + paraphrased answer; forget and retain only), `<name>_pert` (question + each perturbed answer:
row i*k + j is record i's j-th) and `<name>_prompt` (the generation prompt alone, for ROUGE).
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402  (data/common.py: tokenizers and the prepared format)
from common import DATE_STRING, NOT_SCORED, SYSTEM_PROMPT, Formatter, fail  # noqa: E402  (Formatter: the
# question-answer text for the model, shared with your own {"question", "answer"} records)

FORGET = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
ROWS = {"full": 4000, "forget01": 40, "forget05": 200, "forget10": 400, "retain99": 3960, "retain95": 3800,
        "retain90": 3600, "forget01_perturbed": 40, "forget05_perturbed": 200, "forget10_perturbed": 400,
        "retain_perturbed": 400, "real_authors_perturbed": 100, "world_facts_perturbed": 117,
        "holdout01": 40, "holdout05": 200, "holdout10": 400}
HOLDOUT = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}  # privleak's non-members
HUB_URL = "https://huggingface.co/datasets/locuslab/TOFU/resolve/main/{name}.json"
# The protocol: a fixed budget, not the threshold rule. open-unlearning's unlearning runs
# (configs/experiment/unlearn/tofu/default.yaml) take 10 epochs, lr 1e-5, weight decay 0.01, 1 warm-up
# epoch; its fine-tuning of the full and retain models (configs/experiment/finetune/tofu/default.yaml) and
# FILA's TOFU runs take 5.
PROTOCOL = dict(rule="fixed budget", epochs=5, lr=1e-5, weight_decay=0.01, warmup_epochs=1,
                source="5 epochs: open-unlearning configs/experiment/finetune/tofu/default.yaml:15 (target and retain "
                       "model) and FILA's TOFU runs; open-unlearning's unlearning default is 10 "
                       "(configs/experiment/unlearn/tofu/default.yaml:47): pass --epochs 10 to match it",
                open_unlearning_unlearn_epochs=10, max_new_tokens=200, eval_batch_size=32)


def download(dest):
    """The hub's locuslab/TOFU files (JSON lines) into dest/. Needs network access; this machine has none, so
    this path is written, not run."""
    import urllib.request
    os.makedirs(dest, exist_ok=True)
    for name in ROWS:
        with urllib.request.urlopen(HUB_URL.format(name=name), timeout=60) as r:
            data = r.read()
        with open(os.path.join(dest, f"{name}.json.tmp"), "wb") as f:
            f.write(data)
    for name in ROWS:
        os.replace(os.path.join(dest, f"{name}.json.tmp"), os.path.join(dest, f"{name}.json"))
    return f"downloaded from {HUB_URL.format(name='*')}"


def read(folder, name, optional=False):
    """One split's records, checked: present, whole (the known row count), every record with an answer.
    optional: None when the file is absent (TOFU's holdout splits are not in the shipped copy)."""
    path = os.path.join(folder, f"{name}.json")
    if not os.path.exists(path):
        if optional:
            return None
        fail(f"{path} is missing (restore it from git, or run with --download)")
    recs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                fail(f"{path} line {n} is not valid JSON: truncated? restore it from git or --download")
            if not isinstance(r.get("question"), str) or not r["question"].strip():
                fail(f"{path} line {n}: a record without a question")
            if not isinstance(r.get("answer"), str) or not r["answer"].strip():
                fail(f"{path} line {n}: a record without an answer")
            if name.endswith("_perturbed") and (not isinstance(r.get("perturbed_answer"), list) or not r["perturbed_answer"]
                                                or not all(isinstance(x, str) and x.strip() for x in r["perturbed_answer"])):
                fail(f"{path} line {n}: a record without perturbed answers")
            recs.append(r)
    if len(recs) != ROWS[name]:
        fail(f"{path} has {len(recs)} records, expected {ROWS[name]}: truncated? restore it from git or --download")
    return recs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--forget_set", "--split", dest="forget_set", default="forget10", help="forget01 | forget05 | forget10")
    p.add_argument("--tokenizer", default="gpt2", help='"gpt2" (offline tiktoken) or a transformers tokenizer')
    p.add_argument("--template", default="auto", help="auto | plain | chat | llama2-chat (auto: the tokenizer's chat "
                   "template when it has one, llama2-chat for a Llama-2 chat model, else plain)")
    p.add_argument("--out_dir", default="", help="default: data/tofu/<tokenizer>")
    p.add_argument("--download", action="store_true", help="read the hub's locuslab/TOFU (into data/tofu/downloaded/)")
    a = p.parse_args(argv)
    if a.forget_set not in FORGET:
        fail(f"unknown forget set '{a.forget_set}'; valid: {', '.join(FORGET)}")
    if a.template not in ("auto", "plain", "chat", "llama2-chat"):
        fail(f"unknown template '{a.template}'; valid: auto, plain, chat, llama2-chat")
    retain_set = FORGET[a.forget_set]
    shipped = "shipped copy in data/tofu/ (see PROVENANCE.md; reassembled, not byte-verified against the hub)"
    folder, source = common.data_folder(HERE, shipped, download, a.download)
    evals = {"forget": f"{a.forget_set}_perturbed", "retain": "retain_perturbed",
             "ra": "real_authors_perturbed", "wf": "world_facts_perturbed"}
    recs = {s: read(folder, s) for s in ["full", a.forget_set, retain_set, *evals.values()]}
    if recs[retain_set] + recs[a.forget_set] != recs["full"]:
        fail(f"{retain_set} followed by {a.forget_set} is not full: the files do not belong together")
    try:
        tok = common.load(a.tokenizer)
    except ValueError as e:
        fail(str(e))
    template = common.qa_template(tok, a.template)
    try:
        fmt = Formatter(tok, template)
    except ValueError as e:
        fail(str(e))
    out_dir = a.out_dir or os.path.join(HERE, tok.tag)

    rows = {"forget": [fmt(r["question"], r["answer"])[:2] for r in recs[a.forget_set]],
            "retain": [fmt(r["question"], r["answer"])[:2] for r in recs[retain_set]]}
    # privleak's non-members (open-unlearning's holdout_split): formatted as the forget answers; where the
    # file is absent (the shipped copy has none, see PROVENANCE.md) privleak is not computed, and said so
    holdout = read(folder, HOLDOUT[a.forget_set], optional=True)
    if holdout is not None:
        rows["holdout_answer"] = [fmt(r["question"], r["answer"])[:2] for r in holdout]
    else:
        print(f"{HOLDOUT[a.forget_set]}.json is not in {folder}: no privleak (TOFU's holdout splits are not shipped; "
              f"--download reads them from the hub)")
    meta_eval = {}
    for key, name in evals.items():
        rs = recs[name]
        k = len(rs[0]["perturbed_answer"])
        if any(len(r["perturbed_answer"]) != k for r in rs):
            fail(f"{name}: records have different numbers of perturbed answers")
        ans = [fmt(r["question"], r["answer"]) for r in rs]
        rows[f"{key}_answer"] = [x[:2] for x in ans]
        rows[f"{key}_prompt"] = [(x[2], [NOT_SCORED] * len(x[2])) for x in ans]
        rows[f"{key}_pert"] = [fmt(r["question"], x)[:2] for r in rs for x in r["perturbed_answer"]]
        block = dict(source_split=name, n=len(rs), n_pert=k, answer=f"{key}_answer", pert=f"{key}_pert",
                     prompt=f"{key}_prompt", prompt_lengths=[len(x[2]) for x in ans],
                     answers=[r["answer"] for r in rs])
        if key in ("forget", "retain"):
            if any(not isinstance(r.get("paraphrased_answer"), str) or not r["paraphrased_answer"].strip() for r in rs):
                fail(f"{name}: a record without a paraphrased answer")
            rows[f"{key}_para"] = [fmt(r["question"], r["paraphrased_answer"])[:2] for r in rs]
            block["para"] = f"{key}_para"
        meta_eval[key] = block

    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        os.remove(os.path.join(out_dir, "meta.json"))  # "prepared" again only once every split is written
    seq_len = max(common.save_split(out_dir, name, r, tok.eot) for name, r in rows.items())
    common.save_meta(out_dir, dict(
        dataset="tofu", tokenizer=tok.name, vocab_size=tok.vocab_size, bos=tok.bos, eot=tok.eot, seq_len=seq_len,
        splits={name: len(r) for name, r in rows.items()}, source=source, forget_set=a.forget_set,
        retain_set=retain_set, template=template, system_prompt=SYSTEM_PROMPT if template == "chat" else None,
        date_string=DATE_STRING if template == "chat" else None, holdout=None, protocol=PROTOCOL, eval=meta_eval,
        mia_holdout="holdout_answer" if holdout is not None else None,
        oracle=f"the model trained on {retain_set} only (open-unlearning/tofu_<model>_{retain_set} on the hub)"),
        common.data_key(tok, common.source_files(HERE)))
    print(f"wrote TOFU {a.forget_set} / {retain_set} ({len(rows['forget'])} / {len(rows['retain'])} records) and "
          f"the evaluation splits to {out_dir} ({tok.name} tokens, {template} format, up to {seq_len} a row; "
          f"source: {source})")


if __name__ == "__main__":
    main()
