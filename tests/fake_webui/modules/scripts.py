"""modules.scripts: `basedir()` is the extension folder only while its scripts are being loaded."""

from modules import paths_internal

current_basedir = paths_internal.script_path
scripts_data = []


def basedir():
    return current_basedir
