"""Test-only re-implementation of the CompVis `ldm` modules A1111 v1.10 builds SD1/SD2 from.

Same class names, attribute names and state-dict keys as `repositories/stable-diffusion-stability-ai/ldm`, at
any width (the tests use the tiny widths of `lib_sdtrain.testing.tiny`). Written for the fake WebUI only.
"""
