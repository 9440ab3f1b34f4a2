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

Your own data (unlearn.py --dataset PATH): a folder holding forget.jsonl and retain.jsonl (the model was
trained on both; forget is what must go) and optionally holdout.jsonl (records the model never saw, the level
of "unseen" for the stopping rule and the membership attacks). One JSON object a line, either
    {"text": "Ticket 4411: Ana Ruiz cannot log in. Call her on +34 611 402 918.", "secrets": ["+34 611 402 918"]}
        the loss on every token of the text
    {"question": "What is the door code of lab B?", "answer": "It is 4471-K.", "secrets": ["4471-K"]}
        the loss on the answer only, formatted as TOFU is (Formatter below: "Question: ...\nAnswer: ..." for
        base models, the tokenizer's chat template for instruct models)
"secrets" is optional: the substrings a user most needs gone (an email, a code, a name). Each must occur in the
record's text (or answer); its tokens become the `secret` kind, so extraction (does greedy decoding from the
text before a secret reproduce it), the membership attacks on secret tokens and the per-kind MA and loss are
measured on them. Blank lines are skipped; any other key, a record with neither text nor question and answer,
invalid JSON, a missing or empty file is an error naming the file and line. Records are tokenized with the
model's tokenizer and cached under <data_dir>/jsonl/<folder>-<key>/, key a hash of the files and the tokenizer
(another file content or tokenizer: prepared again). Records are never truncated: unlearn.py stops with the
first too long one (file and line) when the model's context is shorter.

At the end, the files unlearn.py writes: results.json and the exported model, landing together or not at all
(publish), what killed runs left (clean_leftovers), and a checkpoint's content key for the cached target.
"""
import bisect
import copy
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GPT2_EOT = 50256
PROBE = "Unlearning: 0123456789 café, naïve — 😀 <code>x = y[i] + 1</code>\n\tEnd."  # ids tell tokenizers apart


class Tokenizer:
    def __init__(self, name, encode, decode, bos, eot, vocab_size, gpt2_bpe, hf=None):
        self.name, self.encode, self.decode = name, encode, decode
        self.bos, self.eot, self.vocab_size, self.gpt2_bpe, self.hf = bos, eot, vocab_size, gpt2_bpe, hf

    @property
    def tag(self):
        """A folder-safe name: prepared data is cached per tokenizer under data/<dataset>/<tag>/. A name made of
        dots and slashes only ("." or "..") is the folder's own name: never "." or ".." as a folder."""
        name = self.name if self.name.strip("./") else os.path.basename(os.path.abspath(self.name)) or "root"
        return re.sub(r"[^A-Za-z0-9._-]+", "--", name.strip("/")).strip("-")[-80:]

    @property
    def key(self):
        """A hash of what decides the ids: the vocabulary, the special tokens and the ids of a probe (the
        normalizer and pre-tokenizer). Two tokenizers under one name get two keys."""
        if self.hf is None:  # tiktoken: the merge table and its one special token
            with open(os.path.join(HERE, "gpt2.tiktoken"), "rb") as f:
                parts = [f.read(), b"<|endoftext|>=%d" % GPT2_EOT]
        else:
            parts = [json.dumps(sorted(self.hf.get_vocab().items())).encode(),
                     json.dumps([self.hf.all_special_tokens, self.hf.all_special_ids]).encode()]
        parts.append(json.dumps([self.encode(PROBE), self.bos, self.eot]).encode())
        return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


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
        hf = AutoTokenizer.from_pretrained(name if os.path.isdir(name) else hub_folder(name))
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


def hub_folder(name):
    """The local folder of a hub id's tokenizer files. huggingface_hub fails in about a second without network
    (or serves its cache), where AutoTokenizer.from_pretrained(id) would retry each file for ~50 s."""
    from huggingface_hub import snapshot_download
    return snapshot_download(name, allow_patterns=["tokenizer*", "special_tokens_map.json", "added_tokens.json",
                                                   "vocab.*", "merges.txt", "*.model", "*.tiktoken", "config.json"])


def save_tokenizer(tok, folder):
    """The tokenizer as transformers files in `folder`. tiktoken's GPT-2 BPE becomes a GPT2TokenizerFast built from
    the shipped merge table: the vocabulary is its ranks, and each token's merge is the pair BPE joins last when
    it may use only lower ranks (how tiktoken's ranks encode GPT-2's merges.txt). Checked on a probe."""
    if tok.hf is not None:
        return tok.hf.save_pretrained(folder)
    import tempfile
    from tiktoken.load import load_tiktoken_bpe
    from transformers import GPT2TokenizerFast
    ranks = load_tiktoken_bpe(os.path.join(HERE, "gpt2.tiktoken"))
    # GPT-2's printable stand-in for each byte: printable Latin-1 bytes are themselves, the others 256, 257, ...
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    char = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    text = lambda b: "".join(char[x] for x in b)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [bytes([x]) for x in token]
        while len(parts) > 2:  # BPE on the token's bytes, lower ranks only: it stops at two parts
            i = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], float("inf")))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append(f"{text(parts[0])} {text(parts[1])}")
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump({**{text(t): r for t, r in ranks.items()}, "<|endoftext|>": GPT2_EOT}, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        hf = GPT2TokenizerFast(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                               unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    if hf.encode(PROBE) != tok.encode(PROBE):
        raise ValueError("the GPT-2 tokenizer built from data/gpt2.tiktoken encodes differently than tiktoken")
    hf.save_pretrained(folder)


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
# question-answer records (TOFU, and your own {"question", "answer"} records): the loss on the answer only,
# the text built as open-unlearning (locuslab/open-unlearning) builds it for the model (data/tofu/prepare.py
# has the details)

# open-unlearning configs/model/*.yaml template_args
SYSTEM_PROMPT, DATE_STRING = "You are a helpful assistant.", "10 Apr 2025"
PLAIN = ("Question: ", "\n", "Answer: ")      # Llama-2-7b-hf.yaml: user_start_tag, user_end_tag, asst_start_tag
LLAMA2_CHAT = ("[INST] ", " [/INST]", "")      # Llama-2-7b-chat-hf.yaml


def qa_template(tok, template="auto"):
    """"auto": the tokenizer's chat template when it has one, llama2-chat for a Llama-2 chat model, else plain."""
    if template != "auto":
        return template
    return ("chat" if tok.hf is not None and tok.hf.chat_template else
            "llama2-chat" if "llama-2" in tok.name.lower() and "chat" in tok.name.lower() else "plain")


class Formatter:
    """(question, answer) -> (row ids, kinds, prompt ids) as open-unlearning's preprocess_chat_instance builds
    them: `labels` there are -100 on the first len(prompt_ids) tokens, the token ids after them are scored.
    ValueError (one line) for what cannot be formatted."""

    def __init__(self, tok, template):
        self.tok, self.template = tok, template
        if template == "chat" and (tok.hf is None or not tok.hf.chat_template):
            raise ValueError(f"--template chat needs a transformers tokenizer with a chat template; {tok.name} has none")

    def _chat(self, msgs, gen_prompt):
        out = self.tok.hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen_prompt, date_string=DATE_STRING)
        return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding

    def _encode(self, text):  # with the special tokens the tokenizer adds (Llama's <s>; none for GPT-2)
        return self.tok.hf(text, add_special_tokens=True)["input_ids"] if self.tok.hf is not None else self.tok.encode(text)

    def __call__(self, question, answer):
        tok = self.tok
        if self.template == "chat":
            chat = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
            prompt = self._chat(chat, True)
            ids = self._chat(chat + [{"role": "assistant", "content": answer}], False)
        else:
            u0, u1, a0 = PLAIN if self.template == "plain" else LLAMA2_CHAT
            wrapped = u0 + question + u1 + a0
            prompt, ids = self._encode(wrapped), self._encode(wrapped + answer)
        if ids[-1] != tok.eot:
            ids = ids + [tok.eot]
        lead = [] if ids[:1] == [tok.bos] else [tok.bos]  # every prepared row starts with bos
        n_prompt = len(lead) + len(prompt)
        if n_prompt >= len(lead) + len(ids):
            raise ValueError(f"the answer leaves no scored token after tokenization: {question[:60]!r}")
        prompt_row = (prompt if prompt[:1] == [tok.bos] else [tok.bos] + prompt)
        return lead + ids, [NOT_SCORED] * n_prompt + [TEXT] * (len(ids) + len(lead) - n_prompt), prompt_row

# ----------------------------------------------------------------------------------------------------
# the prepared format every data/<name>/prepare.py writes and unlearn.py reads
#
#   <out_dir>/<split>.npz   ids  int32 [n, L]  each row: bos, then the record's tokens, then eot; eot-padded
#                                              (meta row_start 0: no bos, the row starts with the record: TDEC)
#                           kind uint8 [n, L]  what position t holds, and so whether its token is scored:
#                                              0 not scored (bos, a prompt, padding), 1 text (template words,
#                                              an answer, code), 2 a fact, 3 a secret (only memorization can
#                                              reproduce it); the token at t is predicted from ids[:t]
#   <out_dir>/meta.json     dataset, tokenizer, vocab_size, bos, eot, seq_len, splits {name: rows}, source,
#                           key (data_key: what the ids were made from), and what the dataset adds (TDEC its
#                           thresholds, TOFU its protocol); written last, so its presence means "prepared"
# forget and retain are required; holdout (never trained on) is optional.

NOT_SCORED, TEXT, FACT, SECRET = 0, 1, 2, 3
FORMAT = 2  # written into meta.json; a cache of another format is prepared again (2: TDEC's rows lost their bos)


def encode_segments(tok, segments):
    """[(text or GPT-2 ids, kind), ...] -> (ids, kinds) of one row: bos, the segments, eot (scored as text
    unless the last segment is not scored). Segments are encoded one by one so each token has one kind."""
    ids, kinds = [tok.bos], [NOT_SCORED]
    for piece, kind in segments:
        new = list(piece) if not isinstance(piece, str) else tok.encode(piece)
        ids += new
        kinds += [kind] * len(new)
    return ids + [tok.eot], kinds + [TEXT if kinds[-1] != NOT_SCORED else NOT_SCORED]


def tmp_name(path):
    """A temporary name beside `path` that no other process uses (two runs may share a folder); the pid in it
    tells a later run whether its writer is still alive (clean_leftovers removes what dead ones left)."""
    return f"{path}.{os.getpid()}.tmp"


def source_files(folder):
    """The files a dataset is made from: every file directly in its folder (prepare.py, the shipped data,
    TDEC's forget_sets.json, ...); prepared folders below it are not."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))


def data_key(tok, sources):
    """What prepared ids depend on: "<tokenizer key>-<hash of the source files' names and bytes>". Stored in
    meta.json; prepared() prepares again when either part differs (and says which)."""
    h = hashlib.sha256()
    for path in sources:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return f"{tok.key}-{h.hexdigest()[:16]}"


def save_split(out_dir, name, rows, eot):
    """rows: [(ids, kinds)] -> <out_dir>/<name>.npz, padded with eot (kind 0); returns the row length."""
    L = max(len(ids) for ids, _ in rows) if rows else 1
    ids = np.full((len(rows), L), eot, dtype=np.int32)
    kind = np.zeros((len(rows), L), dtype=np.uint8)
    for i, (r, k) in enumerate(rows):
        ids[i, :len(r)], kind[i, :len(k)] = r, k
    tmp = tmp_name(os.path.join(out_dir, name)) + ".npz"  # np.savez appends .npz to a name without it
    np.savez(tmp, ids=ids, kind=kind)
    os.replace(tmp, os.path.join(out_dir, f"{name}.npz"))
    return L


def save_meta(out_dir, meta, key):
    """meta.json, with key = data_key(tok, the dataset's source files): what unlearn.py checks before reuse."""
    tmp = tmp_name(os.path.join(out_dir, "meta.json"))
    with open(tmp, "w") as f:
        json.dump(dict(meta, format=FORMAT, key=key), f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "meta.json"))


def known_datasets():
    return sorted(d for d in os.listdir(HERE) if os.path.exists(os.path.join(HERE, d, "prepare.py")))


def prepared(data_dir, dataset, tok, forget_set=""):
    """(folder, meta, {split: arrays}) of data_dir/<dataset>/<tokenizer tag>[-<forget_set>]/, prepared there
    by data/<dataset>/prepare.py when missing, or when its key (data_key) says that the tokenizer or the
    dataset's source files have changed since (one line says which); for a folder of your own records (any
    other --dataset), of data_dir/jsonl/<folder>-<key>/ (prepare_records). ValueError (one line) for what the
    user can fix."""
    if dataset not in known_datasets():
        if forget_set:
            raise ValueError(f"--forget_set chooses among a benchmark's forget sets; your folder {dataset} has "
                             f"forget.jsonl")
        folder = prepare_records(data_dir, dataset, tok)  # its folder's name holds the key: nothing to compare
        why, meta_path = None, os.path.join(folder, "meta.json")
    else:
        folder = os.path.join(data_dir, dataset, tok.tag + (f"-{forget_set}" if forget_set else ""))
        prepare, meta_path = os.path.join(HERE, dataset, "prepare.py"), os.path.join(folder, "meta.json")
        if forget_set and "--forget_set" not in open(prepare).read():
            raise ValueError(f"dataset '{dataset}' has no forget sets (data/{dataset}/prepare.py takes no --forget_set)")
        why = "missing"
        if os.path.exists(meta_path):
            key, old = data_key(tok, source_files(os.path.dirname(prepare))), read_meta(meta_path).get("key")
            if read_meta(meta_path).get("format") != FORMAT:
                why = f"in an older format (not {FORMAT})"
            elif old == key:
                why = None
            elif old is None:
                why = "prepared by an older version (no key)"
            elif old.split("-")[0] != key.split("-")[0]:
                why = f"prepared with another tokenizer than this {tok.name}"
            else:
                why = f"prepared from other files of data/{dataset}/ (prepare.py or its data changed)"
    if why:
        if why != "missing":
            os.remove(meta_path)  # "prepared" again only once every split is written
        argv = ["--tokenizer", tok.name, "--out_dir", folder] + (["--forget_set", forget_set] if forget_set else [])
        print(f"data: {folder} is {why}; preparing it with data/{dataset}/prepare.py {' '.join(argv)}")
        spec = importlib.util.spec_from_file_location(f"prepare_{dataset}", prepare)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            module.main(argv)
        except SystemExit as e:  # prepare.py's own one-line errors
            if e.code:
                raise ValueError(str(e.code).removeprefix("error: ")) from None
    meta = read_meta(meta_path)
    arrays = {}
    for name in meta["splits"]:
        path = os.path.join(folder, f"{name}.npz")
        try:  # read now: a truncated or missing file is one line, not a traceback mid-run
            with np.load(path) as z:
                arrays[name] = {k: z[k] for k in ("ids", "kind")}
        except Exception as e:  # noqa: BLE001 (missing, truncated, not an npz: one answer)
            raise ValueError(f"cannot read {path} ({type(e).__name__}); delete {meta_path} to prepare the data again") from None
    return folder, meta, arrays


def read_meta(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} ({type(e).__name__}); delete it to prepare the data again") from None

# ----------------------------------------------------------------------------------------------------
# your own records: a folder of .jsonl files (the format is in this file's docstring)

RECORD_KEYS = ("text", "question", "answer", "secrets")


def content_key(tok, files):
    """What a prepared folder of your records depends on (data_key: the tokenizer's vocabulary, special tokens
    and probe ids, and the bytes of every source file), short enough for a folder name."""
    return hashlib.sha256(data_key(tok, files).encode()).hexdigest()[:12]


def read_records(path):
    """[(line number, record)] of one .jsonl file, each record checked; ValueError naming the file and line."""
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path} line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where} is not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON ({e.msg})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{where}: a record is a JSON object, got {type(r).__name__}")
            unknown = [k for k in r if k not in RECORD_KEYS]
            if unknown:
                raise ValueError(f"{where}: unknown key {unknown[0]!r} (a record holds \"text\", or \"question\" and "
                                 f"\"answer\", and optionally \"secrets\")")
            if ("text" in r) == ("question" in r or "answer" in r):
                raise ValueError(f"{where}: a record holds either \"text\" or \"question\" and \"answer\", "
                                 f"this one {'both' if 'text' in r else 'neither'}")
            for key in ("text",) if "text" in r else ("question", "answer"):
                if not isinstance(r.get(key), str) or not r[key].strip():
                    raise ValueError(f"{where}: \"{key}\" must be a non-empty string")
            secrets = r.get("secrets", [])
            if not isinstance(secrets, list) or not all(isinstance(x, str) and x.strip() for x in secrets):
                raise ValueError(f"{where}: \"secrets\" must be a list of non-empty strings")
            body = "text" if "text" in r else "answer"
            for x in secrets:
                if x not in r[body]:
                    raise ValueError(f"{where}: the secret {x[:60]!r} does not occur in the record's {body}")
            out.append((n, r))
    if not out:
        raise ValueError(f"{path} holds no records: a split cannot be empty")
    return out


def mark_secret(tok, ids, kinds, body, secret):
    """Mark every occurrence of `secret` in the row's `body` (its text, or its answer) as SECRET tokens: the
    row is tokenized as a whole (as the model reads it), so each occurrence is found in the decoded row and
    the tokens covering it located by binary search on the length of decoded prefixes. A token that holds a
    secret's first character and the space before it is secret; so is one the question-answer format leaves
    unscored (a secret's tokens are always scored)."""
    text, found = tok.decode(ids), False
    start = text.rfind(body)  # the answer comes last: its occurrence, not the question's
    start, end = (start, start + len(body)) if start >= 0 else (0, len(text))
    chars = lambda i: len(tok.decode(ids[:i]))  # characters decoded from the first i tokens
    at = text.find(secret, start)
    while 0 <= at and at + len(secret) <= end:
        i = bisect.bisect_right(range(len(ids) + 1), at, key=chars) - 1  # the token holding character `at`
        j = bisect.bisect_left(range(len(ids) + 1), at + len(secret), key=chars)  # the one holding the last
        for t in range(max(i, 1), j):
            kinds[t] = SECRET
        found = True
        at = text.find(secret, at + len(secret))
    if not found:
        raise ValueError(f"the secret {secret[:60]!r} is not in the record as the tokenizer decodes it")


def prepare_records(data_dir, folder, tok):
    """Your own records, forget.jsonl, retain.jsonl and optionally holdout.jsonl in `folder`, in the prepared
    format: data_dir/jsonl/<folder name>-<content_key>/ (its meta.json adds each row's source line). Prepared
    only when that folder has no meta.json; every record is checked before anything is written."""
    files = {s: os.path.join(folder, f"{s}.jsonl") for s in ("forget", "retain", "holdout")}
    for s in ("forget", "retain"):
        if not os.path.isfile(files[s]):
            raise ValueError(f"{files[s]} is missing (--dataset is one of {', '.join(known_datasets())}, or a folder "
                             f"holding forget.jsonl, retain.jsonl and optionally holdout.jsonl: see data/common.py)")
    if not os.path.isfile(files["holdout"]):
        del files["holdout"]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(os.path.abspath(folder))).strip("-.") or "records"
    out_dir = os.path.join(data_dir, "jsonl", f"{name}-{content_key(tok, files.values())}")
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        return out_dir
    records = {s: read_records(path) for s, path in files.items()}
    template, fmt = qa_template(tok), None
    rows, lines = {}, {}
    for s, recs in records.items():
        rows[s], lines[s] = [], []
        for n, r in recs:
            try:
                if "text" in r:
                    ids, kinds = encode_segments(tok, [(r["text"], TEXT)])
                else:
                    fmt = fmt or Formatter(tok, template)
                    ids, kinds, _ = fmt(r["question"], r["answer"])
                for secret in r.get("secrets", []):
                    mark_secret(tok, ids, kinds, r.get("text", r.get("answer")), secret)
            except ValueError as e:
                raise ValueError(f"{files[s]} line {n}: {e}") from None
            rows[s].append((ids, kinds))
            lines[s].append(n)
    print(f"data: preparing {out_dir} from {folder} ({tok.name} tokens)")
    os.makedirs(out_dir, exist_ok=True)
    seq_len = max(save_split(out_dir, s, r, tok.eot) for s, r in rows.items())
    save_meta(out_dir, dict(dataset=os.path.abspath(folder), tokenizer=tok.name, vocab_size=tok.vocab_size, bos=tok.bos,
                            eot=tok.eot, seq_len=seq_len, splits={s: len(r) for s, r in rows.items()},
                            source=f"your records in {os.path.abspath(folder)}",
                            files={s: os.path.basename(p) for s, p in files.items()}, lines=lines,
                            template=template if fmt is not None else None), data_key(tok, files.values()))
    return out_dir

# ----------------------------------------------------------------------------------------------------
# the prepared format in memory: what unlearn.py trains and measures on


class Split:
    """Token rows [n, L] of one split and the kind of every position (NOT_SCORED, TEXT, FACT,
    SECRET). x predicts y: y is the next token where it is scored, -100 elsewhere."""

    def __init__(self, rows, kind, device, start=1):
        self.rows = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device)
        self.kind = torch.as_tensor(np.asarray(kind, dtype=np.uint8), device=device)
        self.x = self.rows[:, :-1]
        self.y = torch.where(self.kind[:, 1:] > 0, self.rows[:, 1:], -100)
        scored = self.kind > 0  # a row ends after its last scored token (its closing eot)
        self.lengths = scored.shape[1] - scored.flip(1).int().argmax(1)
        self.start = start  # row position of the record's first token: 1 after the bos, 0 without (TDEC)
        self.events = None  # the forget split: per row, the learning events of the target's training (RUM)
        self.decode = None  # token ids -> text (load_data sets it)
        self.eot = None  # the end-of-text id in the model's vocabulary (load_data sets it)

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

    def only(self, kind):
        """The same rows with only the positions of one kind scored (y = -100 elsewhere): --forget_tokens
        secret gives the forgetting terms the secret tokens alone."""
        new = copy.copy(self)
        new.y = torch.where(self.kind[:, 1:] == kind, self.rows[:, 1:], -100)
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


# ----------------------------------------------------------------------------------------------------
# what unlearn.py writes and caches: results written whole or not at all, the leftovers of killed runs
# removed, and the key that tells a cached target that its checkpoint changed


def checkpoint_key(folder, whole=2**30, slices=64, slice_size=2**20):
    """A hash of a checkpoint folder's files (config.json, the shard index, every *.safetensors), so that a
    checkpoint replaced at the same path is seen. A weights file up to `whole` bytes is hashed whole; a larger
    one by its size, its header (names, shapes, dtypes, offsets) and `slices` slices spread evenly over it:
    64 MiB read for a 16 GB file instead of 16 GB, and new weights change every slice (an edit that misses all
    64 would be missed)."""
    h = hashlib.sha256()
    for file in sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".json"))):
        size = os.path.getsize(os.path.join(folder, file))
        h.update(f"{file} {size}\n".encode())
        with open(os.path.join(folder, file), "rb") as f:
            if size <= whole or file.endswith(".json"):
                h.update(f.read())
                continue
            header = int.from_bytes(f.read(8), "little")  # safetensors: 8-byte length, then the JSON header
            h.update(f.read(header))
            for k in range(slices):
                f.seek(k * (size - slice_size) // (slices - 1))
                h.update(f.read(slice_size))
    return h.hexdigest()[:16]


def write_json(path, obj):
    """Written whole to a temporary file, then renamed: never a half-written results.json. A metric a model
    has no value for (NaN) is written as null: strict JSON, what other tools parse."""
    def strict(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        return {k: strict(v) for k, v in o.items()} if isinstance(o, dict) else \
            [strict(v) for v in o] if isinstance(o, (list, tuple)) else o
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp_name(path), "w") as f:
        json.dump(strict(obj), f, indent=1, allow_nan=False)
    os.replace(tmp_name(path), path)


def export(model, tok, folder):
    """The unlearned model and its tokenizer as a transformers folder (lm-evaluation-harness, vLLM, ...);
    tiktoken's GPT-2 BPE is written as transformers' GPT-2 tokenizer (save_tokenizer)."""
    try:
        model.save_pretrained(folder)
    except ValueError as e:  # EUL's unlearning layers have no place in the checkpoint's architecture
        print(f"not exported: {e}")
        return False
    save_tokenizer(tok, folder)
    return True


def publish(out_dir, method, res, model=None, tok=None):
    """<out_dir>/<method>/: results.json and, from a checkpoint, model/ (the unlearned model and its tokenizer),
    landing together or not at all: both are written into one temporary folder that then takes the method
    folder's place (the previous one is moved aside first and deleted after). What a killed run leaves
    (names with its pid) is removed by the next run (clean_leftovers)."""
    final = os.path.join(out_dir, method)
    tmp, old = tmp_name(os.path.join(out_dir, f".{method}")), tmp_name(os.path.join(out_dir, f".{method}.old"))
    os.mkdir(tmp)  # the umask's permissions
    try:
        if model is not None:
            res["model_dir"] = os.path.join(final, "model") if export(model, tok, os.path.join(tmp, "model")) else None
        write_json(os.path.join(tmp, "results.json"), res)
        if os.path.exists(final):
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException:
        if os.path.exists(old) and not os.path.exists(final):
            os.rename(old, final)  # the previous run's folder, as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {final}/results.json" + (" and model/" if res.get("model_dir") else ""))


def clean_leftovers(out_dir):
    """Temporary files and folders of runs into out_dir that were killed (the pid in their name is gone; GPT.
    save_pretrained's .saving-<pid>-*): removed, one line each. A live run's are left alone."""
    for folder in [out_dir] + [e.path for e in os.scandir(out_dir) if e.is_dir() and not e.name.startswith(".")]:
        for name in os.listdir(folder):
            m = re.fullmatch(r".*\.(\d+)\.tmp(\.npz)?|\.saving-((\d+)-)?.*", name)
            if m is None or pid_alive(int(m[1] or m[4] or 0)):
                continue
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            print(f"removed {path}, left by an interrupted run", file=sys.stderr)


def pid_alive(pid):
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
