"""An SAE on disk: a folder holding cfg.json (its card, saes/card.py) and sae.safetensors, and
reading cfg.json of every format version (SAE_FORMAT.md, "Versions").

Run folders from `vitscope train`, checkpoints and folders fetched from the hub all have this
shape; anything else is refused in one line that names the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from vitscope.saes.architectures import ARCHITECTURES, build_sae
from vitscope.saes.architectures.topk import TopKOptions
from vitscope.saes.card import SAE_FORMAT_VERSION, SAECard, SAEFormatError
from vitscope.saes.sae import SAE
from vitscope.support.records import parse_record, read_json, write_atomically

CARD_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
NOT_AN_SAE_FIX = (
    "pass a folder written by `vitscope train` or `vitscope pull`, a CLIP-Scope .pt file, "
    "or a hub id"
)


def save_sae_folder(folder: Path, sae: SAE, card: SAECard) -> None:
    """Write weights, then the card, each atomically (a reader never sees half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in sae.state_dict().items()}
    write_atomically(folder / WEIGHTS_FILE, save(tensors))
    write_atomically(folder / CARD_FILE, json.dumps(card.to_json(), indent=2).encode())


def load_sae_folder(folder: Path, device: str | torch.device = "cpu") -> SAE:
    """The SAE in `folder`, its card attached; any supported format version."""
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise SAEFormatError(
            folder, "an SAE folder (cfg.json + sae.safetensors)", _what_is(folder), NOT_AN_SAE_FIX
        )
    card = read_card(card_path)
    sae = build_sae(card)
    weights_path = folder / WEIGHTS_FILE
    try:
        tensors = load_file(weights_path, device=str(device))
    except FileNotFoundError:
        raise SAEFormatError(
            weights_path, "the SAE's weights", "no such file", NOT_AN_SAE_FIX
        ) from None
    except (SafetensorError, OSError) as err:
        raise SAEFormatError(
            weights_path, "a safetensors file", f"unreadable bytes ({err})"
        ) from None
    expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        raise SAEFormatError(
            weights_path,
            f"tensors {_shapes(expected)} (as {card_path.name} says)",
            _shapes(found),
            "the weights do not belong to this cfg.json",
        )
    sae.load_state_dict(tensors)
    return sae.to(device)


def read_card(path: Path) -> SAECard:
    """Parse cfg.json (any supported format version); SAEFormatError names the file and field."""
    data = read_json(path, SAEFormatError)
    if not isinstance(data, dict):
        raise SAEFormatError(path, "a JSON object (an SAE's cfg.json)", type(data).__name__)
    if "format_version" not in data:
        return _card_from_format_0(data, path)
    version = str(data["format_version"])
    if version.split(".")[0] != SAE_FORMAT_VERSION.split(".")[0]:
        raise SAEFormatError(
            path,
            f"SAE format {SAE_FORMAT_VERSION.split('.')[0]}.x",
            f"format {version}",
            "upgrade vitscope to read it (pip install -U vitscope)",
        )
    name = data.get("architecture", "topk")  # 1.0 cards name none: all were TopK
    if not isinstance(name, str) or name not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES)
        raise SAEFormatError(path, f"an architecture of {known}", repr(name))
    options = parse_record(
        ARCHITECTURES[name].Options, data, path, f"{name} SAE card", SAEFormatError
    )
    return parse_record(SAECard, {**data, "options": options}, path, "SAE card", SAEFormatError)


def _card_from_format_0(data: dict[str, Any], path: Path) -> SAECard:
    """Before format 1.0 cfg.json was the training config plus d_in, n_latents, k, k_aux and
    input_scale; the model was only named by the cache it was trained on."""
    missing = [key for key in ("d_in", "n_latents", "k", "input_scale") if key not in data]
    if missing:
        raise SAEFormatError(
            path,
            "an SAE card (format_version, d_in, n_latents, k, ...)",
            f"no {', '.join(missing)}",
            "point at a folder written by `vitscope train`",
        )
    return SAECard(
        d_in=data["d_in"],
        n_latents=data["n_latents"],
        options=TopKOptions(k=data["k"]),
        input_scale=data["input_scale"],
        layer=data.get("layer"),
        token_set=data.get("token_set", "all"),
        tokens_trained=data.get("tokens", 0),
        training=data,
        format_version="0",
    )


def _what_is(folder: Path) -> str:
    if not folder.exists():
        return "no such file or directory"
    if not folder.is_dir():
        return "a file that is neither an SAE folder nor a CLIP-Scope .pt file"
    inside = sorted(p.parent.name for p in folder.glob(f"*/{CARD_FILE}"))
    if inside:
        return f"no cfg.json, but SAEs in {', '.join(inside)}: load one of them"
    return "no cfg.json"


def _shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {list(shape)}" for name, shape in sorted(shapes.items()))
