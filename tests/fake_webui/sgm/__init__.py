"""Test-only stand-in for Stability's `sgm` package (SDXL): DiffusionEngine, GeneralConditioner, embedders.

The SGM UNet and VAE have the same class and attribute names as the LDM ones, so they are reused from the
fake `ldm` package (as in the real packages, where sgm's copies are near-identical).
"""
