"""Models covering every layer kind the sample-wise engine has a rule for, and some it has not."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 5


class ConvZoo(nn.Module):
    """Strided, dilated, grouped, 'same'-padded (asymmetric: even kernel) and reflect-padded
    convolutions, 1-D and 2-D, GroupNorm affine, biases."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 6)
        self.dilated = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3, bias=False)
        self.same = nn.Conv2d(6, 4, (2, 3), padding="same", padding_mode="reflect")
        self.line = nn.Conv1d(4, 4, 2, stride=1, padding=1, dilation=1)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x):
        x = torch.relu(self.norm(self.stem(x)))
        x = torch.tanh(self.same(torch.relu(self.dilated(x))))
        x = torch.relu(self.line(x.flatten(2)))
        return self.head(x.mean(-1))


class SequenceZoo(nn.Module):
    """Token ids: Embedding with padding_idx, a position parameter added, a Conv1d over the
    sequence, LayerNorm, a Linear over positions, a layer-scale parameter, and a head TIED to
    the embedding table (F.linear with the embedding weight)."""

    def __init__(self, vocab: int = 11, dim: int = 6, length: int = 7):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(1, length, dim) * 0.3)
        self.mix = nn.Conv1d(dim, dim, 3, padding=1)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.layer_scale = nn.Parameter(torch.rand(dim) + 0.5)
        self.classify = nn.Linear(vocab, CLASSES)

    def forward(self, ids):
        h = self.embed(ids) + self.position
        h = h + self.mix(h.transpose(1, 2)).transpose(1, 2)
        h = self.layer_scale * torch.tanh(self.proj(self.norm(h)))
        logits = F.linear(h, self.embed.weight)  # tied: [N, T, vocab]
        return self.classify(logits.mean(1))


class TokenTransformer(nn.Module):
    """Patch projection, a class token (expand + cat), nn.TransformerEncoderLayer (multi-head
    attention), a head on the class token."""

    def __init__(self, dim: int = 8, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Linear(4, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=12, dropout=0.0,
                                                  batch_first=batch_first, norm_first=True)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x):  # x: [N, T, 4]
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.patch(x)], dim=1)
        if not self.batch_first:
            return self.head(self.encoder(tokens.transpose(0, 1))[0])
        return self.head(self.encoder(tokens)[:, 0])


class MatmulLayer(nn.Module):
    """A layer type no rule knows: its weight is used through torch.matmul."""

    def __init__(self, features: int, out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, out) / features ** 0.5)

    def forward(self, x):
        return torch.matmul(x, self.weight)


class ReusedAndUnknown(nn.Module):
    """One Linear applied twice (tied by reuse), an unknown layer, and a weight used transposed."""

    def __init__(self, features: int = 7):
        super().__init__()
        self.shared = nn.Linear(features, features)
        self.unknown = MatmulLayer(features, 9)
        self.back = nn.Parameter(torch.randn(features, 9) / 3)
        self.head = nn.Linear(features, CLASSES)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.shared(x))))
        h = torch.relu(self.unknown(h))
        h = F.linear(h, self.back)  # back: [features, 9] used as a [out, in] weight: known
        return self.head(h)


def zoo_batch(name: str, num: int, dtype: torch.dtype = torch.float64):
    targets = torch.randint(0, CLASSES, (num,))
    if name == "conv_zoo":
        return torch.randn(num, 3, 9, 9, dtype=dtype), targets
    if name == "sequence_zoo":
        ids = torch.randint(0, 11, (num, 7))
        ids[:, -1] = 0  # the padding token appears
        return ids, targets
    if name in ("token_transformer", "token_transformer_seq_first"):
        return torch.randn(num, 5, 4, dtype=dtype), targets
    if name == "reused_and_unknown":
        return torch.randn(num, 7, dtype=dtype), targets
    raise KeyError(name)


ZOO = {
    "conv_zoo": ConvZoo,
    "sequence_zoo": SequenceZoo,
    "token_transformer": TokenTransformer,
    "token_transformer_seq_first": lambda: TokenTransformer(batch_first=False),
    "reused_and_unknown": ReusedAndUnknown,
}


def make_zoo_model(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO[name]().to(dtype)
