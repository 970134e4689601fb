"""Vision workloads: small offline proxies of the survey's ResNet-50 and ViT-S on ImageNet.

==============  =============================================  =========================================
name            model                                          data
==============  =============================================  =========================================
mlp_digits      ReLU MLP 64-256-128-10                         scikit-learn digits (8x8), 1077/360/360
cnn_digits      residual CNN with BatchNorm (ResNet proxy):    same digits as 1x8x8 images
                stem conv, 2 basic blocks, stride-2 block
vit_mnist1d     patch Transformer (ViT proxy): 10 patches of   MNIST-1D (4000 train -> 3500/500, 1000 test)
                4 samples, cls token, pre-LN blocks
resnet50_*,     torchvision ResNet-50 / ViT-S/16 on ImageNet   ``--data PATH`` to an ImageFolder tree
vit_s_imagenet  (GPU clusters; needs torchvision)
==============  =============================================  =========================================

Splits are fixed (stratified, ``random_state=0``); the validation split drives tuning and
targets, the test split is only reported. On CUDA the models are widened and the budgets
lengthened (``scale``). Parameters named ``embed``/``head`` are the input embedding and the
classifier, which Muon-style optimizers leave to their AdamW fallback.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch
from torch import Tensor, nn

from distopt.bench import require
from distopt.bench.workloads import ClassificationWorkload, Splits, Workload


# ----------------------------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=1)
def digits_splits() -> Splits:
    """scikit-learn's 1797 digits, pixels / 16: 360 test, 360 validation, 1077 train (stratified)."""
    datasets = require("sklearn.datasets")
    model_selection = require("sklearn.model_selection")
    x, y = datasets.load_digits(return_X_y=True)
    x = x / 16.0
    x_rest, x_te, y_rest, y_te = model_selection.train_test_split(x, y, test_size=360, random_state=0, stratify=y)
    x_tr, x_va, y_tr, y_va = model_selection.train_test_split(x_rest, y_rest, test_size=360, random_state=0,
                                                              stratify=y_rest)
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    i = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return Splits(f(x_tr), i(y_tr), f(x_va), i(y_va), f(x_te), i(y_te), num_classes=10)


def _as_images(s: Splits) -> Splits:
    img = lambda a: a.reshape(-1, 1, 8, 8)  # noqa: E731
    return Splits(img(s.x_train), s.y_train, img(s.x_val), s.y_val, img(s.x_test), s.y_test, s.num_classes)


@functools.lru_cache(maxsize=1)
def mnist1d_splits() -> Splits:
    """MNIST-1D (see :mod:`distopt.bench.mnist1d_data`): the last 500 training sequences are validation."""
    from distopt.bench.mnist1d_data import load

    d, _ = load()
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    i = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return Splits(f(d["x"][:3500]), i(d["y"][:3500]), f(d["x"][3500:]), i(d["y"][3500:]),
                  f(d["x_test"]), i(d["y_test"]), num_classes=10)


# --------------------------------------------------------------------------------------------- models


class MLP(nn.Module):
    """ReLU MLP; the last layer is named ``head``."""

    def __init__(self, features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        widths = (features, *hidden)
        self.body = nn.Sequential(*[m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN plus (projected) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A small ResNet for 8x8 inputs: stem, ``blocks`` basic blocks at width ``c``, one stride-2
    block to ``2c``, global average pooling, linear head."""

    def __init__(self, in_channels: int = 1, width: int = 16, blocks: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers = [BasicBlock(width, width) for _ in range(blocks)] + [BasicBlock(width, 2 * width, stride=2)]
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.embed(x)).mean(dim=(2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class ViTBlock(nn.Module):
    """Pre-LN Transformer block: x + Attn(LN x); x + MLP(LN x) with GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchTransformer(nn.Module):
    """ViT on a 1-D signal: non-overlapping patches -> linear embedding, a cls token and learned
    position embeddings, pre-LN blocks, final LayerNorm, linear head on the cls token."""

    def __init__(self, length: int = 40, patch: int = 4, dim: int = 64, depth: int = 2, heads: int = 4,
                 mlp_ratio: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, length // patch + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x.view(x.shape[0], -1, self.patch))
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


# ------------------------------------------------------------------------------------------ factories


def mlp_digits(device: str = "cpu", quick: bool = False, data: str | None = None) -> Workload:
    scale = 2 if device.startswith("cuda") else 1
    hidden = (256 * scale, 128 * scale)
    return ClassificationWorkload(
        "mlp_digits", digits_splits, lambda seed: MLP(64, hidden, 10),
        proxy="MLP baseline (digits)", budget=40 if quick else 300 * scale, batch_size=64,
        eval_every=10 if quick else 20, device=device, model_config={"hidden": list(hidden)})


def cnn_digits(device: str = "cpu", quick: bool = False, data: str | None = None) -> Workload:
    width, blocks = (64, 2) if device.startswith("cuda") else (16, 1)
    return ClassificationWorkload(
        "cnn_digits", lambda: _as_images(digits_splits()), lambda seed: ResNetSmall(1, width, blocks),
        proxy="ResNet-50 (residual CNN + BatchNorm)", budget=40 if quick else (1000 if width == 64 else 100),
        batch_size=64, eval_every=10, device=device,
        model_config={"width": width, "blocks": blocks})


def vit_mnist1d(device: str = "cpu", quick: bool = False, data: str | None = None) -> Workload:
    cfg: dict[str, Any] = ({"dim": 128, "depth": 4, "heads": 4, "patch": 4} if device.startswith("cuda")
                           else {"dim": 64, "depth": 2, "heads": 4, "patch": 4})
    return ClassificationWorkload(
        "vit_mnist1d", mnist1d_splits, lambda seed: PatchTransformer(40, **cfg),
        proxy="ViT-S (patch Transformer)", budget=40 if quick else (3000 if cfg["depth"] == 4 else 600),
        batch_size=64 if not device.startswith("cuda") else 128, eval_every=10 if quick else 40, device=device,
        model_config=cfg)


def _imagenet(name: str, device: str, quick: bool, data: str | None) -> Workload:
    """ImageNet on a GPU cluster: ``--data PATH`` must be an ImageFolder root with ``train/`` and ``val/``."""
    if not data:
        raise ValueError(f"workload {name!r} needs --data PATH: an ImageNet ImageFolder root with train/ and val/ "
                         "(no download is attempted)")
    for sub in ("train", "val"):
        if not os.path.isdir(os.path.join(data, sub)):
            raise FileNotFoundError(f"workload {name!r}: {os.path.join(data, sub)!r} does not exist; --data must be "
                                    "an ImageFolder root with train/ and val/ class folders")
    tv = require("torchvision")
    if name == "resnet50_imagenet":
        model = lambda seed: tv.models.resnet50(num_classes=1000)  # noqa: E731
        proxy = "ResNet-50 / ImageNet"
    else:
        model = lambda seed: tv.models.VisionTransformer(224, 16, 12, 6, 384, 1536, num_classes=1000)  # noqa: E731
        proxy = "ViT-S/16 / ImageNet"
    return ImageFolderWorkload(name, data, model, proxy=proxy, budget=200 if quick else 100_000, device=device)


class ImageFolderWorkload(Workload):
    """Streaming ImageFolder classification (standard 224 crops) for the ImageNet workloads. The
    validation split is ``val/``; the test metric is also reported on ``val/`` (ImageNet's test
    labels are not public)."""

    def __init__(self, name: str, root: str, model: Any, *, proxy: str, budget: int, device: str,
                 batch_size: int = 256, workers: int = 8) -> None:
        tv = require("torchvision")
        t = tv.transforms
        norm = t.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        self.name, self.proxy, self.budget, self.batch_size, self.device = name, proxy, budget, batch_size, device
        self.eval_every, self.metric, self.failure_value, self.sensitivity_delta = max(budget // 20, 1), "accuracy", 1e-3, 0.01
        self.train_set = tv.datasets.ImageFolder(os.path.join(root, "train"), t.Compose(
            [t.RandomResizedCrop(224), t.RandomHorizontalFlip(), t.ToTensor(), norm]))
        self.val_set = tv.datasets.ImageFolder(os.path.join(root, "val"), t.Compose(
            [t.Resize(256), t.CenterCrop(224), t.ToTensor(), norm]))
        self._model, self.workers = model, workers
        self.model_config = {"root": root}

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return self._model(seed).to(self.device)

    def batches(self, data_seed: int):  # type: ignore[override]
        gen = torch.Generator().manual_seed(data_seed)
        while True:
            loader = torch.utils.data.DataLoader(self.train_set, self.batch_size, shuffle=True, generator=gen,
                                                 num_workers=self.workers, drop_last=True, pin_memory=True)
            for x, y in loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.device.startswith("cuda")):
            return nn.functional.cross_entropy(model(batch[0]).float(), batch[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        model.eval()
        loader = torch.utils.data.DataLoader(self.val_set, self.batch_size, num_workers=self.workers)
        correct = total = 0
        loss = 0.0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            logits = model(x).float()
            loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        model.train()
        return {"metric": correct / max(total, 1), "loss": loss / max(total, 1) if total else math.nan}


FACTORIES = {
    "mlp_digits": mlp_digits,
    "cnn_digits": cnn_digits,
    "vit_mnist1d": vit_mnist1d,
    "resnet50_imagenet": functools.partial(_imagenet, "resnet50_imagenet"),
    "vit_s_imagenet": functools.partial(_imagenet, "vit_s_imagenet"),
}
