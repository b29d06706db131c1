"""sdxl.data: listing formats and layouts, missing captions, checks at the door, SDXL crop bookkeeping, skipping
unreadable files, deterministic order (bad samples in detail: test_sdxl_data_bad_samples.py)."""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from odecm.cli import InputError
from sdxl.data import (
    ImageCaptionDataset,
    Record,
    ResizeCrop,
    ShardedSampler,
    SkipStats,
    WebImageCaptionDataset,
    collate,
    data_kind,
    list_folder,
    make_synthetic_dataset,
    open_dataset,
    read_index,
    write_shards,
)

RES = 32


def _expected_captions(folder):
    """Captions written by the synthetic writer, read independently of sdxl.data (sidecar files)."""
    return {p.with_suffix(".png").name: p.read_text().strip() for p in sorted(folder.glob("*.txt"))}


@pytest.mark.parametrize("index", ["txt", "jsonl", "csv"])
def test_folder_formats_give_captions_and_shapes(tmp_path, index):
    good = make_synthetic_dataset(tmp_path, 6, size=(40, 56), seed=1, index=index)
    records = list_folder(tmp_path)
    assert [r.path for r in records] == [r.path for r in good]
    assert [r.caption for r in records] == [r.caption for r in good]
    assert all("rectangle on a" in r.caption for r in records)
    ds = ImageCaptionDataset(records, resolution=RES)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (6, 3, RES, RES)
    assert batch["pixel_values"].dtype == torch.float32
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    assert batch["caption"] == [r.caption for r in good]
    assert batch["original_size"].tolist() == [[40, 56]] * 6
    assert batch["target_size"].tolist() == [[RES, RES]] * 6
    assert batch["skipped"] == []


def test_sidecar_captions_match_files(tmp_path):
    make_synthetic_dataset(tmp_path, 4, size=24, seed=2, index="txt")
    expected = _expected_captions(tmp_path)
    records = list_folder(tmp_path)
    assert {r.path.rsplit("/", 1)[-1]: r.caption for r in records} == expected


def test_index_accepts_alternative_names_and_rejects_missing(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "x.jsonl").write_text(json.dumps(dict(image_path="a.png", prompt="hello")) + "\n")
    assert read_index(tmp_path / "x.jsonl") == [Record(str(tmp_path / "a.png"), "hello")]
    (tmp_path / "upper.jsonl").write_text(json.dumps(dict(URL="u", IMAGE="a.png", TEXT="laion style")) + "\n")
    assert read_index(tmp_path / "upper.jsonl") == [Record(str(tmp_path / "a.png"), "laion style")]
    (tmp_path / "bad.jsonl").write_text(json.dumps(dict(image="a.png", label="x")) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1 .*row keys \['image', 'label'\].*allow_empty_captions"):
        read_index(tmp_path / "bad.jsonl")
    assert read_index(tmp_path / "bad.jsonl", allow_empty_captions=True) == [Record(str(tmp_path / "a.png"), "")]


def test_center_crop_of_known_size():
    # 100 x 60 (h x w), R = 32: shorter side w -> 32, h -> int(32 * 100 / 60) = 53; top = round(21 / 2) = 10 (banker's
    # rounding of 10.5 gives 10), left = 0
    image = Image.fromarray(np.arange(100 * 60 * 3, dtype=np.uint8).reshape(100, 60, 3))
    pixels, original, crop = ResizeCrop(32, "center")(image, np.random.default_rng(0))
    assert original == (100, 60) and crop == (10, 0) and pixels.shape == (3, 32, 32)
    # a wide 50 x 90 image: h -> 32, w -> int(32 * 90 / 50) = 57, left = round(25 / 2) = 12
    _, original, crop = ResizeCrop(32, "center")(Image.new("RGB", (90, 50)), np.random.default_rng(0))
    assert original == (50, 90) and crop == (0, 12)


def test_crop_pixels_are_the_cropped_region():
    rng = np.random.default_rng(3)
    array = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)  # shorter side already 48 = R: no resize
    pixels, _, (top, left) = ResizeCrop(48, "random")(Image.fromarray(array), np.random.default_rng(5))
    expected = torch.from_numpy(array[top:top + 48, left:left + 48].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(pixels, expected)


def test_random_crop_in_bounds_and_reproducible(tmp_path):
    make_synthetic_dataset(tmp_path, 8, size=(40, 90), seed=0)
    ds = ImageCaptionDataset(list_folder(tmp_path), resolution=RES, crop="random", seed=7)
    max_left = int(RES * 90 / 40) - RES  # resized 32 x 72
    crops = [ds[i]["crop_top_left"] for i in range(8)]
    assert all(top == 0 and 0 <= left <= max_left for top, left in crops)
    assert len(set(crops)) > 1  # actually random
    again = ImageCaptionDataset(list_folder(tmp_path), resolution=RES, crop="random", seed=7)
    assert [again[i]["crop_top_left"] for i in range(8)] == crops
    torch.testing.assert_close(again[3]["pixel_values"], ds[3]["pixel_values"])
    other_seed = ImageCaptionDataset(list_folder(tmp_path), resolution=RES, crop="random", seed=8)
    assert [other_seed[i]["crop_top_left"] for i in range(8)] != crops
    ds.set_epoch(1)
    assert [ds[i]["crop_top_left"] for i in range(8)] != crops
    assert [ds[(i, 0)]["crop_top_left"] for i in range(8)] == crops  # (index, epoch) keys


def test_flip_records_flipped_coordinates():
    # no resize (shorter side = R); with flip the crop is taken from the mirrored image and its
    # (top, left) are coordinates in that mirrored image
    array = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    transform = ResizeCrop(32, "random", flip=True)
    flipped = 0
    for seed in range(12):
        pixels, _, (top, left) = transform(Image.fromarray(array), np.random.default_rng(seed))
        plain = torch.from_numpy(array[:, left:left + 32].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
        mirror = array[:, ::-1]
        mirrored = torch.from_numpy(mirror[:, left:left + 32].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
        is_plain, is_mirrored = torch.equal(pixels, plain), torch.equal(pixels, mirrored)
        assert is_plain != is_mirrored
        flipped += is_mirrored
    assert 0 < flipped < 12
    assert ResizeCrop(32).flip is False  # flip off by default


def test_time_ids_layout(tmp_path):
    make_synthetic_dataset(tmp_path, 2, size=(40, 56), seed=0)
    ds = ImageCaptionDataset(list_folder(tmp_path), resolution=RES)
    from sdxl.teacher import make_time_ids

    batch = collate([ds[0], ds[1]])
    ids = make_time_ids(2, batch["original_size"], batch["crop_top_left"], batch["target_size"])
    left = round((int(RES * 56 / 40) - RES) / 2)
    assert ids.tolist() == [[40, 56, 0, left, RES, RES]] * 2


def test_corrupt_files_skipped_and_counted(tmp_path, caplog):
    good = make_synthetic_dataset(tmp_path, 9, size=24, seed=0, corrupt=3)  # truncated PNG, text, empty
    records = list_folder(tmp_path)
    assert len(records) == 12
    bad = sorted(set(r.path for r in records) - set(r.path for r in good))
    with caplog.at_level(logging.WARNING, logger="sdxl.data"):
        ds = ImageCaptionDataset(records, resolution=16)
        samples = [ds[i] for i in range(len(ds))]
    assert ds.stats.count == 3 and sorted(ds.stats.files) == bad
    assert ds.stats.by_reason["unreadable_image"] == 3 and ds.stats.delivered == 12
    assert sum("unreadable_image" in m for m in caplog.messages) == 3
    assert all(len(m.splitlines()) == 1 and any(b in m for b in bad) for m in caplog.messages)
    assert any("truncated" in m for m in caplog.messages)
    assert all(records[s["index"]].path not in bad for s in samples)
    assert sorted(r.name for s in samples for r in s["skipped"]) == bad
    assert {r.reason for s in samples for r in s["skipped"]} == {"unreadable_image"}
    # a second pass hits the known-bad files again: counted as events, without re-decoding them
    ds[records.index(next(r for r in records if r.path == bad[0]))]
    assert ds.stats.count == 4 and len(ds.stats.files) == 3


def test_skip_counts_aggregate_over_workers(tmp_path):
    make_synthetic_dataset(tmp_path, 9, size=24, seed=0, corrupt=3)
    ds = ImageCaptionDataset(list_folder(tmp_path), resolution=16)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate,
                        sampler=ShardedSampler(len(ds), seed=0))
    stats, n = SkipStats(), 0
    for batch in loader:
        stats.add_batch(batch)
        n += len(batch["caption"])
        assert batch["pixel_values"].shape[1:] == (3, 16, 16)
    assert n == 12 and stats.count == 3 and len(stats.files) == 3
    assert ds.stats.count == 0  # the main process's copy decoded nothing


def test_all_unreadable_raises(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    with pytest.raises(RuntimeError, match="unreadable"):
        ImageCaptionDataset([Record(str(tmp_path / "a.png"), "x")], resolution=16)[0]


def test_webdataset_shards_yield_captions_and_skip_corrupt(tmp_path):
    good = make_synthetic_dataset(tmp_path / "img", 10, size=(30, 20), seed=4, corrupt=2)
    all_records = list_folder(tmp_path / "img")
    shards_txt = write_shards(all_records, tmp_path / "txt", per_shard=4)
    shards_json = write_shards(all_records, tmp_path / "json", per_shard=4, caption_as="json")
    for shards in (shards_txt, shards_json):
        ds = WebImageCaptionDataset(shards, resolution=16, shuffle_shards=False)
        samples = list(ds)
        assert [s["caption"] for s in samples] == [r.caption for r in good]
        assert all(s["pixel_values"].shape == (3, 16, 16) for s in samples)
        assert all(s["original_size"] == (30, 20) for s in samples)
        assert ds.stats.count == 2 and ds.stats.by_reason["unreadable_image"] == 2
        assert sum(len(s["skipped"]) for s in samples) == 2


def test_webdataset_ranks_disjoint_and_epoch_shuffle(tmp_path):
    good = make_synthetic_dataset(tmp_path / "img", 12, size=16, seed=5)
    shards = write_shards(good, tmp_path / "tar", per_shard=2)  # 6 shards
    keys = []
    for rank in range(3):
        ds = WebImageCaptionDataset(shards, resolution=16, seed=1, rank=rank, world_size=3)
        keys.append([s["key"] for s in ds])
    assert sorted(k for ks in keys for k in ks) == [f"{i:08d}" for i in range(12)]
    assert all(len(ks) == 4 for ks in keys)
    ds = WebImageCaptionDataset(shards, resolution=16, seed=1)
    first = [s["key"] for s in ds]
    assert [s["key"] for s in WebImageCaptionDataset(shards, resolution=16, seed=1)] == first
    ds.set_epoch(1)
    second = [s["key"] for s in ds]
    assert sorted(second) == sorted(first) and second != first
    ds.set_epoch(1, start=5)
    assert [s["key"] for s in ds] == second[5:]


def test_sampler_deterministic_resumable_and_sharded():
    sampler = ShardedSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and first != list(range(10))
    assert list(ShardedSampler(10, seed=3)) == first
    assert list(ShardedSampler(10, seed=4)) != first
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(10)) and second != first
    # resume after 7 steps of batch 3 (drop_last: 3 batches per epoch) -> epoch 2, position 3
    resumed = ShardedSampler(10, seed=3)
    resumed.resume(step=7, batch_size=3)
    full = ShardedSampler(10, seed=3)
    full.set_epoch(2)
    assert (resumed.epoch, resumed.start) == (2, 3)
    assert list(resumed) == list(full)[3:] and len(resumed) == 7
    # ranks: disjoint, covering, equal length (11 samples over 4 ranks wrap 1 index)
    parts = [list(ShardedSampler(11, seed=0, rank=r, world_size=4)) for r in range(4)]
    assert all(len(p) == 3 for p in parts)
    flat = [i for p in parts for i in p]
    assert set(flat) == set(range(11)) and len(flat) == 12
    parts = [list(ShardedSampler(11, seed=0, rank=r, world_size=4, drop_last=True)) for r in range(4)]
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == 8
    assert list(ShardedSampler(4, shuffle=False, with_epoch=True)) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(4, rank=2, world_size=2)


def test_synthetic_writer_is_seeded(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", 3, size=20, seed=9)
    b = make_synthetic_dataset(tmp_path / "b", 3, size=20, seed=9)
    assert [r.caption for r in a] == [r.caption for r in b]
    for ra, rb in zip(a, b):
        assert np.array_equal(np.asarray(Image.open(ra.path)), np.asarray(Image.open(rb.path)))
    with pytest.raises(ValueError, match="index"):
        make_synthetic_dataset(tmp_path / "c", 1, index="parquet")


def test_decoding_bytes_equivalent_to_file(tmp_path):
    good = make_synthetic_dataset(tmp_path, 1, size=(20, 30), seed=0)
    data = open(good[0].path, "rb").read()
    a = ResizeCrop(16)(Image.open(io.BytesIO(data)), np.random.default_rng(0))[0]
    b = ImageCaptionDataset(good, resolution=16)[0]["pixel_values"]
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------- layouts
def _image(path, colour=(10, 20, 30), size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return str(path)


def test_huggingface_imagefolder_layout_is_read_recursively(tmp_path):
    root = tmp_path / "laion"
    a = [_image(root / "part-0" / f"{i}.png") for i in range(2)]
    b = [_image(root / "part-1" / "imgs" / f"{i}.jpg") for i in range(2)]
    (root / "part-0" / "metadata.jsonl").write_text(
        "".join(json.dumps(dict(file_name=f"{i}.png", text=f"zero {i}", aesthetic=7.1)) + "\n" for i in range(2)))
    (root / "part-1" / "metadata.csv").write_text(
        "file_name,caption,width\n" + "".join(f"imgs/{i}.jpg,\"one, {i}\",512\n" for i in range(2)))
    side = [_image(root / "loose" / "x.png")]
    (root / "loose" / "x.txt").write_text("a sidecar caption\n")
    _image(root / "part-0" / "not_listed.png")  # governed by part-0's metadata, not named: unused
    records = list_folder(root)
    assert records == [Record(a[0], "zero 0"), Record(a[1], "zero 1"), Record(b[0], "one, 0"), Record(b[1], "one, 1"),
                       Record(side[0], "a sidecar caption")]
    # a metadata file at the root naming files in subfolders, next to the subfolders' own
    (root / "metadata.jsonl").write_text(json.dumps(dict(file_name="loose/x.png", text="from the root")) + "\n")
    records = list_folder(root)
    assert Record(side[0], "from the root") in records and len(records) == 5
    # the synthetic writer's imagefolder layout
    good = make_synthetic_dataset(tmp_path / "synthetic", 5, size=16, seed=2, index="imagefolder")
    assert sorted((tmp_path / "synthetic").glob("*/metadata.jsonl")) != []
    assert list_folder(tmp_path / "synthetic") == good
    assert ImageCaptionDataset.from_folder(tmp_path / "synthetic", resolution=8)[4]["caption"] == good[4].caption


def test_missing_caption_is_an_error_for_the_run(tmp_path):
    make_synthetic_dataset(tmp_path / "side", 3, size=16, seed=0)
    (tmp_path / "side" / "img_00001.txt").unlink()
    with pytest.raises(InputError, match=r"data.path=.*1 of 3 images have no caption .*img_00001.png \(no "
                                         r"img_00001.txt\).*data.allow_empty_captions=true"):
        ImageCaptionDataset.from_folder(tmp_path / "side", resolution=8)
    ds = ImageCaptionDataset.from_folder(tmp_path / "side", resolution=8, allow_empty_captions=True)
    assert [r.caption == "" for r in ds.records] == [False, True, False]
    (tmp_path / "side" / "img_00001.txt").write_text("  \n")
    with pytest.raises(InputError, match=r"img_00001.txt is empty"):
        list_folder(tmp_path / "side")
    make_synthetic_dataset(tmp_path / "idx", 3, size=16, seed=0, index="jsonl")
    lines = (tmp_path / "idx" / "metadata.jsonl").read_text().splitlines()
    lines[1] = json.dumps(dict(file="img_00001.png", caption=""))
    (tmp_path / "idx" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"^data=.*metadata.jsonl:2 \(img_00001.png; empty 'caption'\).*"
                                         r"set allow_empty_captions=true"):
        open_dataset(str(tmp_path / "idx"), key="data", resolution=8)
    # webdataset: raised when the sample is read
    records = [Record(r.path, "" if i == 1 else r.caption) for i, r in enumerate(list_folder(tmp_path / "side",
                                                                                          allow_empty_captions=True))]
    shards = write_shards(records, tmp_path / "tar", per_shard=4)
    with pytest.raises(InputError, match=r"shard-00000.tar:00000001.txt has no caption"):
        list(WebImageCaptionDataset(shards, resolution=8, shuffle_shards=False))
    samples = list(WebImageCaptionDataset(shards, resolution=8, shuffle_shards=False, allow_empty_captions=True))
    assert [s["caption"] for s in samples] == [r.caption for r in records]


# ---------------------------------------------------------------------------------------------- checks at the door
def test_checks_at_the_door_name_the_key_and_value(tmp_path):
    with pytest.raises(InputError, match=r"^data.path='.*nowhere': no such file or folder$"):
        data_kind(str(tmp_path / "nowhere"))
    (tmp_path / "meta.parquet").write_bytes(b"PAR1")
    with pytest.raises(InputError, match=r"^data=.*meta.parquet': unknown file extension '.parquet'; allowed: a fo"):
        open_dataset(str(tmp_path / "meta.parquet"), key="data")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match=r"empty.jsonl': no usable rows$"):
        open_dataset(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{oops\n[1]\n")
    with pytest.raises(InputError, match=r"bad.jsonl': no usable rows \(2 bad rows, first: skipped .*bad.jsonl:1"):
        open_dataset(str(tmp_path / "bad.jsonl"))
    (tmp_path / "gone.jsonl").write_text(json.dumps(dict(file="gone.png", caption="x")) + "\n")
    with pytest.raises(InputError, match=r"none of the first 1 images it names exist .*gone.png"):
        open_dataset(str(tmp_path / "gone.jsonl"))
    with pytest.raises(InputError, match=r"^data.index='.*index.txt': unknown file extension '.txt'"):
        (tmp_path / "index.txt").write_text("x")
        open_dataset(str(tmp_path), index=str(tmp_path / "index.txt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match=r"folder': no images \(.png"):
        open_dataset(str(tmp_path / "folder"))
    (tmp_path / "folder" / "metadata.jsonl").write_text("")
    (tmp_path / "folder" / "metadata.csv").write_text("")
    with pytest.raises(InputError, match=r"holds 2 metadata files"):
        open_dataset(str(tmp_path / "folder"))
    good = make_synthetic_dataset(tmp_path / "img", 2, size=16, seed=0)
    shards = write_shards(good, tmp_path / "tar", per_shard=1)
    assert data_kind(str(tmp_path / "tar")) == "shards" and data_kind(shards[0]) == "shards"
    assert data_kind(str(tmp_path / "img")) == "folder"
    assert isinstance(open_dataset(str(tmp_path / "tar" / "shard-{00000..00001}.tar"), resolution=8),
                      WebImageCaptionDataset)
    with pytest.raises(InputError, match=r"1 of 3 shards do not exist \(first: .*shard-00002.tar\)"):
        open_dataset(str(tmp_path / "tar" / "shard-{00000..00002}.tar"))
