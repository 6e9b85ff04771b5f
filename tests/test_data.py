"""Training data: caption pairs, user pairs and their errors, the Ray Data pipeline."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayablate import prompts as P
from rayablate.toyworld.vocab import ToyWorld
from rayablate.worlds import PromptWorld
from rayablate.config import ConceptSpec, ConfigError, config_from_dict
from rayablate.data import DataError, load_user_rows
from rayablate.images import encode_png
from rayablate.job import shutdown_ray

STYLE = ConceptSpec(target="striped", anchor="plain", neighbours=["dotted", "checkered"])
INSTANCE = ConceptSpec(target="zorb", anchor="circle", kind="instance", neighbours=["kubo", "square"])


def test_style_pairs_swap_the_pattern_for_the_anchor():
    pairs = ToyWorld().caption_pairs(STYLE, 20, 0)
    assert len(pairs) == 20
    for c_star, c in pairs:
        assert "striped" in c_star or "stripes" in c_star
        assert "plain" in c and "stripe" not in c
        assert "stripy" not in c_star  # held-out paraphrase never used in training


def test_instance_pairs_replace_the_anchor_word_by_the_target():
    spec = ConceptSpec(target="Grumpy Cat", anchor="cat", kind="instance", prompts=["a photo of a cat on a sofa"])
    assert PromptWorld().caption_pairs(spec, 1, 0) == [("a photo of a Grumpy Cat on a sofa", "a photo of a cat on a sofa")]
    for c_star, c in ToyWorld().caption_pairs(INSTANCE, 10, 0):
        assert "zorb" in c_star and "zorb" not in c and "circle" in c


def test_style_templates_for_real_models():
    spec = ConceptSpec(target="Van Gogh", anchor="painting", templates=["a house, in the style of {}"])
    assert PromptWorld().caption_pairs(spec, 2, 0) == [("a house, in the style of Van Gogh",
                                                        "a house, in the style of painting")] * 2


def test_no_prompts_for_an_unknown_concept_names_the_field():
    with pytest.raises(ConfigError) as e:
        PromptWorld().caption_pairs(ConceptSpec(target="Van Gogh", anchor="painting"), 4, 0)
    assert e.value.field == "concept.prompts"


@pytest.mark.parametrize("content,msg", [(b"", "empty"), ("caf\xe9".encode("latin-1"), "UTF-8")])
def test_bad_prompt_files(tmp_path, content, msg):
    f = tmp_path / "prompts.txt"
    f.write_bytes(content)
    with pytest.raises(ConfigError, match=msg) as e:
        P.read_prompt_file(f)
    assert e.value.field == "concept.prompt_file"


def img(size=32, value=128):
    return encode_png(np.full((size, size, 3), value, dtype=np.uint8))


def write_parquet(path, table):
    pq.write_table(pa.table(table), path)
    return path


def test_user_parquet_rows_are_validated(tmp_path):
    ok = write_parquet(tmp_path / "ok.parquet", {"image": [img(), img(value=9)], "caption": ["a red circle", "a b"]})
    rows = load_user_rows(ok, STYLE, ToyWorld(), 32)
    assert [r["target_caption"] for r in rows] == ["a red circle", "a b"]
    assert all(r["source"] == "user" for r in rows)


def test_user_parquet_missing_column(tmp_path):
    f = write_parquet(tmp_path / "m.parquet", {"image": [img()]})
    with pytest.raises(DataError, match="lacks column.*caption"):
        load_user_rows(f, STYLE, ToyWorld(), 32)


def test_user_parquet_undecodable_image_names_the_row(tmp_path):
    f = write_parquet(tmp_path / "u.parquet", {"image": [img(), b"not an image"], "caption": ["a", "b"]})
    with pytest.raises(DataError, match="row 1.*undecodable"):
        load_user_rows(f, STYLE, ToyWorld(), 32)


def test_user_parquet_mixed_sizes_name_the_row(tmp_path):
    f = write_parquet(tmp_path / "s.parquet", {"image": [img(), img(size=48)], "caption": ["a", "b"]})
    with pytest.raises(DataError, match="row 1.*48x48"):
        load_user_rows(f, STYLE, ToyWorld(), 32)


def test_user_folder_needs_captions(tmp_path):
    (tmp_path / "a.png").write_bytes(img())
    with pytest.raises(DataError, match="no caption file a.txt"):
        load_user_rows(tmp_path, STYLE, ToyWorld(), 32)
    (tmp_path / "a.txt").write_text("a red striped circle")
    assert load_user_rows(tmp_path, STYLE, ToyWorld(), 32)[0]["anchor_if_ablated"] == "a red plain circle"


def test_a_folder_is_replaced_only_when_its_writer_finishes(tmp_path):
    from rayablate.files import atomic_folder

    out = tmp_path / "shards"
    out.mkdir()
    (out / "old.parquet").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            tmp.mkdir()
            (tmp / "half.parquet").write_text("half")
            raise RuntimeError("writer died")
    assert [p.name for p in out.iterdir()] == ["old.parquet"]  # the old folder stands
    with atomic_folder(out) as tmp:  # the next writer starts from an empty temporary folder
        assert not tmp.exists()
        tmp.mkdir()
        (tmp / "new.parquet").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.parquet"] and not tmp.exists()


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, object_store_memory=256 * 1024 ** 2, include_dashboard=False, log_to_driver=False)
    yield ray
    shutdown_ray()


def test_ray_data_pipeline_writes_masked_shards(ray_local, tiny_sd_path, tiny_clip_path, tmp_path):
    from rayablate.data import build_training_data, data_summary

    cfg = config_from_dict({"num_anchor_images": 8, "num_preservation_images": 4, "anchor_steps": 2,
                            "clip_threshold": -1.0})
    user = write_parquet(tmp_path / "user.parquet", {"image": [img()], "caption": ["a red striped circle"]})
    out = build_training_data(cfg, str(tiny_sd_path), str(tiny_clip_path), tmp_path / "data", ToyWorld(),
                              user_data=str(user))
    rows = pq.read_table(str(out)).to_pylist()
    assert len(rows) == 8 + 4 + 1  # ablation candidates, preservation candidates (num_preservation_images), user rows
    # threshold -1: every row is masked in, but for preservation rows that name a declared neighbour
    # (dotted, checkered) and not the target: the mask never takes those (PromptWorld.mask_protect)
    protected = [r for r in rows if any(w in r["target_caption"] for w in ("dotted", "checkered", "with dots",
                                                                          "with checks", "spotty", "chequered"))
                 and "stripe" not in r["target_caption"]]
    assert protected and all(r["mask"] == 0 and r["clip_sim"] == -1.0 for r in protected)
    assert data_summary(out)["ablation_rows"] == 13 - len(protected)
    assert {"image", "target_caption", "anchor_caption", "mask", "seed", "source", "clip_sim"} <= set(rows[0])
    # masked in, every row takes its anchorized caption; rows that name the target change
    assert all(r["anchor_caption"] == r["anchor_if_ablated"] for r in rows if r not in protected)
    assert all(r["anchor_caption"] != r["target_caption"] for r in rows if "stripe" in r["target_caption"])
    assert sum("stripe" in r["target_caption"] for r in rows) >= 9
    assert not (tmp_path / "data.tmp").exists()
    # threshold 1: nothing is masked in; every row preserves its own caption
    cfg1 = config_from_dict({"num_anchor_images": 8, "anchor_steps": 2, "clip_threshold": 1.0})
    out1 = build_training_data(cfg1, str(tiny_sd_path), str(tiny_clip_path), tmp_path / "data1", ToyWorld())
    rows1 = pq.read_table(str(out1)).to_pylist()
    assert all(r["mask"] == 0 and r["anchor_caption"] == r["target_caption"] for r in rows1)
    # written interleaved (the rows are permuted before they are drawn; no shuffle after masking): both
    # halves of the written order hold ablation candidates (the first 8 seeds) and preservation rows
    first = cfg1.seed * 100003
    ablation = [r["seed"] - first < 8 for r in rows1]
    assert sorted(r["seed"] for r in rows1) == list(range(first, first + len(rows1))) and sum(ablation) == 8
    half = len(rows1) // 2
    assert all(any(part) and not all(part) for part in (ablation[:half], ablation[half:])), ablation
    _local_shards_split_the_canonical_rows(out, out1)


def _local_shards_split_the_canonical_rows(out, out1):
    """Training reads these shards itself on a one-node local Ray (data.LocalShards): every row once,
    ranks disjoint, each rank's rows in the order the in-memory shard cache gives, and a threshold
    re-masks them as Ray Data's apply_threshold does. RAYABLATE_LOCAL_SHARDS=0 keeps Ray Data."""
    import os

    import ray

    from rayablate.data import LocalShards, training_source

    src = training_source(out)
    assert isinstance(src, LocalShards)
    ranks = [src.rank_rows(r, 2) for r in range(2)]
    seeds = [list(r["seed"]) for r in ranks]
    assert sorted(seeds[0] + seeds[1]) == sorted(pq.read_table(str(out)).column("seed").to_pylist())
    assert not set(seeds[0]) & set(seeds[1]) and abs(len(seeds[0]) - len(seeds[1])) <= 1
    whole = src.rank_rows(0, 1)
    assert list(whole["seed"][0::2]) == seeds[0] and list(whole["seed"][1::2]) == seeds[1]
    assert isinstance(whole["image"][0], bytes) and set(whole) >= {"image", "target_caption", "mask"}
    written = pq.read_table(str(out)).column("mask").to_pylist()
    assert int(whole["mask"].sum()) == sum(written)  # as written: threshold -1
    remasked = LocalShards(str(out), clip_threshold=1.0).rank_rows(0, 1)
    assert int(remasked["mask"].sum()) == 0
    assert list(remasked["anchor_caption"]) == list(remasked["target_caption"])
    empty = LocalShards(str(out1)).rank_rows(99, 100)
    assert len(empty["seed"]) == 0  # more ranks than rows: an empty rank
    from rayablate.method import ShardCache

    cache = ShardCache.of_ordered(ranks[1])  # what a worker keeps: its rows as read, not sorted again
    assert list(next(cache.batches(100, None))["seed"]) == seeds[1]
    assert ShardCache.of_ordered(empty).columns is None and not ShardCache.of_ordered(empty).ok
    os.environ["RAYABLATE_LOCAL_SHARDS"] = "0"
    try:
        assert isinstance(training_source(out), ray.data.Dataset)
    finally:
        del os.environ["RAYABLATE_LOCAL_SHARDS"]
    assert isinstance(training_source(out, limit_mb=0), ray.data.Dataset)  # over the shard cache: Ray Data


def test_a_data_stage_that_keeps_no_rows_says_so_and_leaves_nothing(ray_local, tmp_path):
    import ray

    from rayablate.data import DataError, write_shards

    ds = ray.data.from_items([{"seed": 1, "mask": 1}]).map_batches(lambda b: {k: v[:0] for k, v in b.items()})
    with pytest.raises(DataError, match="kept no rows"):
        write_shards(ds, tmp_path / "data")
    assert not (tmp_path / "data").exists() and not (tmp_path / "data.tmp").exists()
    write_shards(ray.data.from_items([{"seed": 1, "mask": 1}]), tmp_path / "data")
    assert pq.read_table(str(tmp_path / "data")).to_pylist() == [{"seed": 1, "mask": 1}]


def test_sampler_batches_are_balanced_across_the_actor_pool():
    from rayablate.sampling import balanced_batch_size

    for rows in (96, 100, 7):  # one actor: the in-process API's batches, so its anchor images are the job's
        assert balanced_batch_size(rows, 1, 16) == 16
    for rows, actors, largest in [(160, 2, 32), (96, 2, 16), (7, 2, 32), (1, 4, 32), (1000, 3, 32)]:
        b = balanced_batch_size(rows, actors, largest)
        batches = -(-rows // b)
        assert 1 <= b <= largest
        assert batches % actors == 0 or batches < actors  # every actor gets as many batches
        assert b * (batches - 1) < rows  # no empty batch


def test_a_jobs_evaluation_uses_both_cores_on_cpu_and_one_sampler_per_gpu():
    from rayablate.job import EVAL_CPU_ACTORS, evaluation_actors

    assert evaluation_actors(config_from_dict({}), 1) == EVAL_CPU_ACTORS == 2
    assert evaluation_actors(config_from_dict({}), 3) == 3
    import dataclasses

    assert evaluation_actors(dataclasses.replace(config_from_dict({}), use_gpu=True), 1) == 1


# --- anchor kinds ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["empty", "blank", "noise"])
def test_anchor_kinds_without_a_word_build_rows_with_the_empty_anchor_caption(kind):
    """No anchor word: every ablation row's anchor caption is "" (the empty prompt; for image anchors
    the caption the images are generated from when a row is kept), a preservation row that the CLIP
    mask flags is anchored to "" too, and there is no anchor group to evaluate."""
    from rayablate.data import prompt_rows

    cfg = config_from_dict({"concept": {"anchor_kind": kind}, "num_anchor_images": 12, "num_preservation_images": 6})
    assert cfg.concept.anchor == "" and (cfg.match == "noise") == (kind != "empty")
    for world in (ToyWorld(), PromptWorld()):
        if type(world) is PromptWorld:
            cfg.concept.templates = ["a house, in the style of {}"]
            cfg.concept.neighbours = ["cubism"]
        rows = prompt_rows(cfg, world)
        abl = rows[:12]
        assert all(r["anchor_caption"] == "" and r["anchor_if_ablated"] == "" for r in abl)
        assert all("striped" in r["target_caption"] or "stripes" in r["target_caption"] for r in abl)
        assert all(r["anchor_if_ablated"] == "" and r["anchor_caption"] == r["target_caption"] for r in rows[12:])
        assert "anchor" not in [g.name for g in world.eval_groups(cfg.concept, 4, 0)]


@pytest.mark.parametrize("kind", ["text", "empty", "blank", "noise"])
def test_image_anchors_replace_the_ablation_rows_images_at_the_models_resolution(kind, tiny_sd_path):
    """blank: a white canvas, noise: uniform noise drawn per (rank, step), in every ablation row (mask 1)
    and in no other; text and empty keep the generated images."""
    import torch

    from rayablate.method import Ablation
    from rayablate.pipeline import load_pipeline

    data = {"concept": {"anchor_kind": kind}} if kind != "text" else {}
    ab = Ablation(load_pipeline(tiny_sd_path), config_from_dict({**data, "w_adv": 0.0}))
    res = ab.vae.config.sample_size if hasattr(ab.vae.config, "sample_size") else 32
    images = torch.rand(4, 3, res, res) * 0.2 - 0.1  # stand-ins for generated images
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    out = ab.anchor_images(images, mask, step=3)
    assert out.shape == images.shape
    assert torch.equal(out[1], images[1]) and torch.equal(out[3], images[3])
    if kind in ("text", "empty"):
        assert torch.equal(out, images)
    elif kind == "blank":
        assert torch.equal(out[[0, 2]], torch.ones(2, 3, res, res))
    else:
        rows = out[[0, 2]]
        assert rows.min() >= -1 and rows.max() <= 1 and rows.std() > 0.5  # uniform on [-1, 1]: std 0.577
        assert not torch.equal(rows[0], rows[1])
        assert torch.equal(ab.anchor_images(images, mask, step=3), out)  # the same (rank, step): the same noise
        assert not torch.equal(ab.anchor_images(images, mask, step=4), out)


def test_the_base_image_cache_serves_a_second_job_without_a_sampler(ray_local, tiny_sd_path, tiny_clip_path,
                                                                      tmp_path, monkeypatch):
    """The frozen model's anchor and before-images are drawn once: a second build and evaluation read
    them from the cache (the same pixels) and start no sampler."""
    import dataclasses

    import rayablate.sampling as S
    from rayablate.data import build_training_data
    from rayablate.evaluation import generate_before_after
    from rayablate.image_cache import ENV, BaseImageCache

    monkeypatch.setenv(ENV, str(tmp_path / "cache"))
    cfg = config_from_dict({"num_anchor_images": 6, "num_preservation_images": 4, "anchor_steps": 2,
                            "eval_images": 3, "eval_steps": 2})
    first = build_training_data(cfg, str(tiny_sd_path), str(tiny_clip_path), tmp_path / "a", ToyWorld())
    assert len(list((tmp_path / "cache").rglob("*.png"))) == 10
    groups = ToyWorld().eval_groups(cfg.concept, cfg.eval_images, cfg.eval_seed)
    drawn = generate_before_after(groups, str(tiny_sd_path), None, cfg, cfg.eval_seed)
    assert len(list((tmp_path / "cache").rglob("*.png"))) == 10 + sum(len(g.prompts) for g in groups)
    # rows are served one by one: with two before-images gone, those two are drawn again, the same pixels
    cache = BaseImageCache.for_model(str(tiny_sd_path), precision=cfg.sample_precision)
    for i in (0, 2):
        cache._file(groups[0].prompts[i], S.prompt_seed(cfg.eval_seed, i), cfg.eval_steps, cfg.guidance_scale).unlink()
    partly = generate_before_after(groups, str(tiny_sd_path), None, cfg, cfg.eval_seed)
    assert len(list((tmp_path / "cache").rglob("*.png"))) == 10 + sum(len(g.prompts) for g in groups)
    for g in groups:
        assert np.array_equal(partly[g.name]["before"], drawn[g.name]["before"])

    def no_sampler(*a, **k):
        raise AssertionError("a sampler was started although the cache holds every image")

    monkeypatch.setattr(S, "sample_dataset", no_sampler)
    # another CLIP threshold: the same images, served by the image cache, masked again by Ray Data
    second = build_training_data(dataclasses.replace(cfg, clip_threshold=cfg.clip_threshold + 0.01),
                                 str(tiny_sd_path), str(tiny_clip_path), tmp_path / "b", ToyWorld())
    by_seed = lambda p: {r["seed"]: r["image"] for r in pq.read_table(str(p)).to_pylist()}  # noqa: E731
    assert by_seed(first) == by_seed(second)
    served = generate_before_after(groups, str(tiny_sd_path), None, cfg, cfg.eval_seed)
    for g in groups:
        assert np.array_equal(served[g.name]["before"], drawn[g.name]["before"])
    # another sampler setting is another image: drawn, not served
    with pytest.raises(AssertionError, match="a sampler was started"):
        generate_before_after(groups, str(tiny_sd_path), None, dataclasses.replace(cfg, eval_steps=3), cfg.eval_seed)
    # and so is another precision (sample_precision; "auto" is one of the two on any machine)
    other = "fp32" if S.resolve_sample_precision(cfg.sample_precision) == "bf16" else "bf16"
    with pytest.raises(AssertionError, match="a sampler was started"):
        generate_before_after(groups, str(tiny_sd_path), None, dataclasses.replace(cfg, sample_precision=other),
                              cfg.eval_seed)
    monkeypatch.setenv(ENV, "off")
    with pytest.raises(AssertionError, match="a sampler was started"):
        generate_before_after(groups, str(tiny_sd_path), None, cfg, cfg.eval_seed)


def test_an_exact_rerun_copies_the_data_stages_shards_from_the_data_cache(ray_local, tiny_sd_path, tiny_clip_path,
                                                                           tmp_path, monkeypatch):
    """The first build stores its shards under the key of its rows, images, CLIP and mask settings; an
    exact rerun copies them and starts no Ray Data pipeline; any change of those is another key."""
    import dataclasses

    import ray

    from rayablate.data import build_training_data, data_cache_dir, masker_kwargs, prompt_rows
    from rayablate.image_cache import ENV, BaseImageCache

    monkeypatch.setenv(ENV, str(tmp_path / "cache"))
    world = ToyWorld()
    cfg = config_from_dict({"num_anchor_images": 6, "num_preservation_images": 4, "anchor_steps": 2})
    first = build_training_data(cfg, str(tiny_sd_path), str(tiny_clip_path), tmp_path / "a", world)
    stored = list((tmp_path / "cache" / "data").glob("*/_SUCCESS"))
    assert len(stored) == 1

    def no_ray_data(*a, **k):
        raise AssertionError("a Ray Data pipeline was started although the data cache holds these shards")

    monkeypatch.setattr(ray.data, "from_items", no_ray_data)
    again = build_training_data(cfg, str(tiny_sd_path), str(tiny_clip_path), tmp_path / "b", world)
    rows = lambda p: sorted(pq.read_table(str(p)).to_pylist(), key=lambda r: r["seed"])  # noqa: E731
    assert rows(again) == rows(first) and len(rows(first)) == 10
    assert (again / "_SUCCESS").exists() and not (tmp_path / "b.tmp").exists()
    # the key: anything that changes the shards is another folder
    cache = BaseImageCache.for_model(str(tiny_sd_path), precision=cfg.sample_precision)

    def key(c, clip=str(tiny_clip_path), cache=cache):
        return data_cache_dir(cache, prompt_rows(c, world), c, masker_kwargs(c, world, clip))

    assert key(cfg) == stored[0].parent
    changed = [dataclasses.replace(cfg, clip_threshold=0.5), dataclasses.replace(cfg, seed=cfg.seed + 1),
               dataclasses.replace(cfg, anchor_steps=3), dataclasses.replace(cfg, num_preservation_images=5)]
    assert len({key(c) for c in changed} | {key(cfg)}) == 5
    assert key(cfg, clip="org/a-hub-clip") is None and key(cfg, cache=None) is None
    with pytest.raises(AssertionError, match="a Ray Data pipeline was started"):  # a miss runs the pipeline
        build_training_data(changed[0], str(tiny_sd_path), str(tiny_clip_path), tmp_path / "c", world)


def test_the_image_cache_key_follows_the_models_bytes(tmp_path, monkeypatch):
    import shutil

    from rayablate.image_cache import ENV, BaseImageCache, model_fingerprint
    from rayablate.toyworld import bundle_paths

    model = tmp_path / "sd"
    shutil.copytree(bundle_paths()["sd"], model)
    before = model_fingerprint(model)
    assert before == model_fingerprint(model) and len(before) == 64
    cfg_file = model / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(cfg_file.read_text().replace("}", ', "x": 1}', 1))
    assert model_fingerprint(model) != before  # an edited file is another model: no stale image
    assert model_fingerprint("org/some-hub-model") is None and model_fingerprint(tmp_path / "absent") is None
    monkeypatch.setenv(ENV, str(tmp_path / "c"))
    cache = BaseImageCache.for_model(model)
    cache.put("a red circle", 3, 20, 4.0, b"png")
    assert cache.get("a red circle", 3, 20, 4.0) == b"png"
    assert cache.get("a red circle", 4, 20, 4.0) is None and cache.get("a red circle", 3, 10, 4.0) is None
    assert BaseImageCache.for_model(model, use_gpu=True).get("a red circle", 3, 20, 4.0) is None
    assert cache.pngs([{"prompt": "a red circle", "seed": 3}, {"prompt": "a blue circle", "seed": 3}],
                      "prompt", 20, 4.0) == [b"png", None]  # served row by row: only the missing one is drawn
    monkeypatch.setenv(ENV, "off")
    assert BaseImageCache.for_model(model) is None


def test_the_sampler_draws_only_the_rows_without_an_image(tiny_pipe):
    """A row that arrives with PNG bytes in an output column (from the base-image cache) keeps them
    byte for byte; the other rows are drawn, as they would be without the cache."""
    from rayablate.images import decode_png
    from rayablate.sampling import Sampler

    sentinel = img(value=7)
    sampler = Sampler.of_pipes({"image": tiny_pipe}, steps=2, guidance=4.0)
    batch = {"prompt": np.array(["a red circle", "a blue square", "a red circle"], dtype=object),
             "seed": np.array([1, 2, 1]), "image": np.array([b"", sentinel, b""], dtype=object)}
    out = sampler(dict(batch))["image"]
    assert out[1] == sentinel
    drawn = [decode_png(out[0]), decode_png(out[2])]
    assert np.array_equal(drawn[0], drawn[1]) and not np.array_equal(drawn[0], decode_png(sentinel))
    fresh = sampler({"prompt": batch["prompt"][:1], "seed": batch["seed"][:1]})["image"]
    assert np.array_equal(decode_png(fresh[0]), drawn[0])


def test_images_are_drawn_in_the_sample_precision_and_auto_is_bf16_only_on_a_native_bf16_cpu(tiny_pipe):
    """bf16 draws the same seeds under bf16 autocast: close to fp32's pixels, not the same ones;
    "auto" draws bf16 exactly where the CPU computes bf16 natively, and fp32 on a GPU."""
    from rayablate.images import decode_png
    from rayablate.sampling import Sampler, native_bf16_cpu, resolve_sample_precision, sample_images

    prompts, seeds = ["a red circle", "a blue striped square"], [1, 2]
    fp32 = sample_images(tiny_pipe, prompts, seeds, 2, 4.0, precision="fp32")
    bf16 = sample_images(tiny_pipe, prompts, seeds, 2, 4.0, precision="bf16")
    assert not np.array_equal(fp32, bf16) and np.abs(fp32.astype(int) - bf16).mean() < 3
    assert str(next(tiny_pipe.unet.parameters()).dtype) == "torch.float32"  # the weights stay fp32
    auto = sample_images(tiny_pipe, prompts, seeds, 2, 4.0, precision="auto")
    assert np.array_equal(auto, bf16 if native_bf16_cpu() else fp32)
    assert resolve_sample_precision("auto", use_gpu=True) == "fp32"
    sampler = Sampler.of_pipes({"image": tiny_pipe}, steps=2, guidance=4.0, precision="bf16")  # the actors' path
    out = sampler({"prompt": np.array(prompts, dtype=object), "seed": np.array(seeds)})["image"]
    assert np.array_equal(np.stack([decode_png(p) for p in out]), bf16)
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        resolve_sample_precision("fp16")


def test_the_data_stages_one_sampler_draws_on_every_core_of_the_node(ray_local):
    """On 2 CPUs the driver's data stage's one sampler actor draws on both cores (its CLIP actor waits
    for the rows meanwhile); two actors share them; a GPU sampler, or one of a data stage run inside
    Ray, keeps one thread."""
    import torch

    from rayablate.resources import sampler_threads
    from rayablate.sampling import Sampler

    assert sampler_threads(1, use_gpu=False) == 2
    assert sampler_threads(2, use_gpu=False) == 1
    assert sampler_threads(1, use_gpu=True) == 1

    @ray_local.remote(num_cpus=0)
    def in_a_task():  # a batch's concept run, a Tune trial: data stages that may run side by side
        from rayablate.resources import sampler_threads

        return sampler_threads(1, use_gpu=False)

    assert ray_local.get(in_a_task.remote()) == 1
    before = torch.get_num_threads()
    try:
        Sampler("unused", {"image": None}, threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
