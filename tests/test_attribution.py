"""Attribution patching: estimates against hand-written gradient x difference computations (plain
torch hooks, no nnsight), the AtP* attention correction against attention weights and their
gradient read from an eager model, GradDrop against one detached forward per dropped layer,
exact confirmation equal to ``sweep``, device_map dispatch, and no parameter gradients."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import vlm_probe
from vlm_probe.analyses import cross_patch, sweep
from vlm_probe.analyses import metrics as M
from vlm_probe.analyses.attention_fix import (AttentionCall, key_column_effects, key_group_effect,
                                              query_row_effects)
from vlm_probe.analyses.attribution import AttributionResult, attribution_sweep, cross_attribution
from vlm_probe.errors import InputError
from vlm_probe.results import Result
from vlm_probe.testbed.zoo import tiny_vlm


@pytest.fixture(scope="module")
def setup():
    tiny = tiny_vlm("qwen2_5_vl")
    vlm = vlm_probe.load(tiny)
    batch = vlm.prepare(["how many red circles ?"] * 4, [[tiny.image(i)] for i in range(4)])
    metric = M.logit_diff(vlm.tokenizer, ["3", "2"], ["4", "1"], 2)
    return vlm, tiny, batch[:2], batch[2:], metric


# ----------------------------------------------------------------------------- hand-written reference


def _hf_modules(model):
    root = model.model
    text = root.language_model
    out = {("embed", 0): (text.embed_tokens, lambda o: o), ("projector", 0): (root.visual.merger, lambda o: o)}
    for j, block in enumerate(root.visual.blocks):
        out[("vision_out", j)] = (block, lambda o: o)
    for i, layer in enumerate(text.layers):
        out[("layer_out", i)] = (layer, lambda o: o)
        out[("attn_out", i)] = (layer.self_attn, lambda o: o[0])
        out[("mlp_out", i)] = (layer.mlp, lambda o: o)
    return out


def _run(model, inputs, modules, grad: bool, detach_layer: int | None = None):
    """A forward storing the chosen modules' outputs; with ``grad``, params frozen, the text
    embeddings and pixels as leaves, outputs retaining their gradient; ``detach_layer`` cuts
    the gradient through that decoder layer's attention and MLP outputs (GradDrop by hand)."""
    stored, handles = {}, []
    text = model.model.language_model

    def keep(key, pick):
        def hook(module, args, output):
            value = pick(output)
            if grad and value.requires_grad:
                value.retain_grad()
            stored[key] = value
        return hook

    def detach(module, args, output):
        return (output[0].detach(), *output[1:]) if isinstance(output, tuple) else output.detach()

    if grad:
        handles.append(text.embed_tokens.register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True)))
    if detach_layer is not None:
        handles += [text.layers[detach_layer].self_attn.register_forward_hook(detach),
                    text.layers[detach_layer].mlp.register_forward_hook(detach)]
    for key, (module, pick) in modules.items():
        handles.append(module.register_forward_hook(keep(key, pick)))
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        kwargs = dict(inputs)
        if grad:
            kwargs["pixel_values"] = kwargs["pixel_values"].clone().requires_grad_(True)
        with torch.set_grad_enabled(grad):
            logits = model(**kwargs).logits
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return stored, logits


def _last(batch):
    return torch.tensor([row.spans["last_prompt"][0] for row in batch.layout])


def _logit_diff(logits, batch, metric):
    rows = torch.arange(logits.shape[0])
    at = logits[rows, _last(batch)]
    return at[rows, metric.target] - at[rows, metric.foil]


def hand_estimates(vlm, clean, corrupt, metric, keys, detach_layer=None):
    """``{(site, index): [rows, seq] or [rows]}`` per-position (or per-row) gradient x difference."""
    modules = {k: v for k, v in _hf_modules(vlm.hf).items() if k in keys}
    src, _ = _run(vlm.hf, clean.inputs, modules, grad=False)
    base, logits = _run(vlm.hf, corrupt.inputs, modules, grad=True, detach_layer=detach_layer)
    _logit_diff(logits, corrupt, metric).sum().backward()
    out = {}
    for key in keys:
        grad = base[key].grad if base[key].grad is not None else torch.zeros_like(base[key])
        product = (src[key] - base[key].detach()) * grad
        if key[0] in ("vision_out", "projector"):  # both rows have one image of the same size
            out[key] = torch.stack([part.sum() for part in product.chunk(len(corrupt))])
        else:
            out[key] = product.sum(-1)
    return out


def _cell(frame, site, layer, positions):
    part = frame[(frame.site == site) & (frame.layer == layer) & (frame.positions == positions)]
    return torch.tensor(part.sort_values("sample")["estimate"].to_numpy())


# ----------------------------------------------------------------------------- AtP


def test_estimates_equal_gradient_times_difference_by_hand(setup) -> None:
    vlm, _, clean, corrupt, metric = setup
    sites = ["layer_out", "attn_out", "mlp_out", "vision_out", "projector", "embed"]
    result = attribution_sweep(vlm, clean, corrupt, site=sites, positions=["vision", "question", "last", "all"],
                               metric=metric, progress=False)
    frame = result.frame
    assert set(frame["method"]) == {"atp"}
    keys = [(s, i) for s in ("layer_out", "attn_out", "mlp_out") for i in range(vlm.n_layers)]
    keys += [("vision_out", j) for j in range(vlm.vision.depth)] + [("projector", 0), ("embed", 0)]
    hand = hand_estimates(vlm, clean, corrupt, metric, keys)
    checked = 0
    for (site, index), value in hand.items():
        if value.dim() == 1:
            torch.testing.assert_close(_cell(frame, site, index, "all"), value.double(), atol=1e-6, rtol=1e-4)
            checked += 1
            continue
        for group in ("vision", "question", "last", "all"):
            mask = corrupt.layout.mask(group) if group != "all" else corrupt.inputs["attention_mask"].bool()
            want = (value * mask).sum(1).double()
            torch.testing.assert_close(_cell(frame, site, index, group), want, atol=1e-6, rtol=1e-4)
            checked += 1
    assert checked == 3 * vlm.n_layers * 4 + vlm.vision.depth + 1 + 4
    assert frame["estimate"].abs().max() > 1e-3  # the comparison is not between zeros
    # value = corrupt + estimate; normalized as in a sweep
    np.testing.assert_allclose(frame["value"] - frame["corrupt"], frame["estimate"], atol=1e-12)
    np.testing.assert_allclose(frame["normalized"], frame["estimate"] / (frame["clean"] - frame["corrupt"]), rtol=1e-9)


def test_per_token_cells_add_up_to_their_group(setup) -> None:
    vlm, _, clean, corrupt, metric = setup
    each = attribution_sweep(vlm, clean, corrupt, site=["layer_out", "k", "q"], positions="each:vision", metric=metric,
                             progress=False).frame
    group = attribution_sweep(vlm, clean, corrupt, site=["layer_out", "q"], positions="vision", metric=metric,
                              corrections=("qk",), progress=False).frame
    summed = each.groupby(["site", "layer", "sample"])["estimate"].sum()
    for row in group.itertuples():
        assert summed[(row.site, row.layer, row.sample)] == pytest.approx(row.estimate, abs=1e-9)
    assert each["positions"].str.fullmatch(r"\d+").all()


def test_final_norm_estimate_is_exact_for_a_linear_metric(setup) -> None:
    """The logits are linear in the final norm's output and logit_diff is linear in the logits:
    the first-order estimate is the exact patching effect."""
    vlm, _, clean, corrupt, metric = setup
    kwargs = dict(site="final_norm", positions=["last", "all", "question"], metric=metric, progress=False)
    estimated = attribution_sweep(vlm, clean, corrupt, **kwargs).frame
    exact = sweep(vlm, clean, corrupt, **kwargs).frame
    np.testing.assert_allclose(estimated["value"], exact["value"], atol=2e-5)
    assert (exact["value"] - exact["corrupt"]).abs().max() > 1e-3


def test_cross_attribution_estimates_cross_patching(zoo) -> None:
    receiver, donor = vlm_probe.load(zoo("qwen2_5_vl")), vlm_probe.load(zoo("qwen2_5_vl", seed=1))
    tiny = zoo("qwen2_5_vl")
    batch = receiver.prepare(["how many red circles ?"] * 2, [[tiny.image(0)], [tiny.image(1)]])
    metric = M.logit_diff(receiver.tokenizer, "3", "4", 2)
    kwargs = dict(site="final_norm", positions=["last"], metric=metric, names=("IN", "RL"), progress=False)
    estimated = cross_attribution(receiver, donor, batch, **kwargs).frame
    exact = cross_patch(receiver, donor, batch, **kwargs).frame
    np.testing.assert_allclose(estimated["value"], exact["value"], atol=2e-5)
    assert set(estimated["receiver"]) == {"IN"} and set(estimated["donor"]) == {"RL"}
    np.testing.assert_allclose(estimated["clean"], exact["clean"], atol=1e-5)


# ----------------------------------------------------------------------------- the attention correction


def _naive_effect(call: AttentionCall, q, k, grad_out):
    """sum (softmax(new) - softmax(old)) * (g . v), by the textbook formula in float64."""
    heads = call.query.shape[1]
    rep = heads // call.key.shape[1]

    def weights(query, key):
        s = torch.einsum("bhqd,bhkd->bhqk", query.double(), key.double().repeat_interleave(rep, 1)) * call.scaling
        n = s.shape[-1]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        return torch.softmax(s, -1)

    g = grad_out.double().reshape(grad_out.shape[0], grad_out.shape[1], heads, -1).transpose(1, 2)
    g_a = torch.einsum("bhqd,bhkd->bhqk", g, call.value.double().repeat_interleave(rep, 1))
    return ((weights(q, k) - weights(call.query, call.key)) * g_a).sum((1, 2, 3))


@pytest.mark.parametrize("temperature", [1.0, 60.0])
def test_attention_effects_equal_the_textbook_recomputation(temperature: float) -> None:
    """Closed forms (every key column at once, groups, query rows) against recomputing both
    softmaxes; at temperature 60 the softmax is saturated (weights of 1 - 1e-30)."""
    g = torch.Generator().manual_seed(0)
    b, h, kv, t, d = 2, 4, 2, 9, 8
    q, k, v = (torch.randn(b, n, t, d, generator=g) for n in (h, kv, kv))
    call = AttentionCall(q * temperature, k, v, None, d**-0.5)
    q2, k2 = torch.randn(b, h, t, d, generator=g) * temperature, torch.randn(b, kv, t, d, generator=g)
    grad_out = torch.randn(b, t, h * d, generator=g)
    columns = key_column_effects(call, k2, grad_out, chunk=4)
    group = torch.zeros(b, t, dtype=torch.bool)
    group[0, [2, 5]] = True
    group[1, [0, 1, 7]] = True
    for col in range(t):
        one = torch.zeros(b, t, dtype=torch.bool)
        one[:, col] = True
        want = _naive_effect(call, call.query, torch.where(one[:, None, :, None], k2, k), grad_out)
        torch.testing.assert_close(columns[:, col], want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(key_group_effect(call, k2, grad_out, one, chunk=4), want, atol=1e-6, rtol=1e-5)
    want = _naive_effect(call, call.query, torch.where(group[:, None, :, None], k2, k), grad_out)
    torch.testing.assert_close(key_group_effect(call, k2, grad_out, group, chunk=4), want, atol=1e-6, rtol=1e-5)
    rows = query_row_effects(call, q2, grad_out, chunk=4)
    want = _naive_effect(call, torch.where(group[:, None, :, None], q2, call.query), call.key, grad_out)
    torch.testing.assert_close((rows * group).sum(1), want, atol=1e-6, rtol=1e-5)
    assert columns.abs().max() > 1e-3 and torch.isfinite(columns).all()


def test_qk_correction_equals_attention_weights_and_their_gradient_by_hand() -> None:
    """sum (A_patched - A) * dL/dA at one layer, with A read from an eager model's attention
    weights (A_patched from a forward whose k_proj / q_proj output is patched by a hook), equals
    the corrected estimate of that layer's key / query cell; the same under sdpa."""
    tiny = tiny_vlm("qwen2_5_vl", seed=3)
    eager = vlm_probe.load(tiny_vlm("qwen2_5_vl", seed=3), attn_implementation="eager")
    sdpa = vlm_probe.load(tiny)
    batch = eager.prepare(["how many red circles ?"] * 4, [[tiny.image(i)] for i in range(4)])
    clean, corrupt = batch[:2], batch[2:]
    metric = M.logit_diff(eager.tokenizer, "3", "4", 2)
    layer = 2
    attn = eager.hf.model.language_model.layers[layer].self_attn
    mask = corrupt.layout.mask("vision")

    def proj_output(name, inputs):
        out = {}
        handle = getattr(attn, name).register_forward_hook(lambda m, a, o: out.setdefault("x", o))
        with torch.no_grad():
            eager.hf(**inputs)
        handle.remove()
        return out["x"]

    def weights(inputs, grad, patch=None):
        out = {}

        def keep(module, args, output):
            if grad:
                output[1].retain_grad()
            out["A"] = output[1]
        handles = [attn.register_forward_hook(keep)]
        if patch is not None:
            name, value = patch
            handles.append(getattr(attn, name).register_forward_hook(
                lambda m, a, o: torch.where(mask[..., None], value, o)))
        flags = [p.requires_grad for p in eager.hf.parameters()]
        for p in eager.hf.parameters():
            p.requires_grad_(grad)  # the hand reference may use parameter gradients: it is the reference
        try:
            with torch.set_grad_enabled(grad):
                logits = eager.hf(**inputs).logits
            if grad:
                _logit_diff(logits, corrupt, metric).sum().backward()
        finally:
            for h in handles:
                h.remove()
            for p, f in zip(eager.hf.parameters(), flags):
                p.requires_grad_(f)
                p.grad = None
        return out["A"]

    base = weights(corrupt.inputs, grad=True)
    for site, proj in (("k", "k_proj"), ("q", "q_proj")):
        patched = weights(corrupt.inputs, grad=False, patch=(proj, proj_output(proj, clean.inputs)))
        want = ((patched - base.detach()) * base.grad).sum((1, 2, 3)).double()
        for vlm in (eager, sdpa):
            got = attribution_sweep(vlm, clean, corrupt, site=site, layers=[layer], positions="vision", metric=metric,
                                    progress=False).frame
            assert set(got["method"]) == {"atp_qk"}
            torch.testing.assert_close(_cell(got, site, layer, "vision"), want, atol=1e-6, rtol=1e-4)
        assert want.abs().max() > 1e-5


def test_plain_atp_differs_from_the_correction_only_on_query_and_key_sites(setup) -> None:
    vlm, _, clean, corrupt, metric = setup
    kwargs = dict(site=["q", "k", "layer_out"], positions=["vision", "question"], metric=metric, progress=False)
    fixed = attribution_sweep(vlm, clean, corrupt, **kwargs).frame
    plain = attribution_sweep(vlm, clean, corrupt, corrections=(), **kwargs).frame
    assert set(plain["method"]) == {"atp"}
    residual = fixed["site"] == "layer_out"
    np.testing.assert_allclose(fixed.loc[residual, "estimate"], plain.loc[residual, "estimate"], atol=1e-12)
    assert (fixed.loc[~residual, "estimate"] - plain.loc[~residual, "estimate"]).abs().max() > 1e-8
    # the linear estimate through the softmax is the correction's first order: close on this unsaturated model
    np.testing.assert_allclose(fixed.loc[~residual, "estimate"], plain.loc[~residual, "estimate"], atol=5e-4)


# ----------------------------------------------------------------------------- GradDrop


def test_graddrop_equals_one_detached_forward_per_layer_by_hand(setup) -> None:
    vlm, _, clean, corrupt, metric = setup
    sites = ["layer_out", "attn_out", "mlp_out"]
    result = attribution_sweep(vlm, clean, corrupt, site=sites, positions=["vision", "last"], metric=metric,
                               graddrop=True, progress=False)
    frame = result.frame
    keys = [(s, i) for s in sites for i in range(vlm.n_layers)]
    per_layer = [hand_estimates(vlm, clean, corrupt, metric, keys, detach_layer=l) for l in range(vlm.n_layers)]
    for site, index in keys:
        for group in ("vision", "last"):
            mask = corrupt.layout.mask(group)
            terms = torch.stack([(est[(site, index)] * mask).sum(1) for est in per_layer])  # [L, rows]
            want = terms.abs().sum(0).double() / (vlm.n_layers - 1)
            part = frame[(frame.site == site) & (frame.layer == index) & (frame.positions == group)]
            got = torch.tensor(part.sort_values("sample")["graddrop"].to_numpy())
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # its own layer dropped, an attention or MLP output's estimate is zero (its only path is cut)
    assert frame["graddrop"].max() > 1e-4
    assert result.meta["cost"]["backwards"] == 1 + vlm.n_layers


# ----------------------------------------------------------------------------- results, confirmation, safety


def test_confirm_runs_exact_patching_on_the_top_cells_equal_to_sweep(setup) -> None:
    vlm, _, clean, corrupt, metric = setup
    kwargs = dict(site=["layer_out", "mlp_out", "k"], positions=["vision", "question", "last"], metric=metric)
    result = attribution_sweep(vlm, clean, corrupt, progress=False, **kwargs)
    ranking = result.ranking()
    assert list(ranking["rank"]) == list(range(1, len(ranking) + 1))
    assert ranking["score"].is_monotonic_decreasing
    confirmed = result.confirm(vlm, clean, corrupt, metric=metric, k=5, progress=False)
    assert sorted(set(confirmed.frame["cell"])) == sorted(ranking["cell"].head(5))
    exact = sweep(vlm, clean, corrupt, progress=False, **kwargs).frame
    merged = confirmed.frame.merge(exact, on=["site", "layer", "positions", "sample"], suffixes=("", "_sweep"))
    assert len(merged) == 5 * len(clean)
    np.testing.assert_allclose(merged["value"], merged["value_sweep"], atol=1e-6)
    assert (merged["variant"] == merged["variant_sweep"]).all()
    # the estimate travels with the exact value
    estimated = result.frame.set_index(["cell", "sample"])["value"]
    for row in confirmed.frame.itertuples():
        assert row.attribution == pytest.approx(estimated[(row.cell, row.sample)])
    with pytest.raises(InputError, match="metric"):
        result.confirm(vlm, clean, corrupt, metric=M.kl_to_clean(), k=2)


def test_result_saves_plots_and_draws_over_the_image(setup, tmp_path) -> None:
    vlm, _, clean, corrupt, metric = setup
    result = attribution_sweep(vlm, clean, corrupt, site="layer_out", layers=[0, 1], positions="each:vision",
                               metric=metric, progress=False)
    loaded = Result.load(result.save(tmp_path / "attr"))
    assert isinstance(loaded, AttributionResult)
    pd.testing.assert_frame_equal(loaded.frame, result.frame)
    assert result.plot().data
    assert result.overlay(corrupt, sample=1).data
    assert result.meta["cost"] == {"forwards": 2, "backwards": 1, "batches": 1}


def test_no_parameter_gradients_and_flags_restored(setup) -> None:
    vlm, _, clean, corrupt, metric = setup
    params = list(vlm.hf.parameters())
    params[0].requires_grad_(False)  # a mixed state, restored as it was
    seen = []

    class Watching(M.LogitDiff):
        def __call__(self, logits, clean, corrupt, samples=None):
            if logits.requires_grad:  # the call inside the run with gradients
                seen.append(any(p.requires_grad for p in params))
            return super().__call__(logits, clean, corrupt, samples)

    watching = Watching(metric.target, metric.foil)
    try:
        attribution_sweep(vlm, clean, corrupt, site=["layer_out", "k"], positions="vision", metric=watching,
                          graddrop=True, progress=False)
    finally:
        flags = [p.requires_grad for p in params]
        params[0].requires_grad_(True)
    assert seen and not any(seen), "parameters required gradients during the run"
    assert flags == [False] + [True] * (len(params) - 1)
    assert all(p.grad is None for p in params)


def test_refuses_metrics_without_gradients_and_unknown_corrections(setup) -> None:
    vlm, _, clean, corrupt, _ = setup
    with pytest.raises(InputError, match="differentiable"):
        attribution_sweep(vlm, clean, corrupt, metric=M.first_token_change(), progress=False)
    with pytest.raises(InputError, match="corrections"):
        attribution_sweep(vlm, clean, corrupt, corrections=("graddrop",), progress=False)


def test_samples_in_several_forwards_equal_one_forward(setup) -> None:
    vlm, _, clean, corrupt, metric = setup
    kwargs = dict(site=["layer_out", "k", "projector"], positions=["vision", "last"], metric=metric, progress=False)
    one = attribution_sweep(vlm, clean, corrupt, max_rows=8, **kwargs)
    two = attribution_sweep(vlm, clean, corrupt, max_rows=1, **kwargs)
    pd.testing.assert_frame_equal(one.frame, two.frame, atol=1e-6, rtol=1e-5)
    assert two.meta["cost"] == {"forwards": 4, "backwards": 2, "batches": 2}


def test_device_map_with_cpu_and_disk_offload(tmp_path) -> None:
    tiny = tiny_vlm("qwen2_5_vl", d_model=128, n_layers=6)
    tiny.save(tmp_path / "ckpt")
    reference = vlm_probe.load(tmp_path / "ckpt")
    split = vlm_probe.load(tmp_path / "ckpt", device_map="auto", max_memory={"cpu": "600KB"},
                           offload_folder=tmp_path / "offload")
    assert set(split.hf.hf_device_map.values()) == {"cpu", "disk"}
    batch = reference.prepare(["how many red circles ?"] * 2, [[tiny.image(0)], [tiny.image(1)]])
    metric = M.logit_diff(reference.tokenizer, "3", "4", 1)
    kwargs = dict(site=["layer_out", "k"], positions=["vision", "last"], metric=metric, progress=False)
    want = attribution_sweep(reference, batch[:1], batch[1:], **kwargs).frame
    got = attribution_sweep(split, batch[:1], batch[1:], **kwargs).frame
    pd.testing.assert_frame_equal(got, want, atol=1e-6, rtol=0)
    assert want["estimate"].abs().max() > 1e-5
    assert all(p.grad is None for p in split.hf.parameters())



# ----------------------------------------------------------------------------- every family


def _module_outputs(vlm, keys):
    """``{(site, layer): (module, pick)}`` for decoder sites, from the wrapper's module tree."""
    out = {}
    for site, layer in keys:
        envoy = {"layer_out": vlm.layers[layer].envoy, "attn_out": vlm.layers[layer].attn, "mlp_out": vlm.layers[layer].mlp,
                 "q": vlm.layers[layer].q, "k": vlm.layers[layer].k}[site]
        out[(site, layer)] = (envoy._module, (lambda o: o[0]) if site == "attn_out" else (lambda o: o))
    return out


def _family_run(vlm, batch, modules, *, grad, patch=None, weights_of=None):
    """A plain HF forward (no nnsight) storing the chosen modules' outputs. With ``grad``: the
    token embeddings are a leaf (parameters frozen) and the stored outputs keep their gradient
    after ``logit_diff`` is differentiated. ``patch=(module, value, mask)`` replaces that
    module's output at ``mask``; ``weights_of``: an eager attention module whose weights are stored."""
    stored, handles = {}, []

    def keep(key, pick):
        def hook(module, args, output):
            value = pick(output)
            if grad and value.requires_grad:
                value.retain_grad()
            stored[key] = value
        return hook

    if grad:
        handles.append(vlm.embed._module.register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True)))
    for key, (module, pick) in modules.items():
        handles.append(module.register_forward_hook(keep(key, pick)))
    if weights_of is not None:
        handles.append(weights_of.register_forward_hook(keep("A", lambda o: o[1])))
    if patch is not None:
        module, value, mask = patch
        handles.append(module.register_forward_hook(lambda m, a, o: torch.where(mask[..., None], value, o)))
    flags = [p.requires_grad for p in vlm.hf.parameters()]
    try:
        for p in vlm.hf.parameters():
            p.requires_grad_(False)
        with torch.set_grad_enabled(grad):
            logits = vlm.hf(**batch.inputs).logits
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(vlm.hf.parameters(), flags):
            p.requires_grad_(f)
    return stored, logits


def test_attribution_equals_hand_computations_on_every_family(family, zoo) -> None:
    """On every zoo family, with plain HF forwards and hooks as the oracle: (1) plain AtP of the
    residual, attention, MLP and query sites of every layer equals (source - receiver) x the
    gradient, per position group; (2) the AtP* key and query estimates of every self-attention
    layer equal sum (A_patched - A) dL/dA with A the eager model's attention weights (Gemma3:
    sliding-window and full layers, sequence longer than the window; PaliGemma: bidirectional
    prefix; Mllama: its self-attention layers, cross-attention layers plain AtP only)."""
    tiny = zoo(family)
    vlm = vlm_probe.load(tiny)
    batch = vlm.prepare(["how many red circles are there in the picture ?"] * 4, [[tiny.image(i)] for i in range(4)])
    clean, corrupt = batch[:2], batch[2:]
    metric = M.LogitDiff(torch.tensor([5, 6]), torch.tensor([7, 8]))
    groups = ["question", "last", "all"] + (["vision"] if vlm.image_in_residual else [])
    masks = {g: corrupt.layout.mask(g) if g != "all" else corrupt.inputs["attention_mask"].bool() for g in groups}
    readable = [i for i in range(vlm.n_layers) if vlm.attention_readable(i)]
    assert readable and (family != "mllama" or len(readable) < vlm.n_layers)

    # (1) plain AtP against gradient x difference
    linear = ["layer_out", "attn_out", "mlp_out", "q"]
    keys = [(s, i) for s in linear for i in range(vlm.n_layers)] + [("k", i) for i in readable]
    modules = _module_outputs(vlm, keys)
    src, _ = _family_run(vlm, clean, modules, grad=False)
    base, logits = _family_run(vlm, corrupt, modules, grad=True)
    _logit_diff(logits, corrupt, metric).sum().backward()
    frame = pd.concat([attribution_sweep(vlm, clean, corrupt, site=linear, positions=groups, metric=metric,
                                         corrections=(), progress=False).frame,
                       attribution_sweep(vlm, clean, corrupt, site="k", layers=readable, positions=groups,
                                         metric=metric, corrections=(), progress=False).frame])
    for (site, layer) in keys:
        product = ((src[(site, layer)] - base[(site, layer)].detach()) * base[(site, layer)].grad).sum(-1)
        for group, mask in masks.items():
            torch.testing.assert_close(_cell(frame, site, layer, group), (product * mask).sum(1).double(),
                                       atol=1e-6, rtol=1e-4, msg=f"{family} {site} {layer} {group}")
    assert frame["estimate"].abs().max() > 1e-3

    # (2) AtP* for query and key sites against eager attention weights
    eager = vlm_probe.load(tiny_vlm(family), attn_implementation="eager")
    if family == "gemma3":
        assert corrupt.width > eager.hf.config.text_config.sliding_window
    fixed = attribution_sweep(vlm, clean, corrupt, site=["q", "k"], layers=readable, positions=groups, metric=metric,
                              progress=False).frame
    assert set(fixed["method"]) == {"atp_qk"}
    checked = 0
    for layer in readable:
        attn = eager.layers[layer].attn._module
        weights_store, logits = _family_run(eager, corrupt, {}, grad=True, weights_of=attn)
        _logit_diff(logits, corrupt, metric).sum().backward()
        a = weights_store["A"]
        for site in ("q", "k"):
            proj = getattr(eager.layers[layer], site)._module
            source = _family_run(eager, clean, {("p", 0): (proj, lambda o: o)}, grad=False)[0][("p", 0)]
            for group, mask in masks.items():
                patched = _family_run(eager, corrupt, {}, grad=False, weights_of=attn, patch=(proj, source, mask))[0]
                want = ((patched["A"] - a.detach()) * a.grad).sum((1, 2, 3)).double()
                torch.testing.assert_close(_cell(fixed, site, layer, group), want, atol=1e-6, rtol=1e-4,
                                           msg=f"{family} {site} {layer} {group}")
                checked += int(want.abs().max() > 1e-6)
    assert checked > 0
