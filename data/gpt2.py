"""GPT-2's tokenizer (tiktoken) from the merge table shipped beside this file, so it never goes online.
The table data/gpt2.tiktoken comes from the MIT-licensed openai-whisper package."""
import os

import tiktoken


def encoding():
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex
    ranks = load_tiktoken_bpe(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2.tiktoken"))
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})
