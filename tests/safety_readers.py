"""Every entry point that reads a user's .safetensors file, as {name: reader(path)} for the fuzz tests
(tests/test_safety_fuzz.py) and tools/safety_fuzz.py. Lives in tests/ because it reaches every layer."""

from __future__ import annotations


def header_readers(workdir, *, model=None, output_root=None, parts=None, host=None, compare=False) -> dict:
    """{name: reader(path)}: each must return or raise UserError for any file, never anything else.

    `model` (a tiny checkpoint) and `output_root` enable the CLI `compare` path (slow: it renders); `parts` /
    `host` (a loaded tiny model) enable applying the file as compare does.
    """
    from pathlib import Path

    from lib_sdtrain.cli import main
    from lib_sdtrain.convert.lora import looks_like_diffusers_lora
    from lib_sdtrain.convert.output import read_metadata as convert_read_metadata
    from lib_sdtrain.evaluate import apply, runs
    from lib_sdtrain.formats import hashes
    from lib_sdtrain.formats import safetensors_io as io
    from lib_sdtrain.formats.kohya import import_kohya
    from lib_sdtrain.models.checkpoint import read_state_dict
    from lib_sdtrain.models.native import probe_model
    from lib_sdtrain.toy.detector import Detector
    from lib_sdtrain.toy.install import read_architecture
    from lib_sdtrain.train.estimate import family_of_file

    workdir = Path(workdir)

    def cli(argv):
        code = main(argv)
        if code not in (0, 1, 2):   # done, refused (convert), UserError
            raise AssertionError(f"exit code {code} from {argv[:2]}")
        return code

    def applied(p):
        run = runs.discover_run(p, host)
        applier = apply.make_applier(run, host, parts)
        try:
            for f in run.files:
                applier.apply(f, 1.0)
        finally:
            applier.close()

    readers = {
        "read_header": io.read_header, "read_metadata": io.read_metadata, "read_safetensors": io.read_safetensors,
        "model_load": read_state_dict, "preflight.probe_model": probe_model, "addnet_hash": hashes.addnet_hash, "lora_hash": hashes.lora_hash,
        "family_of_file": family_of_file, "kohya_import": import_kohya, "runs.file_metadata": runs.file_metadata,
        "runs.describe_file": runs.describe_file, "runs.discover_run": runs.discover_run,
        "apply.lora_settings": lambda p: apply._lora_settings_from_metadata(io.read_metadata(p)),
        "convert.read_metadata": convert_read_metadata, "convert.is_diffusers_lora": looks_like_diffusers_lora,
        "toy.detector": Detector.load, "toy.read_architecture": read_architecture,
        "cli.convert": lambda p: cli(["convert", str(p), "-o", str(workdir / "converted"), "--overwrite"]),
        "cli.convert_kohya": lambda p: cli(["convert", str(p), "-o", str(workdir / "converted"), "--overwrite",
                                            "--to", "kohya"]),
        "cli.info": lambda p: cli(["info", str(p)]),
    }
    if parts is not None:
        readers["apply.applier"] = applied
    if compare and model is not None:
        readers["cli.compare"] = lambda p: cli(["compare", str(p), "--model", str(model), "--prompts", "zwx toy",
                                                "--seeds", "1", "--steps", "1", "--size", "64", "--no-advice",
                                                "--device", "cpu", "--dtype", "fp32", "--no-base",
                                                "--output-root", str(output_root),
                                                "--out", str(workdir / "grid.png"), "--overwrite"])
    return readers
