"""WEMoE, weight-ensembling mixture of experts (Tang et al., ICML 2024,
https://arxiv.org/abs/2402.00433): task arithmetic (λ 0.3) everywhere but the MLPs; in every
block (or the blocks ``blocks`` names) the MLP becomes

    MLP(x; θ0 + Σt wt(x)·τt),   w(x) = mean over tokens of Router(x) ∈ R^T (no softmax),
    Router = Linear(d, d) → ReLU → Linear(d, T), weights N(0, 0.01²), last bias 0.3,

so each input gets its own mixture of the task vectors' MLPs. Only the routers learn: the
summed entropy of one batch per task on unlabeled test images, Adam. One model for every task,
routed per input; it holds the T task vectors of every routed MLP (B/32 × 8: 574 M parameters
counted as the authors do, against 113 M for task arithmetic: ``wemoe_memory``).

Two presets, since the numbers people compare against come from both: the authors'
(tanganke/weight-ensembling_MoE: per-sample routing while training, lr 1e-3 for B/32 with
cosine annealing over the 1,000 steps) and FusionBench's (``fusion_bench.method.we_moe``:
routing weights averaged over the batch while training, constant lr 1e-4; per-sample at
evaluation, as FusionBench switches to after training). Evaluation is always per sample.

The routed MLP forms each sample's weights θ0 + Σt wt·τt (one einsum) and applies them with a
batched matmul: the per-sample merge FusionBench runs as a loop of ``functional_call``, at the
cost of one weight copy per sample (chunked at evaluation, where nothing is kept for backward).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from tintcli.adaptation.losses import entropy
from tintcli.adaptation.run import (
    AdaptationContext,
    AdaptationRun,
    check_common,
)
from tintcli.checks import number, one_of, whole
from tintcli.encoders import meta_encoder
from tintcli.io import StateDict, encoder_entries
from tintcli.memory import MemoryModel, activation_bytes
from tintcli.merged import Merged
from tintcli.merging.task_arithmetic import task_arithmetic_merge
from tintcli.methods import Outcome, declared_values, register

LINEARS = ("fc1", "fc2")  # a timm Mlp: fc1 → act → (norm) → fc2
EVAL_CHUNK = 64           # samples whose weights are formed at once without autograd


class Router(nn.Module):
    """Linear(d, d) → ReLU → Linear(d, T), as the authors and FusionBench's ``Depth_2_Gate``
    initialise it: weights N(0, 0.01²), first bias 0, last bias ``init_lambda`` (so every
    task vector starts at task arithmetic's weight)."""

    def __init__(self, dim: int, tasks: int, init_lambda: float = 0.3,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, tasks)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                layer.weight.normal_(0.0, 0.01, generator=generator)
            self.fc1.bias.zero_()
            self.fc2.bias.fill_(init_lambda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class RoutedMLP(nn.Module):
    """A block's MLP with weights θ0 + Σt wt(x)·τt, w from its router on the MLP's input.

    ``routing``: ``sample`` (each sample its own weights) or ``batch`` (the batch's mean
    weights, FusionBench's while training)."""

    def __init__(self, mlp: nn.Module, base: Mapping[str, torch.Tensor],
                 vectors: Sequence[Mapping[str, torch.Tensor]], router: Router,
                 vectors_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.act, self.norm = copy.deepcopy(mlp.act), copy.deepcopy(getattr(mlp, "norm", None))
        self.router, self.routing = router, "sample"
        for name in (f"{layer}.{kind}" for layer in LINEARS for kind in ("weight", "bias")):
            key = name.replace(".", "_")
            self.register_buffer(f"base_{key}", base[name].detach().clone().float())
            self.register_buffer(f"tau_{key}", torch.stack([v[name].to(vectors_dtype)
                                                              for v in vectors]))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T] routing weights (``batch``: [1, T]), the router's outputs averaged over
        tokens."""
        w = self.router(x).mean(1)
        return w.mean(0, keepdim=True) if self.routing == "batch" else w

    def _linear(self, layer: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        base_w, base_b = getattr(self, f"base_{layer}_weight"), getattr(self, f"base_{layer}_bias")
        tau_w, tau_b = getattr(self, f"tau_{layer}_weight"), getattr(self, f"tau_{layer}_bias")
        w = w.to(tau_w.dtype)
        weight = base_w + torch.einsum("bt,toi->boi", w, tau_w)
        bias = base_b + w @ tau_b
        if len(w) == 1:  # one set of weights for the whole batch
            return F.linear(x, weight[0], bias[0])
        return torch.baddbmm(bias.unsqueeze(1).to(x.dtype), x,
                             weight.transpose(1, 2).to(x.dtype))

    def _mlp(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = self.act(self._linear("fc1", x, w))
        if self.norm is not None:
            h = self.norm(h)
        return self._linear("fc2", h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights(x)
        if torch.is_grad_enabled() or len(w) <= EVAL_CHUNK:
            return self._mlp(x, w)
        return torch.cat([self._mlp(x[i: i + EVAL_CHUNK], w[i: i + EVAL_CHUNK])
                          for i in range(0, len(x), EVAL_CHUNK)])


def block_names(encoder: nn.Module) -> list[str]:
    """The encoder's blocks that have an MLP a router can replace (timm ViTs: ``blocks.<i>``)."""
    return [name for name, module in encoder.named_modules()
            if all(hasattr(getattr(module, "mlp", None), layer) for layer in LINEARS)]


def routed_blocks(encoder: nn.Module, blocks: Sequence[int] | None) -> list[str]:
    names = block_names(encoder)
    if blocks is None:
        return names
    bad = [b for b in blocks if not 0 <= int(b) < len(names)]
    if bad:
        raise ValueError(f"blocks={list(blocks)}: block {bad[0]} is not one of this encoder's "
                         f"{len(names)} blocks (0 to {len(names) - 1})")
    return [names[int(b)] for b in blocks]


def build_wemoe(encoder: nn.Module, pretrained: StateDict, experts: Mapping[str, StateDict],
                blocks: Sequence[int] | None = None, init_lambda: float = 0.3,
                generator: torch.Generator | None = None, merged: StateDict | None = None,
                vectors_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The routed model: a copy of ``encoder`` at task arithmetic (``init_lambda``) with the
    MLPs of ``blocks`` (all: None) routed over the experts' task vectors, routers initialised
    from ``generator`` (``merged``: the task arithmetic state, where already made)."""
    model = copy.deepcopy(encoder)
    if merged is None:
        merged = task_arithmetic_merge(pretrained, experts, init_lambda)
    model.load_state_dict(encoder_entries(merged))
    model.requires_grad_(False)
    tasks = list(experts)
    for name in routed_blocks(model, blocks):
        block = model.get_submodule(name)
        prefix = f"{name}.mlp."
        entries = [f"{layer}.{kind}" for layer in LINEARS for kind in ("weight", "bias")]
        base = {k: pretrained[prefix + k] for k in entries}
        vectors = [{k: experts[t][prefix + k].float() - base[k].float() for k in entries}
                   for t in tasks]
        dim = base["fc1.weight"].shape[1]
        block.mlp = RoutedMLP(block.mlp, base, vectors,
                              Router(dim, len(tasks), init_lambda, generator), vectors_dtype)
    model.init_lambda = init_lambda  # (saved with the routers: the model is rebuilt with it)
    return model


def routers(model: nn.Module) -> dict[str, RoutedMLP]:
    return {name: m for name, m in model.named_modules() if isinstance(m, RoutedMLP)}


def set_routing(model: nn.Module, routing: str) -> None:
    for mlp in routers(model).values():
        mlp.routing = routing


def router_state(model: nn.Module) -> tuple[StateDict, dict[str, str]]:
    """The routers' weights by block (``blocks.3.fc1.weight``), what a WEMoE run learned, and
    the metadata it is rebuilt with (task arithmetic's λ outside the routed MLPs)."""
    state = {f"{name}.{k}": v.detach().cpu() for name, m in routers(model).items()
             for k, v in m.router.state_dict().items()}
    return state, {"init_lambda": repr(float(model.init_lambda))}


def load_routed(encoder: nn.Module, pretrained: StateDict, experts: Mapping[str, StateDict],
                tasks: Sequence[str], saved: StateDict, meta: Mapping[str, str]
                ) -> tuple[nn.Module, StateDict]:
    """The routed model a run saved (``router_state``), rebuilt around the pool's task
    vectors, with its task arithmetic starting state."""
    names = block_names(encoder)
    blocks = sorted({names.index(k.rsplit(".", 3)[0]) for k in saved})
    init = float(meta["init_lambda"])
    experts = {t: experts[t] for t in tasks}
    start = task_arithmetic_merge(pretrained, experts, init)
    model = build_wemoe(encoder, pretrained, experts, blocks, init, merged=start)
    for name, m in routers(model).items():
        m.router.load_state_dict({k[len(name) + 1:]: v for k, v in saved.items()
                                  if k.startswith(name + ".")})
    return model.eval().requires_grad_(False), start


class WEMoE(AdaptationRun):
    """One WEMoE run: the routed model and its routers' optimiser (no λ over whole vectors)."""

    name = "wemoe"

    def __init__(self, pretrained: StateDict, experts: Mapping[str, StateDict],
                 context: AdaptationContext, blocks: Sequence[int] | None = None,
                 init_lambda: float = 0.3, lr: float = 1e-3, steps: int = 1000,
                 batch_size: int = 16, routing: str = "sample", schedule: str = "cosine"):
        pretrained, _ = context.task_vectors(pretrained, experts)  # (checks experts' weights)
        super().__init__(context, pretrained, None, "layer", init_lambda, batch_size)
        experts = {t: experts[t] for t in self.tasks}
        self.start = task_arithmetic_merge(pretrained, experts, init_lambda)
        self.model = build_wemoe(context.encoder, pretrained, experts, blocks, init_lambda,
                                 self.generator, self.start, context.vectors_dtype
                                 ).to(context.device).eval()
        self.routing = routing
        self.heads = {t: context.head(t) for t in self.tasks}
        self.routed = routers(self.model)
        parameters = [p for m in self.routed.values() for p in m.router.parameters()]
        for p in parameters:
            p.requires_grad_(True)
        self.optimizer = context.runtime.adam(parameters, lr=lr, betas=(0.9, 0.999))
        # the authors' cosine annealing over the run's steps; FusionBench's constant lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0) \
            if schedule == "constant" else \
            torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=steps)
        self.last_weights = [init_lambda] * len(self.tasks)

    def step(self, images: dict[str, torch.Tensor] | None = None) -> float:
        """One step: each task's batch through the routed model (its own forward+backward,
        gradients summed into the routers), one optimiser and scheduler step."""
        images = self.next_batches() if images is None else images
        set_routing(self.model, self.routing)
        self.optimizer.zero_grad()
        losses, weights = [], []
        hooks = [m.router.register_forward_hook(
            lambda _m, _i, out: weights.append(out.detach().float().mean((0, 1))))
            for m in self.routed.values()]
        try:
            for task in self.tasks:
                with self.autocast():
                    loss = entropy(self.heads[task](self.model(images[task])))
                self.scaler.scale(loss).backward()
                losses.append(loss.detach())
        finally:
            for hook in hooks:
                hook.remove()
            set_routing(self.model, "sample")
        total = self.step_loss(losses)
        self.optimizer_step(self.optimizer)
        self.scheduler.step()
        self.steps_done += 1
        self.last_weights = torch.stack(weights).mean(0).tolist() if weights else []
        return total

    def advance(self) -> float:
        self.curve.append(self.step())
        return self.curve[-1]

    def per_task(self) -> list[float]:
        """Each task vector's routing weight in the last step (mean over blocks, tokens,
        samples and tasks' batches), W&B's λ curve for this method."""
        return self.last_weights

    def trained(self) -> dict[str, nn.Module]:
        return {"routers": nn.ModuleDict({k.replace(".", "_"): m.router
                                          for k, m in self.routed.items()})}

    def state(self, progress: Mapping[str, Any] | None = None) -> dict[str, Any]:
        state = super().state(progress)
        state["learned"]["scheduler"] = self.scheduler.state_dict()  # (the lr's position)
        return state

    def load_state(self, state: Mapping[str, Any]) -> None:
        super().load_state(state)
        self.scheduler.load_state_dict(state["learned"]["scheduler"])

    def benchmark(self, plain: nn.Module) -> tuple[str, int, Callable, Callable]:
        """What ``tint bench`` times: one step on a batch of every task, against a plain
        forward+backward of the encoder with the same loss on the same batches."""
        images = self.next_batches()

        def plain_step() -> None:
            for task, x in images.items():
                entropy(self.heads[task](plain(x))).backward()

        return ("WEMoE step (all tasks)", sum(len(x) for x in images.values()),
                lambda: self.step(images), plain_step)

    @torch.no_grad()
    def mean_weights(self) -> torch.Tensor:
        """[blocks, task vectors]: each routed block's mean routing weight over every task's
        adaptation images, what the λ heatmap of this row shows."""
        sums = {name: torch.zeros(len(self.tasks)) for name in self.routed}
        count = 0
        def add(name: str, out: torch.Tensor) -> None:  # (a hook returning a value replaces
            sums[name] += out.float().mean(1).sum(0).cpu()  # the output)

        hooks = [m.router.register_forward_hook(lambda _m, _i, out, name=name: add(name, out))
                 for name, m in self.routed.items()]
        try:
            for task in self.tasks:
                for inputs in self.context.runtime.batches(self.context.images[task]):
                    with self.autocast():
                        self.model(inputs)
                    count += len(inputs)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.stack([sums[name] / max(count, 1) for name in self.routed])

    def result(self) -> Merged:
        """The routed model (evaluation runs it as the encoder of every task), its learned
        routers, and as ``state`` the encoder at task arithmetic (what lies outside the routed
        MLPs, and the MLPs at the routers' starting weights)."""
        self.model.eval().requires_grad_(False)
        weights = self.mean_weights()
        return Merged(self.name, self.start, lambdas=weights, layer_names=list(self.routed),
                      tasks=self.tasks, loss_curve={"unit": "step", "loss": self.curve},
                      tinted=ROUTERS.tinted, model=self.model.cpu())


def check_wemoe(params: Mapping[str, object], encoder: nn.Module | None, tasks=None) -> None:
    check_common(params)
    whole(params, "steps")
    number(params, "init_lambda", None, None, must="a finite number")
    one_of(params, "routing", ("sample", "batch"))
    one_of(params, "schedule", ("cosine", "constant"))
    blocks = params.get("blocks")
    if blocks is not None:
        if not isinstance(blocks, list | tuple) or not blocks or not all(
                isinstance(b, int) and not isinstance(b, bool) for b in blocks):
            raise ValueError(f"blocks={blocks} must be a non-empty list of block indices "
                             "(null: every block)")
        if encoder is not None:
            routed_blocks(encoder, blocks)


# what a WEMoE run saves: its routers by block, rebuilt around the pool's task vectors
ROUTERS = Outcome("routers", save=router_state, load=load_routed)


def wemoe_memory(encoder_cfg: DictConfig, tasks: int, params: Mapping[str, Any],
                 vectors_dtype: str = "fp32") -> MemoryModel:
    """WEMoE's device memory while its routers train: the encoder outside the routed MLPs;
    each routed MLP's θ0 and T task vectors; the routers with their gradient and Adam's two
    moments; the activations of one task's batch through the routed model (each sample's
    merged MLP weights among them), counted on the meta device. ``parameters`` gives the
    routed model's size beside the encoder's."""
    batch_size, blocks = int(params.get("batch_size") or 16), params.get("blocks")
    encoder = meta_encoder(encoder_cfg)
    shapes = {k: v for k, v in encoder.state_dict().items() if v.is_floating_point()}
    with torch.device("meta"):
        model = build_wemoe(encoder, shapes, {str(t): shapes for t in range(tasks)}, blocks)
    routed = routers(model)
    vector_bytes = 2 if vectors_dtype == "bf16" else 4
    router_params = sum(p.numel() for m in routed.values() for p in m.router.parameters())
    mlp_params = sum(b.numel() for m in routed.values() for n, b in m.named_buffers()
                     if n.startswith("base_"))
    count = sum(p.numel() for p in encoder.parameters())
    terms = {
        "encoder outside the routed MLPs (fp32)": (count - mlp_params) * 4,
        f"routed MLPs: θ0 + {tasks} task vectors ({vectors_dtype})":
            mlp_params * 4 + tasks * mlp_params * vector_bytes,
        "routers + gradient + Adam (4 copies)": 4 * router_params * 4,
        f"activations (batch {batch_size}, fp32)": activation_bytes(
            encoder_cfg, batch_size, model, f"wemoe {tasks} tasks, blocks {blocks}"),
    }
    out = MemoryModel(str(encoder_cfg.name), tasks, batch_size, vectors_dtype, terms)
    out.parameters = {"encoder": count,
                      "routed model": count + tasks * mlp_params + router_params}
    return out


@register("wemoe", adaptive=True, check=check_wemoe, pretty="WEMoE",
          paper="https://arxiv.org/abs/2402.00433",
          code="https://github.com/tanganke/weight-ensembling_MoE", trainer=WEMoE,
          memory=wemoe_memory, outcome=ROUTERS)
def wemoe_merge(pretrained: StateDict, experts: Mapping[str, StateDict],
                context: AdaptationContext, blocks: list[int] | None = None,
                init_lambda: float = 0.3, lr: float = 1e-3, steps: int = 1000,
                batch_size: int = 16, routing: str = "sample",
                schedule: str = "cosine") -> Merged:
    """``blocks``: the block indices whose MLPs are routed (null: every block);
    ``init_lambda``: task arithmetic's λ outside the routed MLPs and the routers' starting
    weight; Adam at ``lr`` for ``steps``, ``schedule`` cosine (the authors) or constant
    (FusionBench); ``batch_size`` images per task per step; ``routing`` while training:
    ``sample`` (the authors) or ``batch`` (FusionBench's mean over the batch)."""
    params = declared_values(wemoe_merge, locals())
    run = WEMoE(pretrained, experts, context, blocks, init_lambda, lr, steps, batch_size,
                routing, schedule)
    run.train(steps, params)
    return run.result()
