"""TSV-M, ISO-C, ISO-CTS and EMR-Merging against transcriptions of FusionBench's code.

The oracles below are literal transcriptions of tanganke/fusion_bench (commit 54c9e8c, its
loops and names; prints and device moves dropped), run on random task vectors with ViT-B/32
shapes at width 256 (one block), T = 8, and planted edge cases: an all-zero task vector,
rank-2 task vectors, rank-1 task vectors whose sum is rank-deficient, a 6x4 matrix (k = 0 for
TSV-M: min(m, n) < T), EMR sign-election ties (Σt τt = 0), a zero-delta 2-D text extra and a
nonzero ``text.text_projection`` (the mean, as the authors' code does: the oracles run
with FusionBench's ``exclude_keys`` naming it). FusionBench sees open_clip / Hugging Face
layouts, where timm's (1, N, D) ``pos_embed`` is an (N, D) matrix and the (1, 1, D)
``cls_token`` is 1-D: the oracles get the state dicts in that layout.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from tintcli.errors import TintError
from tintcli.merging.emr import (
    EMRMerged,
    check_emr_tasks,
    emr_merge,
    pack_bits,
    unpack_bits,
)
from tintcli.merging.iso import (
    check_iso_c,
    check_iso_cts,
    iso_c_delta,
    iso_c_merge,
    iso_cts_delta,
    iso_cts_merge,
)
from tintcli.merging.tsv import check_tsv, tsv_delta, tsv_merge

# --------------------------------------------------------------------------------------
# Oracles: transcriptions of FusionBench. They must not import from tintcli.merging.
# --------------------------------------------------------------------------------------


# fusion_bench/utils/state_dict_arithmetic.py
def state_dict_sub(a, b):
    result = {}
    for key in a.keys():
        result[key] = a[key] - b[key]
    return result


def state_dict_add(a, b):
    return {key: a[key] + b[key] for key in a}


def state_dict_mul(state_dict, scalar):
    return {key: scalar * state_dict[key] for key in state_dict}


def state_dict_sum(state_dicts):
    sum_state_dict = {}
    for key in state_dicts[0]:
        sum_state_dict[key] = torch.zeros_like(state_dicts[0][key])
    for state_dict in state_dicts:
        for key in sum_state_dict:
            sum_state_dict[key] += state_dict[key]
    return sum_state_dict


# fusion_bench/method/task_singular_vector/utils/TSVM_utils.py
def compute_and_sum_svd_mem_reduction(task_vectors, exclude_keys=None, accelerator="cpu"):
    if exclude_keys is None:
        exclude_keys = []
    num_tasks = len(task_vectors)
    sv_reduction = 1 / num_tasks

    new_vector = {}
    for key in task_vectors[0]:
        original_device = task_vectors[0][key].device
        original_dtype = task_vectors[0][key].dtype

        for i, task_vector in enumerate(task_vectors):
            vec = task_vector[key].to(device=accelerator, non_blocking=True)
            if len(task_vector[key].shape) == 2 and key not in exclude_keys:
                if not (original_dtype == torch.float32 or original_dtype == torch.float64):
                    vec = vec.to(dtype=torch.float32)

                u, s, vh = torch.linalg.svd(vec, full_matrices=False)

                if i == 0:
                    sum_u = torch.zeros_like(u, device=accelerator)
                    sum_s = torch.zeros_like(s, device=accelerator)
                    sum_vh = torch.zeros_like(vh, device=accelerator)
                reduced_index_s = int(s.shape[0] * sv_reduction)

                sum_u[:, i * reduced_index_s : (i + 1) * reduced_index_s] = u[
                    :, :reduced_index_s
                ]
                sum_s[i * reduced_index_s : (i + 1) * reduced_index_s] = s[:reduced_index_s]
                sum_vh[i * reduced_index_s : (i + 1) * reduced_index_s, :] = vh[
                    :reduced_index_s, :
                ]
            else:
                if i == 0:
                    new_vector[key] = vec.clone()
                else:
                    new_vector[key] += (vec - new_vector[key]) / (i + 1)

        if len(task_vector[key].shape) == 2 and key not in exclude_keys:
            u_u, s_u, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
            u_vh, s_vh, vh_vh = torch.linalg.svd(sum_vh, full_matrices=False)

            new_vector[key] = torch.linalg.multi_dot(
                (
                    u_u,
                    vh_u,
                    torch.diag(sum_s),
                    u_vh,
                    vh_vh,
                )
            )
            new_vector[key] = new_vector[key].to(
                device=original_device, dtype=original_dtype, non_blocking=True
            )
        else:
            new_vector[key] = new_vector[key].to(
                device=original_device, dtype=original_dtype, non_blocking=True
            )
    return new_vector


# fusion_bench/method/isotropic_merging/iso_utils.py
def iso_c(task_vectors, accelerator="cpu", exclude_keys=None):
    exclude_keys = [] if exclude_keys is None else exclude_keys

    new_vector = {}
    for key in task_vectors[0]:
        original_device = task_vectors[0][key].device
        tvs = [
            task_vector[key].to(device=accelerator, non_blocking=True)
            for task_vector in task_vectors
        ]
        num_tvs = len(tvs)
        new_vector[key] = sum(tvs) / num_tvs
        del tvs

        if len(task_vectors[0][key].shape) == 2 and key not in exclude_keys:
            new_vector[key] *= num_tvs
            U, S, V = torch.linalg.svd(new_vector[key], full_matrices=False)
            S_mean = torch.ones_like(S) * S.mean()

            new_vector[key] = torch.linalg.multi_dot(
                (
                    U,
                    torch.diag(S_mean),
                    V,
                )
            )
        new_vector[key] = new_vector[key].to(device=original_device, non_blocking=True)
    return new_vector


def iso_cts(task_vectors, common_space_fraction, accelerator="cpu", exclude_keys=None):
    exclude_keys = [] if exclude_keys is None else exclude_keys
    new_vector = {}

    for key in task_vectors[0]:
        shape_ = task_vectors[0][key].shape
        original_device = task_vectors[0][key].device
        is_2d_matrix = (len(shape_) == 2) and (key not in exclude_keys)
        if not is_2d_matrix:
            for i, task_vector in enumerate(task_vectors):
                vec = task_vector[key].to(device=accelerator, non_blocking=True)
                if i == 0:
                    new_vector[key] = vec.clone()
                else:
                    new_vector[key] += (vec - new_vector[key]) / (i + 1)

            new_vector[key] = new_vector[key].to(device=original_device, non_blocking=True)
            continue

        combined_w = sum(
            [
                task_vector[key].to(device=accelerator, non_blocking=True)
                for task_vector in task_vectors
            ]
        )

        common_space_index_s = int(min(shape_) * common_space_fraction)
        _task_specific_total_space_index_s = round(
            (min(shape_) - common_space_index_s) / len(task_vectors)
        ) * len(task_vectors)
        common_space_index_s = min(shape_) - _task_specific_total_space_index_s

        u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
        common_space_u = u[:, :common_space_index_s]
        common_space_s = s[:common_space_index_s]
        common_space_v = v[:common_space_index_s, :]

        n_dims_per_task = int((min(shape_) - common_space_index_s) / len(task_vectors))
        for i, task_vector in enumerate(task_vectors):
            w = task_vector[key].to(device=accelerator)

            w_ts = w - common_space_u @ common_space_u.T @ w
            u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)

            if i == 0:
                combined_space_u = torch.zeros_like(u_ts, device=accelerator)
                combined_space_s = torch.zeros_like(s_ts, device=accelerator)
                combined_space_v = torch.zeros_like(v_ts, device=accelerator)

            combined_space_u[:, i * n_dims_per_task : (i + 1) * n_dims_per_task] = u_ts[
                :, :n_dims_per_task
            ]
            combined_space_s[i * n_dims_per_task : (i + 1) * n_dims_per_task] = s_ts[
                :n_dims_per_task
            ]
            combined_space_v[i * n_dims_per_task : (i + 1) * n_dims_per_task, :] = v_ts[
                :n_dims_per_task, :
            ]

        combined_space_u[
            :,
            len(task_vectors) * n_dims_per_task : len(task_vectors) * n_dims_per_task
            + common_space_index_s,
        ] = common_space_u
        combined_space_s[
            len(task_vectors) * n_dims_per_task : len(task_vectors) * n_dims_per_task
            + common_space_index_s
        ] = common_space_s
        combined_space_v[
            len(task_vectors) * n_dims_per_task : len(task_vectors) * n_dims_per_task
            + common_space_index_s,
            :,
        ] = common_space_v

        u_combined_space_u, s_combined_space_u, v_combined_space_u = torch.linalg.svd(
            combined_space_u, full_matrices=False
        )
        u_combined_space_v, s_combined_space_v, v_combined_space_v = torch.linalg.svd(
            combined_space_v, full_matrices=False
        )
        combined_space_u = u_combined_space_u @ v_combined_space_u
        combined_space_v = u_combined_space_v @ v_combined_space_v

        combined_space_s = torch.ones_like(combined_space_s) * combined_space_s.mean()

        new_vector[key] = torch.linalg.multi_dot(
            (
                combined_space_u,
                torch.diag(combined_space_s),
                combined_space_v,
            )
        )
        new_vector[key] = new_vector[key].to(device=original_device, non_blocking=True)

    return new_vector


# fusion_bench/method/emr_merging/utils.py
def _sign(x):
    return (x > 0) * 2 - 1


def emr_merge_reference(task_vectors):
    num_tasks = len(task_vectors)

    flag_dict = {k: _sign(v) for k, v in state_dict_sum(task_vectors).items()}

    vector_unified = {}
    scales = torch.zeros(num_tasks)
    masks = {}
    for n, flag in flag_dict.items():
        masks[n] = []
        param_max = torch.zeros_like(task_vectors[0][n])
        for m in range(num_tasks):
            param = task_vectors[m][n]
            mask = (param * flag) > 0
            masks[n].append(mask)
            param_abs = torch.abs(mask * param)
            param_max = torch.where(param_abs > param_max, param_abs, param_max)
            scales[m] += torch.mean(torch.abs(param))
        vector_unified[n] = param_max * flag

    new_scales = torch.zeros(num_tasks)
    for m in range(num_tasks):
        for n in vector_unified:
            p = vector_unified[n] * masks[n][m]
            new_scales[m] += torch.mean(torch.abs(p))
    rescalers = scales / new_scales

    return vector_unified, masks, rescalers


# --------------------------------------------------------------------------------------
# Driving the oracles as FusionBench's ``run`` methods do, on tint's state dicts.
# --------------------------------------------------------------------------------------


def reference_layout(state):
    """open_clip / Hugging Face shapes: pos_embed (N, D), cls_token (D,); floats only."""
    out = {}
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if key == "pos_embed":
            value = value.squeeze(0)
        elif key == "cls_token":
            value = value.reshape(-1)
        out[key] = value
    return out


def back_to(state, like):
    return {key: value.reshape(like[key].shape) for key, value in state.items()}


def reference_task_vectors(pretrained, experts):
    base = reference_layout(pretrained)
    return [state_dict_sub(reference_layout(e), base) for e in experts.values()]


def exclude(pretrained):
    """FusionBench's exclude_keys set as the authors' rule: every key with text_projection."""
    return [k for k in pretrained if "text_projection" in k]


def reference_tsv(pretrained, experts, alpha=1.0):
    tvs = reference_task_vectors(pretrained, experts)
    new_merged_tv = compute_and_sum_svd_mem_reduction(tvs, exclude_keys=exclude(pretrained))
    delta = back_to(new_merged_tv, pretrained)
    new_merged_tv = state_dict_mul(state_dict=delta, scalar=alpha)
    floats = {k: v for k, v in pretrained.items() if v.is_floating_point()}
    return delta, state_dict_add(new_merged_tv, floats)


def reference_iso(pretrained, experts, alpha=1.0, common_space_fraction=None):
    tvs = reference_task_vectors(pretrained, experts)
    if common_space_fraction is None:
        merged_tv = iso_c(tvs, exclude_keys=exclude(pretrained))
    else:
        merged_tv = iso_cts(tvs, common_space_fraction, exclude_keys=exclude(pretrained))
    delta = back_to(merged_tv, pretrained)
    floats = {k: v for k, v in pretrained.items() if v.is_floating_point()}
    return delta, state_dict_add(floats, state_dict_mul(delta, alpha))


# --------------------------------------------------------------------------------------
# The pool: ViT-B/32 shapes at width 256, one block, 8 tasks, planted edge cases.
# --------------------------------------------------------------------------------------

W, T = 256, 8
SHAPES = {
    "cls_token": (1, 1, W),
    "pos_embed": (1, 50, W),
    "patch_embed.proj.weight": (W, 3, 32, 32),
    "norm_pre.weight": (W,), "norm_pre.bias": (W,),
    "blocks.0.norm1.weight": (W,), "blocks.0.norm1.bias": (W,),
    "blocks.0.attn.qkv.weight": (3 * W, W), "blocks.0.attn.qkv.bias": (3 * W,),
    "blocks.0.attn.proj.weight": (W, W), "blocks.0.attn.proj.bias": (W,),
    "blocks.0.norm2.weight": (W,), "blocks.0.norm2.bias": (W,),
    "blocks.0.mlp.fc1.weight": (4 * W, W), "blocks.0.mlp.fc1.bias": (4 * W,),
    "blocks.0.mlp.fc2.weight": (W, 4 * W), "blocks.0.mlp.fc2.bias": (W,),
    "norm.weight": (W,), "norm.bias": (W,),
    "head.weight": (160, W),
    "lowrank.weight": (40, 24),  # every task rank 1: Σt τt has rank 7 < 24
    "tiny.weight": (6, 4),  # min(m, n) = 4 < T: TSV-M's k = 0
    "text.text_projection": (128, 128),  # nonzero here: the mean, never an SVD
    "text.token_embedding.weight": (300, 64),  # zero task vectors, as in real checkpoints
    "text.logit_scale": (),
}
ZERO_TASK = T - 1  # its expert is θ0
RANK2_TASKS = (1, 2)  # rank-2 task vectors in attn.proj.weight
TIES = slice(0, 16)  # attn.proj.bias entries with Σt τt = 0: +0.25, -0.25, zeros
SILENT = slice(16, 24)  # attn.proj.bias entries no task changes


def make_pool(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g)

    pretrained = {k: randn(*s) * 0.02 for k, s in SHAPES.items()}
    pretrained["pos_embed.steps"] = torch.tensor(7)  # an integer buffer, copied from θ0
    pretrained["blocks.0.attn.proj.bias"][TIES] = 0.5
    experts = {}
    for t in range(T):
        scale = 0.002 * (0.5 + t / 4)
        tau = {k: randn(*s) * scale for k, s in SHAPES.items()}
        tau["text.token_embedding.weight"].zero_()
        tau["text.logit_scale"].zero_()
        tau["lowrank.weight"] = randn(40, 1) @ randn(1, 24) * scale
        if t in RANK2_TASKS:
            tau["blocks.0.attn.proj.weight"] = randn(W, 2) @ randn(2, W) * scale
        bias = tau["blocks.0.attn.proj.bias"]
        bias[TIES] = {0: 0.25, 1: -0.25}.get(t, 0.0)
        bias[SILENT] = 0.0
        if t == ZERO_TASK:
            tau = {k: torch.zeros_like(v) for k, v in tau.items()}
        expert = {k: pretrained[k] + tau[k] for k in SHAPES}
        expert["pos_embed.steps"] = torch.tensor(100 + t)
        experts[f"task{t}"] = expert
    return pretrained, experts


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """LAPACK's SVD on two threads of a shared 2-core machine ran 10-100x slower than on one
    (threads spinning on busy cores); one thread keeps the file within seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool():
    return make_pool()


def assert_matches(actual, expected, keys=None):
    """rtol 1e-5, atol 1e-5 of the tensor's largest magnitude (entries that cancel)."""
    for key in keys or expected:
        scale = expected[key].abs().max().item()
        assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-5 * scale + 1e-12,
                     msg=lambda m, key=key: f"{key}: {m}")


def floats(state):
    return {k: v for k, v in state.items() if v.is_floating_point()}


# --------------------------------------------------------------------------------------
# Equality to the oracles.
# --------------------------------------------------------------------------------------


def test_tsv_matches_fusionbench(pool):
    pretrained, experts = pool
    ref_delta, ref_merged = reference_tsv(pretrained, experts, alpha=1.0)
    delta = tsv_delta(pretrained, experts)
    assert set(delta) == set(ref_delta)
    assert_matches(delta, ref_delta)
    assert_matches(floats(tsv_merge(pretrained, experts)), ref_merged)
    # planted cases, as the reference treats them
    assert not delta["tiny.weight"].any()  # k = 0
    assert not delta["text.token_embedding.weight"].any()
    mean = torch.stack([e["text.text_projection"] - pretrained["text.text_projection"]
                        for e in experts.values()]).mean(0)
    assert_close(delta["text.text_projection"], mean)
    assert torch.linalg.matrix_rank(delta["pos_embed"][0]) <= 48  # a matrix: k = 6 per task


def test_tsv_alpha_scales_delta(pool):
    pretrained, experts = pool
    ref_delta, ref_merged = reference_tsv(pretrained, experts, alpha=1.7)
    merged = tsv_merge(pretrained, experts, alpha=1.7)
    assert_matches(floats(merged), ref_merged)
    assert merged["pos_embed.steps"].item() == 7


def test_iso_c_matches_fusionbench(pool):
    pretrained, experts = pool
    ref_delta, ref_merged = reference_iso(pretrained, experts, alpha=1.5)
    delta = iso_c_delta(pretrained, experts)
    assert set(delta) == set(ref_delta)
    assert_matches(delta, ref_delta)
    assert_matches(floats(iso_c_merge(pretrained, experts, alpha=1.5)), ref_merged)
    s = torch.linalg.svdvals(delta["blocks.0.mlp.fc1.weight"])
    assert_close(s, torch.full_like(s, s.mean().item()), rtol=1e-4, atol=0)  # flat spectrum


def test_iso_cts_matches_fusionbench(pool):
    """FusionBench's pools are Hugging Face's, which store the image projection as tint
    does: tint's ISO-CTS with orientation="hf" is its function on tint's layout."""
    pretrained, experts = pool
    ref_delta, ref_merged = reference_iso(pretrained, experts, alpha=1.5,
                                          common_space_fraction=0.8)
    delta = iso_cts_delta(pretrained, experts, common_fraction=0.8, orientation="hf")
    assert set(delta) == set(ref_delta)
    assert_matches(delta, ref_delta)
    merged = iso_cts_merge(pretrained, experts, alpha=1.5, common_fraction=0.8,
                           orientation="hf")
    assert_matches(floats(merged), ref_merged)


def test_iso_cts_at_another_common_fraction(pool):
    pretrained, experts = pool
    keys = ["blocks.0.attn.qkv.weight", "head.weight", "pos_embed", "tiny.weight"]
    small = {k: pretrained[k] for k in keys}
    few = {name: {k: e[k] for k in keys} for name, e in experts.items()}
    ref_delta, _ = reference_iso(small, few, common_space_fraction=0.5)
    assert_matches(iso_cts_delta(small, few, common_fraction=0.5, orientation="hf"), ref_delta)


# The image projection at ViT-B/32's real size, in each reference's own layout: the authors'
# iso_cts (danielm1405/iso-merging src/utils/iso.py) runs on open_clip state dicts, where it
# is ``visual.proj`` [768, 512] (x @ proj); FusionBench's on Hugging Face's
# ``visual_projection.weight`` [512, 768], tint's ``head.weight``. The authors' function is
# FusionBench's ``iso_cts`` above line for line, but for its skip rule (every key containing
# "text_projection" instead of ``exclude_keys``), so the transcription serves for both.
B32_OPEN_CLIP = {"head.weight": "visual.proj", "pos_embed": "visual.positional_embedding",
                 "norm.weight": "visual.ln_post.weight"}


def b32_projection_pool(tasks: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"head.weight": (512, 768), "pos_embed": (1, 50, 768), "norm.weight": (768,)}
    pretrained = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    experts = {f"task{t}": {k: v + torch.randn(v.shape, generator=g) * 0.002 * (0.5 + t / 4)
                            for k, v in pretrained.items()} for t in range(tasks)}
    return pretrained, experts


def as_open_clip(state):
    """tint's tensors as open_clip stores them (the projection transposed)."""
    return {B32_OPEN_CLIP[k]: (v.T if k == "head.weight" else v.reshape(-1, v.shape[-1])
                               if k == "pos_embed" else v) for k, v in state.items()}


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("tasks", [8, 20])
def test_iso_cts_decomposes_the_projection_as_each_reference_stores_it(tasks):
    """tint's default (a pool from open_clip's format, as the task_vectors releases and
    tint's own zoo) is the authors' iso_cts on open_clip's ``visual.proj``; orientation="hf"
    is FusionBench's on ``visual_projection.weight``. The two differ by two thirds here:
    ISO-CTS removes its common space from the left of each matrix."""
    pretrained, experts = b32_projection_pool(tasks)
    vectors = [{k: v - pretrained[k] for k, v in e.items()} for e in experts.values()]
    open_clip_vectors = [as_open_clip(v) for v in vectors]
    authors = iso_cts(open_clip_vectors, 0.8,
                      exclude_keys=[k for k in open_clip_vectors[0] if "text_projection" in k])
    fusion_bench = iso_cts([{k: v.reshape(-1, v.shape[-1]) if v.dim() == 3 else v
                             for k, v in tv.items()} for tv in vectors], 0.8)

    tint_default = iso_cts_delta(pretrained, experts)
    tint_open_clip = iso_cts_delta(pretrained, experts, orientation="open_clip")
    tint_hf = iso_cts_delta(pretrained, experts, orientation="hf")
    assert_matches(as_open_clip(tint_default), authors)
    assert_matches(as_open_clip(tint_open_clip), authors)
    assert_matches({"head.weight": tint_hf["head.weight"]},
                   {"head.weight": fusion_bench["head.weight"]})
    assert relative(tint_hf["head.weight"], tint_default["head.weight"]) > 0.3
    # the other tensors are stored alike in both formats: the same Δ either way
    assert torch.equal(tint_hf["pos_embed"], tint_default["pos_embed"])
    assert torch.equal(tint_hf["norm.weight"], tint_default["norm.weight"])


def test_emr_matches_fusionbench(pool):
    pretrained, experts = pool
    merged = emr_merge(pretrained, experts)
    assert isinstance(merged, EMRMerged)
    unified, masks, rescalers = emr_merge_reference(reference_task_vectors(pretrained, experts))
    unified = back_to(unified, pretrained)
    assert set(merged.unified) == set(unified)
    for key in unified:
        assert torch.equal(merged.unified[key], unified[key]), key
        for t, task in enumerate(merged.tasks):
            assert torch.equal(merged.mask(task, key),
                               masks[key][t].reshape(pretrained[key].shape)), (key, task)
    zero_task = f"task{ZERO_TASK}"
    for t, task in enumerate(merged.tasks):
        if task == zero_task:
            continue
        assert merged.scales[task] == pytest.approx(rescalers[t].item(), rel=1e-5)
        reference_state = {  # EMRTaskModulator.apply: θ0 + τuni * mask * rescaler
            k: pretrained[k] + unified[k] * masks[k][t].reshape(unified[k].shape) * rescalers[t]
            for k in unified}
        state = merged.task_state(task)
        assert_matches(state, reference_state)
        assert state["pos_embed.steps"].item() == 7
    # the all-zero task: the reference's rescaler is 0/0 (an all-NaN model); here θ0
    assert math.isnan(rescalers[ZERO_TASK].item())
    assert merged.scales[zero_task] == 0.0
    for k, v in merged.task_state(zero_task).items():
        assert torch.equal(v, pretrained[k]), k


def test_emr_sign_election_ties(pool):
    pretrained, experts = pool
    merged = emr_merge(pretrained, experts)
    uni = merged.unified["blocks.0.attn.proj.bias"]
    assert torch.equal(uni[TIES], torch.full((16,), -0.25))  # Σ = 0 elects '-': task1's -0.25
    assert not uni[SILENT].any()
    on = [t for t in merged.tasks if merged.mask(t, "blocks.0.attn.proj.bias")[TIES].any()]
    assert on == ["task1"]
    assert not merged.mask("task0", "blocks.0.attn.proj.bias")[TIES].any()


# --------------------------------------------------------------------------------------
# Smaller properties.
# --------------------------------------------------------------------------------------


def test_pack_bits_round_trip():
    g = torch.Generator().manual_seed(1)
    for shape in [(), (1,), (7,), (8,), (3, 5, 2), (13, 11)]:
        mask = torch.rand(shape, generator=g) > 0.5
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(mask.numel() / 8)
        assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_bf16_experts_are_merged_in_float32():
    g = torch.Generator().manual_seed(2)
    pretrained = {"w": (torch.randn(24, 16, generator=g) * 0.02).bfloat16(),
                  "b": torch.zeros(16, dtype=torch.bfloat16), "n": torch.tensor(3)}
    experts = {f"t{t}": {"w": pretrained["w"] + (torch.randn(24, 16, generator=g) * 0.01)
                         .bfloat16(), "b": torch.full((16,), 0.5 * t, dtype=torch.bfloat16),
                         "n": torch.tensor(9)} for t in range(3)}
    for delta in (tsv_delta(pretrained, experts), iso_c_delta(pretrained, experts),
                  iso_cts_delta(pretrained, experts)):
        assert delta["w"].dtype == torch.float32 and set(delta) == {"w", "b"}
        assert_close(delta["b"], torch.full((16,), 0.5))
    for merged in (tsv_merge(pretrained, experts), iso_c_merge(pretrained, experts),
                   iso_cts_merge(pretrained, experts),
                   emr_merge(pretrained, experts).task_state("t1")):
        assert merged["w"].dtype == torch.bfloat16 and merged["n"].item() == 3


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_alpha_must_be_positive_and_finite(bad):
    for check in (check_tsv, check_iso_c, check_iso_cts):
        with pytest.raises(ValueError, match="alpha"):
            check({"alpha": bad})
    with pytest.raises(ValueError, match="alpha"):
        tsv_merge({}, {"a": {}}, alpha=bad)


@pytest.mark.parametrize("bad", [0, 0.0, -0.2, 1.5, float("nan"), float("inf")])
def test_common_fraction_in_zero_one(bad):
    with pytest.raises(ValueError, match=r"common_fraction=.* must be a fraction in \(0, 1\]"):
        check_iso_cts({"alpha": 1.0, "common_fraction": bad})


def test_good_parameters_pass():
    check_tsv({"alpha": 0.1})
    check_iso_c({"alpha": 3})
    check_iso_cts({"alpha": 1.0, "common_fraction": 1.0})
    check_iso_cts({"alpha": 1.0, "common_fraction": 0.05})


def test_emr_needs_two_tasks():
    with pytest.raises(ValueError, match="EMR needs at least two tasks"):
        check_emr_tasks(1)
    state = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="EMR needs at least two tasks"):
        emr_merge(state, {"only": {"w": torch.zeros(2)}})


def test_svd_failure_names_tensor_and_method():
    pretrained = {"blocks.0.attn.proj.weight": torch.zeros(4, 4)}
    experts = {"a": {"blocks.0.attn.proj.weight": torch.full((4, 4), float("nan"))},
               "b": {"blocks.0.attn.proj.weight": torch.ones(4, 4)}}
    for fn, name in ((tsv_delta, "TSV-M"), (iso_c_delta, "ISO-C"), (iso_cts_delta, "ISO-CTS")):
        with pytest.raises(TintError, match=f"{name}: the SVD of 'blocks.0.attn.proj.weight'"):
            fn(pretrained, experts)


def test_iso_cts_too_small_a_matrix_for_the_pool_is_an_error():
    # r = 6 < T = 8 at f = 0.1: c = 6 - round(6 / 8) * 8 = -2, where the reference fails
    pretrained = {"w": torch.zeros(6, 7)}
    g = torch.Generator().manual_seed(3)
    experts = {f"t{t}": {"w": torch.randn(6, 7, generator=g)} for t in range(T)}
    with pytest.raises(TintError, match="ISO-CTS: 'w' .* too small for 8 tasks"):
        iso_cts_delta(pretrained, experts, common_fraction=0.1)
    assert iso_cts_delta(pretrained, experts, common_fraction=0.8, device="cpu")["w"].any()
