"""Networks: DCGAN generator and discriminator, the InvGAN inverter, the RED-appendix classifier.

Every model is built from a small dict of architecture numbers (`arch`), which is what a checkpoint
manifest records, so `build_model(kind, arch)` rebuilds any saved model without code changes.
Images enter and leave in [0, 1] (NCHW); a model that prefers [-1, 1] converts inside itself.
"""

from __future__ import annotations

import math

import torch
from torch import nn

PRIORS = ("normal", "uniform")


def _spatial_plan(size: int) -> tuple[int, int]:
    """(start size, number of x2 upsamplings): halve while even and the half is still >= 4.

    28 -> (7, 2); 32 -> (4, 3); 8 -> (4, 1).
    """
    ups = 0
    while size % 2 == 0 and size // 2 >= 4:
        size //= 2
        ups += 1
    return size, ups


def sample_prior(
    prior: str, n: int, d: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """n latents from the generator's prior: standard normal, or uniform on the box [-1, 1]^d."""
    if prior == "normal":
        return torch.randn(n, d, generator=generator, device=device)
    if prior == "uniform":
        return torch.rand(n, d, generator=generator, device=device) * 2 - 1
    raise ValueError(f"unknown prior {prior!r}; choose one of {PRIORS}")


class Generator(nn.Module):
    """DCGAN generator: z -> fc -> (ch, s, s) -> [convT x2, BN, ReLU]* -> sigmoid image in [0, 1]."""

    def __init__(self, image_shape=(1, 28, 28), latent_dim: int = 32, width: int = 64, prior: str = "normal"):
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}; choose one of {PRIORS}")
        c, h, w = image_shape
        if h != w:
            raise ValueError(f"square images only, got {image_shape}")
        self.image_shape, self.latent_dim, self.prior = tuple(image_shape), latent_dim, prior
        start, ups = _spatial_plan(h)
        chans = [width * 2**i for i in reversed(range(ups))] or [width]  # e.g. [128, 64]
        self.start, self.chans = start, chans
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, chans[0] * start * start), nn.BatchNorm1d(chans[0] * start * start), nn.ReLU(True)
        )
        layers: list[nn.Module] = []
        for i in range(ups - 1):
            layers += [nn.ConvTranspose2d(chans[i], chans[i + 1], 4, 2, 1), nn.BatchNorm2d(chans[i + 1]), nn.ReLU(True)]
        last_in = chans[-1]
        layers += [nn.ConvTranspose2d(last_in, c, 4, 2, 1) if ups else nn.Conv2d(last_in, c, 3, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, self.chans[0], self.start, self.start)
        return torch.sigmoid(self.net(h))

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_prior(self.prior, n, self.latent_dim, generator, device=next(self.parameters()).device)


class _Encoder(nn.Module):
    """The mirror of the generator's upsampling stack: [conv x1/2, LeakyReLU]* -> flat features."""

    def __init__(self, image_shape, width: int):
        super().__init__()
        c, h, _ = image_shape
        start, ups = _spatial_plan(h)
        chans = [width * 2**i for i in range(max(ups, 1))]  # e.g. [64, 128]
        layers: list[nn.Module] = []
        in_ch = c
        for i in range(ups):
            layers += [nn.Conv2d(in_ch, chans[i], 4, 2, 1), nn.LeakyReLU(0.2, True)]
            in_ch = chans[i]
        if not ups:
            layers += [nn.Conv2d(in_ch, chans[0], 3, 1, 1), nn.LeakyReLU(0.2, True)]
            in_ch = chans[0]
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.out_features = in_ch * start * start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


class Discriminator(nn.Module):
    """DCGAN/WGAN critic without batch norm (so the WGAN-GP penalty is per example): image -> score."""

    def __init__(self, image_shape=(1, 28, 28), width: int = 64):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.encoder = _Encoder(image_shape, width)
        self.head = nn.Linear(self.encoder.out_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).squeeze(1)


class Inverter(nn.Module):
    """InvGAN inverter I: image -> latent, the generator's mirror image (conv stack, fc to d).

    With a uniform prior the output is squashed into the box by tanh.
    """

    def __init__(self, image_shape=(1, 28, 28), latent_dim: int = 32, width: int = 64, prior: str = "normal"):
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}; choose one of {PRIORS}")
        self.image_shape, self.latent_dim, self.prior = tuple(image_shape), latent_dim, prior
        self.encoder = _Encoder(image_shape, width)
        self.head = nn.Linear(self.encoder.out_features, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.encoder(x))
        return torch.tanh(z) if self.prior == "uniform" else z


class Classifier(nn.Module):
    """The MNIST classifier of the RED appendix (Table 3); `widths`/`hidden` give the CIFAR variant.

    conv3x3x32, conv3x3x32, maxpool, conv3x3x64, conv3x3x64, maxpool, fc200, fc200, fc10 (ReLU).
    Valid padding for images >= 20 px as in the paper; 'same' padding for small images (8x8 digits).
    """

    def __init__(self, image_shape=(1, 28, 28), num_classes: int = 10, widths=(32, 64), hidden: int = 200):
        super().__init__()
        c, h, _ = image_shape
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        pad = 0 if h >= 20 else 1
        a, b = widths
        self.conv = nn.Sequential(
            nn.Conv2d(c, a, 3, padding=pad),
            nn.ReLU(True),
            nn.Conv2d(a, a, 3, padding=pad),
            nn.ReLU(True),
            nn.MaxPool2d(2),
            nn.Conv2d(a, b, 3, padding=pad),
            nn.ReLU(True),
            nn.Conv2d(b, b, 3, padding=pad),
            nn.ReLU(True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, *image_shape)).shape[1]  # CPU: a module is built there, then moved
        self.phi = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(True), nn.Linear(hidden, hidden), nn.ReLU(True))
        self.last = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Φ(x): every layer but the last (InvGAN eq. 7 uses it for attack detection)."""
        return self.phi(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.features(x))


MODELS = {"generator": Generator, "discriminator": Discriminator, "inverter": Inverter, "classifier": Classifier}

# The architecture numbers each kind takes; anything else in an `arch` dict is an error.
ARCH_KEYS = {
    "generator": ("image_shape", "latent_dim", "width", "prior"),
    "discriminator": ("image_shape", "width"),
    "inverter": ("image_shape", "latent_dim", "width", "prior"),
    "classifier": ("image_shape", "num_classes", "widths", "hidden"),
}


def build_model(kind: str, arch: dict) -> nn.Module:
    """Construct a model of `kind` from its architecture dict (as stored in a manifest)."""
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(MODELS)}")
    unknown = set(arch) - set(ARCH_KEYS[kind])
    if unknown:
        raise ValueError(f"{kind}: unknown architecture keys {sorted(unknown)}; allowed {ARCH_KEYS[kind]}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}
    model = MODELS[kind](**kwargs)
    model.arch = {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}  # what a manifest records
    return model


def default_arch(kind: str, image_shape: tuple[int, int, int], num_classes: int = 10) -> dict:
    """Architecture defaults sized from the image shape (latent 16 for 8x8, 32 for 28x28, 64 for 32x32)."""
    c, h, _ = image_shape
    latent = {8: 16, 28: 32}.get(h, 64)
    width = 32 if h <= 8 else 64
    if kind in ("generator", "inverter"):
        return {"image_shape": list(image_shape), "latent_dim": latent, "width": width, "prior": "normal"}
    if kind == "discriminator":
        return {"image_shape": list(image_shape), "width": width}
    if kind == "classifier":
        big = c == 3
        return {
            "image_shape": list(image_shape),
            "num_classes": num_classes,
            "widths": [64, 128] if big else [32, 64],
            "hidden": 256 if big else 200,
        }
    raise ValueError(f"unknown model kind {kind!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def image_dim(image_shape) -> int:
    return int(math.prod(image_shape))
