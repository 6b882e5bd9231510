"""The SAE artifact, below the stages that train and analyse it: what an SAE is and computes,
on disk and in memory, whoever made it. It imports only `vitscope.support` (and torch).

Modules: `sae` (the `SAE` base: weights, encode/decode, AuxK, losses, the recipe's rules),
`architectures/` (the registry and one module per architecture: topk, batchtopk, matryoshka),
`kernels` (the sparse products, one named function per implementation), `aux` (AuxK's
reconstruction, sparse or dense over the dead latents), `card` (`SAECard`, the
cfg.json record), `folder` (cfg.json + sae.safetensors, every format version; SAE_FORMAT.md),
`load` (`load_sae`), `clipscope` (CLIP-Scope's checkpoints), `saelens` (export to SAELens),
`hub` (push and pull), `model_card` (the README.md a pushed SAE carries).

The one call a user makes: `vitscope.load_sae(ref)` (a folder, a CLIP-Scope .pt or a hub id).

Adding an architecture NAME:
1. `architectures/NAME.py`: a frozen dataclass `NAMEOptions(Options)` with `architecture =
   "NAME"` and its card fields (bounds as `Annotated[..., AtLeast(...)]`, defaults, `check` for
   what depends on n_latents), and `NAMESAE(SAE)` with `Options = NAMEOptions`, its keep rule
   (`_select`; `_encode_rows` if inference differs), `extra_losses` if it has loss terms of its
   own, and `saelens_layout`.
2. `architectures/__init__.py`: add the class to the registration line.
3. `SAE_FORMAT.md`: a `### `NAME`` table of its fields (tests/test_spec_doc.py checks it) and a
   line under "Versions".
`vitscope train --architecture NAME` then builds it from the settings named like its fields.
"""
