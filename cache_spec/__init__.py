"""The on-disk contract between stage one (pipeline/) and stage two (train/); SPEC.md is its prose.

Modules: `layout` (names, attrs and commit records), `storage` (float16 / 8-bit encodings),
`codecs` (compression presets), `store` (create, validate, write, read), `location` (a folder or
an object store, and what is atomic on each), `chunk_files` (a chunk read straight from its file
or object), `info` (a summary), `outliers` (γ and token norms of a sample), `verify` (every
chunk read, the damaged named). The one call a user makes: `open_cache(path, layer=20)`, where
path may be a URL (`s3://bucket/cache`).
"""

from vitscope.cache_spec.errors import CacheSpecError
from vitscope.cache_spec.layout import CLIP_SCOPE_LAYERS, SPEC_VERSION, CacheAttrs, ShardCommit
from vitscope.cache_spec.store import Cache, ChunkRef, create_or_open, open_cache

__all__ = [
    "CLIP_SCOPE_LAYERS",
    "SPEC_VERSION",
    "Cache",
    "CacheAttrs",
    "CacheSpecError",
    "ChunkRef",
    "ShardCommit",
    "create_or_open",
    "open_cache",
]
