"""Looking inside a trained SAE: one streaming pass over its cache, then pictures, a browser and
judgements of its features.

Modules: `stats` (per-feature statistics and streaming top-N images with their token maps),
`analyze` (the pass: cache chunks -> sparse codes -> stats, resumable), `files` (the analysis
folder, ANALYSIS.md), `images` (reading top images back from the webdataset shards), `plots`
(PNG pictures), `browser` (the static feature browser), `sorteval` and `sorteval_run` (the sort
eval) with its judges `judge_clip`, `judge_http` and the game page for people, `splice`
(the SAE spliced into the vision tower), `monosemanticity` (the MonoSemanticity Score of every
feature), `text_labels`, `label_files`, `browser_labels` and `search` (features named in words
by a CLIP text tower, and found by text), `compare` (layers side by side). The calls a user
makes: `vitscope analyze RUN`, `browse`, `sorteval`, `splice`, `monosemanticity`, `search`,
`compare`. Stages never import this folder.
"""
