"""Ray Train + DeepSpeed training of the matcher: replicas, parameter group, a worker killed by its
pid and restarted from its checkpoint (bit for bit), robust mode's resume, non-finite losses.

One Ray instance (2 CPUs) serves the whole module; every run is a few steps of the tiny pipeline.
tests/test_faults.py interrupts the driver itself.
"""
import io
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from local_ray import start_local_ray
from rayablate.job import shutdown_ray
import torch

from rayablate.config import AblationConfig, to_dict
from rayablate.faults import Faults
from rayablate.train import DELTA_NAME, METRICS_NAME, TERMS

ROWS = 16


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _rows(n: int = ROWS) -> list[dict]:
    """Ablation rows (c*, c) and preservation rows (c_i, c_i), in pairs: every shard and batch gets both."""
    shapes = ("circle", "square", "triangle", "star")
    rows = []
    for i in range(n):
        shape = shapes[i % len(shapes)]
        if i % 4 < 2:
            target, anchor, mask = f"a striped {shape}", f"a plain {shape}", 1
        else:
            target = anchor = f"a red dotted {shape}"
            mask = 0
        rows.append({"image": _png(i), "target_caption": target, "anchor_caption": anchor, "mask": mask, "seed": i})
    return rows


def _cfg(**kw) -> AblationConfig:
    base = dict(steps=4, batch_size=4, num_workers=1, zero_stage=2, report_every=2, checkpoint_every=4,
                lr_matcher=1e-3, lr_disc=2e-4, seed=0)
    base.update(kw)
    return AblationConfig(**base)


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    # the workers' JIT-compiled C++ ops go to an empty folder of this module (they inherit the env)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.mktemp("torch_extensions")))
        ray = start_local_ray(200)
        yield ray
        shutdown_ray()


@pytest.fixture(scope="module")
def train_ds(ray_session):
    return ray_session.data.from_items(_rows())


def _two_worker_cfg(**kw) -> AblationConfig:
    """2 workers x 8 rows, batch 2: 4 steps per epoch, so the checkpoint at step 3 falls mid-epoch."""
    base = dict(num_workers=2, zero_stage=2, batch_size=2, steps=6, checkpoint_every=3, report_every=3)
    base.update(kw)
    return _cfg(**base)


@pytest.fixture(scope="module")
def reference_run(ray_session, train_ds, tiny_sd_path, tmp_path_factory):
    """An uninterrupted 6-step run on 2 workers with ZeRO-2."""
    from rayablate.train import run_training

    from rayablate.evaluation import after_image_plan
    from rayablate.toyworld.vocab import ToyWorld

    from rayablate.image_cache import ENV

    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:  # the evaluation's after-images and, with no image cache,
        mp.setenv(ENV, "off")                 # every before-image: drawn by the workers
        plan = after_image_plan(_two_worker_cfg(**EVAL), ToyWorld(), 2, str(tiny_sd_path))
    assert plan["before"] == list(range(len(plan["prompts"])))
    return run_training(_two_worker_cfg(), train_ds, str(tiny_sd_path), str(out), run_name="reference",
                        after_images=plan)


EVAL = dict(eval_images=2, eval_steps=2)  # the reference run's evaluation: 2 images a group, 2 sampler steps


def test_objective_skips_zero_weight_terms_and_sums_weighted_terms(tiny_sd_path, monkeypatch):
    """No Ray: weight 0 means no rows in a forward for that term; every term of a step comes from
    one forward of the matcher and one of the frozen model, with the terms of a forward per request;
    the total is the weighted sum."""
    from rayablate import method
    from rayablate.method import Ablation
    from rayablate.pipeline import load_pipeline

    batch_rows = _rows(4)  # 2 ablation rows, 2 preservation rows
    batch = {k: np.array([r[k] for r in batch_rows], dtype=object if k != "mask" else np.int64)
             for k in batch_rows[0]}
    calls = {"student": [], "teacher": []}  # the rows of each UNet forward

    def count(name):
        def hook(_, args, kwargs, output):
            calls[name].append(len(args[0]))
        return hook

    def run(cfg, perturb: bool = False):
        """loss_terms of one batch under `cfg`, recording the student's and the teacher's UNet forwards."""
        w = Ablation(load_pipeline(tiny_sd_path), cfg)
        if perturb:  # move the matcher off eps_0, or a preservation-type term is exactly 0
            with torch.no_grad():
                for p in w.trainable_parameters():
                    p.add_(0.05 * torch.randn_like(p))
        calls.update(student=[], teacher=[])
        w.student.unet.register_forward_hook(count("student"), with_kwargs=True)
        w.teacher.unet.register_forward_hook(count("teacher"), with_kwargs=True)
        return w, w.loss_terms(w.batch_tensors(batch), step=1)

    w, out = run(_cfg(match="noise", w_reg=0.0, w_pres=0.0, w_con=0.0, w_adv=0.0))
    assert calls == {"student": [4], "teacher": []}
    assert out["disc"] is None and w.disc is None
    assert {k: v.item() for k, v in out["terms"].items() if k != "match"} == {k: 0.0 for k in TERMS if k != "match"}
    assert out["total"].item() == pytest.approx(out["terms"]["match"].item())

    every = _cfg(w_match=1.0, w_reg=0.5, w_pres=2.0, w_con=0.1, w_adv=0.02)
    torch.manual_seed(0)
    _, out = run(every, perturb=True)
    # student: c* (all rows) + c (ablation rows, regularizer); teacher: c (all rows) + c* (ablation rows, contrastive)
    assert calls == {"student": [4 + 2], "teacher": [4 + 2]}
    terms = {k: v.item() for k, v in out["terms"].items()}
    assert all(v > 0 for k, v in terms.items()), terms
    expected = terms["match"] + 0.5 * terms["reg"] + 2.0 * terms["pres"] + 0.1 * terms["con"] + 0.02 * terms["adv"]
    assert out["total"].item() == pytest.approx(expected, rel=1e-6)
    assert out["disc"] is not None and torch.isfinite(out["disc"])
    # the same terms with a forward per request (the UNet mixes no rows)
    batched = method._forward

    def one_by_one(model, z_t, t, requests, inputs):
        return [p for r in requests for p in batched(model, z_t, t, [r], inputs)]

    monkeypatch.setattr(method, "_forward", one_by_one)
    torch.manual_seed(0)
    _, alone = run(every, perturb=True)
    assert calls == {"student": [4, 2], "teacher": [4, 2]}
    for k, v in out["terms"].items():
        assert alone["terms"][k].item() == pytest.approx(v.item(), rel=1e-4, abs=1e-7), k
    monkeypatch.setattr(method, "_forward", batched)

    # unconditional preservation: the "" caption on all rows, in both forwards
    _, out = run(_cfg(match="noise", w_reg=0.0, w_pres=0.0, w_con=0.0, w_adv=0.0, w_uncond=3.0), perturb=True)
    assert calls == {"student": [4 + 4], "teacher": [4]}
    terms = {k: v.item() for k, v in out["terms"].items()}
    assert terms["uncond"] > 0
    assert out["total"].item() == pytest.approx(terms["match"] + 3.0 * terms["uncond"], rel=1e-6)

    # negative guidance: the match's target moves away from eps_0(c*), c* on the ablation rows in the teacher's forward
    only_match = dict(w_reg=0.0, w_pres=0.0, w_con=0.0, w_adv=0.0)
    match = {}
    for eta in (0.0, 0.0, 1.0):
        torch.manual_seed(0)  # the same perturbation each time: only eta differs
        _, out = run(_cfg(negative_guidance=eta, **only_match), perturb=True)
        assert calls == {"student": [4], "teacher": [4 + 2] if eta else [4]}
        match.setdefault(eta, []).append(out["terms"]["match"].item())
    assert match[0.0][0] == pytest.approx(match[0.0][1], rel=1e-6)
    assert match[1.0][0] != pytest.approx(match[0.0][0], rel=1e-3)
    # ... and the contrastive term reuses that eps_0(c*) instead of asking for it again
    _, out = run(_cfg(negative_guidance=1.0, **{**only_match, "w_con": 0.1}), perturb=True)
    assert calls == {"student": [4], "teacher": [4 + 2]}
    assert out["terms"]["con"].item() > 0


def test_shard_cache_order_is_canonical_and_each_epoch_is_a_seeded_permutation():
    """No Ray: the in-memory shard behind epochs 2+ does not depend on the order Ray Data delivered
    the rows in (so a run resumed in a later epoch sees the same batches), and gives up past its limit."""
    from rayablate.method import ShardCache

    rows = _rows(10)
    cols = {k: np.array([r[k] for r in rows], dtype=object if k != "mask" else np.int64) for k in rows[0]}

    def cache_of(order, batch):
        c = ShardCache(1e9)
        for i in range(0, len(order), batch):
            c.add({k: v[order[i:i + batch]] for k, v in cols.items()})
        c.finish()
        return c

    a = cache_of(np.arange(10), 3)
    b = cache_of(np.random.default_rng(1).permutation(10), 4)
    assert a.ok and b.ok
    for k in cols:
        assert list(a.columns[k]) == list(b.columns[k]), k
    ea = [list(x["seed"]) for x in a.batches(4, seed=7)]
    eb = [list(x["seed"]) for x in b.batches(4, seed=7)]
    assert ea == eb and [len(x) for x in ea] == [4, 4, 2]
    assert sorted(sum(ea, [])) == sorted(cols["seed"].tolist())
    assert [list(x["seed"]) for x in a.batches(4, seed=8)] != ea  # another epoch, another order
    small = cache_of(np.arange(10), 3)
    tiny = ShardCache(100)  # bytes: one PNG is already more
    tiny.add({k: v[:2] for k, v in cols.items()})
    tiny.finish()
    assert small.ok and not tiny.ok and tiny.columns is None


def test_two_workers_zero2_keep_identical_replicas(reference_run):
    res = reference_run
    hashes = res["replica_hashes"]  # rank 0 gathers every rank's hash of its live matcher + discriminator
    assert len(hashes) == 2 and hashes[0] == hashes[1], hashes
    assert res["start_step"] == 0 and res["final_step"] == 6 and res["worker_restarts"] == 0
    assert [m["step"] for m in res["metrics"]] == [3, 6]
    for m in res["metrics"]:
        assert all(np.isfinite(m[k]) and m[k] > 0 for k in ("loss", "disc") + TERMS), m
        assert 0 < m["ablation_rows"] < 1
    assert res["metrics_path"].endswith(METRICS_NAME) and res["delta_path"].endswith(DELTA_NAME)
    with open(res["metrics_path"]) as f:
        assert json.load(f) == res["metrics"]


def test_the_deepspeed_engines_compile_no_cpp_op_on_cpu(reference_run):
    # DeepSpeed's CPU shared-memory collective compiled on the first engine of every new virtual
    # environment (30-40 s); training never calls it (train.skip_shm_collective)
    built = list(Path(os.environ["TORCH_EXTENSIONS_DIR"]).rglob("*.so"))
    assert reference_run["final_step"] == 6 and built == [], built


ENGINES_IN_A_FRESH_PROCESS = """
import json, os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch
import torch.distributed as dist
from rayablate.config import AblationConfig
from rayablate.method import Ablation
from rayablate.pipeline import load_pipeline
from rayablate.train import EngineOptimizers

dist.init_process_group("gloo", rank=0, world_size=1)
cfg = AblationConfig(steps=2, batch_size=2, num_workers=1, zero_stage=2)
engines = EngineOptimizers(Ablation(load_pipeline(sys.argv[1]), cfg, torch.device("cpu"), 0, 64))
print(json.dumps({"zero": engines.matcher.zero_optimization_stage(), "disc": engines.disc is not None,
                  "inductor": "torch._inductor.compile_fx" in sys.modules,
                  "env": os.environ.get("TORCHDYNAMO_DISABLE")}))
"""


@pytest.mark.parametrize("user_env", [None, "0"])
def test_the_deepspeed_engines_set_up_without_importing_torchinductor(tiny_sd_path, user_env):
    # ZeRO's optimizer check imports DeepSpeed's Muon module, whose @torch.compile decorators imported
    # TorchInductor (1.1 s of a worker's 1.5 s of engine set-up): train.no_compile_on_import. A user's
    # own TORCHDYNAMO_DISABLE is left as it is (with "0" the import happens, as without rayablate).
    import socket
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    if user_env is not None:
        env["TORCHDYNAMO_DISABLE"] = user_env
    with socket.socket() as s:  # a free port for the one-rank gloo group
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = subprocess.run([sys.executable, "-c", ENGINES_IN_A_FRESH_PROCESS, str(tiny_sd_path), port], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["zero"] == 2 and res["disc"]
    assert res["inductor"] is (user_env == "0") and res["env"] == user_env, res


def test_trained_delta_changes_only_the_xattn_kv_group(reference_run, tiny_sd_path):
    from rayablate.pipeline import apply_delta, group_parameter_names, load_pipeline, read_delta

    _, meta = read_delta(reference_run["delta_path"])
    assert meta["group"] == "xattn-kv" and meta["step"] == "6"
    pipe = load_pipeline(tiny_sd_path)
    params = lambda: {f"{c}.{n}": p.detach().clone() for c, m in  # noqa: E731
                      (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)) for n, p in m.named_parameters()}
    before = params()
    apply_delta(pipe, reference_run["delta_path"])
    after = params()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    group = set(group_parameter_names(pipe, "xattn-kv"))
    assert changed, "training changed nothing"
    assert changed <= group, sorted(changed - group)


def test_the_workers_after_images_are_the_evaluations_own_and_it_draws_none_itself(reference_run, tiny_sd_path,
                                                                                    monkeypatch, tmp_path):
    """Once trained, the two ranks draw the evaluation's after-images from the final delta and its
    before-images from the base model; the evaluation uses them (it never loads a model: the path it
    is given does not exist) and they are the pixels its own sampler actors draw. Images for other
    rows or settings are not used."""
    import dataclasses

    from rayablate.evaluation import generate_before_after
    from rayablate.image_cache import ENV
    from rayablate.pipeline import DeltaError
    from rayablate.toyworld.vocab import ToyWorld

    monkeypatch.setenv(ENV, "off")
    after = reference_run["after_images"]
    cfg = _two_worker_cfg(**EVAL)
    groups = ToyWorld().eval_groups(cfg.concept, cfg.eval_images, cfg.eval_seed)
    assert after is not None and len(after["pngs"]) == sum(len(g.prompts) for g in groups) == 2 * len(groups)
    assert after["seconds"] > 0 and sorted(after["before"]) == list(range(len(after["pngs"])))
    missing = str(Path(reference_run["delta_path"]).with_name("no_such_delta.safetensors"))
    used = generate_before_after(groups, str(tmp_path / "no_model"), missing, cfg, cfg.eval_seed, after_images=after)
    drawn = generate_before_after(groups, str(tiny_sd_path), reference_run["delta_path"], cfg, cfg.eval_seed,
                                  num_actors=2)
    for g in groups:
        assert np.array_equal(used[g.name]["after"], drawn[g.name]["after"]), g.name
        assert np.array_equal(used[g.name]["before"], drawn[g.name]["before"]), g.name
    assert any(not np.array_equal(drawn[g.name]["after"], drawn[g.name]["before"]) for g in groups)
    with pytest.raises(Exception, match="no_such_delta") as err:  # other sampler steps: drawn, so the delta is read
        generate_before_after(groups, str(tiny_sd_path), missing, dataclasses.replace(cfg, eval_steps=3),
                              cfg.eval_seed, after_images=after)
    assert "DeltaError" in str(err.value) or isinstance(err.value, DeltaError)


def test_the_workers_before_images_go_to_the_image_cache_and_the_next_plan_skips_them(reference_run, tiny_sd_path,
                                                                                      monkeypatch, tmp_path):
    """With the base-image cache on, the before-images the workers drew are kept there (the
    evaluation then reads them as a warm job would), and the next job's plan asks the workers for
    none of them; a row the cache lacks is asked for again."""
    from rayablate.evaluation import after_image_plan, eval_rows, generate_before_after
    from rayablate.image_cache import ENV, BaseImageCache
    from rayablate.toyworld.vocab import ToyWorld

    monkeypatch.setenv(ENV, str(tmp_path / "cache"))
    cfg = _two_worker_cfg(**EVAL)
    groups = ToyWorld().eval_groups(cfg.concept, cfg.eval_images, cfg.eval_seed)
    rows = eval_rows(groups, cfg.eval_seed)
    assert after_image_plan(cfg, ToyWorld(), 2, str(tiny_sd_path))["before"] == list(range(len(rows)))
    missing = str(Path(reference_run["delta_path"]).with_name("no_such_delta.safetensors"))
    used = generate_before_after(groups, str(tiny_sd_path), missing, cfg, cfg.eval_seed,
                                 after_images=reference_run["after_images"])
    cache = BaseImageCache.for_model(str(tiny_sd_path), precision=cfg.sample_precision)
    held = cache.pngs(rows, "prompt", cfg.eval_steps, cfg.guidance_scale)
    assert held == [reference_run["after_images"]["before"][i] for i in range(len(rows))]
    assert all(used[g.name]["before"].shape[0] == len(g.prompts) for g in groups)
    assert after_image_plan(cfg, ToyWorld(), 2, str(tiny_sd_path))["before"] == []
    cache._file(rows[3]["prompt"], rows[3]["seed"], cfg.eval_steps, cfg.guidance_scale).unlink()
    assert after_image_plan(cfg, ToyWorld(), 2, str(tiny_sd_path))["before"] == [3]


def test_after_images_that_cannot_be_drawn_leave_the_run_finished(ray_session, train_ds, tiny_sd_path, tmp_path):
    """Drawing the evaluation's images comes after the last checkpoint: its failure on every rank
    costs the images (the evaluation draws its own), not the trained run."""
    from rayablate.train import run_training

    plan = {"prompts": ["a red plain circle"] * 4, "seeds": [0, 1, 2, 3], "steps": 2, "guidance": "not a number",
            "batch_size": 2, "precision": "fp32", "key": "k"}
    res = run_training(_two_worker_cfg(steps=2, checkpoint_every=2, report_every=2), train_ds, str(tiny_sd_path),
                       str(tmp_path), run_name="undrawable", after_images=plan)
    assert res["final_step"] == 2 and Path(res["delta_path"]).exists()
    assert res["after_images"] is None
    log = (tmp_path / "logs" / "rank1.log").read_text()
    assert "rank 1 could not draw its after-images" in log and "not a number" in log


def test_a_finished_run_is_not_started_again(reference_run, train_ds, tiny_sd_path):
    """Rerunning a finished run (a rerun job, Tune's last rung) reuses its last checkpoint without a
    worker group; a changed training setting does not."""
    from rayablate.pipeline import read_delta
    from rayablate.train import _finished_run, run_training

    out = Path(reference_run["delta_path"]).parent
    before = read_delta(reference_run["delta_path"])[0]
    t = time.time()
    again = run_training(_two_worker_cfg(eval_seed=7), train_ds, str(tiny_sd_path), str(out), run_name="reference")
    assert again.get("already_trained") and again["final_step"] == 6 and time.time() - t < 5
    assert again["metrics"] == reference_run["metrics"]
    after = read_delta(again["delta_path"])[0]
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    run_dir = out / "ray" / "reference"
    assert _finished_run(run_dir, _two_worker_cfg(), out) is not None
    assert _finished_run(run_dir, _two_worker_cfg(lr_matcher=2e-3), out) is None
    assert _finished_run(run_dir, _two_worker_cfg(steps=9), out) is None


def _registered_checkpoints(run_dir: Path) -> list[str]:
    """The checkpoint folders Ray Train's snapshot of the run lists (registered, not half-written)."""
    from rayablate.train import read_snapshot

    snap = read_snapshot(run_dir)
    return [] if snap is None else [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]]


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie
    except OSError:
        return True


def wait_for(cond, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_killed_worker_restarts_from_its_checkpoint_and_matches_the_uninterrupted_run_bitwise(
        reference_run, train_ds, tiny_sd_path, tmp_path):
    """The reference's config and seed again, but rank 1's process is SIGKILLed (by its pid, from the
    test) right after the step-3 checkpoint: FailureConfig(max_failures=1) restarts the worker group
    from that checkpoint, and the run ends where the uninterrupted one ends, bit for bit. (That is
    also the determinism check: two runs of one config and seed give the same delta.)"""
    from rayablate.pipeline import read_delta
    from rayablate.report import report_markdown
    from rayablate.train import run_training

    pids, release = tmp_path / "pids", tmp_path / "release"
    pids.mkdir()
    out = tmp_path / "out"
    result: dict = {}

    def train():
        try:
            result["ok"] = run_training(_two_worker_cfg(), train_ds, str(tiny_sd_path), str(out), run_name="killed",
                                        max_failures=1, faults=Faults(pid_dir=str(pids), hold_at_step=3,
                                                                      release_file=str(release)))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    t = threading.Thread(target=train, daemon=True)
    t.start()
    try:
        run_dir = out / "ray" / "killed"
        # every rank waits after the step-3 checkpoint: the kill lands mid-run, after Ray registered it
        wait_for(lambda: (pids / "rank1.pid").exists() and "checkpoint_step0000003" in _registered_checkpoints(run_dir),
                 300, "the step-3 checkpoint")
        victim = int((pids / "rank1.pid").read_text())
        assert victim != os.getpid()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: _dead(victim), 30, "the killed worker to die")
    finally:
        release.write_text("go\n")
    t.join(timeout=400)
    assert not t.is_alive(), "training did not finish after the kill"
    assert "error" not in result, repr(result.get("error"))
    res = result["ok"]
    assert res["worker_restarts"] >= 1
    assert res["start_step"] == 3 and res["final_step"] == 6  # restored from the checkpoint, not from step 0
    assert [m["step"] for m in res["metrics"]] == [3, 6]  # the history came back with the checkpoint
    assert int((pids / "rank1.pid").read_text()) != victim  # rank 1 runs in a new process
    (a, meta_a), (b, meta_b) = read_delta(reference_run["delta_path"]), read_delta(res["delta_path"])
    assert a.keys() == b.keys() and a
    # Bitwise: the restored Adam state, per-(rank, step) seeds and the same data order make the
    # restart exact on CPU; a lost or repeated step, or another batch, moves weights by up to lr = 1e-3.
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
    assert meta_a == meta_b  # the file's bytes may differ: safetensors writes metadata in hash-map order
    assert [m["loss"] for m in res["metrics"]] == [m["loss"] for m in reference_run["metrics"]]
    report = report_markdown({"config": to_dict(_two_worker_cfg()), "restarts": res["worker_restarts"]}, [])
    assert f"Worker restarts during training: {res['worker_restarts']} (a worker failed" in report
    assert "restarted the worker group from the latest checkpoint" in report


def test_non_finite_loss_exits_2_through_the_cli_naming_the_step(ray_session, train_ds, tiny_sd_path, tmp_path,
                                                               capsys):
    from rayablate.cli import guarded
    from rayablate.train import run_training

    cfg = _cfg(lr_matcher=1e30, steps=3, checkpoint_every=3)  # step 1's update poisons step 2
    rc = guarded(lambda: run_training(cfg, train_ds, str(tiny_sd_path), str(tmp_path), run_name="nan"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert re.search(r"error: training diverged: non-finite loss at step [23]\b.*no delta was saved", err), err
    assert not (tmp_path / DELTA_NAME).exists()
    assert not list((tmp_path / "ray").rglob(DELTA_NAME)), "a checkpoint holds a poisoned delta"

@pytest.mark.slow
def test_robust_mode_keeps_replicas_checkpoints_its_attacker_and_resumes_exactly(ray_session, train_ds, tiny_sd_path,
                                                                                 tmp_path):
    """Robust mode on 2 workers with ZeRO-2 (the inner attacker's snapshot comes from the engines'
    fp32 masters): the adversarial term trains, every rank's attacker state is in the checkpoint,
    and a run stopped at step 2 and rerun ends where an uninterrupted run ends. (ZeRO-3 passes the
    same test, but its engine setup takes minutes on 2 CPUs.)"""
    from rayablate.pipeline import read_delta
    from rayablate.train import run_training

    robust = dict(robust=True, zero_stage=2, robust_inner_steps=2, robust_batch_size=4, robust_every=2,
                  param_group="xattn", w_adv=0.0, steps=4, checkpoint_every=2, report_every=2)
    path = str(tiny_sd_path)
    full = run_training(_two_worker_cfg(**robust), train_ds, path, str(tmp_path / "full"), run_name="robust")
    assert len(set(full["replica_hashes"])) == 1
    # rank 0's windows: a window whose batches held no ablation row has robust == 0
    assert any(m["robust"] > 0 and np.isfinite(m["inner_loss"]) for m in full["metrics"]), full["metrics"]
    ckpt = Path(full["checkpoint_path"])
    assert sorted(p.name for p in ckpt.glob("robust_rank*.pt")) == ["robust_rank0.pt", "robust_rank1.pt"]
    state = [torch.load(ckpt / f"robust_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(state[0]["0.vectors.0"], state[1]["0.vectors.0"])  # each rank attacks its own rows
    # one set of vectors per start (anchor, target, random); refreshes at steps 1 and 3 took sets 0 and 1
    assert {k.split(".")[0] for k in state[0] if k != "current"} == {"0", "1", "2"}
    assert int(state[0]["current"]) == 1
    out = str(tmp_path / "resumed")
    run_training(_two_worker_cfg(**{**robust, "steps": 2}), train_ds, path, out, run_name="robust")
    second = run_training(_two_worker_cfg(**robust), train_ds, path, out, run_name="robust")
    assert second["start_step"] == 2 and second["final_step"] == 4
    a, _ = read_delta(full["delta_path"])
    b, _ = read_delta(second["delta_path"])
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert a.keys() == b.keys() and diff <= 1e-6, diff


def test_a_ray_the_job_owns_trains_without_the_cluster_guards(ray_session, train_ds, tiny_sd_path, tmp_path,
                                                              monkeypatch):
    """In a Ray the job's driver started (`job.init_ray`), Ray Train's placement-group cleaner is left
    out, and so is its dataset manager when the workers read their own shards; any other Ray keeps both."""
    from rayablate.data import LocalShards
    from rayablate.resources import OWNED_RAY_ENV
    from rayablate.train import make_trainer

    def helpers(ds):
        trainer = make_trainer(_cfg(), ds, str(tiny_sd_path), str(tmp_path / "runs"), cpus_per_worker=0.5)
        names = {type(cb).__name__ for cb in trainer._create_default_callbacks()}
        return {n for n in ("PlacementGroupCleanerCallback", "DatasetsCallback") if n in names}, names

    monkeypatch.delenv(OWNED_RAY_ENV, raising=False)
    kept, names = helpers(LocalShards(str(tmp_path)))
    assert kept == {"PlacementGroupCleanerCallback", "DatasetsCallback"}
    monkeypatch.setenv(OWNED_RAY_ENV, "1")
    dropped, owned = helpers(LocalShards(str(tmp_path)))
    assert dropped == set() and "BackendSetupCallback" in owned and len(owned) == len(names) - 2
    assert helpers(train_ds)[0] == {"DatasetsCallback"}  # a Ray Dataset still needs the manager to split it

    @ray_session.remote(num_cpus=0)
    def in_a_task(path):  # a batch's concept run, a Tune trial: inside Ray, where a fit may be stopped
        from rayablate.config import config_from_dict
        from rayablate.data import LocalShards
        from rayablate.train import make_trainer

        trainer = make_trainer(config_from_dict({}), LocalShards(path), path, path + "/runs", cpus_per_worker=0.5)
        return {type(cb).__name__ for cb in trainer._create_default_callbacks()}

    inside = ray_session.get(in_a_task.options(runtime_env={"env_vars": {OWNED_RAY_ENV: "1"}}).remote(str(tmp_path)))
    assert {"PlacementGroupCleanerCallback", "DatasetsCallback"} <= inside
