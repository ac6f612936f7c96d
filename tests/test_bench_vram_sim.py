"""bench/vram_sim.py: the storage-byte counter and the simulated training step, on tiny models (no real memory)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import vram_sim


def test_peak_bytes_counts_live_storages_once_and_their_peak():
    mode = vram_sim.PeakBytes()
    with mode:
        a = torch.empty(1000, dtype=torch.float32)      # 4,000 bytes
        b = a + 1                                         # 4,000 more
        view = b[:10]                                     # the same storage: not counted again
        del a
        c = torch.empty(500, dtype=torch.bfloat16)       # 1,000
    assert mode.peak == 8000
    assert mode.now == 5000 and view.shape == (10,) and c.numel() == 500


def test_simulated_step_counts_weights_state_and_activations():
    plain = vram_sim.simulate("tiny-sd1", 64, 2, False, steps=2, rank=4)
    assert plain["trained_parameters"] > 0 and plain["lora_modules"] > 0
    # weights are bf16 (2 bytes) apart from the fp32 adapters (4 bytes)
    expected = (plain["unet_parameters"] * 2 + plain["trained_parameters"] * 4) / vram_sim.GB
    assert plain["weights_gb"] == pytest.approx(expected, rel=0.05)
    # after the steps: + gradients freed (set_to_none) + AdamW's two fp32 moments per trained value
    assert plain["after_gb"] - plain["weights_gb"] == pytest.approx(
        plain["trained_parameters"] * 8 / vram_sim.GB, rel=0.05)
    assert plain["peak_gb"] > plain["after_gb"]                     # activations on top during the step
    bigger = vram_sim.simulate("tiny-sd1", 64, 8, False, steps=2, rank=4)
    assert bigger["peak_gb"] - bigger["after_gb"] > 2 * (plain["peak_gb"] - plain["after_gb"])
