"""Data: text sources → token shards (``sources``, ``prepare``) → batches for training (``loader``).

The shard directory and its ``manifest.json`` are the stable contract between stages; see docs/data.md.
"""
