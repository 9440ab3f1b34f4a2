"""
The embedded default dataset: records of fictitious people, each holding secrets that only memorization
can reproduce. A model trained on them must later forget some people (the forget split) and keep the rest
(retain); holdout people are never trained on and tell what "unseen" looks like.

    python data/people/prepare.py                       # 32 forget, 320 retain, 64 holdout, seed 1337
    python data/people/prepare.py --n_forget 8 --seed 7 --out_dir /tmp/people8

A record reads like
    Ilse Varga was born on 1987-04-12 in Porto and works as a baker. Phone: 604-8812-3395.
    Email: kq7w.zr@fastmail.net. Account: N4QX-8WPT-23LK.
Names, dates, cities and jobs are drawn from small lists (a model can only guess them), the phone, email
and account are random characters (a model can only have memorized them).

Tokens are GPT-2's (tiktoken, loaded offline by data/gpt2.py), renumbered densely: the model's
vocabulary is the few thousand GPT-2 tokens the records use (meta.json maps them back), which keeps a
from-scratch model small enough for a CPU. Written like nanoGPT's prepare.py files:
    {forget,retain,holdout}.bin   uint16 [n_records, seq_len], each row <eot> record <eot>, <eot>-padded
    meta.json                     vocabulary, sizes, lengths, secret positions, format regex
"""
import argparse
import json
import os
import random
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from gpt2 import encoding  # noqa: E402  (data/gpt2.py: GPT-2's tokenizer, offline)

FIRST = ("Ada Alma Anton Aria Boris Carla Dario Dina Elif Emil Esra Farah Felix Greta Hana Hugo Ilse Ines "
         "Ivan Jonas Kai Kira Lars Lena Luca Maya Milo Nadia Nils Noor Olga Oskar Pavel Rosa Rui Sami Sara "
         "Selma Taro Tess Ugo Vera Wim Yara Yusuf Zoe").split()
LAST = ("Abara Berg Castro Dahl Ekman Ferro Gallo Haas Ibsen Jansen Kowal Lind Moreau Nagy Okafor Petrov "
        "Quinn Rossi Sato Tanaka Ueda Varga Weber Xu Young Zubiri Moretti Novak Silva Holm").split()
CITIES = ("Porto Lyon Turin Graz Ghent Malmo Cork Split Brno Lodz Bergen Basel Aarhus Bilbao Leeds Tartu "
          "Riga Pisa Utrecht Kyoto Osaka Quito Lima Perth Hobart Dakar Accra Tunis Izmir Sapporo").split()
JOBS = ("baker nurse welder pilot teacher plumber chemist florist tailor cashier editor farmer lawyer "
        "dentist carpenter librarian surgeon jeweler translator architect").split()
DOMAINS = ("fastmail.net", "mailbox.org", "proton.me", "posteo.de", "tutanota.com")
ALNUM, LOWER, DIGITS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789", "abcdefghijkmnopqrstuvwxyz23456789", "0123456789"
# what a well-formed record looks like (unlearn.py's fluency check reads it from meta.json)
FORMAT = (r"[A-Z][a-z]+ [A-Z][a-z]+ was born on \d{4}-\d{2}-\d{2} in [A-Z][a-z]+ and works as an? [a-z]+\. "
          r"Phone: \d{3}-\d{4}-\d{4}\. Email: [a-z0-9]+\.[a-z0-9]+@[a-z]+\.[a-z]+\. Account: [A-Z0-9]{4}-[A-Z0-9]{4}-[A-Z0-9]{4}\.")


def person(rng, name):
    """One record as (text, secret) pieces: the secrets are kept apart so their token positions are known."""
    pick = lambda chars, k: "".join(rng.choice(chars) for _ in range(k))
    job = rng.choice(JOBS)
    date = f"{rng.randint(1940, 2004)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return [
        (f"{name} was born on {date} in {rng.choice(CITIES)} and works as {'an' if job[0] in 'aeiou' else 'a'} {job}. Phone:", False),
        (f" {pick(DIGITS, 3)}-{pick(DIGITS, 4)}-{pick(DIGITS, 4)}", True),
        (". Email:", False),
        (f" {pick(LOWER, rng.randint(3, 6))}.{pick(LOWER, rng.randint(2, 5))}@{rng.choice(DOMAINS)}", True),
        (". Account:", False),
        (f" {pick(ALNUM, 4)}-{pick(ALNUM, 4)}-{pick(ALNUM, 4)}", True),
        (".", False),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--n_forget", type=int, default=32)
    p.add_argument("--n_retain", type=int, default=320)
    p.add_argument("--n_holdout", type=int, default=64)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out_dir", default=HERE)
    a = p.parse_args(argv)
    sizes = {"forget": a.n_forget, "retain": a.n_retain, "holdout": a.n_holdout}
    if min(sizes.values()) < 0 or sum(sizes.values()) > len(FIRST) * len(LAST):
        sys.exit(f"error: split sizes must be >= 0 and at most {len(FIRST) * len(LAST)} people in all")

    rng = random.Random(a.seed)
    names = [f"{f} {l}" for f in FIRST for l in LAST]
    rng.shuffle(names)  # every person is unique across the splits
    enc = encoding()
    eot = enc.eot_token

    records, secrets = {}, {}
    for split, n in sizes.items():
        names_split, names = names[:n], names[n:]
        records[split], secrets[split] = [], []
        for name in names_split:
            toks, spans = [eot], []
            for text, secret in person(rng, name):
                ids = enc.encode(text)
                if secret:
                    spans.append([len(toks), len(toks) + len(ids)])  # [start, end) in the row
                toks += ids
            records[split].append(toks + [eot])
            secrets[split].append(spans)

    vocab = sorted({t for recs in records.values() for r in recs for t in r})  # GPT-2 ids, densely renumbered
    dense = {t: i for i, t in enumerate(vocab)}
    seq_len = max(len(r) for recs in records.values() for r in recs)
    os.makedirs(a.out_dir, exist_ok=True)
    for split, recs in records.items():
        arr = np.full((len(recs), seq_len), dense[eot], dtype=np.uint16)
        for i, r in enumerate(recs):
            arr[i, :len(r)] = [dense[t] for t in r]
        tmp = os.path.join(a.out_dir, f"{split}.bin.tmp")
        arr.tofile(tmp)
        os.replace(tmp, os.path.join(a.out_dir, f"{split}.bin"))
    meta = dict(vocab=vocab, eot=dense[eot], seq_len=seq_len, sizes=sizes, seed=a.seed,
                lengths={s: [len(r) for r in recs] for s, recs in records.items()},
                secrets=secrets, format=FORMAT)
    tmp = os.path.join(a.out_dir, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, os.path.join(a.out_dir, "meta.json"))  # written last: its presence means "prepared"
    print(f"wrote {sizes} people to {a.out_dir}: vocab {len(vocab)} of GPT-2's tokens, {seq_len} tokens a row")


if __name__ == "__main__":
    main()
