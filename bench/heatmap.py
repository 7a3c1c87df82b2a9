"""Full-resolution heatmap time per image: bagnet.heatmap (dense / shift-and-stitch) vs the
patch-by-patch reference, same model, image and machine; values checked on the sampled pixels.

The reference is timed on ``--sample`` random pixels and scaled to all ``H*W`` patches (its cost
is linear in the number of patches); the table says so in its ``note`` column. Speedups are given
in wall time and in process CPU time (``cpu_*``; use ``--threads 1`` on a shared, busy machine).

    python -m bench.heatmap                      # BagNet-33 (full size), 224x224, CPU
    python -m bench.heatmap --device cuda --methods dense,shift --sample 4096
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from bagnet.imagenet import to_model_input
from bagnet.synthetic import SyntheticWorld
from bagnet.heatmap import DEFAULT_MAX_PIXELS, heatmap, reference_heatmap
from bagnet.models import create_model
from bench.harness import Table, add_timing_args, machine_info, measure, start_torch

COLUMNS = ["method", "height", "width", "patches_run", "seconds_run", "s_per_image", "speedup",
           "cpu_s_per_image", "cpu_speedup",
           "peak_cpu_mb", "peak_gpu_mb", "max_abs_diff", "max_abs_value", "max_pixels", "note"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.heatmap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bagnet33", help="zoo BagNet (default: bagnet33, full size)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--weights", default=None, help="weights for create_model (default: random init)")
    p.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("float32", "float64"), default="float32")
    p.add_argument("--methods", default="dense,shift", help="comma-separated: dense, shift")
    p.add_argument("--max-pixels", type=int, nargs="+", default=[DEFAULT_MAX_PIXELS],
                   help="memory bound(s) of bagnet.heatmap.heatmap to benchmark")
    p.add_argument("--sample", type=int, default=512, help="pixels the reference evaluates")
    p.add_argument("--batch-size", type=int, default=256, help="patches per reference forward")
    p.add_argument("--target", type=int, default=0, help="target class")
    add_timing_args(p, "bench/out/heatmap.csv")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Table:
    a = parse_args(argv)
    device = start_torch(a)
    dtype = getattr(torch, a.precision)
    h, w = a.size
    model = create_model(a.model, a.num_classes, weights=a.weights).eval().to(device, dtype)
    world = SyntheticWorld(seed=a.seed, image_size=max(h, w, 64))  # smaller worlds do not fit
    image = world.sample(0, "val").image[:h, :w]
    x = to_model_input(image[None], device).to(dtype)
    gen = torch.Generator().manual_seed(a.seed)
    k = min(a.sample, h * w)
    flat = torch.randperm(h * w, generator=gen)[:k]
    pixels = torch.stack([flat // w, flat % w], 1)
    print(f"{a.model} (q={model.q}, {'random init' if a.weights is None else a.weights}), "
          f"{h}x{w} image, {device}, {a.precision}, {torch.get_num_threads()} threads; "
          f"reference on {k} of {h * w} patches", flush=True)

    table = Table(COLUMNS, machine_info(device, a.precision, batch_size=1))
    ref_values: torch.Tensor | None = None

    def run_reference() -> None:
        nonlocal ref_values
        ref_values = reference_heatmap(model, x, a.target, pixels=pixels, batch_size=a.batch_size)

    ref = measure(run_reference, warmup=a.warmup, repeat=a.repeat, device=device)
    assert ref_values is not None
    ref_per_image = ref.median * (h * w) / k
    ref_cpu_per_image = ref.cpu_median * (h * w) / k
    table.add(method="reference", height=h, width=w, patches_run=k, seconds_run=ref.median,
              s_per_image=ref_per_image, speedup=1.0, cpu_s_per_image=ref_cpu_per_image,
              cpu_speedup=1.0, peak_cpu_mb=ref.cpu_peak_mb,
              peak_gpu_mb=ref.gpu_peak_mb, max_abs_diff=0.0,
              max_abs_value=ref_values.abs().max().item(), max_pixels="-",
              note=f"patch by patch, {a.batch_size}/forward; time x {h * w}/{k} (scaled)")
    for method in a.methods.split(","):
        for max_pixels in a.max_pixels:
            out: dict[str, torch.Tensor] = {}

            def run() -> None:
                out["map"] = heatmap(model, x, a.target, method=method, max_pixels=max_pixels)  # noqa: B023

            m = measure(run, warmup=a.warmup, repeat=a.repeat, device=device)
            sampled = out["map"][0, :, pixels[:, 0], pixels[:, 1]]
            diff = (sampled - ref_values[0]).abs().max().item()
            table.add(method=method, height=h, width=w, patches_run=h * w, seconds_run=m.median,
                      s_per_image=m.median, speedup=ref_per_image / m.median,
                      cpu_s_per_image=m.cpu_median, cpu_speedup=ref_cpu_per_image / m.cpu_median,
                      peak_cpu_mb=m.cpu_peak_mb, peak_gpu_mb=m.gpu_peak_mb, max_abs_diff=diff,
                      max_abs_value=out["map"].abs().max().item(), max_pixels=max_pixels,
                      note="whole map; diff on the sampled pixels")
    table.write_csv(a.out)
    return table


if __name__ == "__main__":
    main()
