"""The template's own training loop, as the template writes it: the G2 baseline.

`python -m bench.template_loop {scratch_cnn|resnet18_frozen} DATA_ROOT SIZE EPOCHS`

ImageFolder + Resize((s, s)) + RandomHorizontalFlip + ToTensor + Normalize(0.5); DataLoader with
batch 64, shuffle, num_workers 0; NCHW fp32; Adam 1e-3; every image decoded by PIL every epoch;
the frozen ResNet18 has requires_grad=False on its backbone while the model stays in train mode.
Prints one JSON line: per-epoch validation accuracy and the final test accuracy.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


def build(kind: str, num_classes: int) -> nn.Module:
    if kind == "scratch_cnn":
        from imgcls import config, models

        return models.scratch_cnn(config.ScratchCNN(arch="scratch_cnn"), num_classes)  # the same network as imgcls's
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    for p in model.parameters():
        p.requires_grad = False
    model.fc = nn.Linear(512, num_classes)
    return model


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / total


def main() -> int:
    kind, root, size, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    start = time.perf_counter()
    torch.manual_seed(0)
    norm = transforms.Normalize([0.5] * 3, [0.5] * 3)
    train_tf = transforms.Compose([transforms.Resize((size, size)), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    eval_tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), norm])
    train_set = datasets.ImageFolder(f"{root}/train", train_tf)
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True, num_workers=0)
    val_loader = DataLoader(datasets.ImageFolder(f"{root}/val", eval_tf), batch_size=64, num_workers=0)
    test_loader = DataLoader(datasets.ImageFolder(f"{root}/test", eval_tf), batch_size=64, num_workers=0)
    model = build(kind, len(train_set.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    val_acc = []
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        val_acc.append(accuracy(model, val_loader))
    test = accuracy(model, test_loader)
    print(json.dumps({"val_acc": val_acc, "test_acc": test, "seconds_in_process": time.perf_counter() - start}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
