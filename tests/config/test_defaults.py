"""One source of defaults: the schemas (dataclasses registered in Hydra's ConfigStore) hold every
default; the YAML presets hold overrides only; the discount is declared once."""

import re
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from orderplan.config.common import CONFIG_DIR, compose, to_typed
from orderplan.config.store import GROUP_SCHEMAS, SCHEMAS, group_schema, register_schemas, schema_of
from orderplan.env.core import EnvConfig
from orderplan.env.rewards import GAMMA
from orderplan.model.blocks import BlockGeometry

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
GROUP_FILES = sorted(str(p.relative_to(CONFIG_DIR)) for g in GROUP_SCHEMAS for p in (CONFIG_DIR / g).glob("*.yaml"))


def _repeats(raw: dict, default: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose YAML value equals the schema default (unresolved: `${...}` counts as a value)."""
    out = []
    for key, value in raw.items():
        if key in ("defaults", "hydra") or key not in default:
            continue
        if isinstance(value, dict) and value and isinstance(default[key], dict) and key != "overrides":
            out += _repeats(value, default[key], f"{prefix}{key}.")
        elif value == default[key]:
            out.append(prefix + key)
    return out


def test_every_preset_has_a_registered_schema():
    assert set(PRESETS) == set(SCHEMAS)
    register_schemas()
    from hydra.core.config_store import ConfigStore
    stored = ConfigStore.instance().repo
    assert all(f"{name}_schema.yaml" in stored for name in SCHEMAS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_holds_overrides_only(name):
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"), resolve=False)
    default = OmegaConf.to_container(OmegaConf.structured(schema_of(name)), resolve=False)
    assert not _repeats(raw, default), f"configs/{name}.yaml repeats its schema's defaults"


@pytest.mark.parametrize("rel", GROUP_FILES)
def test_group_preset_holds_overrides_only(rel):
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / rel), resolve=False) or {}
    default = OmegaConf.to_container(OmegaConf.structured(group_schema(Path(rel).parts[0])), resolve=False)
    assert not _repeats(raw, default), f"configs/{rel} repeats its schema's defaults"


def test_the_repeat_check_sees_a_repeat():
    assert _repeats({"bc": {"steps": 3000, "lr": 5.0}, "seed": 0}, {"bc": {"steps": 3000, "lr": 1e-3}, "seed": 0}) \
        == ["bc.steps", "seed"]


@pytest.mark.parametrize("name", PRESETS)
def test_composition_is_typed_by_the_schema(name):
    """A misspelt key fails when Hydra composes, before any code runs (the schema is in the
    defaults list), and the composed config round-trips through the schema."""
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose(name, ["no_such_key=1"])
    to_typed(compose(name), schema_of(name))


def _overrides_env(name: str) -> bool:
    """Whether configs/<name>.yaml, or a preset it extends through its defaults list, sets the env."""
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"), resolve=False)
    defaults = raw.get("defaults", [])
    if "env" in raw or any(isinstance(d, dict) and ("override env" in d or "env" in d) for d in defaults):
        return True
    return any(isinstance(d, str) and d in PRESETS and _overrides_env(d) for d in defaults)


@pytest.mark.parametrize("name", [n for n in PRESETS if "env" in {f.name for f in fields(schema_of(n))}])
def test_library_env_defaults_are_the_jobs(name):
    """EnvConfig() is what the default presets run (the beliefs observation included), except where a
    preset overrides it on purpose."""
    env = to_typed(compose(name), schema_of(name)).env
    if not _overrides_env(name):
        assert env == EnvConfig()
    assert EnvConfig().beliefs is True


def test_gamma_is_declared_once():
    """Every discount default is GAMMA; no module writes the number again."""
    from orderplan.eval.evaluate import EvalOptions
    from orderplan.eval.report import EvalSpec
    from orderplan.train.compare_orders import CompareEval
    from orderplan.train.ppo import PPOConfig

    assert {PPOConfig().gamma, EvalSpec().gamma, EvalOptions().gamma, CompareEval().gamma} == {GAMMA}
    pkg = Path(__file__).resolve().parents[2] / "src" / "orderplan"
    literal = re.compile(r"gamma\s*(:\s*float\s*)?=\s*0\.\d")
    offenders = [str(p.relative_to(pkg)) for p in pkg.rglob("*.py") if literal.search(p.read_text())]
    assert not offenders, offenders
    yaml_gamma = [str(p.relative_to(pkg)) for p in (pkg / "configs").rglob("*.yaml") if re.search(r"^\s*gamma:", p.read_text(), re.M)]
    assert not yaml_gamma, yaml_gamma


@pytest.mark.parametrize("dim, d_model, n_heads", [(128, 128, 4), (768, 384, 6), (1024, 512, 8)])
def test_bc_head_is_scaled_to_the_backbone(dim, d_model, n_heads):
    """bc.py's default agent sizes follow `orderhead_config_for`: a GPT-B run trains the 384-wide head
    the benchmark measures, not the tiny default's 128."""
    from orderplan.train.bc import BCRun, head_config

    run = to_typed(compose("bc"), BCRun)
    core = SimpleNamespace(D=dim, geom=BlockGeometry(16, 16, 4), gpt=SimpleNamespace(cfg=SimpleNamespace(num_classes=10)))
    cfg = head_config(run, core)
    assert (cfg.d_model, cfg.n_heads) == (d_model, n_heads)
    pinned = head_config(to_typed(compose("bc", ["agent.d_model=256", "agent.n_heads=8"]), BCRun), core)
    assert (pinned.d_model, pinned.n_heads) == (256, 8)


def test_a_given_width_sets_the_heads_unless_they_are_given():
    from orderplan.planner.orderhead import orderhead_config_for

    geom = BlockGeometry(16, 16, 4)
    assert orderhead_config_for(768, geom, d_model=512, n_heads=None).n_heads == 8
    assert orderhead_config_for(768, geom, d_model=None, n_heads=None).d_model == 384


def test_one_validation_style():
    """Config values are checked by module-level `check_<schema>(cfg, ...)` functions built on
    orderplan.infra.validation; no config dataclass carries a `validate` method of its own (the
    model architecture's GPTConfig.validate, called by the model itself, is not a run config)."""
    import ast as _ast

    pkg = Path(__file__).resolve().parents[2] / "src" / "orderplan"
    methods = []
    for path in pkg.rglob("*.py"):
        for node in _ast.walk(_ast.parse(path.read_text())):
            if isinstance(node, _ast.ClassDef) and any(getattr(d, "id", getattr(d, "attr", None)) == "dataclass"
                                                       or getattr(getattr(d, "func", None), "id", None) == "dataclass"
                                                       for d in node.decorator_list):
                methods += [f"{path.name}:{node.name}.validate" for f in node.body
                            if isinstance(f, _ast.FunctionDef) and f.name == "validate"]
    assert methods == ["gpt.py:GPTConfig.validate"], methods
