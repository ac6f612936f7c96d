"""File formats: safetensors with metadata, A1111's .pt layouts, kohya names and layouts, hashes, safe file
writing, and the restricted reader of pickled files (`safe_pickle`, `unpickler`, `archive`: never runs pickled
code). Nothing here knows a model class: formats sit below `models/`, which loads and saves through them.
"""
