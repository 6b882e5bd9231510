"""Settings of the commands that move an SAE: push and pull (the hub), to-saelens (an export)."""

from __future__ import annotations

from dataclasses import dataclass

from vitscope.support.shared_options import Overwrite


@dataclass(frozen=True)
class PushConfig:
    """Publish an SAE to the Hugging Face hub; the token comes from HF_TOKEN or `hf auth login`,
    never from a flag."""

    run: str
    """A run or SAE folder (cfg.json + sae.safetensors)."""
    repo: str
    """Hub repo to create or update, owner/name."""
    private: bool = False
    """Create the repo private."""


@dataclass(frozen=True)
class PullConfig(Overwrite):
    """Fetch an SAE from the Hugging Face hub."""

    ref: str
    """owner/name, or owner/name/path for one SAE in it."""
    out: str = ""
    """Copy the SAE folder here; empty = the hub cache. A folder pulled into before is updated."""
    revision: str = ""
    """Branch, tag or commit; empty = the default branch."""


@dataclass(frozen=True)
class ExportConfig(Overwrite):
    """An SAE in SAELens' layout."""

    run: str
    """An SAE: run folder, CLIP-Scope .pt or hub id."""
    out: str
    """Folder to write SAELens' cfg.json + weights into; an export written before is replaced."""
