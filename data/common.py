"""
What every dataset shares: one small tokenizer interface for the prepare.py scripts and unlearn.py, and the
prepared format (below). The tokenizers, over the two kinds a user meets:

    load("gpt2")                        GPT-2's BPE through tiktoken, from the merge table shipped beside
                                        this file (data/gpt2.tiktoken, from the MIT-licensed openai-whisper
                                        package), so it never goes online
    load("EleutherAI/gpt-neo-125m")     any checkpoint's own tokenizer: transformers.AutoTokenizer from a hub
    load("/path/to/a/checkpoint")       id or a local folder (transformers is imported only then)

Each gives encode(text) -> ids (no special tokens added), decode(ids) -> text, `bos` (the token every row
starts with: the tokenizer's BOS, or its end-of-text for GPT-2-style tokenizers that have none), `eot`
(end of text), `vocab_size`, `name` and `gpt2_bpe` (true when ids are GPT-2's: TDEC's samples are stored as
GPT-2 ids and are used as they are then). `hf` is the transformers tokenizer, or None for tiktoken.
"""
import copy
import importlib.util
import json
import os
import re
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GPT2_EOT = 50256


class Tokenizer:
    def __init__(self, name, encode, decode, bos, eot, vocab_size, gpt2_bpe, hf=None):
        self.name, self.encode, self.decode = name, encode, decode
        self.bos, self.eot, self.vocab_size, self.gpt2_bpe, self.hf = bos, eot, vocab_size, gpt2_bpe, hf

    @property
    def tag(self):
        """A folder-safe name: prepared data is cached per tokenizer under data/<dataset>/<tag>/."""
        return re.sub(r"[^A-Za-z0-9._-]+", "--", self.name.strip("/")).strip("-")[-80:]


def gpt2():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex
    ranks = load_tiktoken_bpe(os.path.join(HERE, "gpt2.tiktoken"))
    enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": GPT2_EOT})
    return Tokenizer("gpt2", enc.encode_ordinary, enc.decode, GPT2_EOT, GPT2_EOT, enc.n_vocab, True)


def load(name):
    """"gpt2" (offline tiktoken) or a transformers tokenizer; raises ValueError with one line if it cannot load."""
    if name == "gpt2":
        return gpt2()
    try:
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # a missing folder, no network, no tokenizer files: one line for the user
        raise ValueError(f"cannot load the tokenizer of '{name}' ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"pass a local folder with the checkpoint's tokenizer files") from None
    eot = hf.eos_token_id
    if eot is None:
        raise ValueError(f"the tokenizer of '{name}' has no end-of-sequence token")
    bos = hf.bos_token_id if hf.bos_token_id is not None else eot
    # GPT-2's BPE under another name (GPT-Neo, Pythia's is not): same vocabulary size and the same ids for a probe
    probe = "Hello world, 1234 tokens!"
    gpt2_bpe = len(hf) == GPT2_EOT + 1 and hf.encode(probe, add_special_tokens=False) == gpt2().encode(probe)
    return Tokenizer(name, lambda s: hf.encode(s, add_special_tokens=False),
                     lambda ids: hf.decode(ids, skip_special_tokens=False), bos, eot, len(hf), gpt2_bpe, hf)


# ----------------------------------------------------------------------------------------------------
# what the benchmarks' prepare.py scripts share


def fail(msg):
    """A prepare.py's one-line error: exit status 1, no traceback (unlearn.py reports the line as it is)."""
    sys.exit(f"error: {msg}")


def data_folder(here, shipped, download, use_download):
    """(folder, source) of a benchmark's original files: the copy shipped beside its prepare.py (`shipped`
    describes it), or with --download a fresh one written by download(dest) into <here>/downloaded/."""
    if not use_download:
        return here, shipped
    folder = os.path.join(here, "downloaded")
    try:
        return folder, download(folder)
    except Exception as e:
        fail(f"download failed ({type(e).__name__}: {str(e)[:200]}); the shipped copy is used without --download")

# ----------------------------------------------------------------------------------------------------
# the prepared format every data/<name>/prepare.py writes and unlearn.py reads
#
#   <out_dir>/<split>.npz   ids  int32 [n, L]  each row: bos, then the record's tokens, then eot; eot-padded
#                           kind uint8 [n, L]  what position t holds, and so whether its token is scored:
#                                              0 not scored (bos, a prompt, padding), 1 text (template words,
#                                              an answer, code), 2 a fact, 3 a secret (only memorization can
#                                              reproduce it); the token at t is predicted from ids[:t]
#   <out_dir>/meta.json     dataset, tokenizer, vocab_size, bos, eot, seq_len, splits {name: rows}, source,
#                           and what the dataset adds (TDEC its thresholds, TOFU its protocol); written last,
#                           so its presence means "prepared"
# forget and retain are required; holdout (never trained on) is optional.

NOT_SCORED, TEXT, FACT, SECRET = 0, 1, 2, 3


def encode_segments(tok, segments):
    """[(text or GPT-2 ids, kind), ...] -> (ids, kinds) of one row: bos, the segments, eot (scored as text
    unless the last segment is not scored). Segments are encoded one by one so each token has one kind."""
    ids, kinds = [tok.bos], [NOT_SCORED]
    for piece, kind in segments:
        new = list(piece) if not isinstance(piece, str) else tok.encode(piece)
        ids += new
        kinds += [kind] * len(new)
    return ids + [tok.eot], kinds + [TEXT if kinds[-1] != NOT_SCORED else NOT_SCORED]


def save_split(out_dir, name, rows, eot):
    """rows: [(ids, kinds)] -> <out_dir>/<name>.npz, padded with eot (kind 0); returns the row length."""
    L = max(len(ids) for ids, _ in rows) if rows else 1
    ids = np.full((len(rows), L), eot, dtype=np.int32)
    kind = np.zeros((len(rows), L), dtype=np.uint8)
    for i, (r, k) in enumerate(rows):
        ids[i, :len(r)], kind[i, :len(k)] = r, k
    tmp = os.path.join(out_dir, f"{name}.tmp.npz")
    np.savez(tmp, ids=ids, kind=kind)
    os.replace(tmp, os.path.join(out_dir, f"{name}.npz"))
    return L


def save_meta(out_dir, meta):
    tmp = os.path.join(out_dir, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "meta.json"))


def prepared(data_dir, dataset, tok, forget_set=""):
    """(folder, meta, {split: arrays}) of data_dir/<dataset>/<tokenizer tag>[-<forget_set>]/, prepared there
    first by data/<dataset>/prepare.py when missing. ValueError (one line) for what the user can fix."""
    folder = os.path.join(data_dir, dataset, tok.tag + (f"-{forget_set}" if forget_set else ""))
    if not os.path.exists(os.path.join(folder, "meta.json")):
        prepare = os.path.join(HERE, dataset, "prepare.py")
        if not os.path.exists(prepare):
            known = sorted(d for d in os.listdir(HERE) if os.path.exists(os.path.join(HERE, d, "prepare.py")))
            raise ValueError(f"dataset '{dataset}' is missing ({folder}/meta.json not found) and data/{dataset}/"
                             f"prepare.py does not exist; known datasets: {', '.join(known)}")
        argv = ["--tokenizer", tok.name, "--out_dir", folder] + (["--forget_set", forget_set] if forget_set else [])
        print(f"data: preparing {folder} with data/{dataset}/prepare.py {' '.join(argv)}")
        spec = importlib.util.spec_from_file_location(f"prepare_{dataset}", prepare)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            module.main(argv)
        except SystemExit as e:  # prepare.py's own one-line errors
            if e.code:
                raise ValueError(str(e.code).removeprefix("error: ")) from None
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    return folder, meta, {name: np.load(os.path.join(folder, f"{name}.npz")) for name in meta["splits"]}

# ----------------------------------------------------------------------------------------------------
# the prepared format in memory: what unlearn.py trains and measures on


class Split:
    """Token rows [n, L] of one split and the kind of every position (NOT_SCORED, TEXT, FACT,
    SECRET). x predicts y: y is the next token where it is scored, -100 elsewhere."""

    def __init__(self, rows, kind, device):
        self.rows = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device)
        self.kind = torch.as_tensor(np.asarray(kind, dtype=np.uint8), device=device)
        self.x = self.rows[:, :-1]
        self.y = torch.where(self.kind[:, 1:] > 0, self.rows[:, 1:], -100)
        scored = self.kind > 0  # a row ends after its last scored token (its closing eot)
        self.lengths = scored.shape[1] - scored.flip(1).int().argmax(1)
        self.events = None  # the forget split: per row, the learning events of the target's training (RUM)
        self.decode = None  # token ids -> text (load_data sets it)

    def __len__(self):
        return len(self.rows)

    def take(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        new = copy.copy(self)
        for k in ("rows", "kind", "x", "y", "lengths"):
            setattr(new, k, getattr(self, k)[idx.to(self.rows.device)])
        if self.events is not None:
            new.events = {k: v[idx] for k, v in self.events.items()}
        return new

    def secrets(self):
        """Per row, the [start, end) spans of secret tokens (kind 3): what only memorization reproduces."""
        out = []
        for row in (self.kind == SECRET).int().tolist():
            edges = np.flatnonzero(np.diff([0] + row + [0]))
            out.append(edges.reshape(-1, 2).tolist())
        return out




def cat(*splits):
    """One split made of several (forget ∪ retain is what the target model is trained on)."""
    new = copy.copy(splits[0])
    L = max(s.rows.size(1) for s in splits)  # splits may differ in row length
    pad = lambda t, v, n: torch.nn.functional.pad(t, (0, n - t.size(1)), value=v)
    new.rows = torch.cat([pad(s.rows, 0, L) for s in splits])  # any token: padding is never scored, and causal
    new.kind = torch.cat([pad(s.kind, 0, L) for s in splits])
    new.x, new.y = new.rows[:, :-1], torch.cat([pad(s.y, -100, L - 1) for s in splits])
    new.lengths = torch.cat([s.lengths for s in splits])
    new.events = None
    return new
