"""SAEs in and out: load any supported SAE, import CLIP-Scope's, export SAELens', share on the hub.

Modules: `load` (`load_sae`: a folder, a CLIP-Scope .pt file or a hub id), `clipscope` (CLIP-Scope's
released checkpoints), `saelens` (export to SAELens' layout), `hub` (push and pull with
huggingface_hub), `model_card` (the README.md a pushed SAE carries). The SAE itself and its
folder format live in stage two (`vitscope.saes.sae`, `saes/card.py`, `saes/folder.py`).
"""
