"""Looking inside a trained SAE: one streaming pass over its cache, then pictures and a browser.

Modules: `stats` (per-feature statistics and streaming top-N images with their token maps),
`analyze` (the pass: cache chunks -> sparse codes -> stats, resumable), `files` (the analysis
folder, ANALYSIS.md), `images` (reading top images back from the webdataset shards), `plots`
(PNG pictures), `browser` (the static feature browser). The one call a user makes:
`vitscope analyze RUN --cache CACHE`, then `vitscope browse RUN`. Stages never import this folder.
"""
