"""Test-only fake of A1111 v1.10's `modules` package: the parts Training Lab's host adapter and extension script
use, with the same names and behaviour as a1111-host.md describes (paraphrased, not copied)."""
