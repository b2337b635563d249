"""DP-FedAvg math: clipping bounds every update; the server noise has std z*C/m."""

from __future__ import annotations

import pytest
import torch

from fedft.privacy.dpfedavg import adapter_delta, clip_update, noisy_mean, secure_generator, update_norm


def _update(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(8, 16, generator=g) * scale, "b": torch.randn(32, 8, generator=g) * scale}


@pytest.mark.parametrize("scale", [1e-3, 0.1, 10.0])
def test_clipping_bounds_every_update_norm(scale):
    for seed in range(5):
        clipped, was_clipped = clip_update(_update(seed, scale), clip_norm=1.0)
        assert update_norm(clipped) <= 1.0 + 1e-6
        assert was_clipped == (update_norm(_update(seed, scale)) > 1.0)
    small = _update(0, 1e-3)
    assert all(torch.equal(small[k], clip_update(small, 1.0)[0][k]) for k in small)  # untouched


def test_server_noise_std_is_z_c_over_m():
    z, clip, m = 1.3, 0.5, 4
    zeros = [{"w": torch.zeros(200_000)} for _ in range(m)]
    with pytest.warns(UserWarning, match="FIXED seed"):
        generator = secure_generator(seed=7)
    noise = noisy_mean(zeros, m, clip, z, generator)["w"].double()
    expected = z * clip / m
    # std of the sample std of n normals is about sigma / sqrt(2n): 0.16% here; allow 1%
    assert noise.std().item() == pytest.approx(expected, rel=0.01)
    assert abs(noise.mean().item()) < 5 * expected / (200_000 ** 0.5)


def test_mean_divides_by_the_number_sampled_not_the_number_that_replied():
    ones = [{"w": torch.ones(3)} for _ in range(2)]
    out = noisy_mean(ones, num_sampled=4, clip_norm=1.0, noise_multiplier=0.0, generator=torch.Generator())
    torch.testing.assert_close(out["w"], torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="3 updates from 2 sampled"):
        noisy_mean(ones + ones[:1], 2, 1.0, 1.0, torch.Generator())


def test_secure_generators_differ_and_delta_is_new_minus_old():
    a, b = secure_generator(), secure_generator()
    assert not torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))
    old, new = _update(0, 1.0), _update(1, 1.0)
    delta = adapter_delta(new, old)
    torch.testing.assert_close(delta["a"], new["a"] - old["a"])
