"""Small files with known content for the readers' tests: encoded images identified by their
width, and WebDataset tars (shared by test_sources.py and test_text_cap.py)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def encoded_image(width: int, height: int = 8, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """An image identified by its width (sizes survive any codec)."""
    buf = io.BytesIO()
    color = (width * 7 % 256, 40, 200) if mode == "RGB" else (200, 10, 10, 0)
    Image.new(mode, (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of (name, bytes) members, in order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def wds_members(n: int) -> list[tuple[str, bytes]]:
    """n WebDataset samples as img2dataset writes them: KEY.jpg (sample i's image is 10 + i
    pixels wide), KEY.txt (its caption) and KEY.json (url, caption, key, status)."""
    members = []
    for i in range(n):
        key = f"{i:09d}"
        meta = {
            "url": f"http://x/{i}.jpg",
            "caption": f"caption {i}",
            "key": key,
            "status": "success",
        }
        members += [
            (f"{key}.jpg", encoded_image(10 + i, fmt="JPEG")),
            (f"{key}.txt", f"caption {i}".encode()),
            (f"{key}.json", json.dumps(meta).encode()),
        ]
    return members
