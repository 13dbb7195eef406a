"""Networks: output shapes and ranges per image shape, arch round trips, argument validation."""

from __future__ import annotations

import json

import pytest
import torch

from invgan_core.models import (
    Classifier,
    Discriminator,
    Generator,
    Inverter,
    _spatial_plan,
    build_model,
    default_arch,
    sample_prior,
)

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
KINDS = ["generator", "discriminator", "inverter", "classifier"]
N = 5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def images(shape, n=N):
    return torch.rand(n, *shape)


@pytest.mark.parametrize("size, plan", [(8, (4, 1)), (28, (7, 2)), (32, (4, 3)), (7, (7, 0)), (64, (4, 4))])
def test_spatial_plan_known_answers(size, plan):
    start, ups = _spatial_plan(size)
    assert (start, ups) == plan
    assert start * 2**ups == size


@pytest.mark.parametrize("shape, latent, width", [((1, 8, 8), 16, 32), ((1, 28, 28), 32, 64), ((3, 32, 32), 64, 64)])
def test_default_arch_sizes(shape, latent, width):
    arch = default_arch("generator", shape)
    assert (arch["latent_dim"], arch["width"], arch["image_shape"]) == (latent, width, list(shape))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_generator_shape_and_range(shape, train):
    G = build_model("generator", default_arch("generator", shape)).train(train)
    z = 10 * torch.randn(N, G.latent_dim)  # large latents push the pre-sigmoid far from 0
    x = G(z)
    assert x.shape == (N, *shape) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert x.std() > 0  # not a constant image


@pytest.mark.parametrize("shape", SHAPES)
def test_generator_samples_from_its_prior(shape):
    arch = {**default_arch("generator", shape), "prior": "uniform"}
    G = build_model("generator", arch)
    z = G.sample_latent(4000)
    assert z.shape == (4000, arch["latent_dim"])
    assert z.min() >= -1 and z.max() <= 1 and z.min() < -0.99 and z.max() > 0.99


@pytest.mark.parametrize("shape", SHAPES)
def test_discriminator_scores_each_example_independently(shape):
    D = build_model("discriminator", default_arch("discriminator", shape)).train()
    x = images(shape)
    scores = D(x)
    assert scores.shape == (N,)
    # no batch norm (WGAN-GP needs per-example gradients): a score does not depend on the batch
    alone = torch.cat([D(x[i : i + 1]) for i in range(N)])
    torch.testing.assert_close(scores, alone, rtol=1e-5, atol=1e-6)


def _amplify_head(inverter: Inverter, factor: float = 100.0) -> None:
    with torch.no_grad():
        inverter.head.weight.mul_(factor)
        inverter.head.bias.fill_(5.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_inverter_output_shape_and_uniform_box(shape):
    arch = default_arch("inverter", shape)
    d = arch["latent_dim"]
    x = images(shape)
    torch.manual_seed(1)
    uniform = build_model("inverter", {**arch, "prior": "uniform"})
    torch.manual_seed(1)
    normal = build_model("inverter", {**arch, "prior": "normal"})
    _amplify_head(uniform)
    _amplify_head(normal)

    z_u, z_n = uniform(x), normal(x)
    assert z_u.shape == (N, d) and z_n.shape == (N, d)
    assert z_u.min() >= -1 and z_u.max() <= 1
    assert z_n.abs().max() > 1  # same weights, no squashing: the box comes from the uniform prior
    torch.testing.assert_close(z_u, torch.tanh(z_n))


@pytest.mark.parametrize("shape, hidden", [((1, 8, 8), 200), ((1, 28, 28), 200), ((3, 32, 32), 256)])
def test_classifier_logits_and_features(shape, hidden):
    f = build_model("classifier", default_arch("classifier", shape)).eval()
    x = images(shape)
    logits, phi = f(x), f.features(x)
    assert logits.shape == (N, 10)
    assert phi.shape == (N, hidden)
    assert phi.min() >= 0  # Φ ends in a ReLU
    assert torch.equal(f.last(phi), logits)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_build_model_arch_round_trip(kind, shape):
    arch = default_arch(kind, shape)
    model = build_model(kind, arch)
    assert model.arch == arch
    stored = json.loads(json.dumps(model.arch))  # what a manifest holds
    again = build_model(kind, stored)
    assert again.arch == arch
    assert type(again) is type(model)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes


@pytest.mark.parametrize("kind", KINDS)
def test_build_model_rejects_unknown_arch_key(kind):
    arch = {**default_arch(kind, (1, 8, 8)), "depth_multiplier": 3}
    with pytest.raises(ValueError, match="depth_multiplier"):
        build_model(kind, arch)


def test_build_model_rejects_unknown_kind():
    with pytest.raises(ValueError, match="autoencoder"):
        build_model("autoencoder", {})
    with pytest.raises(ValueError, match="autoencoder"):
        default_arch("autoencoder", (1, 8, 8))


@pytest.mark.parametrize("kind", ["generator", "inverter"])
def test_unknown_prior_raises(kind):
    arch = {**default_arch(kind, (1, 8, 8)), "prior": "laplace"}
    with pytest.raises(ValueError, match="laplace"):
        build_model(kind, arch)


def test_sample_prior_rejects_unknown_prior():
    with pytest.raises(ValueError, match="laplace"):
        sample_prior("laplace", 3, 2)


def test_non_square_images_rejected():
    with pytest.raises(ValueError, match="square"):
        Generator(image_shape=(1, 28, 32))


@pytest.mark.parametrize("cls", [Generator, Discriminator, Inverter, Classifier])
def test_constructor_defaults_are_mnist_sized(cls):
    assert cls().image_shape == (1, 28, 28)
