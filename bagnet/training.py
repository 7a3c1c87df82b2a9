"""Framework-free training pieces: optimiser, LR schedule, one training epoch, evaluation.

``jobs/train.py`` runs these inside Ray Train workers; they work the same in a plain process.
Statistics are summed across data-parallel ranks with ``torch.distributed`` when it is initialised.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bagnet.config import require
from bagnet.metrics import topk_correct


@dataclass
class OptimConfig:
    """SGD recipe. ``lr`` is per 256 images: the step size is ``lr * global_batch / 256``."""

    epochs: int = 10
    batch_size: int = 64  # per worker and step
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_epochs: int = 30  # "step": divide by 1/step_gamma every step_epochs
    step_gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    grad_accum: int = 1
    bf16: bool = False  # autocast to bfloat16 (GPU)
    channels_last: bool = False

    def validate(self) -> None:
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.step_epochs >= 1, "step_epochs", f"must be >= 1, got {self.step_epochs}")
        require(0 < self.step_gamma <= 1, "step_gamma", f"must be in (0, 1], got {self.step_gamma}")
        require(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        require(0 <= self.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        require(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")


def base_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr * global_batch / 256


def lr_factor(cfg: OptimConfig, epoch: float) -> float:
    """Multiplier of the base LR at fractional ``epoch`` (linear warmup, then the schedule)."""
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        return (epoch + 1e-8) / cfg.warmup_epochs
    if cfg.schedule == "step":
        return cfg.step_gamma ** int(epoch // cfg.step_epochs)
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
        return 0.5 * (1 + math.cos(math.pi * min((epoch - cfg.warmup_epochs) / span, 1.0)))
    return 1.0


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.SGD:
    return torch.optim.SGD(
        model.parameters(), lr=base_lr(cfg, global_batch), momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay,
    )


@dataclass
class EpochStats:
    """Sums over samples; ``reduce()`` adds them up across ranks."""

    num_classes: int
    loss_sum: float = 0.0
    count: int = 0
    top1: int = 0
    top5: int = 0
    class_correct: torch.Tensor = field(default=None)  # type: ignore[assignment]
    class_count: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.class_correct is None:
            self.class_correct = torch.zeros(self.num_classes, dtype=torch.float64)
            self.class_count = torch.zeros(self.num_classes, dtype=torch.float64)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        hits = topk_correct(logits.detach().float(), labels)
        n = labels.numel()
        self.loss_sum += float(loss.detach()) * n
        self.count += n
        self.top1 += int(hits[1].sum())
        self.top5 += int(hits[5].sum())
        labels_cpu = labels.detach().cpu()
        self.class_correct += torch.bincount(labels_cpu, weights=hits[1].cpu().double(), minlength=self.num_classes)
        self.class_count += torch.bincount(labels_cpu, minlength=self.num_classes).double()

    def reduce(self) -> "EpochStats":
        """Sum the statistics over all data-parallel ranks (no-op without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self
        head = torch.tensor([self.loss_sum, self.count, self.top1, self.top5], dtype=torch.float64)
        flat = torch.cat([head, self.class_correct, self.class_count])
        if dist.get_backend() == "nccl":
            flat = flat.cuda()
        dist.all_reduce(flat)
        flat = flat.cpu()
        c = self.num_classes
        return EpochStats(
            self.num_classes, loss_sum=float(flat[0]), count=int(flat[1]), top1=int(flat[2]), top5=int(flat[3]),
            class_correct=flat[4 : 4 + c], class_count=flat[4 + c :],
        )

    def summary(self, prefix: str) -> dict:
        n = max(self.count, 1)
        per_class = (self.class_correct / self.class_count.clamp(min=1)).tolist()
        return {
            f"{prefix}_loss": self.loss_sum / n, f"{prefix}_top1": self.top1 / n, f"{prefix}_top5": self.top5 / n,
            f"{prefix}_count": self.count, f"{prefix}_top1_per_class": per_class,
        }


def autocast(cfg: OptimConfig, device: torch.device):
    if cfg.bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_input(x: torch.Tensor, cfg: OptimConfig) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def _timed(batches: Batches, waited: list[float]) -> Iterator:
    """Yields from ``batches``, adding the seconds spent waiting for each item to ``waited[0]``."""
    iterator = iter(batches)
    while True:
        asked = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - asked
        yield item


def train_epoch(
    model: torch.nn.Module, batches: Batches, optimizer: torch.optim.Optimizer, cfg: OptimConfig, *,
    epoch: int, steps_per_epoch: int, global_batch: int, num_classes: int, device: torch.device,
    log: Callable[[str], None] | None = None, log_every: int = 20,
) -> tuple[EpochStats, dict]:
    """One pass over ``batches`` of (normalised images, labels); returns stats and timing (``epoch_seconds``,
    ``images_per_s_per_worker`` and ``data_wait_s``, the seconds spent waiting for the next batch)."""
    model.train()
    stats = EpochStats(num_classes)
    lr0 = base_lr(cfg, global_batch)
    start, images, waited = time.perf_counter(), 0, [0.0]
    optimizer.zero_grad(set_to_none=True)
    step = 0
    for step, (x, y) in enumerate(_timed(batches, waited)):
        lr = lr0 * lr_factor(cfg, epoch + step / max(steps_per_epoch, 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = prepare_input(x.to(device, non_blocking=True), cfg), y.to(device, non_blocking=True)
        with autocast(cfg, device):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        (loss / cfg.grad_accum).backward()
        if (step + 1) % cfg.grad_accum == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        stats.update(logits, y, loss)
        images += y.numel()
        if log and (step + 1) % log_every == 0:
            rate = images / (time.perf_counter() - start)
            log(f"epoch {epoch + 1} step {step + 1}/{steps_per_epoch} loss {loss.item():.3f} lr {lr:.4f} {rate:.0f} img/s/worker")
    if (step + 1) % cfg.grad_accum:  # flush a partial accumulation
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    return stats, {"lr": lr0 * lr_factor(cfg, epoch), "epoch_seconds": elapsed,
                   "images_per_s_per_worker": images / max(elapsed, 1e-9), "data_wait_s": waited[0]}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Batches, cfg: OptimConfig, *, num_classes: int, device: torch.device) -> EpochStats:
    model.eval()
    stats = EpochStats(num_classes)
    for x, y in batches:
        x, y = prepare_input(x.to(device, non_blocking=True), cfg), y.to(device, non_blocking=True)
        with autocast(cfg, device):
            logits = model(x)
        stats.update(logits, y, F.cross_entropy(logits.float(), y))
    return stats
