"""vitscope: encode images through a ViT once into a Zarr activation cache, then train SAEs on it.

`vitscope.pipeline` (stage one) writes caches, `vitscope.cache_spec` is the on-disk contract,
`vitscope.train` (stage two) trains TopK SAEs from a cache; `vitscope.cli` is the command line.
"""
