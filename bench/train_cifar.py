"""Train the CIFAR-10 benchmark models on ../shared/data/cifar10 and save them as TorchScript.

    .venv/bin/python bench/train_cifar.py --arch resnet20    # -> bench/models/cifar_resnet20.pt
    .venv/bin/python bench/train_cifar.py --arch vgg16       # -> bench/models/cifar_vgg16.pt
    .venv/bin/python bench/train_cifar.py --act qcfs --levels 4  # -> ..._resnet20_qcfs_l4.pt2

``resnet20``: He et al.'s CIFAR ResNet-20 (16-32-64 channels, 3 x 3 basic blocks, BatchNorm,
option-A shortcuts: ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))`` where the width doubles),
global average pooling and a Linear(64 -> 10) readout.
``vgg16``: VGG-16 for CIFAR (13 conv-BN-ReLU layers 64..512, average pooling in place of max
pooling as in the SNN-conversion literature), then Linear(512 -> 512)-ReLU-Linear(512 -> 10).
Both hold the input normalisation (x - mean) / std per channel as buffers, so the toolchain
sees x in [0, 1]. SGD with momentum 0.9, Nesterov, cosine learning rate, weight decay, random
crop (pad 4) and horizontal flip; seeded. Training state is checkpointed after every epoch in
``--checkpoint`` (default bench/models/<arch>.ckpt) and resumed from it, so a run that is
stopped continues where it was; the TorchScript model is written after the last epoch.
``--act qcfs --levels L``: every ReLU a QCFS activation (``examples/qcfs.py``), saved with
torch.export (``.pt2``); its checkpoint is ``<arch>_qcfs_l<L>.ckpt``.
``--act qcfs --finetune RELU.ckpt``: start the QCFS model from a ReLU-trained checkpoint of the
same architecture (this script's ``<arch>.ckpt``) instead of from scratch: its weights and
BatchNorm statistics are copied, and each QCFS threshold ``up`` starts at the
``--init-percentile`` (default 99.9) percentile of the ReLU model's activation at that place on
``--init-images`` training images (eval mode, no augmentation) -- the "robust normalisation"
threshold of the conversion literature -- then the whole model (thresholds included) trains
for ``--epochs`` more epochs at a lower learning rate (e.g. ``--lr 0.02``). Fine-tuning a
pretrained ANN into QCFS form is common practice when training from scratch is too long; the
resulting model is not QCFS's own from-scratch schedule, and the log says which was done.

    .venv/bin/python bench/train_cifar.py --act qcfs --levels 4 \\
        --finetune bench/models/resnet20.ckpt --epochs 6 --lr 0.02
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from qcfs import save_export, with_qcfs  # noqa: E402
from train_digits import accuracy, save_torchscript  # noqa: E402

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"


class Normalized(nn.Module):
    """Per-channel (x - mean) / std as buffers in front of ``body``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)


class ShortcutA(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.shortcut = (ShortcutA((cout - cin) // 2) if stride != 1 or cin != cout
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(Normalized):
    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                   nn.ReLU()]
        cin = 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
        self.body = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)


VGG16_CFG = (64, 64, "A", 128, 128, "A", 256, 256, 256, "A", 512, 512, 512, "A",
             512, 512, 512, "A")


class Vgg16(Normalized):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for item in VGG16_CFG:
            if item == "A":
                layers.append(nn.AvgPool2d(2))
            else:
                layers += [nn.Conv2d(cin, item, 3, padding=1, bias=False),
                           nn.BatchNorm2d(item), nn.ReLU()]
                cin = item
        layers += [nn.Flatten(), nn.Linear(512, 512), nn.ReLU(), nn.Dropout(0.2),
                   nn.Linear(512, 10)]
        self.body = nn.Sequential(*layers)


ARCHS = {"resnet20": (ResNet20, 60, 1e-4), "vgg16": (Vgg16, 40, 5e-4)}


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 32, 32, 3) RGB -> float32 (N, 3, 32, 32) in [0, 1], int64 labels."""
    with np.load(path, allow_pickle=False) as f:
        x = np.ascontiguousarray(f["x"].transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
        return x, f["y"].astype(np.int64)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop of a 4-pixel zero-padded image and a random horizontal flip."""
    n = len(x)
    padded = F.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=gen)
    dy = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(32)).view(n, 1, 32, 1).expand(n, 3, 32, 32)
    cols = (dx.view(n, 1) + torch.arange(32)).view(n, 1, 1, 32).expand(n, 3, 32, 32)
    out = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1),
                 rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def activation_percentiles(model: nn.Module, x: torch.Tensor, q: float) -> list[float]:
    """The ``q``-th percentile of every nn.ReLU's output of ``model`` (eval mode) on ``x``,
    in module order (``with_qcfs`` replaces the ReLUs in the same order)."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(relus))}
    hooks = [m.register_forward_hook(
        lambda _m, _inp, out, i=i: outputs[i].append(out.detach().flatten()))
        for i, m in enumerate(relus)]
    model.eval()
    with torch.no_grad():
        for start in range(0, len(x), 256):
            model(x[start:start + 256])
    for h in hooks:
        h.remove()
    result = []
    for i in range(len(relus)):
        values = torch.cat(outputs[i])
        # torch.quantile refuses tensors above 2**24 elements: sort and index instead
        k = min(len(values) - 1, int(round(q / 100.0 * (len(values) - 1))))
        result.append(float(values.sort().values[k]))
    return result


def finetune_init(cls: type, args: argparse.Namespace, xt: torch.Tensor) -> nn.Module:
    """The QCFS model started from ReLU checkpoint ``args.finetune`` (weights, BatchNorm
    statistics; thresholds from the ReLU activations' percentile)."""
    state = torch.load(args.finetune, weights_only=False)
    if state.get("arch", args.arch) != args.arch:
        raise SystemExit(f"--finetune {args.finetune} holds a {state['arch']}, not a {args.arch}")
    relu_model = cls()
    relu_model.load_state_dict(state["model"])
    gen = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(xt), generator=gen)[:args.init_images]
    ups = activation_percentiles(relu_model, xt[pick], args.init_percentile)
    model = with_qcfs(relu_model, args.levels)
    qcfs = [m for m in model.modules() if hasattr(m, "up")]
    assert len(qcfs) == len(ups)
    with torch.no_grad():
        for m, up in zip(qcfs, ups):
            m.up.fill_(max(up, 1e-3))
    print(f"fine-tuning from {args.finetune} (ReLU, epoch {state.get('epoch')}); QCFS "
          f"L = {args.levels}, thresholds from the {args.init_percentile} percentile of "
          f"{len(pick)} training images: " + " ".join(f"{u:.3f}" for u in ups), flush=True)
    return model


def train(args: argparse.Namespace) -> None:
    cls, default_epochs, wd = ARCHS[args.arch]
    epochs = args.epochs if args.epochs is not None else default_epochs
    if args.finetune is not None and args.act != "qcfs":
        raise SystemExit("--finetune starts a QCFS model from a ReLU checkpoint: add --act qcfs")
    name = args.arch if args.act == "relu" else f"{args.arch}_qcfs_l{args.levels}"
    ckpt = args.checkpoint or ROOT / "bench" / "models" / f"{name}.ckpt"
    out = args.out or ROOT / "bench" / "models" / (
        f"cifar_{name}.pt" if args.act == "relu" else f"cifar_{name}.pt2")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    x_train, y_train = load_npz(args.data / "cifar10_train.npz")
    x_test, y_test = load_npz(args.data / "cifar10_test.npz")
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    if args.act == "relu":
        model = cls()
    elif args.finetune is not None and not ckpt.exists():
        model = finetune_init(cls, args, xt)
        print(f"before fine-tuning: test {accuracy(model, x_test[::5], y_test[::5], 500):.2f} % "
              "(every 5th)", flush=True)
    else:
        model = with_qcfs(cls(), args.levels)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=wd)
    steps_per_epoch = math.ceil(len(xt) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    gen = torch.Generator().manual_seed(args.seed)
    start_epoch = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        start_epoch = state["epoch"]
        if "rng" in state:  # torch's global generator: Dropout's masks
            torch.set_rng_state(state["rng"])
        elif any(isinstance(m, nn.Dropout) for m in model.modules()):
            print("warning: this checkpoint predates saving the dropout generator's state; "
                  "the resumed run will not equal an uninterrupted one", flush=True)
        print(f"resumed from {ckpt} after epoch {start_epoch}", flush=True)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        model.train()
        order, total = torch.randperm(len(xt), generator=gen), 0.0
        for start in range(0, len(xt), args.batch_size):
            idx = order[start:start + args.batch_size]
            opt.zero_grad()
            loss = loss_fn(model(augment(xt[idx], gen)), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        msg = f"epoch {epoch + 1}/{epochs}: loss {total / len(xt):.4f}"
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == epochs:
            msg += f", test {accuracy(model, x_test[::5], y_test[::5], 500):.2f} % (every 5th)"
        print(f"{msg}, {time.perf_counter() - t0:.0f} s", flush=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "gen": gen.get_state(),
                    "rng": torch.get_rng_state(), "epoch": epoch + 1,
                    "arch": args.arch, "epochs": epochs}, tmp)
        tmp.replace(ckpt)
    acc = accuracy(model, x_test, y_test, 500)
    if args.act == "relu":
        save_torchscript(model, out)
    else:
        save_export(model, out, torch.from_numpy(x_test[:2]))
    print(f"{name}: CIFAR-10 test accuracy {acc:.2f} % ({len(x_test)} images), "
          f"saved {out}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="resnet20")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--act", choices=("relu", "qcfs"), default="relu",
                        help="qcfs: QCFS activations, saved with torch.export (.pt2)")
    parser.add_argument("--levels", type=int, default=4, help="QCFS quantization levels L")
    parser.add_argument("--finetune", type=Path, default=None, metavar="RELU.ckpt",
                        help="with --act qcfs: start from this ReLU checkpoint of the same "
                             "--arch (weights copied, thresholds from activation percentiles) "
                             "instead of from scratch")
    parser.add_argument("--init-percentile", type=float, default=99.9,
                        help="--finetune: percentile of the ReLU activations that starts each "
                             "QCFS threshold")
    parser.add_argument("--init-images", type=int, default=1024,
                        help="--finetune: training images for those percentiles")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    train(parser.parse_args())


if __name__ == "__main__":
    main()
