"""D-Persona's projection heads, its stage-2 loss, and the harmonizer's sharing switch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harmonizer_fast import losses
from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet
from harmonizer_fast.model.dpersona import DPersonaHeads


def _net(**kw) -> HarmonizerNet:
    torch.manual_seed(0)
    return HarmonizerNet(HarmonizerConfig.small(num_raters=3, personalizer="dpersona", prior_bank=20, **kw))


def test_heads_are_softmax_weighted_bank_samples_and_ignore_z():
    torch.manual_seed(1)
    heads = DPersonaHeads(16, 6, 3).eval()
    f, bank = torch.randn(2, 16, 32, 32), torch.randn(2, 20, 6)
    raters = torch.tensor([2, 0])
    out = heads(f, torch.randn(2, 6), bank, raters)
    assert out.shape == (2, 2, 6)
    assert torch.equal(out, heads(f, torch.randn(2, 6) * 100, bank, raters))  # z unused
    # numpy transcription of steps 2-4 from the head's pooled query
    q = np.stack([heads.heads[r](f).mean((2, 3)).detach().numpy() for r in (2, 0)], axis=1)  # (B, R', 6)
    b = bank.numpy().astype(np.float64)
    logits = np.einsum("brd,bmd->brm", q, b)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(out.detach().numpy(), np.einsum("brm,bmd->brd", w, b), rtol=1e-5, atol=1e-6)
    assert (q >= 0).all()  # the query ends in a ReLU, as D-Persona's block does
    same = torch.ones(2, 20, 6) * torch.tensor([0.5, -1, 2, 0, 1, 3])  # a bank of one repeated latent
    assert torch.allclose(heads(f, None, same, raters), same[:, :2], atol=1e-6)


def test_each_rater_has_its_own_head():
    net = _net()
    net.set_phase(2)
    x = torch.rand(2, 1, 32, 32)
    y = (torch.rand(2, 3, 32, 32) > 0.8).float()
    out = net(x, y, generator=torch.Generator().manual_seed(0))
    out.personalized_logits[:, 1].sum().backward()
    grads = [sum(p.grad.abs().sum() for p in h.parameters() if p.grad is not None) for h in net.personalizer.heads]
    assert grads[1] > 0 and grads[0] == 0 and grads[2] == 0
    assert all(p.grad is None for p in net.backbone.parameters())  # frozen in phase 2


def test_dpersona_loss_matches_the_generalized_dice_formula():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 8, 8)
    masks = (torch.rand(3, 4, 8, 8) > 0.6).float()
    masks[:, 3] = 0  # a rater with nothing drawn in this batch
    p, t = 1 / (1 + np.exp(-logits.double().numpy())), masks.double().numpy()
    terms = []
    for i in range(4):  # D-Persona's GeneralizedDiceLoss, one class per rater, sums over the flattened batch
        w = 1 / max(t[:, i].sum() ** 2, 1e-6)
        terms.append(2 * w * (p[:, i] * t[:, i]).sum() / max(w * (p[:, i] + t[:, i]).sum(), 1e-6))
    assert terms[3] == 0
    assert float(losses.dpersona_loss(logits, masks)) == pytest.approx(1 - np.mean(terms), rel=1e-5)


def test_phase2_trains_the_dpersona_heads_on_their_loss():
    net = _net()
    net.set_phase(2)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32)
    y = (torch.rand(4, 3, 32, 32) > 0.7).float()
    noise = net.draw_noise(4, g)
    first = None
    for _ in range(15):
        net.train()
        out = net(x, y, noise=noise)
        loss, _ = losses.total_loss(out, y, net.config)
        assert torch.equal(loss, losses.dpersona_loss(out.personalized_logits, y))  # the recipe's loss, not Eq. 6
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first


def test_unshared_harmonizer_gives_each_stage_its_own_core():
    shared = HarmonizerNet(HarmonizerConfig.small()).harmonizer
    own = HarmonizerNet(HarmonizerConfig.small(harmonizer_shared=False)).harmonizer
    stages = len(own.stages)
    core = shared.tokens.numel() + sum(p.numel() for p in shared.w1.parameters())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(own) - n(shared) == (stages - 1) * core
    stage = own.stages[0]
    x = torch.rand(2, HarmonizerConfig.small().decoder_channels[stage], 8, 8)
    own.w2[str(stage)].weight.data.normal_()  # leave the identity start, so the core gets a gradient
    gamma, beta = own.modulation(stage, x)
    (gamma.sum() + beta.sum()).backward()
    assert own.stage_tokens[str(stage)].grad.abs().sum() > 0
    assert all(own.stage_tokens[str(s)].grad is None for s in own.stages[1:])


def test_shared_checkpoint_names_are_unchanged():
    keys = set(HarmonizerNet(HarmonizerConfig.small()).state_dict())
    assert {"harmonizer.tokens", "harmonizer.w1.weight"} <= keys
    assert not any("stage_tokens" in k for k in keys)


def test_phase2_starts_new_heads_on_a_phase1_model_trained_without_them(tmp_path):
    """[science] #35 item 6: D-Persona's heads train on the Prob. U-Net's phase 1 even when that model was
    trained with no personalizer: every phase-1 weight is loaded, the heads keep their fresh initialization.
    Any other config difference, or a run that also trains phase 1, is still refused."""
    from harmonizer_fast import data as hd
    from harmonizer_fast.checkpoint import CheckpointError, load_training_state, save_checkpoint
    from harmonizer_fast.train import TrainConfig, Trainer

    plain = HarmonizerConfig.small(num_raters=3).baseline()  # no harmonizer, personalizer or GED loss
    torch.manual_seed(3)
    trained = HarmonizerNet(plain)
    for p in trained.parameters():  # weights no fresh build has, so loading them is visible
        p.data.uniform_(-1, 1)
    save_checkpoint(tmp_path / "pu", "best", trained)
    heads_cfg = HarmonizerConfig.small(num_raters=3, use_harmonizer=False, use_ged_loss=False,
                                       personalizer="dpersona", prior_bank=20)  # fmt: skip
    data = hd.make_synthetic(24, size=32, raters=3, seed=1)
    tc = TrainConfig(phase="2", epochs_phase2=1, batch_size=8)
    trainer = Trainer(data, heads_cfg, tc, tmp_path / "dp", progress=False, log=lambda _m: None)
    fresh = {k: v.clone() for k, v in trainer.net.personalizer.state_dict().items()}
    trainer._begin(False, tmp_path / "pu")
    got = trainer.net.state_dict()
    for k, v in trained.state_dict().items():
        assert torch.equal(got[k], v), k
    for k, v in fresh.items():
        assert torch.equal(got[f"personalizer.{k}"], v), k
    with pytest.raises(CheckpointError, match="differs"):  # not a phase 2 alone: the configs must match
        load_training_state(tmp_path / "pu", HarmonizerNet(heads_cfg), None)
    other = HarmonizerNet(HarmonizerConfig.small(num_raters=3, use_ged_loss=False, personalizer="dpersona"))
    with pytest.raises(CheckpointError, match="use_harmonizer"):  # a phase-1 field differs
        load_training_state(tmp_path / "pu", other, None, fresh_personalizer=True)
