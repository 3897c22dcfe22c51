"""A compact ResNet-like CNN for 224 x 224 RGB H&E tiles, sized for CPU throughput.

Layout (``TileNet`` with the default widths)::

    stem   conv3x3/2  3 -> 16   BN ReLU      224 -> 112
           conv3x3/2 16 -> 32   BN ReLU      112 ->  56
    stage1 BasicBlock/2 32 -> 48             56 ->  28
    stage2 BasicBlock/2 48 -> 96             28 ->  14
    stage3 BasicBlock/2 96 -> 160            14 ->   7
    head   global average pool, dropout, linear 160 -> 2 (logits)

About 0.56 M parameters and 0.18 GFLOPs (2 x multiply-accumulates) per 224 px tile.
A wider 24-channel stem measured about half the training throughput on 2 CPU cores for
little gain in capacity, hence the narrow stem.

A BasicBlock is conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the shape changes),
then ReLU. The network takes float NCHW input that is already normalised; the ONNX export wraps it
with the uint8 NHWC preprocessing (see ``models.export``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


@dataclass(frozen=True)
class NetConfig:
    """Widths of the two stem convolutions and of the three residual stages."""

    stem: tuple[int, int] = (16, 32)
    stages: tuple[int, ...] = (48, 96, 160)
    num_classes: int = 2
    dropout: float = 0.2


class TileNet(nn.Module):
    """Compact residual CNN; ``forward`` returns logits ``[N, num_classes]``."""

    def __init__(self, config: NetConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetConfig()
        s0, s1 = self.config.stem
        layers: list[nn.Module] = [ConvBNReLU(3, s0, 2), ConvBNReLU(s0, s1, 2)]
        c = s1
        for width in self.config.stages:
            layers.append(BasicBlock(c, width, 2))
            c = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(self.config.dropout)
        self.fc = nn.Linear(c, self.config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)  # each block starts as its shortcut

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[N, stages[-1]]`` (the input of the linear head)."""
        return self.pool(self.features(x)).flatten(1)

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` from pooled features ``emb`` (``embed``'s output)."""
        return self.fc(self.dropout(emb))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class SeedEnsemble(nn.Module):
    """TileNets of one recipe trained with different seeds: P(class) is the mean of their softmaxes.

    Each member was trained on tiles normalised with its own ``mean``/``std`` (measured on its own
    sample of training tiles); the ensemble takes tiles normalised with the first member's and maps them
    to each member's per RGB channel. ``embed`` concatenates the members' pooled features (the OOD
    reference is fitted on them); ``head`` returns ``log(mean probability)``, so a softmax of it gives
    the mean probability back. Averaging seeds removes the part of a model's errors that is the luck
    of its seed.
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(
        self,
        members: Sequence[TileNet],
        means: Sequence[Sequence[float]],
        stds: Sequence[Sequence[float]],
    ) -> None:
        super().__init__()
        if len(members) < 2 or len(means) != len(members) or len(stds) != len(members):
            raise ValueError(f"an ensemble needs >= 2 members, each with a mean and std, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.widths = [m.fc.in_features for m in members]
        mean, std = torch.tensor(means, dtype=torch.float64), torch.tensor(stds, dtype=torch.float64)
        # x_i = (t - mean_i) / std_i = x_0 * std_0 / std_i + (mean_0 - mean_i) / std_i, with t = tiles / 255
        self.register_buffer("scale", (std[0] / std).float().view(len(members), 1, 3, 1, 1))
        self.register_buffer("shift", ((mean[0] - mean) / std).float().view(len(members), 1, 3, 1, 1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Members' pooled features side by side ``[N, sum of stages[-1]]``; ``x`` normalised with the
        first member's mean and std, NCHW."""
        return torch.cat(
            [m.embed(x * self.scale[i] + self.shift[i]) for i, m in enumerate(self.members)], dim=1
        )

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        """``log`` of the members' mean softmax ``[N, num_classes]`` from ``embed``'s output."""
        parts = torch.split(emb, self.widths, dim=1)
        probs = torch.stack(
            [torch.softmax(m.head(e), dim=1) for m, e in zip(self.members, parts, strict=True)]
        )
        return torch.log(probs.mean(0).clamp_min(1e-12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def build_net(stem: Sequence[int] = (16, 32), stages: Sequence[int] = (48, 96, 160)) -> TileNet:
    """``TileNet`` with the given stem and stage widths."""
    return TileNet(NetConfig(stem=(int(stem[0]), int(stem[1])), stages=tuple(int(s) for s in stages)))


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: nn.Module, input_shape: Sequence[int] = (1, 3, 224, 224)) -> dict[str, int]:
    """Multiply-accumulates of Conv2d and Linear layers for one forward pass of ``input_shape``.

    Counted with forward hooks; BatchNorm, activations, pooling and additions are left out (they are
    a few percent). Returns ``{"macs": ..., "flops": 2 * macs}`` per batch of ``input_shape``.
    """
    macs = 0

    def conv_hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        assert isinstance(mod, nn.Conv2d)
        kh, kw = mod.kernel_size
        macs += out.numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        assert isinstance(mod, nn.Linear)
        macs += out.numel() * mod.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(*input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {"macs": int(macs), "flops": int(2 * macs)}


class Preprocess(nn.Module):
    """uint8 NHWC RGB tiles -> normalised float32 NCHW: ``(x / 255 - mean) / std``, then transpose.

    The same module runs in training and inside the exported ONNX graph, so the two cannot drift.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values (std > 0), got {mean}, {std}")
        self.register_buffer("mean", torch.tensor([float(v) for v in mean]).view(1, 1, 1, 3))
        self.register_buffer("std", torch.tensor([float(v) for v in std]).view(1, 1, 1, 3))

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.to(torch.float32) / 255.0
        x = (x - self.mean) / self.std
        # Contiguous NCHW: a permuted (channels-last strided) view feeding Conv2d backward makes oneDNN
        # abort or segfault on AVX-512/AMX CPUs (torch 2.13.0+cpu); in the ONNX graph this is a no-op.
        return x.permute(0, 3, 1, 2).contiguous()


class TumourTileModel(nn.Module):
    """Preprocessing + ``TileNet`` + softmax: uint8 ``[N, 224, 224, 3]`` -> (probabilities, logits), plus
    ``ood_distance`` ``[N]`` when an out-of-distribution reference is set (``set_ood``)."""

    ood_mean: torch.Tensor
    ood_whiten: torch.Tensor

    def __init__(self, net: TileNet | SeedEnsemble, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.preprocess = Preprocess(mean, std)
        self.net = net
        self.register_buffer("ood_mean", torch.zeros(0))
        self.register_buffer("ood_whiten", torch.zeros(0, 0))
        self._has_ood = False

    def set_ood(self, mean: Sequence[float] | torch.Tensor, whiten: torch.Tensor) -> None:
        """Mahalanobis reference: ``ood_distance = ||(embedding - mean) @ whiten||`` (see ``models.ood``)."""
        self.ood_mean = torch.as_tensor(mean, dtype=torch.float32).clone()
        self.ood_whiten = torch.as_tensor(whiten, dtype=torch.float32).clone()
        self._has_ood = True

    @property
    def has_ood(self) -> bool:
        return self._has_ood

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, ...]:
        emb = self.net.embed(self.preprocess(tiles))
        logits = self.net.head(emb)
        if not self.has_ood:
            return torch.softmax(logits, dim=1), logits
        dist = ((emb - self.ood_mean) @ self.ood_whiten).pow(2).sum(1).sqrt()
        return torch.softmax(logits, dim=1), logits, dist
