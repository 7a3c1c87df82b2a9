"""Images/s of patch certification (bagnet.patch_defense) against the plain forward pass.

Certification reuses the patch logits: one ``patch_logits`` evaluation (the forward pass with
``fc`` applied per cell instead of after the mean) and the certificate math on ``(N, C, H', W')``.
Rows: ``forward`` (``model(x)``), ``patch_logits``, ``certify_<defense>`` (patch logits + that
defense's prediction and certificate) and ``certify_all`` (all four defenses from one evaluation
of the patch logits); ``cost_vs_forward`` = seconds / forward seconds (goal: <= 1.2).

    python -m bench.patch_certify                                      # BagNet-17, 224 px, p=32, CPU
    python -m bench.patch_certify --device cuda --batch-size 64
    python -m bench.patch_certify --model bagnet17_small --num-classes 10 --size 64 --patch 8 --batch-size 4 --repeat 1
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from bagnet.models import create_model
from bagnet.patch_defense import DEFENSES, Geometry, certify
from bench.harness import Table, add_timing_args, machine_info, measure, start_torch

COLUMNS = ["method", "model", "size", "patch_px", "window", "batch_size", "seconds", "images_per_s",
           "cost_vs_forward", "cpu_cost_vs_forward", "peak_cpu_mb", "peak_gpu_mb"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.patch_certify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bagnet17", help="zoo BagNet (default: bagnet17, full size)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--weights", default=None, help="weights for create_model (default: random init)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--patch", type=int, default=32, help="patch side p (px)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    add_timing_args(p, "bench/out/patch_certify.csv")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Table:
    a = parse_args(argv)
    device = start_torch(a)
    model = create_model(a.model, a.num_classes, weights=a.weights).eval().to(device)
    x = torch.randn(a.batch_size, 3, a.size, a.size, device=device)
    geometry = Geometry(model.q, model.stride, model.offset, model.patch_grid(a.size, a.size))
    window = geometry.window(a.patch)
    print(f"{a.model} (q={model.q}), {a.size} px, p={a.patch} -> window {window} of {geometry.grid} cells, "
          f"batch {a.batch_size}, {device}, {torch.get_num_threads()} threads", flush=True)

    def certify_with(defenses: Sequence[str]):
        def run() -> None:
            logits = model.patch_logits(x)
            for defense in defenses:
                certify(logits, defense, window)
        return run

    methods = {"forward": lambda: model(x), "patch_logits": lambda: model.patch_logits(x)}
    methods.update({f"certify_{d}": certify_with([d]) for d in DEFENSES if d != "undefended"})
    methods["certify_all"] = certify_with(DEFENSES)
    table = Table(COLUMNS, machine_info(device, "float32", batch_size=a.batch_size))
    base = None
    with torch.inference_mode():
        for method, fn in methods.items():
            m = measure(fn, warmup=a.warmup, repeat=a.repeat, device=device)
            base = base or m
            table.add(method=method, model=a.model, size=a.size, patch_px=a.patch, window=f"{window[0]}x{window[1]}",
                      batch_size=a.batch_size, seconds=m.median, images_per_s=a.batch_size / m.median,
                      cost_vs_forward=m.median / base.median, cpu_cost_vs_forward=m.cpu_median / base.cpu_median,
                      peak_cpu_mb=m.cpu_peak_mb, peak_gpu_mb=m.gpu_peak_mb)
    table.write_csv(a.out)
    return table


if __name__ == "__main__":
    main()
