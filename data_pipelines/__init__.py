"""Offline data tooling: tokenizer training, tokenization into webdataset shards, the default corpus.

Installed as `nopetrain.data_pipelines` (PyPI already has a `data-pipelines` package).
"""
