"""Video frames with PyAV: `frames` pictures taken uniformly, one from the middle of each equal segment of the clip
(the rule of InternVL's own video loader), as RGB PIL images."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeLLMError


def frame_indices(total: int, frames: int) -> list[int]:
    segment = (total - 1) / frames
    return [int(segment / 2 + round(segment * i)) for i in range(frames)]


def read_frames(video, frames: int) -> list:
    try:
        import av
    except ImportError as e:
        raise EdgeLLMError("reading video needs PyAV: pip install av") from e
    if frames < 1:
        raise EdgeLLMError("--frames must be at least 1")
    if not isinstance(video, (str, Path)):
        raise EdgeLLMError(f"a video must be a file path, not {type(video).__name__}")
    if not Path(video).is_file():
        raise EdgeLLMError(f"{video}: no such video file")
    try:
        with av.open(str(video)) as container:
            if not container.streams.video:
                raise EdgeLLMError(f"{video}: the file holds no video stream")
            total = container.streams.video[0].frames or sum(1 for _ in container.decode(video=0))
        if total == 0:
            raise EdgeLLMError(f"{video}: the video has no frames")
        wanted = frame_indices(total, frames)
        pictures = {}
        with av.open(str(video)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    pictures[i] = frame.to_image().convert("RGB")
                if i >= wanted[-1]:
                    break
    except av.error.FFmpegError as e:
        raise EdgeLLMError(f"{video}: not a readable video ({e})") from e
    if len(pictures) < len(set(wanted)):
        raise EdgeLLMError(f"{video}: only {len(pictures)} of the frames it announces could be decoded")
    return [pictures[i] for i in wanted]
