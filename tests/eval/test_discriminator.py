"""The pixel discriminator (orderplan.eval.discriminator): it learns, it resumes exactly, and its
init neither depends on nor shifts the global random streams."""

import pytest
import torch

from orderplan.eval.discriminator import DiscriminatorSpec, PixelDiscriminator, codec_signature

SPEC = DiscriminatorSpec(channels=[4, 8], batch_size=16, lr=3e-3, seed=5)


def _sets(n=64, side=32):
    g = torch.Generator().manual_seed(0)
    real = -torch.ones(n, 1, side, side)
    real[:, :, 8:24, 12:20] = 1.0  # a bar: "digits"
    fake = torch.rand(n, 1, side, side, generator=g) * 2 - 1  # noise
    return real, fake


def test_discriminator_learns_to_call_real_images_real():
    real, fake = _sets()
    d = PixelDiscriminator(SPEC)
    first = d.update(real, fake, 1)
    last = d.update(real, fake, 60)
    assert last < first
    assert bool((d.log_odds(real) > 0).all()) and bool((d.log_odds(fake) < 0).all())


def test_discriminator_resumes_exactly_from_its_state():
    real, fake = _sets()
    straight = PixelDiscriminator(SPEC)
    straight.update(real, fake, 6)
    cut = PixelDiscriminator(SPEC)
    cut.update(real, fake, 3)
    resumed = PixelDiscriminator(SPEC)
    resumed.load_state_dict(cut.state_dict())
    resumed.update(real, fake, 3)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_discriminator_init_depends_on_its_seed_only():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = PixelDiscriminator(SPEC)
    assert torch.equal(torch.get_rng_state(), before)  # drew from its own stream
    torch.manual_seed(7)
    b = PixelDiscriminator(SPEC)
    c = PixelDiscriminator(DiscriminatorSpec(channels=[4, 8], batch_size=16, lr=3e-3, seed=6))
    wa, wb, wc = (x.model.state_dict() for x in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_discriminator_refuses_mismatched_images():
    real, fake = _sets()
    with pytest.raises(ValueError, match="one shape"):
        PixelDiscriminator(SPEC).update(real, fake[:, :, :8], 1)


def test_codec_signature_is_chance_for_identical_images_and_high_for_a_visible_mark():
    real, _ = _sets(n=40)
    real = real + 0.05 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    same = codec_signature(real, real.clone(), DiscriminatorSpec(channels=[4, 8], steps=30, batch_size=16, seed=5))
    assert same["heldout_accuracy"] == 0.5  # one function of identical inputs: one side of 0 for both
    marked = real.clone()
    marked[:, :, :4, :4] = 1.0  # a codec that stamps a corner
    sig = codec_signature(real, marked, DiscriminatorSpec(channels=[4, 8], steps=60, batch_size=16, lr=3e-3, seed=5))
    assert sig["heldout_accuracy"] == 1.0 and sig["log_odds_real"] > 0 > sig["log_odds_reconstruction"]
    assert sig["num_heldout"] == 20
    with pytest.raises(ValueError, match="paired"):
        codec_signature(real, marked[:10], SPEC)
