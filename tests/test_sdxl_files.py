"""Files the SDXL side writes survive concurrent writers and kills, and live in one cache folder.

* two processes writing one reference shard / manifest / noise file never share a temporary name, so a
  writer killed mid-write cannot get its half-written file published by the other (the interleaving of
  docs/reliability.md, replayed through the real writers);
* a truncated shard or noise file is treated as not done (a warning) and computed again;
* a PNG whose write is cut never appears under its final name;
* temporary files of dead writers are removed, those of live ones kept; folders are replaced whole;
* odecm's cache folder is ``$ODECM_CACHE_DIR``, else ``$XDG_CACHE_HOME/odecm``, else ``~/.cache/odecm``, and the
  tiny model and the file digests live in it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdxl.eval_shards as es
from odecm.atomic import atomic_folder, remove_stale_temps, temp_path

pytestmark = pytest.mark.usefixtures("single_thread")


class Killed(BaseException):
    """Stands for SIGKILL inside a write (nothing after it in the writer runs)."""


def _b_writes_100_bytes_then_dies(tensors, filename, metadata=None):
    with open(filename, "wb") as fh:
        fh.write(b"\x07" * 100)
    raise Killed


def test_a_writer_killed_mid_write_cannot_corrupt_another_writers_shard(tmp_path, monkeypatch):
    """A renames its shard while B (same command, same cache) is half-way through writing the same shard."""
    import safetensors.torch

    path = es.shard_path(tmp_path, [0, 1])
    a_latents = torch.arange(32, dtype=torch.float32).reshape(2, 4, 2, 2)
    rename, save = os.replace, safetensors.torch.save_file
    renamed: list[str] = []

    def a_renames_while_b_writes(src, dst):
        if not renamed:  # A is about to publish: B starts the same shard now and is killed mid-write
            monkeypatch.setattr(safetensors.torch, "save_file", _b_writes_100_bytes_then_dies)
            with pytest.raises(Killed):
                es.write_latent_shard(path, torch.ones(2, 4, 2, 2), [0, 1])
            monkeypatch.setattr(safetensors.torch, "save_file", save)
        renamed.append(Path(src).name)
        rename(src, dst)

    monkeypatch.setattr(os, "replace", a_renames_while_b_writes)
    es.write_latent_shard(path, a_latents, [0, 1])
    monkeypatch.setattr(os, "replace", rename)
    assert es.done_indices(tmp_path, decode=False) == {0, 1}
    idx, latents = es.read_latents(tmp_path, 2)
    assert idx.tolist() == [0, 1] and torch.equal(latents, a_latents)  # A's complete shard, not B's 100 bytes
    assert renamed[0].endswith(".tmp") and f"-{os.getpid()}-" in renamed[0]


def test_two_writes_of_one_file_use_two_temporary_names(tmp_path, monkeypatch):
    seen = []
    rename = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(Path(src).name), rename(src, dst)))
    for _ in range(2):
        es.write_manifest(tmp_path / "manifest.json", {"kind": "teacher_reference"})
        es.write_latent_shard(es.shard_path(tmp_path, [0]), torch.zeros(1, 4, 2, 2), [0])
    assert len(seen) == len(set(seen)) == 4 and all(n.endswith(".tmp") for n in seen)
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []


def test_a_truncated_shard_is_not_done_and_is_deleted_by_the_cleaning_process(tmp_path):
    es.write_latent_shard(es.shard_path(tmp_path, [0, 1]), torch.zeros(2, 4, 2, 2), [0, 1])
    bad = es.shard_path(tmp_path, [2, 3])
    bad.write_bytes(es.shard_path(tmp_path, [0, 1]).read_bytes()[:100])  # what a cut write under the final name leaves
    with pytest.warns(UserWarning, match="unreadable latent shard"):
        assert es.done_indices(tmp_path, decode=False) == {0, 1}
    assert bad.exists()  # only the cleaning (main) process deletes
    with pytest.warns(UserWarning, match="unreadable latent shard"):
        assert es.missing_indices(tmp_path, 4, decode=False) == [2, 3]
    with pytest.warns(UserWarning, match="unreadable latent shard"):
        es.done_indices(tmp_path, decode=False, drop_incomplete=True)
    assert not bad.exists()


def test_a_truncated_noise_file_is_drawn_again(tmp_path):
    from sdxl.reference import noise_path, shared_noise

    noise, path = shared_noise(tmp_path, 3, 2, (4, 2, 2))
    noise = noise.clone()  # the loaded tensor may map the file, which is cut below
    assert path == noise_path(tmp_path, 3, 2, (4, 2, 2))
    path.write_bytes(path.read_bytes()[:50])
    with pytest.warns(UserWarning, match="unreadable noise file"):
        again, _ = shared_noise(tmp_path, 3, 2, (4, 2, 2))
    assert torch.equal(again, noise) and not list(tmp_path.rglob("*.tmp"))


def test_a_cut_png_write_leaves_no_file_under_the_final_name(tmp_path, monkeypatch):
    from PIL import Image

    from sdxl.features_cache import load_images, save_images

    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    paths = [tmp_path / "images" / f"{i:05d}.png" for i in range(2)]
    save = Image.Image.save

    def cut_second(self, fp, *args, **kwargs):
        if Path(fp).name.startswith("00001.png"):
            Path(fp).write_bytes(b"\x89PNG\r\n")  # the first bytes, then the process dies
            raise Killed
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", cut_second)
    with pytest.raises(Killed):
        save_images(images, paths)
    monkeypatch.setattr(Image.Image, "save", save)
    assert paths[0].is_file() and not paths[1].exists()
    assert torch.equal(load_images(paths[:1]), (images[:1] * 255).round() / 255)
    save_images(images, paths)
    assert [p.name for p in sorted((tmp_path / "images").iterdir())] == ["00000.png", "00001.png"]


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    mine = temp_path(tmp_path / "a.safetensors")
    dead = Path(str(mine).replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    other_host = tmp_path / f"a.safetensors.elsewhere-{dead_pid}-0123abcd.tmp"
    live_parent = Path(str(mine).replace(f"-{os.getpid()}-", f"-{os.getppid()}-"))
    for p in (mine, dead, other_host, live_parent):
        p.write_bytes(b"x")
    (tmp_path / "a.safetensors").write_bytes(b"final")
    assert remove_stale_temps(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (mine, other_host, live_parent, tmp_path / "a.safetensors"))


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "lora"
    with atomic_folder(target) as tmp:
        (tmp / "w.safetensors").write_bytes(b"old")
    with pytest.raises(Killed), atomic_folder(target) as tmp:
        (tmp / "w.safetensors").write_bytes(b"ne")
        raise Killed
    assert (target / "w.safetensors").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["lora"]
    with atomic_folder(target) as tmp:
        (tmp / "w.safetensors").write_bytes(b"new")
    assert (target / "w.safetensors").read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["lora"]


# ------------------------------------------------------------------------------------------- one cache folder
def test_cache_root_reads_odecm_cache_dir_then_xdg_then_home(tmp_path, monkeypatch):
    from odecm.runs import cache_root

    monkeypatch.setenv("ODECM_CACHE_DIR", str(tmp_path / "odecm"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "odecm"
    monkeypatch.delenv("ODECM_CACHE_DIR")
    assert cache_root() == tmp_path / "xdg" / "odecm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "odecm"


def test_every_cache_lives_under_cache_root(tmp_path, monkeypatch):
    from sdxl.features_cache import default_digest_cache
    from toys.scores import default_cache_dir

    monkeypatch.setenv("ODECM_CACHE_DIR", str(tmp_path))
    assert default_digest_cache() == tmp_path / "file_digests.json"
    assert default_cache_dir() == tmp_path / "toy_teachers"
    monkeypatch.setenv("ODECM_CACHE", str(tmp_path / "old_name"))  # the old variable is not read any more
    monkeypatch.setenv("ODECM_DIGEST_CACHE", str(tmp_path / "old_digests.json"))
    assert default_digest_cache() == tmp_path / "file_digests.json"


def test_the_session_cache_holds_the_tiny_model_that_model_tiny_uses(tiny_sdxl_dir, odecm_cache_dir):
    from odecm.runs import cache_root
    from sdxl.eval_config import EvalModelConfig, resolve_model

    assert cache_root() == odecm_cache_dir and not str(odecm_cache_dir).startswith(str(Path.home() / ".cache"))
    assert resolve_model(EvalModelConfig(pretrained="tiny")) == str(tiny_sdxl_dir)
    assert (tiny_sdxl_dir / "model_index.json").is_file()
