"""Stage two: train SAEs (vitscope.saes) from a cache. What is here is training only: the config
and its presets (config), the loop and its steps (trainer, run), reading the cache (loader,
readers), checkpoints, data parallelism, the metrics and report of a run, outlier tokens
(outliers), TensorBoard, and the planted-feature worlds of the benchmarks (synthetic)."""
