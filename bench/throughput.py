"""Inference and training throughput (images/s) and peak memory of zoo models, eager and fast paths.

Like timm's benchmark.py: for every model, size and path, warm-up steps, then the median of
``--repeat`` timed steps (a forward for ``infer``; forward, backward and an SGD step for
``train``), on synthetic-world images. Each inference path's logits are compared with the eager
fp32 model's (``max_rel_diff``, ``top1_agreement``), so a fast path that changes the function shows.

Paths (``--fast``, comma-separated): ``eager`` (eval + no_grad, NCHW), ``inference_mode``,
``channels_last``, ``fold_bn`` (BN folded into the convs), ``fast`` (all three), ``compile``
(torch.compile of the eager model), ``fast+compile``. Training runs the paths that apply to it:
``eager``, ``channels_last``, ``compile``, ``fast`` (= channels_last), ``fast+compile``.
``--precision bf16`` runs every path under bf16 autocast.

    python -m bench.throughput                      # CPU default: small models at 64 px, BagNet-33/ResNet-50 at 224
    python -m bench.throughput --models bagnet33,resnet50 --size 224 --device cuda --precision bf16
    python -m bench.throughput --models all --size 224 --batch 32 --fast eager,fast,fast+compile
    python -m bench.throughput --quick --models bagnet9_small          # smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bagnet.imagenet import to_model_input
from bagnet.synthetic import SyntheticWorld
from bagnet.fast import (FastConfig, autocast_context, compare_outputs, compile_model,
                         inference_context, optimize_for_inference, to_channels_last)
from bagnet.models import create_model, list_models
from bench.harness import Table, machine_info, measure

COLUMNS = ["model", "size", "batch", "mode", "path", "images_per_s", "ms_per_batch", "speedup",
           "peak_mb", "max_rel_diff", "top1_agreement", "prep_s", "note"]
CPU_MODELS = ("bagnet9_small,bagnet17_small,bagnet33_small,resnet_small,vgg_small,densenet_small,"
              "bagnet33,resnet50")
QUICK_MODELS = "bagnet9_small"
DEFAULT_FAST = "eager,inference_mode,channels_last,fold_bn,fast"
QUICK_FAST = "eager,fast"
PAPER_RATIO = 155 / 570  # BagNet-33 / ResNet-50 images/s in Brendel & Bethge (2019)

VARIANTS: dict[str, FastConfig] = {
    "eager": FastConfig(channels_last=False, fold_bn=False, inference_mode=False),
    "inference_mode": FastConfig(channels_last=False, fold_bn=False, inference_mode=True),
    "channels_last": FastConfig(channels_last=True, fold_bn=False, inference_mode=False),
    "fold_bn": FastConfig(channels_last=False, fold_bn=True, inference_mode=False),
    "fast": FastConfig(channels_last=True, fold_bn=True, inference_mode=True),
    "compile": FastConfig(channels_last=False, fold_bn=False, inference_mode=False, compile=True),
    "fast+compile": FastConfig(channels_last=True, fold_bn=True, inference_mode=True, compile=True),
}
TRAIN_PATHS = ("eager", "channels_last", "compile", "fast", "fast+compile")


def default_size(name: str) -> int:
    """64 px for the CPU-sized zoo models, 224 for the full-size ones."""
    return 64 if name.endswith("_small") else 224


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help=f"comma-separated zoo names or 'all' (default: {CPU_MODELS}; --quick: {QUICK_MODELS})")
    p.add_argument("--size", type=int, default=None, help="input side (default: 64 for *_small models, else 224)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 8; --quick 2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast every path")
    p.add_argument("--fast", default=None,
                   help=f"paths to measure, comma-separated, from {','.join(VARIANTS)} "
                        f"(default: {DEFAULT_FAST}; --quick: {QUICK_FAST})")
    p.add_argument("--modes", default="infer,train", help="infer, train or both (default)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--weights", default=None, help="weights for create_model (default: random init)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --quick 1)")
    p.add_argument("--repeat", type=int, default=None, help="timed steps, median reported (default 5; --quick 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    p.add_argument("--quick", action="store_true", help="smoke run: one small model, 2 images, 2 timed steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/throughput.csv", help="CSV path (local or s3://)")
    a = p.parse_args(argv)
    a.models = a.models or (QUICK_MODELS if a.quick else CPU_MODELS)
    a.models = list_models() if a.models.strip() == "all" else [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in a.models if m not in list_models()]
    if unknown:
        p.error(f"--models: unknown model(s) {', '.join(unknown)}; known: {', '.join(list_models())}")
    a.fast = [f.strip() for f in (a.fast or (QUICK_FAST if a.quick else DEFAULT_FAST)).split(",") if f.strip()]
    bad = [f for f in a.fast if f not in VARIANTS]
    if bad:
        p.error(f"--fast: unknown path(s) {', '.join(bad)}; known: {', '.join(VARIANTS)}")
    a.fast = ["eager"] + [f for f in dict.fromkeys(a.fast) if f != "eager"]  # eager first: the baseline
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not a.modes or set(a.modes) - {"infer", "train"}:
        p.error(f"--modes: expected infer and/or train, got {a.modes}")
    a.batch = a.batch or (2 if a.quick else 8)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    a.repeat = a.repeat or (2 if a.quick else 5)
    return a


def make_inputs(size: int, batch: int, seed: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """A batch of synthetic-world validation images (normalised NCHW) and random labels; below
    the world's smallest side (64 px) the top-left ``size x size`` crop."""
    world = SyntheticWorld(seed=seed, image_size=max(size, 64))
    x = to_model_input(world.batch(range(batch), "val")["image"][:, :size, :size], device)
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(seed)).to(device)
    return x, y


def infer_step(model: nn.Module, x: Tensor, cfg: FastConfig, device: torch.device) -> Callable[[], Tensor]:
    """One forward pass in the grad mode and precision ``cfg`` asks for."""
    def step() -> Tensor:
        with inference_context(device, cfg.precision, inference_mode=cfg.inference_mode):
            return model(x)
    return step


def train_step(model: nn.Module, x: Tensor, y: Tensor, cfg: FastConfig, device: torch.device) -> Callable[[], Tensor]:
    """One SGD step (forward, cross-entropy, backward, update) in ``cfg``'s precision."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, cfg.precision):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def first_call(step: Callable[[], Any], fallback: Callable[[], Callable[[], Any]] | None = None
               ) -> tuple[Callable[[], Any], Any, float, str]:
    """Run ``step`` once (it compiles, if compiled); on failure switch to ``fallback()``.
    Returns (step, its output, seconds, note)."""
    start = time.perf_counter()
    try:
        out = step()
        return step, out, time.perf_counter() - start, ""
    except Exception as err:  # noqa: BLE001 - torch.compile failures vary by backend
        if fallback is None:
            raise
        msg = f"compile failed ({type(err).__name__}), eager used"
        warnings.warn(msg, stacklevel=2)
        step = fallback()
        start = time.perf_counter()
        return step, step(), time.perf_counter() - start, msg


def bench_model(name: str, a: argparse.Namespace, device: torch.device, table: Table) -> list[dict]:
    """Every requested (mode, path) of one model; returns the rows added to ``table``."""
    size = a.size or default_size(name)
    torch.manual_seed(a.seed)
    model = create_model(name, num_classes=a.num_classes, weights=a.weights).eval().to(device)
    x, y = make_inputs(size, a.batch, a.seed, device)
    y = y % a.num_classes
    with torch.no_grad():
        reference = model(x)  # eager fp32: what every inference path must reproduce
    rows: list[dict] = []
    base_rate: dict[str, float] = {}
    for mode in a.modes:
        for path in a.fast:
            if mode == "train" and path not in TRAIN_PATHS:
                continue
            cfg = replace(VARIANTS[path], precision=a.precision)
            start = time.perf_counter()
            if mode == "infer":
                net = optimize_for_inference(model, channels_last=cfg.channels_last, fold_bn=cfg.fold_bn,
                                             example_input=x)
                xin = to_channels_last(x) if cfg.channels_last else x
                step = infer_step(net, xin, cfg, device)
                fallback = (lambda net=net, xin=xin, cfg=cfg: infer_step(net, xin, cfg, device))
                if cfg.compile:
                    step = infer_step(compile_model(net, mode=a.compile_mode), xin, cfg, device)
            else:
                net = copy.deepcopy(model)
                if cfg.channels_last:
                    to_channels_last(net)
                xin = to_channels_last(x) if cfg.channels_last else x
                step = train_step(net, xin, y, cfg, device)
                fallback = (lambda net=net, xin=xin, cfg=cfg: train_step(net, xin, y, cfg, device))
                if cfg.compile:
                    step = train_step(compile_model(net, mode=a.compile_mode), xin, y, cfg, device)
            step, out, first_s, note = first_call(step, fallback if cfg.compile else None)
            prep_s = time.perf_counter() - start
            m = measure(step, warmup=max(a.warmup - 1, 0), repeat=a.repeat, device=device)
            rate = a.batch / m.median
            base_rate.setdefault(mode, rate)
            check = compare_outputs(reference, out) if mode == "infer" else {}
            if cfg.compile and not note:
                note = f"first call {first_s:.1f} s (compiles)"
            rows.append(table.add(
                model=name, size=size, batch=a.batch, mode=mode, path=path, images_per_s=rate,
                ms_per_batch=1000 * m.median, speedup=rate / base_rate[mode], peak_mb=m.peak_mb,
                max_rel_diff=check.get("max_rel_diff", ""), top1_agreement=check.get("top1_agreement", ""),
                prep_s=prep_s, note=note))
            del net, step, out
    return rows


def train_images_per_s(name: str, size: int, batch: int, *, device: str = "cpu", precision: str = "fp32",
                       channels_last: bool = False, num_classes: int = 1000, warmup: int = 1,
                       repeat: int = 3, seed: int = 0) -> float:
    """Training images/s of zoo model ``name`` (median SGD step): what a training job consumes."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes).to(dev)
    x, y = make_inputs(size, batch, seed, dev)
    cfg = FastConfig(channels_last=channels_last, fold_bn=False, inference_mode=False, precision=precision)
    if channels_last:
        to_channels_last(model)
        x = to_channels_last(x)
    m = measure(train_step(model, x, y % num_classes, cfg, dev), warmup=warmup, repeat=repeat, device=dev)
    return batch / m.median


def ratios(rows: list[dict], numerator: str = "bagnet33", denominator: str = "resnet50") -> list[tuple]:
    """``(mode, path, size, ratio)`` of ``numerator``/``denominator`` images/s, where both ran."""
    rate = {(r["model"], r["mode"], r["path"], r["size"]): r["images_per_s"] for r in rows}
    out = []
    for (model, mode, path, size), value in rate.items():
        if model == numerator and (denominator, mode, path, size) in rate:
            out.append((mode, path, size, value / rate[(denominator, mode, path, size)]))
    return out


def write_csv(table: Table, path: str) -> None:
    """``table.write_csv`` (atomic, local or s3://); a plain local write where ``store.storage``'s
    dependencies (pyarrow) are missing, e.g. on a bare GPU machine."""
    try:
        table.write_csv(path)
    except ImportError as err:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(table.csv_text())
        print(f"wrote {path} (plain write: {err})", flush=True)


def main(argv: Sequence[str] | None = None) -> Table:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
        torch.backends.cudnn.benchmark = True
    info = machine_info(device, a.precision, batch_size=a.batch)
    print(f"throughput on {info['device']} ({device}, {torch.get_num_threads()} threads, load {info['load_avg_1m']}), "
          f"{a.precision}, batch {a.batch}, warm-up {a.warmup}, median of {a.repeat}; "
          f"models {', '.join(a.models)}; paths {', '.join(a.fast)}; torch {torch.__version__}", flush=True)
    if device.type == "cuda":
        print(f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} "
              f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}", flush=True)
    table = Table(COLUMNS, info, width=12)
    rows: list[dict] = []
    for name in a.models:
        rows += bench_model(name, a, device, table)
    for mode, path, size, r in ratios(rows):
        print(f"BagNet-33 / ResNet-50 images/s ({mode}, {path}, {size} px, {a.precision}): {r:.3f} "
              f"(paper: 155/570 = {PAPER_RATIO:.3f}; {'at least' if r >= PAPER_RATIO else 'below'} the paper's)")
    write_csv(table, a.out)
    return table


if __name__ == "__main__":
    main()
