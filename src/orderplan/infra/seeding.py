"""Named random streams derived from one run seed.

A run draws randomness for several unrelated purposes (a model's initial weights, dropout masks,
minibatches, the images an env draws, a sampler). When they share the process-wide RNGs, each one
depends on how much the others drew before it: a head initialised after an in-process data build
starts from other weights than one initialised after loading the same data from disk. Here every
purpose gets its own seed, a hash of (run seed, name), so a stream depends on its name only:

    derive_seed(seed, "bc", "orderhead_init")     -> an int in [0, 2**63)
    generator(seed, "oracle", "images")           -> a torch.Generator seeded with it
    seed_global(seed, "bc", "train")              -> torch (CPU and CUDA), numpy and `random` seeded
    with isolated_rng(seed, "ppo", "router_init"): ...   # the global streams seeded inside, restored after

The hash is sha256 over the names and numpy's SeedSequence over the seed, so it is stable across
processes, Python versions and platforms (Python's own `hash` of a str is salted per process)."""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["derive_seed", "generator", "seed_global", "isolated_rng"]


def _name_word(name: str | int) -> int:
    """A 64-bit word of one name (ints are named by their decimal text, so 3 and "3" agree)."""
    return int.from_bytes(hashlib.sha256(str(name).encode("utf-8")).digest()[:8], "little")


def derive_seed(seed: int, *names: str | int) -> int:
    """The seed of the stream `names` of run `seed`: an int in [0, 2**63). Distinct names give
    independent streams; the same (seed, names) always gives the same seed."""
    entropy = [int(seed) % 2**64, *(_name_word(n) for n in names)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def generator(seed: int, *names: str | int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with derive_seed(seed, *names)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *names))


def seed_global(seed: int, *names: str | int) -> int:
    """Seed the process-wide streams (torch CPU and every CUDA device, numpy's legacy global RNG,
    Python's `random`) from derive_seed(seed, *names); returns that seed. Call it right before the
    consumer (a training loop's dropout and sampling), so nothing drawn earlier in the process
    shifts what the consumer sees."""
    s = derive_seed(seed, *names)
    torch.manual_seed(s)  # also seeds CUDA devices (lazily when CUDA is not initialised yet)
    np.random.seed(s % 2**32)  # the legacy global RNG takes 32-bit seeds
    random.seed(s)
    return s


@contextlib.contextmanager
def isolated_rng(seed: int, *names: str | int) -> Iterator[int]:
    """Run the body with the global streams seeded from derive_seed(seed, *names) and put them back
    afterwards: a one-off consumer such as a module's random init then neither depends on nor shifts
    what the rest of the run draws. CUDA is seeded (and forked) only when it is initialised already:
    a lazily queued CUDA seed would outlive the block (building a model on the CPU draws nothing
    there). Yields the derived seed."""
    s = derive_seed(seed, *names)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        try:
            torch.default_generator.manual_seed(s)
            for d in devices:
                torch.cuda.default_generators[d].manual_seed(s)
            np.random.seed(s % 2**32)
            random.seed(s)
            yield s
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
