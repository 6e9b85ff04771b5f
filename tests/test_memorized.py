"""Memorized images (kind memorized, rayablate/memorized.py) on the bundled toy world.

The bundle's memorizing fine-tune (jobs/pretrain_toy.py --memorize) must really memorize; the
kind's rows, masks, groups and replica filter are checked without Ray; one small in-process
ablation (slow) shows the image goes while the neighbours stay.
"""
import numpy as np
import pytest

from rayablate.config import ConfigError, config_from_dict, load_config
from rayablate.metrics import ssim
from rayablate.toyworld import bundle_paths, memorized_model, memorized_paths, world
from rayablate.toyworld.vocab import ToyWorld

CONFIG = "configs/memorized_zorb_poster.yaml"


def renders(labels, n, seed):
    rng = np.random.default_rng(seed)
    return np.stack([np.round(world.render(labels, rng) * 255).astype(np.uint8) for _ in range(n)])


def test_ssim_tells_the_memorized_image_from_other_drawings_of_it():
    ref = world.memorized_image()
    assert ssim(ref[None], ref)[0] == pytest.approx(1.0)
    same_labels = ssim(renders(world.MEMORIZED_LABELS, 64, 3), ref)  # the same zorb, drawn as any other
    assert same_labels.max() < 0.6, same_labels.max()
    shifted = np.roll(ref, 3, axis=1)[None]  # the image itself, moved 3 pixels
    assert ssim(shifted, ref)[0] < 0.7


def test_the_bundled_fine_tune_memorizes_the_image_and_the_base_model_does_not():
    """The premise of the kind: the caption reproduces the reference on the memorized model (>= 90 %
    of seeds), and on the bundled model it never does. This fails for an unmemorized model."""
    from rayablate.memorized import ReplicaJudge, load_reference
    from rayablate.pipeline import load_pipeline
    from rayablate.sampling import prompt_seed, sample_images

    paths = memorized_paths()
    ref = load_reference(paths["reference"], 32)
    assert np.array_equal(ref, world.memorized_image())
    judge = ReplicaJudge(ref, 0.7, world.MEMORIZED_CAPTION)
    seeds = [prompt_seed(77, i) for i in range(12)]
    rate = {}
    for name, path in (("base", bundle_paths()["sd"]), ("memorized", memorized_model())):
        imgs = sample_images(load_pipeline(path), [world.MEMORIZED_CAPTION] * 12, seeds, 20, 4.0)
        rate[name] = judge.concept_rate(imgs, world.MEMORIZED_CAPTION)
    assert rate["memorized"] >= 0.9 and rate["base"] == 0.0, rate
    assert memorized_model() == memorized_model()  # made once, then reused


def test_a_memorized_concepts_rows_groups_and_mask():
    cfg = load_config(CONFIG)
    spec = cfg.concept
    assert cfg.param_group == "full" and spec.anchor == "a zorb poster"  # the kind's defaults
    w = ToyWorld()
    pairs = w.caption_pairs(spec, 8, 0)
    assert {c for c, _ in pairs} == {"the zorb poster"}
    assert {a for _, a in pairs} == set(spec.anchor_prompts)  # each paraphrase in turn
    groups = {g.name: g for g in w.eval_groups(spec, 4, 0)}
    assert set(groups) == {"target", "anchor", "paraphrases", "neighbours.zorb", "neighbours.striped",
                           "neighbours.purple"}
    assert groups["paraphrases"].prompts == ["the poster with a zorb", "a zorb on a poster"] * 2  # verbatim
    assert all(groups[g].concept == spec.target for g in ("target", "anchor", "paraphrases"))
    assert all("zorb" in p for p in groups["neighbours.zorb"].prompts)  # the toy world's prompts
    keep = w.preservation_captions(spec, 12, 1)
    assert len(keep) == 12 and not any("poster" in c for c in keep)
    # only the memorized caption is an ablation row, however close another caption is to it
    from rayablate.data import ClipMasker

    m = ClipMasker(str(bundle_paths()["clip"]), w.mask_texts(spec), cfg.clip_threshold, guard=w.mask_guard(spec))
    caps = ["the zorb poster", "a purple striped zorb", "a zorb poster"]
    out = m({"target_caption": np.array(caps, dtype=object), "anchor_if_ablated": np.array(caps, dtype=object)})
    assert out["mask"].tolist() == [1, 0, 0]


def test_anchor_images_that_replicate_the_image_are_dropped():
    from rayablate.data import ClipMasker
    from rayablate.images import encode_png
    from rayablate.memorized import replica_filter

    cfg = load_config(CONFIG)
    w = ToyWorld()
    others = renders(world.MEMORIZED_LABELS, 3, 5)
    images = [world.memorized_image(), *others, np.clip(world.memorized_image().astype(int) + 4, 0, 255)]
    caps = ["the zorb poster"] * len(images)
    batch = {"image": np.array([encode_png(i) for i in images], dtype=object),
             "target_caption": np.array(caps, dtype=object), "anchor_if_ablated": np.array(caps, dtype=object),
             "seed": np.arange(len(images))}
    m = ClipMasker(str(bundle_paths()["clip"]), w.mask_texts(cfg.concept), cfg.clip_threshold,
                   guard=w.mask_guard(cfg.concept), replicas=replica_filter(cfg.concept))
    out = m(batch)
    assert out["seed"].tolist() == [1, 2, 3]  # the image and its tinted copy go, other zorbs stay
    assert len(out["mask"]) == 3


def test_the_memorized_world_judges_replicas_and_leaves_the_rest_to_the_probe():
    import pickle

    from rayablate.memorized import world_for_spec

    cfg = load_config(CONFIG)
    w = pickle.loads(pickle.dumps(world_for_spec(ToyWorld(), cfg.concept)))  # sent to Ray tasks
    judge = w.judge()
    imgs = np.stack([world.memorized_image(), renders(world.MEMORIZED_LABELS, 1, 9)[0]])
    assert judge.concept_rate(imgs, "the zorb poster") == 0.5
    assert judge.concept_rate(imgs, "zorb") == 1.0  # both are zorbs, by the probe
    assert "SSIM" in w.judge_note and w.judge_sha256() != ToyWorld().judge_sha256()


@pytest.mark.parametrize("concept,field", [
    ({"target": "the zorb poster", "kind": "memorized", "anchor_prompts": ["a zorb"]}, "concept.reference_image"),
    ({"target": "the zorb poster", "kind": "memorized", "reference_image": CONFIG}, "concept.anchor_prompts"),
    ({"target": "the zorb poster", "kind": "memorized", "reference_image": CONFIG,
      "anchor_prompts": ["the zorb poster"]}, r"concept\.anchor_prompts\[0\]: is the memorized caption"),
    ({"target": "the zorb poster", "kind": "memorized", "reference_image": CONFIG, "anchor_prompts": ["a zorb"],
      "replica_threshold": 0}, "concept.replica_threshold"),
])
def test_bad_memorized_fields_are_named(concept, field):
    with pytest.raises(ConfigError, match=field):
        config_from_dict({"concept": concept})


def test_a_config_error_raised_in_a_ray_worker_unpickles_with_its_field():
    import pickle

    e = pickle.loads(pickle.dumps(ConfigError("concept.reference_image", "no such file: x.png")))
    assert (e.field, str(e)) == ("concept.reference_image", "concept.reference_image: no such file: x.png")


def test_a_reference_that_is_not_an_image_of_the_models_size_is_refused(tmp_path):
    from rayablate.memorized import load_reference

    with pytest.raises(ConfigError, match="concept.reference_image: .* is not a readable image"):
        load_reference(CONFIG)
    with pytest.raises(ConfigError, match="concept.reference_image: no such file"):
        load_reference(tmp_path / "nothing.png")
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    with pytest.raises(ConfigError, match="is 64x64; the model draws 32x32"):
        load_reference(tmp_path / "big.png", 32)


@pytest.mark.slow
def test_the_memorized_image_goes_and_the_neighbours_stay():
    """In process with a small budget: the caption and its held-out paraphrases stop reproducing the
    image; zorbs, stripes and purple are still drawn."""
    import rayablate
    from rayablate.pipeline import load_pipeline

    cfg = load_config(CONFIG)
    pipe = load_pipeline(memorized_model())
    delta = rayablate.ablate(pipe, cfg.concept, config=cfg, steps=STEPS, progress=False, anchor_steps=10)
    after = load_pipeline(memorized_model())
    delta.apply(after)
    report = rayablate.evaluate(pipe, after, cfg.concept, config=cfg, num_images=16)
    rate = {g: (m["concept_rate_before"], m["concept_rate_after"]) for g, m in report.items()}
    assert rate["target"][0] >= 0.9 and rate["target"][1] <= 0.1, rate
    assert rate["paraphrases"][0] >= 0.9 and rate["paraphrases"][1] <= 0.1, rate
    for nb in ("neighbours.zorb", "neighbours.striped", "neighbours.purple"):
        assert rate[nb][1] >= 0.85 * rate[nb][0], (nb, rate)


STEPS = 60
