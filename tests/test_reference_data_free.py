"""Consensus TA, PCB-Merging, LiNeS (task arithmetic) and CART against transcriptions of the
authors' code (the papers and their code).

Each ORACLE below transcribes the authors' functions (their loops, names and arithmetic; the
logging, file I/O and evaluation removed) and runs, as theirs does, on an open_clip
``ImageEncoder`` state dict (``model.visual.transformer.resblocks.{i}...`` plus the text-tower
leftovers). The inputs are random B/32-like models in tint's timm layout, renamed to open_clip
for the oracle and back for the comparison, with planted edge cases: an all-zero task vector,
exact ties, rank-deficient matrices. Nothing here imports the oracles from tintcli.merging.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from tintcli.merging.cart import cart_merge, check_cart, is_lowrank_matrix
from tintcli.merging.consensus import check_consensus, consensus_merge, tall_masks
from tintcli.merging.lines import block_index, check_lines, lines_ta_merge, num_blocks
from tintcli.merging.pcb import check_pcb, pcb_merge

N_TASKS = 8
DATASETS = [f"task{i}" for i in range(N_TASKS)]
ZERO_TASK = 3  # its expert is theta_0 itself
LAMBDAS = dict(zip(DATASETS, (0.5, 0.2, 0.3, 0.4, 0.6, 0.3, 0.4, 0.5), strict=True))
TIE = "blocks.0.norm1.weight"  # entries 0..3 hold an exact TALL-mask tie (see make_models)
RTOL, ATOL = 1e-5, 1e-8  # entries are ~0.05, so ATOL is ~2e-7 of a typical one


# --------------------------------------------------------------------------------------------
# Random B/32-like models in tint's timm layout, and the renaming to open_clip's.


def timm_shapes(width: int, blocks: int, embed: int, vocab: int) -> dict[str, tuple]:
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, 17, width),
              "patch_embed.proj.weight": (width, 3, 8, 8),
              "norm_pre.weight": (width,), "norm_pre.bias": (width,)}
    for i in range(blocks):
        b = f"blocks.{i}."
        shapes |= {b + "norm1.weight": (width,), b + "norm1.bias": (width,),
                   b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
                   b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
                   b + "norm2.weight": (width,), b + "norm2.bias": (width,),
                   b + "mlp.fc1.weight": (4 * width, width), b + "mlp.fc1.bias": (4 * width,),
                   b + "mlp.fc2.weight": (width, 4 * width), b + "mlp.fc2.bias": (width,)}
    return shapes | {"norm.weight": (width,), "norm.bias": (width,), "head.weight": (embed, width),
                     "text.token_embedding.weight": (vocab, embed),
                     "text.positional_embedding": (77, embed), "text.ln_final.weight": (embed,),
                     "text.ln_final.bias": (embed,), "text.text_projection": (embed, embed),
                     "text.logit_scale": ()}


def make_models(seed: int = 0, width: int = 256, blocks: int = 2, quantized: bool = False,
                zero_task: bool = True):
    """theta_0 and T experts (dicts of timm-named tensors, plus an integer buffer).

    ``quantized``: every value a multiple of 2**-7 on a few levels, so magnitudes tie
    everywhere (PCB's quantiles and threshold fall on ties). Planted in every model: task
    ZERO_TASK's vector is zero (if ``zero_task``), ``text.*`` task vectors are zero,
    ``TIE[0:4]`` has |tau_0| == 0.5 * |tau - tau_0| exactly, ``blocks.1.attn.proj.weight``
    has rank-1 task vectors and ``blocks.0.mlp.fc2.weight`` one shared rank-2 task vector."""
    g = torch.Generator().manual_seed(seed)
    embed, vocab = (128, 300) if width > 16 else (4, 10)
    shapes = timm_shapes(width, blocks, embed, vocab)
    if quantized:
        draw = lambda shape, scale: torch.randint(-6, 7, shape, generator=g).float() / 2**7  # noqa: E731
    else:
        draw = lambda shape, scale: torch.randn(shape, generator=g) * scale  # noqa: E731
    pretrained = {k: draw(s, 0.05) for k, s in shapes.items()}
    pretrained["steps"] = torch.tensor(7)
    taus = [{k: torch.zeros(s) if k.startswith("text.") else draw(s, 0.01)
             for k, s in shapes.items()} for _ in range(N_TASKS)]
    if blocks > 1:
        rows, cols = shapes["blocks.1.attn.proj.weight"]
        for tau in taus:
            tau["blocks.1.attn.proj.weight"] = torch.outer(draw((rows,), 0.1), draw((cols,), 0.1))
    rows, cols = shapes["blocks.0.mlp.fc2.weight"]
    shared = draw((rows, 2), 0.1) @ draw((2, cols), 0.1)
    for tau in taus:
        tau["blocks.0.mlp.fc2.weight"] = shared.clone()
    # TALL tie: theta_0 = 0.5, tau_0 = 0.25, tau_1 = 0.5, others 0: with lambda_0 = 0.5,
    # |tau_0| = 0.25 = 0.5 * |tau - tau_0| exactly; only tau_1's mask holds under ">"
    pretrained[TIE][:4] = 0.5
    for t, tau in enumerate(taus):
        tau[TIE][:4] = {0: 0.25, 1: 0.5}.get(t, 0.0)
    experts = {}
    for t, (name, tau) in enumerate(zip(DATASETS, taus, strict=True)):
        expert = {k: v.clone() if (zero_task and t == ZERO_TASK) or k == "steps" else v + tau[k]
                  for k, v in pretrained.items()}
        expert["steps"] = torch.tensor(100 + t)
        experts[name] = expert
    return pretrained, experts


_BLOCK_RENAMES = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "attn.in_proj_weight",
                  "attn.qkv.bias": "attn.in_proj_bias", "attn.proj": "attn.out_proj",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_TOP_RENAMES = {"norm_pre": "ln_pre", "norm": "ln_post"}


def open_clip_name(key: str) -> str:
    """tint's timm key -> the key of the same tensor in a task_vectors ImageEncoder."""
    if key.startswith("text."):
        return "model." + key[len("text."):]
    special = {"cls_token": "class_embedding", "pos_embed": "positional_embedding",
               "head.weight": "proj", "patch_embed.proj.weight": "conv1.weight"}
    if key in special:
        return "model.visual." + special[key]
    if m := re.match(r"blocks\.(\d+)\.(.*)", key):
        rest = m.group(2)
        for old, new in _BLOCK_RENAMES.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        return f"model.visual.transformer.resblocks.{m.group(1)}.{rest}"
    for old, new in _TOP_RENAMES.items():
        if key.startswith(old + "."):
            return "model.visual." + new + key[len(old):]
    raise AssertionError(key)


def to_open_clip(state):
    """Float entries renamed and reshaped as open_clip holds them (proj is head.weight^T)."""
    out = {}
    for key, v in state.items():
        if not v.is_floating_point():
            continue
        v = v.reshape(-1) if key == "cls_token" else v[0] if key == "pos_embed" else v
        out[open_clip_name(key)] = v.t().contiguous() if key == "head.weight" else v.clone()
    return out


def from_open_clip(state, like):
    """Back to timm names and shapes, for the float keys of ``like``."""
    out = {}
    for key, v in like.items():
        if v.is_floating_point():
            w = state[open_clip_name(key)]
            out[key] = (w.t() if key == "head.weight" else w).reshape(v.shape)
    return out


def assert_matches(ours, expected, pretrained, atol=ATOL):
    """Every float entry close to the oracle's; the integer buffer is theta_0's, and the
    ``text.*`` extras (zero task vectors) are theta_0's exactly."""
    assert list(ours) == list(pretrained)
    assert ours["steps"].item() == 7
    expected = from_open_clip(expected, pretrained)
    assert set(expected) == {k for k in pretrained if k != "steps"}
    for key, value in expected.items():
        assert_close(ours[key], value, rtol=RTOL, atol=atol, msg=lambda m, key=key: f"{key}: {m}")
        if key.startswith("text."):
            assert torch.equal(ours[key], pretrained[key]), key


# --------------------------------------------------------------------------------------------
# ORACLE: nik-dim/tall_masks (src/utils/utils.py, src/utils/tallmask_utils.py,
# src/eval/aggregation.py, src/models/task_vectors.py), method "consensus", k=100.


def state_dict_to_vector(state_dict, remove_keys=[]):  # noqa: B006 (as the authors wrote it)
    shared_state_dict = copy.deepcopy(state_dict)
    for key in remove_keys:
        if key in shared_state_dict:
            del shared_state_dict[key]
    sorted_shared_state_dict = OrderedDict(sorted(shared_state_dict.items()))
    return torch.nn.utils.parameters_to_vector(
        [value.reshape(-1) for key, value in sorted_shared_state_dict.items()])


def vector_to_state_dict(vector, state_dict, remove_keys=[]):  # noqa: B006
    reference_dict = copy.deepcopy(state_dict)
    for key in remove_keys:
        if key in reference_dict:
            del reference_dict[key]
    sorted_reference_dict = OrderedDict(sorted(reference_dict.items()))
    torch.nn.utils.vector_to_parameters(vector, sorted_reference_dict.values())
    return sorted_reference_dict


def topk_values_mask(M, K=0.7, return_mask=False, reshape_mask=False):
    if K == 100:
        if return_mask:
            return M, torch.ones_like(M), None
        else:
            return M, torch.ones_like(M)
    raise NotImplementedError("the consensus config uses k: 100")


def generate_task_masks(tv_flat_checks, flat_ft, flat_ptm, tv=None, tall_mask_lambda=1.0):
    if tv is None:
        tv = tv_flat_checks.sum(0)
    flat_multi = flat_ptm + tv
    original_shape = flat_ft.shape
    diff_pt_ft = (flat_ptm - flat_ft).abs()
    diff_multi_ft = (flat_multi - flat_ft).abs()
    mask = diff_pt_ft > diff_multi_ft * tall_mask_lambda
    final_mask = mask.squeeze() if original_shape == tv_flat_checks.squeeze().shape else mask
    return final_mask


def construct_tall_mask(tv_flat_checks, flat_ft, flat_ptm, merged_tv, ptm_check, remove_keys,
                        DATASETS):
    tall_masks = {}
    for tall_mask_lambda in [0.2, 0.3, 0.4, 0.5, 0.6]:
        masks_at_scale = generate_task_masks(
            tv_flat_checks, flat_ft, flat_ptm, tall_mask_lambda=tall_mask_lambda, tv=merged_tv)
        masks_at_scale = [vector_to_state_dict(mask, ptm_check, remove_keys=remove_keys)
                          for mask in masks_at_scale]
        tall_masks[tall_mask_lambda] = {key: value for key, value
                                        in zip(DATASETS, masks_at_scale, strict=True)}
    return tall_masks


def find_optimal_mask(best_lambdas, eval_masks, DATASETS):
    """The authors pick best_lambda per task by validation accuracy; here it is given.
    Saved as np.packbits of the flattened masks, as theirs."""
    best_masks_for_test_vector = {}
    for ds in DATASETS:
        best_lambda = float(best_lambdas[ds])
        best_masks_for_test_vector[ds] = state_dict_to_vector(eval_masks[best_lambda][ds],
                                                              remove_keys=[])
    return {k: np.packbits(v) for k, v in best_masks_for_test_vector.items()}


def load_tall_mask(saved, remove_keys, ptm_check):
    tall_masks = {k: torch.from_numpy(np.unpackbits(v)) for k, v in saved.items()}
    tall_masks = {dataset: vector_to_state_dict(mask, ptm_check, remove_keys=remove_keys)
                  for dataset, mask in tall_masks.items()}
    return tall_masks


def construct_consensus_mask(saved, ptm_check, prun_thre_k, remove_keys=[]):  # noqa: B006
    tall_masks = load_tall_mask(saved, remove_keys, ptm_check)
    tall_masks = list(tall_masks.values())
    consensus_mask = copy.deepcopy(tall_masks[0])
    for key, value in consensus_mask.items():
        consensus_mask[key] = torch.zeros_like(value)
        for mask in tall_masks:
            consensus_mask[key] = consensus_mask[key] + mask[key].float()
        consensus_mask[key] = consensus_mask[key].float() >= prun_thre_k
    consensus_mask_vector = state_dict_to_vector(consensus_mask, remove_keys=remove_keys)
    return consensus_mask_vector


def consensus_oracle(ptm_check, ft_checks, best_lambdas, prun_thre_k, scaling_coef):
    """create_task_vector ("tall_mask", then "consensus") and apply_to(scaling_coef)."""
    remove_keys = []
    flat_ft = torch.vstack([state_dict_to_vector(check, remove_keys) for check in ft_checks])
    flat_ptm = state_dict_to_vector(ptm_check, remove_keys)
    tv_flat_checks = flat_ft - flat_ptm
    # method "tall_mask" (use_ties false, k 100)
    tv_flat_checks, _ = topk_values_mask(tv_flat_checks, K=100, return_mask=False)
    merged_tv = tv_flat_checks.sum(dim=0)
    eval_masks = construct_tall_mask(tv_flat_checks, flat_ft, flat_ptm, merged_tv, ptm_check,
                                     remove_keys, DATASETS)
    saved = find_optimal_mask(best_lambdas, eval_masks, DATASETS)
    # method "consensus" (use_ties false, k 100)
    consensus_mask = construct_consensus_mask(saved, ptm_check, prun_thre_k, remove_keys)
    merged_tv = tv_flat_checks.sum(dim=0)
    merged_tv = merged_tv * consensus_mask
    vector = vector_to_state_dict(merged_tv, ptm_check, remove_keys=remove_keys)
    merged = {key: ptm_check[key] + scaling_coef * vector[key] for key in ptm_check}
    chosen = {ds: eval_masks[best_lambdas[ds]][ds] for ds in DATASETS}
    return merged, chosen


# --------------------------------------------------------------------------------------------
# ORACLE: duguodong7/pcb-merging, vision_source_code/pcb.py (__main__) with load_vit from
# vision_source_code/utils/tpa_utils.py. ``zero_span_is_zero`` is the one addition: where
# normalize divides 0 by 0 (a zero task vector) the authors' code gives NaN; tint gives 0.


def normalize(x, dim=0, zero_span_is_zero=False):
    min_values, _ = torch.min(x, dim=dim, keepdim=True)
    max_values, _ = torch.max(x, dim=dim, keepdim=True)
    y = (x - min_values) / (max_values - min_values)
    if zero_span_is_zero:
        y = torch.nan_to_num(y, nan=0.0)
    return y


def clamp(x, min_ratio=0, max_ratio=0):
    if len(x.size()) == 1:
        d = x.size(0)
        sorted_x, _ = torch.sort(x)
        min = sorted_x[int(d * min_ratio)]  # noqa: A001
        max = sorted_x[int(d * (1 - max_ratio) - 1)]  # noqa: A001
    else:
        d = x.size(1)
        sorted_x, _ = torch.sort(x, dim=1)
        min = sorted_x[:, int(d * min_ratio)].unsqueeze(1)  # noqa: A001
        max = sorted_x[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)  # noqa: A001
    clamped_x = torch.clamp(x, min, max)
    return clamped_x


def act(x):
    y = torch.tanh(x)
    return y


def pcb_oracle(ptm_check, ft_checks, att_ratio=0.05, zero_span_is_zero=False):
    remove_keys = []
    flat_ft = torch.vstack([state_dict_to_vector(check, remove_keys) for check in ft_checks])
    flat_ptm = state_dict_to_vector(ptm_check, remove_keys)
    tv_flat_checks = flat_ft - flat_ptm
    norm = lambda x, dim: normalize(x, dim, zero_span_is_zero)  # noqa: E731

    all_checks = tv_flat_checks
    n, d = all_checks.shape
    all_checks_abs = clamp(torch.abs(all_checks), min_ratio=0.01, max_ratio=0.01)
    clamped_all_checks = torch.sign(all_checks) * all_checks_abs
    all_checks_normalized = torch.sign(all_checks) * norm(all_checks_abs, dim=1)
    intra = norm(all_checks_abs, 1)**2
    intra = torch.exp(n * intra)
    inter = all_checks * torch.sum(all_checks_normalized, dim=0)
    inter = act(inter)
    balancing = intra * inter
    scale = norm(clamp(balancing, 1 - att_ratio, 0), dim=1)
    lams = torch.tensor([1.2] * n).unsqueeze(1)
    tvs = clamped_all_checks * lams
    merged_tv = torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
    reference_state_dict = ft_checks[0]
    merged_check = flat_ptm + merged_tv
    return vector_to_state_dict(merged_check, reference_state_dict, remove_keys=remove_keys)


# --------------------------------------------------------------------------------------------
# ORACLE: wang-kee/LiNeS, src/eval/eval.py (LiNeS_scaling, evaluate with apply_lines) and
# src/eval/aggregation.py (method "sum", k=100).


class NonLinearTaskVector:
    def __init__(self, vector):
        self.vector = vector

    def apply_to(self, pretrained_state_dict, scaling_coef=1.0):
        new_state_dict = {}
        for key in pretrained_state_dict:
            new_state_dict[key] = (pretrained_state_dict[key].to(self.vector[key].device)
                                   + scaling_coef * self.vector[key])
        return new_state_dict


def LiNeS_scaling(task_vector, alpha, beta, num_blocks):  # noqa: N802
    scaled_task_vector = copy.deepcopy(task_vector)
    key_blocks = list(f".{i}." for i in range(0, num_blocks))
    layer_scalings_dict = {}
    for k in scaled_task_vector.vector.keys():
        for layer, block in enumerate(key_blocks):
            if block in k:
                layer_scalings_dict[k] = alpha + beta * (layer / (num_blocks - 1))
                break
    scaled_task_vector.vector = {
        k: scaled_task_vector.vector[k] * layer_scalings_dict.get(k, alpha)
        for k in scaled_task_vector.vector.keys()
    }
    return scaled_task_vector


def lines_oracle(ptm_check, ft_checks, scaling_coef, num_blocks):
    remove_keys = []
    flat_ft = torch.vstack([state_dict_to_vector(check, remove_keys) for check in ft_checks])
    flat_ptm = state_dict_to_vector(ptm_check, remove_keys)
    tv_flat_checks = flat_ft - flat_ptm
    tv_flat_checks, _ = topk_values_mask(tv_flat_checks, K=100, return_mask=False)
    merged_tv = tv_flat_checks.sum(dim=0)
    norm_mtv = (merged_tv).abs().sum().item()
    norm_summed_tvs = (tv_flat_checks.sum(dim=0)).abs().sum().item()
    merged_tv_state_dict = vector_to_state_dict(merged_tv, ptm_check, remove_keys=remove_keys)
    task_vector = NonLinearTaskVector(vector=merged_tv_state_dict)
    num_tasks = len(ft_checks)
    alpha = (norm_summed_tvs / norm_mtv) * 1 / num_tasks
    task_vector = LiNeS_scaling(task_vector, alpha=alpha, beta=scaling_coef,
                                num_blocks=num_blocks)
    return task_vector.apply_to(ptm_check, scaling_coef=1.0)


# --------------------------------------------------------------------------------------------
# ORACLE: JH-GEECS/CART, src/merging.py (StaticMergeModule: _get_origin,
# _get_truncated_task_vectors with prev/new origin and a float rank_ratio,
# _merge_weights("CART")) and src/models/task_vectors.py (TaskVector).


class TaskVector:
    def __init__(self, pretrained_checkpoint=None, finetuned_checkpoint=None, vector=None):
        if vector is not None:
            self.vector = vector
        else:
            self.vector = {}
            for key in pretrained_checkpoint:
                self.vector[key] = finetuned_checkpoint[key] - pretrained_checkpoint[key]

    def __add__(self, other):
        new_vector = {}
        all_keys = set(self.vector.keys()).union(set(other.vector.keys()))
        for key in all_keys:
            if key in self.vector and key in other.vector:
                new_vector[key] = self.vector[key] + other.vector[key]
            elif key in self.vector:
                new_vector[key] = self.vector[key]
            else:
                new_vector[key] = other.vector[key]
        return TaskVector(vector=new_vector)

    def __radd__(self, other):
        if other is None or isinstance(other, int):
            return self
        return self.__add__(other)


class StaticMergeModule:
    def __init__(self, prior, initial_rank_ratio, tasks, pretrained_state_dict, task_vectors):
        self.prior, self.initial_rank_ratio, self.tasks = prior, initial_rank_ratio, tasks
        self.pretrained_state_dict = pretrained_state_dict
        self.task_vectors = task_vectors

    def _get_truncated_task_vectors(self, rank_ratio, prev_origin, new_origin):
        decomposed_task_vectors = []
        for task_vector in self.task_vectors:
            svd_vector = {}
            for key, value in task_vector.vector.items():
                if ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key):
                    _val = (value + prev_origin[key] - new_origin[key])
                    U, s, V_T = torch.linalg.svd(_val, full_matrices=False)
                    dim = s.shape[0]
                    if rank_ratio == 0.0:
                        U = torch.zeros_like(U)
                        s = torch.zeros_like(s)
                        V_T = torch.zeros_like(V_T)
                        parsed_dim = 1
                    elif rank_ratio == 1.0:
                        parsed_dim = dim
                    else:
                        parsed_dim: int = max(1, int(rank_ratio * dim))
                    recon = (U[:, :parsed_dim] * s[:parsed_dim]) @ V_T[:parsed_dim, :]
                    svd_vector[key] = recon
                else:
                    svd_vector[key] = (value + prev_origin[key] - new_origin[key])
                    if rank_ratio == 0.0:
                        svd_vector[key] = torch.zeros_like(svd_vector[key])
            decomposed_task_vectors.append(TaskVector(vector=svd_vector))
        return decomposed_task_vectors

    def _get_origin(self, coeff):
        state_dict = copy.deepcopy(self.pretrained_state_dict)
        processed_tvec = sum(self.task_vectors)
        for key in state_dict.keys():
            state_dict[key] = state_dict[key] + coeff * processed_tvec.vector[key]
        return state_dict

    def _merge_weights(self):
        avg_coeff = 1.0 / len(self.tasks)
        _theta_avg = self._get_origin(avg_coeff)
        state_dict = copy.deepcopy(self.pretrained_state_dict)
        lowrank_processed_tvec = sum(self._get_truncated_task_vectors(
            rank_ratio=self.initial_rank_ratio, prev_origin=state_dict, new_origin=_theta_avg))
        merge_coeff = self.prior
        for key in _theta_avg.keys():
            _theta_avg[key] = _theta_avg[key] + merge_coeff * lowrank_processed_tvec.vector[key]
        return _theta_avg


def cart_oracle(ptm_check, ft_checks, prior, initial_rank_ratio):
    task_vectors = [TaskVector(ptm_check, ft) for ft in ft_checks]
    module = StaticMergeModule(prior, initial_rank_ratio, DATASETS, ptm_check, task_vectors)
    return module._merge_weights()


# --------------------------------------------------------------------------------------------
# The tests.


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a loaded 2-core machine, two OpenMP threads make each small SVD ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return make_models()


def open_clip_inputs(pretrained, experts):
    return to_open_clip(pretrained), [to_open_clip(e) for e in experts.values()]


@pytest.mark.parametrize(("lambdas", "min_agreement", "alpha"),
                         [(LAMBDAS, 2, 0.4), (dict.fromkeys(DATASETS, 0.3), 3, 1.0)])
def test_consensus_equals_the_reference(models, lambdas, min_agreement, alpha):
    pretrained, experts = models
    ptm, fts = open_clip_inputs(pretrained, experts)
    expected, chosen = consensus_oracle(ptm, fts, lambdas, min_agreement, scaling_coef=alpha)
    one_lambda = len(set(lambdas.values())) == 1  # then pass it as one number
    ours = consensus_merge(pretrained, experts, alpha=alpha, min_agreement=min_agreement,
                           lambdas=lambdas["task0"] if one_lambda else lambdas)
    assert_matches(ours, expected, pretrained)
    masks = tall_masks(pretrained, experts, lambdas)
    for task in DATASETS:
        for key, mask in from_open_clip(chosen[task], pretrained).items():
            assert torch.equal(masks[task][key], mask.bool()), (task, key)
    # the planted cases: entries kept by exactly min_agreement masks, the zero task's empty
    # mask, and (lambda_0 = 0.5) the strict tie that leaves TIE[:4] to task 1 alone
    counts = torch.cat([sum(masks[t][k].int() for t in DATASETS).flatten() for k in masks["task0"]])
    assert (counts == min_agreement).any()
    assert not any(m.any() for m in masks[DATASETS[ZERO_TASK]].values())
    if lambdas["task0"] == 0.5:
        assert not masks["task0"][TIE][:4].any() and masks["task1"][TIE][:4].all()


@pytest.mark.parametrize("quantized", [False, True])
def test_pcb_equals_the_reference(quantized):
    # continuous values with a zero task vector, or tied values without one
    pretrained, experts = make_models(seed=1, width=128, quantized=quantized,
                                     zero_task=not quantized)
    ptm, fts = open_clip_inputs(pretrained, experts)
    expected = pcb_oracle(ptm, fts, zero_span_is_zero=not quantized)
    assert_matches(pcb_merge(pretrained, experts), expected, pretrained)
    flat = torch.stack([state_dict_to_vector(f) for f in fts]) - state_dict_to_vector(ptm)
    magnitudes = clamp(flat.abs(), min_ratio=0.01, max_ratio=0.01)
    if quantized:  # the ties the inputs plant at the clip quantiles
        d = flat.shape[1]
        ordered = flat.abs().sort(dim=1).values
        for index in (int(d * 0.01), int(d * 0.99 - 1)):
            assert ((flat.abs() == ordered[:, index:index + 1]).sum(1) > 1).all()
    else:  # the authors' normalize turns the zero task vector into NaN (hence everything)
        assert not flat[ZERO_TASK].any()
        assert normalize(magnitudes, 1)[ZERO_TASK].isnan().all()


def test_pcb_ties_at_the_balancing_threshold():
    """Quantized task vectors give tied balancing scores at the top-pcb_ratio threshold."""
    pretrained, experts = make_models(seed=2, width=32, quantized=True, zero_task=False)
    ptm, fts = open_clip_inputs(pretrained, experts)
    expected = pcb_oracle(ptm, fts, att_ratio=0.2)
    assert_matches(pcb_merge(pretrained, experts, pcb_ratio=0.2), expected, pretrained)
    # the oracle's balancing scores, recomputed: ties at each task's threshold
    flat = torch.stack([state_dict_to_vector(f) for f in fts]) - state_dict_to_vector(ptm)
    n, d = flat.shape
    normalised = normalize(clamp(flat.abs(), 0.01, 0.01), 1)
    balancing = (torch.exp(n * normalised**2)
                 * torch.tanh(flat * (torch.sign(flat) * normalised).sum(0)))
    threshold = balancing.sort(dim=1).values[:, int(d * (1 - 0.2))].unsqueeze(1)
    assert ((balancing == threshold).sum(1) > 1).all()


@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_lines_equals_the_reference(models, beta):
    pretrained, experts = models
    ptm, fts = open_clip_inputs(pretrained, experts)
    expected = lines_oracle(ptm, fts, scaling_coef=beta, num_blocks=2)
    assert_matches(lines_ta_merge(pretrained, experts, beta=beta), expected, pretrained)


def test_lines_blocks_of_the_real_b32_layout():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch32_clip_quickgelu_224", num_classes=512)
    keys = list(model.state_dict())
    assert num_blocks(keys) == 12
    assert block_index("blocks.11.mlp.fc1.weight") == 11
    assert block_index("blocks.1.norm1.bias") == 1
    others = [k for k in keys if block_index(k) is None]
    assert others == ["cls_token", "pos_embed", "patch_embed.proj.weight", "norm_pre.weight",
                      "norm_pre.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert block_index("text.token_embedding.weight") is None
    # CART's matrices: the 4 attention / MLP weights of every block, no norm, bias or head
    lowrank = [k for k, v in model.state_dict().items() if is_lowrank_matrix(k, v)]
    assert len(lowrank) == 48
    assert {k.split(".", 2)[2] for k in lowrank} == {
        "attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"}


@pytest.mark.parametrize(("width", "lam", "rank_fraction"),
                         [(256, 2.0, 0.12), (64, 1.9, 0.32), (4, 2.0, 0.12), (4, 1.5, 1.0)])
def test_cart_equals_the_reference(width, lam, rank_fraction):
    # width 4: min(m, n) * 0.12 < 1, so k = max(1, 0) = 1
    pretrained, experts = make_models(seed=3, width=width)
    ptm, fts = open_clip_inputs(pretrained, experts)
    expected = cart_oracle(ptm, fts, prior=lam, initial_rank_ratio=rank_fraction)
    # atol 1e-7: the reference adds lam * sum_t (theta_t - theta_avg), zero up to rounding
    # (~1e-8), to every entry, and its SVDs of other sums round differently
    assert_matches(cart_merge(pretrained, experts, lam=lam, rank_fraction=rank_fraction),
                   expected, pretrained, atol=1e-7)


def test_slices_give_the_same_merge(monkeypatch):
    """The element-wise passes run over slices of at most CHUNK entries of a tensor; slices
    cutting through tensors (here 1009 entries) change nothing but the last bit of a few sums
    (torch's sum over the T rows groups its additions by the slice's shape)."""
    import tintcli.merging.task_vectors as task_vectors


    pretrained, experts = make_models(seed=4, width=32)
    merges = (lambda: consensus_merge(pretrained, experts, lambdas=LAMBDAS),
              lambda: pcb_merge(pretrained, experts), lambda: lines_ta_merge(pretrained, experts),
              lambda: cart_merge(pretrained, experts))
    whole = [merge() for merge in merges]
    masks = tall_masks(pretrained, experts, LAMBDAS)
    monkeypatch.setattr(task_vectors, "CHUNK", 1009)
    for merge, expected in zip(merges, whole, strict=True):
        for key, value in merge().items():
            assert_close(value, expected[key], rtol=1e-6, atol=1e-8)
    sliced = tall_masks(pretrained, experts, LAMBDAS)
    assert all(torch.equal(sliced[t][k], m) for t in masks for k, m in masks[t].items())


@pytest.mark.parametrize(("check", "params", "message"), [
    (check_consensus, {"alpha": float("nan")}, "alpha=nan"),
    (check_consensus, {"min_agreement": 0}, "min_agreement=0"),
    (check_consensus, {"lambdas": {"task0": -0.1}}, "lambdas.task0=-0.1"),
    (check_consensus, {"lambdas": float("inf")}, "lambdas=inf"),
    (check_pcb, {"pcb_ratio": 0}, "pcb_ratio=0"),
    (check_pcb, {"pcb_ratio": 1.5}, "pcb_ratio=1.5"),
    (check_pcb, {"min_ratio": 0.6}, "min_ratio=0.6"),
    (check_pcb, {"lam": float("inf")}, "lam=inf"),
    (check_lines, {"beta": float("nan")}, "beta=nan"),
    (check_lines, {"alpha": "x"}, "alpha=x"),
    (check_cart, {"rank_fraction": 0}, "rank_fraction=0"),
    (check_cart, {"rank_fraction": 1.2}, "rank_fraction=1.2"),
    (check_cart, {"lam": float("nan")}, "lam=nan"),
])
def test_checks_reject_bad_parameters(check, params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check(params)
    check({})  # absent keys pass


def test_checks_accept_the_defaults():
    check_consensus({"alpha": 0.3, "lambdas": LAMBDAS, "min_agreement": 2})
    check_pcb({"pcb_ratio": 1, "min_ratio": 0.0, "max_ratio": 0.01, "lam": 1.2})
    check_lines({"alpha": None, "beta": 0.5})
    check_cart({"lam": 2.0, "rank_fraction": 1.0})
