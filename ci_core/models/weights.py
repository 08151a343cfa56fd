"""Where a backbone's weights come from: the shipped tiny CLIP, ``random:SEED``, an open_clip tag, or a file.

open_clip splits a model's factory from its pretrained weights; so does this toolkit: ``backbone.py`` builds
the model, this module finds and reads what fills it.

Pretrained tags are downloaded and cached by open_clip.  A tag already in the cache is loaded from there without
touching the network (``cached_pretrained_file``); a tag that needs a download first checks that the download
host answers (``reachable``), so that an offline machine gets a clear error within seconds instead of a long hang.

A weights file is ``.safetensors``, a torch state dict (read with ``torch.load(weights_only=True)``), or one of
OpenAI's own CLIP archives (``ViT-B-16.pt`` as the ``clip`` package downloads it).  Those are TorchScript
archives, which hold code; one is accepted only when its SHA-256 is the one OpenAI publishes for it
(``OPENAI_ARCHIVES``), and then only its parameters are read, by ``ci_core.models.safe_pickle`` (its code and constants
are never loaded).  It fixes the architecture (the open_clip name must match, QuickGELU is implied).  Any other
TorchScript archive is refused.  ``state_dict_sha256`` is the weights' identity a bundle records.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import pickle
import re
import socket
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import attrs
import open_clip
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ci_core.errors import ConfigError
from ci_core.files import atomic_file, file_sha256
from ci_core.models.safe_pickle import open_archive, script_tensors

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tiny_clip"  # the shipped tiny CLIP: config, weights
TINY_WEIGHTS = ASSETS / "weights.safetensors"
BUILTIN = "builtin"


QUICKGELU_SUFFIX = "-quickgelu"


NETWORK_TIMEOUT = 3.0  # seconds to wait for a download host before calling it unreachable


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of tensor names, shapes, dtypes and bytes: the same weights hash alike whatever file held them."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()



def read_tiny_weights(path: Path = TINY_WEIGHTS) -> dict[str, torch.Tensor]:
    """The tiny CLIP's weights; its token embedding is stored as the rows the world uses (others are zero)."""
    stored = load_file(str(path))
    ids, rows = stored.pop("token_embedding.ids"), stored.pop("token_embedding.rows")
    vocab = int(stored.pop("token_embedding.vocab_size").item())
    table = torch.zeros(vocab, rows.shape[1], dtype=rows.dtype)
    table[ids] = rows
    stored["token_embedding.weight"] = table
    return stored



def write_tiny_weights(model: open_clip.CLIP, used_token_ids: torch.Tensor, path: Path) -> None:
    """Store the tiny CLIP compactly: only the token-embedding rows its training text used."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    table = state.pop("token_embedding.weight")
    ids = torch.unique(used_token_ids).to(torch.int64)
    state["token_embedding.ids"] = ids
    state["token_embedding.rows"] = table[ids].contiguous()
    state["token_embedding.vocab_size"] = torch.tensor(table.shape[0])
    with atomic_file(path) as tmp:
        save_file(state, str(tmp))



LOCAL_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


# Entries of OpenAI's TorchScript state dicts that are not weights.
_NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size")


@attrs.frozen
class OpenAIArchive:
    """One of OpenAI's published CLIP TorchScript archives: its name in the ``clip`` package and in open_clip."""

    openai_name: str
    architecture: str
    quick_gelu: bool = True  # every OpenAI CLIP was trained with QuickGELU



# The SHA-256 of each archive, as published in the `clip` package's download URLs
# (https://openaipublic.azureedge.net/clip/models/<sha256>/<file>.pt); open_clip's "openai" tags name the same URLs.
OPENAI_ARCHIVES: dict[str, OpenAIArchive] = {
    "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762": OpenAIArchive("RN50", "RN50"),
    "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599": OpenAIArchive("RN101", "RN101"),
    "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd": OpenAIArchive("RN50x4", "RN50x4"),
    "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa": OpenAIArchive("RN50x16", "RN50x16"),
    "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c": OpenAIArchive("RN50x64", "RN50x64"),
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af": OpenAIArchive("ViT-B/32", "ViT-B-32"),
    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f": OpenAIArchive("ViT-B/16", "ViT-B-16"),
    "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836": OpenAIArchive("ViT-L/14", "ViT-L-14"),
    "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02": OpenAIArchive("ViT-L/14@336px", "ViT-L-14-336"),
}


# Tensor attributes of OpenAI's modules that are not parameters or buffers (the text tower's causal mask).
_SCRIPT_NOT_WEIGHTS = ("attn_mask",)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__



def is_torchscript(path: Path) -> bool:
    """A zip archive holding TorchScript code (``<name>/code/``) or constants (``<name>/constants.pkl``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.split("/", 1)[-1] == "constants.pkl" or n.split("/", 2)[1:2] == ["code"]
                       for n in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False



def load_openai_archive(path: Path) -> tuple[dict[str, torch.Tensor], OpenAIArchive]:
    """The parameters of a TorchScript archive, if it is one of OpenAI's published CLIP archives."""
    sha = file_sha256(path)
    archive = OPENAI_ARCHIVES.get(sha)
    if archive is None:
        known = ", ".join(f"{a.openai_name} {h[:12]}..." for h, a in OPENAI_ARCHIVES.items())
        raise ConfigError(
            f"weights file {path}: a TorchScript archive (it holds code), with SHA-256 {sha}, which is not one of "
            f"OpenAI's published CLIP archives ({known}). A TorchScript archive can run code when loaded, so only "
            "those, verified by hash, are read; give the weights as .safetensors or as a torch state dict instead")
    with open_archive(path, ConfigError, f"OpenAI's {archive.openai_name} CLIP archive") as opened:
        refs = script_tensors(opened)
        state = {k: opened.tensor(v) for k, v in refs.items()
                 if k not in _NOT_WEIGHTS and k.rsplit(".", 1)[-1] not in _SCRIPT_NOT_WEIGHTS}
    return state, archive



def load_local_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            # A torch file could hold arbitrary pickled objects: tensors only, never code.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        # weights_only refuses pickled code and TorchScript archives (OpenAI's original .pt files) alike.
        raise ConfigError(f"weights file {path}: not readable as plain tensors ({first_line(exc)}); give a "
                          ".safetensors file, or a state dict saved with torch.save (read with "
                          "torch.load(weights_only=True))") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file {path}: expected a mapping of tensor names to tensors")
    state = {k.removeprefix("module."): v for k, v in state.items() if k not in _NOT_WEIGHTS}
    return state



def load_fitting(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, name: str) -> None:
    """Load ``state`` into ``model`` if every tensor is there with its shape; else say what does not fit."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
                 for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        raise ConfigError(f"{what} does not fit {name}: {len(missing)} missing tensors {missing[:5]}, "
                          f"{len(unexpected)} unexpected {unexpected[:5]}, {len(misshaped)} of another shape "
                          f"{misshaped[:3]}")
    model.load_state_dict(state)



def _hf_repo_and_files(cfg: dict) -> tuple[str, tuple[str, ...]] | None:
    """The Hugging Face repository of a tag and the file names open_clip tries there, safetensors first."""
    hub = cfg.get("hf_hub", "")
    if not hub or not open_clip.pretrained.has_hf_hub():
        return None
    repo, filename = os.path.split(hub)
    filename = filename or open_clip.constants.HF_WEIGHTS_NAME
    return repo, (*open_clip.pretrained._get_safe_alternatives(filename), filename)



def cached_pretrained_file(cfg: dict, cache_dir: str | None = None) -> str | None:
    """The file of a pretrained tag if open_clip's cache holds it already (no network)."""
    hf = _hf_repo_and_files(cfg)
    if hf is not None:
        from huggingface_hub import try_to_load_from_cache

        repo, filenames = hf
        for filename in filenames:
            found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = cfg.get("url", "")
    if url:  # open_clip's own cache for plain URLs
        target = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(url)
        if target.is_file():
            return str(target)
    return None



def download_source(cfg: dict) -> str:
    """The URL open_clip would download a tag from (it prefers the Hugging Face hub)."""
    hf = _hf_repo_and_files(cfg)
    if hf is not None:
        from huggingface_hub import constants

        return f"{constants.ENDPOINT}/{hf[0]}"
    return cfg.get("url", "")



def reachable(url: str, timeout: float = NETWORK_TIMEOUT) -> bool:
    """Whether a TCP connection to the host of ``url`` (or to the configured proxy) opens within ``timeout``."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy:
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False



def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)



def _local_file_hint(name: str, cfg: dict) -> str:
    arch = name
    quick_name = name + QUICKGELU_SUFFIX
    if cfg.get("quick_gelu") and not name.endswith(QUICKGELU_SUFFIX) and quick_name in open_clip.list_models():
        arch = quick_name  # these weights were trained with QuickGELU, which a file does not record
    return (f"pass a local weights file instead: --backbone {arch} --pretrained /path/to/weights.safetensors "
            "(a .pt/.pth/.bin state dict is read with torch.load(weights_only=True))")



def create_from_tag(name: str, tag: str, cache_dir: str | None, allow_download: bool = True) -> torch.nn.Module:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    cached = cached_pretrained_file(cfg, cache_dir)
    try:
        if cached is not None:
            # Straight from the cache, with what the tag implies (activation, image statistics): no network.
            preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
            return open_clip.create_model(name, pretrained=cached, force_quick_gelu=bool(cfg.get("quick_gelu")),
                                          force_preprocess_cfg=preprocess, cache_dir=cache_dir)
        source = download_source(cfg)
        if not allow_download:
            raise ConfigError(f"pretrained {tag!r} for {name} is not in the open_clip cache, and it is not downloaded "
                              f"here (from {source or 'its source'}): download it once with open_clip, or "
                              f"{_local_file_hint(name, cfg)}")
        if _hf_repo_and_files(cfg) is not None and _hub_offline():
            raise ConfigError(f"pretrained {tag!r} for {name} is not in the open_clip cache and HF_HUB_OFFLINE is set, "
                              f"so it cannot be downloaded from {source}; {_local_file_hint(name, cfg)}")
        if not reachable(source):
            raise ConfigError(
                f"pretrained {tag!r} for {name} is not in the open_clip cache and its download from {source} is "
                f"unreachable (no network?); download it once on a machine with network (open_clip caches it) or "
                f"{_local_file_hint(name, cfg)}"
            )
        return open_clip.create_model(name, pretrained=tag, cache_dir=cache_dir)
    except ConfigError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/OSError/hub errors on failed downloads
        raise ConfigError(f"could not load pretrained {tag!r} for {name} ({first_line(exc)}); "
                          f"{_local_file_hint(name, cfg)}") from exc



def unknown_pretrained(name: str, pretrained: str) -> ConfigError:
    tags = open_clip.list_pretrained_tags_by_model(name)
    close = difflib.get_close_matches(pretrained, tags, n=3, cutoff=0.5)
    known = f"its open_clip tags are {', '.join(tags)}" if tags else "open_clip has no pretrained tag for it"
    return ConfigError(
        f"pretrained {pretrained!r} for {name}: not a tag, not 'random:SEED' and not a weights file "
        f"({', '.join(LOCAL_SUFFIXES)}); {known}" + (f" (close: {', '.join(close)})" if close else "")
    )



def looks_like_file(pretrained: str) -> bool:
    return Path(pretrained).suffix in LOCAL_SUFFIXES or os.sep in pretrained or Path(pretrained).is_file()



# random:SEED with a seed torch.manual_seed takes (it wraps negative seeds; beyond 64 bits it overflows).
_RANDOM = re.compile(r"random:(-?[0-9]{1,20})")


_SEED_RANGE = (-(2**63), 2**64 - 1)


def random_seed(pretrained: str) -> int | None:
    """The seed of ``random:SEED``, None for any other source; a malformed or out-of-range seed is an error."""
    if not pretrained.startswith("random:"):
        return None
    match = _RANDOM.fullmatch(pretrained)
    if not match or not _SEED_RANGE[0] <= int(match.group(1)) <= _SEED_RANGE[1]:
        raise ConfigError(f"pretrained {pretrained!r}: expected random:SEED with an integer seed from "
                          f"{_SEED_RANGE[0]} to {_SEED_RANGE[1]}")
    return int(match.group(1))

