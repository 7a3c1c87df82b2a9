"""Checkpoint loading: local and ``s3://`` paths, https URLs, BagNet release and torchvision names.

Downloads go through torch.hub's cache, as torch users expect: torchvision weights to
``torch.hub.get_dir()/checkpoints/<file name>`` (``$TORCH_HOME/hub/...``, the file torchvision's
own ``weights.get_state_dict()`` uses), any other URL to ``<cache_dir()>/<host>/<path>``, so two
URLs with the same file name never share an entry (:func:`cache_dir`: ``$BAGNET_CACHE``, else
torch.hub's ``checkpoints/``). Downloads show torch.hub's progress bar, and a file name carrying a
hash (torch.hub's convention, ``name-<sha256 prefix>.ext``) is checked before it enters the cache.
A file already there is used without touching the network, so offline machines can be served by
copying the checkpoint to :func:`cache_path`.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from store import storage

__all__ = [
    "RELEASE_URLS", "hub_checkpoints", "cache_dir", "cache_path", "hash_prefix", "resolve_url", "read_state_dict", "load_weights",
]

_RELEASE_PREFIX = (
    "https://bitbucket.org/wielandbrendel/bag-of-feature-pretrained-models/raw/"
    "249e8fa82c0913623a807d9d35eeab9da7dcc2a8/"
)
RELEASE_URLS: dict[str, str] = {
    "bagnet9": _RELEASE_PREFIX + "bagnet8-34f4ccd2.pth.tar",
    "bagnet17": _RELEASE_PREFIX + "bagnet16-105524de.pth.tar",
    "bagnet33": _RELEASE_PREFIX + "bagnet32-2ddd53ed.pth.tar",
}
# The original code names the models by q - 1.
_RELEASE_ALIASES = {"bagnet8": "bagnet9", "bagnet16": "bagnet17", "bagnet32": "bagnet33"}


TORCHVISION_HOST = "download.pytorch.org"  # where torchvision's weights enums point


def hub_checkpoints() -> Path:
    """torch.hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_dir() -> Path:
    """``$BAGNET_CACHE``, else torch.hub's checkpoint folder."""
    env = os.environ.get("BAGNET_CACHE")
    return Path(env).expanduser() if env else hub_checkpoints()


def cache_path(url: str) -> Path:
    """Where the checkpoint at ``url`` is (or would be) cached: keyed by host and path, except
    torchvision's weights, which share torch.hub's own file."""
    parts = urlparse(url)
    if parts.hostname == TORCHVISION_HOST:
        return hub_checkpoints() / os.path.basename(parts.path)
    return cache_dir() / parts.netloc.replace(":", "_") / parts.path.lstrip("/")


def hash_prefix(url: str) -> str | None:
    """The SHA-256 prefix a file name carries (``bagnet8-34f4ccd2.pth.tar``), torch.hub's convention."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(urlparse(url).path))
    return match.group(1) if match and match.group(1) else None


def _torchvision_url(weights: str, name: str | None) -> str | None:
    """URL of a torchvision weights name (``"ResNet50_Weights.IMAGENET1K_V2"``, ``"DEFAULT"``)."""
    if "." in weights and weights.split(".", 1)[0].endswith("_Weights"):
        try:
            return torchvision.models.get_weight(weights).url
        except (KeyError, ValueError, AttributeError):
            return None
    if name is None or not re.fullmatch(r"[A-Z][A-Z0-9_]*", weights):
        return None
    try:
        enum = torchvision.models.get_model_weights(name)
    except (KeyError, ValueError):
        return None
    member = enum.__members__.get(weights)
    return member.url if member is not None else None


def resolve_url(weights: str, name: str | None = None) -> str | None:
    """The download URL for a release or torchvision weights name, else ``None``.

    ``name`` is the zoo model name; it resolves ``"release"`` and short torchvision names.
    """
    if weights.startswith(("http://", "https://")):
        return weights
    key = name if weights == "release" else weights
    key = _RELEASE_ALIASES.get(key, key) if key else key
    if key in RELEASE_URLS:
        if weights == "release" or name is None or name == key:
            return RELEASE_URLS[key]
        raise ValueError(f"weights {weights!r} are the release of {key}, not of {name}")
    if weights == "release":
        raise ValueError(f"no released weights for model {name!r}; known: {list(RELEASE_URLS)}")
    return _torchvision_url(weights, name)


def _download(url: str) -> Path:
    path = cache_path(url)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    expected = hash_prefix(url)
    try:  # writes a temporary file and moves it into place only when the hash matches
        torch.hub.download_url_to_file(url, str(path), hash_prefix=expected, progress=True)
    except RuntimeError as exc:
        if expected and "invalid hash value" in str(exc):
            raise RuntimeError(f"download of {url} is corrupt: its SHA-256 does not start with {expected}, "
                               f"the hash its file name carries ({exc}); nothing was cached") from exc
        raise RuntimeError(f"could not download {url} ({exc}); download it elsewhere and place it at {path}") from exc
    except Exception as exc:  # noqa: BLE001 - any network failure gets the same advice
        raise RuntimeError(
            f"could not download {url} ({type(exc).__name__}: {exc}); "
            f"download it elsewhere and place it at {path}"
        ) from exc
    return path


def _unwrap(obj: Any, source: str) -> dict[str, Tensor]:
    """Plain state_dict from a checkpoint object; strips a DataParallel ``module.`` prefix."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{source} does not hold a state_dict (or a dict with one under "
                         "'state_dict' or 'model')")
    return {k.removeprefix("module."): v for k, v in obj.items()}


@dataclass(frozen=True)
class Saved:
    """Loaded weights: the state_dict, and the model spec saved with it (``model_spec`` key of a
    ``model.pt`` of this project; None for plain checkpoints)."""

    state_dict: dict[str, Tensor]
    spec: dict[str, Any] | None


def read_saved(weights: Any, name: str | None = None) -> Saved:
    """Load the weights from any source :func:`load_weights` accepts (on CPU), with their spec."""
    if isinstance(weights, Mapping):
        spec = weights.get("model_spec") if isinstance(weights.get("model_spec"), Mapping) else None
        return Saved(_unwrap(weights, "the given mapping"), spec)
    if hasattr(weights, "url") and hasattr(weights, "transforms"):  # torchvision WeightsEnum
        weights = weights.url
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if not isinstance(weights, str):
        raise TypeError(f"unsupported weights {weights!r}")
    if weights.startswith("s3://"):
        src: Any = io.BytesIO(storage.read_bytes(weights))
    elif Path(weights).expanduser().is_file():
        src = Path(weights).expanduser()
    else:
        url = resolve_url(weights, name)
        if url is None:
            raise ValueError(
                f"cannot resolve weights {weights!r} for model {name!r}: not a local file, "
                "s3:// path, URL, BagNet release name or torchvision weights name"
            )
        src = _download(url)
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types (EOFError, RuntimeError, UnpicklingError)
        detail = str(err).splitlines()[0] if str(err) else "empty or truncated file"
        raise ValueError(f"cannot load weights {weights} ({src}): {type(err).__name__}: {detail}") from None
    spec = state.get("model_spec") if isinstance(state, Mapping) else None
    state_dict = _fix_densenet_keys(_unwrap(state, weights))
    if bad := [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]:
        raise ValueError(f"weights {weights} hold NaN or infinite values in {len(bad)} tensor(s), e.g. {bad[0]!r}; "
                         "the training that wrote them diverged")
    return Saved(state_dict, spec if isinstance(spec, Mapping) else None)


def read_state_dict(weights: Any, name: str | None = None) -> dict[str, Tensor]:
    """The state_dict of any source :func:`load_weights` accepts (on CPU)."""
    return read_saved(weights, name).state_dict


def _fix_densenet_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename old torchvision DenseNet keys (``norm.1.weight`` -> ``norm1.weight``)."""
    pattern = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")
    return {pattern.sub(r"\1\2.", k): v for k, v in state.items()}


def load_weights(
    model: nn.Module, weights: Any, *, strict: bool = True, name: str | None = None, source: str | None = None
) -> nn.Module:
    """Load ``weights`` into ``model`` and return it.

    ``weights``: a state_dict, a local ``.pt/.pth/.pth.tar`` path, an ``s3://`` path (endpoint
    from ``AWS_ENDPOINT_URL``), an https URL, ``"release"`` / ``"bagnet33"`` etc. for the
    original BagNet checkpoints, or a torchvision weights name (``"IMAGENET1K_V1"``,
    ``"ResNet50_Weights.IMAGENET1K_V2"``, ``"DEFAULT"``). ``name`` is the zoo model name
    (default ``model.zoo_name``); ``source`` names the weights in errors (default ``weights``).
    A shape mismatch raises ``ValueError`` naming the key when ``strict``; otherwise mismatched
    keys are skipped with a warning.
    """
    name = name or getattr(model, "zoo_name", None)
    state = read_state_dict(weights, name)
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        details = "; ".join(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in bad
        )
        if strict:
            raise ValueError(f"shape mismatch loading {source or weights!r}: {details}")
        warnings.warn(f"skipping mismatched keys: {details}", stacklevel=2)
        state = {k: v for k, v in state.items() if k not in bad}
    model.load_state_dict(state, strict=strict)
    return model
