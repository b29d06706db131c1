"""sdxl.data bad samples: deep and transparent images decode to the right pixels; truncated shards, bad
captions and malformed index lines are skipped, named and counted by reason (also across workers and
processes); the skip-share limit stops a run with the counts."""
from __future__ import annotations

import io
import json
import logging
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from odecm.cli import InputError
from sdxl.data import (
    REASONS,
    ImageCaptionDataset,
    Record,
    ResizeCrop,
    ShardedSampler,
    SkipStats,
    TooManySkipsError,
    UnsupportedImageError,
    WebImageCaptionDataset,
    batch_skip_vector,
    collate,
    make_synthetic_dataset,
    to_rgb8,
    write_shards,
)


def png_bytes(array: np.ndarray, bit_depth: int, colour_type: int) -> bytes:
    """A PNG written by hand (IHDR, one IDAT with filter 0 rows, IEND), independent of PIL's encoder.
    colour_type: 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA."""
    height, width = array.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + np.ascontiguousarray(array[i]).astype(dtype).tobytes() for i in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def pixels_of(path_or_bytes, size: int, background=(255, 255, 255)) -> np.ndarray:
    """8-bit (H, W, 3) values the dataset delivers (no resize: the image is size x size)."""
    if isinstance(path_or_bytes, bytes):
        image = Image.open(io.BytesIO(path_or_bytes))
    else:
        image = Image.open(path_or_bytes)
    pixels, original, crop = ResizeCrop(size, "center", background=background)(image, np.random.default_rng(0))
    assert original == (size, size) and crop == (0, 0)
    return ((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5)


# ---------------------------------------------------------------------------------------------- decoding
def test_16bit_grayscale_png_is_scaled_by_its_bit_depth(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (16, 16)).astype(np.uint16)
    values[0, :4] = [0, 257, 32768, 65535]
    (tmp_path / "deep.png").write_bytes(png_bytes(values, 16, 0))
    (tmp_path / "deep.txt").write_text("a deep gray image")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    expected = np.rint(values * 255.0 / 65535.0)
    ds = ImageCaptionDataset.from_folder(tmp_path, resolution=16)
    got = (ds[0]["pixel_values"].numpy() + 1.0) * 127.5  # (3, H, W)
    for channel in got:
        np.testing.assert_allclose(channel, expected, atol=1e-3)
    assert np.rint(got[:, 0, :4].T).tolist() == [[0, 0, 0], [1, 1, 1], [128, 128, 128], [255, 255, 255]]
    assert 0.3 < got.mean() / 255 < 0.7  # not the all-white image PIL's convert("RGB") gives


def test_16bit_byte_orders_and_unknown_depths():
    values = np.array([[0, 1000, 40000, 65535]], dtype=np.uint16)
    expected = np.rint(values * 255.0 / 65535.0)
    big = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    little = Image.frombytes("I;16", (4, 1), values.astype("<u2").tobytes())
    for image in (big, little):
        np.testing.assert_array_equal(np.asarray(to_rgb8(image))[..., 0], expected)
    as_int = Image.fromarray(values.astype(np.int32))  # mode I without a format: depth unknown
    with pytest.raises(UnsupportedImageError, match="bit depth"):
        to_rgb8(as_int)
    as_int.format = "PNG"  # PIL < 10 opened 16-bit gray PNGs as mode I
    np.testing.assert_array_equal(np.asarray(to_rgb8(as_int))[..., 0], expected)
    with pytest.raises(UnsupportedImageError, match="float"):
        to_rgb8(Image.fromarray(np.zeros((2, 2), np.float32)))


def test_48bit_rgb_png_keeps_its_colours():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 65536, (8, 8, 3)).astype(np.uint16)
    got = pixels_of(png_bytes(values, 16, 2), 8)
    assert np.abs(got - values * 255.0 / 65535.0).max() <= 1.0  # PIL keeps the high byte: v >> 8


def _expected_over(rgb, alpha, background):
    a = np.asarray(alpha, np.float64)[..., None] / 255.0
    return a * np.asarray(rgb, np.float64) + (1 - a) * np.asarray(background, np.float64)


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0), (10, 200, 30)])
def test_transparency_is_composited_on_the_background(background):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 0)      # transparent pixels that hide red
    rgba[:4, 4:] = (0, 0, 255, 255)   # opaque blue
    rgba[4:, 4:] = (0, 0, 255, 128)   # half-transparent blue
    expected = _expected_over(rgba[..., :3], rgba[..., 3], background)
    got = pixels_of(png_bytes(rgba, 8, 6), 8, background)
    assert np.abs(got - expected).max() <= 1.0
    assert np.abs(got[0, 0] - background).max() <= 1.0  # not red

    # 64-bit RGBA (16 bits a channel) and gray + alpha
    got16 = pixels_of(png_bytes(rgba.astype(np.uint16) * 257, 16, 6), 8, background)
    assert np.abs(got16 - expected).max() <= 1.0
    la = np.zeros((8, 8, 2), np.uint8)
    la[:, :4] = (0, 0)       # transparent black
    la[:, 4:] = (60, 200)
    got_la = pixels_of(png_bytes(la, 8, 4), 8, background)
    assert np.abs(got_la - _expected_over(np.repeat(la[..., :1], 3, -1), la[..., 1], background)).max() <= 1.0


def test_palette_and_colour_key_transparency(tmp_path):
    # palette image: index 0 = red, marked transparent; index 1 = green
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (4, 0, 8, 8))
    palette.save(tmp_path / "p.png", transparency=0)
    got = pixels_of(tmp_path / "p.png", 8)
    assert got[:, :4].tolist() == [[[255.0] * 3] * 4] * 8 and got[:, 4:].tolist() == [[[0.0, 255.0, 0.0]] * 4] * 8
    # RGB with a tRNS colour key: pure red is transparent
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :4] = (255, 0, 0)
    rgb[:, 4:] = (0, 0, 255)
    Image.fromarray(rgb).save(tmp_path / "key.png", transparency=(255, 0, 0))
    got = pixels_of(tmp_path / "key.png", 8, background=(0, 0, 0))
    assert got[:, :4].max() == 0 and got[:, 4:].tolist() == [[[0.0, 0.0, 255.0]] * 4] * 8


def test_exif_orientation_gives_the_upright_size(tmp_path):
    image = Image.new("RGB", (24, 8), (200, 10, 10))  # 8 high, 24 wide as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "a.png", exif=exif.tobytes())
    (tmp_path / "a.txt").write_text("rotated")
    sample = ImageCaptionDataset.from_folder(tmp_path, resolution=8)[0]
    assert sample["original_size"] == (24, 8)


# ---------------------------------------------------------------------------------------------- shards
def _shard_members(path):
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data + m.size) for m in tar.getmembers()]


def test_truncated_shard_never_drops_a_sample_silently(tmp_path):
    good = make_synthetic_dataset(tmp_path / "img", 6, size=16, seed=0)
    shards = write_shards(good, tmp_path / "tar", per_shard=3)
    captions = {f"{i:08d}": r.caption for i, r in enumerate(good)}
    data = Path(shards[0]).read_bytes()
    end_blocks = -(-_shard_members(shards[0])[-1][2] // 512) * 512  # the last member's data, padded
    cut_file = tmp_path / "cut.tar"
    cuts = sorted({c for k in range(1, len(data) // 512 + 1) for c in (512 * k, 512 * k + 200) if c < len(data)})
    flagged = 0
    for cut in cuts:
        cut_file.write_bytes(data[:cut])
        ds = WebImageCaptionDataset([str(cut_file), shards[1]], resolution=16, shuffle_shards=False)
        samples = list(ds)
        keys = [s["key"] for s in samples]
        assert all(s["caption"] == captions[s["key"]] for s in samples)  # never a sample missing its caption
        from_cut = [k for k in keys if k < "00000003"]
        assert from_cut == sorted(captions)[:len(from_cut)] and keys[len(from_cut):] == sorted(captions)[3:]
        truncated = ds.stats.by_reason["truncated_shard"]
        skipped_names = [r.name for s in samples for r in s["skipped"]]
        if cut >= end_blocks + 512:  # at least one end-of-archive block is left: nothing was lost
            assert len(from_cut) == 3 and ds.stats.count == 0
        else:  # a lost sample (or a shard without its end blocks) is counted, once, naming the shard
            assert truncated == 1 and ds.stats.count == 1 and len(from_cut) <= 3
            assert len(skipped_names) == 1 and skipped_names[0].startswith(str(cut_file))
            flagged += 1
    assert flagged > 10


def test_unreadable_shard_and_member_problems_are_counted(tmp_path, caplog):
    image = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(image, format="PNG")
    members = [("a.png", image.getvalue()), ("a.txt", b"fine"),
               ("b.png", image.getvalue()), ("b.txt", b"caf\xe9 latin-1"),
               ("c.png", image.getvalue()), ("c.json", b"{not json"),
               ("d.png", image.getvalue()), ("d.json", json.dumps(dict(caption=["a", "list"])).encode()),
               ("e.txt", b"a caption without an image"),
               ("f.png", image.getvalue()), ("f.json", json.dumps(dict(text="from json")).encode())]
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar archive" * 50)
    with caplog.at_level(logging.WARNING, logger="sdxl.data"):
        ds = WebImageCaptionDataset([str(shard), str(tmp_path / "garbage.tar")], resolution=16, shuffle_shards=False)
        samples = list(ds)
    assert [(s["key"], s["caption"]) for s in samples] == [("a", "fine"), ("f", "from json")]
    expected = dict(bad_caption_encoding=1, malformed_caption_json=2, missing_image=1, unreadable_shard=1)
    assert {r: n for r, n in ds.stats.by_reason.items() if n} == expected
    names = sorted(r.name for s in samples for r in s["skipped"])
    assert names == sorted([f"{shard}:b.txt", f"{shard}:c.json", f"{shard}:d.json", f"{shard}:e",
                            str(tmp_path / "garbage.tar")])
    warnings = [m for m in caplog.messages if m.startswith("skipped")]
    assert len(warnings) == 5 and all(len(m.splitlines()) == 1 for m in warnings)


# ---------------------------------------------------------------------------------------------- index files
def _bad_index_folder(folder: Path) -> list[Record]:
    """9 readable images, 2 corrupt, 1 missing file, and 4 bad lines in metadata.jsonl."""
    good = make_synthetic_dataset(folder, 9, size=16, seed=3, corrupt=2, index="jsonl")
    lines = (folder / "metadata.jsonl").read_bytes().splitlines()
    bad = [b'{"file": "img_00001.png", "caption": "caf\xe9 in latin-1"}',  # not UTF-8
           b'{"file": "img_00002.png", "caption": ',                        # not JSON
           b'["img_00003.png", "a list"]',                                  # not an object
           b'{"file": "img_00004.png", "caption": ["two", "captions"]}',    # caption not a string
           b'{"file": "gone.png", "caption": "a missing file"}']
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines[:3] + bad[:2] + lines[3:6] + bad[2:] + lines[6:]) + b"\n")
    return good


def test_bad_lines_are_skipped_with_file_and_line(tmp_path, caplog):
    _bad_index_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sdxl.data"):
        ds = ImageCaptionDataset.from_folder(tmp_path, resolution=16)
    index = tmp_path / "metadata.jsonl"
    by_name = {r.name: r.reason for r in ds.listing_skips}
    assert by_name == {f"{index}:4": "bad_caption_encoding", f"{index}:5": "malformed_index_line",
                       f"{index}:9": "malformed_index_line", f"{index}:10": "malformed_index_line"}
    assert len(ds) == 12 and ds.num_rows == 16  # 9 good + 2 corrupt + 1 missing listed
    assert sum(f"{index}:" in m for m in caplog.messages) == 4
    # CSV: a row with the wrong number of fields, a caption that is not UTF-8
    csv_folder = tmp_path / "csv"
    make_synthetic_dataset(csv_folder, 3, size=16, seed=0, index="csv")
    text = (csv_folder / "metadata.csv").read_bytes().splitlines()
    text[2] = text[2] + b",extra"
    text.append(b"img_00000.png,caf\xe9")
    (csv_folder / "metadata.csv").write_bytes(b"\n".join(text) + b"\n")
    ds = ImageCaptionDataset.from_folder(csv_folder, resolution=16)
    assert len(ds) == 2
    assert sorted((r.name.rsplit("/", 1)[-1], r.reason) for r in ds.listing_skips) == [
        ("metadata.csv:3", "malformed_index_line"), ("metadata.csv:5", "bad_caption_encoding")]


def test_sidecar_caption_that_is_not_utf8_is_skipped(tmp_path):
    make_synthetic_dataset(tmp_path, 3, size=16, seed=0)
    (tmp_path / "img_00001.txt").write_bytes(b"\xff\xfe caf\xe9")
    ds = ImageCaptionDataset.from_folder(tmp_path, resolution=16)
    assert len(ds) == 2
    assert [(r.reason, r.name) for r in ds.listing_skips] == [("bad_caption_encoding", str(tmp_path / "img_00001.txt"))]


# ---------------------------------------------------------------------------------------------- counting
def _counts(stats):
    return {r: n for r, n in stats.by_reason.items() if n}


@pytest.mark.parametrize("workers", [0, 2])
def test_counts_by_reason_across_workers_and_processes(tmp_path, workers):
    _bad_index_folder(tmp_path)
    ds = ImageCaptionDataset.from_folder(tmp_path, resolution=16)
    expected = dict(unreadable_image=2, missing_image=1, bad_caption_encoding=1, malformed_index_line=3)
    stats = SkipStats.for_dataset(ds, max_fraction=0.5)
    loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate,
                        sampler=ShardedSampler(len(ds), seed=0))
    for batch in loader:
        stats.add_batch(batch)
    assert _counts(stats) == expected and stats.delivered == 12
    assert ds.stats.count == (3 if workers == 0 else 0)  # the main process's copy decoded nothing with workers
    # two processes: each counts its own batches; the summed vectors give the same totals
    total = SkipStats.for_dataset(ds)
    vectors = []
    for rank in range(2):
        sampler = ShardedSampler(len(ds), seed=0, rank=rank, world_size=2)
        for batch in DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate, sampler=sampler):
            vectors.append(batch_skip_vector(batch))
    step = total.add_vector(torch.stack(vectors).sum(0))
    assert _counts(total) == expected and total.delivered == 12
    assert step == dict(unreadable_image=2, missing_image=1)
    summary = json.loads(json.dumps(total.summary()))
    assert summary["skipped"] == 7 and summary["skipped_by_reason"]["missing_image"] == 1
    assert set(summary["skipped_by_reason"]) == set(REASONS)
    assert abs(summary["skip_fraction"] - 7 / 19) < 1e-12
    fields = total.step_fields(step)
    assert fields["skipped"] == 3 and fields["skipped_unreadable_image"] == 2 and fields["skipped_total"] == 7


def test_skip_limit_stops_with_counts_by_reason(tmp_path):
    make_synthetic_dataset(tmp_path, 9, size=16, seed=0, corrupt=3)  # 12 rows, 3 unreadable
    ds = ImageCaptionDataset.from_folder(tmp_path, resolution=16)
    loader = DataLoader(ds, batch_size=2, collate_fn=collate, sampler=ShardedSampler(len(ds), shuffle=False))

    def run(max_fraction):
        stats = SkipStats.for_dataset(ds, max_fraction, key="data.max_skip_fraction")
        for number, batch in enumerate(loader):
            stats.add_batch(batch)
            stats.check()
        stats.check(final=True)
        return stats

    with pytest.raises(TooManySkipsError, match=r"data.max_skip_fraction=0.1: 2 of 12 rows skipped.*"
                                                r"unreadable_image 2") as err:
        run(0.1)  # 2 > 0.1 * 12: stops at the second bad file, not at the first
    assert isinstance(err.value, InputError) and len(str(err.value).splitlines()) == 1
    assert run(0.3).count == 3  # 3 of 15 seen = 0.2 <= 0.3

    stream = SkipStats(0.1, total=None, min_seen=100)  # total unknown: wait for min_seen or the end
    stream.add_vector([8] + [2] + [0] * (len(REASONS) - 1))
    stream.check()
    with pytest.raises(TooManySkipsError, match="2 of 10 samples"):
        stream.check(final=True)


def test_mostly_bad_listing_stops_before_loading(tmp_path):
    make_synthetic_dataset(tmp_path, 2, size=16, seed=0, index="jsonl")
    with (tmp_path / "metadata.jsonl").open("a") as fh:
        fh.write("not json\n" * 3)
    ds = ImageCaptionDataset.from_folder(tmp_path, resolution=16)
    with pytest.raises(TooManySkipsError, match=r"3 of 5 rows.*malformed_index_line 3"):
        SkipStats.for_dataset(ds, max_fraction=0.05)
    assert SkipStats.for_dataset(ds, max_fraction=0.9).count == 3
