"""Stage one: run a ViT once over img2dataset shards and write its residual stream into a cache.

Modules: `download` (img2dataset with CLIP's settings), `shards` (tar reading, image decoding),
`dataset` (DataLoader workers, one shard each), `device_decode` (`--decode device`: decoding
and resizing on the model's device), `backbones` (one adapter per ViT family: open_clip, timm),
`model` (the vision tower, residual-stream hooks),
`writer` (chunks and commits of one shard), `run` (the main loop), `config` (the settings).
The one call a user makes: `pipeline.run.cache(CacheConfig(...))`, or `vitscope cache`.
"""
