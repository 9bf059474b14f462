"""BC on generated states: the generated-state set never reads ground truth, its
replayed states are the ones generation visited, its labels are the argmax of the expected oracle û,
and train_bc trains on it from an init head (and refuses what it cannot do).

Everything runs on the embedded tiny default backbone (artifacts/tiny_mnist): 2 generated images,
K = 1 for the stored set (K = 2 where generation and replay are compared), and a small randomly
initialised OrderHead (belief inputs on) as the init / roll-in head.

Tolerances: a replay appends a whole block teacher-forced (`GPT.append`) where generation committed
its tokens one at a time (`advance` + `feed`), so the same state's float32 numbers can differ in the
last bits: hidden states are compared at atol 1e-5, rtol 1e-4 and utilities (nats, tens of nats in
size) at atol 1e-3. Comparisons that touch the same cache contents in the same way are bit-exact.
"""

from dataclasses import replace

import pytest
import torch

from orderplan.eval.report import EvalSpec
from orderplan.planner.orderhead import OrderHead, orderhead_config_for, save_orderhead
from orderplan.planner.policies import RandomPolicy
from orderplan.train.bc import AgentSpec, BCConfig, BCRun, train_bc
from orderplan.train.features import replay
from orderplan.train.generated_states import (
    GeneratedStates,
    GeneratedStatesConfig,
    collect_generated_states,
    generation_core,
    generation_env,
    load_or_build_generated,
    roll_in_behaviour,
    stream_seed,
)
from orderplan.oracle.expected import expected_utilities
from orderplan.infra.checkpoint import CheckpointManager, sha256_file
from orderplan.config.common import BackboneConfig
from orderplan.model.loading import build_backbone
from orderplan.data.tokens import load_token_data
from orderplan.env.core import EnvConfig, OrderPlanningCore
from orderplan.env.episodes import play_episodes

AGENT = AgentSpec(d_model=32, n_heads=2, n_latents=2, mlp_ratio=1.0, dropout=0.0)
R_SCHEDULE = [0, 1]
SEED = 0
ENV = EnvConfig(beliefs=True)  # a BC run's env (teacher-forced, belief observation)


@pytest.fixture(scope="module")
def bb():
    return build_backbone(BackboneConfig(), device="cpu")


@pytest.fixture(scope="module")
def head_file(bb, tmp_path_factory):
    """A small random OrderHead of AGENT's sizes (belief inputs, class-conditioned), saved to disk."""
    cfg = orderhead_config_for(bb.gpt.cfg.dim, bb.geometry, **vars(AGENT), R=max(R_SCHEDULE),
                               num_classes=bb.gpt.cfg.num_classes, beliefs=True)
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("head") / "orderhead.safetensors"
    save_orderhead(OrderHead(cfg), path)
    return path


def _gen_cfg(root, **kw) -> GeneratedStatesConfig:
    return GeneratedStatesConfig(**{"out_dir": str(root), "num_images": 2, "batch_size": 2, "belief_samples": 1,
                                    "roll_in": "init", **kw})


@pytest.fixture(scope="module")
def built(bb, head_file, tmp_path_factory):
    """The set of 2 generated images (one batch) rolled in by the head; the global RNG around it."""
    from orderplan.planner.orderhead import load_orderhead

    cfg = _gen_cfg(tmp_path_factory.mktemp("gen") / "set")
    head, sha = load_orderhead(head_file), sha256_file(head_file)
    before = torch.get_rng_state()
    gs = load_or_build_generated(cfg, bb, ENV, SEED, head, sha, show_progress=False)
    assert torch.equal(torch.get_rng_state(), before)  # building in-process moves no global stream
    return cfg, head, sha, gs


def _collect(bb, head, cfg, codes) -> dict[str, torch.Tensor]:
    core = generation_core(bb, generation_env(ENV, cfg, beliefs=True), cfg.num_images, cfg.batch_size, codes=codes)
    return collect_generated_states(core, roll_in_behaviour(cfg.roll_in, head, SEED), cfg.belief_samples, SEED)


def _revealed(prefix: torch.Tensor, length: torch.Tensor, N: int) -> torch.Tensor:
    """[S, N] bool: the blocks in each record's prefix up to its length."""
    steps = torch.arange(N)[None] < length[:, None]
    out = torch.zeros(len(prefix), N + 1, dtype=torch.bool)
    out.scatter_(1, torch.where(steps, prefix, N), True)
    return out[:, :N]


def _replay_core(bb, codes: torch.Tensor, labels: torch.Tensor, batch: int) -> OrderPlanningCore:
    return OrderPlanningCore(bb, codes, labels, replace(ENV, split="train"), batch, seed=0)


# ----------------------------------------------------------------------------------------------
# No ground truth
# ----------------------------------------------------------------------------------------------


def test_the_records_have_the_oracle_format(bb, built):
    _, _, _, gs = built
    N, M = bb.geometry.num_blocks, 2
    assert len(gs) == M * N and gs.codes.shape == (M, bb.gpt.cfg.num_tokens) and gs.codes.dtype == torch.long
    assert gs.labels.tolist() == [0, 1]  # class-balanced: image i has class i % num_classes
    for i in range(M):  # every image: one episode, its N states in order, each a prefix of the last
        rec = gs.image_index == i
        assert gs.length[rec].tolist() == list(range(N))
        last = gs.prefix[rec][-1]
        assert len(set(last[: N - 1].tolist())) == N - 1 and int(last[N - 1]) == -1
        for p, n in zip(gs.prefix[rec], gs.length[rec]):
            assert torch.equal(p[:n], last[:n]) and bool((p[n:] == -1).all())
    revealed = _revealed(gs.prefix, gs.length, N)
    assert torch.equal(torch.isneginf(gs.utilities), revealed)  # -inf exactly on the revealed blocks
    assert bool(torch.isfinite(gs.utilities[~revealed]).all()) and gs.utilities.dtype == torch.float32


def test_the_set_never_reads_ground_truth_tokens(bb, built):
    """Built over the real train codes or over scrambled random tokens instead of the placeholder
    zeros, the records (utilities bit-equal) and the generated grids are identical."""
    cfg, head, _, gs = built
    real, _ = load_token_data(bb.cfg, "train")
    scrambled = torch.randint(0, bb.gpt.cfg.vocab_size, (2, bb.gpt.cfg.num_tokens),
                              generator=torch.Generator().manual_seed(5))
    for codes in (real[:2], scrambled):
        rec = _collect(bb, head, cfg, codes)
        for k in ("image_index", "prefix", "length", "utilities", "codes", "labels"):
            assert torch.equal(rec[k], getattr(gs, k)), k
    assert not torch.equal(gs.codes, real[:2])  # the grids are the model's own samples


def test_expected_utilities_never_read_unrevealed_tokens(bb, built):
    """Replayed teacher-forced on the generated grid, or on the grid with every token outside the
    revealed blocks scrambled, a recorded state gives bit-equal û with the same generator seed,
    although the teacher-forced losses (which do read the ground truth) differ."""
    _, _, _, gs = built
    s = int(torch.nonzero((gs.image_index == 1) & (gs.length == 5))[0])
    image, prefix, length = gs.image_index[s:s + 1], gs.prefix[s:s + 1], gs.length[s:s + 1]
    revealed_tok = _revealed(prefix, length, bb.geometry.num_blocks)[0][bb.geometry.token_block]  # [L]
    noise = torch.randint(0, bb.gpt.cfg.vocab_size, gs.codes.shape, generator=torch.Generator().manual_seed(9))
    outs = []
    for codes in (gs.codes, torch.where(revealed_tok[None], gs.codes, noise)):
        core = _replay_core(bb, codes, gs.labels, 1)
        replay(core, image, prefix, length)
        core.seed(123)
        outs.append((core.expected_utilities(2).util, core.token_loss.clone()))
    assert torch.equal(outs[0][0], outs[1][0])
    assert not torch.equal(outs[0][1], outs[1][1])  # the scramble is there: the true-token losses see it


# ----------------------------------------------------------------------------------------------
# Replay = the state generation visited
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_replay_reproduces_the_generation_observation(bb, cfg_scale):
    """Generation (random roll-in) vs the teacher-forced replay of its prefixes on the final grid:
    hidden states, block masks and query hidden states agree at every step, and û given the same
    completions too. The entropy feature is compared without guidance only: generation-mode
    queries may or may not be guided (orderplan.env/core.py decides), the replay's are conditional."""
    B, K = 2, 2
    cfg = _gen_cfg("unused", sampling=replace(GeneratedStatesConfig().sampling, cfg_scale=cfg_scale))
    gen = generation_core(bb, generation_env(ENV, cfg, beliefs=True), B, B)
    gen.seed(11)
    policy = RandomPolicy(seed=3)
    seen, util = [], {}

    def act(obs):
        t = int(gen.steps[0])
        seen.append({k: obs[k].clone() for k in ("hidden", "block_mask", "query_hidden", "entropy")})
        if t in (0, 7):
            util[t] = gen.expected_utilities(K)
        return policy.act(obs)

    play_episodes(gen, torch.arange(B), act)
    N = gen.N
    tf = _replay_core(bb, gen.x.clone(), gen.labels.clone(), B)
    keys = ["hidden", "block_mask", "query_hidden"] + (["entropy"] if cfg_scale <= 1.0 else [])

    def visit(t, obs):
        for k in keys:
            a, b = obs[k], seen[t][k]
            if k == "block_mask":
                assert torch.equal(a, b), t
            else:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"{k} at step {t}")
        if t in util:  # û at this state given generation's own completions (teacher-forced)
            again = expected_utilities(tf.gpt, tf.state, tf.revealed, tf.geom, K, samples=util[t].samples)
            torch.testing.assert_close(again.util, util[t].util, atol=1e-3, rtol=0)

    replay(tf, torch.arange(B), gen.history.clone(), torch.full((B,), N - 1), visit=visit)


def test_labels_are_the_argmax_of_expected_utilities(bb, built):
    """Spot check: replaying the batch's prefixes at step t and drawing û with the seed the build
    used for (batch 0, step t) gives the recorded utilities, hence the same labels."""
    cfg, _, _, gs = built
    for t in (0, 6, 15):
        rec = torch.nonzero(gs.length == t).flatten()  # both images of batch 0, in row order
        core = _replay_core(bb, gs.codes, gs.labels, 2)
        replay(core, gs.image_index[rec], gs.prefix[rec], gs.length[rec])
        core.seed(stream_seed(SEED, 0, t))
        u = core.expected_utilities(cfg.belief_samples).util
        torch.testing.assert_close(u, gs.utilities[rec], atol=1e-3, rtol=0)
        assert torch.equal(u.argmax(-1), gs.utilities[rec].argmax(-1))


# ----------------------------------------------------------------------------------------------
# The stored set and train_bc
# ----------------------------------------------------------------------------------------------


def test_a_rerun_reuses_the_set_and_another_identity_is_refused(bb, built):
    cfg, head, sha, gs = built
    again = load_or_build_generated(cfg, bb, ENV, SEED, head, sha, show_progress=False)
    assert torch.equal(again.utilities, gs.utilities) and again.manifest == gs.manifest
    for other, field in ((replace(cfg, belief_samples=3), "belief_samples"), (cfg, "seed"), (cfg, "init_sha256")):
        seed = SEED + 1 if field == "seed" else SEED
        with pytest.raises(ValueError, match="different setup") as e:
            load_or_build_generated(other, bb, ENV, seed, head, "0" * 64 if field == "init_sha256" else sha)
        assert f"{field}: saved " in str(e.value) and str(e.value).count(": saved ") == 1  # only that field
        assert "generated.out_dir" in str(e.value)
    assert isinstance(GeneratedStates.load(cfg.out_dir), GeneratedStates)


def _run(root, head_file, gen_dir, **over) -> BCRun:
    bc = BCConfig(steps=4, batch_size=16, replay_batch=8, log_every=2, ckpt_every=2, R_schedule=R_SCHEDULE,
                  lr=1e-3, init_from=str(head_file))
    run = BCRun(env=ENV, agent=AGENT, bc=bc, states="generated", generated=_gen_cfg(gen_dir),
                eval=EvalSpec(num_images=2, batch_size=2, baselines=["random"]), run_dir=str(root / "bc"))
    for k, v in over.items():
        run = replace(run, bc=replace(run.bc, **{k[3:]: v})) if k.startswith("bc_") else replace(run, **{k: v})
    return run


def test_train_bc_on_generated_states_runs_resumes_and_writes_the_head(built, head_file, tmp_path):
    cfg, _, _, gs = built
    first = train_bc(_run(tmp_path, head_file, cfg.out_dir))  # reuses the fixture's set (same identity)
    assert first["states"] == "generated" and first["train_states"] == len(gs) and first["resumed_from"] == 0
    assert first["generated"]["identity"] == gs.manifest["identity"] and (tmp_path / "bc" / "orderhead.safetensors").is_file()
    assert "learned" in first["returns"] and first["init_from"]["path"] == str(head_file)
    ident = CheckpointManager(tmp_path / "bc" / "checkpoints").load_latest()["identity"]
    assert ident["state_source"] == "generated" and ident["init_from_sha256"] == sha256_file(head_file)
    longer = train_bc(_run(tmp_path, head_file, cfg.out_dir, bc_steps=6))  # continues from the step-4 checkpoint
    assert longer["resumed_from"] == 4 and [h["step"] for h in longer["history"]] == [2, 4, 6]
    with pytest.raises(ValueError, match="cannot resume"):
        train_bc(_run(tmp_path, head_file, cfg.out_dir, bc_steps=8, bc_lr=5e-4))


@pytest.mark.parametrize("over,match", [
    ({"bc_dagger_rounds": 1}, "DAgger"),
    ({"bc_init_from": None}, "bc.init_from"),
    ({"states": "generating"}, "states must be one of"),
])
def test_bad_generated_configs_are_refused_before_any_work(tmp_path, head_file, over, match):
    with pytest.raises(ValueError, match=match):
        train_bc(_run(tmp_path, head_file, tmp_path / "never_built", **over))
    assert not (tmp_path / "never_built").exists()


def test_an_init_head_of_another_architecture_is_refused(tmp_path, head_file):
    with pytest.raises(ValueError, match="d_model: file 32 vs run 64"):
        train_bc(_run(tmp_path, head_file, tmp_path / "never_built", agent=replace(AGENT, d_model=64)))
    assert not (tmp_path / "never_built").exists()


@pytest.mark.parametrize("name", ["states.pt", "manifest.json"])
def test_a_damaged_generated_set_is_refused_by_name(built, tmp_path, name):
    import shutil

    from orderplan.infra.integrity import IntegrityError
    from tests.support.corrupt import flip_payload_byte, still_parses

    cfg = built[0]
    root = shutil.copytree(cfg.out_dir, tmp_path / "set")
    GeneratedStates.load(root)
    flip_payload_byte(root / name)
    still_parses(root / name)  # torch / json accept it: only the checksum can tell
    with pytest.raises(IntegrityError, match=rf"{name}: sha256 .*does not match.*delete {root}"):
        GeneratedStates.load(root)
