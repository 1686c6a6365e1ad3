"""The data side of cogpipe: from a dataset to the batches a training step takes.

- folders: the three folder layouts, `scan`, decoding, sampling, resize/crop, `VideoDataset`;
- checks: the dataset check (`cogpipe check`), buckets;
- cache: the content-keyed latent and prompt-embedding cache train.py builds for a folder;
- batches: data order and the per-example randomness of a step.
"""
