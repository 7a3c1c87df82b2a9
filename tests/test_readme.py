"""The README's "Heatmap of your own image" snippet runs as written, on a locally saved model."""

import re
import tomllib
from pathlib import Path

import yaml
from PIL import Image

from bagnet.models import ModelSpec, create_model, model_bytes
from bagnet.synthetic import SyntheticWorld

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def snippet() -> str:
    section = README.read_text().split("## Heatmap of your own image", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section holds one python block"
    return blocks[0]


def test_heatmap_snippet_runs_on_a_saved_model(tmp_path, monkeypatch):
    world = SyntheticWorld()
    model = create_model("bagnet33_small", num_classes=world.num_classes)
    spec = ModelSpec("bagnet33_small", world.num_classes, {}, classes=list(world.class_names))
    weights = tmp_path / "results" / "train" / "synthetic" / "model.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(model_bytes(model, spec))  # as jobs/train.py exports it
    Image.fromarray(world.sample(0, "val").image).save(tmp_path / "my_image.png")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet(), "README.md", "exec"), scope)
    assert scope["maps"].shape == (1, 1, 64, 64)
    assert (tmp_path / "my_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert lines[:6] == ["# bagnet-toolkit", "", "```bash", "bash scripts/install.sh && .venv/bin/python jobs/train.py",
                         "bash scripts/install.sh --test && .venv/bin/python -m pytest -q", "```"]


def test_license_and_citation_match_the_project():
    license = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert license == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["license"] == license and cff["cff-version"] == "1.2.0"
    paper = cff["preferred-citation"]
    assert [a["family-names"] for a in paper["authors"]] == ["Brendel", "Bethge"] and paper["year"] == 2019
