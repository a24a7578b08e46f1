"""Global InfoNCE: against a plain per-sample loop, gradients, temperature, positives, 2-process gather, learning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from radalign.errors import ConfigError
from radalign.objectives.contrastive import InfoNCE, contrastive_targets, info_nce, label_positives


def loop_rows(image, text, tau, positives=None, same=False):
    """Per-anchor losses (image->text, text->image) written the obvious way: one cross-entropy per positive."""
    v, t = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    n = len(v)
    pos = torch.eye(n, dtype=torch.bool) if positives is None else positives | torch.eye(n, dtype=torch.bool)

    def one(a, b, i):
        logits = [a[i] @ b[j] / tau for j in range(n)]
        if same:  # own-modality negatives: everything but itself and its positives
            logits += [a[i] @ a[k] / tau for k in range(n) if not pos[i, k]]
        logits = torch.stack(logits)[None]
        targets = [j for j in range(n) if pos[i, j]]
        return sum(F.cross_entropy(logits, torch.tensor([j])) for j in targets) / len(targets)

    i2t = torch.stack([one(v, t, i) for i in range(n)])
    t2i = torch.stack([one(t, v, i) for i in range(n)])
    return i2t, t2i


def loop_loss(image, text, tau, weights=(0.5, 0.5), positives=None, same=False):
    i2t, t2i = loop_rows(image, text, tau, positives, same)
    return weights[0] * i2t.mean() + weights[1] * t2i.mean()


@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.75, 0.25)])
def test_equals_loop_reference(same, weights):
    torch.manual_seed(0)
    image, text = torch.randn(6, 5), torch.randn(6, 5)
    loss = InfoNCE(temperature=0.1, direction_weights=weights, same_modality_negatives=same)(image, text)
    assert torch.allclose(loss, loop_loss(image, text, 0.1, weights, same=same), atol=1e-5)
    if weights[0] != weights[1]:  # the directions differ, so the weights matter
        swapped = InfoNCE(temperature=0.1, direction_weights=weights[::-1], same_modality_negatives=same)
        assert not torch.allclose(loss, swapped(image, text), atol=1e-4)


@pytest.mark.parametrize("same", [False, True])
def test_label_aware_positives_equal_unicl_loop(same):
    torch.manual_seed(1)
    image, text = torch.randn(7, 4), torch.randn(7, 4)
    labels = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1], [0, 1], [1, 1], [float("nan"), float("nan")]])
    positives = label_positives(labels)
    assert positives[0, 1] and positives[2, 4] and not positives[0, 2] and not positives[6, 6]
    loss = InfoNCE(temperature=0.2, direction_weights=(1.0, 1.0), same_modality_negatives=same)
    expected = loop_loss(image, text, 0.2, (1.0, 1.0), positives=positives, same=same)
    assert torch.allclose(loss(image, text, positives=positives), expected, atol=1e-5)
    assert not torch.allclose(loss(image, text), expected, atol=1e-4)  # the positives change the loss


def test_identity_positives_and_soft_targets_reduce_to_standard():
    torch.manual_seed(2)
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    loss = InfoNCE(temperature=0.07)
    standard = loss(image, text)
    assert torch.allclose(loss(image, text, positives=torch.eye(5, dtype=torch.bool)), standard)
    assert torch.allclose(loss(image, text, positives=torch.zeros(5, 5, dtype=torch.bool)), standard)
    assert torch.allclose(loss(image, text, soft_targets=torch.eye(5) * 3.0), standard)  # rows are renormalised
    distinct = torch.arange(5.0)[:, None]
    assert torch.allclose(loss(image, text, positives=label_positives(distinct)), standard)
    soft = torch.rand(5, 5)
    t = contrastive_targets(5, 5, 0, soft_targets=soft)
    assert torch.allclose(t.sum(1), torch.ones(5)) and torch.allclose(t, soft / soft.sum(1, keepdim=True))
    with pytest.raises(ConfigError, match="shape"):
        loss(image, text, positives=torch.eye(4, dtype=torch.bool))


def test_gradcheck_float64():
    torch.manual_seed(3)
    image = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    text = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    positives = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)

    def f(a, b, t):
        return info_nce(a, b, t, (0.7, 0.3), same_modality_negatives=True, positives=positives)

    assert torch.autograd.gradcheck(f, (image, text, tau), eps=1e-6, atol=1e-6)


def test_learnable_temperature_stays_clamped_and_fixed_has_no_parameter():
    assert list(InfoNCE(temperature=0.1).parameters()) == []
    loss_fn = InfoNCE(temperature=0.07, learnable_temperature=True, temperature_range=(0.05, 1.0))
    assert len(list(loss_fn.parameters())) == 1
    image = torch.randn(8, 4)
    optimiser = torch.optim.SGD(loss_fn.parameters(), lr=50.0)
    for _ in range(5):  # aligned pairs: a lower tau always lowers the loss, so tau is pushed to its floor
        optimiser.zero_grad()
        loss_fn(image, image + 0.01 * torch.randn(8, 4)).backward()
        assert loss_fn.log_temperature.grad is not None and loss_fn.log_temperature.grad > 0
        optimiser.step()
    assert loss_fn.log_temperature.item() < math.log(0.05)  # the optimiser stepped past the floor ...
    assert loss_fn.temperature.item() == pytest.approx(0.05)  # ... and the next use clamps it back
    assert loss_fn.log_temperature.item() == pytest.approx(math.log(0.05))
    with pytest.raises(ConfigError):
        InfoNCE(temperature=2.0, learnable_temperature=True, temperature_range=(0.01, 1.0))


def test_learning_lowers_loss_and_retrieval_beats_chance():
    torch.manual_seed(4)
    n_train, n_test, d = 64, 32, 16
    x = torch.randn(n_train + n_test, d)
    y = x @ torch.randn(d, d) + 0.1 * torch.randn(n_train + n_test, d)  # paired "text" features
    image_head, text_head = torch.nn.Linear(d, 8), torch.nn.Linear(d, 8)
    loss_fn = InfoNCE(temperature=0.1, learnable_temperature=True)
    params = [*image_head.parameters(), *text_head.parameters(), *loss_fn.parameters()]
    optimiser = torch.optim.Adam(params, lr=1e-2)

    def top1(i, t):
        with torch.no_grad():
            sims = F.normalize(image_head(i), dim=-1) @ F.normalize(text_head(t), dim=-1).T
        return (sims.argmax(1) == torch.arange(len(i))).float().mean().item()

    losses = []
    for _ in range(60):
        optimiser.zero_grad()
        loss = loss_fn(image_head(x[:n_train]), text_head(y[:n_train]))
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert top1(x[n_train:], y[n_train:]) > 5 / n_test  # held-out pairs; chance is 1/32


# --- two processes (gloo, CPU) against one process on the concatenated batch --------------------------------


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = torch.load(Path(out_dir) / "data.pt")
        results = {}
        for name, case in data["cases"].items():
            rows = case["rows"][rank]
            head = torch.nn.Linear(6, 4)
            head.load_state_dict(data["head"])
            loss_fn = InfoNCE(temperature=0.1, learnable_temperature=True, **case["kwargs"])
            text_in = data["y"][rows].clone().requires_grad_(True)
            positives = case["positives"][rows] if case["positives"] is not None else None
            loss = loss_fn(head(data["x"][rows]), text_in, positives=positives)
            loss.backward()
            grads = [p.grad.clone() for p in head.parameters()] + [loss_fn.log_temperature.grad.clone()]
            for g in grads:  # DDP: average the gradients over processes
                dist.all_reduce(g)
                g /= world
            results[name] = {"loss": loss.detach(), "param_grads": grads, "text_grad": text_in.grad}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gather_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(5)
    n, world = 8, 2
    x, y = torch.randn(n, 6), torch.randn(n, 4)
    head = torch.nn.Linear(6, 4)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0, 2.0])[:, None]
    positives = label_positives(labels)
    halves = [torch.arange(0, 4), torch.arange(4, 8)]
    uneven = [torch.arange(0, 3), torch.arange(3, 8)]
    cases = {
        "plain": {"rows": halves, "kwargs": {"direction_weights": (0.75, 0.25)}, "positives": None},
        "labels_same_uneven": {
            "rows": uneven,
            "kwargs": {"same_modality_negatives": True},
            "positives": positives,
        },
    }
    torch.save({"x": x, "y": y, "head": head.state_dict(), "cases": cases}, tmp_path / "data.pt")
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    for name, case in cases.items():
        w = case["kwargs"].get("direction_weights", (0.5, 0.5))
        same = case["kwargs"].get("same_modality_negatives", False)
        ref_head = torch.nn.Linear(6, 4)
        ref_head.load_state_dict(head.state_dict())
        log_tau = torch.tensor(math.log(0.1), requires_grad=True)
        text_in = y.clone().requires_grad_(True)
        i2t, t2i = loop_rows(ref_head(x), text_in, log_tau.exp(), case["positives"], same)
        # each process's loss is the mean over its own rows; DDP averages the processes
        per_rank = [w[0] * i2t[r].mean() + w[1] * t2i[r].mean() for r in case["rows"]]
        for r in range(world):
            assert torch.allclose(ranks[r][name]["loss"], per_rank[r].detach(), atol=1e-5), name
        torch.stack(per_rank).mean().backward()
        expected = [p.grad for p in ref_head.parameters()] + [log_tau.grad]
        for r in range(world):
            for got, want in zip(ranks[r][name]["param_grads"], expected, strict=True):
                assert torch.allclose(got, want, atol=1e-5), name
            # inputs: the gather's backward sums over processes, so each process holds world x the average's grad
            rows = case["rows"][r]
            assert torch.allclose(ranks[r][name]["text_grad"], world * text_in.grad[rows], atol=1e-5), name
    # with equal halves, the average of the two processes' losses is the one-process loss of the whole batch
    plain = torch.stack([ranks[r]["plain"]["loss"] for r in range(world)]).mean()
    assert torch.allclose(plain, loop_loss(head(x), y, 0.1, (0.75, 0.25)).detach(), atol=1e-5)
