"""Automatic neighbours (rayablate/neighbours.py): the entangled concepts an ablation would damage,
found in the model's own text conditioning, on the bundled world v2 and the tiny SDXL fixture."""
from __future__ import annotations

import argparse

import pytest
import yaml

from rayablate.config import ConfigError, load_config
from rayablate.job import prepare_output, resolve_models
from rayablate.neighbours import TextSide, candidate_pool, rank, with_auto_neighbours
from rayablate.toyworld.v2 import CHARACTERS
from rayablate.worlds import PromptWorld


def zorb_v2(**extra):
    return load_config(None, {"model": "toy:v2", "concept.target": "zorb", "concept.anchor": "circle",
                              "concept.kind": "instance", "concept.neighbours": ["kubo", "quen"], **extra})


@pytest.fixture(scope="module")
def v2():
    cfg = zorb_v2()
    models = resolve_models(cfg)
    return models, TextSide.load(models.model_path)


def test_the_nearest_concepts_of_zorb_are_the_other_face_characters(v2):
    models, side = v2
    faces = [c for c, (_, mark) in CHARACTERS.items() if mark == "face" and c != "zorb"]  # kubo, vell, zeph
    ranked = rank(side, ["zorb"], [c for c in CHARACTERS if c != "zorb"])
    top = [c for c, _ in ranked[:3]]
    assert sorted(top) == sorted(faces), ranked[:5]
    # and a hat character's nearest are hats: the ranking follows the shared mark, not the name
    hats = [c for c, _ in rank(side, ["blix"], ["drub", "lorx", "zeph", "vell", "tuv"])[:2]]
    assert sorted(hats) == ["drub", "lorx"]


def test_auto_neighbours_are_added_once_and_never_the_target_anchor_declared_or_excluded(v2):
    models, side = v2
    cfg = zorb_v2(**{"concept.auto_neighbours": 3})
    resolved, chosen = with_auto_neighbours(cfg, models.world, side)
    names = [c for c, _ in chosen]
    assert resolved.concept.neighbours == ["kubo", "quen", *names] and len(names) == 3
    assert names[0] == "zeph" and not {"zorb", "circle", "kubo", "quen"} & set(names)
    assert resolved.concept.auto_neighbours == 0
    assert with_auto_neighbours(resolved, models.world, side) == (resolved, [])  # a saved config reruns as is
    # a batch's other targets are never kept
    excluded, chosen2 = with_auto_neighbours(cfg, models.world, side, exclude=["zeph"])
    assert "zeph" not in excluded.concept.neighbours and len(chosen2) == 3
    # given candidates, only they are chosen from
    only, chosen3 = with_auto_neighbours(zorb_v2(**{"concept.auto_neighbours": 2,
                                                    "concept.candidates": ["tuv", "vell", "striped"]}),
                                         models.world, side)
    names3 = [c for c, _ in chosen3]
    assert len(names3) == 2 and set(names3) <= {"tuv", "vell", "striped"} and names3[0] == "vell"
    assert only.concept.neighbours == ["kubo", "quen", *names3]


def test_prepare_output_saves_the_resolved_config(v2, tmp_path, capsys):
    models, _ = v2
    out, _, cfg = prepare_output(zorb_v2(**{"concept.auto_neighbours": 2}), tmp_path / "run", models)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["concept"]["neighbours"] == cfg.concept.neighbours and len(cfg.concept.neighbours) == 4
    assert saved["concept"]["auto_neighbours"] == 0
    assert "auto neighbours of 'zorb': zeph" in capsys.readouterr().out


def test_a_world_without_named_concepts_needs_candidates():
    cfg = load_config(None, {"concept.target": "van gogh", "concept.anchor": "painting",
                             "concept.templates": ["a painting in the style of {}"], "concept.auto_neighbours": 2})
    with pytest.raises(ConfigError) as e:
        candidate_pool(cfg, PromptWorld())
    assert e.value.field == "concept.candidates"


@pytest.mark.parametrize("key, value, field", [("concept.auto_neighbours", -1, "concept.auto_neighbours"),
                                               ("concept.candidates", ["monet", " "], "concept.candidates[1]")])
def test_bad_values_name_the_field(key, value, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, {key: value})
    assert e.value.field == field


def test_the_flags_reach_the_config():
    from rayablate.cli import add_common_flags, config_from_args

    ap = argparse.ArgumentParser()
    add_common_flags(ap)
    cfg = config_from_args(ap.parse_args(["--auto-neighbours", "2", "--candidates", "monet, klimt",
                                          "--neighbours", "dotted"]))
    assert (cfg.concept.auto_neighbours, cfg.concept.candidates, cfg.concept.neighbours) == \
        (2, ["monet", "klimt"], ["dotted"])


def test_sdxl_reads_both_text_encoders_without_the_unet(sdxl_path):
    side = TextSide.load(str(sdxl_path))
    assert len(side.encoders) == 2 and side.prompts.xl
    ranked = rank(side, ["zorb"], ["kubo", "circle"])
    assert len(ranked) == 2 and all(-1.0 <= s <= 1.0 for _, s in ranked)


def test_the_batch_chooses_no_other_target(v2):
    from rayablate.batch.run import resolve_batch_neighbours
    from rayablate.batch.spec import batch_from_dict

    models, _ = v2
    batch = batch_from_dict({"defaults": {"model": "toy:v2", "concept": {"auto_neighbours": 3}}, "concepts": [
        {"concept": {"target": "zorb", "anchor": "circle", "kind": "instance", "neighbours": ["kubo"]}},
        {"concept": {"target": "zeph", "anchor": "diamond", "kind": "instance", "neighbours": ["lorx"]}}]})
    lines = []
    resolve_batch_neighbours(batch, models, lines.append)
    zorb, zeph = (c.cfg.concept for c in batch.concepts)
    assert "zeph" not in zorb.neighbours and "zorb" not in zeph.neighbours
    assert len(zorb.neighbours) == 4 and len(zeph.neighbours) == 4 and len(lines) == 2
