#!/usr/bin/env python3
"""Draw the integration's brand images (custom_components/prima/brand/): the piped ring, five
nodes around a spark. Needs Pillow (.venv-ha has it):

    .venv-ha/bin/python scripts/brand_images.py custom_components/prima/brand
"""

from __future__ import annotations

import math
import sys

from PIL import Image, ImageDraw

INK = {False: (24, 52, 110, 255), True: (235, 240, 255, 255)}  # light theme, dark theme
SPARK = (255, 170, 40, 255)


def draw(size: int, dark: bool, logo: bool) -> Image.Image:
    img = Image.new("RGBA", (size * (2 if logo else 1), size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    ink, c, r = INK[dark], size / 2, size * 0.34
    d.ellipse([c - r, c - r, c + r, c + r], outline=ink, width=max(2, size // 24))
    for i in range(5):
        a = -math.pi / 2 + 2 * math.pi * i / 5
        x, y, nr = c + r * math.cos(a), c + r * math.sin(a), size * 0.085
        d.ellipse([x - nr, y - nr, x + nr, y + nr], fill=ink)
    s = size * 0.12
    d.polygon([(c, c - s), (c + s * 0.35, c), (c, c + s), (c - s * 0.35, c)], fill=SPARK)
    if logo:
        d.text((size * 1.05, size * 0.38), "Prima", fill=ink, font_size=int(size * 0.28))
    return img


def main(out: str) -> None:
    for name, dark, logo, base in [("icon", False, False, 256), ("dark_icon", True, False, 256),
                                   ("logo", False, True, 128), ("dark_logo", True, True, 128)]:
        draw(base, dark, logo).save(f"{out}/{name}.png")
        draw(base * 2, dark, logo).save(f"{out}/{name}@2x.png")


if __name__ == "__main__":
    main(sys.argv[1])
