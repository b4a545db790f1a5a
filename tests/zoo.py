"""The test zoo: real Hugging Face architectures from tiny configs, and two hand-written models.

Norm weights and biases are randomized (fresh norms are all ones and zeros and hide mistakes).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

VOCAB = 100


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name.lower() or "ln" in name.lower()):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=gen))
    return model


def nudge(module: nn.Module, scale: float = 0.3) -> None:
    """Move every parameter of ``module`` (a norm's weight and bias) off its initial value by ``scale`` times a
    standard normal from the global generator, so a test sees what a rescale of them does."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape))


class NanoGPT(nn.Module):
    """A nanoGPT-style decoder: learned positions, pre-norm blocks, fused QKV, GELU MLP, tied head."""

    def __init__(self, vocab=VOCAB, d=32, heads=4, layers=2, max_len=64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.heads = heads

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class TorchEncoder(nn.Module):
    """Token embedding -> nn.TransformerEncoder(norm_first=True) -> final norm -> classifier."""

    def __init__(self, vocab=VOCAB, d=32, heads=4, layers=2, classes=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, idx):
        return self.head(self.norm(self.encoder(self.emb(idx))))


def hf_models() -> dict:
    """name -> factory of a tiny Hugging Face model (random weights, randomized norms)."""
    return {
        "bert": lambda: T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)),
        "roberta": lambda: T.RobertaModel(T.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=64, vocab_size=VOCAB,
                                                          max_position_embeddings=64)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                       n_positions=64, bos_token_id=0, eos_token_id=0)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2,
                                                          vocab_size=VOCAB)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(hidden_size=32, intermediate_size=64,
                                                                num_hidden_layers=2, num_attention_heads=4,
                                                                num_key_value_heads=2, vocab_size=VOCAB)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2,
                                                          vocab_size=VOCAB)),
        "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                          vocab_size=VOCAB)),
        "neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4, rotary_pct=0.5, vocab_size=VOCAB,
                                                             bos_token_id=0, eos_token_id=0)),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                                       bos_token_id=0, eos_token_id=0, pad_token_id=0)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                    num_attention_heads=4, vocab_size=VOCAB, word_embed_proj_dim=32,
                                                    max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                                    pad_token_id=1)),
        "t5": lambda: T.T5Model(T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB)),
        "vit": lambda: T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, image_size=16, patch_size=4)),
    }


PRE_NORM = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "neox", "phi3", "opt", "vit", "t5", "nanogpt", "torchenc"}


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name == "nanogpt":
        model = NanoGPT()
    elif name == "torchenc":
        model = TorchEncoder()
    else:
        model = hf_models()[name]()
    return randomize_norms(model.eval(), seed)


def example_inputs(name: str, batch: int = 2, seq: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if name in ("nanogpt", "torchenc"):
        return (torch.randint(0, VOCAB, (batch, seq), generator=gen),)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)}
    ids = torch.randint(2, VOCAB, (batch, seq), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if name == "t5":
        inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (batch, max(2, seq - 2)), generator=gen)
    return inputs


ALL = list(hf_models()) + ["nanogpt", "torchenc"]


# The config fields a width or depth growth of the zoo may change: sizes only (never a token id, a window,
# a position count). A rebuild that changes anything else is a silent wrong model.
SIZE_FIELDS = {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
               "n_embd", "n_head", "n_layer", "n_inner", "ffn_dim", "word_embed_proj_dim", "d_model", "d_ff",
               "num_heads", "num_layers", "num_decoder_layers", "d_kv", "head_dim", "layer_types"}


def logits_deviation(small, big, vocab: int = VOCAB) -> float:
    """The worst relative logits deviation of ``big`` from ``small`` over two fresh batches (3x11, 1x17)."""
    worst = 0.0
    for batch, seq, seed in ((3, 11, 1), (1, 17, 2)):
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            a, b = small(ids).logits, big(ids).logits
        worst = max(worst, float((a - b).abs().max() / max(1.0, a.abs().max())))
    return worst


class ChunkedSum(nn.Module):
    """A causal running sum within chunks of the sequence, padded to a whole number of chunks first (an SSM's
    chunked scan reduced to its reshapes); with ``carry``, each chunk also adds the sums of the chunks before it
    where there are several (traced at fewer tokens than a chunk, the export keeps the one-chunk branch)."""

    def __init__(self, chunk: int, carry: bool = False):
        super().__init__()
        self.chunk, self.carry = chunk, carry
        self.emb, self.norm = nn.Embedding(50, 16), nn.LayerNorm(16)
        self.up, self.down, self.head = nn.Linear(16, 24), nn.Linear(24, 16), nn.Linear(16, 50)

    def forward(self, ids):
        x = self.emb(ids)
        h = self.up(self.norm(x))
        s, c = h.shape[1], self.chunk
        h = F.pad(h, (0, 0, 0, (c - s % c) % c))
        chunks = h.reshape(h.shape[0], -1, c, h.shape[2])
        y = torch.cumsum(chunks, dim=2)
        if self.carry and chunks.shape[1] > 1:
            total = chunks.sum(2, keepdim=True)
            y = y + torch.cumsum(total, 1) - total
        return self.head(x + self.down(y.reshape(h.shape[0], -1, h.shape[2])[:, :s]))


class BlockLM(nn.Module):
    """A small language model around ``layers`` blocks made by ``block(d)`` (each maps (batch, seq, d) to the same):
    an embedding, the blocks, a LayerNorm and a head -- the frame of a test that shows one op or block pattern."""

    def __init__(self, block, d: int = 32, layers: int = 2):
        super().__init__()
        self.emb, self.lnf, self.head = nn.Embedding(VOCAB, d), nn.LayerNorm(d), nn.Linear(d, VOCAB)
        self.blocks = nn.ModuleList(block(d) for _ in range(layers))

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.lnf(x))


def grow_block_lm(block, **spec):
    """(source, grown, example): ``BlockLM(block)`` with random norms, seeded, grown by
    ``growir.grow(..., **spec)`` at a (2, 7) token example."""
    import growir
    torch.manual_seed(0)
    model = randomize_norms(BlockLM(block).eval())
    x = torch.randint(0, VOCAB, (2, 7))
    return model, growir.grow(model, example_inputs=(x,), **spec), x
