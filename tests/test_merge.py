"""The least-squares merge of cross-attention k/v deltas: its normal equations against a direct solve."""
import pytest
import torch
from torch import nn

from rayablate.merge import gram, least_squares_merge, merge_tensors, naive_sum


def _problem(seed=0, out=5, d=6, concepts=3):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d, out, bias=False).double()
    w0 = lin.weight.detach().clone()
    ws = [w0 + 0.3 * torch.randn(out, d, generator=g, dtype=torch.float64) for _ in range(concepts)]
    cs = [torch.randn(7 + 3 * i, d, generator=g, dtype=torch.float64) for i in range(concepts)]  # rows = tokens
    c0 = torch.randn(11, d, generator=g, dtype=torch.float64)
    return lin, w0, ws, cs, c0


def _lstsq(w0, ws, cs, c0, lam, rho, prior):
    """Direct solve of the stacked system  sqrt(weight) C X = sqrt(weight) C W_target^T,  X = W^T."""
    blocks_a, blocks_b = [], []
    for w, c in zip(ws, cs):
        s = (1.0 / len(c)) ** 0.5
        blocks_a.append(s * c)
        blocks_b.append(s * c @ w.T)
    s0 = (lam / len(c0)) ** 0.5
    blocks_a.append(s0 * c0)
    blocks_b.append(s0 * c0 @ w0.T)
    d = w0.shape[1]
    blocks_a.append(rho ** 0.5 * torch.eye(d, dtype=torch.float64))
    blocks_b.append(rho ** 0.5 * prior.T)
    x = torch.linalg.lstsq(torch.cat(blocks_a), torch.cat(blocks_b)).solution
    return x.T


@pytest.mark.parametrize("lam,ridge", [(1.0, 1e-3), (5.0, 0.0), (0.3, 0.1)])
def test_normal_equations_match_a_direct_least_squares_solve(lam, ridge):
    lin, w0, ws, cs, c0 = _problem()
    grams = [gram(c) for c in cs]
    g0 = gram(c0)
    prior = naive_sum({"w": w0}, [{"w": w} for w in ws])["w"]
    merged = least_squares_merge(w0, ws, grams, g0, lam=lam, ridge=ridge, prior=prior)
    a = sum(grams) + lam * g0
    rho = ridge * float(torch.trace(a)) / w0.shape[1]
    expected = _lstsq(w0, ws, cs, c0, lam, rho, prior)
    assert torch.allclose(merged, expected, atol=1e-9, rtol=1e-7)
    # the merged layer's outputs, as an nn.Linear would produce them
    with torch.no_grad():
        lin.weight.copy_(merged)
        assert torch.allclose(lin(cs[0]), cs[0] @ expected.T, atol=1e-9)


def test_disjoint_concepts_are_reproduced_exactly_where_the_naive_sum_interferes():
    """Concepts on orthogonal embedding subspaces with overlapping weight edits: least squares gives every
    concept its own model's outputs on its captions and W0's on the preserved ones; the sum does not."""
    d, out = 6, 4
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(out, d, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    c1 = torch.randn(9, 2, generator=g, dtype=torch.float64) @ basis[:, 0:2].T
    c2 = torch.randn(9, 2, generator=g, dtype=torch.float64) @ basis[:, 2:4].T
    c0 = torch.randn(9, 2, generator=g, dtype=torch.float64) @ basis[:, 4:6].T
    # each concept's edit leaks onto the other subspaces (dense deltas), as trained deltas do
    w1 = w0 + torch.randn(out, d, generator=g, dtype=torch.float64)
    w2 = w0 + torch.randn(out, d, generator=g, dtype=torch.float64)
    merged = least_squares_merge(w0, [w1, w2], [gram(c1), gram(c2)], gram(c0), lam=1.0, ridge=0.0)
    summed = naive_sum({"w": w0}, [{"w": w1}, {"w": w2}])["w"]
    for c, w in ((c1, w1), (c2, w2), (c0, w0)):
        assert torch.allclose(c @ merged.T, c @ w.T, atol=1e-8)
        assert not torch.allclose(c @ summed.T, c @ w.T, atol=1e-3)


def test_non_kv_tensors_fall_back_to_the_sum_and_are_reported():
    base = {"unet.a.attn2.to_k.weight": torch.zeros(3, 4), "unet.a.attn2.to_out.0.weight": torch.zeros(3, 3),
            "unet.a.attn2.to_v.weight": torch.zeros(3, 4)}
    d1 = {"unet.a.attn2.to_k.weight": torch.ones(3, 4), "unet.a.attn2.to_out.0.weight": torch.ones(3, 3)}
    d2 = {"unet.a.attn2.to_out.0.weight": 2 * torch.ones(3, 3), "unet.a.attn2.to_v.weight": torch.ones(3, 4)}
    grams = [torch.eye(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)]
    merged, report = merge_tensors(base, [d1, d2], grams, None, lam=0.0, ridge=0.0)
    assert report["summed"] == ["unet.a.attn2.to_out.0.weight"]
    assert sorted(report["least_squares"]) == ["unet.a.attn2.to_k.weight", "unet.a.attn2.to_v.weight"]
    assert torch.equal(merged["unet.a.attn2.to_out.0.weight"], 3 * torch.ones(3, 3))
    # to_k: concept 1 says ones, concept 2 (which did not touch it) says zeros, same captions: the mean
    assert torch.allclose(merged["unet.a.attn2.to_k.weight"], 0.5 * torch.ones(3, 4))


def test_added_deltas_reach_the_merge_unchanged_on_top_of_the_fitted_ones():
    """Robust deltas are added, not fitted: the merge is the least-squares fit of the other deltas plus
    each added delta's change, whatever the captions say; with every delta added it is the naive sum."""
    lin, w0, ws, cs, c0 = _problem(seed=3)
    name = "unet.b.attn2.to_v.weight"
    base, deltas = {name: w0}, [{name: w} for w in ws]
    grams = [gram(c) for c in cs]
    merged, report = merge_tensors(base, deltas, grams, gram(c0), lam=2.0, ridge=1e-3, added=[False, True, False])
    fit_only, _ = merge_tensors(base, [deltas[0], deltas[2]], [grams[0], grams[2]], gram(c0), lam=2.0, ridge=1e-3)
    assert report["added"] == [1] and report["least_squares"] == [name]
    assert torch.allclose(merged[name], fit_only[name] + (ws[1] - w0), atol=1e-10)
    # the added delta's own edit survives on every input (the plain fit would change it on its captions)
    plain, _ = merge_tensors(base, deltas, grams, gram(c0), lam=2.0, ridge=1e-3)
    assert not torch.allclose(plain[name], fit_only[name] + (ws[1] - w0), atol=1e-3)
    every, _ = merge_tensors(base, deltas, grams, gram(c0), added=[True] * 3)
    assert torch.allclose(every[name], naive_sum(base, deltas)[name], atol=1e-12)
    with pytest.raises(ValueError, match="3 deltas but 2 added flags"):
        merge_tensors(base, deltas, grams, gram(c0), added=[True, False])


def test_merged_delta_file_applies_to_the_pipeline(tiny_sd_path, tmp_path):
    """Two fake concept deltas on the tiny pipeline: the merged file is a delta apply_delta accepts."""
    from rayablate.merge import merge_delta_files
    from rayablate.pipeline import apply_delta, export_delta, load_pipeline, matcher_state, read_delta

    paths = []
    for i in range(2):
        pipe = load_pipeline(tiny_sd_path)
        base = matcher_state(pipe, "xattn-kv")
        torch.manual_seed(i)
        with torch.no_grad():
            for n, p in pipe.unet.named_parameters():
                if ".attn2.to_k." in n or ".attn2.to_v." in n:
                    p.add_(0.05 * torch.randn_like(p))
        paths.append(export_delta(pipe, "xattn-kv", tmp_path / f"d{i}.safetensors", base))
    report = merge_delta_files(str(tiny_sd_path), [str(p) for p in paths],
                               [["a red striped circle", "a blue striped square"], ["a green zorb", "a dotted zorb"]],
                               ["a red plain circle", "a yellow checkered triangle"],
                               tmp_path / "merged.safetensors", tmp_path / "sum.safetensors")
    tensors, meta = read_delta(tmp_path / "merged.safetensors")
    assert meta["group"] == "xattn-kv" and len(tensors) == len(report["least_squares"]) > 0
    pipe = load_pipeline(tiny_sd_path)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    written = apply_delta(pipe, tmp_path / "merged.safetensors")
    assert written == sorted(tensors)
    changed = [n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)
    s, _ = read_delta(tmp_path / "sum.safetensors")
    d0, _ = read_delta(paths[0])
    d1, _ = read_delta(paths[1])
    name = sorted(s)[0]
    w0 = before[name.removeprefix("unet.")]
    assert torch.allclose(s[name], w0 + (d0[name] - w0) + (d1[name] - w0), atol=1e-6)
    # robust deltas (added, not fitted): with both added, the merged file is the naive sum
    both = merge_delta_files(str(tiny_sd_path), [str(p) for p in paths],
                             [["a red striped circle"], ["a green zorb"]], ["a red plain circle"],
                             tmp_path / "added.safetensors", added=[True, True])
    added, _ = read_delta(tmp_path / "added.safetensors")
    assert both["added"] == [0, 1] and both["least_squares"] == []
    assert added.keys() == s.keys() and all(torch.allclose(added[k], s[k], atol=1e-6) for k in s)
