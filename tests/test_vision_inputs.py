"""Qwen3-VL preprocessing matches transformers: image patches and grids (the PIL
Qwen2VLImageProcessor), video patches, grids and timestamps (Qwen3VLVideoProcessor), the
chat template, the expanded prompt and its ids (Qwen3VLProcessor); bad image files give one
clear error naming the file."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qwen3chat.chat_template import builtin_template, render_chat
from qwen3chat.errors import QwenChatError
from qwen3chat.tokenizer import Tokenizer
from qwen3chat.vision.preprocess import (
    IMAGE_PAD,
    VIDEO_PAD,
    VideoInputs,
    VisionPreprocessing,
    check_visual_tokens,
    count_visual_tokens,
    load_image,
    load_video_frames,
    preprocess_images,
    preprocess_video,
    sample_frame_indices,
    smart_resize,
    smart_resize_video,
)
from qwen3chat.vision.prompt import expand_vision_tokens

DEFAULTS = VisionPreprocessing()
IMAGE_PAD_ID, VIDEO_PAD_ID = 151655, 151656


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels: the hardest case for matching a resize bit for bit."""
    bands = len(Image.new(mode, (1, 1)).getbands())
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (width * height * bands,), generator=generator, dtype=torch.uint8)
    return Image.frombytes(mode, (width, height), data.numpy().tobytes())


def save(image: Image.Image, path):
    image.save(path)
    return path


def reference_images(settings: VisionPreprocessing, images):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    processor = Qwen2VLImageProcessorPil(
        patch_size=settings.patch_size,
        temporal_patch_size=settings.temporal_patch_size,
        merge_size=settings.merge_size,
        image_mean=list(settings.image_mean),
        image_std=list(settings.image_std),
        # The backward-compatible spelling, as --min-pixels/--max-pixels read.
        min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels,
    )
    out = processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def assert_images_match(paths, settings: VisionPreprocessing = DEFAULTS):
    pixels, grid = preprocess_images([load_image(p) for p in paths], settings)
    with_pil = [Image.open(p) for p in paths]
    expected_pixels, expected_grid = reference_images(settings, with_pil)
    assert torch.equal(grid, expected_grid)
    assert pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, expected_pixels, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "size", [(1, 1), (5, 3), (37, 53), (224, 224), (333, 517), (1000, 120), (641, 479)]
)
def test_image_matches_transformers(tmp_path, size):
    assert_images_match([save(noise(*size), tmp_path / "image.png")])


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P"])
def test_image_modes_match_transformers(tmp_path, mode):
    image = noise(90, 70, "L" if mode == "P" else mode, seed=1)
    if mode == "P":  # a palette image with one transparent colour
        image = image.convert("P")
        image.info["transparency"] = 0
    assert_images_match([save(image, tmp_path / "image.png")])


@pytest.mark.parametrize(
    ("size", "min_pixels", "max_pixels"),
    [((641, 479), 32 * 32 * 4, 32 * 32 * 16), ((100, 80), 512 * 512, 1024 * 1024)],
)
def test_pixel_overrides_match_transformers(tmp_path, size, min_pixels, max_pixels):
    settings = VisionPreprocessing(min_pixels=min_pixels, max_pixels=max_pixels)
    assert_images_match([save(noise(*size), tmp_path / "image.png")], settings)


def test_several_images_concatenate_in_order(tmp_path):
    paths = [
        save(noise(w, h, seed=i), tmp_path / f"{i}.png")
        for i, (w, h) in enumerate([(300, 200), (64, 64), (50, 120)])
    ]
    assert_images_match(paths)


def test_exif_orientation_is_applied(tmp_path):
    image = noise(40, 20)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    image.save(tmp_path / "photo.jpg", exif=exif)
    assert load_image(tmp_path / "photo.jpg").size == (20, 40)


def test_jpeg_matches_transformers(tmp_path):
    assert_images_match([save(noise(400, 300), tmp_path / "photo.jpg")])


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize as image_reference,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        smart_resize as video_reference,
    )

    sides = [1, 7, 31, 32, 33, 100, 255, 479, 1000, 4097]
    for height in sides:
        for width in sides:
            if max(height, width) > 200 * min(height, width):
                continue
            for low, high in [(65536, 16777216), (1024, 32 * 32 * 16)]:
                assert smart_resize(height, width, 32, low, high) == image_reference(
                    height, width, 32, low, high
                )
            for frames in (2, 5, 64):
                mine = smart_resize_video(frames, height, width, 2, 32, 131072, 786432)
                assert mine == video_reference(frames, height, width, 2, 32, 131072, 786432)


def test_extreme_aspect_ratio_is_refused(tmp_path):
    path = save(noise(401, 2), tmp_path / "strip.png")
    with pytest.raises(QwenChatError, match=r"strip\.png.*200:1"):
        load_image(path)
    with pytest.raises(QwenChatError, match="200:1"):
        smart_resize(2, 401, 32, 1024, 2**20)


# ---------------------------------------------------------------------------- settings


def test_settings_from_model_dir(tmp_path):
    assert VisionPreprocessing.from_model_dir(tmp_path) == DEFAULTS
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"shortest_edge": 4096, "longest_edge": 2**20},
                "max_pixels": 2**18,  # a top-level key wins over size, as in transformers
                "patch_size": 16,
                "image_mean": [0.5, 0.4, 0.3],
            }
        )
    )
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 4096, "longest_edge": 25165824}, "fps": 1})
    )
    settings = VisionPreprocessing.from_model_dir(tmp_path)
    assert (settings.min_pixels, settings.max_pixels) == (4096, 2**18)
    assert settings.image_mean == (0.5, 0.4, 0.3)
    assert (settings.video_min_pixels, settings.video_max_pixels, settings.fps) == (
        4096,
        25165824,
        1,
    )
    overridden = VisionPreprocessing.from_model_dir(
        tmp_path, min_pixels=1024, max_pixels=2048, fps=4, max_frames=8
    )
    assert (overridden.min_pixels, overridden.max_pixels) == (1024, 2048)
    assert (overridden.fps, overridden.max_frames) == (4, 8)


def test_settings_match_transformers_reading_the_same_dir(tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    config = {
        "size": {"shortest_edge": 3136, "longest_edge": 12845056},
        "min_pixels": 8192,
        "max_pixels": 40000,
        "patch_size": 16,
        "image_mean": [0.48, 0.45, 0.4],
        "image_std": [0.26, 0.26, 0.27],
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    settings = VisionPreprocessing.from_model_dir(tmp_path)
    reference = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    image = noise(300, 200)
    expected = reference(images=[image], return_tensors="pt")
    pixels, grid = preprocess_images([image], settings)
    assert torch.equal(grid, expected["image_grid_thw"])
    torch.testing.assert_close(pixels, expected["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"min_pixels": 5000, "max_pixels": 4000}, "--min-pixels/--max-pixels"),
        ({"min_pixels": 0}, "--min-pixels/--max-pixels"),
        ({"fps": 0}, "fps"),
        ({"max_frames": 1}, "frame limit"),
    ],
)
def test_bad_settings_are_refused(tmp_path, overrides, flag):
    with pytest.raises(QwenChatError, match=flag):
        VisionPreprocessing.from_model_dir(tmp_path, **overrides)


def test_bad_config_json_names_the_file(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(QwenChatError, match=r"preprocessor_config\.json"):
        VisionPreprocessing.from_model_dir(tmp_path)


# ---------------------------------------------------------------------------- video


class _TorchvisionOnCpu:
    """What torchvision's resize and normalize run on CPU tensors (checked against
    torchvision 0.28): torch's antialiased kernel straight on uint8, then sub and div."""

    class InterpolationMode:
        BILINEAR, BICUBIC, LANCZOS = "bilinear", "bicubic", "lanczos"

    @staticmethod
    def resize(image, size, interpolation, antialias=True):
        if tuple(size) == tuple(image.shape[-2:]):
            return image
        flat = image.reshape(-1, *image.shape[-3:])
        out = F.interpolate(flat, size=list(size), mode=interpolation, antialias=antialias)
        return out.reshape(*image.shape[:-2], *size)

    @staticmethod
    def normalize(image, mean, std, inplace=False):
        mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        return image.sub(mean).div_(std)

    @staticmethod
    def grayscale_to_rgb(image):
        return image


@pytest.fixture(scope="module")
def video_backend():
    """transformers' Qwen3-VL video code runnable here: it needs torchvision for resize and
    normalize only; without torchvision those two are stood in for, and sampling,
    smart_resize, padding, fused normalization and patchify stay transformers' own."""
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    import transformers
    import transformers.image_processing_backends as backends
    import transformers.video_processing_utils as video_utils
    from transformers.image_utils import PILImageResampling

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "tvF", _TorchvisionOnCpu, raising=False)
        patch.setattr(video_utils, "tvF", _TorchvisionOnCpu, raising=False)
        patch.setattr(
            backends, "pil_torch_interpolation_mapping", {PILImageResampling.BICUBIC: "bicubic"}
        )
        # Qwen3VLProcessor checks its video processor's class through this export.
        patch.setattr(
            transformers, "VideoProcessorMixin", video_utils.VideoProcessorMixin, raising=False
        )
        yield


def reference_video_processor(settings: VisionPreprocessing):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(
        patch_size=settings.patch_size,
        temporal_patch_size=settings.temporal_patch_size,
        merge_size=settings.merge_size,
        image_mean=list(settings.video_mean),
        image_std=list(settings.video_std),
        size={
            "shortest_edge": settings.video_min_pixels,
            "longest_edge": settings.video_max_pixels,
        },
        fps=settings.fps,
        min_frames=settings.min_frames,
        max_frames=settings.max_frames,
        cap_pixels_per_frame=settings.cap_pixels_per_frame,
    )


def video_metadata(num_frames: int, fps: float):
    from transformers.video_utils import VideoMetadata

    # The frames are a video taken at `fps`: what our --video-frames stand for.
    return [VideoMetadata(total_num_frames=num_frames, fps=fps)]


@pytest.mark.parametrize(
    ("num_frames", "size", "overrides"),
    [
        (2, (64, 48), {}),
        (3, (100, 70), {}),  # odd: padded with the last frame
        (4, (333, 200), {}),
        (5, (20, 13), {}),  # tiny frames, odd count
        (7, (90, 60), {"max_frames": 4, "fps": 3.0}),  # sampled down to 4 frames
        (6, (640, 480), {"cap_pixels_per_frame": True, "video_max_pixels": 32 * 32 * 400}),
    ],
)
def test_video_matches_transformers(tmp_path, video_backend, num_frames, size, overrides):
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    settings = VisionPreprocessing(**overrides)
    paths = [save(noise(*size, seed=i), tmp_path / f"{i}.png") for i in range(num_frames)]
    frames = load_video_frames(paths, settings)
    ours = preprocess_video(frames, settings)
    expected = reference_video_processor(settings)(
        videos=[frames],
        video_metadata=video_metadata(num_frames, settings.fps),
        return_metadata=True,
        return_tensors="pt",
    )
    assert torch.equal(ours.video_grid_thw, expected["video_grid_thw"])
    torch.testing.assert_close(
        ours.pixel_values_videos, expected["pixel_values_videos"], atol=1e-5, rtol=0
    )
    indices = expected["video_metadata"][0].frames_indices
    timestamps = Qwen3VLProcessor._calculate_timestamps(
        None, indices, settings.fps, settings.temporal_patch_size
    )
    assert ours.timestamps == pytest.approx(timestamps, abs=1e-12)


def test_frame_sampling_matches_transformers(video_backend):
    from transformers.video_utils import VideoMetadata

    reference = reference_video_processor(DEFAULTS)
    for max_frames in (2, 3, 4, 7, 16):
        reference.max_frames = max_frames
        settings = VisionPreprocessing(max_frames=max_frames, fps=3.0)
        for num_frames in range(1, 90):
            metadata = VideoMetadata(total_num_frames=num_frames, fps=3.0)
            expected = reference.sample_frames(metadata, fps=3.0).tolist()
            assert sample_frame_indices(num_frames, settings) == expected


def test_video_fps_argument_sets_the_timestamps():
    frames = [noise(64, 64, seed=i) for i in range(4)]
    assert preprocess_video(frames, DEFAULTS, fps=1.0).timestamps == [0.5, 2.5]
    assert preprocess_video(frames, DEFAULTS).timestamps == [0.25, 1.25]


def test_video_frames_must_agree(tmp_path):
    one = save(noise(64, 48), tmp_path / "a.png")
    other = save(noise(48, 64), tmp_path / "b.png")
    with pytest.raises(QwenChatError, match="--video-frames needs at least 2"):
        load_video_frames([one], DEFAULTS)
    with pytest.raises(QwenChatError, match=r"b\.png.*same size"):
        load_video_frames([one, other], DEFAULTS)


# ---------------------------------------------------------------------------- prompts


def user_message(text: str, num_images: int = 0, num_videos: int = 0) -> dict:
    """A user turn in the content-list form VL templates read: images, videos, then text."""
    content = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


def builtin_qwen3_vl_template() -> str:
    return builtin_template("qwen3_vl")


CONVERSATIONS = {
    "image_then_text": [user_message("What is this?", num_images=1)],
    "images_video_system_history": [
        {"role": "system", "content": "Be brief."},
        user_message("Compare them.", num_images=2, num_videos=1),
        {"role": "assistant", "content": "The second is darker."},
        user_message("And this one?", num_images=1),
    ],
    "plain_text": [{"role": "user", "content": "Hi"}],
}


@pytest.fixture(scope="module")
def reference_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_builtin_template_renders_as_transformers(reference_tokenizer, name):
    template = builtin_qwen3_vl_template()
    messages = CONVERSATIONS[name]
    expected = reference_tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert render_chat(template, messages) == expected


def test_template_lookup(tmp_path, tokenizer_dir):
    def vl_chat_template(model_dir):
        return Tokenizer.from_dir(model_dir, builtin="qwen3_vl", requires=IMAGE_PAD).chat_template

    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path)
    vl = "{% for m in messages %}" + IMAGE_PAD + "{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "text only"}))
    assert vl_chat_template(tmp_path) == builtin_qwen3_vl_template()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": vl}))
    assert vl_chat_template(tmp_path) == vl
    (tmp_path / "chat_template.jinja").write_text(vl + "!")
    assert vl_chat_template(tmp_path) == vl + "!"


def test_input_ids_match_qwen3vl_processor(reference_tokenizer, tokenizer, video_backend):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    settings = DEFAULTS
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(
            patch_size=16,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            size={"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels},
        ),
        tokenizer=reference_tokenizer,
        video_processor=reference_video_processor(settings),
    )
    images = [noise(50, 40, seed=1), noise(300, 200, seed=2), noise(64, 64, seed=3)]
    frames = [noise(80, 60, seed=10 + i) for i in range(5)]
    prompt = render_chat(builtin_qwen3_vl_template(), CONVERSATIONS["images_video_system_history"])
    expected = processor(
        text=[prompt],
        images=images,
        videos=[frames],
        videos_kwargs={"video_metadata": video_metadata(len(frames), settings.fps)},
        return_tensors="pt",
    )

    pixels, grid = preprocess_images(images, settings)
    video = preprocess_video(frames, settings)
    ids = tokenizer.encode(expand_vision_tokens(prompt, grid, [video], settings.merge_size))

    assert ids == expected["input_ids"][0].tolist()
    torch.testing.assert_close(pixels, expected["pixel_values"], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        video.pixel_values_videos, expected["pixel_values_videos"], atol=1e-5, rtol=0
    )
    pads = sum(i in (IMAGE_PAD_ID, VIDEO_PAD_ID) for i in ids)
    assert count_visual_tokens(settings, images, [frames]) == pads


def test_expansion_layout():
    video = VideoInputs(torch.empty(0), torch.tensor([[2, 4, 6]]), [0.5, 2.0])
    text = expand_vision_tokens(f"a{IMAGE_PAD}b{VIDEO_PAD}c", torch.tensor([[1, 4, 6]]), [video])
    frame = "<|vision_start|>" + VIDEO_PAD * 6 + "<|vision_end|>"
    assert text == f"a{IMAGE_PAD * 6}b<0.5 seconds>{frame}<2.0 seconds>{frame}c"


def test_expansion_replaces_the_templates_video_wrapper():
    # The chat template writes <|vision_start|><|video_pad|><|vision_end|>; each frame has
    # its own markers, so the wrapper goes (it doubled them in transformers 5.0-5.24).
    video = VideoInputs(torch.empty(0), torch.tensor([[2, 2, 2]]), [0.5, 2.0])
    frame = "<|vision_start|>" + VIDEO_PAD + "<|vision_end|>"
    text = expand_vision_tokens(f"a<|vision_start|>{VIDEO_PAD}<|vision_end|>b", None, [video])
    assert text == f"a<0.5 seconds>{frame}<2.0 seconds>{frame}b"


def test_expansion_refuses_a_count_mismatch():
    with pytest.raises(QwenChatError, match="2 image and 0 video placeholders"):
        expand_vision_tokens(IMAGE_PAD * 2, torch.tensor([[1, 2, 2]]))


def test_visual_token_budget():
    images = [noise(320, 320)]  # 10x10 merged patches
    assert count_visual_tokens(DEFAULTS, images) == 100
    check_visual_tokens(100, 4096)
    with pytest.raises(QwenChatError, match="--max-seq-len is 64"):
        check_visual_tokens(count_visual_tokens(DEFAULTS, images), 64)


# ---------------------------------------------------------------------------- bad files


def huge_png(path, width: int = 20000, height: int = 20000):
    """A small valid PNG whose header claims a huge size: Pillow judges it by the header."""
    noise(8, 8).save(path)
    data = bytearray(path.read_bytes())
    chunk = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    data[12:29] = chunk
    data[29:33] = struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(bytes(data))
    return path


def truncated_png(path):
    data = save(noise(300, 200), path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.write_text("not an image\n"), p)[1], "not an image"),
        (truncated_png, "truncated or corrupt"),
        (huge_png, "too large"),
    ],
    ids=["missing", "text", "truncated", "huge"],
)
def test_bad_image_files_name_the_file(tmp_path, make, reason):
    path = make(tmp_path / "picture.png")
    with pytest.raises(QwenChatError, match=reason) as error:
        load_image(path)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_large_image_is_shrunk_within_budget(tmp_path, suffix):
    settings = VisionPreprocessing(min_pixels=1024, max_pixels=32 * 32 * 16)
    path = save(noise(1600, 1200), tmp_path / f"big{suffix}")
    image = load_image(path, settings.max_pixels)
    assert image.width * image.height < 1600 * 1200 / 4
    assert image.width * image.height >= 4 * settings.max_pixels
    _, grid = preprocess_images([image], settings)
    assert int(grid.prod()) * settings.patch_size**2 <= settings.max_pixels


def test_image_under_the_shrink_threshold_is_untouched(tmp_path):
    path = save(noise(300, 200), tmp_path / "image.png")
    assert load_image(path, max_pixels=32 * 32 * 16).size == (300, 200)


def test_decompression_bomb_warning_is_handled(tmp_path, monkeypatch):
    path = save(noise(300, 200), tmp_path / "image.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40000)  # 60000 pixels: warning, not error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (300, 200)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)  # over twice the limit: error
    with pytest.raises(QwenChatError, match=r"image\.png.*too large"):
        load_image(path)
