"""The small transformer family that ``strategies.Arch`` describes (one ``nn.Module`` per option).

Each class reads its options from the arch (a frozen dataclass, see ``strategies.Arch``): token or image
inputs (a strided convolution cuts patches), learned / fixed-table / rotary / ALiBi positions, attention by
``F.scaled_dot_product_attention`` or written out with ``torch.einsum``, kv heads repeated as transformers does
or one kv head broadcast by ``expand``, a dense MLP or a mixture of experts (router, softmax, ``topk``, a
dense scatter of the chosen weights), and blocks stored as one list of blocks or as parallel lists
(``ln1[i]``, ``attn[i]``, ``ln2[i]``, ``mlp[i]``).

Beyond the hand-ruled ops (issue 21): an aten op growir derives its rule for (``BLOCK_OPS``) inside the MLP,
complex rotary (``torch.polar`` / ``view_as_complex``, as Meta's Llama code) and a sinusoidal table computed at
construction (a non-persistent buffer, as Marian's), and layer types per block (``Arch.layer_types``): full or
sliding-window attention, or an SSM mixer (a causal depthwise convolution and a selective scan written with
``cumsum`` / ``exp`` over a segment sum, as Mamba's torch path).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_LEN = 16  # learned position table size (the longest sequence an arch accepts)
FIXED_LEN = 6  # a fixed position table fixes the sequence at this length (token inputs)
IMAGE = 8  # images are IMAGE x IMAGE, 3 channels


class RMSNorm(nn.Module):
    """RMSNorm written out as pow / mean / rsqrt / mul, as Llama-style code does."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(arch, d: int) -> nn.Module:
    return nn.LayerNorm(d, bias=arch.bias) if arch.norm == "layer" else RMSNorm(d)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_complex(x, freqs_cis):
    """Meta's rotary: pairs (2i, 2i+1) read as one complex number, times ``e^{i pos f_i}``."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis).flatten(-2).type_as(x)


def rotate(x, rope):
    """Rotary on the first ``cos.shape[-1]`` dimensions (twice the complex table's); the rest (partial rotary)
    pass through."""
    if isinstance(rope, torch.Tensor):  # complex
        n = 2 * rope.shape[-1]
        if n == x.shape[-1]:
            return rotate_complex(x, rope)
        return torch.cat((rotate_complex(x[..., :n], rope), x[..., n:]), dim=-1)
    cos, sin = rope
    if cos.shape[-1] == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., : cos.shape[-1]], x[..., cos.shape[-1]:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, t: int, device):
        pos = torch.arange(t, device=device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]  # torch.outer has no growir rule
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class ComplexRotary(Rotary):
    """The rotary table as complex numbers of modulus 1 (``torch.polar``), as Llama-1's ``freqs_cis``."""

    def forward(self, t: int, device):
        freqs = torch.arange(t, device=device, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        return torch.polar(torch.ones_like(freqs), freqs)


def sinusoid_table(n: int, d: int) -> torch.Tensor:
    """The (n, d) sin/cos position table of "Attention is all you need", a function of the width ``d``."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    angle = pos / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    return torch.cat((angle.sin(), angle.cos()), dim=-1)[:, :d]


def alibi_slopes(heads: int) -> torch.Tensor:
    """One slope per head, as Bloom/MPT compute them from the head count (a per-head constant)."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])


class Attention(nn.Module):
    def __init__(self, arch, window: int = 0):
        super().__init__()
        self.arch, self.window = arch, window  # window > 0: each query sees its last ``window`` keys
        d, hd, h, kv = arch.hidden, arch.head_dim, arch.heads, arch.kv_heads
        if arch.fused_qkv:
            self.qkv = nn.Linear(d, (h + 2 * kv) * hd, bias=arch.bias)
        else:
            self.q = nn.Linear(d, h * hd, bias=arch.bias)
            self.k = nn.Linear(d, kv * hd, bias=arch.bias)
            self.v = nn.Linear(d, kv * hd, bias=arch.bias)
        self.o = nn.Linear(h * hd, d, bias=arch.bias)
        if arch.qk_norm:
            self.q_norm, self.k_norm = make_norm(arch, hd), make_norm(arch, hd)
        if arch.positions == "alibi":
            self.register_buffer("slopes", alibi_slopes(h), persistent=False)

    def project(self, x):
        a = self.arch
        b, t, _ = x.shape
        if a.fused_qkv:
            q, k, v = self.qkv(x).split([a.heads * a.head_dim, a.kv_heads * a.head_dim,
                                         a.kv_heads * a.head_dim], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        if a.literal_views:
            q = q.view(b, t, a.heads, a.head_dim).transpose(1, 2)
            k = k.view(b, t, a.kv_heads, a.head_dim).transpose(1, 2)
            v = v.view(b, t, a.kv_heads, a.head_dim).transpose(1, 2)
        else:
            q, k, v = (z.view(b, t, -1, a.head_dim).transpose(1, 2) for z in (q, k, v))
        return q, k, v

    def repeat_kv(self, k, v):
        a = self.arch
        if a.kv_heads == a.heads:
            return k, v
        b, _, t, hd = k.shape
        if a.kv_repeat == "expand":  # one kv head broadcast to every query head
            return k.expand(b, a.heads, t, hd), v.expand(b, a.heads, t, hd)
        rep = a.heads // a.kv_heads  # transformers' repeat_kv
        k = k[:, :, None].expand(b, a.kv_heads, rep, t, hd).reshape(b, a.heads, t, hd)
        v = v[:, :, None].expand(b, a.kv_heads, rep, t, hd).reshape(b, a.heads, t, hd)
        return k, v

    def scores_bias(self, t: int, device):
        """(additive bias or None, causal mask): ALiBi's per-head linear bias, and True above the diagonal."""
        pos = torch.arange(t, device=device)
        causal = pos[None, :] > pos[:, None]
        if self.window:
            causal = causal | (pos[:, None] - pos[None, :] >= self.window)
        if self.arch.positions != "alibi":
            return None, causal
        dist = (pos[None, :] - pos[:, None]).to(torch.float32)
        return self.slopes[:, None, None] * dist, causal

    def forward(self, x, rope=None):
        a = self.arch
        b, t, _ = x.shape
        q, k, v = self.project(x)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        k, v = self.repeat_kv(k, v)
        bias, causal = self.scores_bias(t, x.device)
        if a.attention == "einsum":
            s = torch.einsum("bhqd,bhkd->bhqk", q, k) * (a.head_dim ** -0.5)
            s = (s if bias is None else s + bias).masked_fill(causal, float("-inf"))
            y = torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)
        elif bias is None and not self.window:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif bias is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal.logical_not())
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(causal, float("-inf")))
        y = y.transpose(1, 2).reshape(b, t, a.heads * a.head_dim if a.literal_views else -1)
        return self.o(y)


class SSM(nn.Module):
    """A Mamba-like mixer: in_proj to (x, z), a causal depthwise conv over the sequence, a selective scan
    ``h_t = exp(A dt_t) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t`` written with a segment sum of
    ``cumsum(A dt)`` (Mamba's torch path), gated by ``silu(z)``, and out_proj."""

    def __init__(self, arch, state: int = 2, rank: int = 2):
        super().__init__()
        inner, self.state, self.rank = 2 * arch.hidden, state, rank
        self.in_proj = nn.Linear(arch.hidden, 2 * inner, bias=arch.bias)
        self.conv = nn.Conv1d(inner, inner, 3, groups=inner, padding=2)
        self.x_proj = nn.Linear(inner, rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(rank, inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, inner + 1, dtype=torch.float32) / inner))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, arch.hidden, bias=arch.bias)

    def forward(self, x, rope=None):
        t = x.shape[1]
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv(x.transpose(1, 2))[..., :t].transpose(1, 2))  # causal: the first t outputs
        dt, B, C = self.x_proj(x).split([self.rank, self.state, self.state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # (b, t, inner)
        L = torch.cumsum(-torch.exp(self.A_log) * dt, dim=1)  # log of the decay from 0 to t, per channel
        pos = torch.arange(t, device=x.device)
        future = (pos[None, :] > pos[:, None])[None, :, :, None]  # (1, t, s, 1): s after t
        decay = (L[:, :, None] - L[:, None]).masked_fill(future, float("-inf")).exp()  # (b, t, s, inner)
        cb = torch.einsum("btn,bsn->bts", C, B)
        y = torch.einsum("btsi,bsi->bti", cb[..., None] * decay, dt * x) + self.D * x
        return self.out_proj(y * F.silu(z))


def block_op(name: str, h):
    """``BLOCK_OPS[name]`` on the MLP's hidden activations ``h`` (batch, seq, ffn); "" is none."""
    return BLOCK_OPS[name](h) if name else h


# ops with a derived rule (growir/analysis/ops.py), and two hand-ruled reorders; each keeps the model defined
BLOCK_OPS = {
    "logaddexp": lambda h: torch.logaddexp(h, 0.5 * h),
    "fmax": lambda h: torch.fmax(h, 0.1 * h),  # a leaky ReLU
    "atan": torch.atan,
    "xlogy": lambda h: torch.xlogy(h.sigmoid(), h.sigmoid() + 1),
    "diff": lambda h: torch.diff(h, dim=1, prepend=torch.zeros_like(h[:, :1])),  # along the sequence
    "logcumsumexp": lambda h: torch.logcumsumexp(h, dim=1),  # causal, along the sequence
    "cummax": lambda h: torch.cummax(h, dim=1).values,
    "roll": lambda h: torch.roll(h, 1, dims=1),  # along the sequence (hand rule)
    "flip": lambda h: h.flip(-1),  # the ffn axis reversed (hand rule): the down projection reads it reversed
    "tensor_split": None,  # fused SwiGLU's gate/up cut by tensor_split instead of chunk (MLP.forward)
}


class MLP(nn.Module):
    def __init__(self, arch, kind: str | None = None):
        super().__init__()
        self.arch, self.kind = arch, kind or arch.mlp
        d, f = arch.hidden, arch.ffn
        if self.kind == "swiglu":
            if arch.fused_mlp:
                self.gate_up = nn.Linear(d, 2 * f, bias=arch.bias)
            else:
                self.gate, self.up = nn.Linear(d, f, bias=arch.bias), nn.Linear(d, f, bias=arch.bias)
        else:
            self.fc = nn.Linear(d, f, bias=arch.bias)
        self.down = nn.Linear(f, d, bias=arch.bias)

    def forward(self, x):
        op = self.arch.block_op
        if self.kind == "swiglu":
            if not self.arch.fused_mlp:
                gate, up = self.gate(x), self.up(x)
            elif op == "tensor_split":
                gate, up = torch.tensor_split(self.gate_up(x), 2, dim=-1)
            else:
                gate, up = self.gate_up(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(self.fc(x)) if self.kind == "gelu" else F.silu(self.fc(x))
        return self.down(block_op("" if op == "tensor_split" else op, h))


class MoE(nn.Module):
    """Mixtral-style routing written densely (torch.export cannot trace a data-dependent loop over experts):
    softmax over the router's logits, top-k, renormalize, scatter the k weights into a dense (.., experts)
    tensor, and sum every expert's output times its weight (zero for experts not chosen)."""

    def __init__(self, arch):
        super().__init__()
        self.arch = arch
        self.router = nn.Linear(arch.hidden, arch.experts, bias=False)
        self.experts = nn.ModuleList(MLP(arch, kind="gelu") for _ in range(arch.experts))

    def forward(self, x):
        probs = self.router(x).softmax(-1)
        w, idx = probs.topk(self.arch.topk, dim=-1)
        dense = torch.zeros_like(probs).scatter(-1, idx, w / w.sum(-1, keepdim=True))
        out = dense[..., 0:1] * self.experts[0](x)
        for e in range(1, self.arch.experts):
            out = out + dense[..., e:e + 1] * self.experts[e](x)
        return out


def make_mlp(arch) -> nn.Module:
    return MoE(arch) if arch.mlp == "moe" else MLP(arch)


WINDOW = 3  # a sliding-window layer's keys per query


def make_mixer(arch, i: int) -> nn.Module:
    """Block ``i``'s token mixer, by its layer type: "full" or "sliding" attention, or "ssm"."""
    kind = arch.layer_type(i)
    return SSM(arch) if kind == "ssm" else Attention(arch, window=WINDOW if kind == "sliding" else 0)


def block_forward(pre_norm: bool, norm1, attn, norm2, mlp, x, rope):
    if pre_norm:
        x = x + attn(norm1(x), rope)
        return x + mlp(norm2(x))
    x = norm1(x + attn(x, rope))
    return norm2(x + mlp(x))


class Block(nn.Module):
    def __init__(self, arch, i: int = 0):
        super().__init__()
        self.pre_norm = arch.pre_norm
        self.norm1, self.norm2 = make_norm(arch, arch.hidden), make_norm(arch, arch.hidden)
        self.attn, self.mlp = make_mixer(arch, i), make_mlp(arch)

    def forward(self, x, rope=None):
        return block_forward(self.pre_norm, self.norm1, self.attn, self.norm2, self.mlp, x, rope)


class TinyLM(nn.Module):
    def __init__(self, arch):
        super().__init__()
        self.arch = arch
        if arch.modality == "image":
            self.patch = nn.Conv2d(3, arch.hidden, arch.patch, stride=arch.patch, bias=arch.bias)
        else:
            self.embed = nn.Embedding(arch.vocab, arch.hidden)
        if arch.positions == "learned":
            self.pos = nn.Embedding(MAX_LEN, arch.hidden)
        elif arch.positions == "fixed":  # a table added whole: the sequence length is fixed
            self.pos_table = nn.Parameter(0.1 * torch.randn(1, arch.tokens, arch.hidden))
        elif arch.positions in ("rotary", "complex"):
            rotary = ComplexRotary if arch.positions == "complex" else Rotary
            self.rotary = rotary(arch.head_dim // 2 if arch.partial_rotary else arch.head_dim)
        elif arch.positions == "sinusoidal":  # computed at construction, not saved: a class rebuilds it at load
            self.register_buffer("sinusoid", sinusoid_table(MAX_LEN, arch.hidden), persistent=False)
        if arch.layout == "parallel":
            n = arch.layers
            self.ln1 = nn.ModuleList(make_norm(arch, arch.hidden) for _ in range(n))
            self.attn = nn.ModuleList(make_mixer(arch, i) for i in range(n))
            self.ln2 = nn.ModuleList(make_norm(arch, arch.hidden) for _ in range(n))
            self.mlp = nn.ModuleList(make_mlp(arch) for _ in range(n))
        else:
            self.blocks = nn.ModuleList(Block(arch, i) for i in range(arch.layers))
        self.final_norm = make_norm(arch, arch.hidden) if arch.final_norm else None
        self.head = nn.Linear(arch.hidden, arch.vocab, bias=False)
        if arch.tied:
            self.head.weight = self.embed.weight

    def embed_inputs(self, x):
        if self.arch.modality == "image":
            return self.patch(x).flatten(2).transpose(1, 2)
        return self.embed(x)

    def forward(self, x):
        x = self.embed_inputs(x)
        t = x.shape[1]
        rope = None
        if self.arch.positions == "learned":
            x = x + self.pos(torch.arange(t, device=x.device))
        elif self.arch.positions == "fixed":
            x = x + self.pos_table
        elif self.arch.positions in ("rotary", "complex"):
            rope = self.rotary(t, x.device)
        elif self.arch.positions == "sinusoidal":
            x = x + self.sinusoid[:t]
        if self.arch.layout == "parallel":
            for i in range(self.arch.layers):
                x = block_forward(self.arch.pre_norm, self.ln1[i], self.attn[i], self.ln2[i], self.mlp[i], x, rope)
        else:
            for block in self.blocks:
                x = block(x, rope)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.head(x)
