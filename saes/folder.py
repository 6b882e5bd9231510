"""An SAE on disk: a folder holding cfg.json (its card, saes/card.py) and sae.safetensors.

Run folders from `vitscope train`, checkpoints and folders fetched from the hub all have this
shape; anything else is refused in one line that names the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from vitscope.saes.architectures import build_sae
from vitscope.saes.card import SAECard, SAEFormatError, read_card
from vitscope.saes.sae import TopKSAE
from vitscope.support.records import write_atomically

CARD_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
NOT_AN_SAE_FIX = (
    "pass a folder written by `vitscope train` or `vitscope pull`, a CLIP-Scope .pt file, "
    "or a hub id"
)


def save_sae_folder(folder: Path, sae: TopKSAE, card: SAECard) -> None:
    """Write weights, then the card, each atomically (a reader never sees half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in sae.state_dict().items()}
    write_atomically(folder / WEIGHTS_FILE, save(tensors))
    write_atomically(folder / CARD_FILE, json.dumps(card.to_json(), indent=2).encode())


def load_sae_folder(folder: Path, device: str | torch.device = "cpu") -> TopKSAE:
    """The SAE in `folder`, its card attached; any supported format version."""
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise SAEFormatError(
            folder, "an SAE folder (cfg.json + sae.safetensors)", _what_is(folder), NOT_AN_SAE_FIX
        )
    card = read_card(card_path)
    k_aux = (card.training or {}).get("k_aux", 0)
    sae = build_sae(
        card.architecture,
        card.d_in,
        card.n_latents,
        card.k,
        k_aux,
        card.matryoshka_widths,
        activation=card.activation,
    )
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
    sae.card = card
    sae.set_input_norm(card.input_norm)
    return sae.to(device)


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
