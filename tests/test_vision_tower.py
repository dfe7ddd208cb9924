"""The vision tower against transformers' Qwen3VLVisionModel on a tiny random checkpoint."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import TINY_VISION, TINY_VL_TEXT

from qwen3chat.errors import QwenChatError
from qwen3chat.model.vision import VisionConfig, VisionTower, vision_tensor_shapes

transformers = pytest.importorskip("transformers")

PREFIX = "model.visual."

GRIDS = {
    "one image": [[1, 4, 6]],
    # The second image is larger than the 8x8 position table: it upsamples.
    "two images": [[1, 4, 6], [1, 10, 12]],
    "video": [[2, 4, 4]],
    "image and video": [[1, 2, 2], [3, 6, 4]],
}


def tiny_hf_config():
    return transformers.Qwen3VLConfig(
        text_config=dict(TINY_VL_TEXT, vocab_size=1000, num_hidden_layers=1),
        vision_config=TINY_VISION,
    )


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every tensor visibly shapes the output, yet activations
    stay O(1): matrices scaled by fan-in, LayerNorm gains around 1, noticeable biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if (
                name.endswith("norm1.weight")
                or name.endswith("norm2.weight")
                or (name.endswith("norm.weight") and p.ndim == 1)
            ):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif name.endswith("pos_embed.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5 / fan_in**0.5)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.Qwen3VLForConditionalGeneration(tiny_hf_config()).eval()
    randomise(model.model.visual, seed=1)
    return model


@pytest.fixture(scope="module")
def visual_state(hf_model):
    """The tower's tensors as a checkpoint names them, prefix stripped."""
    state = hf_model.state_dict()
    return {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def config(hf_model):
    return VisionConfig.from_hf_dict(hf_model.config.to_dict())


@pytest.fixture(scope="module")
def tower(config, visual_state):
    model = VisionTower(config).eval()
    model.load_state_dict(visual_state, strict=True)
    return model


def pixels(config: VisionConfig, grid: list[list[int]], seed: int = 2) -> torch.Tensor:
    patches = sum(t * h * w for t, h, w in grid)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(patches, config.patch_dim, generator=gen)


def reference(hf_model, pixel_values, grid_thw):
    with torch.no_grad():
        out = hf_model.model.visual(pixel_values, grid_thw=grid_thw)
    return out.pooler_output, out.deepstack_features


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Max error within ``tol`` of the reference's scale (its largest magnitude)."""
    assert ours.shape == ref.shape
    assert torch.isfinite(ref).all()
    scale = ref.float().abs().max().item()
    error = (ours.float() - ref.float()).abs().max().item()
    assert error <= tol * scale, f"max error {error:.3g} vs scale {scale:.3g}"


def test_config_reads_hf_vision_config(hf_model):
    raw = hf_model.config.to_dict()["vision_config"]
    config = VisionConfig.from_hf_dict(raw)
    assert config == VisionConfig.from_hf_dict(hf_model.config.to_dict())
    assert config.depth == 3
    assert config.num_heads == 4
    assert config.deepstack_visual_indexes == [0, 1]
    assert config.hidden_act == "gelu_pytorch_tanh"
    assert config.rope_theta == 10000.0


def test_config_defaults_match_transformers():
    hf = transformers.Qwen3VLVisionConfig()
    expected = {name: getattr(hf, name, None) for name in VisionConfig.__dataclass_fields__}
    expected["deepstack_visual_indexes"] = list(hf.deepstack_visual_indexes)
    expected["rope_theta"] = hf.rope_parameters["rope_theta"]
    assert dataclasses.asdict(VisionConfig.from_hf_dict({})) == expected


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"hidden_size": 48, "num_heads": 8}, "head size"),
        ({"num_position_embeddings": 60}, "square"),
        ({"depth": 4, "deepstack_visual_indexes": [1, 4]}, "outside"),
    ],
)
def test_config_rejects_unusable_values(raw, match):
    with pytest.raises(QwenChatError, match=match):
        VisionConfig.from_hf_dict(raw)


def test_tensor_shapes_match_checkpoint(config, visual_state, tower):
    expected = {name: tuple(t.shape) for name, t in visual_state.items()}
    assert vision_tensor_shapes(config) == expected
    assert {n: tuple(t.shape) for n, t in tower.state_dict().items()} == expected


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_matches_transformers_float32(hf_model, config, tower, grid):
    grid_thw = torch.tensor(grid)
    x = pixels(config, grid)
    ref_embeds, ref_deepstack = reference(hf_model, x, grid_thw)
    with torch.no_grad():
        embeds, deepstack = tower(x, grid_thw)
    merged = sum(t * h * w for t, h, w in grid) // config.spatial_merge_size**2
    assert embeds.shape == (merged, config.out_hidden_size)
    assert_close(embeds, ref_embeds, 2e-5)
    assert len(deepstack) == len(ref_deepstack) == 2
    for ours, ref in zip(deepstack, ref_deepstack, strict=True):
        assert_close(ours, ref, 2e-5)


def test_entries_are_independent(config, tower):
    """A batch of entries gives each the tokens it gets alone (attention stays per entry)."""
    grid = GRIDS["image and video"]
    x = pixels(config, grid)
    with torch.no_grad():
        together, _ = tower(x, torch.tensor(grid))
        first, _ = tower(x[:4], torch.tensor(grid[:1]))
        second, _ = tower(x[4:], torch.tensor(grid[1:]))
    assert_close(together, torch.cat([first, second]), 1e-5)


def test_matches_transformers_bfloat16(hf_model, config, visual_state):
    grid = GRIDS["two images"]
    grid_thw = torch.tensor(grid)
    x = pixels(config, grid)
    tower = VisionTower(config).eval()
    tower.load_state_dict(visual_state, strict=True)
    tower.to(torch.bfloat16)
    with torch.no_grad():
        embeds, deepstack = tower(x, grid_thw)
    assert embeds.dtype == torch.bfloat16
    ours = [embeds, *deepstack]
    # bf16 rounding through three blocks leaves about 2% of the output's scale, in
    # transformers' bf16 run as in ours; the two roundings differ (our products run in
    # float32), so neither side is exact.
    for reference_model in (hf_model, copy.deepcopy(hf_model).to(torch.bfloat16)):
        ref_embeds, ref_deepstack = reference(reference_model, x, grid_thw)
        for mine, ref in zip(ours, [ref_embeds, *ref_deepstack], strict=True):
            assert_close(mine, ref, 0.05)


def test_rejects_mismatched_inputs(config, tower):
    with pytest.raises(ValueError, match="patches"):
        tower(pixels(config, [[1, 4, 4]]), torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match="multiples"):
        tower(pixels(config, [[1, 3, 4]]), torch.tensor([[1, 3, 4]]))
