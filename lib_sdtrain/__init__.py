"""Training Lab core: Stable Diffusion training that runs inside A1111 or on its own.

Importing the package pulls in neither torch nor gradio; submodules import what they need.
"""

__version__ = "0.1.0"
