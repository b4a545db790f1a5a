"""Rules read an op's full signature: its arguments by their schema names (a norm's ``ord`` before ``dim``,
``var.dim``'s ``unbiased`` before ``keepdim``), every form of an op (batch_norm and its native forms), and the
legacy operands torch accepts (a 1-d empty tensor in a cat of any rank). Each was a crash on a model class
(swin2sr, mobilevit, flaubert); each is shown here on a tiny model that grows exactly."""

import torch
import torch.nn.functional as F
from torch import nn

import growir
from zoo import VOCAB, randomize_norms


class Block(nn.Module):
    """Pre-norm attention block whose queries and keys are normalised by ``normalize`` (cosine attention),
    and whose keys are appended to ``cache`` (an empty 1-d tensor, the legacy empty cache) when ``legacy_cat``."""

    def __init__(self, d=32, heads=4, normalize=None, legacy_cat=False):
        super().__init__()
        self.ln1, self.ln2, self.heads = nn.LayerNorm(d), nn.LayerNorm(d), heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.normalize, self.legacy_cat = normalize, legacy_cat

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(self.ln1(x)).chunk(3, -1))
        if self.normalize is not None:
            q, k = self.normalize(q), self.normalize(k)
        if self.legacy_cat:
            k, v = torch.cat([torch.tensor([]), k], dim=-2), torch.cat([torch.tensor([]), v], dim=-2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class Model(nn.Module):
    def __init__(self, d=32, layers=2, **block):
        super().__init__()
        self.emb, self.lnf, self.head = nn.Embedding(VOCAB, d), nn.LayerNorm(d), nn.Linear(d, VOCAB)
        self.blocks = nn.ModuleList(Block(d, **block) for _ in range(layers))

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.lnf(x))


def _grows_exactly(model, x, **growth):
    grown = growir.grow(model, example_inputs=(x,), **growth)
    assert grown.growir_record.exact, grown.growir_record.reasons
    with torch.no_grad():
        a, b = model(x), grown(x)
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
    return grown


def _vector_norm(t):  # swin2sr's cosine attention: F.normalize, i.e. linalg_vector_norm(t, 2.0, [-1], True)
    return t / torch.linalg.vector_norm(t, 2.0, dim=-1, keepdim=True).clamp_min(1e-6)


def _std(t):  # var.dim(t, dim, unbiased, keepdim): ``unbiased`` sits where other reductions put ``keepdim``
    return t / (torch.var(t, -1, False, True) + 1e-5).sqrt()


def test_a_norm_with_ord_reads_its_dim_and_keepdim_by_name():
    torch.manual_seed(0)
    for normalize in (_vector_norm, _std):
        model = randomize_norms(Model(normalize=normalize).eval())
        _grows_exactly(model, torch.randint(0, VOCAB, (2, 7)), width=2.0)


def test_a_cat_skips_a_legacy_empty_operand():
    torch.manual_seed(0)
    model = randomize_norms(Model(legacy_cat=True).eval())
    grown = _grows_exactly(model, torch.randint(0, VOCAB, (2, 7)), width=2.0)
    assert grown.get_parameter("blocks.0.up.weight").shape == (128, 64)


class ConvNet(nn.Module):
    """Convolutions with batch norms between them (mobilevit's stem), eval mode: a map per channel."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((-2, -1)))


def test_batch_norm_is_a_map_per_channel_its_statistics_grow_with():
    torch.manual_seed(0)
    model = ConvNet()
    for bn in (model.bn1, model.bn2):  # statistics and affine parameters that are not the identity
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        nn.init.uniform_(bn.weight, 0.5, 1.5), nn.init.uniform_(bn.bias, -0.5, 0.5)
    grown = _grows_exactly(model.eval(), torch.randn(2, 3, 6, 6), width=2.0, width_method="fpi")
    assert grown.get_buffer("bn1.running_mean").shape == (16,)
    assert grown.get_parameter("conv2.weight").shape == (32, 16, 3, 3)


def test_a_new_channel_of_a_batch_norm_holds_a_variance_never_a_draw_around_zero():
    """Fresh units draw their producers' rows around zero; the running variance is an operand the op divides by
    the root of (its row's ``variance_at``), so a negative draw made NaN that no zero column downstream removes
    (NaN * 0): mobilevit under the default width method. Its new channels take the old channels' mean instead."""
    torch.manual_seed(0)
    model = ConvNet()
    for bn in (model.bn1, model.bn2):
        bn.running_var.uniform_(0.5, 2)
    for method in ("auto", "fresh"):
        grown = _grows_exactly(model.eval(), torch.randn(2, 3, 6, 6), width=2.0, width_method=method)
        for name in ("bn1", "bn2"):
            old, new = model.get_buffer(f"{name}.running_var"), grown.get_buffer(f"{name}.running_var")
            assert torch.equal(new[:len(old)], old) and torch.allclose(new[len(old):], old.mean())
