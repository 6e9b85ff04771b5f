"""Config loading and validation: every bad value names its field."""
from pathlib import Path

import pytest

from rayablate.config import AblationConfig, ConfigError, config_from_dict, load_config, validate


def bad(data, field):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert e.value.field == field, str(e.value)
    assert field in str(e.value)
    return str(e.value)


def test_defaults_are_valid():
    cfg = config_from_dict({})
    assert cfg.param_group == "xattn-kv" and cfg.zero_stage == 2 and cfg.precision == "fp32"


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("concept:\n  target: zorb\n  anchor: circle\n  kind: instance\nsteps: 50\n")
    cfg = load_config(p, {"lr_matcher": 1e-4, "concept.neighbours": ["kubo"]})
    assert (cfg.concept.target, cfg.concept.kind, cfg.steps, cfg.lr_matcher) == ("zorb", "instance", 50, 1e-4)
    assert cfg.concept.neighbours == ["kubo"]


def test_target_equal_to_anchor():
    msg = bad({"concept": {"target": "Cat", "anchor": "cat"}}, "concept.anchor")
    assert "differ" in msg


def test_empty_target():
    bad({"concept": {"target": "  "}}, "concept.target")


def test_unknown_param_group_lists_the_allowed_ones():
    msg = bad({"param_group": "attention"}, "param_group")
    assert "xattn-kv" in msg and "lora" in msg


def test_unknown_kind():
    bad({"concept": {"kind": "painting"}}, "concept.kind")


@pytest.mark.parametrize("field", ["lr_matcher", "lr_disc"])
@pytest.mark.parametrize("value", [0, -1e-4])
def test_non_positive_learning_rate(field, value):
    bad({field: value}, field)


@pytest.mark.parametrize("value", [-1.01, 1.5])
def test_clip_threshold_outside_minus_one_one(value):
    bad({"clip_threshold": value}, "clip_threshold")


def test_clip_threshold_edges_are_allowed():
    assert config_from_dict({"clip_threshold": -1.0}).clip_threshold == -1.0
    assert config_from_dict({"clip_threshold": 1.0}).clip_threshold == 1.0


@pytest.mark.parametrize("value", [-1, 4])
def test_zero_stage_outside_0_to_3(value):
    bad({"zero_stage": value}, "zero_stage")


def test_fp16_on_cpu_is_refused():
    msg = bad({"precision": "fp16"}, "precision")
    assert "CPU" in msg


def test_an_unknown_sample_precision_names_the_field_and_its_choices():
    msg = bad({"sample_precision": "fp16"}, "sample_precision")
    assert "auto, fp32, bf16" in msg
    assert AblationConfig().sample_precision == "auto"


def test_fp16_with_use_gpu_but_no_cuda_is_refused():
    cfg = AblationConfig(precision="fp16", use_gpu=True)
    with pytest.raises(ConfigError) as e:
        validate(cfg, cuda_available=False)
    assert e.value.field == "precision"
    assert validate(cfg, cuda_available=True) is cfg


def test_unknown_key_and_wrong_type_name_the_field():
    bad({"lr_matcherr": 1e-4}, "lr_matcherr")
    bad({"steps": "ten"}, "steps")
    bad({"concept": {"neighbours": "kubo"}}, "concept.neighbours")
    bad({"use_gpu": "yes"}, "use_gpu")


def test_unsafe_concept_name_is_refused():
    bad({"concept": {"name": "../escape"}}, "concept.name")
    bad({"concept": {"name": "a/b"}}, "concept.name")


def test_malformed_yaml_and_non_mapping(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("concept: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_yaml_never_evaluates_code(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("steps: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(p)


def test_every_concept_config_in_configs_loads():
    """The example configs stay valid as fields change (batch_*.yaml are batch specs, loaded elsewhere)."""
    from pathlib import Path

    from rayablate.config import load_config

    folder = Path(__file__).resolve().parents[1] / "configs"
    loaded = {p.name: load_config(p) for p in sorted(folder.glob("*.yaml")) if not p.name.startswith("batch_")}
    assert {"style_striped_empty.yaml", "style_striped_blank.yaml", "instance_zorb_noise.yaml"} <= set(loaded)
    kinds = {name: cfg.concept.anchor_kind for name, cfg in loaded.items()}
    assert kinds["style_striped_blank.yaml"] == "blank" and loaded["style_striped_blank.yaml"].match == "noise"
    assert kinds["instance_zorb_noise.yaml"] == "noise" and kinds["style_striped_empty.yaml"] == "empty"


def test_when_robust_applies_to_robust_runs_only_below_the_flags(tmp_path):
    """A concept file's `when_robust` fields are what its robust runs use (robust turned on by the
    file or by --robust), over robust mode's own defaults, and a flag still wins over them."""
    p = tmp_path / "c.yaml"
    p.write_text("steps: 100\nnum_preservation_images: 64\nwhen_robust:\n  steps: 250\n")
    plain = load_config(p)
    assert (plain.robust, plain.steps, plain.num_preservation_images) == (False, 100, 64)
    robust = load_config(p, {"robust": True})
    # when_robust's steps; the file's own 64 rows still beat ROBUST_DEFAULTS' 128; its other defaults apply
    assert (robust.robust, robust.steps, robust.num_preservation_images, robust.param_group) == (True, 250, 64, "xattn")
    assert load_config(p, {"robust": True, "steps": 30}).steps == 30
    p.write_text("robust: true\nsteps: 100\nwhen_robust:\n  steps: 250\n")
    assert load_config(p).steps == 250 and config_from_dict({"robust": True, "when_robust": {"steps": 7}}).steps == 7
    # the v2 configs hold their default runs at 100 steps and their robust runs at robust mode's 200
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("instance_blix_v2.yaml", "instance_zorb_v2.yaml", "style_wavy_v2.yaml"):
        assert (load_config(root / name).steps, load_config(root / name, {"robust": True}).steps) == (100, 200), name


@pytest.mark.parametrize("value, field", [({"stepz": 3}, "when_robust.stepz"), ({"robust": False}, "when_robust.robust"),
                                          ({"concept": {}}, "when_robust.concept"), ([1], "when_robust")])
def test_a_bad_when_robust_is_refused_even_in_a_default_run(value, field):
    bad({"when_robust": value}, field)
