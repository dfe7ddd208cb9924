"""Qwen3-VL end to end against transformers: a tiny random Qwen3VLForConditionalGeneration
fed by Qwen3VLProcessor (the PIL image processor) on real PNG files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import INIT_STD, TINY_VISION, TINY_VL_TEXT
from PIL import Image
from test_parity import assert_logits_close, engine_greedy
from test_vision_inputs import reference_video_processor, video_backend, video_metadata
from test_vision_tower import randomise

from qwen3chat.engine import Engine
from qwen3chat.errors import QwenChatError
from qwen3chat.generation import FinishEvent
from qwen3chat.loading import load_model
from qwen3chat.vision.preprocess import VisionPreprocessing
from qwen3chat.vision.prompt import VisionChat, user_message

transformers = pytest.importorskip("transformers")

__all__ = ["video_backend"]  # a fixture, used by name below


@pytest.fixture(scope="module", autouse=True)
def _reference_video_code(video_backend):
    """transformers' processor here builds its video processor even for images."""


STEPS = 16
# Small pictures: a few merged tokens each (pixel bounds as the processor reads them).
PIXELS = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 16}
PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5] * 3,
    "image_std": [0.5] * 3,
    "size": PIXELS,
}


def tiny_vl_config():
    return transformers.Qwen3VLConfig(
        text_config=TINY_VL_TEXT,
        vision_config=TINY_VISION,
        tie_word_embeddings=True,
    )


def build_vl_reference(seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.Qwen3VLForConditionalGeneration(tiny_vl_config()).eval()
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, INIT_STD)
    randomise(model.model.visual, seed=seed + 1)
    return model


def save_vl_dir(model, directory, tokenizer_dir):
    model.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return directory


def picture(path, width, height, seed):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return path


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory, tokenizer_dir):
    reference = build_vl_reference()
    path = save_vl_dir(reference, tmp_path_factory.mktemp("tiny-vl"), tokenizer_dir)
    return path, reference


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("pictures")
    return {
        "a": picture(out / "a.png", 96, 64, 1),
        "b": picture(out / "b.png", 64, 130, 2),
        "frames": [picture(out / f"f{i}.png", 64, 64, 10 + i) for i in range(4)],
    }


@pytest.fixture(scope="module")
def loaded(vl_dir):
    return load_model(vl_dir[0], device="cpu", dtype="float32")


def settings_of(path) -> VisionPreprocessing:
    return VisionPreprocessing.from_model_dir(path)


def reference_processor(tokenizer_dir, settings):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(
            patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3, size=PIXELS
        ),
        tokenizer=transformers.AutoTokenizer.from_pretrained(tokenizer_dir),
        video_processor=reference_video_processor(settings),
    )


def reference_greedy(model, inputs, steps):
    """Greedy decode re-running transformers on the whole sequence (pictures included)."""
    inputs = dict(inputs)
    ids = inputs.pop("input_ids")[0].tolist()
    types = inputs.pop("mm_token_type_ids")[0].tolist()
    inputs.pop("attention_mask", None)
    prompt_len, all_logits = len(ids), []
    with torch.no_grad():
        for _ in range(steps):
            out = model(
                input_ids=torch.tensor([ids]), mm_token_type_ids=torch.tensor([types]), **inputs
            )
            logits = out.logits[0, -1].float()
            all_logits.append(logits)
            ids.append(int(logits.argmax()))
            types.append(0)
    return ids[prompt_len:], torch.stack(all_logits)


def run_case(vl_dir, loaded, tokenizer_dir, images, frames, chunk_size=None):
    path, reference = vl_dir
    settings = settings_of(path)
    chat = VisionChat(settings)
    visuals = [chat.image(p) for p in images] + ([chat.video(frames)] if frames else [])
    messages = [user_message("Describe.", visuals)]
    ids, visuals = chat.encode_chat(loaded.tokenizer, messages)

    processor = reference_processor(tokenizer_dir, settings)
    kwargs = {}
    if frames:
        kwargs["videos"] = [[Image.open(p).convert("RGB") for p in frames]]
        kwargs["videos_kwargs"] = {"video_metadata": video_metadata(len(frames), settings.fps)}
    if images:
        kwargs["images"] = [Image.open(p).convert("RGB") for p in images]
    inputs = processor(text=[loaded.tokenizer.render(messages)], return_tensors="pt", **kwargs)
    assert ids == inputs["input_ids"][0].tolist()

    engine = Engine(loaded.model, loaded.tokenizer, 512, chunk_size)
    engine.tokenizer.stop_ids = []
    finish, logits = engine_greedy(engine, ids, STEPS, visuals=visuals)
    ref_ids, ref_logits = reference_greedy(reference, inputs, STEPS)
    assert finish.token_ids == ref_ids
    assert_logits_close(logits, ref_logits, rtol=2e-4)
    assert finish.timings.vision_s > 0
    return engine, ids, visuals


CASES = {
    "one image": (["a"], False),
    "two images": (["a", "b"], False),
    "video frames": ([], True),
}


@pytest.mark.parametrize("case", CASES, ids=CASES.keys())
def test_matches_transformers(vl_dir, loaded, files, tokenizer_dir, case):
    names, video = CASES[case]
    run_case(
        vl_dir, loaded, tokenizer_dir, [files[n] for n in names], files["frames"] if video else []
    )


def test_chunked_prefill_across_an_image(vl_dir, loaded, files, tokenizer_dir):
    # Chunks of 5 tokens: the image's tokens are split over several passes.
    run_case(vl_dir, loaded, tokenizer_dir, [files["a"], files["b"]], [], chunk_size=5)


def test_prefix_reuse_tells_pictures_apart(vl_dir, loaded, files, tokenizer_dir):
    engine, ids, _ = run_case(vl_dir, loaded, tokenizer_dir, [files["a"]], [])
    chat = VisionChat(settings_of(vl_dir[0]))
    same = list(engine.generate(ids, 2, visuals=[chat.image(files["a"])]))[-1]
    assert same.cached_tokens == len(ids) - 1
    # Another picture of the same size: the same pad ids, yet nothing after the first
    # picture token may be reused.
    other_path = picture(files["a"].parent / "c.png", 96, 64, 99)
    other = list(engine.generate(ids, 2, visuals=[chat.image(other_path)]))[-1]
    first_pad = ids.index(loaded.config.image_token_id)
    assert other.cached_tokens == first_pad


def test_pad_tokens_typed_as_text_are_refused(vl_dir, loaded, files):
    chat = VisionChat(settings_of(vl_dir[0]))
    visuals = [chat.image(files["a"])]
    with pytest.raises(QwenChatError, match="2 image and 0 video placeholders"):
        chat.encode_chat(loaded.tokenizer, [user_message("look <|image_pad|>", visuals)])
    # Ids made some other way: the engine still refuses pads that match no picture.
    ids, _ = chat.encode_chat(loaded.tokenizer, [user_message("look", visuals)])
    engine = Engine(loaded.model, loaded.tokenizer, 512)
    with pytest.raises(QwenChatError, match="pad tokens"):
        list(
            engine.generate(
                [*ids[:-3], loaded.config.image_token_id, *ids[-3:]], 2, visuals=visuals
            )
        )


def test_text_only_prompt_on_a_vl_model(vl_dir, loaded):
    """No pictures: plain RoPE positions, as transformers gives text-only input."""
    reference = vl_dir[1]
    ids = loaded.tokenizer.encode_chat([{"role": "user", "content": "Hello there"}])
    engine = Engine(loaded.model, loaded.tokenizer, 512)
    engine.tokenizer.stop_ids = []
    _, logits = engine_greedy(engine, ids, 8)
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor([ids])).logits[0, -1]
    assert_logits_close(logits[0], ref, rtol=2e-4)


def fp8_blockwise(weight: torch.Tensor, block: int = 128):
    """FP8 e4m3 codes and per-block inverse scales, as FP8 checkpoints store them."""
    rows, cols = weight.shape
    grid = (-(-rows // block), -(-cols // block))
    padded = torch.zeros(grid[0] * block, grid[1] * block)
    padded[:rows, :cols] = weight
    blocks = padded.view(grid[0], block, grid[1], block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    codes = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return codes.view_as(padded)[:rows, :cols].contiguous(), scale


def test_fp8_checkpoint(tmp_path, vl_dir, files, tokenizer_dir):
    """Every 2-D text/tower matrix stored as block FP8 (shapes not multiples of 128
    included); the reference holds the dequantized weights."""
    from safetensors.torch import save_file

    path, reference = vl_dir
    fp8_dir = tmp_path / "fp8"
    shutil.copytree(path, fp8_dir)
    reference = build_vl_reference()
    state = reference.state_dict()
    stored = {}
    for name, tensor in state.items():
        if tensor.ndim == 2 and "embed_tokens" not in name and "pos_embed" not in name:
            codes, scale = fp8_blockwise(tensor.float(), block=32)
            stored[name] = codes
            stored[name + "_scale_inv"] = scale
            # The reference holds exactly what the file decodes to.
            dequantized = (
                codes.float()
                * scale.repeat_interleave(32, 0).repeat_interleave(32, 1)[
                    : tensor.shape[0], : tensor.shape[1]
                ]
            )
            tensor.copy_(dequantized)
        else:
            stored[name] = tensor.contiguous()
    save_file(stored, fp8_dir / "model.safetensors")
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [32, 32]}
    (fp8_dir / "config.json").write_text(json.dumps(config))
    fp8_loaded = load_model(fp8_dir, device="cpu", dtype="float32")
    run_case((fp8_dir, reference), fp8_loaded, tokenizer_dir, [files["b"]], [])


def test_repl_image_command_attaches_a_picture_to_the_next_message(loaded, files):
    """/image PATH: the next message carries the picture (its pad tokens and pixels reach
    the engine), the turn keeps it for later prompts and /regen, then it is used up."""
    from test_repl import make_repl, record_replies

    vision = VisionChat(settings_of(loaded.path))
    repl = make_repl(loaded, max_seq_len=1024, vision=vision, max_tokens=4)
    replies = record_replies(repl.engine)
    calls = []
    generate = repl.engine.generate

    def recording(prompt_ids, *args, visuals=(), **kwargs):
        calls.append(list(visuals))
        yield from generate(prompt_ids, *args, visuals=visuals, **kwargs)

    repl.engine.generate = recording
    image_pad = loaded.config.image_token_id
    tokens = repl.vision.count_tokens([repl.vision.image(files["a"])])

    repl.handle(f"/image {files['a']}")
    assert "attached" in repl.console.file.getvalue()
    repl.handle("What is in the picture?")
    prompt, _ = replies[-1]
    assert prompt.count(image_pad) == tokens
    assert len(calls[-1]) == 1 and calls[-1][0].digest == repl.vision.image(files["a"]).digest
    assert f"{tokens} visual tokens" in repl.console.file.getvalue()
    assert repl.pending == []

    repl.handle("And now?")  # no new picture: the first turn's stays in the prompt
    prompt, finish = replies[-1]
    assert prompt.count(image_pad) == tokens and len(calls[-1]) == 1
    assert finish.cached_tokens > prompt.index(image_pad)  # the picture came from the cache

    repl.handle("/regen")
    prompt, _ = replies[-1]
    assert prompt.count(image_pad) == tokens

    # /show counts the picture as the pad tokens it expands to, not one placeholder.
    assert repl.context_used() > tokens
    text_only = repl.tokenizer.render(
        repl.conversation.messages(), repl.options.think, add_generation_prompt=False
    )
    assert repl.context_used() == len(repl.tokenizer.encode(text_only)) + tokens - 1

    with pytest.raises(QwenChatError, match=r"missing\.png: no such file"):
        repl.handle(f"/image {files['b'].with_name('missing.png')}")
    assert repl.pending == []


def test_the_batched_engine_runs_pictures_beside_text(vl_dir, loaded, files):
    """The server's engine: a one-image, a two-image and a text-only request in one batch,
    in steps of 7 rows (chunks end inside pictures), each get their ids alone; a request
    with the same picture reuses its blocks, one with another picture of the same size
    does not reuse them past the picture's first token."""
    from qwen3chat.batch.engine import BLOCK_SIZE, BatchEngine
    from qwen3chat.sampling import SamplingSettings

    chat = VisionChat(settings_of(vl_dir[0]))
    greedy = SamplingSettings(temperature=0.0)
    requests = [
        chat.encode_chat(loaded.tokenizer, [user_message(text, [chat.image(p) for p in paths])])
        for text, paths in [
            ("Describe.", [files["a"]]),
            ("Compare.", [files["a"], files["b"]]),
            ("Hi", []),
        ]
    ]
    engine = BatchEngine(loaded.model, loaded.tokenizer, 512, token_budget=7)
    seqs = [engine.add(ids, STEPS, greedy, visuals=visuals) for ids, visuals in requests]
    finished = {}
    while engine.has_work:
        for seq, event in engine.step():
            if isinstance(event, FinishEvent):
                finished[seq] = event
    for seq, (ids, visuals) in zip(seqs, requests, strict=True):
        alone = Engine(loaded.model, loaded.tokenizer, 512)
        expected = list(alone.generate(ids, STEPS, greedy, visuals=visuals))[-1]
        assert finished[seq].token_ids == expected.token_ids
    assert finished[seqs[0]].timings.vision_s > 0

    ids, _ = requests[0]
    again = engine.add(ids, 2, greedy, visuals=[chat.image(files["a"])])
    other_path = picture(files["a"].parent / "d.png", 96, 64, 98)
    other = engine.add(ids, 2, greedy, visuals=[chat.image(other_path)])
    while engine.has_work:
        for seq, event in engine.step():
            if isinstance(event, FinishEvent):
                finished[seq] = event
    assert finished[again].cached_tokens == (len(ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
    first_pad = ids.index(loaded.config.image_token_id)
    assert finished[other].cached_tokens <= first_pad
    assert engine.blocks.in_use == 0


def test_quantize_keeps_the_vision_tower_float(vl_dir, files):
    """--quantize int8 on a vision model: the decoder's matrices are quantized, the tower
    stays float (its 5-D patch convolution was once taken for a matrix and refused to
    load) and a picture still runs."""
    from qwen3chat.quant import QuantizedWeight

    path, _ = vl_dir
    loaded = load_model(path, device="cpu", dtype="float32", quantize="int8")
    tower = loaded.model.visual
    assert all(isinstance(p, torch.nn.Parameter) for p in tower.parameters())
    assert not any(isinstance(m, QuantizedWeight) for m in tower.modules())
    assert isinstance(loaded.model.layers[0].self_attn.qkv_proj.weight, QuantizedWeight)
    chat = VisionChat(settings_of(path))
    messages = [user_message("Describe.", [chat.image(files["a"])])]
    ids, visuals = chat.encode_chat(loaded.tokenizer, messages)
    finish = list(Engine(loaded.model, loaded.tokenizer, 256).generate(ids, 3, visuals=visuals))[-1]
    assert isinstance(finish, FinishEvent) and finish.timings.vision_s > 0
