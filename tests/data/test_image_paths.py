"""Record image paths stay inside their image root unless the source allows otherwise."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mm1.config import ConfigError, SourceConfig, load_config
from mm1.data.mixture import SourceStream
from mm1.data.sources import (
    ReadStats,
    read_coco_captions,
    read_llava,
    read_mmc4_jsonl,
    read_obelics_parquet,
)


def _png(width: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, 8), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """root/images/in.png (inside), tmp/outside.png (outside), root/images/linked -> elsewhere."""
    root = tmp_path / "root"
    images = root / "images"
    images.mkdir(parents=True)
    (images / "in.png").write_bytes(_png(11))
    (tmp_path / "outside.png").write_bytes(_png(22))
    elsewhere = tmp_path / "store"
    elsewhere.mkdir()
    (elsewhere / "linked.png").write_bytes(_png(33))
    (images / "linked").symlink_to(elsewhere, target_is_directory=True)
    return {"root": root, "images": images, "outside": tmp_path / "outside.png"}


def _names(tree: dict[str, Path]) -> list[str]:
    return [
        "in.png",
        "../../outside.png",  # climbs out of images/
        str(tree["outside"]),  # absolute
        "linked/linked.png",  # a symlinked folder inside the root: allowed
        "sub/../in.png",  # climbs but stays inside once normalised: allowed
    ]


def _llava(tree: dict[str, Path]) -> Path:
    recs = [
        {"id": str(i), "image": name, "conversations": [{"from": "human", "value": "<image>x"}]}
        for i, name in enumerate(_names(tree))
    ]
    path = tree["root"] / "l.json"
    path.write_text(json.dumps(recs))
    return path


def test_llava_paths_leaving_the_root_are_skipped_and_counted(tree) -> None:
    stats = ReadStats()
    convs = list(read_llava(_llava(tree), tree["images"], stats))
    assert [c.images[0].width for c in convs] == [11, 33, 11]
    assert stats.skipped == {"path_outside_root": 1, "absolute_path": 1}


def test_llava_paths_leaving_the_root_with_the_switch(tree) -> None:
    stats = ReadStats()
    convs = list(read_llava(_llava(tree), tree["images"], stats, allow_absolute_paths=True))
    assert [c.images[0].width for c in convs] == [11, 22, 22, 33, 11]
    assert stats.skipped == {}


def _obelics(tree: dict[str, Path], struct: bool) -> Path:
    names = _names(tree)
    if struct:  # HF `datasets` Image feature: {bytes, path}
        t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        images = pa.array([[{"bytes": None, "path": n}, None] for n in names], pa.list_(t))
    else:
        images = pa.array([[n, None] for n in names], pa.list_(pa.string()))
    texts = pa.array([[None, "t"] for _ in names], pa.list_(pa.string()))
    path = tree["root"] / "o.parquet"
    pq.write_table(pa.table({"images": images, "texts": texts}), path)
    return path


@pytest.mark.parametrize("struct", [False, True])
def test_obelics_paths_leaving_the_root(tree, struct: bool) -> None:
    path = _obelics(tree, struct)
    stats = ReadStats()
    docs = list(read_obelics_parquet(path, stats=stats, image_root=tree["images"]))
    assert [d.parts[0].width for d in docs] == [11, 33, 11]
    assert stats.skipped == {"path_outside_root": 1, "absolute_path": 1}
    allowed = read_obelics_parquet(path, image_root=tree["images"], allow_absolute_paths=True)
    assert [d.parts[0].width for d in allowed] == [11, 22, 22, 33, 11]


def test_mmc4_and_coco_paths_leaving_the_root(tree) -> None:
    names = _names(tree)
    mmc4 = tree["root"] / "m.jsonl"
    mmc4.write_text(
        "".join(
            json.dumps(
                {"text_list": ["t"], "image_info": [{"image_name": n, "matched_text_index": 0}]}
            )
            + "\n"
            for n in names
        )
    )
    stats = ReadStats()
    docs = list(read_mmc4_jsonl(mmc4, stats=stats, image_dir=tree["images"]))
    assert [d.parts[0].width for d in docs] == [11, 33, 11]
    assert stats.skipped == {"path_outside_root": 1, "absolute_path": 1}

    coco = tree["root"] / "c.json"
    coco.write_text(
        json.dumps(
            {
                "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                "annotations": [{"image_id": i, "caption": "c"} for i in range(len(names))],
            }
        )
    )
    stats = ReadStats()
    docs = list(read_coco_captions(coco, stats=stats, image_root=tree["images"]))
    assert [d.parts[0].width for d in docs] == [11, 33, 11]
    assert stats.skipped == {"path_outside_root": 1, "absolute_path": 1}


def test_the_source_switch_reaches_the_reader(tree) -> None:
    path = _llava(tree)
    for allow, widths in ((False, [11, 33, 11]), (True, [11, 22, 22, 33, 11])):
        spec = SourceConfig(
            format="llava", path=str(path), image_root=str(tree["images"]), kind="sft"
        )
        spec.allow_absolute_paths = allow
        stream = SourceStream(0, spec, 0, 1, 0)
        got = [stream.next()[2].images[0].width for _ in range(len(widths))]
        assert got == widths


def test_the_switch_is_validated() -> None:
    src = "data.sources=[{format: text, path: t.jsonl, allow_absolute_paths: true}]"
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.allow_absolute_paths"):
        load_config(None, [src])
    ok = "data.sources=[{format: llava, path: l.json, allow_absolute_paths: true}]"
    assert load_config(None, [ok]).data.sources[0].allow_absolute_paths is True
