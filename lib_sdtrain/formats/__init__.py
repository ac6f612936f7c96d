"""File formats: safetensors with metadata, A1111's .pt layouts, hashes, and safe file writing."""
