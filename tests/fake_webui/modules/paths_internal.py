"""modules.paths_internal: where the WebUI keeps things (set by `fake_webui.configure(root)`)."""

import os

script_path = os.path.abspath(".")
data_path = script_path
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
default_output_dir = os.path.join(data_path, "outputs")
config_states_dir = os.path.join(script_path, "config_states")
