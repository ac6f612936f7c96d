"""Datasets: scan and validate folders, captions and tags, buckets, near-duplicates, recurring features, size
guidance and class pictures. One noun per module (style.md §3); nothing here imports torch, and nothing writes
into a dataset unless a function says so in its name and the user asked (captions, `dedupe.move_to_removed`).
"""
