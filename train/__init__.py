"""Stage two: train TopK sparse autoencoders from a cache (see issue 4)."""
