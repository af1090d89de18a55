"""Detection on video files for `detdeploy infer`: frames decoded with PyAV (FFmpeg), detected
through the shared pipeline, written back as an annotated video and one JSON of every frame.

Returns what it did as data; printing is the CLI's job. PyAV is the optional `video` extra.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from detdeploy.core.errors import DetdeployError
from detdeploy.core.fileio import atomic_write, make_output_dir
from detdeploy.inference.draw import draw_detections
from detdeploy.runtimes.backend import Backend
from detdeploy.runtimes.pipeline import detect

VIDEO_SUFFIXES = {'.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg', '.mpeg'}
VIDEO_CODEC = 'libx264'         # widely playable; FFmpeg's own mpeg4 where PyAV's build lacks it


@dataclass
class VideoReport:
    source: str
    frames: int
    detections: int                     # all frames, after --score-thr
    shown: int                          # all frames, above --show-thr
    milliseconds: float                 # decoding to both files written
    video_path: Path | None
    json_path: Path | None


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def _av():
    try:
        import av
    except ImportError:
        raise DetdeployError("video input needs PyAV: pip install 'detdeploy[video]' (or av)"
                             ) from None
    return av


def read_frames(path: Path) -> tuple[Iterator[np.ndarray], Fraction]:
    """The RGB frames of the first video stream, and its frame rate."""
    av = _av()
    try:
        container = av.open(str(path))
        stream = container.streams.video[0]
    except (av.FFmpegError, IndexError, OSError) as exc:
        raise DetdeployError(f'{path}: cannot read it as a video ({exc})') from None
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)

    def frames() -> Iterator[np.ndarray]:
        with container:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format='rgb24')
    return frames(), rate


class _VideoWriter:
    """Frames in, an H.264 (or MPEG-4 Part 2) .mp4 out, written atomically."""

    def __init__(self, handle, rate: Fraction):
        av = _av()
        self.container = av.open(handle, mode='w', format='mp4')
        codec = VIDEO_CODEC if VIDEO_CODEC in av.codecs_available else 'mpeg4'
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.pix_fmt = 'yuv420p'
        self.av = av
        self.sized = False

    def write(self, image_rgb: np.ndarray) -> None:
        if not self.sized:              # the first frame sets the size (even, for yuv420p)
            self.stream.width = image_rgb.shape[1] // 2 * 2
            self.stream.height = image_rgb.shape[0] // 2 * 2
            self.sized = True
        image_rgb = np.ascontiguousarray(image_rgb[:self.stream.height, :self.stream.width])
        frame = self.av.VideoFrame.from_ndarray(image_rgb, format='rgb24')
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def _chunks(frames: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    chunk = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_video(backend: Backend, path: Path, out_dir: Path | None, stem: str,
              score_thr: float | None = None, show_thr: float = 0.3, batch_size: int = 1,
              overwrite: bool = True, progress: Callable[[int], None] | None = None
              ) -> VideoReport:
    """Detect on every frame of `path`, `batch_size` frames at a time (memory stays bounded).
    With `out_dir`, write `<stem>.mp4` (the frames with the detections above `show_thr` drawn)
    and `<stem>.json` (per frame: index, time in seconds and every detection above
    `score_thr`), each atomically."""
    started = time.perf_counter()
    frames, rate = read_frames(path)
    report = VideoReport(str(path), 0, 0, 0, 0.0, None, None)
    records = []
    with contextlib.ExitStack() as stack:
        writer = None
        if out_dir is not None:
            out_dir = make_output_dir(out_dir)
            report.video_path = out_dir / f'{stem}.mp4'
            writer = _VideoWriter(stack.enter_context(
                atomic_write(report.video_path, overwrite=overwrite)), rate)
        for chunk in _chunks(frames, batch_size):
            for detections, image_rgb in detect(backend, chunk, batch_size,
                                                keep_images=writer is not None):
                index = report.frames
                if score_thr is not None:
                    detections = detections.above(score_thr)
                shown = detections.above(show_thr)
                record = detections.to_dict()
                record.update(image=f'{path}#frame={index}', frame=index,
                              time_s=round(float(index / rate), 6))
                records.append(record)
                report.frames += 1
                report.detections += len(detections)
                report.shown += len(shown)
                if writer is not None:
                    writer.write(np.asarray(draw_detections(image_rgb, shown)))
                if progress is not None:
                    progress(1)
        if report.frames == 0:
            raise DetdeployError(f'{path}: the video has no frames')
        if writer is not None:
            writer.close()
    if out_dir is not None:
        report.json_path = out_dir / f'{stem}.json'
        with atomic_write(report.json_path, 'w', overwrite=overwrite) as handle:
            json.dump({'video': str(path), 'fps': float(rate), 'frames': records}, handle,
                      indent=1)
    report.milliseconds = 1000 * (time.perf_counter() - started)
    return report
