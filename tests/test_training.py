"""The zoo's training loop: it really learns, frozen heads stay frozen, layer decay holds."""

import timm
import torch

from tintcli.heads import ZeroShotHead
from tintcli.training import _param_groups, train_classifier


def _tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                             img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _toy_data():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    inputs = torch.randn(64, 3, 16, 16, generator=g) * 0.3
    inputs[labels == 1, 0] += 1.0  # class 1 is redder
    return inputs, labels


def test_training_reduces_the_loss_and_keeps_a_frozen_head():
    encoder, (inputs, labels) = _tiny_vit(), _toy_data()
    head = ZeroShotHead.from_embeddings(torch.randn(2, 32), logit_scale=100.0)
    head.requires_grad_(False)
    before = head.weight.clone()
    losses = train_classifier(encoder, head, inputs, labels, steps=30, batch_size=32, lr=1e-3,
                              weight_decay=0.0, device=torch.device("cpu"), seed=0)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert torch.equal(head.weight, before)


def test_layer_decay_trains_embeddings_slowest_and_last_block_fastest():
    encoder = _tiny_vit()
    head = torch.nn.Linear(32, 2)
    groups = _param_groups(encoder, head, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    embed = lr_of[id(encoder.patch_embed.proj.weight)]
    block0 = lr_of[id(encoder.blocks[0].mlp.fc1.weight)]
    block1 = lr_of[id(encoder.blocks[1].mlp.fc1.weight)]
    assert embed < block0 < block1 <= 1.0
    assert abs(block0 / block1 - 0.5) < 1e-9
    assert lr_of[id(head.weight)] == 1.0
    assert len(lr_of) == sum(1 for _ in encoder.parameters()) + 2
