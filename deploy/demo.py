"""`make demo`: the main job end to end on generated images, printing where everything went.

Today the job is: export rtmdet-tiny to ONNX with NMS in the graph, and PyTorch inference on
generated images. Until the project ships a trained default checkpoint (issue 8) the weights
are random, which the output says.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from detdeploy.cli import main as cli_main

DEMO_DIR = Path('demo_out')


def write_demo_images(folder: Path, count: int = 3, seed: int = 0) -> None:
    """A few images of coloured shapes on a noisy background, of different sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        height, width = int(rng.integers(240, 480)), int(rng.integers(240, 640))
        background = rng.integers(90, 140, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(background)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
            size = int(rng.integers(30, 120))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x0, y0, x0 + size, y0 + size), fill=colour)
        image.save(folder / f'demo_{index}.png')


def run_step(args: list[str]) -> None:
    """One detdeploy command; stop the demo with its exit code if it fails."""
    print(f'demo: detdeploy {" ".join(args)}')
    try:
        cli_main(args)
    except SystemExit as exit_:
        if exit_.code:
            sys.exit(exit_.code)


def main() -> None:
    images, results = DEMO_DIR / 'images', DEMO_DIR / 'infer'
    onnx_file = DEMO_DIR / 'rtmdet-tiny.onnx'
    write_demo_images(images)
    print(f'demo: wrote generated images to {images}/')
    run_step(['export', '--model', 'rtmdet-tiny', '-o', str(onnx_file)])
    run_step(['infer', '--model', 'rtmdet-tiny', str(images), '--out', str(results)])
    print(f'demo: ONNX model {onnx_file}; detections (JSON) and drawn boxes (PNG) in {results}/')


if __name__ == '__main__':
    main()
