"""The closed-form edit (method: closed-form): alignment, the least-squares solution, and the toy world."""
from pathlib import Path

import pytest

from rayablate.closed_form import align, closed_form_tensors, edit_data
from rayablate.config import ConfigError, load_config


def test_align_maps_equal_runs_by_position_and_a_replaced_word_to_the_anchors_last_token():
    # "a striped circle <pad> <pad>" vs "a very plain circle <pad>": 'striped' -> the last token of 'very plain'
    target, anchor = [1, 7, 3, 0, 0], [1, 8, 9, 3, 0]
    pairs = align(target, anchor)
    assert (0, 0) in pairs and (2, 3) in pairs and (3, 4) in pairs
    assert (1, 2) in pairs  # the replaced run maps to the anchor run's last token
    assert len({i for i, _ in pairs}) == len(pairs)  # every target position once at most


def test_edit_sends_target_tokens_to_the_anchors_keys_and_keeps_preservation(tiny_pipe):
    pairs = [("a red zorb", "a red circle"), ("a blue zorb", "a blue circle")]
    keep = ["a green square", "a red circle", "a blue circle"]
    data = edit_data(tiny_pipe, pairs, keep)
    tensors = closed_form_tensors(tiny_pipe, data, lam=1.0, ridge=1e-6)
    assert tensors and all(".attn2.to_" in n for n in tensors)
    name = next(iter(tensors))
    w0 = dict(tiny_pipe.unet.named_parameters())[name.split(".", 1)[1]].detach().double()
    w = tensors[name].double()
    from rayablate.closed_form import _token_vectors

    h_t, _ = _token_vectors(tiny_pipe, ["a red zorb"])
    h_a, _ = _token_vectors(tiny_pipe, ["a red circle"])
    h_k, _ = _token_vectors(tiny_pipe, ["a green square"])

    def dist(x, y):
        return float((x - y).norm() / y.norm())
    # the target caption's keys move to the anchor's, far closer than they started
    assert dist(h_t[0] @ w.T, h_a[0] @ w0.T) < 0.5 * dist(h_t[0] @ w0.T, h_a[0] @ w0.T)
    # a preservation caption's keys hardly move
    assert dist(h_k[0] @ w.T, h_k[0] @ w0.T) < 0.1


@pytest.mark.parametrize("config,target,keep", [(None, "striped", ["dotted", "checkered"]),
                                                ("configs/instance_zorb.yaml", "zorb", ["kubo", "square"])])
def test_closed_form_on_the_toy_world_removes_the_target_and_keeps_the_neighbours(config, target, keep):
    import rayablate
    from rayablate.pipeline import load_pipeline
    from rayablate.toyworld import bundle_paths

    path = bundle_paths()["sd"]
    cfg = load_config(config and Path(__file__).resolve().parents[1] / config, {"method": "closed-form"})
    pipe = load_pipeline(path)
    delta = rayablate.ablate(pipe, cfg.concept, config=cfg, progress=False)
    assert delta.metadata["method"] == "closed-form" and delta.metadata["group"] == "xattn-kv"
    after = load_pipeline(path)
    delta.apply(after)
    rep = rayablate.evaluate(pipe, after, cfg.concept, num_images=8, config=cfg, steps=10)
    assert rep["target"]["concept_rate_before"] >= 0.9
    assert rep["target"]["concept_rate_after"] <= 0.05
    for nb in keep:
        g = rep[f"neighbours.{nb}"]
        assert g["concept_rate_after"] >= 0.9 * g["concept_rate_before"], (nb, g)


def test_closed_form_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="^method: unknown method"):
        load_config(None, {"method": "uce"})
    with pytest.raises(ConfigError, match="^method: robust"):
        load_config(None, {"method": "closed-form", "robust": True})
    with pytest.raises(ConfigError, match="^closed_form_lambda"):
        load_config(None, {"method": "closed-form", "closed_form_lambda": -1.0})
    with pytest.raises(ConfigError, match="^robust_inits"):
        load_config(None, {"robust": True, "robust_inits": ["anchor", "sideways"]})
    with pytest.raises(ConfigError, match="^robust_inits"):
        load_config(None, {"robust": True, "robust_inits": []})


def test_training_from_the_closed_form_edit_starts_there(tiny_pipe):
    """init: closed-form: one tiny step from the edit ends next to the edit, far from the base."""
    import rayablate
    from rayablate.closed_form import closed_form_edit
    from rayablate.worlds import world_for

    concept = rayablate.Concept(target="zorb", anchor="circle", neighbours=["square"],
                                templates=["a picture of a {}"])
    kw = dict(steps=1, num_anchor_images=4, num_preservation_images=4, anchor_steps=2, batch_size=4,
              lr_matcher=1e-7, w_adv=0.0, clip_threshold=-1.0, progress=False)
    cfg = rayablate.api._config(concept, None, {k: v for k, v in kw.items() if k != "progress"})
    edit, _ = closed_form_edit(tiny_pipe, cfg, world_for("x"))
    delta = rayablate.ablate(tiny_pipe, concept, init="closed-form", **kw)
    base = dict(tiny_pipe.unet.named_parameters())
    name = next(iter(edit))
    trained, start, w0 = delta.tensors[name], edit[name], base[name.split(".", 1)[1]].detach()
    assert (trained - start).abs().max() < 0.01 * (start - w0).abs().max()
    with pytest.raises(ConfigError, match="^init"):
        rayablate.ablate(tiny_pipe, concept, init="closed-form", param_group="lora", **kw)
