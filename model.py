"""
One decoder-only transformer in one file, after nanoGPT's model.py, covering three checkpoint families:
  - GPT-2 (learned positions, LayerNorm, GELU, tied head, biases): the default GPTConfig, also trained from scratch;
  - GPT-Neo (GPT-2 plus alternating global / local attention, no 1/sqrt(d) attention scaling);
  - Llama (rotary positions with the checkpoint's theta and scaling, RMSNorm, SwiGLU, grouped-query attention).
A handful of GPTConfig fields choose between them; nothing else knows the family. On top, what unlearning needs:
  - forward() returns the final hidden states, not logits: the losses are computed by kernels/ straight
    from hidden states and the lm_head weight, so B*T*V logits never need to exist at once;
  - generate(): batched greedy decoding on a KV cache (extraction likelihood needs thousands of them);
  - LoRALinear: every attention and MLP linear can carry a low-rank adapter that can be added, merged
    and removed; adapters_off() switches every adapter off, so the model is its own θ0 reference;
  - from_pretrained() / save_pretrained(): transformers checkpoints (safetensors) in and out, without
    instantiating transformers' own model (the weights go straight into this one).
  - mixed_precision() (fp32 master weights), and at the end what running on N processes under torchrun
    needs (ranks, FSDP2 sharding, a batch shared among the ranks): unlearn.py imports them.
"""
import json
import math
import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 128         # longest context: learned positions' table, or a checkpoint's max positions
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    bias: bool = True             # biases of the norms and the MLP (GPT-2: everywhere; Llama: mlp_bias)
    # The defaults below are GPT-2; GPT-Neo and Llama checkpoints set them (see config_from_hf()).
    qkv_bias: bool | None = None  # biases of q, k, v; None: as `bias` (GPT-Neo has none, Llama: attention_bias)
    out_bias: bool | None = None  # bias of the attention output; None: as `bias` (Llama: attention_bias)
    fused_qkv: bool = True        # one c_attn linear for q, k, v (GPT-2); else q_proj, k_proj, v_proj
    n_kv_head: int | None = None  # grouped-query attention: heads of k and v; None: n_head
    head_dim: int | None = None   # None: n_embd // n_head
    n_inner: int | None = None    # MLP width; None: 4 * n_embd
    mlp: str = "gelu"             # "gelu": c_proj(gelu_tanh(c_fc x)); "swiglu": c_proj(silu(c_gate x) * c_fc x)
    norm: str = "layernorm"       # or "rmsnorm"
    norm_eps: float = 1e-5
    pos: str = "learned"          # "learned" (a wpe table) or "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    window: tuple = ()            # per layer: 0 = global attention, w > 0 = the last w positions only (GPT-Neo)
    attn_scale: float | None = None   # None: 1/sqrt(head_dim); GPT-Neo: 1.0
    tie_embeddings: bool = True   # lm_head shares wte's weight (GPT-2, GPT-Neo, Llama-3.2 1B/3B)


class LoRALinear(nn.Linear):
    """nn.Linear with an optional low-rank adapter (Hu et al. 2021): y = x W^T + b + s * x A^T B^T, s = alpha/r.

    B starts at zero so an added adapter leaves the function unchanged. FILA passes its own start A0, B0 (far
    from zero): the adapter's term is then s·(B·A − B0·A0), zero at the start, so W stays the target's own
    weight, where FILA's code moves it to W − s·B0·A0 (the same function; ours exact in any dtype: at the start
    the two products are the same numbers computed the same way, and adapters_off() is W itself). A and B are
    trained: fp32 whatever W's dtype (master weights; autocast computes the term in bf16 under --dtype bfloat16)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = self.lora_B = self.lora_A0 = self.lora_B0 = None
        self.scale, self.merged, self.adapters_on = 0.0, False, True

    def add_lora(self, rank, alpha, A=None, B=None):
        self.lora_A0 = self.lora_B0 = None  # a start other than B = 0 (FILA's) is kept and subtracted
        fp32 = dict(device=self.weight.device, dtype=torch.float32)
        if A is None:  # the usual LoRA start: A random, B zero
            A = torch.empty(rank, self.in_features, **fp32)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            B = torch.zeros(self.out_features, rank, **fp32)
        else:
            self.lora_A0, self.lora_B0 = A.detach().to(**fp32).clone(), B.detach().to(**fp32).clone()
        self.lora_A, self.lora_B = nn.Parameter(A.detach().to(**fp32).clone()), nn.Parameter(B.detach().to(**fp32).clone())
        self.scale, self.merged = alpha / rank, False

    def delta(self):
        """What the adapter adds to W: s·(B·A − B0·A0), fp32."""
        d = self.lora_B @ self.lora_A
        return self.scale * (d if self.lora_A0 is None else d - self.lora_B0 @ self.lora_A0)

    @torch.no_grad()
    def merge(self):  # fold the adapter into W: same function, no adapter cost at inference
        if not self.merged:
            self.weight.copy_(self.merged_weight())
            self.merged = True

    def remove_lora(self):  # drop the adapter (merge() first to keep what it learned)
        self.lora_A = self.lora_B = self.lora_A0 = self.lora_B0 = None
        self.scale, self.merged = 0.0, False

    def merged_weight(self):
        """W with the adapter folded in (in fp32, then the weight's dtype), leaving the layer as it is."""
        if self.lora_A is None or self.merged:
            return self.weight
        return (self.weight.float() + self.delta().float()).to(self.weight.dtype)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_A is None or self.merged == self.adapters_on:
            return y
        # on: W + s·(B·A − B0·A0), the term added unless merged into W already. Off: W as it was before the
        # adapter (taken back out if merged): adapters_off() is the θ0 of every adapter run, without a second copy
        term = F.linear(F.linear(x, self.lora_A), self.lora_B)
        if self.lora_A0 is not None:
            term = term - F.linear(F.linear(x, self.lora_A0), self.lora_B0)
        return y + (1.0 if self.adapters_on else -1.0) * self.scale * term


class RMSNorm(nn.Module):
    """Llama's norm: x / rms(x) * w, computed in fp32 and cast back before the weight, as transformers does."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def norm(config):
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_frequencies(config, device):
    """Rotary inverse frequencies theta^(-2i/d), in fp32, with the checkpoint's scaling.

    llama3 (Llama-3.1+): wavelengths shorter than original_max / high_freq_factor are kept (local detail),
    longer than original_max / low_freq_factor are divided by `factor` (stretched to the longer context),
    and those in between blend the two linearly in original_max / wavelength. linear: all divided by factor."""
    hd = config.head_dim or config.n_embd // config.n_head
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    s = config.rope_scaling or {}
    if s.get("rope_type") == "linear":
        inv = inv / s["factor"]
    elif s.get("rope_type") == "llama3":
        factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old / lo, inv / factor, torch.where(wavelen < old / hi, inv, blended))
    return inv


def rotate(x, cos, sin):
    """RoPE in the rotate-half layout of transformers' Llama (first and second halves of a head form the pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config, window=0):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head or config.n_head
        self.head_dim = config.head_dim or config.n_embd // config.n_head
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
        if config.fused_qkv:
            self.c_attn = LoRALinear(config.n_embd, q_dim + 2 * kv_dim, bias=qkv_bias)
        else:
            self.q_proj = LoRALinear(config.n_embd, q_dim, bias=qkv_bias)
            self.k_proj = LoRALinear(config.n_embd, kv_dim, bias=qkv_bias)
            self.v_proj = LoRALinear(config.n_embd, kv_dim, bias=qkv_bias)
        self.c_proj = LoRALinear(q_dim, config.n_embd, bias=config.bias if config.out_bias is None else config.out_bias)
        self.window, self.scale = window, config.attn_scale

    def forward(self, x, rope=None, mask=None, cache=None, pos=None):
        """mask: the keys each query sees [B|1, 1, T, keys], or None for plain causal attention over this call's
        T positions. cache: this layer's preallocated [k, v] (GPT.new_caches), written at the positions 0..T-1
        (pos None: prompts) or pos[b]..pos[b]+T-1 of row b, and then attended to as a whole, under the mask."""
        B, T, _ = x.size()
        if hasattr(self, "c_attn"):
            q, k, v = self.c_attn(x).split([self.n_head * self.head_dim] + 2 * [self.n_kv_head * self.head_dim], dim=2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))
        if rope is not None:  # cos, sin of each query's position
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None and pos is None:  # prompts: their keys go in at 0..T-1, attention as without a cache
            cache[0][:, :, :T], cache[1][:, :, :T] = k, v
        elif cache is not None:  # decoding, each row at its own position: no torch.cat, the cache never moves
            at = (pos[:, None] + torch.arange(T, device=x.device)).view(B, 1, T, 1).expand_as(k)
            k, v = cache[0].scatter_(2, at, k), cache[1].scatter_(2, at, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           scale=self.scale, enable_gqa=self.n_kv_head != self.n_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = LoRALinear(config.n_embd, inner, bias=config.bias)
        if config.mlp == "swiglu":
            self.c_gate = LoRALinear(config.n_embd, inner, bias=config.bias)
        self.c_proj = LoRALinear(inner, config.n_embd, bias=config.bias)

    def forward(self, x):
        if hasattr(self, "c_gate"):  # SwiGLU (Llama): a SiLU gate times a linear unit
            return self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x))
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's and GPT-Neo's "gelu_new"


class Block(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config, config.window[layer] if config.window else 0)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)
        self.adapter = None  # EUL's unlearning layer goes here (unlearn.py); None: a plain block
        self.adapters_on = True

    def forward(self, x, rope=None, mask=None, cache=None, pos=None):
        x = x + self.attn(self.ln_1(x), rope, mask, cache, pos)
        x = x + self.mlp(self.ln_2(x))
        return x if self.adapter is None or not self.adapters_on else x + self.adapter(x)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        if config.pos == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie()
        self.hf_config = None  # the checkpoint's config.json (a dict) when loaded by from_pretrained
        self.hf_generation_config = None  # and its generation_config.json, passed on by save_pretrained
        self.checkpointing = False  # activation checkpointing of every block in training forwards (full-weight runs)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def tie(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, caches=None, pos=None, blocks=None):
        """idx [B, T] -> final hidden states [B, T, C]; logits are lm_head(hidden).
        caches (generation): new_caches(), written by this call. pos None: idx holds positions 0..T-1 (training,
        a prompt); pos [B] (decoding): row b's tokens are at pos[b].., and see the cache's keys before them.
        blocks: run only the first `blocks` blocks and return the residual stream there, before any final
        norm (RMU reads and steers an inner layer; the blocks above it need not run)."""
        T = idx.size(1)
        assert T <= self.config.block_size, f"sequence of {T} > block size {self.config.block_size}"
        positions = torch.arange(T, device=idx.device)[None] if pos is None else pos[:, None] + torch.arange(T, device=idx.device)
        x, rope = self.transformer.wte(idx), None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(positions)
        else:
            cos, sin = self.rope_tables(T if caches is None else caches[0][0].size(2), idx.device, x.dtype)
            rope = cos[positions][:, None], sin[positions][:, None]  # [B|1, 1, T, head_dim]
        # the keys a query sees, built once for all layers: one mask per window size (0: global); none where
        # causal attention over 0..T-1 is the same, so that SDPA keeps its fast causal kernels
        masks = {}
        for w in set(self.config.window or (0,)):
            if pos is None and (w == 0 or T <= w):
                masks[w] = None
                continue
            j, p = torch.arange(T if pos is None else caches[0][0].size(2), device=idx.device), positions[..., None]
            masks[w] = ((j <= p) & (p - j < w) if w else j <= p)[:, None]  # [B|1, 1, T, keys]
        for i, block in enumerate(self.transformer.h[:blocks]):
            mask = masks[block.attn.window]
            if self.checkpointing and self.training and caches is None and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, mask, use_reentrant=False)  # recomputed in backward: memory for time
            else:
                x = block(x, rope, mask, None if caches is None else caches[i], pos)
        return x if blocks is not None else self.transformer.ln_f(x)

    def rope_tables(self, length, device, dtype):
        """RoPE's cos and sin [length, head_dim] of positions 0..length-1: computed in fp32 and cast to the
        activations' dtype (as transformers does), kept until a longer length, another device or dtype."""
        cached = getattr(self, "_rope", None)
        if cached is None or cached[0].size(0) < length or cached[0].device != device or cached[0].dtype != dtype:
            angles = torch.arange(length, device=device)[:, None].float() * rope_frequencies(self.config, device)[None]
            angles = torch.cat([angles, angles], dim=-1)
            self._rope = cached = angles.cos().to(dtype), angles.sin().to(dtype)
        return cached

    def new_caches(self, batch, length, like):
        """Preallocated keys and values [batch, n_kv_head, length, head_dim] per layer, in like's dtype and device;
        zeros, not empty: a masked key still enters SDPA's product, and 0 * NaN would be NaN."""
        assert length <= self.config.block_size, f"{length} positions > block size {self.config.block_size}"
        a = self.transformer.h[0].attn
        return [[like.new_zeros(batch, a.n_kv_head, length, a.head_dim) for _ in range(2)] for _ in self.transformer.h]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, beams=1):
        """Greedy continuation of a batch of same-length prompts idx [B, T] -> [B, T + max_new_tokens].
        The prompt is encoded once; each new token costs one position thanks to the KV cache.
        beams > 1: the best of `beams` beams by summed log-probability (ICU's 2-beam test), the caches
        reordered as beams are chosen; unlike transformers' beam search, <eot> does not end a beam early."""
        if beams > 1:
            return self.beam_search(idx, max_new_tokens, beams)
        B, T = idx.shape
        out = torch.cat([idx, idx.new_empty(B, max_new_tokens)], 1)
        weight = self.lm_head.weight
        caches = self.new_caches(B, T + max_new_tokens, weight)
        h, pos = self(idx, caches)[:, -1], torch.full((B,), T, device=idx.device)
        for i in range(T, T + max_new_tokens):
            out[:, i] = self.lm_head(h).argmax(-1)
            if i < T + max_new_tokens - 1:
                h = self(out[:, i:i + 1], caches, pos)[:, -1]
                pos += 1
        return out

    @torch.no_grad()
    def continue_prefixes(self, rows, row, start, steps, budget=None, progress=None):
        """Greedy continuations of many prefixes of the same rows (extraction likelihood: every prefix of every
        record): pair k continues rows[row[k], :start[k]] by steps[k] tokens -> [P, max(steps)] (-1 past each
        pair's steps). The tokens are those of generate() on each prefix, at a fraction of its cost:
          - one teacher-forced forward of each row: its KV cache holds every prefix's cache, and its hidden
            state at start - 1 gives each prefix's first token (generate() would re-encode every prefix);
          - then the pairs decode together, a pair a batch row, each at its own position (position ids,
            masks and windows as for its prefix alone), in chunks whose preallocated caches fit in `budget`
            bytes (default: a quarter of the free GPU memory, 1 GiB on the CPU): about max(steps)
            sequential decode steps per chunk instead of one generate() per prefix;
          - pairs sorted by steps, longest first, so that a chunk's finished pairs drop off its end.
        progress: a wrapper of the chunks' loop for a progress bar (metrics.progress)."""
        N, L = rows.shape
        assert int((start + steps).max()) <= L + 1 and int(start.min()) >= 1, "a pair's continuation must fit its row"
        weight = self.lm_head.weight
        if budget is None:
            budget = torch.cuda.mem_get_info(weight.device)[0] // 4 if weight.is_cuda else 1 << 30
        width = int((start + steps).max()) - 1  # positions a chunk's cache needs: the last token is never fed back
        pre = self.new_caches(N, L, weight)
        hidden = torch.cat([self(rows[i:i + 32], [[k[i:i + 32], v[i:i + 32]] for k, v in pre])
                            for i in range(0, N, 32)])  # the rows' own forward, their caches written
        order = steps.argsort(descending=True, stable=True)
        row, start, steps = row[order], start[order], steps[order]
        per_pair = sum(k.numel() + v.numel() for k, v in pre) // N * weight.element_size() * width // L
        chunk = max(1, budget // max(1, per_pair))
        out = torch.full((len(row), int(steps.max())), -1, dtype=rows.dtype, device=rows.device)
        n_steps = steps.tolist()
        chunks = range(0, len(row), chunk)
        for c in progress(chunks, desc="greedy continuations, chunks of prefixes", total=len(chunks)) if progress else chunks:
            r, pos, n = row[c:c + chunk], start[c:c + chunk].clone(), n_steps[c:c + chunk]
            caches = [[k[r, :, :width], v[r, :, :width]] for k, v in pre]  # a copy per pair, written in place from pos on
            tok = self.lm_head(hidden[r, pos - 1]).argmax(-1)
            out[c:c + len(r), 0] = tok
            for s in range(1, n[0]):
                live = sum(m > s for m in n)  # pairs that still need a token: a prefix of the chunk (sorted)
                h = self(tok[:live, None], [[k[:live], v[:live]] for k, v in caches], pos[:live])
                tok = self.lm_head(h[:, -1]).argmax(-1)
                out[c:c + live, s] = tok
                pos[:live] += 1
        return out[order.argsort()]

    @torch.no_grad()
    def beam_search(self, idx, max_new_tokens, beams):
        (N, T), weight = idx.shape, self.lm_head.weight
        caches = self.new_caches(N * beams, T + max_new_tokens, weight)
        h = self(idx.repeat_interleave(beams, 0), caches)[:, -1]
        pos = torch.full((N * beams,), T, device=idx.device)
        score = torch.full((N, beams), float("-inf"), device=idx.device)
        score[:, 0] = 0.0  # the beams start as copies: only the first may expand, or the top-k would pick twins
        out = idx.new_empty(N * beams, 0)
        for i in range(max_new_tokens):
            logp = self.lm_head(h).float().log_softmax(-1)  # [N*beams, V]
            V = logp.size(-1)
            score, top = (score.view(-1, 1) + logp).view(N, beams * V).topk(beams, dim=-1)  # sorted: beam 0 best
            sel = (torch.arange(N, device=top.device)[:, None] * beams + top // V).flatten()
            tok = (top % V).view(-1, 1)
            out = torch.cat([out[sel], tok], 1)
            caches = [[k[sel], v[sel]] for k, v in caches]  # each beam takes its parent's cache
            if i < max_new_tokens - 1:
                h = self(tok, caches, pos)[:, -1]
                pos += 1
        return torch.cat([idx, out.view(N, beams, -1)[:, 0]], 1)

    def lora_layers(self):
        """The linears LoRA adapts: every attention and MLP linear of every block (not wte/lm_head)."""
        return [m for m in self.transformer.h.modules() if isinstance(m, LoRALinear)]

    @contextmanager
    def adapters_off(self):
        """Within it, every LoRA adapter and every Block.adapter is off (merged ones are taken back out, FILA's
        start restored): the model as it was before its adapters, i.e. the frozen θ0 reference of an adapter
        run, without a second copy of the weights."""
        mods = self.lora_layers() + list(self.transformer.h)
        before = [m.adapters_on for m in mods]
        for m in mods:
            m.adapters_on = False
        try:
            yield self
        finally:
            for m, on in zip(mods, before):
                m.adapters_on = on

    # ------------------------------------------------------------------------- transformers checkpoints

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, device="cpu"):
        """A transformers checkpoint of model_type gpt2, gpt_neo or llama: a local folder (config.json and
        model.safetensors, or shards listed in model.safetensors.index.json) or a Hugging Face Hub id.
        Every bad input is a ValueError with a one-line message."""
        folder = resolve(name_or_path)
        hf = read_json(folder, "config.json")
        with torch.device("meta"):  # no memory and no random init for weights about to be overwritten
            model = cls(config_from_hf(hf))
        model = model.to(dtype).to_empty(device=device)
        model.tie()  # to_empty() makes new tensors, one per module: tie them again
        model.hf_config, model.hf_generation_config = hf, read_json(folder, "generation_config.json")
        from safetensors import safe_open  # ships with transformers
        if index := read_json(folder, "model.safetensors.index.json"):  # sharded
            files = sorted(set(index["weight_map"].values()))
        elif os.path.exists(os.path.join(folder, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise ValueError(f"{folder} has no model.safetensors (nor model.safetensors.index.json): "
                             f"only safetensors weights are read")
        wanted = {hf_name(n, hf["model_type"]): (n, p) for n, p in model.named_parameters()}  # tied: wte only
        with torch.no_grad():
            for file in files:
                with safe_open(os.path.join(folder, file), framework="pt", device=str(device)) as f:
                    for key in f.keys():
                        ours = key if key in wanted else "transformer." + key  # hub "gpt2" has no prefix
                        if ours not in wanted:
                            if not_a_weight(key, model.config):
                                continue
                            raise ValueError(f"{folder} holds {key}, which this model has no place for: "
                                             f"its config.json does not describe these weights")
                        name, p = wanted.pop(ours)
                        t = f.get_tensor(key)
                        if hf["model_type"] == "gpt2" and name.endswith(CONV1D):
                            t = t.t()  # GPT-2's Conv1D stores the transpose of nn.Linear's weight
                        if t.shape != p.shape:
                            raise ValueError(f"{key} has shape {tuple(t.shape)} in {folder}, expected {tuple(p.shape)}")
                        p.copy_(t)
        if wanted:
            raise ValueError(f"{folder} lacks {len(wanted)} weights, e.g. {next(iter(wanted))}")
        return model.eval()

    def save_pretrained(self, folder, dtype=None):
        """Write a transformers checkpoint (config.json, model.safetensors) to `folder`, with LoRA adapters merged
        on the way out (the model itself is left as it is). In `dtype`; default the checkpoint's own (its
        config.json's dtype: a bf16 Llama stays bf16 after an fp32-master run), else the model's. Written to
        a temporary folder first and renamed: never a half-written folder."""
        if any(b.adapter is not None for b in self.transformer.h):
            raise ValueError("save_pretrained: the model carries EUL unlearning layers (Block.adapter), "
                             "which a transformers checkpoint has no place for")
        hf = dict(self.hf_config or gpt2_config(self.config))
        own = hf.get("dtype") or hf.get("torch_dtype")
        dtype = dtype or (getattr(torch, own) if own in ("float32", "bfloat16", "float16") else self.lm_head.weight.dtype)
        model_type = hf["model_type"]
        hf["dtype"] = str(dtype).removeprefix("torch.")
        if "torch_dtype" in hf:
            hf["torch_dtype"] = hf["dtype"]
        tensors, seen = {}, set()
        with torch.no_grad():
            for mod_name, m in self.named_modules():
                for p_name, p in m.named_parameters(recurse=False):
                    if p_name in ("lora_A", "lora_B") or id(p) in seen:
                        continue  # adapters go in merged; a tied lm_head is wte (transformers ties it back)
                    seen.add(id(p))
                    name = f"{mod_name}.{p_name}"
                    t = m.merged_weight() if isinstance(m, LoRALinear) and p_name == "weight" else p
                    if model_type == "gpt2" and name.endswith(CONV1D):
                        t = t.t()
                    tensors[hf_name(name, model_type)] = t.detach().to(dtype).contiguous().cpu()
        from safetensors.torch import save_file
        folder = os.path.abspath(folder)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        # the pid tells a later run whether this one still lives (data/common.py's clean_leftovers); os.mkdir,
        # unlike tempfile.mkdtemp (mode 0700), gives the folder the umask's permissions
        tmp = os.path.join(os.path.dirname(folder), f".saving-{os.getpid()}-{os.urandom(4).hex()}")
        os.mkdir(tmp)
        try:
            save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            for file, content in (("config.json", hf), ("generation_config.json", self.hf_generation_config)):
                if content is not None:
                    with open(os.path.join(tmp, file), "w") as f:
                        json.dump(content, f, indent=2)
            if os.path.exists(folder):  # replace: the old one moves aside until the new one is in place
                os.rename(folder, tmp + ".old")
            os.rename(tmp, folder)
            shutil.rmtree(tmp + ".old", ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# ----------------------------------------------------------------------------- checkpoint formats

SUPPORTED = ("gpt2", "gpt_neo", "llama")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# our parameter names -> the checkpoint's: (top-level module renames, in-block module renames); the rest is equal
HF_NAMES = {
    "gpt2": ({}, {}),
    "gpt_neo": ({}, {"attn.q_proj": "attn.attention.q_proj", "attn.k_proj": "attn.attention.k_proj",
                     "attn.v_proj": "attn.attention.v_proj", "attn.c_proj": "attn.attention.out_proj"}),
    "llama": ({"transformer.wte": "model.embed_tokens", "transformer.h": "model.layers", "transformer.ln_f": "model.norm"},
              {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.q_proj": "self_attn.q_proj",
               "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj", "attn.c_proj": "self_attn.o_proj",
               "mlp.c_gate": "mlp.gate_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}),
}


def not_a_weight(key, config):
    """Checkpoint entries that are not weights, or not weights of their own: GPT-2's and GPT-Neo's causal-mask
    buffers (attn.bias, attn.masked_bias; attn.attention.* in GPT-Neo), Llama's rotary inv_freq buffer, and
    lm_head.weight when the head is tied to the embedding. Any other unread key is an error, never skipped."""
    return bool(re.search(r"(^|\.)attn(\.attention)?\.(bias|masked_bias)$|\.rotary_emb\.inv_freq$", key)) or \
        (key == "lm_head.weight" and config.tie_embeddings)


def hf_name(name, model_type):
    top, block = HF_NAMES[model_type]
    m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        return f"{top.get('transformer.h', 'transformer.h')}.{m[1]}.{block.get(m[2], m[2])}.{m[3]}"
    module, param = name.rsplit(".", 1)
    return f"{top.get(module, module)}.{param}"


def config_from_hf(c):
    """GPTConfig from a config.json dict; defaults are transformers' where a key is missing."""
    kind = c.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"model_type {kind!r} is not supported: only {', '.join(SUPPORTED)}")
    if kind == "llama":
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})  # transformers 5 / 4 spelling
        rope_type = rope.setdefault("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope scaling {rope_type!r} is not supported: only default, linear and llama3")
        rope.setdefault("original_max_position_embeddings", c.get("max_position_embeddings", 2048))
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {c['hidden_act']!r} is not supported: only silu (SwiGLU)")
        return GPTConfig(
            block_size=c.get("max_position_embeddings", 2048), vocab_size=c.get("vocab_size", 32000),
            n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"], n_embd=c["hidden_size"],
            n_kv_head=c.get("num_key_value_heads") or c["num_attention_heads"], head_dim=c.get("head_dim"),
            # transformers' LlamaAttention: attention_bias on q, k, v and o; LlamaMLP: mlp_bias on its three linears
            n_inner=c["intermediate_size"], bias=c.get("mlp_bias", False), qkv_bias=c.get("attention_bias", False),
            out_bias=c.get("attention_bias", False),
            fused_qkv=False, mlp="swiglu", norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6),
            pos="rope", rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
            rope_scaling=None if rope_type == "default" else rope, tie_embeddings=c.get("tie_word_embeddings", False))
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation {act!r} is not supported: only gelu_new (GELU, tanh approximation)")
    if kind == "gpt2" and (c.get("scale_attn_by_inverse_layer_idx") or not c.get("scale_attn_weights", True)):
        raise ValueError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
    if kind == "gpt2":
        return GPTConfig(block_size=c.get("n_positions", 1024), vocab_size=c.get("vocab_size", 50257),
                         n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], n_inner=c.get("n_inner"),
                         norm_eps=c.get("layer_norm_epsilon", 1e-5), tie_embeddings=c.get("tie_word_embeddings", True))
    layers = c.get("attention_layers") or [t for types, n in c["attention_types"] for _ in range(n) for t in types]
    return GPTConfig(  # GPT-Neo: GPT-2 with separate bias-free q, k, v, local layers, and no attention scaling
        block_size=c.get("max_position_embeddings", 2048), vocab_size=c.get("vocab_size", 50257),
        n_layer=c["num_layers"], n_head=c["num_heads"], n_embd=c["hidden_size"], n_inner=c.get("intermediate_size"),
        qkv_bias=False, fused_qkv=False, norm_eps=c.get("layer_norm_epsilon", 1e-5),
        # a local layer's query sees itself and the window_size - 1 positions before it
        window=tuple(c.get("window_size", 256) if t == "local" else 0 for t in layers),
        # Mesh-TensorFlow's GPT-Neo never divided q.k by sqrt(head_dim); its weights were trained that way
        attn_scale=1.0, tie_embeddings=c.get("tie_word_embeddings", True))


def gpt2_config(config):
    """config.json of a from-scratch model: it is a GPT-2 unless its fields say otherwise."""
    if GPTConfig(**{k: getattr(config, k) for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_inner",
                                                     "norm_eps")}) != config:
        raise ValueError("save_pretrained: a model built from scratch is written as a GPT-2, and this config is not one")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_inner": config.n_inner, "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": True, "bos_token_id": None,
            "eos_token_id": None}


def read_json(folder, file):
    path = os.path.join(folder, file)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)


def resolve(name_or_path):
    """A local folder, or the folder of a Hub download (config, generation config and safetensors only)."""
    if os.path.isdir(name_or_path):
        if not os.path.exists(os.path.join(name_or_path, "config.json")):
            raise ValueError(f"{name_or_path} has no config.json: not a transformers checkpoint folder")
        return name_or_path
    try:  # without network this fails in about a second (no retries), or serves the local cache
        from huggingface_hub import snapshot_download
        return snapshot_download(name_or_path, allow_patterns=["config.json", "generation_config.json",
                                                              "*.safetensors", "model.safetensors.index.json"])
    except Exception as e:  # noqa: BLE001 (offline, unknown id, gated repo, invalid name: all one answer)
        raise ValueError(f"cannot download {name_or_path!r} from the Hugging Face Hub ({type(e).__name__}); "
                         f"pass a local folder with config.json and *.safetensors instead") from None


# ----------------------------------------------------------------------------- mixed precision
# (Micikevicius et al. 2018): what trains keeps fp32 master weights; unlearn.autocast sets the compute dtype


def mixed_precision(model):
    """The parameters that train, in fp32: master weights, and AdamW's moments follow their dtype (16 bytes a
    trained parameter with its gradient). bf16 weights would round away any step below 2^-8 of the weight
    (an AdamW step of lr 5e-6 on a weight of 0.01). The frozen ones stay in the run's dtype (the LoRA and
    EUL base, θ0). Returns the trained parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # in place: tied weights (wte = lm_head) stay one parameter
    return params


# ----------------------------------------------------------------------------- running on N processes
# `torchrun --nproc_per_node N unlearn.py ...` is the same command on N processes (ranks).
# On one process every helper here is a no-op. Every rank reads θ0 itself (the checkpoint, or the cached
# target that rank 0 trains alone first: main_first) and runs the same evaluation, so each has every metric;
# the trained model is sharded by FSDP2 (full-weight methods: shard) or replicated (adapters, EUL's layers:
# their gradients added up by sync_grads); each step's batch is split across the ranks (share); rank 0
# alone prints and writes files.


def rank():
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def dist_setup(device):
    """Under torchrun (WORLD_SIZE > 1): one GPU per rank (nccl), or gloo on the CPU; ranks > 0 print nothing.
    More ranks than GPUs is a ValueError (unlearn.py tells it as a mistake in the input)."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n == 1:
        return
    if device.startswith("cuda"):
        if n > torch.cuda.device_count():
            raise ValueError(f"torchrun started {n} processes, but there are {torch.cuda.device_count()} GPUs: "
                             f"--nproc_per_node at most {torch.cuda.device_count()}")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # a long timeout: the other ranks wait at a barrier while rank 0 trains the target (main_first)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=6))
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")


@contextmanager
def main_first():
    """Rank 0 runs the block first (preparing the data, training and caching the target and the oracle: one
    process, the others wait), then the other ranks, which find its files and read them."""
    if rank() > 0:
        dist.barrier()
    yield
    if rank() == 0 and world() > 1:
        dist.barrier()


def agree(value):
    """Rank 0's value on every rank: the stopping rule's decisions, computed alike on every rank, must agree."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share(batch):
    """This rank's rows of a step's batch (rows rank, rank + N, ...). The losses divide by the whole batch's
    token and row counts (whole()), and the ranks' gradients are added up, so a step is one process's step.
    A rank left without rows (a batch smaller than N) computes one row with weight 0: every rank must run
    the forward and backward, whose collectives FSDP waits for."""
    mine = list(range(rank(), len(batch), world()))
    part = batch.take(mine or [0])
    part.whole = (int((batch.y != -100).sum()), len(batch))
    part.weight = 1.0 if mine else 0.0
    return part


def whole(batch):
    """(scored tokens, rows) of the batch a token or row mean divides by: the whole step's batch under torchrun."""
    return getattr(batch, "whole", None) or (int((batch.y != -100).sum()), len(batch))


def world_sum(x):
    """A tensor summed over the ranks (the step's loss, its tokens)."""
    if world() > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
    return x


def shard(model, dtype):
    """FSDP2 for a full-weight run: one fully_shard per block, then the root, so that each rank holds 1/N of
    the weights, gradients and AdamW moments and gathers one block's weights at a time. The compute runs in
    `dtype` (the run's), gradients are reduced in fp32 and summed (each rank's loss is its share, share())."""
    # cast_forward_inputs off: a cast would copy the KV caches, lists that the blocks fill in place (generate)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    mixed_precision(model)  # fp32 master weights, sharded: FSDP's form of what unlearn() does on one process
    for m in (*model.transformer.h, model):
        fully_shard(m, mp_policy=policy)
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a sum, then no division: gloo has no pre-scaled sum
    return model


def sync_grads(model, params):
    """Replicated training (adapters): add up the ranks' gradients, one all-reduce. FSDP did it already."""
    if world() == 1 or isinstance(model, FSDPModule):
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))


def gathered(model):
    """The whole model, for export: an FSDP model's full state dict gathered into a plain copy on rank 0's
    CPU (a collective: every rank calls it; None on the others); a replicated model as it is."""
    if not isinstance(model, FSDPModule):
        return model
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() > 0:
        return None
    with torch.device("meta"):
        plain = GPT(model.config)
    plain.load_state_dict(sd, assign=True)
    plain.tie()
    plain.hf_config, plain.hf_generation_config = model.hf_config, model.hf_generation_config
    return plain
