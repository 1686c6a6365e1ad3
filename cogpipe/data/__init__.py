"""The data side of cogpipe: from a dataset to the batches a training step takes (docs/data.md).

- folders: the three folder layouts, `scan`, decoding, sampling, resize/crop, `VideoDataset`;
- checks: the dataset check (`cogpipe check`), buckets;
- cache: the content-keyed latent and prompt-embedding cache train.py builds for a folder;
- batches: data order and the per-example randomness of a step;
- store: the latent store (Parquet shards by bucket, index.json), its writer and `verify`;
- reader: training from a store (`data.store`): the order, the examples, a machine's shard cache.
"""
