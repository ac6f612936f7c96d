"""Datasets: scan and validate folders, captions and tags, buckets, near-duplicates, recurring features, size
guidance and class pictures, one noun per module (style.md §3). Only `dataset.py` (pictures → tensors) imports
torch. Nothing here writes into a dataset unless the function says so and the user asked: caption sidecars
(`captions.apply_caption_changes` / `write_caption`) and moving copies aside (`dedupe.move_to_removed`).
"""
