"""
A GPT-2 in one file, after nanoGPT's model.py, with what unlearning needs on top:
  - forward() returns the final hidden states, not logits: the losses are computed by kernels/ straight
    from hidden states and the lm_head weight, so B*T*V logits never need to exist at once;
  - generate(): batched greedy decoding on a KV cache (extraction likelihood needs thousands of them);
  - LoRALinear: every attention and MLP linear can carry a low-rank adapter that can be added, merged,
    unmerged and removed;
  - from_pretrained(): GPT-2 weights through `transformers`, imported only there.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 128
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    bias: bool = True


class LoRALinear(nn.Linear):
    """nn.Linear with an optional low-rank adapter (Hu et al. 2021): y = x W^T + b + s * x A^T B^T, s = alpha/r.

    B starts at zero so an added adapter leaves the function unchanged; FILA passes its own A and B
    (and has already moved W so that the sum is unchanged, see unlearn.py)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = self.lora_B = None
        self.scale, self.merged = 0.0, False

    def add_lora(self, rank, alpha, A=None, B=None):
        if A is None:  # the usual LoRA start: A random, B zero
            A = torch.empty(rank, self.in_features, device=self.weight.device)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            B = torch.zeros(self.out_features, rank, device=self.weight.device)
        self.lora_A, self.lora_B = nn.Parameter(A.to(self.weight)), nn.Parameter(B.to(self.weight))
        self.scale, self.merged = alpha / rank, False

    def delta(self):
        return self.scale * self.lora_B @ self.lora_A

    @torch.no_grad()
    def merge(self):  # fold the adapter into W: same function, no adapter cost at inference
        if not self.merged:
            self.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta()
            self.merged = False

    def remove_lora(self):  # drop the adapter (merge() first to keep what it learned)
        self.lora_A = self.lora_B = None
        self.scale, self.merged = 0.0, False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_A is not None and not self.merged:
            y = y + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)
        return y


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = LoRALinear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = LoRALinear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # cache = [k, v] of the positions before, extended in place
            if cache[0] is not None:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[0], cache[1] = k, v
        # causal within the new positions; they all see every cached position before them
        causal = k.size(2) == T and T > 1
        if not causal and T > 1:  # several new tokens after a cache: an explicit offset mask
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(k.size(2) - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = LoRALinear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = LoRALinear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.adapter = None  # EUL's unlearning layer goes here (unlearn.py); None: plain GPT-2 block

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x if self.adapter is None else x + self.adapter(x)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, caches=None):
        """idx [B, T] -> final hidden states [B, T, C]; logits are lm_head(hidden).
        caches: one [k, v] list per layer, filled and extended by this call (generation)."""
        start = 0 if caches is None or caches[0][0] is None else caches[0][0].size(2)
        T = idx.size(1)
        assert start + T <= self.config.block_size, f"sequence of {start + T} > block size {self.config.block_size}"
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if caches is None else caches[i])
        return self.transformer.ln_f(x)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        """Greedy continuation of a batch of same-length prompts idx [B, T] -> [B, T + max_new_tokens].
        The prompt is encoded once; each new token costs one position thanks to the KV cache."""
        caches = [[None, None] for _ in self.transformer.h]
        h = self(idx, caches)
        for i in range(max_new_tokens):
            nxt = self.lm_head(h[:, -1]).argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], dim=1)
            if i < max_new_tokens - 1:
                h = self(nxt, caches)
        return idx

    def lora_layers(self):
        """The linears LoRA adapts: every attention and MLP linear of every block (not wte/lm_head)."""
        return [m for m in self.transformer.h.modules() if isinstance(m, LoRALinear)]

    @torch.no_grad()
    def restrict_vocab(self, token_ids):
        """Keep only the embedding rows of `token_ids` (a dataset's own small vocabulary, see
        data/people/prepare.py), so a pretrained GPT-2 speaks the dataset's token ids."""
        wte = nn.Embedding(len(token_ids), self.config.n_embd).to(self.lm_head.weight)
        wte.weight.copy_(self.transformer.wte.weight[torch.as_tensor(token_ids)])
        self.transformer.wte, self.lm_head.weight = wte, wte.weight
        self.lm_head.out_features = self.config.vocab_size = len(token_ids)

    @classmethod
    def from_pretrained(cls, name_or_path="gpt2"):
        """GPT-2 weights ('gpt2', 'gpt2-medium', ... or a local folder) through transformers."""
        from transformers import GPT2LMHeadModel  # lazily: only this function needs transformers
        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        c = hf.config
        model = cls(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                              n_head=c.n_head, n_embd=c.n_embd, bias=True))
        sd, sd_hf = model.state_dict(), hf.state_dict()
        # HF's GPT-2 uses Conv1D, whose weight is the transpose of nn.Linear's
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k in sd:
                src = sd_hf[k].t() if k.endswith(transposed) else sd_hf[k]
                assert src.shape == sd[k].shape, f"{k}: {src.shape} vs {sd[k].shape}"
                sd[k].copy_(src)
        return model
