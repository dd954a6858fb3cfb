"""Video frames with PyAV. Which frames to take is the family's rule, passed in as `choose(total, fps)`: one frame
from the middle of each of N equal segments (`segment_midpoints`), or a sampling rate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import EdgeLLMError


def segment_midpoints(total: int, frames: int) -> list[int]:
    """`frames` pictures, one from the middle of each equal segment of the clip."""
    if frames < 1:
        raise EdgeLLMError("--frames must be at least 1")
    segment = (total - 1) / frames
    return [int(segment / 2 + round(segment * i)) for i in range(frames)]


def read_frames(video, choose: Callable[[int, float], list[int]]) -> tuple[list, float, int]:
    """(RGB PIL frames at the indices choose(total frames, frame rate) picks, the clip's frame rate, its frames)."""
    try:
        import av
    except ImportError as e:
        raise EdgeLLMError("reading video needs PyAV: pip install av") from e
    if not isinstance(video, (str, Path)):
        raise EdgeLLMError(f"a video must be a file path, not {type(video).__name__}")
    if not Path(video).is_file():
        raise EdgeLLMError(f"{video}: no such video file")
    try:
        with av.open(str(video)) as container:
            if not container.streams.video:
                raise EdgeLLMError(f"{video}: the file holds no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0) or 24.0
            total = stream.frames or sum(1 for _ in container.decode(video=0))
        if total == 0:
            raise EdgeLLMError(f"{video}: the video has no frames")
        wanted = choose(total, rate)
        pictures = {}
        with av.open(str(video)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    pictures[i] = frame.to_image().convert("RGB")
                if i >= max(wanted):
                    break
    except av.error.FFmpegError as e:
        raise EdgeLLMError(f"{video}: not a readable video ({e})") from e
    if len(pictures) < len(set(wanted)):
        raise EdgeLLMError(f"{video}: only {len(pictures)} of the frames it announces could be decoded")
    return [pictures[i] for i in wanted], rate, total
