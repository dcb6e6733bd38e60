"""tools/dense_backbone_profile.py: its bookkeeping on CPU (the measurement itself needs a GPU)."""
import pytest
import torch
from tool_helpers import load_tool

tool = load_tool("dense_backbone_profile")


def test_busy_time_is_the_union_of_kernel_intervals():
    # overlapping, nested, touching and separate intervals (µs), unsorted
    assert tool._busy_ms([(50, 60), (0, 10), (5, 20), (6, 8), (20, 30)]) == pytest.approx(0.040)
    assert tool._busy_ms([]) == 0.0


@pytest.mark.parametrize("name,message", [("defmamba_huge", "DefMamba variants are"),
                                          ("convnext_tiny+compile", "compiles DefMamba's token mixers"),
                                          ("defmamba_tiny+fast", "the only option")])
def test_bad_model_names_are_explained(name, message):
    with pytest.raises(SystemExit, match=message):
        tool.make_backbone(name, 0.0)


@pytest.mark.cuda
def test_profiles_a_small_backbone_gpu():
    model = tool.make_backbone("defmamba_tiny", 0.1)
    result = tool.measure(model, torch.randn(1, 3, 96, 160, device="cuda"), warmup=1, repeats=2, top=3)
    assert result["wall_ms"] > 0 and 0 < result["gpu_busy_ms"] and result["launches"] > 100
    assert len(result["top_kernels"]) == 3
