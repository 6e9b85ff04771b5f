"""Target kinds (docs/design.md#target-kinds): a composition (kind prompt) and a category (kind unsafe).

No Ray here: the rows, groups, masks and judge answers these kinds build, on the bundled toy world.
"""
import numpy as np
import pytest

from rayablate import prompts as P
from rayablate.config import ConfigError, config_from_dict, load_config
from rayablate.toyworld import bundle_paths, world
from rayablate.toyworld.vocab import ToyWorld
from rayablate.worlds import PromptWorld

STRIPE = ("striped", "with stripes", "stripy")
ZORB = ("zorb",)  # "zorb character", "smiling zorb" contain it


def names(caption, words):
    return any(w in caption for w in words)


@pytest.fixture(scope="module")
def judge():
    from rayablate.toyworld.probe import ProbeJudge

    return ProbeJudge(bundle_paths()["probe"])


def masker(cfg, w, threshold=None):
    from rayablate.data import ClipMasker

    return ClipMasker(str(bundle_paths()["clip"]), w.mask_texts(cfg.concept),
                      cfg.clip_threshold if threshold is None else threshold, guard=w.mask_guard(cfg.concept))


def mask_of(m, captions):
    out = m({"target_caption": np.array(captions, dtype=object), "anchor_if_ablated": np.array(captions, dtype=object)})
    return out["mask"].tolist(), out["clip_sim"]


# --- compound concepts in the toy world -----------------------------------------------------------

def test_compositions_and_the_categories_predicates():
    L = world.Labels
    both = world.concept_predicate("striped zorb")
    assert both(L("zorb", "red", "striped"))
    assert not both(L("zorb", "red", "plain")) and not both(L("circle", "red", "striped"))
    either = world.concept_predicate("zorb or kubo")
    assert either(L("zorb", "red", "plain")) and either(L("kubo", "blue", "dotted"))
    assert not either(L("circle", "red", "plain"))
    assert world.attribute_of("zorb or kubo") == "object" and world.attribute_of("striped zorb") == "pattern"
    for bad in ("striped dotted", "zorb or striped", "zorb blob"):
        with pytest.raises(KeyError):
            world.attribute_of(bad)


def test_the_judge_reads_a_composition_as_all_parts_and_a_category_as_any_member(judge):
    images, _, labels = world.sample(400, seed=77)
    probs = judge.probabilities(images)
    obj = np.array(world.OBJECTS)[labels[:, 0]]
    pat = np.array(world.PATTERNS)[labels[:, 2]]
    both = judge.concept_mask(images, "striped zorb", probs)
    np.testing.assert_array_equal(both, judge.concept_mask(images, "striped", probs)
                                  & judge.concept_mask(images, "zorb", probs))
    truth = (obj == "zorb") & (pat == "striped")
    assert truth.sum() >= 5 and (both == truth).mean() >= 0.97
    either = judge.concept_mask(images, "zorb or kubo", probs)
    assert (either == np.isin(obj, ["zorb", "kubo"])).mean() >= 0.97
    assert set(judge.draws(images, "zorb or kubo", probs)) == {*world.OBJECTS, "no render"}


# --- kind prompt ------------------------------------------------------------------------------------

def test_a_compositions_pairs_change_only_the_part_the_anchor_changes():
    cfg = load_config("configs/prompt_striped_zorb.yaml")
    w = ToyWorld()
    pairs = w.caption_pairs(cfg.concept, 32, 0)
    assert all(names(c, STRIPE) and names(c, ZORB) for c, _ in pairs)
    assert all(not names(a, STRIPE) and "zorb" in a and "plain" in a for _, a in pairs)
    keep = w.preservation_captions(cfg.concept, 64, 1)
    assert not any(names(c, STRIPE) and names(c, ZORB) for c in keep)
    # each part survives elsewhere: striped non-zorbs and non-striped zorbs are preservation rows
    assert sum(names(c, STRIPE) for c in keep) >= 4 and sum(names(c, ZORB) for c in keep) >= 4
    groups = {g.name: g for g in w.eval_groups(cfg.concept, 16, 3)}
    assert {"target", "anchor", "neighbours.striped", "neighbours.zorb", "neighbours.kubo", "paraphrases"} <= set(groups)
    for part in ("neighbours.striped", "neighbours.zorb"):
        assert not any(names(p, STRIPE) and names(p, ZORB) for p in groups[part].prompts)
    assert all("stripy" in p and "smiling zorb" in p for p in groups["paraphrases"].prompts)  # held-out words
    assert w.anchorize("a checkered green triangle", cfg.concept) == "a plain green triangle"


def test_a_compositions_clip_mask_needs_every_part_named():
    cfg = load_config("configs/prompt_striped_zorb.yaml")
    mask, sim = mask_of(masker(cfg, ToyWorld(), threshold=-0.99),
                        ["a red striped zorb", "a red striped circle", "a blue plain zorb", "a green zorb with stripes"])
    assert mask == [1, 0, 0, 1]
    assert sim[1] == -1.0 and sim[2] == -1.0  # stored, so Tune's re-masking at any threshold keeps them out
    assert masker(config_from_dict({}), ToyWorld()).guard == []  # one concept word: no guard


def test_kind_prompt_needs_a_composition():
    with pytest.raises(ConfigError, match=r"concept\.target: kind prompt removes a composition"):
        config_from_dict({"concept": {"target": "striped", "kind": "prompt"}})


# --- kind unsafe ------------------------------------------------------------------------------------

FACES = {"target": "face characters", "kind": "unsafe", "members": ["zorb", "kubo"],
         "neighbours": ["circle", "square", "dotted"]}


def test_a_category_defaults_to_the_empty_anchor_and_names_each_member():
    cfg = config_from_dict({"concept": FACES})
    c = cfg.concept
    assert c.anchor_kind == "empty" and c.anchor == "" and P.target_concept(c) == "zorb or kubo"
    w = ToyWorld()
    pairs = w.caption_pairs(c, 40, 0)
    assert all(a == "" for _, a in pairs)
    zorbs, kubos = sum("zorb" in t for t, _ in pairs), sum("kubo" in t for t, _ in pairs)
    assert zorbs + kubos == 40 and min(zorbs, kubos) >= 15
    keep = w.preservation_captions(c, 64, 1)
    assert not any("zorb" in k or "kubo" in k for k in keep)
    groups = {g.name: g for g in w.eval_groups(c, 12, 3)}
    assert groups["target"].concept == "zorb or kubo" and "anchor" not in groups
    assert groups["members.zorb"].concept == "zorb" and all("zorb" in p for p in groups["members.zorb"].prompts)
    assert all("kubo" in p for p in groups["members.kubo"].prompts)
    assert {"neighbours.circle", "neighbours.square", "neighbours.dotted"} <= set(groups)


def test_a_categorys_clip_mask_scores_each_member_on_its_own():
    cfg = load_config("configs/unsafe_faces.yaml")
    assert cfg.concept.anchor == "circle" and P.target_concept(cfg.concept) == "zorb or kubo"
    mask, _ = mask_of(masker(cfg, ToyWorld()), ["a red plain zorb", "a blue kubo, dotted", "a red plain circle",
                                                "a green striped square", "a yellow triangle, checkered"])
    assert mask == [1, 1, 0, 0, 0]


def test_a_category_with_a_text_anchor_swaps_every_member_for_it():
    cfg = config_from_dict({"concept": {"target": "faces", "kind": "unsafe", "members": ["zorb", "kubo"],
                                        "anchor": "circle", "neighbours": ["square"]}})
    pairs = ToyWorld().caption_pairs(cfg.concept, 20, 0)
    assert all("circle" in a and "zorb" not in a and "kubo" not in a for _, a in pairs)


def test_a_real_models_category_fills_its_templates_with_each_member():
    cfg = config_from_dict({"concept": {"target": "weapons", "kind": "unsafe", "members": ["a gun", "a knife"],
                                        "templates": ["a photo of {}"], "neighbours": ["a spoon"]}})
    w = PromptWorld()
    assert sorted(t for t, _ in w.caption_pairs(cfg.concept, 2, 0)) == ["a photo of a gun", "a photo of a knife"]
    groups = {g.name: g for g in w.eval_groups(cfg.concept, 2, 0)}
    assert groups["target"].concept == "a gun or a knife"
    assert groups["members.a knife"].prompts == ["a photo of a knife"] * 2
    assert len(w.mask_texts(cfg.concept)) == 2


@pytest.mark.parametrize("concept,field", [
    ({"target": "faces", "kind": "unsafe"}, "concept.members"),
    ({"target": "faces", "kind": "unsafe", "members": ["zorb", " "]}, r"concept\.members\[1\]"),
    ({"target": "striped", "members": ["zorb"]}, "concept.members"),
    ({"target": "zorb", "kind": "memorized"}, "concept.reference_image"),
])
def test_bad_kind_fields_are_named(concept, field):
    with pytest.raises(ConfigError, match=field):
        config_from_dict({"concept": concept})


# --- a small ablation: the composition goes, its parts stay -----------------------------------------

@pytest.mark.slow
def test_a_composition_goes_while_its_parts_stay(tmp_path):
    """kind prompt, in process on the bundled toy model with a small budget: "striped zorb" is no
    longer drawn, striped non-zorbs and zorbs of other patterns still are."""
    import rayablate
    from rayablate.pipeline import load_pipeline

    cfg = load_config("configs/prompt_striped_zorb.yaml")
    pipe = load_pipeline(bundle_paths()["sd"])
    # the small budget: the config's w_pres 30 (for the entangled "striped kubo") needs its 100 steps
    delta = rayablate.ablate(pipe, cfg.concept, config=cfg, steps=STEPS, w_pres=10.0, num_anchor_images=32,
                             num_preservation_images=32, anchor_steps=10, progress=False)
    after = load_pipeline(bundle_paths()["sd"])
    delta.apply(after)
    report = rayablate.evaluate(pipe, after, cfg.concept, config=cfg, num_images=16)
    rate = {g: (m["concept_rate_before"], m["concept_rate_after"]) for g, m in report.items()}
    assert rate["target"][0] >= 0.9 and rate["target"][1] <= 0.15, rate
    for part in ("neighbours.striped", "neighbours.zorb", "anchor"):
        assert rate[part][1] >= 0.85 * rate[part][0], (part, rate)


STEPS = 40
