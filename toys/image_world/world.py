"""Assembling the image world: data, feature classifier, autoencoder, the two spaces and their teachers.

A ``Space`` is where the ODE lives: ``pixel`` (the images themselves) or ``latent`` (the autoencoder's
scaled posterior means of the images). Each space holds its training points, its data std
``sigma_data`` (the teacher's input scaling) and its exact teacher (``EmpiricalDenoiser`` of the
training points); ``decode`` maps a sample of the space to pixels clamped to [-1, 1], where every
sample metric is taken (as the paper decodes SDXL latents).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from odecm.denoisers import Denoiser
from odecm.grids import skip
from odecm.schedules import DiscreteSchedule, sdxl_schedule

from .autoencoder import AutoencoderConfig, KLAutoencoder, load_autoencoder
from .classifier import ClassifierConfig, DigitClassifier, load_classifier
from .data import DataConfig, ImageData, load_images
from .exact import EmpiricalDenoiser
from .teachers import GuidanceConfig, LearnedTeacherConfig, guided, learned_teacher

Tensor = torch.Tensor

__all__ = ["Space", "World", "build_world", "build_teacher", "SPACES", "TEACHER_KINDS"]

SPACES = ("pixel", "latent")
TEACHER_KINDS = ("exact", "learned")


@dataclass
class Space:
    name: str
    train: Tensor  # (N, C, H, W) float32, in this space
    labels: Tensor
    sigma_data: float
    exact: EmpiricalDenoiser
    key: dict[str, Any]
    autoencoder: KLAutoencoder | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Pixels in [-1, 1] (float32) of samples of this space."""
        x = z.float() if self.autoencoder is None else self.autoencoder.decode_all(z.float())
        return x.clamp(-1.0, 1.0)


@dataclass
class World:
    data: ImageData
    schedule: DiscreteSchedule
    grid: Tensor
    classifier: DigitClassifier
    spaces: dict[str, Space]
    test_features: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def features(self, pixels: Tensor) -> Tensor:
        return self.classifier.features_all(pixels.float())

    @torch.no_grad()
    def predict(self, pixels: Tensor) -> Tensor:
        return self.classifier.predict_all(pixels.float())


def build_world(data_cfg: DataConfig, spaces: list[str], grid_size: int, classifier_cfg: ClassifierConfig,
                autoencoder_cfg: AutoencoderConfig, conditional: bool = False, cache_dir=None, use_cache: bool = True,
                progress: bool = False, device: str = "cpu") -> World:
    """Data, classifier (cached, >= min_accuracy held out), autoencoder (cached, when ``latent`` is
    used), SDXL's schedule in the paper's indexing (``timestep_offset=1``: t_0 = 0 is clean data) and
    the LCM skip grid with ``grid_size`` intervals. The classifier and autoencoder train and run on
    ``device``; their outputs come back to the CPU, where the data and the metrics live."""
    data = load_images(data_cfg)
    key = {"data": data.fingerprint}
    info: dict[str, Any] = {"data": {"train": data.train.shape[0], "test": data.test.shape[0], "shape": list(data.shape),
                                     "num_classes": data.num_classes, "fingerprint": data.fingerprint}}
    clf, info["classifier"] = load_classifier(classifier_cfg, data.train, data.train_labels, data.test, data.test_labels,
                                              data.num_classes, key, cache_dir, use_cache, progress, device)
    schedule = sdxl_schedule(timestep_offset=1)
    grid = skip(schedule, grid_size)
    labels = data.train_labels
    num_classes = data.num_classes if conditional else 0
    out: dict[str, Space] = {}
    for name in spaces:
        if name == "pixel":
            x = data.train
            out[name] = Space(name, x, labels, float(x.std()), EmpiricalDenoiser(x, schedule, labels, num_classes),
                              {**key, "space": "pixel"})
        elif name == "latent":
            ae, ae_info = load_autoencoder(autoencoder_cfg, data.train, key, cache_dir, use_cache, progress, device)
            z = ae.encode_all(data.train)
            rec = ae.decode_all(ae.encode_all(data.test)).clamp(-1, 1)
            ae_info["test_recon_mse"] = float(((rec - data.test) ** 2).mean())
            info["autoencoder"] = ae_info
            out[name] = Space(name, z, labels, float(z.std()), EmpiricalDenoiser(z, schedule, labels, num_classes),
                              {**key, "space": "latent", "autoencoder": ae_info["key"]}, autoencoder=ae)
        else:
            raise ValueError(f"space={name!r}; allowed: {list(SPACES)}")
    return World(data, schedule, grid, clf, out, clf.features_all(data.test), info)


def build_teacher(world: World, space: Space, kind: str, teacher_cfg: LearnedTeacherConfig,
                  guidance: GuidanceConfig | None, cache_dir=None, use_cache: bool = True, device: str = "cpu",
                  progress: bool = False) -> tuple[Denoiser, Denoiser, dict[str, Any]]:
    """``(teacher, raw, info)``: the (guided) teacher the students distil, its unguided network or exact
    denoiser, and the cache info. ``learned`` trains / loads the DSM UNet on the space's training points."""
    num_classes = world.data.num_classes if guidance is not None else 0
    if kind == "exact":
        raw: Denoiser = space.exact
        info: dict[str, Any] = {"kind": "exact"}
    elif kind == "learned":
        raw, info = learned_teacher(teacher_cfg, space.train.to(device), space.labels.to(device), world.schedule,
                                    space.sigma_data, num_classes, space.key, cache_dir, use_cache, device, progress)
        info = {"kind": "learned", **info}
    else:
        raise ValueError(f"teacher={kind!r}; allowed: {list(TEACHER_KINDS)}")
    return guided(raw, guidance, num_classes), raw, info
