"""Weights downloads as torch users expect them (bagnet.weights): torch.hub's cache and progress
bar, the hash a file name carries checked, one cache entry per URL. Served by a local HTTP server."""

import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision

from bagnet import weights as W
from bagnet.models import create_model


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path / "www"``; yields (root folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch.hub's cache under ``tmp_path`` (TORCH_HOME), no BAGNET_CACHE override."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("BAGNET_CACHE", raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def publish(root: Path, folder: str, stem: str, state: dict, *, hashed: bool = True) -> str:
    """Save ``state`` under ``root/folder``, named ``stem-<sha256 prefix>.pth`` (torch.hub's
    convention) when ``hashed``; returns the path part of its URL."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    tmp = root / folder / "tmp.pth"
    torch.save(state, tmp)
    name = f"{stem}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth" if hashed else f"{stem}.pth"
    tmp.rename(root / folder / name)
    return f"{folder}/{name}"


def state_of(seed: int) -> dict:
    torch.manual_seed(seed)
    return create_model("bagnet9_small", num_classes=3).state_dict()


def test_download_goes_to_torch_hub_cache_with_progress_and_hash(server, hub, capsys):
    root, base = server
    state = state_of(0)
    url = f"{base}/{publish(root, 'v1', 'tiny', state)}"
    model = create_model("bagnet9_small", num_classes=3, weights=url)
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])
    cached = W.cache_path(url)
    assert cached.is_file() and cached.is_relative_to(hub)  # TORCH_HOME/hub/checkpoints/<host>/<path>
    assert cached.name == url.rsplit("/", 1)[1]
    assert "100%" in capsys.readouterr().err  # torch.hub's progress bar
    (root / url.split(base + "/")[1]).unlink()  # served from the cache from now on
    assert torch.equal(W.read_state_dict(url)["fc.weight"], state["fc.weight"])


def test_two_urls_with_one_file_name_do_not_collide(server, hub):
    root, base = server
    first, second = state_of(1), state_of(2)
    for folder, state in (("a", first), ("b", second)):
        (root / folder).mkdir()
        torch.save(state, root / folder / "model.pth")
    urls = [f"{base}/a/model.pth", f"{base}/b/model.pth"]
    assert W.cache_path(urls[0]) != W.cache_path(urls[1])
    got = [W.read_state_dict(u)["fc.weight"] for u in urls]
    assert torch.equal(got[0], first["fc.weight"]) and torch.equal(got[1], second["fc.weight"])


def test_a_file_whose_hash_differs_from_its_name_is_refused(server, hub):
    root, base = server
    path = publish(root, "v1", "tiny", state_of(3))
    stale = path.rsplit("-", 1)[0] + "-00000000.pth"  # another file's hash in the name
    (root / path).rename(root / stale)
    url = f"{base}/{stale}"
    with pytest.raises(RuntimeError, match=r"SHA-256 does not start with 00000000.*nothing was cached"):
        W.read_state_dict(url)
    assert not W.cache_path(url).exists() and not list(W.cache_path(url).parent.glob("*"))
    assert W.hash_prefix(url) == "00000000" and W.hash_prefix(f"{base}/v1/model.pth") is None


def test_torchvision_weights_share_torch_hub_file(hub):
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    assert W.cache_path(W.resolve_url("IMAGENET1K_V1", "resnet50")) == hub / url.rsplit("/", 1)[1]
