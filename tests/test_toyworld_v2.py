"""Toy world v2: 20 characters over 4 shapes and 7 marks, 8 styles, descriptive paraphrases."""
import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest

from rayablate.config import ConceptSpec
from rayablate.toyworld import BUNDLE_DIRS, TOY_V2, toy_bundle_of
from rayablate.toyworld.v2 import CHARACTERS, V2, description
from rayablate.toyworld.vocab import ToyWorld
from rayablate.toyworld.world import V1, Labels, by_name

HAS_BUNDLE = (BUNDLE_DIRS["v2"] / "probe" / "probe.safetensors").exists()
needs_bundle = pytest.mark.skipif(not HAS_BUNDLE, reason="world v2 bundle not built (python jobs/pretrain_toy.py --world v2)")


def _img(lab: Labels, seed: int) -> np.ndarray:
    return np.round(V2.render(lab, np.random.default_rng(seed)) * 255).astype(np.uint8)


def test_world_has_32_named_concepts_and_entangled_neighbours():
    assert len(V2.objects) + len(V2.patterns) >= 32 and len(V2.patterns) >= 8
    marks = [m for _, m in CHARACTERS.values()]
    shapes = [s for s, _ in CHARACTERS.values()]
    # every mark is worn by at least two characters, every shape carries at least four
    assert min(marks.count(m) for m in set(marks)) >= 2
    assert min(shapes.count(s) for s in set(shapes)) >= 4
    assert len(set(CHARACTERS.values())) == len(CHARACTERS)  # no two characters are the same drawing


def test_v2_renders_are_deterministic_and_captions_name_their_labels():
    a_img, a_cap, a_lab = V2.sample(40, seed=3)
    b_img, b_cap, b_lab = V2.sample(40, seed=3)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and np.array_equal(a_lab, b_lab)
    for cap, idx in zip(a_cap, a_lab):
        lab = V2.labels_at(idx)
        assert lab.colour in cap
        assert any(w in cap for w in V2.object_words[lab.object]), cap
        assert any(w in cap for w in V2.pattern_words[lab.pattern]), cap


def test_a_characters_render_is_its_shape_plus_its_mark():
    """The label says "blix": the image is the circle of the same draw with a hat added: pixels change
    only where the mark is, and every mark changes at least a few pixels."""
    for name, (shape, mark) in CHARACTERS.items():
        char = _img(Labels(name, "blue", "plain"), 7)
        plain = _img(Labels(shape, "blue", "plain"), 7)
        changed = np.abs(char.astype(int) - plain.astype(int)).max(-1) > 30
        assert 8 <= changed.sum() <= 200, (name, changed.sum())
        # inside marks darken the shape; the others add pixels where the shape's canvas was background
        outside = plain.min(-1) > 240
        if mark in ("face", "patch"):
            assert (changed & outside).sum() <= 2, name
        else:
            assert (changed & outside).sum() >= 6, name


def test_descriptions_name_the_same_concept_and_stay_out_of_ablation_training():
    toy = ToyWorld(world="v2")
    for c in CHARACTERS:
        assert toy.words(c, held_out=True) == [description(c)]
        assert description(c) not in " ".join(toy.words(c))
        # a prompt naming the character by its description asks for the same labels as its name
        by_name_ = [lab for _, lab in V2.iter_prompts_naming(c, 6, 11)]
        by_desc = [lab for _, lab in V2.iter_prompts_naming(c, 6, 11, words=[description(c)])]
        assert by_name_ == by_desc and all(lab.object == c for lab in by_desc)
    spec = ConceptSpec(kind="instance", target="blix", anchor="circle", neighbours=["zorb", "drub"])
    pairs = toy.caption_pairs(spec, 64, 0)
    assert not any("with a hat" in t or " hat" in a for t, a in pairs)
    assert all("blix" in t and "blix" not in a and "circle" in a for t, a in pairs)
    para = next(g for g in toy.eval_groups(spec, 8, 0) if g.name == "paraphrases")
    assert all("circle with a hat" in p for p in para.prompts)
    # pretraining captions do use the descriptions; the held-out-free sample does not
    _, caps, _ = V2.sample(400, seed=5)
    assert any(description(c) in cap for cap in caps for c in CHARACTERS)
    _, caps, _ = V2.sample(400, seed=5, include_held_out=False)
    assert not any(description(c) in cap for cap in caps for c in CHARACTERS)


def test_worlds_pickle_by_name_and_toy_models_resolve():
    assert pickle.loads(pickle.dumps(V2)) is V2 and by_name("v1") is V1
    toy = pickle.loads(pickle.dumps(ToyWorld(world="v2")))
    assert toy.w is V2 and toy.knows("snook") and not ToyWorld().knows("snook")
    assert toy_bundle_of(TOY_V2) == ("v2", BUNDLE_DIRS["v2"]) and toy_bundle_of("")[0] == "v1"
    assert toy_bundle_of("some/hub-id") is None
    with pytest.raises(ValueError, match="toy:v3"):
        toy_bundle_of("toy:v3")
    with pytest.raises(KeyError, match="v3"):
        by_name("v3")


def test_a_v1_concept_means_the_same_in_v2():
    """zorb and kubo keep their v1 drawing (a circle and a square with a face)."""
    for c in ("zorb", "kubo"):
        assert V2.instance_of[c] == V1.instance_of[c]
    lab = dataclasses.replace(V2.random_labels(np.random.default_rng(0)), object="zorb")
    assert V2.concept_predicate("zorb")(lab) and not V2.concept_predicate("circle")(lab)


def test_batch_v2_removes_16_concepts_with_entangled_neighbours_left_in():
    from pathlib import Path

    from rayablate.batch.spec import load_batch

    batch = load_batch(Path(__file__).resolve().parents[1] / "configs" / "batch_v2.yaml")
    targets = [c.cfg.concept.target for c in batch.concepts]
    assert len(targets) >= 16 and {c.cfg.model for c in batch.concepts} == {TOY_V2}
    assert {c.cfg.concept.kind for c in batch.concepts} == {"style", "instance"}
    for c in batch.concepts:
        assert c.cfg.concept.neighbours and not set(c.cfg.concept.neighbours) & set(targets), c.name
        if c.cfg.concept.kind == "instance":  # a kept neighbour shares its shape or its mark
            shape, mark = CHARACTERS[c.name]
            assert any(CHARACTERS.get(n, ("", ""))[0] == shape or CHARACTERS.get(n, ("", ""))[1] == mark
                       for n in c.cfg.concept.neighbours), c.name


@needs_bundle
def test_v2_probe_agrees_with_renderer_labels_and_rejects_noise():
    from rayablate.toyworld.probe import ProbeJudge

    judge = ProbeJudge(BUNDLE_DIRS["v2"] / "probe" / "probe.safetensors", world=V2)
    images, _, labels = V2.sample(400, seed=424243)
    probs = judge.probabilities(images)
    for k, attr in enumerate(("object", "colour", "pattern")):
        acc = (probs[attr].argmax(1).numpy() == labels[:, k]).mean()
        assert acc >= 0.97, (attr, acc)
    assert judge.valid_rate(images, probs) >= 0.97
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    assert judge.valid_rate(noise) <= 0.05


@needs_bundle
def test_both_bundles_are_safetensors_only_and_within_48_mb():
    files = [p for d in BUNDLE_DIRS.values() for p in d.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert sum(p.stat().st_size for p in files) <= 48 * 1024 * 1024


@needs_bundle
def test_toy_v2_model_resolves_to_its_own_bundle_clip_and_probe():
    from rayablate.config import AblationConfig
    from rayablate.job import resolve_models

    spec = ConceptSpec(kind="instance", target="blix", anchor="circle", neighbours=["lorx"])
    m = resolve_models(AblationConfig(concept=spec, model=TOY_V2))
    root = BUNDLE_DIRS["v2"]
    assert m.model_path == str(root / "sd") and m.clip == str(root / "clip")
    assert m.world.w is V2 and m.world.judge().world is V2
    groups = {g.name: g for g in m.world.eval_groups(spec, 4, 0)}
    assert set(groups) == {"target", "anchor", "neighbours.lorx", "paraphrases"}


@needs_bundle
@pytest.mark.slow
def test_v2_quality_bar_holds_on_a_small_sample():
    """The tiny SD draws characters, their descriptions and styles when named, and not otherwise."""
    from rayablate.pipeline import load_pipeline
    from rayablate.toyworld.probe import ProbeJudge
    from rayablate.toyworld.quality import quality_table

    root = BUNDLE_DIRS["v2"]
    pipe = load_pipeline(root / "sd")
    judge = ProbeJudge(root / "probe" / "probe.safetensors", world=V2)
    rows = quality_table(pipe, judge, concepts=("blix", "lorx", "tafi", "slanted", "wavy"), n=24, steps=25)
    for r in rows:
        # a small sample: a little slack against the 90 % / 10 % bar measured on 64
        assert r["rate_when_named"] >= 0.8, r
        assert r["rate_when_not_named"] <= 0.2, r
    # the description draws the character as its name does
    from rayablate.toyworld.quality import generate

    prompts = [p for p, _ in V2.iter_prompts_naming("blix", 24, 5, words=[description("blix")])]
    assert judge.concept_rate(generate(pipe, prompts, 5), "blix") >= 0.75


@needs_bundle
def test_the_clip_mask_never_takes_a_row_that_names_a_neighbour():
    """The v2 CLIP puts drub (square + hat) near blix (circle + hat): at threshold 0.25 "a dotted drub"
    scored as blix and was trained into a circle. A row naming a declared neighbour and not the
    target is never masked in, at any threshold; rows naming the target, by name or description, are."""
    from rayablate.data import ClipMasker

    toy = ToyWorld(world="v2")
    spec = ConceptSpec(kind="instance", target="blix", anchor="circle", neighbours=["drub", "lorx"])
    masker = ClipMasker(str(BUNDLE_DIRS["v2"] / "clip"), toy.mask_texts(spec), -1.0, guard=toy.mask_guard(spec),
                        protect=toy.mask_protect(spec))
    caps = ["a dotted green drub", "a yellow lorx, dotted", "a red blix", "a red circle with a hat",
            "a drub and a blix", "a green quen"]
    n = len(caps)
    out = masker({"target_caption": np.array(caps, dtype=object), "anchor_caption": np.array(caps, dtype=object),
                  "anchor_if_ablated": np.array(caps, dtype=object), "image": np.array([b""] * n, dtype=object)})
    assert list(out["mask"]) == [0, 0, 1, 1, 1, 1]
    assert list(out["clip_sim"][:2]) == [-1.0, -1.0]


def test_a_retrained_reference_leaves_the_excluded_concept_out_of_its_data(tmp_path):
    """`pretrain_toy.py --exclude blix`: no render of blix, and so no caption naming or describing it, is
    left in the data; every other object still is; the instruments are the bundle's own files."""
    from rayablate.toyworld.pretrain import INSTRUMENTS, load_data, stage_data, stage_instruments

    stage_data(tmp_path, seed=0, n=480, w=V2, exclude=("blix",))
    images, captions, labels = load_data(tmp_path)
    assert len(images) == len(captions) == len(labels) < 480
    assert {V2.labels_at(r).object for r in labels} == set(V2.objects) - {"blix"}
    assert not any("blix" in c or description("blix") in c for c in captions)
    assert any(description("drub") in c for c in captions)  # other descriptions are still there
    if HAS_BUNDLE:
        stage_instruments(tmp_path, BUNDLE_DIRS["v2"])
        for src, dst in INSTRUMENTS.items():
            a, b = BUNDLE_DIRS["v2"] / src, tmp_path / dst
            if a.is_file():
                assert a.read_bytes() == b.read_bytes()
            else:
                assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


@pytest.mark.parametrize("argv, field, says", [
    (["--exclude", "circle"], "--exclude", "already knows 'circle'"),  # the v1 warm start has circles
    (["--exclude", "snarf"], "--exclude", "not a concept of world v2"),
    (["--exclude", "blix", "--output-dir", str(BUNDLE_DIRS["v2"])], "--output-dir", "must not replace"),
])
def test_exclude_refuses_what_would_not_be_a_clean_reference(tmp_path, capsys, argv, field, says):
    import runpy

    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "jobs" / "pretrain_toy.py"))["main"]
    with pytest.raises(SystemExit) as e:
        main(["--world", "v2", "--work-dir", str(tmp_path / "w"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {field}" in err and says in err
    assert not (tmp_path / "w").exists()  # refused before anything is written (and a named --work-dir is kept)


def test_exclude_writes_into_the_work_dir_the_user_names(tmp_path):
    """--work-dir is used as given with --exclude (only the default gets the _no-<concepts> suffix)."""
    import runpy

    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "jobs" / "pretrain_toy.py"))["main"]
    main(["--work-dir", str(tmp_path / "w"), "--exclude", "striped", "--stages", "data", "--num-images", "40",
          "--skip-quality"])
    assert (tmp_path / "w" / "data.npz").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["w"]
