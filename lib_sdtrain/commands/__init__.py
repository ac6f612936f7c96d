"""One module per CLI command: `add_arguments(parser)` and `run(args) -> int` (see `lib_sdtrain.cli`)."""
