"""Qwen3-VL: the Qwen3 decoder plus the vision tower, and where a prompt's pictures go.

The text model is the plain ``Qwen3Model``; what Qwen3-VL adds is (1) the tower's merged
tokens in place of the prompt's ``<|image_pad|>``/``<|video_pad|>`` embeddings, (2) its
DeepStack features added to those positions after the first decoder layers, and (3)
M-RoPE positions: a picture's tokens share one time position and spread over rows and
columns, so the positions after a picture run behind the token indices by a fixed delta.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import QwenChatError
from .qwen3 import Qwen3Model, TextLayout, VisualTokens
from .vision import VisionTower


@dataclass(frozen=True)
class VisualInput:
    """One image or video as the tower takes it: patches and ``(t, h, w)`` patch grid (a
    video's t counted in temporal groups, one prompt frame each); ``timestamps`` are the
    video frames' times for the prompt text, ``digest`` identifies the pixels."""

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    is_video: bool
    timestamps: tuple[float, ...] = ()
    digest: str = ""

    @classmethod
    def of(
        cls,
        pixel_values: torch.Tensor,
        grid_thw: Sequence[int],
        is_video: bool,
        timestamps: Sequence[float] = (),
    ) -> VisualInput:
        grid = tuple(int(v) for v in grid_thw)
        digest = hashlib.blake2b(pixel_values.contiguous().numpy().tobytes(), digest_size=16)
        digest.update(repr((grid, is_video)).encode())
        return cls(pixel_values, grid, is_video, tuple(timestamps), digest.hexdigest())

    def tokens(self, merge_size: int) -> int:
        t, h, w = self.grid_thw
        return t * (h // merge_size) * (w // merge_size)


class Qwen3VLModel(Qwen3Model):
    """``Qwen3VLForConditionalGeneration``: the decoder's tensors keep their Qwen3 names,
    the tower's are under ``visual.``."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.visual = VisionTower(config.vision)

    def shard(self, world, split: str) -> None:
        """The decoder's share (Qwen3Model.shard); the tower is held by process 0 alone,
        which runs it and sends its tokens to the others (distributed/driver.py)."""
        super().shard(world, split)
        if world.rank:
            self.visual = nn.Module()

    def encode_visual(self, item: VisualInput) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The tower's merged tokens of one picture and its DeepStack features."""
        grid = torch.tensor([item.grid_thw])
        return self.visual(item.pixel_values.to(self.device), grid)

    def prompt_layout(self, ids: list[int], visuals: Sequence[VisualInput] = ()) -> TextLayout:
        return VisionPrompt(ids, visuals, self.config) if visuals else TextLayout(ids)


@dataclass
class _Run:
    """A run of consecutive pad tokens: one image, or one temporal group of a video."""

    start: int
    length: int
    item: int  # index into the prompt's visuals
    offset: int  # the run's first token within the item's tokens


class VisionPrompt(TextLayout):
    """A prompt's pictures laid out on its ids: M-RoPE positions and rope delta, cache keys
    that tell different pictures apart, and the tower's tokens for any span of it."""

    def __init__(self, ids: list[int], visuals: Sequence[VisualInput], config: ModelConfig):
        self.visuals = list(visuals)
        self.merge = config.vision.spatial_merge_size
        self.runs = _runs(ids, self.visuals, config, self.merge)
        self.positions, self.rope_delta = _rope_index(len(ids), self.runs, self.visuals, self.merge)
        # Picture tokens are cached under (id, digest): a later prompt with another picture
        # in the same place never reuses these keys/values.
        self.keys: list = list(ids)
        self.mask = torch.zeros(len(ids), dtype=torch.bool)
        for run in self.runs:
            digest = self.visuals[run.item].digest
            self.keys[run.start : run.start + run.length] = [(ids[run.start], digest)] * run.length
            self.mask[run.start : run.start + run.length] = True
        self._visual_before = torch.cat([torch.zeros(1, dtype=torch.long), self.mask.cumsum(0)])
        self._from = len(ids)
        self._embeds: torch.Tensor | None = None
        self._deepstack: list[torch.Tensor] = []

    def prepare(self, model: Qwen3VLModel, start: int) -> float:
        """Run the tower on the pictures that have tokens at ``start`` or later (those
        before are already in the cache), keeping their tokens in prompt order; the
        seconds the tower took."""
        started = time.perf_counter()
        self._from = start
        wanted = [run for run in self.runs if run.start + run.length > start]
        encoded = {i: model.encode_visual(self.visuals[i]) for i in {r.item for r in wanted}}
        pieces: list[list[torch.Tensor]] = []
        for run in wanted:
            embeds, deepstack = encoded[run.item]
            first = run.offset + max(0, start - run.start)
            last = run.offset + run.length
            pieces.append([t[first:last] for t in (embeds, *deepstack)])
        if pieces:
            columns = [torch.cat(parts) for parts in zip(*pieces, strict=True)]
            self._embeds, self._deepstack = columns[0], columns[1:]
        return time.perf_counter() - started

    def rows(self, start: int, end: int, device) -> dict:
        """M-RoPE positions of positions ``start..end-1`` and the visual tokens among them
        (at or after the ``prepare`` start). Past the prompt, every axis of a generated
        token is its index plus the pictures' delta."""
        prompt = self.positions.shape[1]
        generated = torch.arange(max(start, prompt), max(end, prompt)) + self.rope_delta
        positions = torch.cat((self.positions[:, start:end], generated.expand(3, -1)), dim=1)
        positions = positions.to(device)
        mask = self.mask[start:end]
        if not mask.any():
            return {"positions": positions}
        base = int(self._visual_before[self._from])
        first = int(self._visual_before[start]) - base
        last = int(self._visual_before[min(end, prompt)]) - base
        mask = torch.cat((mask, torch.zeros(end - start - len(mask), dtype=torch.bool)))
        visual = VisualTokens(
            mask.to(device), self._embeds[first:last], [d[first:last] for d in self._deepstack]
        )
        return {"positions": positions, "visual": visual}


def _runs(
    ids: list[int], visuals: list[VisualInput], config: ModelConfig, merge: int
) -> list[_Run]:
    """The pad runs of ``ids``, each matched to its picture: images and videos each in
    order (as transformers matches them), a video giving one run per temporal group."""
    images = iter(i for i, v in enumerate(visuals) if not v.is_video)
    frames = iter(
        (i, group) for i, v in enumerate(visuals) if v.is_video for group in range(v.grid_thw[0])
    )
    pads = {config.image_token_id: images, config.video_token_id: frames}
    runs, index = [], 0
    for token, group in itertools.groupby(ids):
        length = len(list(group))
        if token in pads:
            picked = next(pads[token], None)
            if picked is None:
                _mismatch(ids, visuals, config, merge)
            item, group_index = (picked, 0) if token == config.image_token_id else picked
            _, h, w = visuals[item].grid_thw
            per_group = (h // merge) * (w // merge)
            if length != per_group:
                _mismatch(ids, visuals, config, merge)
            runs.append(_Run(index, length, item, group_index * per_group))
        index += length
    if next(images, None) is not None or next(frames, None) is not None:
        _mismatch(ids, visuals, config, merge)
    return runs


def _mismatch(ids, visuals, config, merge) -> None:
    pads = sum(t in (config.image_token_id, config.video_token_id) for t in ids)
    expected = sum(v.tokens(merge) for v in visuals)
    raise QwenChatError(
        f"the prompt has {pads} image/video pad tokens where its {len(visuals)} picture(s) "
        f"need {expected} in place; a message must not contain <|image_pad|> or "
        "<|video_pad|> as text"
    )


def _rope_index(
    length: int, runs: list[_Run], visuals: list[VisualInput], merge: int
) -> tuple[torch.Tensor, int]:
    """M-RoPE positions ``[3, length]`` and the rope delta (transformers' get_rope_index).

    Text advances all three axes by one per token. A picture run of ``h x w`` merged
    tokens in raster order gets time ``pos``, height ``pos + row``, width ``pos + col``,
    then moves ``pos`` on by ``max(h, w)``. Tokens after the prompt (at cache index p)
    sit at ``p + delta`` on every axis.
    """
    positions = torch.empty(3, length, dtype=torch.long)
    pos = index = 0
    for run in [*runs, None]:
        text_end = run.start if run else length
        positions[:, index:text_end] = torch.arange(pos, pos + text_end - index)
        pos += text_end - index
        if run is None:
            break
        _, h, w = visuals[run.item].grid_thw
        h, w = h // merge, w // merge
        span = slice(run.start, run.start + run.length)
        positions[0, span] = pos
        positions[1, span] = pos + torch.arange(h).repeat_interleave(w)
        positions[2, span] = pos + torch.arange(w).repeat(h)
        pos += max(h, w)
        index = run.start + run.length
    delta = int(positions.max()) + 1 - length if length else 0
    return positions, delta
