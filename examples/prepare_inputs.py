"""Turn images, a video and a question into what the model consumes, without loading a model.

    PYTHONPATH=. python examples/prepare_inputs.py     # from the repository root, or with the package installed
    PYTHONPATH=. python examples/prepare_inputs.py --image photo.jpg --image other.png --video clip.mp4 \
        --query "Compare them."

For each of three requests (one image, several images, one video) it prints the pixel values, the
560x560 tiles, the global view, the number of image tokens the vision tower will produce, and the
layout of the final input sequence (text and image tokens), using stand-in embeddings of width 1.
Without --image / --video it uses the photos in tests/assets and writes a short demo video.
"""
import argparse
import os
import tempfile

import numpy as np

from mindxcomposer import InternLM2Tokenizer, IXCImageProcessor
from mindxcomposer.image_processing import TILE, VIDEO_EXTENSIONS, global_view
from mindxcomposer.prompt import image_hd_num, interleave_chat

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "assets")


def image_tokens(pixel_values):
    """Tokens the vision tower + 2x2 merge produce for a canvas of h x w tiles."""
    h, w = pixel_values.shape[2] // TILE, pixel_values.shape[3] // TILE
    return (h * w + 1) * 400 + 1 + (h + 1) * 20


def write_demo_video(path, seconds=4, fps=10):
    import cv2

    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (320, 240))
    for t in range(seconds * fps):
        frame = np.full((240, 320, 3), 255, np.uint8)
        cv2.circle(frame, (20 + 7 * t, 120), 30, (0, 0, 255), -1)
        cv2.rectangle(frame, (140, 10 + 4 * t), (200, 70 + 4 * t), (255, 0, 0), -1)
        writer.write(frame)
    writer.release()


def describe(title, query, sources, tokenizer, processor):
    print(f"\n== {title}: {query!r}")
    hd_num = image_hd_num(len(sources))
    pixels = {}
    for source in sources:
        pv = processor(source, hd_num=hd_num)
        pixels[id(source)] = pv
        tiles = f"{pv.shape[2] // TILE}x{pv.shape[3] // TILE}"
        is_video = os.path.splitext(str(source))[1].lower() in VIDEO_EXTENSIONS
        print(f"  {os.path.basename(str(source))}: pixel_values {pv.shape} ({tiles} tiles of {TILE}), "
              f"global view {global_view(pv).shape}, {image_tokens(pv)} image tokens"
              + ("" if is_video else f" (hd_num {hd_num})"))

    def embed_tokens(ids):
        return np.zeros(ids.shape + (1,), np.float32)

    def encode_image(source, _hd_num):
        return np.zeros((1, image_tokens(pixels[id(source)]), 1), np.float32)

    embeds, im_mask, _ = interleave_chat(query, sources, tokenizer, embed_tokens, encode_image)
    print(f"  input sequence: {embeds.shape[1]} positions, {int(im_mask.sum())} of them image tokens")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", action="append", help="image path (repeat for several)")
    parser.add_argument("--video", help="video path (.mp4, .avi, .mkv, .mov, .wmv)")
    parser.add_argument("--query", default="Describe what you see.")
    args = parser.parse_args()

    tokenizer = InternLM2Tokenizer.from_pretrained()  # the bundled InternLM2 tokenizer
    processor = IXCImageProcessor()
    images = args.image or [os.path.join(ASSETS, "coffee.png"), os.path.join(ASSETS, "rocket_portrait.png")]

    describe("one image (placed before the prompt)", args.query, images[:1], tokenizer, processor)
    if len(images) > 1:
        markers = " ".join(f"Image {i + 1}: <ImageHere>." for i in range(len(images)))
        describe("several images (one <ImageHere> each, hd_num 6)", f"{markers} {args.query}", images,
                 tokenizer, processor)
    with tempfile.TemporaryDirectory() as tmp:
        video = args.video
        if video is None:
            video = os.path.join(tmp, "demo.mp4")
            write_demo_video(video)
        describe("video (about one frame per second, at most 32, in one labelled image)", args.query, [video],
                 tokenizer, processor)


if __name__ == "__main__":
    main()
