"""A ResNet-18 (random weights) exported to ONNX with a card, for benchmarks: the size of model most labs
run (WSInfer's zoo is ResNet-based), built without torchvision (not available here).

The graph takes float32 NCHW tiles normalised with ImageNet mean/std (preprocessing on the card, not in
the graph, like models exported from timm or TIAToolbox) and ends in a softmax over 2 classes.
Needs torch (the ``train`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_resnet18(n_classes: int = 2, seed: int = 0) -> Any:
    """torch ResNet-18 (BasicBlock x [2, 2, 2, 2], 11.7 M parameters) with a softmax head, eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.down(x))

    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
    ]  # fmt: skip
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, n_classes), nn.Softmax(dim=1)]
    return nn.Sequential(*layers).eval()


def export_resnet18(folder: Path, *, name: str = "resnet18", tile_px: int = 224, mpp: float = 0.5) -> Path:
    """Write ``NAME.onnx`` and its card ``NAME.json`` into ``folder`` (reused when present); returns the
    ``.onnx`` path."""
    import torch

    from wsi_pipeline.inference.card import write_card
    from wsi_pipeline.provenance import file_sha256

    folder.mkdir(parents=True, exist_ok=True)
    onnx_path, card_path = folder / f"{name}.onnx", folder / f"{name}.json"
    if onnx_path.exists() and card_path.exists():
        return onnx_path
    model = build_resnet18()
    x = torch.zeros(1, 3, tile_px, tile_px)
    torch.onnx.export(
        model, (x,), str(onnx_path), input_names=["input"], output_names=["probabilities"],
        dynamic_axes={"input": {0: "N"}, "probabilities": {0: "N"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    write_card(
        {
            "name": name,
            "version": "random-weights",
            "description": "ResNet-18 with random weights: a benchmark model, not a classifier",
            "classes": ["non-tumour", "tumour"],
            "positive_class": "tumour",
            "input": {"name": "input", "size_px": tile_px, "dtype": "float32", "layout": "NCHW",
                      "channels": "RGB"},
            "output": {"name": "probabilities"},
            "mpp": mpp,
            "preprocessing": {"in_graph": False, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "onnx_file": onnx_path.name,
            "sha256": file_sha256(onnx_path),
        },
        card_path,
    )  # fmt: skip
    return onnx_path
