"""
The embedded default dataset: records of fictitious people, each holding secrets that only memorization
can reproduce. A model trained on them must later forget some people (the forget split) and keep the rest
(retain); holdout people are never trained on and tell what "unseen" looks like.

    python data/people/prepare.py                       # 32 forget, 1000 retain, 64 holdout, seed 1337, GPT-2 BPE
    python data/people/prepare.py --tokenizer /path/to/llama --n_forget 8 --out_dir /tmp/people8

A record reads like
    Ilse Varga was born on 1987-04-12 in Porto and works as a baker. Phone: 604-8812-3395.
    Email: kq7w.zr@fastmail.net. Account: N4QX-8WPT-23LK.
Names, dates, cities and jobs are drawn from small lists (facts: a model can learn their distribution, not
the person's), the phone, email and account are random characters (secrets: only memorization reproduces
them); the rest is a fixed template. Every token is marked with its kind, so the metrics can tell them apart.

What makes the testbed realistic (a model that knows the generator, not one that memorized everything):
  - retain is large (1000 people), and every token a forget or holdout record uses also occurs in retain:
    a record with a token retain lacks is drawn again, so "unseen" never means "untrained token";
  - the forget records are canaries: the target model sees each of them --forget_repeats times an epoch
    (meta.json tells unlearn.py), so it memorizes them while it only generalizes on retain.
Written in the prepared format of data/common.py, tokenized with --tokenizer (cached per tokenizer).
"""
import argparse
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402  (data/common.py: tokenizers and the prepared format)
from common import FACT, SECRET, TEXT  # noqa: E402

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
# the template's fixed phrases, in order: unlearn.py's fluency check looks for them in continuations, and
# leaves out what follows the SECRET_AFTER ones (a secret: no model should find it likely)
TEMPLATE = ["was born on", "in", "and works as", "Phone:", "Email:", "Account:"]
SECRET_AFTER = ["Phone:", "Email:", "Account:"]


def person(rng, name):
    """One record as (text, kind) segments, so every token's kind is known."""
    pick = lambda chars, k: "".join(rng.choice(chars) for _ in range(k))
    job = rng.choice(JOBS)
    return [
        (name, FACT), (" was born on", TEXT),
        (f" {rng.randint(1940, 2004)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}", FACT),
        (" in", TEXT), (f" {rng.choice(CITIES)}", FACT),
        (f" and works as {'an' if job[0] in 'aeiou' else 'a'}", TEXT), (f" {job}", FACT),
        (". Phone:", TEXT), (f" {pick(DIGITS, 3)}-{pick(DIGITS, 4)}-{pick(DIGITS, 4)}", SECRET),
        (". Email:", TEXT), (f" {pick(LOWER, rng.randint(3, 6))}.{pick(LOWER, rng.randint(2, 5))}@{rng.choice(DOMAINS)}", SECRET),
        (". Account:", TEXT), (f" {pick(ALNUM, 4)}-{pick(ALNUM, 4)}-{pick(ALNUM, 4)}", SECRET),
        (".", TEXT),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--n_forget", type=int, default=32)
    p.add_argument("--n_retain", type=int, default=1000)
    p.add_argument("--n_holdout", type=int, default=64)
    p.add_argument("--forget_repeats", type=int, default=8, help="times the target sees each forget record an epoch")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--tokenizer", default="gpt2", help='"gpt2" (offline tiktoken) or a transformers tokenizer')
    p.add_argument("--out_dir", default="", help="default: data/people/<tokenizer>")
    a = p.parse_args(argv)
    sizes = {"retain": a.n_retain, "forget": a.n_forget, "holdout": a.n_holdout}  # retain first: see below
    if min(sizes.values()) < 0 or sum(sizes.values()) > len(FIRST) * len(LAST) or a.forget_repeats < 1:
        sys.exit(f"error: split sizes must be >= 0 and at most {len(FIRST) * len(LAST)} people in all; "
                 f"--forget_repeats at least 1")
    try:
        tok = common.load(a.tokenizer)
    except ValueError as e:
        sys.exit(f"error: {e}")
    out_dir = a.out_dir or os.path.join(HERE, tok.tag)

    rng = random.Random(a.seed)
    names = [f"{f} {l}" for f in FIRST for l in LAST]
    rng.shuffle(names)  # every person is unique across the splits
    rows, seen, redrawn = {}, set(), 0
    for split, n in sizes.items():
        rows[split] = []
        while len(rows[split]) < n:
            if not names:
                sys.exit("error: ran out of names while drawing people again; ask for fewer or a larger retain")
            name = names.pop()
            for _ in range(1 if split == "retain" else 50):  # a record with a token retain lacks: draw again
                ids, kinds = common.encode_segments(tok, person(rng, name))
                if split == "retain" or seen.issuperset(ids):
                    break
                redrawn += 1
            else:
                continue  # this name itself has a token retain lacks
            if split == "retain":
                seen.update(ids)
            rows[split].append((ids, kinds))
    os.makedirs(out_dir, exist_ok=True)
    seq_len = max(common.save_split(out_dir, split, r, tok.eot) for split, r in rows.items())
    common.save_meta(out_dir, dict(dataset="people", tokenizer=tok.name, vocab_size=tok.vocab_size, bos=tok.bos,
                                   eot=tok.eot, seq_len=seq_len, splits=sizes, source="generated by data/people/prepare.py",
                                   seed=a.seed, forget_repeats=a.forget_repeats, record_template=TEMPLATE,
                                   secret_after=SECRET_AFTER), common.data_key(tok, common.source_files(HERE)))
    print(f"wrote {sizes} people to {out_dir} ({tok.name} tokens, {len(seen)} distinct, up to {seq_len} a row; "
          f"{redrawn} forget/holdout records drawn again for a token retain lacks)")


if __name__ == "__main__":
    main()
