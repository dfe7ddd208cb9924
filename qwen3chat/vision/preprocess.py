"""Qwen3-VL inputs: images and video frames to the vision tower's patches.

Everything here reproduces what transformers does for Qwen3-VL, with Pillow and torch only:

* images go through ``Qwen2VLImageProcessor`` (the PIL one): bicubic resize to a size from
  ``smart_resize``, rescale by 1/255, normalize, repeat to the temporal patch, patchify;
* video frames go through ``Qwen3VLVideoProcessor``: frame sampling, a ``smart_resize`` that
  budgets pixels over all frames, torch's antialiased bicubic resize (what torchvision runs on
  the CPU), fused rescale+normalize, an odd frame count padded with the last frame;
* ``Qwen3VLProcessor``'s expansion of the prompt's pad tokens is in prompt.py.

Patch rows come out in the order the vision tower expects: frame by frame, and within a frame
every ``merge x merge`` block of neighbouring patches consecutive.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import QwenChatError
from ..jsonfiles import read_json

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# transformers refuses images and frames more elongated than this.
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class VisionPreprocessing:
    """How images and video frames become patches; defaults are what Qwen3-VL ships.

    ``min_pixels``/``max_pixels`` bound one image; ``video_min_pixels``/``video_max_pixels``
    bound a whole video (all frames together), as the video processor's ``size`` does.
    """

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    min_pixels: int = 65536
    max_pixels: int = 16777216
    video_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    video_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    video_min_pixels: int = 128 * 32 * 32
    video_max_pixels: int = 768 * 32 * 32
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            if getattr(self, name) < 1:
                raise QwenChatError(f"{name} must be at least 1, got {getattr(self, name)}")
        _check_pixel_bounds(self.min_pixels, self.max_pixels, "--min-pixels/--max-pixels")
        _check_pixel_bounds(self.video_min_pixels, self.video_max_pixels, "video size")
        if not self.fps > 0:
            raise QwenChatError(f"the video fps must be positive, got {self.fps}")
        if self.max_frames < self.temporal_patch_size:
            raise QwenChatError(
                f"the video frame limit must be at least {self.temporal_patch_size}, "
                f"got {self.max_frames}"
            )

    @property
    def factor(self) -> int:
        """Side of one merged patch in pixels: resized sides are multiples of it."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_model_dir(
        cls,
        model_dir: Path,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
    ) -> VisionPreprocessing:
        """Read ``preprocessor_config.json`` and ``video_preprocessor_config.json`` if present;
        the keyword arguments (the CLI's flags) override them when given."""
        image = read_json(Path(model_dir) / "preprocessor_config.json")
        video = read_json(Path(model_dir) / "video_preprocessor_config.json")
        defaults = cls()
        image_size = image.get("size") or {}
        video_size = video.get("size") or {}
        settings = cls(
            patch_size=_pick(image.get("patch_size"), defaults.patch_size),
            temporal_patch_size=_pick(
                image.get("temporal_patch_size"), defaults.temporal_patch_size
            ),
            merge_size=_pick(image.get("merge_size"), defaults.merge_size),
            rescale_factor=_pick(image.get("rescale_factor"), defaults.rescale_factor),
            image_mean=tuple(_pick(image.get("image_mean"), defaults.image_mean)),
            image_std=tuple(_pick(image.get("image_std"), defaults.image_std)),
            # Top-level min/max_pixels win over `size`, as in Qwen2VLImageProcessor.__init__.
            min_pixels=_pick(
                image.get("min_pixels"), image_size.get("shortest_edge"), defaults.min_pixels
            ),
            max_pixels=_pick(
                image.get("max_pixels"), image_size.get("longest_edge"), defaults.max_pixels
            ),
            video_mean=tuple(_pick(video.get("image_mean"), defaults.video_mean)),
            video_std=tuple(_pick(video.get("image_std"), defaults.video_std)),
            video_min_pixels=_pick(video_size.get("shortest_edge"), defaults.video_min_pixels),
            video_max_pixels=_pick(video_size.get("longest_edge"), defaults.video_max_pixels),
            fps=_pick(video.get("fps"), defaults.fps),
            min_frames=_pick(video.get("min_frames"), defaults.min_frames),
            max_frames=_pick(video.get("max_frames"), defaults.max_frames),
            cap_pixels_per_frame=bool(video.get("cap_pixels_per_frame")),
            max_video_tokens=_pick(video.get("max_video_tokens"), defaults.max_video_tokens),
        )
        overrides = {
            "min_pixels": min_pixels,
            "max_pixels": max_pixels,
            "fps": fps,
            "max_frames": max_frames,
        }
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def _check_pixel_bounds(low: int, high: int, what: str) -> None:
    if not 0 < low <= high:
        raise QwenChatError(f"{what}: need 0 < min <= max pixels, got {low} and {high}")


def _pick(*values):
    """The first value that is not None (a JSON null counts as absent)."""
    return next(v for v in values if v is not None)


# ---------------------------------------------------------------------------- loading images


def load_image(
    source: str | Path | bytes, max_pixels: int | None = None, name: str | None = None
) -> Image.Image:
    """Open an image file (or an image's bytes, named ``name`` in errors) as RGB,
    transparency composited onto white as transformers does.

    With ``max_pixels``, an image of 16 times that or more is shrunk while it is read (JPEG
    draft decoding, then a box reduction) to about 4 times that: such an image would lose
    that detail in the exact resize anyway, and reading it whole costs memory. Smaller images
    are left untouched, so they preprocess exactly as in transformers.
    """
    opened = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    path = name or str(source)
    try:
        with warnings.catch_warnings():
            # Pillow's size warning is handled here by shrinking; past twice its limit it
            # raises DecompressionBombError instead, reported below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(opened) as image:
                _check_aspect_ratio(*image.size, path)
                if max_pixels is not None:
                    _draft(image, max_pixels)
                image = to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise QwenChatError(f"{path}: no such file; check the image path") from None
    except IsADirectoryError:
        raise QwenChatError(f"{path}: is a directory; pass an image file") from None
    except PermissionError:
        raise QwenChatError(f"{path}: permission denied; make the file readable") from None
    except UnidentifiedImageError:
        raise QwenChatError(
            f"{path}: not an image Pillow can read; pass a PNG, JPEG, WebP, GIF or BMP file"
        ) from None
    except Image.DecompressionBombError as e:
        reason = str(e).rstrip(".")
        raise QwenChatError(
            f"{path}: too large to decode safely ({reason}); downscale it first"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise QwenChatError(
            f"{path}: cannot decode the image ({e}); the file may be truncated or corrupt"
        ) from None
    if max_pixels is not None:
        image = _reduce(image, max_pixels)
    return image


def _shrink_factor(width: int, height: int, max_pixels: int) -> int:
    """Largest integer shrink per side that keeps 4x ``max_pixels`` (twice the final side)."""
    return math.isqrt(width * height // (4 * max_pixels))


def _draft(image: Image.Image, max_pixels: int) -> None:
    # Only JPEG (and a few others) can decode at 1/2, 1/4 or 1/8 scale; draft picks the
    # smallest scale that still covers the requested size, and is a no-op elsewhere.
    width, height = image.size
    shrink = _shrink_factor(width, height, max_pixels)
    if shrink >= 2:
        image.draft(None, (-(-width // shrink), -(-height // shrink)))


def _reduce(image: Image.Image, max_pixels: int) -> Image.Image:
    shrink = _shrink_factor(*image.size, max_pixels)
    return image.reduce(shrink) if shrink >= 2 else image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white: transformers' ``convert_to_rgb``."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_video_frames(
    paths: Sequence[str | Path], settings: VisionPreprocessing
) -> list[Image.Image]:
    """Frames of one video, one image file each, all the same size, at least one temporal
    patch long."""
    if len(paths) < settings.temporal_patch_size:
        raise QwenChatError(
            f"--video-frames needs at least {settings.temporal_patch_size} frames, got "
            f"{len(paths)}; pass a single picture as an image instead"
        )
    frames = [load_image(p, settings.video_max_pixels) for p in paths]
    for path, frame in zip(paths, frames, strict=True):
        if frame.size != frames[0].size:
            raise QwenChatError(
                f"{path}: frame is {frame.width}x{frame.height} but the first frame is "
                f"{frames[0].width}x{frames[0].height}; all --video-frames must be the same size"
            )
    return frames


# ---------------------------------------------------------------------------- resizing


def _check_aspect_ratio(width: int, height: int, what: str) -> None:
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise QwenChatError(
            f"{what}: {width}x{height} is more elongated than {MAX_ASPECT_RATIO}:1, which "
            "Qwen3-VL cannot take; crop it first"
        )


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Sides that are multiples of ``factor``, with an area within [min_pixels, max_pixels],
    keeping the aspect ratio as well as that allows (transformers' Qwen2-VL version)."""
    _check_aspect_ratio(width, height, "image")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
) -> tuple[int, int]:
    """Frame sides for a video: as ``smart_resize``, but the pixel bounds apply to all frames
    together (transformers' Qwen3-VL video version)."""
    if num_frames < temporal_factor:
        raise QwenChatError(f"a video needs at least {temporal_factor} frames, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_aspect_ratio(width, height, "video frame")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _video_frame_size(
    num_frames: int, height: int, width: int, settings: VisionPreprocessing
) -> tuple[int, int]:
    max_pixels = settings.video_max_pixels
    if settings.cap_pixels_per_frame:
        # qwen-vl-utils' cap: each frame gets at most max_video_tokens merged patches, or its
        # share of the budget, but never less than 1.05x the minimum.
        frame_cap = settings.max_video_tokens * settings.factor**2
        per_frame = max(
            min(frame_cap, settings.video_max_pixels // num_frames),
            int(settings.video_min_pixels * 1.05),
        )
        max_pixels = per_frame * num_frames
    return smart_resize_video(
        num_frames,
        height,
        width,
        temporal_factor=settings.temporal_patch_size,
        factor=settings.factor,
        min_pixels=settings.video_min_pixels,
        max_pixels=max_pixels,
    )


# ---------------------------------------------------------------------------- patches


def _pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB image as a ``(3, H, W)`` uint8 tensor."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1)


def _patchify(frames: torch.Tensor, settings: VisionPreprocessing) -> torch.Tensor:
    """``(T, C, H, W)`` frames, T a multiple of the temporal patch, to one row per patch.

    Rows run over temporal groups, then merge blocks row-major, then the patches of a block;
    each row holds ``C x T x P x P`` values, as transformers' ``patchify`` lays them out.
    """
    t, c, h, w = frames.shape
    p, m, tp = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p)


def _image_tensor(image: Image.Image, settings: VisionPreprocessing) -> torch.Tensor:
    """Resized, rescaled and normalized ``(3, H, W)`` float32, exactly as the PIL processor:
    rescale in float64 then cast, normalize in float32."""
    height, width = smart_resize(
        image.height, image.width, settings.factor, settings.min_pixels, settings.max_pixels
    )
    resized = image.resize((width, height), Image.Resampling.BICUBIC)
    x = (_pil_to_uint8(resized).double() * settings.rescale_factor).float()
    mean = torch.tensor(settings.image_mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(settings.image_std, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean) / std


def preprocess_images(
    images: Sequence[Image.Image], settings: VisionPreprocessing
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images to ``(pixel_values [patches, C*T*P*P] float32, image_grid_thw [n, 3] int64)``."""
    if not images:
        raise ValueError("preprocess_images needs at least one image")
    rows, grids = [], []
    for image in images:
        x = _image_tensor(image if image.mode == "RGB" else to_rgb(image), settings)
        # A still image is a clip of one temporal patch: the same frame repeated.
        frames = x.unsqueeze(0).expand(settings.temporal_patch_size, -1, -1, -1)
        rows.append(_patchify(frames, settings))
        grids.append([1, x.shape[1] // settings.patch_size, x.shape[2] // settings.patch_size])
    return torch.cat(rows), torch.tensor(grids, dtype=torch.long)


class VideoInputs(NamedTuple):
    """One preprocessed video: its patches, its ``[1, 3]`` grid, and the time in seconds of
    each temporal group (the mean of its first and last frame's times)."""

    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    timestamps: list[float]


def sample_frame_indices(num_frames: int, settings: VisionPreprocessing) -> list[int]:
    """Which of ``num_frames`` frames (taken at ``settings.fps``) the video processor keeps:
    all of them unless there are more than ``max_frames``, then evenly spaced ones."""
    # The processor's own float arithmetic (source fps == sampling fps here), so the counts
    # agree with it to the frame.
    wanted = int(num_frames / settings.fps * settings.fps)
    wanted = min(max(wanted, settings.min_frames), settings.max_frames, num_frames)
    if wanted == 1:
        return [0]
    # numpy.linspace(0, n - 1, wanted).round(): Python's round is half-to-even like numpy's.
    step = (num_frames - 1) / (wanted - 1)
    return [round(i * step) for i in range(wanted - 1)] + [num_frames - 1]


def _frame_timestamps(indices: list[int], fps: float, temporal_patch_size: int) -> list[float]:
    # As Qwen3VLProcessor._calculate_timestamps: pad with the last index, then average the
    # first and last frame time of each temporal group.
    padded = indices + indices[-1:] * (-len(indices) % temporal_patch_size)
    times = [i / fps for i in padded]
    return [
        (times[i] + times[i + temporal_patch_size - 1]) / 2
        for i in range(0, len(times), temporal_patch_size)
    ]


def _resized_frame(frame: Image.Image, height: int, width: int) -> torch.Tensor:
    """One frame as ``(3, height, width)`` uint8, resized as torchvision does on the CPU:
    torch's antialiased bicubic straight on uint8 (close to Pillow's, not the same), and
    nothing at all when the size is unchanged."""
    x = _pil_to_uint8(frame if frame.mode == "RGB" else to_rgb(frame))
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(
        x.unsqueeze(0), size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )[0]


def preprocess_video(
    frames: Sequence[Image.Image], settings: VisionPreprocessing, fps: float | None = None
) -> VideoInputs:
    """Frames of one video (taken at ``fps``, default ``settings.fps``) to patches, grid and
    timestamps, as Qwen3VLVideoProcessor and Qwen3VLProcessor make them."""
    settings = settings if fps is None else replace(settings, fps=fps)
    indices = sample_frame_indices(len(frames), settings)
    first = frames[indices[0]]
    height, width = _video_frame_size(len(indices), first.height, first.width, settings)
    # One frame at a time: only the resized frames are ever held together.
    resized = torch.stack([_resized_frame(frames[i], height, width) for i in indices])
    # transformers fuses rescale into normalize: (x - mean/scale) / (std/scale) in float32.
    mean = torch.tensor(settings.video_mean) * (1.0 / settings.rescale_factor)
    std = torch.tensor(settings.video_std) * (1.0 / settings.rescale_factor)
    x = (resized.float() - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    # An odd count (for a temporal patch of 2) is padded by repeating the last frame.
    pad = -x.shape[0] % settings.temporal_patch_size
    x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    p = settings.patch_size
    grid = torch.tensor([[x.shape[0] // settings.temporal_patch_size, height // p, width // p]])
    return VideoInputs(
        _patchify(x, settings),
        grid,
        _frame_timestamps(indices, settings.fps, settings.temporal_patch_size),
    )


# ---------------------------------------------------------------------------- budget


def count_visual_tokens(
    settings: VisionPreprocessing,
    images: Sequence[Image.Image] = (),
    videos: Sequence[Sequence[Image.Image]] = (),
) -> int:
    """Pad tokens the inputs will take in the prompt, from their sizes alone (no resizing)."""
    per_merge = settings.merge_size**2
    total = 0
    for image in images:
        height, width = smart_resize(
            image.height, image.width, settings.factor, settings.min_pixels, settings.max_pixels
        )
        total += height * width // (settings.patch_size**2 * per_merge)
    for frames in videos:
        num_frames = len(sample_frame_indices(len(frames), settings))
        height, width = _video_frame_size(num_frames, frames[0].height, frames[0].width, settings)
        groups = -(-num_frames // settings.temporal_patch_size)
        total += groups * height * width // (settings.patch_size**2 * per_merge)
    return total


def check_visual_tokens(num_visual_tokens: int, max_seq_len: int) -> None:
    """A clear error when the pictures alone do not fit the context."""
    if num_visual_tokens >= max_seq_len:
        raise QwenChatError(
            f"the images and video need {num_visual_tokens} tokens but --max-seq-len is "
            f"{max_seq_len}; raise --max-seq-len, lower --max-pixels or pass fewer frames"
        )
