"""The fused adapter branch (``talklora_min/fused.py``, one autograd node with a hand-written
backward) against the docs/method.md §1 formulas written out with a loop over experts: outputs and
the gradients of x and of every parameter, in float64, over the layer table of ``test_layers`` (every
router input, top-k, communication structure and dropout placement), in eval mode, in train mode
with p = 0, and in train mode with dropout active everywhere (masks shared with the reference)."""
from __future__ import annotations

import math

import pytest
import torch

from talklora_min import LoRALinear, TalkLoRALinear, balance_loss
from test_layers import D_IN, DROPOUT_CONFIGS, DT, TABLE, Config, build, make_base, randomize


def reference_branch(layer, x, drop=None):
    """``layer(x)`` written out from the docs/method.md §1 formulas with a Python loop over experts,
    differentiable w.r.t. ``x`` and every adapter parameter; ``drop(t)`` is the dropout (identity by
    default).  Returns ``(y, aux_loss or None)``."""
    drop = drop or (lambda t: t)
    y = layer.base(x)
    s = layer.scaling
    xd = drop(x)
    if isinstance(layer, LoRALinear):
        return y + s * (xd @ layer.A.T) @ layer.B.T, None
    n_exp, m = layer.num_experts, layer.expert_rank
    h = xd @ layer.A.T
    blocks = [h[..., e * m:(e + 1) * m] for e in range(n_exp)]
    if layer.router_input == "input":
        logits = xd @ layer.W_g.T
    else:
        code = h
        if isinstance(layer, TalkLoRALinear):
            T = layer.talk_matrix()
            code = torch.cat([sum(T[e, f] * blocks[f] for f in range(n_exp)) for e in range(n_exp)], -1)
        logits = code @ layer.W_r.T
    masked = logits
    if layer.top_k is not None:
        kth = logits.detach().sort(-1, descending=True).values[..., layer.top_k - 1:layer.top_k]
        masked = logits.masked_fill(logits < kth, -math.inf)
    gates = torch.softmax(masked, -1)
    aux = None if layer.balance_loss is None else balance_loss(layer.balance_loss, logits, gates)
    used = drop(torch.ones_like(gates)) * gates if layer.gate_dropout else gates
    out = sum(used[..., e:e + 1] * (blocks[e] @ layer.C[e].T @ layer.B[e].T) for e in range(n_exp))
    return y + s * drop(out), aux


def shape_keyed_dropout(p_default=0.5):
    """A deterministic stand-in for ``F.dropout``: the mask depends on the tensor's shape only, so the
    layer and :func:`reference_branch` draw the same masks for x, the gates and the output."""
    def dropout(t, p=p_default, training=True, inplace=False):
        if not training or p == 0:
            return t
        gen = torch.Generator().manual_seed(hash(tuple(t.shape)) % 2**31)
        keep = (torch.rand(t.shape, generator=gen) >= p).to(t.dtype)
        return t * keep / (1 - p)
    return dropout


def compare_with_reference(layer, x, drop=None, tol=1e-10):
    params = [p for p in layer.parameters() if p.requires_grad]
    y = layer(x)
    loss = y.square().sum() + (layer.aux_loss if getattr(layer, "aux_loss", None) is not None else 0)
    grads = torch.autograd.grad(loss, [x, *params])
    y_ref, aux_ref = reference_branch(layer, x, drop)
    loss_ref = y_ref.square().sum() + (aux_ref if aux_ref is not None else 0)
    grads_ref = torch.autograd.grad(loss_ref, [x, *params])
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for name, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=tol, rtol=tol, msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("name", TABLE)
@pytest.mark.parametrize("mode", ["eval", "train-p0"])
def test_forward_and_gradients_equal_the_reference_formula(name, mode):
    """Outputs and the gradients of x and of every parameter (float64): eval mode, and train mode with
    the dropout probability set to 0 (every training-time branch of the forward, no randomness)."""
    cfg, alpha = TABLE[name]
    if mode == "train-p0":
        cfg = Config(cfg.kind, {**cfg.kwargs, "dropout": 0.0})
    layer = cfg.build(make_base(), alpha).train(mode != "eval")
    randomize(layer)
    x = torch.randn(2, 7, D_IN, dtype=DT, generator=torch.Generator().manual_seed(11)).requires_grad_(True)
    compare_with_reference(layer, x)


@pytest.mark.parametrize("name", DROPOUT_CONFIGS)
def test_train_mode_dropout_in_every_place_equals_the_reference_with_the_same_masks(name, monkeypatch):
    """x, gate (``gate_dropout``) and output dropout active, masks shared with the reference."""
    monkeypatch.setattr(torch.nn.functional, "dropout", shape_keyed_dropout())
    layer = build(name).train()
    x = torch.randn(13, D_IN, dtype=DT, generator=torch.Generator().manual_seed(12)).requires_grad_(True)
    compare_with_reference(layer, x, drop=lambda t: torch.nn.functional.dropout(t, layer.dropout, True))
    if not isinstance(layer, LoRALinear):
        with torch.no_grad():
            assert not torch.allclose(layer(x), build(name).eval()(x))       # the masks did act


@pytest.mark.parametrize("kind", ["switch", "cv", "entropy"])
@pytest.mark.parametrize("name", ["moelora-code-alpha16", "moelora-input-alphaNone", "moelora-top2-alpha16",
                                  "talklora-official-alphaNone", "talklora-ds-alpha16", "talklora-lowrank-alpha16"])
def test_balance_loss_gradients_through_the_fused_branch_equal_the_reference(name, kind):
    cfg, alpha = TABLE[name]
    layer = Config(cfg.kind, {**cfg.kwargs, "balance_loss": kind}).build(make_base(), alpha)
    randomize(layer)
    x = torch.randn(17, D_IN, dtype=DT, generator=torch.Generator().manual_seed(13)).requires_grad_(True)
    compare_with_reference(layer, x)
    layer(x)
    router = layer.W_g if layer.router_input == "input" else layer.W_r
    (aux_only,) = torch.autograd.grad(layer.aux_loss, router)              # the aux loss alone reaches the router
    assert aux_only.abs().max() > 0


@pytest.mark.parametrize("name", ["lora-alpha16", "moelora-code-alphaNone", "talklora-block-alpha16"])
def test_inputs_that_need_no_gradient_and_frozen_parameters(name):
    """Only what needs a gradient gets one (x without requires_grad, some parameters frozen)."""
    layer = build(name)
    frozen = "A" if name.startswith("lora") else "C"
    getattr(layer, frozen).requires_grad_(False)
    x = torch.randn(5, D_IN, dtype=DT)
    layer(x).square().sum().backward()
    assert getattr(layer, frozen).grad is None and layer.B.grad is not None
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))


def test_fused_branch_refuses_double_backward():
    layer = build("talklora-official-alphaNone")
    x = torch.randn(3, D_IN, dtype=DT, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|does not require grad"):
        gx.sum().backward()
