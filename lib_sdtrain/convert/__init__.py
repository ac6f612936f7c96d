"""Safe conversion of pickled model files (.ckpt/.pt/.pth/.bin) to .safetensors, and format conversions.

- the restricted readers they all use live in `formats/` (`safe_pickle.py`, `unpickler.py`, `archive.py`),
  where the model loader can use them too without importing the converters
- `checkpoint.py`, `embedding.py`, `hypernetwork.py`  one converter (or refusal) per file kind
- `output.py`     options, results, verified atomic .safetensors writing, A1111 hashes
- `batch.py`      inputs/folders -> output names -> results, with progress events
- `lora.py`       diffusers / PEFT LoRA key layouts -> kohya (A1111-loadable) LoRA files
- `diffusers_folder.py`  a diffusers model folder <-> a single-file checkpoint (SD1, SD2, SDXL)
- `report.py`     routing of inputs to converters and the Convert tab's plain handlers

Importing this package pulls in no torch; the modules above import it when they run.
"""
