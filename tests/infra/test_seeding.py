"""Named random streams (src/orderplan/infra/seeding.py): a stream depends on (seed, name) only, distinct names
and seeds give distinct streams, and an isolated consumer neither sees nor shifts the global state."""

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from orderplan.infra.seeding import derive_seed, generator, isolated_rng, seed_global


def test_derived_seeds_depend_on_seed_and_names_only():
    s = derive_seed(0, "bc", "orderhead_init")
    assert s == derive_seed(0, "bc", "orderhead_init") and 0 <= s < 2**63
    others = {derive_seed(1, "bc", "orderhead_init"), derive_seed(0, "bc", "train"), derive_seed(0, "bc"),
              derive_seed(0, "orderhead_init", "bc"), derive_seed(0, "bcorderhead_init")}
    assert s not in others and len(others) == 5
    # the same in a fresh process (no per-process hash salt): the value a checkpoint's run relied on
    code = "from orderplan.infra.seeding import derive_seed; print(derive_seed(0, 'bc', 'orderhead_init'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}).stdout
    assert int(out) == s
    assert torch.equal(torch.rand(4, generator=generator(0, "x")), torch.rand(4, generator=generator(0, "x")))
    assert not torch.equal(torch.rand(4, generator=generator(0, "x")), torch.rand(4, generator=generator(0, "y")))


def test_seed_global_seeds_torch_numpy_and_python():
    seed_global(3, "a")
    first = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)  # whatever came before
    seed_global(3, "a")
    again = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_an_isolated_consumer_does_not_depend_on_or_shift_the_global_streams():
    def init_after(draws: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        torch.manual_seed(0), np.random.seed(0), random.seed(0)
        torch.rand(draws), np.random.rand(draws), [random.random() for _ in range(draws)]  # e.g. a data build
        before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
        with isolated_rng(0, "head_init"):
            w = torch.nn.Linear(4, 4).weight.detach().clone()
            np.random.rand(), random.random()
        after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
        assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
        return w

    assert torch.equal(init_after(0), init_after(17))
