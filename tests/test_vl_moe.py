"""Qwen3-VL-MoE against transformers' Qwen3VLMoeForConditionalGeneration: a tiny random
model (top-2 of 4 experts, one dense layer among sparse ones) with a picture, from the
checkpoint transformers saves and from the layouts the hub's releases use."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import INIT_STD, TINY_VISION, TINY_VL_TEXT
from safetensors import safe_open
from safetensors.torch import save_file
from test_parity import engine_greedy
from test_vision_inputs import video_backend
from test_vision_tower import randomise
from test_vl_parity import PREPROCESSOR, picture, run_case, settings_of
from typer.testing import CliRunner

from qwen3chat.cli import app
from qwen3chat.config import ModelConfig
from qwen3chat.engine import Engine
from qwen3chat.errors import QwenChatError
from qwen3chat.loading import load_model
from qwen3chat.model.moe import SparseMoE
from qwen3chat.sampling import SamplingSettings
from qwen3chat.vision.prompt import VisionChat, user_message

transformers = pytest.importorskip("transformers")

__all__ = ["video_backend"]  # a fixture, used by name below

EXPERTS, TOP_K, MOE_WIDTH, HIDDEN = 4, 2, 24, 64  # 2 * MOE_WIDTH != HIDDEN: no shape aliasing
LAYER = "model.language_model.layers.{}.mlp.experts."


@pytest.fixture(scope="module", autouse=True)
def _reference_video_code(video_backend):
    """transformers' processor here builds its video processor even for images."""


def build_vl_moe_reference(seed: int = 0):
    config = transformers.Qwen3VLMoeConfig(
        text_config=dict(
            TINY_VL_TEXT,
            hidden_size=HIDDEN,
            num_hidden_layers=3,
            num_experts=EXPERTS,
            num_experts_per_tok=TOP_K,
            moe_intermediate_size=MOE_WIDTH,
            mlp_only_layers=[1],
        ),
        vision_config={**TINY_VISION, "out_hidden_size": HIDDEN},
        tie_word_embeddings=False,  # as Qwen3-VL-30B-A3B
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3VLMoeForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, INIT_STD)
        model.lm_head.weight.normal_(0.0, INIT_STD)
    randomise(model.model.visual, seed=seed + 1)
    return model


def finish_dir(directory, tokenizer_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return directory


@pytest.fixture(scope="module")
def moe_vl(tmp_path_factory, tokenizer_dir):
    reference = build_vl_moe_reference()
    path = tmp_path_factory.mktemp("tiny-vl-moe")
    reference.save_pretrained(path, safe_serialization=True)
    return finish_dir(path, tokenizer_dir), reference


@pytest.fixture(scope="module")
def loaded(moe_vl):
    return load_model(moe_vl[0], device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    return picture(tmp_path_factory.mktemp("pictures") / "a.png", 96, 64, 1)


def file_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118


def test_transformers_5_layout(moe_vl, loaded):
    """transformers 5 writes the experts fused, as it holds them: nn.Linear's
    [experts, out, in], gate rows then up rows (the hub's files are transposed)."""
    path, reference = moe_vl
    stored = file_tensors(path)
    gate_up, down = stored[LAYER.format(0) + "gate_up_proj"], stored[LAYER.format(0) + "down_proj"]
    assert gate_up.shape == (EXPERTS, 2 * MOE_WIDTH, HIDDEN)
    assert down.shape == (EXPERTS, HIDDEN, MOE_WIDTH)
    assert not any(".experts.0." in name for name in stored)
    assert "model.language_model.layers.1.mlp.gate_proj.weight" in stored  # the dense layer
    ref_experts = reference.model.language_model.layers[0].mlp.experts
    ours = loaded.model.layers[0].mlp
    assert isinstance(ours, SparseMoE) and not isinstance(loaded.model.layers[1].mlp, SparseMoE)
    assert torch.equal(ours.experts.gate_up_proj.weight, ref_experts.gate_up_proj)
    assert torch.equal(ours.experts.down_proj.weight, ref_experts.down_proj)
    assert loaded.config.num_experts == EXPERTS and loaded.config.norm_topk_prob


def test_matches_transformers_with_an_image(moe_vl, loaded, photo, tokenizer_dir):
    run_case(moe_vl, loaded, tokenizer_dir, [photo], [])


def test_matches_transformers_text_only(moe_vl, loaded):
    from test_parity import assert_logits_close

    ids = loaded.tokenizer.encode_chat([{"role": "user", "content": "Hello there"}])
    engine = Engine(loaded.model, loaded.tokenizer, 512)
    engine.tokenizer.stop_ids = []
    _, logits = engine_greedy(engine, ids, 4)
    with torch.no_grad():
        ref = moe_vl[1](input_ids=torch.tensor([ids])).logits[0, -1]
    assert_logits_close(logits[0], ref, rtol=2e-4)


def hub_tensors(reference, per_expert: bool) -> dict[str, torch.Tensor]:
    """The reference's weights in a hub release's layout, written here without
    transformers: fused and transposed (Qwen3-VL-30B-A3B-Instruct, saved by transformers
    4.57), or one [out, in] matrix per expert (the layout of its FP8 release)."""
    out = {}
    for name, tensor in reference.state_dict().items():
        if name.endswith("experts.gate_up_proj") and per_expert:
            gate, up = tensor.split(MOE_WIDTH, dim=1)  # transformers' memory: [E, 2I, d]
            for e in range(EXPERTS):
                out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate[e]
                out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = up[e]
        elif name.endswith("experts.down_proj") and per_expert:
            for e in range(EXPERTS):
                out[name.replace("down_proj", f"{e}.down_proj.weight")] = tensor[e]
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name] = tensor.transpose(1, 2)  # [E, d, 2I] and [E, I, d]
        else:
            out[name] = tensor
    return {name: t.contiguous() for name, t in out.items()}


def write_sharded(tensors: dict[str, torch.Tensor], directory) -> None:
    """Two shards and an index, the experts of a layer split across them."""
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("per_expert", [False, True], ids=["fused transposed", "per expert"])
def test_hub_layouts_load_to_the_same_logits(
    tmp_path, moe_vl, loaded, photo, tokenizer_dir, per_expert
):
    path, reference = moe_vl
    hub = tmp_path / "hub"
    hub.mkdir()
    tensors = hub_tensors(reference, per_expert)
    if not per_expert:  # transformers 5's names; the experts' last two dims swapped
        swapped = {n: t.shape for n, t in file_tensors(path).items()}
        for name in swapped:
            if name.endswith(("gate_up_proj", "down_proj")):
                swapped[name] = swapped[name][:1] + swapped[name][1:][::-1]
        assert {n: t.shape for n, t in tensors.items()} == swapped
    write_sharded(tensors, hub)
    # The hub's config.json: transformers 4.57 names (num_experts, rope_scaling).
    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    text["num_experts"] = text.pop("num_local_experts")
    text["rope_scaling"] = text.pop("rope_parameters")
    text["rope_theta"] = text["rope_scaling"].pop("rope_theta")
    text["norm_topk_prob"] = True
    config["transformers_version"] = "4.57.0.dev0"
    (hub / "config.json").write_text(json.dumps(config))
    hub_loaded = load_model(finish_dir(hub, tokenizer_dir), device="cpu", dtype="float32")

    ours, theirs = dict(hub_loaded.model.state_dict()), dict(loaded.model.state_dict())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    chat = VisionChat(settings_of(path))
    messages = [user_message("Describe.", [chat.image(photo)])]
    logits = []
    for model in (hub_loaded, loaded):
        ids, visuals = chat.encode_chat(model.tokenizer, messages)
        engine = Engine(model.model, model.tokenizer, 512)
        engine.tokenizer.stop_ids = []
        logits.append(engine_greedy(engine, ids, 3, visuals=visuals)[1])
    # The same weights, but the standard file's experts are kept as its mapped pages (at
    # an address that is not 64-byte aligned) and the hub's, converted, in memory of
    # their own: torch's product for the tiny expert width (not in blocks of 32) may
    # round differently by address.
    torch.testing.assert_close(logits[0], logits[1])


def test_bf16_checkpoint_reads_transposed_parts(tmp_path, moe_vl, tokenizer_dir):
    """A bfloat16 hub checkpoint, read as float32: each part transposed while converted."""
    path, reference = moe_vl
    hub = tmp_path / "bf16"
    hub.mkdir()
    tensors = {n: t.bfloat16() for n, t in hub_tensors(reference, per_expert=False).items()}
    save_file(tensors, hub / "model.safetensors")
    shutil.copy(path / "config.json", hub / "config.json")
    model = load_model(finish_dir(hub, tokenizer_dir), device="cpu", dtype="float32").model
    ref = reference.model.language_model.layers[2].mlp.experts
    weight = model.layers[2].mlp.experts.gate_up_proj.weight
    assert weight.is_contiguous()
    assert torch.equal(weight, ref.gate_up_proj.bfloat16().float())
    assert torch.equal(
        model.layers[2].mlp.experts.down_proj.weight, ref.down_proj.bfloat16().float()
    )


@pytest.mark.parametrize("version", ["4.57.0.dev0", "5.23.0"])
def test_square_stacks_follow_the_writer(tmp_path, version):
    """2 * moe_inter == hidden: the shape cannot tell [out, in] from x @ W; transformers
    4.x wrote x @ W, 5.x writes [out, in] (and reads such a file as it is)."""
    from qwen3chat.weights.safetensors import SafeTensorsSource

    gate_up = torch.randn(3, 8, 8)
    down = torch.randn(3, 4, 8)  # [E, I, d]: x @ W whoever wrote it, told by shape
    tensors = {"model.language_model.embed_tokens.weight": torch.randn(10, 8)}
    tensors[LAYER.format(0) + "gate_up_proj"] = gate_up
    tensors[LAYER.format(0) + "down_proj"] = down
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"transformers_version": version}))
    source = SafeTensorsSource(tmp_path, {"transformers_version": version})
    linear = gate_up.mT if version.startswith("4.") else gate_up  # [E, 2I, d]
    gate = source.read("layers.0.mlp.experts.gate_proj.weight", torch.float32)
    up = source.read("layers.0.mlp.experts.up_proj.weight", torch.float32)
    assert torch.equal(torch.cat([gate, up], dim=1), linear)
    assert torch.equal(source.read("layers.0.mlp.experts.down_proj.weight", torch.float32), down.mT)
    assert source.shapes()["layers.0.mlp.experts.down_proj.weight"] == (3, 8, 4)


def test_an_odd_fused_width_is_one_line(tmp_path, moe_vl, tokenizer_dir):
    path, _ = moe_vl
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    tensors = file_tensors(path)
    name = LAYER.format(2) + "gate_up_proj"
    tensors[name] = tensors[name][:, :-1].contiguous()  # [E, 2I - 1, d]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(QwenChatError, match=f"{name} has shape .*out split in 2"):
        load_model(bad, device="cpu", dtype="float32")


@pytest.mark.parametrize("flag", [None, False, True])
def test_router_always_renormalises(flag):
    """transformers' Qwen3-VL-MoE router divides the top-k weights by their sum whatever
    the config says (5.x writes no norm_topk_prob; the hub's configs say true)."""
    text = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8}
    if flag is not None:
        text["norm_topk_prob"] = flag
    raw = {"architectures": ["Qwen3VLMoeForConditionalGeneration"], "text_config": text}
    config = ModelConfig.from_hf_dict(raw)
    assert config.norm_topk_prob and config.num_experts == 4


def test_vision_chat_one_shot(moe_vl, photo):
    path, _ = moe_vl
    loaded = load_model(path, device="cpu", dtype="float32")  # its own stop ids
    args = ["vision-chat", "-m", str(path), "--image", str(photo), "-p", "What is it?"]
    args += ["-n", "5", "--json", "--temperature", "0", "--dtype", "float32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    chat = VisionChat(settings_of(path))
    ids, visuals = chat.encode_chat(
        loaded.tokenizer, [user_message("What is it?", [chat.image(photo)])]
    )
    engine = Engine(loaded.model, loaded.tokenizer, 4096)
    finish = list(engine.generate(ids, 5, SamplingSettings(temperature=0.0), visuals=visuals))
    assert out["token_ids"] == finish[-1].token_ids
    assert out["usage"]["prompt_tokens"] == len(ids)
