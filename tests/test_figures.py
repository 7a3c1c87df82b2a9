"""The report's charts: PNG at 150 dpi with an SVG beside, small multiples, log2 axes."""

import io

import matplotlib.pyplot as plt
import pandas as pd
from PIL import Image

from analysis import figures


def frame() -> pd.DataFrame:
    rows = [{"model": m, "ranking": r, "k": k, "logit": 10 - k * (i + 1) * (j + 1), "logit_sd": 0.5 * k}
            for i, m in enumerate(("bagnet9_small", "resnet_small")) for j, r in enumerate(("heatmap", "random"))
            for k in (0, 1, 2, 4)]
    return pd.DataFrame(rows)


def width(png: bytes) -> int:
    return Image.open(io.BytesIO(png)).size[0]


def test_charts_are_print_resolution_png_and_svg():
    df = frame()
    one = figures.lines_figure(df[df["ranking"] == "random"], "k", [("logit", "label logit")],
                               ["bagnet9_small", "resnet_small"], guides={"bagnet9_small": (8, "q−1=8")},
                               guide_label="q − 1")
    assert set(one) == {"png", "svg"} and b"<svg" in one["svg"] and "q−1=8" in one["svg"].decode()
    assert width(one["png"]) >= 0.8 * 4.2 * figures.DPI and figures.DPI >= 150  # a 4.2-inch panel plus legend
    multi = figures.small_multiples_figure(df, "k", [("logit", "label logit")], ["bagnet9_small", "resnet_small"],
                                           "ranking", style_label="ranking")
    svg = multi["svg"].decode()
    assert svg.count(">bagnet9_small<") == 1 and svg.count(">random<") == 1  # a panel title each, one legend
    assert figures.lines_figure(df, "k", [("logit", "label logit")], ["bagnet9_small"], style="ranking")


def test_log2_axis_ticks_the_values():
    fig, ax = plt.subplots()
    figures.log2_axis(ax, [4, 8, 16, 64])
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["4", "8", "16", "64"]
    plt.close(fig)
