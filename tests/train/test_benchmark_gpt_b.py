"""orderplan.train.bench_gpt_b (the GPT-B section of bench_env.py), run on a tiny random stack: the
counted per-row state matches the KV cache's shape arithmetic, and the timed pieces run the real
planner and PPO (finite weights, every frame counted). No timing is asserted."""

import math


from orderplan.train.bench_gpt_b import head_over_step, ppo_frames_per_s, state_bytes_per_row
from orderplan.env.benchmark import random_stack


def _stack():
    return random_stack("tiny", 2, "cpu", n_images=8, n_layer=2)


def test_state_bytes_count_the_kv_cache_exactly():
    stack = _stack()
    core = stack.core(3)
    core.reset()
    cfg = stack.bb.gpt.cfg
    kv_heads = cfg.n_kv_head or cfg.n_head
    capacity = core.state.k[0].shape[2]
    want_kv = 2 * cfg.n_layer * kv_heads * capacity * cfg.head_dim * 4  # float32
    mem = state_bytes_per_row(core)
    assert mem["kv_cache"] == want_kv
    # the core's hidden states alone are L x D floats per row
    assert mem["other"] >= core.L * core.D * 4
    assert mem["total"] == mem["kv_cache"] + mem["other"]


def test_head_and_ppo_timings_run_the_real_pieces():
    stack = _stack()
    ht = head_over_step(stack, 2, repeats=1)
    assert ht.head_s > 0 and ht.step_s > 0 and ht.params > 0
    fps, wall = ppo_frames_per_s(stack, 2, iterations=1)
    assert math.isfinite(fps) and fps > 0 and wall > 0
