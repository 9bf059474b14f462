"""src/orderplan/infra/cpu_heap.py: glibc keeps freed memory in the heap; allocation only, so results are unchanged."""

import pytest
import torch

from orderplan.infra.cpu_heap import keep_freed_heap_memory
from orderplan.model.sampling import SamplingConfig, generate
from tests.conftest import randomized_gpt


def test_bad_limits_are_refused():
    for bad in (0, -1, 1.5, "1G"):
        with pytest.raises(ValueError, match="limit"):
            keep_freed_heap_memory(bad)


def test_kept_heap_leaves_generation_bit_identical():
    gpt = randomized_gpt()
    cond = torch.tensor([1, 2, 3])
    order = torch.stack([torch.randperm(gpt.cfg.num_tokens, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    sc = SamplingConfig(cfg_scale=2.0)
    before = generate(gpt, cond, order, sc, torch.Generator().manual_seed(0))
    took = keep_freed_heap_memory()
    assert isinstance(took, bool)
    big = torch.ones(64, 1 << 20)  # 256 MiB: allocated and freed from the heap once the limit is raised
    del big
    after = generate(gpt, cond, order, sc, torch.Generator().manual_seed(0))
    assert torch.equal(before, after)
