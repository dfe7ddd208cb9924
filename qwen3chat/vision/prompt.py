"""Chatting about pictures: image and frame files to VisualInputs, and chat messages that
hold pictures to prompt ids with their vision tokens expanded as Qwen3VLProcessor does.

A message's pictures travel inside it, as ``{"type": "image", "picture": VisualInput}``
content items (the chat template reads only the type), so that dropping or keeping a
message drops or keeps its pictures with it. VisionChat has the interface of the text
chat's prompt encoder (chat/prompts.py), so the chat code never asks which it has.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import QwenChatError
from ..model.qwen3_vl import VisualInput
from ..tokenizer import Tokenizer
from .preprocess import (
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    VideoInputs,
    VisionPreprocessing,
    check_visual_tokens,
    load_image,
    load_video_frames,
    preprocess_images,
    preprocess_video,
)


def require_vision_model(config, path: Path) -> None:
    if config.vision is None:
        raise QwenChatError(f"{path}: is a text-only model; use qwen3chat chat")


@dataclass(frozen=True)
class VisionChat:
    """How this chat turns files into pictures (--min-pixels, --max-pixels, ...)."""

    settings: VisionPreprocessing

    def image(self, source: str | Path | bytes, name: str | None = None) -> VisualInput:
        """A picture from an image file, or its bytes (``name`` says where they came from
        in errors)."""
        image = load_image(source, self.settings.max_pixels, name)
        pixels, grid = preprocess_images([image], self.settings)
        return VisualInput.of(pixels, grid[0], is_video=False)

    def video(self, paths: Sequence[str | Path]) -> VisualInput:
        clip = preprocess_video(load_video_frames(paths, self.settings), self.settings)
        return VisualInput.of(
            clip.pixel_values_videos, clip.video_grid_thw[0], True, clip.timestamps
        )

    def count_tokens(self, visuals: Sequence[VisualInput]) -> int:
        return sum(v.tokens(self.settings.merge_size) for v in visuals)

    def check_fits(self, visuals: Sequence[VisualInput], max_seq_len: int) -> None:
        check_visual_tokens(self.count_tokens(visuals), max_seq_len)

    def encode_chat(
        self,
        tokenizer: Tokenizer,
        messages: list[dict],
        enable_thinking: bool = True,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> tuple[list[int], list[VisualInput]]:
        """Ids of the templated ``messages`` with each picture's placeholder expanded to
        one pad per token, and the pictures in the order of the messages."""
        visuals = [
            item["picture"]
            for message in messages
            if isinstance(message["content"], list)
            for item in message["content"]
            if "picture" in item
        ]
        prompt = tokenizer.render(messages, enable_thinking, add_generation_prompt, tools)
        grids = [v.grid_thw for v in visuals if not v.is_video]
        videos = [
            VideoInputs(v.pixel_values, torch.tensor([v.grid_thw]), list(v.timestamps))
            for v in visuals
            if v.is_video
        ]
        expanded = expand_vision_tokens(
            prompt, torch.tensor(grids) if grids else None, videos, self.settings.merge_size
        )
        return tokenizer.encode(expanded), visuals


def user_message(text: str, pictures: Sequence[VisualInput] = ()) -> dict:
    """A user turn: its pictures (images, then videos, as Qwen3-VL's examples put them)
    before its text."""
    ordered = sorted(pictures, key=lambda v: v.is_video)
    content = [{"type": "video" if v.is_video else "image", "picture": v} for v in ordered]
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


def _image_tokens(grid: Sequence[int], merge_size: int) -> int:
    t, h, w = (int(v) for v in grid)
    return t * h * w // merge_size**2


def _video_text(video: VideoInputs, merge_size: int) -> str:
    _, h, w = (int(v) for v in video.video_grid_thw[0])
    frame = VISION_START + VIDEO_PAD * (h * w // merge_size**2) + VISION_END
    return "".join(f"<{t:.1f} seconds>{frame}" for t in video.timestamps)


def expand_vision_tokens(
    prompt: str,
    image_grid_thw: torch.Tensor | None = None,
    videos: Sequence[VideoInputs] = (),
    merge_size: int = 2,
) -> str:
    """Each ``<|image_pad|>`` to one pad per merged patch of its image, each ``<|video_pad|>``
    to its timestamped frames, in order, as Qwen3VLProcessor does. Every frame brings its
    own ``<|vision_start|>``/``<|vision_end|>``, so the template's wrapper around a video's
    placeholder goes with it (Qwen's processor; transformers 5.0-5.24 kept it, doubling
    the markers)."""
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    found = (prompt.count(IMAGE_PAD), prompt.count(VIDEO_PAD))
    if found != (len(grids), len(videos)):
        raise QwenChatError(
            f"the prompt has {found[0]} image and {found[1]} video placeholders but "
            f"{len(grids)} images and {len(videos)} videos were given"
        )
    images = iter(IMAGE_PAD * _image_tokens(g, merge_size) for g in grids)
    clips = iter(_video_text(v, merge_size) for v in videos)

    def expand(match: re.Match) -> str:
        return next(images) if match.group() == IMAGE_PAD else next(clips)

    video = f"{re.escape(VISION_START + VIDEO_PAD + VISION_END)}|{re.escape(VIDEO_PAD)}"
    return re.sub(f"{re.escape(IMAGE_PAD)}|{video}", expand, prompt)
