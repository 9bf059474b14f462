"""No host-device synchronisation in the hot loops: a KV decode step and an oracle call read
nothing back from the device, `generate` reads it once per image (the check of `order`) and an env
step once (the check of the action, which also brings back the step's window sizes).

`HostReads` counts, by construction, every operation that makes the host wait for a tensor's values
(`bool()`, `int()`, `.item()`, `.tolist()`, a shape that depends on values such as `nonzero()` or
boolean-mask indexing, ...): on a GPU each is a synchronisation, on the CPU the same code asks for
the same reads. Where CUDA exists the tests also run there, and count the synchronisations CUDA
itself reports (`torch.cuda.set_sync_debug_mode`). Every "reads nothing" assertion comes with the
same calls on the checked path, which do read, and give the same numbers."""

from __future__ import annotations

import traceback
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

from orderplan.planner.policies import FixedOrderPolicy
from orderplan.model.blocks import BlockGeometry
from orderplan.config.common import BackboneConfig
from orderplan.oracle.future_loss import HostSizes, oracle_utilities
from orderplan.model.loading import Backbone
from orderplan.model.sampling import SamplingConfig, filter_logits, generate, sample_logits
from orderplan.env.actions import random_valid_action
from orderplan.env.core import EnvConfig, OrderPlanningCore
from tests.conftest import randomized_gpt

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GEOM = BlockGeometry(8, 8, 2)

# functions whose result the host can only have after the device has computed their input
_READS = frozenset({"__bool__", "__int__", "__index__", "__float__", "__complex__", "__format__", "item",
                    "tolist", "numpy", "cpu", "equal", "nonzero", "argwhere", "masked_select", "unique",
                    "unique_consecutive"})


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _is_read(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _READS:
        return True
    if name == "where":  # one argument: nonzero() under another name
        return len(args) + len(kwargs) == 1
    if name in ("__getitem__", "__setitem__", "index_put_", "index_put"):
        return len(args) > 1 and _has_bool_index(args[1])  # boolean masks index through nonzero()
    if name == "repeat_interleave":  # tensor repeats: the output size is their sum
        repeats = kwargs.get("repeats", args[1] if len(args) > 1 else args[0])
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return False


def _caller() -> str:
    """file:line of the innermost frame outside torch and this file (where the read was asked for)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{'/'.join(frame.filename.rsplit('/', 2)[-2:])}:{frame.lineno}"
    return "?"


class HostReads(TorchFunctionMode):
    """`with HostReads(device) as r:` records in `r.reads` every host read of device values made
    inside (name and caller), and on CUDA counts in `r.cuda_syncs` the synchronisations CUDA reports."""

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        self.cuda = torch.device(device).type == "cuda"
        self.reads: list[str] = []
        self.cuda_syncs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _is_read(name, args, kwargs):
            self.reads.append(f"{name} at {_caller()}")
        return func(*args, **kwargs)

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self._mode = torch.cuda.get_sync_debug_mode()
            self._catch = warnings.catch_warnings(record=True)
            self._log = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        if self.cuda:
            torch.cuda.set_sync_debug_mode(self._mode)
            self._catch.__exit__(*exc)
            self.cuda_syncs = sum("synchroniz" in str(w.message) for w in self._log)
        return out

    def count(self) -> int:
        """Host reads, or CUDA's own count where that is larger."""
        return max(len(self.reads), self.cuda_syncs)


def core_on(device: str, batch_size: int = 4, **env_fields) -> OrderPlanningCore:
    """`tests.conftest.toy_core` on a device: a random 2-layer tiny GPT over random codes."""
    gpt = randomized_gpt().to(device)
    bb = Backbone(cfg=BackboneConfig(), gpt=gpt, geometry=GEOM, vq=None)
    g = torch.Generator().manual_seed(123)
    codes = torch.randint(0, gpt.cfg.vocab_size, (20, gpt.cfg.num_tokens), generator=g)
    labels = torch.arange(20) % gpt.cfg.num_classes
    return OrderPlanningCore(bb, codes, labels, EnvConfig(**env_fields), batch_size, seed=0)


# ----------------------------------------------------------------------------------------------
# The counter itself
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_the_counter_sees_every_kind_of_read(device):
    t = torch.tensor([2, 0, 1], device=device)
    mask = t > 0
    with HostReads(device) as r:
        assert bool(torch.tensor(True, device=device))
        int(t[0]), float(t[0]), t[0].item(), t.tolist(), t.nonzero(), t[mask], torch.where(mask)
        t.repeat_interleave(t)
        t.sum(), t.max(), (t > 0).any(), t.repeat_interleave(2)  # queued on the device: no read
    assert len(r.reads) == 9, r.reads
    if device == "cuda":
        assert r.cuda_syncs >= 1
    with HostReads(device) as r:
        pass
    assert r.count() == 0


# ----------------------------------------------------------------------------------------------
# KV decode step
# ----------------------------------------------------------------------------------------------


def _decode(gpt, state, x, order, validate: bool) -> list[torch.Tensor]:
    """The env's hot loop on a state: a teacher-forced block, four tokens decoded one at a time
    (advance, then feed), then a query over the rest. Returns every output."""
    blk = order[:, :4]
    out = list(gpt.append(state, x.gather(1, blk), blk, validate=validate))
    for t in range(4, 8):
        out += gpt.advance(state, order[:, t], validate=validate)
        gpt.feed(state, x.gather(1, order[:, t:t + 1])[:, 0], order[:, t], validate=validate)
    return out + list(gpt.query(state, order[:, 8:], validate=validate))


@pytest.mark.parametrize("device", DEVICES)
def test_kv_decode_step_reads_nothing(device):
    gpt = randomized_gpt().to(device)
    B, L = 3, gpt.cfg.num_tokens
    g = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(L, generator=g) for _ in range(B)]).to(device)
    x = torch.randint(gpt.cfg.vocab_size, (B, L), generator=g).to(device)
    cond = torch.arange(B, device=device)
    fast, checked = gpt.init_state(cond), gpt.init_state(cond)
    _decode(gpt, fast, x, order, False), _decode(gpt, checked, x, order, True)  # warm-up
    fast, checked = gpt.init_state(cond), gpt.init_state(cond)
    with HostReads(device) as r:
        got = _decode(gpt, fast, x, order, validate=False)
    assert r.count() == 0, r.reads
    with HostReads(device) as r:
        ref = _decode(gpt, checked, x, order, validate=True)
    assert len(r.reads) > 10  # the checked path does read: the counter is not blind to these calls
    # rows in lockstep: the host bound is the exact cache length, so the windows and the numbers agree
    assert fast.kmax_bound == int(checked.length.max()) == 8
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)


def test_host_bound_window_is_correct_for_rows_at_different_lengths():
    """Past a reset or under `active`, the host bound exceeds the longest cache: the wider window
    is masked, so the outputs agree with the exact window (up to float summation order)."""
    gpt = randomized_gpt()
    B, L = 3, gpt.cfg.num_tokens
    g = torch.Generator().manual_seed(1)
    order = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    x = torch.randint(gpt.cfg.vocab_size, (B, L), generator=g)
    fast, checked = gpt.init_state(torch.arange(B)), gpt.init_state(torch.arange(B))
    only1 = torch.tensor([False, True, False])
    for state, validate in ((fast, False), (checked, True)):
        blk = order[:, :4]
        gpt.append(state, x.gather(1, blk), blk, validate=validate)
        gpt.append(state, x.gather(1, order[:, 4:8]), order[:, 4:8], active=only1, validate=validate)
        state.reset_rows_(only1, torch.tensor([7]))  # the longest row restarts: lengths [4, 0, 4]
    assert fast.kmax_bound == 8 and fast.length.tolist() == [4, 0, 4]
    outs = []
    for state, validate in ((fast, False), (checked, True)):
        out = list(gpt.advance(state, order[:, 8], active=only1, validate=validate))
        gpt.feed(state, x[:, order[1, 8]], order[:, 8], active=only1, validate=validate)
        outs.append(out + list(gpt.query(state, order[:, 9:], validate=validate)))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a[1] if a.dim() < 3 else a, b[1] if b.dim() < 3 else b, atol=1e-5, rtol=0)
    assert fast.kmax_bound >= int(fast.length.max())
    with pytest.raises(ValueError, match="narrower"):
        gpt.query(checked, order[:, 9:], window=1)  # a window the checked path can see is too small


# ----------------------------------------------------------------------------------------------
# Sampling a whole image
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sc", [SamplingConfig(), SamplingConfig(cfg_scale=2.0, top_k=20, top_p=0.9),
                                SamplingConfig(noise="position")], ids=["stream", "cfg", "position"])
def test_generate_reads_the_device_once_per_image(device, sc):
    gpt = randomized_gpt().to(device)
    B, L = 3, gpt.cfg.num_tokens
    order = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(b)) for b in range(B)]).to(device)
    cond, keys = torch.arange(B, device=device), torch.arange(B, device=device)
    generate(gpt, cond, order, sc, torch.Generator(device=device).manual_seed(0), keys=keys)  # warm-up
    with HostReads(device) as r:
        a = generate(gpt, cond, order, sc, torch.Generator(device=device).manual_seed(3), keys=keys)
    assert len(r.reads) == 1 and r.cuda_syncs <= 1, r.reads  # the check of `order`, before the loop
    with HostReads(device) as r:
        b = generate(gpt, cond, order, sc, torch.Generator(device=device).manual_seed(3), keys=keys, validate=False)
    assert r.count() == 0, r.reads
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="order"):
        generate(gpt, cond, order + L, sc)


def test_stream_sampling_draws_what_torch_multinomial_draws():
    """sample_logits replaced torch.multinomial (whose checks read the device every token) by its
    own one-sample algorithm: the same generator state gives the same tokens."""
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 3
    sc = SamplingConfig(top_k=50)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(5):
        ref = torch.multinomial(filter_logits(logits, sc.top_k).softmax(-1), 1, generator=g1)[:, 0]
        assert torch.equal(sample_logits(logits, sc, g2), ref)


# ----------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------


def _midway_core(device: str) -> OrderPlanningCore:
    """A teacher-forced router core a few steps in, its rows at different numbers of blocks."""
    core = core_on(device, batch_size=4, budget=[1, 2, 3])
    core.reset()
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        core.step(random_valid_action(~core.revealed, g, core.cfg.budget))
    return core


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,weight", [("future_loss", "uniform"), ("extrapolative", "distance")])
def test_oracle_call_reads_nothing(device, kind, weight):
    core = _midway_core(device)
    assert len(set(core.steps.tolist())) > 1  # rows at different lengths
    sizes = HostSizes(int(core.state.length.max()), int(core.unseen.sum(-1).max()))
    args = (core.gpt, core.state, core.x, core.revealed, GEOM, kind, weight)
    oracle_utilities(*args, chunk=3, validate=False, sizes=sizes)  # warm-up (the weights' device copy)
    with HostReads(device) as r:
        got = oracle_utilities(*args, chunk=3, validate=False, sizes=sizes)
    assert r.count() == 0, r.reads
    with HostReads(device) as r:
        ref = oracle_utilities(*args, chunk=3)
    assert len(r.reads) > 3
    assert torch.equal(got, ref)  # exact sizes: the same numbers as reading them from the device
    # the core's oracle knows the sizes from its last step
    core.oracle_utilities(kind, weight)
    with HostReads(device) as r:
        via_core = core.oracle_utilities(kind, weight)
    assert r.count() == 0, r.reads
    assert torch.equal(via_core, ref)


# ----------------------------------------------------------------------------------------------
# Env step
# ----------------------------------------------------------------------------------------------


ENVS = {
    "teacher_forced": dict(),
    "router": dict(budget=[1, 2, 3]),
    "smdp": dict(budget=[1, 2], gamma=0.9, reward="anytime"),
    "generate_cfg_beliefs": dict(mode="generate", reward="entropy", beliefs=True,
                                 sampling=SamplingConfig(cfg_scale=2.0, top_k=30)),
    "generate_pending": dict(mode="generate", reward="entropy", query="pending", beliefs=False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("env", list(ENVS))
def test_env_step_reads_the_device_once(device, env):
    core = core_on(device, batch_size=4, **ENVS[env])
    core.reset()
    g = torch.Generator().manual_seed(5)
    counts = []
    for t in range(core.N):
        live = ~core.done
        if not bool(live.any()):
            break
        action = random_valid_action(~core.revealed, g, core.cfg.budget)
        active = live & (torch.rand(core.B, generator=g) < 0.8).to(device) if t % 2 else None
        if active is None and not bool(live.all()):
            active = live
        with HostReads(device) as r:
            core.step(action, active)
        counts.append(r.count())
        assert len(r.reads) <= 1 and r.cuda_syncs <= 1, (t, r.reads)
        if core.cfg.mode == "teacher_forced" and bool((~core.done).any()):
            with HostReads(device) as r:
                core.oracle_utilities()
            assert r.count() == 0, r.reads
    assert counts and max(counts) == 1  # the action check is still there


@pytest.mark.parametrize("device", DEVICES)
def test_invalid_action_still_raises_from_the_one_check(device):
    core = core_on(device, batch_size=3, budget=[1, 2])
    core.reset()
    action = random_valid_action(~core.revealed, torch.Generator().manual_seed(0), core.cfg.budget)
    bad = action.clone()
    bad[1, 0] = 5  # budget index out of range, on row 1 only
    with pytest.raises(ValueError, match=r"rows \[1\]: budget index"):
        core.step(bad)
    bad = action.clone()
    bad[2, 1:] = bad[2, 1]  # the same block twice
    bad[2, 0] = 1
    with pytest.raises(ValueError, match=r"rows \[2\]: the same block chosen twice"):
        core.step(bad)
    assert int(core.steps.sum()) == 0  # nothing changed


# ----------------------------------------------------------------------------------------------
# Policies: booking a decision
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("budget", [None, [1, 2]])
def test_policy_counts_decisions_on_the_device(device, budget):
    core = core_on(device, batch_size=3, budget=budget)
    policy = FixedOrderPolicy("raster", GEOM, budgets=budget).to(device)  # as make_policy places it
    core.reset()
    mask = ~core.revealed
    mask[1] = False  # a finished row is not booked
    obs = {"action_mask": mask}
    policy.act(obs)  # warm-up
    with HostReads(device) as r:
        policy.act(obs)
        policy.act(obs)
    assert r.count() == 0, r.reads
    assert policy.decisions == 6 and policy.forwards == 0  # reading the totals is the one read
