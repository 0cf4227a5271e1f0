"""training.py on committed fixtures (100 real Matbench materials each of steels and
phonons, so no data is needed): the stacked model against aviary's Wrenformer, the
members' batches, member independence, stacked vs solo runs, the CUDA-graph step's
bookkeeping (emulated on the CPU), bf16 and resuming, and the recipe's levers."""

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from aviary.wrenformer.model import Wrenformer
from sklearn.metrics import balanced_accuracy_score

import mat_bench.training as training

CPU = torch.device("cpu")
EXACT = {"frac_jitter": 0.0}  # no random augmentation: runs compared number for number
FIXTURES = Path(__file__).resolve().parent / "fixtures"
N_ROWS = 100  # materials in each fixture
TINY = {"d_model": 32, "n_attn_heads": 2, "n_attn_layers": 1}


def fixture(model: str, n_rows: int = N_ROWS) -> tuple[training.Tokens, np.ndarray]:
    """The first n_rows materials of the committed fixtures, tokens and targets:
    steels (roostformer) or phonons with Wyckoff labels (wrenformer); no real data
    needed."""
    task, col = (("matbench_phonons", "protostructure") if model == "wrenformer"
                 else ("matbench_steels", "composition"))
    df = pd.read_csv(FIXTURES / f"{task}-100.csv", index_col="mbid")[:n_rows]
    return training.tokenize(model, list(df[col])), df.target.to_numpy(np.float32)


def task_data(model: str, n_rows: int = N_ROWS) -> training.TaskData:
    """The fixture's materials on the CPU."""
    return training.TaskData(*fixture(model, n_rows), CPU)


def members_of(n_rows: int, n_members: int, seed: int = 0) -> list[training.Member]:
    """Members with overlapping random training sets and validation sets of 20."""
    rng = np.random.default_rng(seed)
    out = []
    for idx in range(n_members):
        perm = rng.permutation(n_rows)
        out.append(training.Member(idx, idx, perm[20:], perm[:20]))
    return out


def solo_models(model: str, n_members: int, **kwargs) -> list:
    nets = []
    for seed in range(n_members):
        torch.manual_seed(seed)
        nets.append(training.MatbenchTransformer(
            wyckoff=model == "wrenformer", robust=False, n_targets=[1],
            task_dict={"t": "regression"}, **kwargs))
    return nets


@pytest.mark.parametrize(("model", "amp", "dim_feedforward"), [
    ("roostformer", False, 2048), ("roostformer", True, 2048),
    ("wrenformer", False, 2048), ("wrenformer", True, 2048),
    ("roostformer", False, 48), ("wrenformer", False, 48)])
def test_stacked_model_computes_aviarys_wrenformer(model, amp, dim_feedforward):
    """Each member of a StackedTransformer computes what aviary's Wrenformer.forward
    (nn.TransformerEncoder, residual trunk and head) computes with its weights,
    gradients included; under bf16 autocast, to bf16's precision; at torch's
    feed-forward width and a narrower one."""
    data = task_data(model)
    nets = solo_models(model, 3, frac_encoding_dims=16, n_attn_layers=2,
                       dim_feedforward=dim_feedforward)
    stacked = training.StackedTransformer(nets)
    stacked.train()
    plan = data.plan([np.arange(96)] * 3, 32,  # full batches: aviary has no padding
                     [np.random.default_rng(s) for s in range(3)])
    for step in range(len(plan)):
        inputs, _, _, mat = data.step(plan, step)
        with training.autocast(CPU, amp):
            ours = stacked(*inputs)
        for m, net in enumerate(nets):
            net.train()
            elem, frac, wyk, seq_mask, *rest = (
                x if x is None else x[m] for x in inputs)
            feats = training.token_features(stacked.elem_table, stacked.wyckoff_table,
                                            16, elem, frac, wyk)
            args = ()
            if model == "wrenformer":  # aviary: equivalent sequences in a row, counted
                owner = rest[0]
                keep = owner < mat.shape[1]
                order = torch.argsort(owner[keep], stable=True)
                feats, seq_mask = feats[keep][order], seq_mask[keep][order]
                args = (torch.bincount(owner[keep]).tolist(),)
            with training.autocast(CPU, amp):
                ref = Wrenformer.forward(net, feats, seq_mask, *args)[0]
            tol = 3e-2 if amp else 1e-5
            torch.testing.assert_close(ours[m].float(), ref.float(), atol=tol, rtol=tol)
            weight = "transformer_encoder.layers.0.linear1.weight"
            (grad_ours,) = torch.autograd.grad(
                ours[m].float().sum(), stacked.weights[weight.replace(".", "__")],
                retain_graph=True)
            (grad_ref,) = torch.autograd.grad(ref.float().sum(),
                                              dict(net.named_parameters())[weight])
            assert grad_ours[[i for i in range(3) if i != m]].abs().max() == 0
            assert torch.nn.functional.cosine_similarity(
                grad_ours[m].flatten(), grad_ref.flatten(), dim=0) > (
                    0.99 if amp else 0.99999)


def test_feed_forward_width():
    """At torch's width (2048) a member draws aviary's own weights, so runs from
    before --dim-feedforward existed reproduce; another width rebuilds aviary's
    pre-norm encoder layers at that width and is recorded in model_params."""
    kwargs = {"robust": False, "n_targets": [1], "task_dict": {"t": "regression"},
              **TINY}
    torch.manual_seed(0)
    ours = training.MatbenchTransformer(wyckoff=False, **kwargs)
    torch.manual_seed(0)
    ref = Wrenformer(n_features=1 + training.ELEM_DIM, **kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(
        ours.state_dict().values(), ref.state_dict().values(), strict=True))
    narrow = training.MatbenchTransformer(wyckoff=False, dim_feedforward=48, **kwargs)
    assert narrow.model_params["dim_feedforward"] == 48
    assert len(narrow.transformer_encoder.layers) == TINY["n_attn_layers"]
    for layer in narrow.transformer_encoder.layers:
        assert layer.linear1.weight.shape == (48, TINY["d_model"])
        assert layer.linear2.weight.shape == (TINY["d_model"], 48)
        assert layer.norm_first and layer.self_attn.batch_first
        assert layer.self_attn.num_heads == TINY["n_attn_heads"]


def test_dropout_acts_only_in_training():
    torch.manual_seed(0)
    nets = solo_models("roostformer", 2, n_attn_layers=2, dropout=0.5)
    stacked = training.StackedTransformer(nets)
    elem = torch.randint(1, 90, (2, 8, 5))
    frac = torch.rand(2, 8, 5)
    pad = torch.zeros(2, 8, 5, dtype=torch.bool)
    pad[:, :4, 3:] = True
    elem[pad] = 0
    stacked.train()
    assert not torch.allclose(stacked(elem, frac, None, pad),
                              stacked(elem, frac, None, pad))
    stacked.eval()
    with torch.no_grad():
        assert torch.equal(stacked(elem, frac, None, pad),
                           stacked(elem, frac, None, pad))


@pytest.mark.parametrize("model", ["roostformer", "wrenformer"])
def test_plan_gives_each_member_its_materials_once(model):
    data = task_data(model)
    members = members_of(N_ROWS, 3)
    sizes = [30, 70, 80]  # members of different sizes: short ones get pad rows
    idx = [m.fit_idx[:size] for m, size in zip(members, sizes, strict=True)]
    for rngs in ([np.random.default_rng(s) for s in range(3)], None):
        plan = data.plan(idx, 32, rngs, bucket_batches=4)
        assert len(plan) == -(-max(sizes) // 32)
        seen = [[] for _ in idx]
        for step in range(len(plan)):
            inputs, targets, weight, mat = data.step(plan, step)
            assert mat.shape == weight.shape == (3, 32)
            assert ((mat == data.pad) == (weight == 0)).all()
            assert torch.equal(targets, data.targets[mat])
            elem = inputs[0]
            if model == "wrenformer":  # each material's sequences, then fillers
                owner = inputs[4]
                assert owner.shape[1] % training.SEQ_MULTIPLE == 0
                for m in range(3):
                    real = mat[m][weight[m] > 0]
                    counts = torch.bincount(owner[m], minlength=33)[: len(real)]
                    assert counts.tolist() == data.n_seq[real.numpy()].tolist()
            width = int(data.length[mat.numpy()].max())
            assert elem.shape[-1] == width
            for m in range(3):
                seen[m] += mat[m][weight[m] > 0].tolist()
        for m in range(3):
            assert sorted(seen[m]) == sorted(idx[m].tolist())


def test_filler_sequences_change_no_prediction(monkeypatch):
    """Padding Wrenformer steps with filler sequences leaves predictions alone."""
    data = task_data("wrenformer")
    members = members_of(N_ROWS, 2)
    cfg = training.TrainConfig("regression", 1, batch_size=32, **EXACT)
    state = training.new_train_state("wrenformer", data, members, cfg, n_attn_layers=1)
    test = [np.arange(N_ROWS)] * 2
    padded = training.predict(state, data, test, cfg)
    monkeypatch.setattr(training, "SEQ_MULTIPLE", 1)
    plain = training.predict(state, data, test, cfg)
    np.testing.assert_allclose(padded, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["roostformer", "wrenformer"])
def test_members_never_see_each_others_data(model):
    """Change one member's batch: every other member's gradients stay the same."""
    data = task_data(model)
    members = members_of(N_ROWS, 3)
    cfg = training.TrainConfig("regression", 1, batch_size=16, **EXACT)
    state = training.new_train_state(model, data, members, cfg, **TINY)
    net = state.model

    def grads(plan, step):
        inputs, targets, weight, _ = data.step(plan, step)
        net.zero_grad()
        training.member_losses(net(*inputs), targets, weight, cfg, state.norm_mean,
                               state.norm_std).sum().backward()
        return {name: p.grad.clone() for name, p in net.named_parameters()}

    idx = [m.fit_idx for m in members]
    base = grads(data.plan(idx, 16, [np.random.default_rng(s) for s in range(3)]), 0)
    other = [idx[0], idx[1], idx[2][::-1].copy()]  # member 2 gets other materials
    changed = grads(data.plan(other, 16, [np.random.default_rng(s) for s in (0, 1, 5)]),
                    0)
    for name in base:
        torch.testing.assert_close(base[name][:2], changed[name][:2], rtol=0, atol=0)
    assert any(not torch.equal(base[n][2], changed[n][2]) for n in base)


def test_stacked_member_matches_a_solo_run():
    """A member of a 3-member stacked run and a solo run with its fold and seed give
    the same predictions within fp32 rounding."""
    data = task_data("roostformer")
    members = members_of(N_ROWS, 3)
    cfg = training.TrainConfig("regression", 3, batch_size=32, **EXACT)
    stacked = training.new_train_state("roostformer", data, members, cfg,
                                       frac_encoding_dims=16, **TINY)
    training.train(stacked, data, cfg, progress=False)
    solo = training.new_train_state("roostformer", data, [members[1]], cfg,
                                    frac_encoding_dims=16, **TINY)
    training.train(solo, data, cfg, progress=False)
    test = np.arange(N_ROWS)
    ours = training.predict(stacked, data, [test] * 3, cfg)
    (alone,) = training.predict(solo, data, [test], cfg)
    np.testing.assert_allclose(ours[1], alone, rtol=1e-3)
    assert np.abs(ours[0] - alone).mean() > 10 * np.abs(ours[1] - alone).mean()


def emulate_cuda_graphs(monkeypatch) -> list[int]:
    """GraphedStep without a GPU: warm-up steps and 'replays' run its step body
    eagerly (a replay overwrites the gradients, as a captured backward does).
    Returns the list the widths of the 'captured' graphs go to."""
    captured: list[int] = []

    def step(self, width):
        self.state.optimizer.zero_grad(set_to_none=True)
        self.body(width)

    def capture(self, width):
        captured.append(width)
        return lambda: step(self, width)

    monkeypatch.setattr(training.GraphedStep, "warmup_step", step)
    monkeypatch.setattr(training.GraphedStep, "capture", capture)
    return captured


def test_plan_steps_give_members_batches_of_one_rank():
    """Training plans rank each member's batches by their longest material and give
    every member its batch of the same rank at a step, in an order shared by all
    members and drawn anew each epoch: a step pads little however many members are
    stacked."""
    data = task_data("roostformer")
    idx = [np.random.default_rng(s).permutation(N_ROWS)[:80] for s in range(4)]

    def plan(order_seed: int) -> training.Plan:
        return data.plan(idx, 8, [np.random.default_rng(s) for s in range(4)],
                         np.random.default_rng(order_seed))

    first = plan(0)
    mat, real = first.mat.numpy(), first.weight.numpy() > 0
    width = np.array([[data.length[mat[s, m][real[s, m]]].max() for m in range(4)]
                      for s in range(len(first))])  # (steps, members)
    assert len(set(first.width)) > 1
    for s in range(len(first)):  # co-monotone: if one member's step s is shorter
        for t in range(len(first)):  # than its step t, so is every member's
            if (width[s] < width[t]).any():
                assert (width[s] <= width[t]).all()
    for m in range(4):  # a member's materials once each, with the same content
        np.testing.assert_array_equal(np.sort(mat[:, m][real[:, m]]), np.sort(idx[m]))
    other = plan(1)
    assert not np.array_equal(other.mat.numpy(), mat)  # a new order each epoch
    np.testing.assert_array_equal(np.sort(other.mat.numpy(), axis=None),
                                  np.sort(mat, axis=None))


def test_graph_step_bookkeeping_matches_eager(monkeypatch):
    """The graphed step's static buffers, on-device step counter, learning-rate
    table, loss sums and one graph per step width train as the eager loop does.
    A float32 learning rate changes only rounding, which a tiny model on 100
    materials amplifies from epoch to epoch: the first epoch agrees to 1e-5."""
    captured = emulate_cuda_graphs(monkeypatch)
    data = task_data("roostformer")
    members = members_of(N_ROWS, 2)
    batch = 8
    logs, preds, widths = {}, {}, Counter()  # the graphed run's steps per width
    for graphs in (False, True):
        cfg = training.TrainConfig("regression", 3, batch_size=batch,
                                   cuda_graphs=graphs, **EXACT)
        state = training.new_train_state("roostformer", data, members, cfg,
                                         frac_encoding_dims=16, **TINY)
        logs[graphs] = []
        plan = data.plan
        if graphs:
            def counting(*args, plan=plan):  # training plans (with rngs) only
                made = plan(*args)
                widths.update(made.width if len(args) > 2 else [])
                return made

            monkeypatch.setattr(data, "plan", counting)
        training.train(state, data, cfg, progress=False,
                       on_epoch_end=lambda _, m, log=logs[graphs]: log.append(m))
        monkeypatch.setattr(data, "plan", plan)
        preds[graphs] = np.stack(training.predict(state, data, [np.arange(N_ROWS)] * 2,
                                                  cfg))
        assert state.scheduler.last_epoch == 3 * training.steps_per_epoch(members,
                                                                          batch)
    # one graph per width, captured once, after its warm-up steps
    assert len(captured) > 1
    assert sorted(captured) == sorted(
        w for w, n in widths.items() if n > training.GraphedStep.WARMUP_STEPS)
    for eager, graph in zip(logs[False], logs[True], strict=True):
        assert eager["lr"] == pytest.approx(graph["lr"], rel=1e-6)
    first = [logs[g][0]["train_loss"] for g in (False, True)]
    assert first[0] == pytest.approx(first[1], rel=1e-5)
    for eager, graph in zip(logs[False], logs[True], strict=True):
        assert eager["train_loss"] == pytest.approx(graph["train_loss"], rel=2e-2)
        assert eager["val_mae"] == pytest.approx(graph["val_mae"], rel=2e-2)
    assert (np.abs(preds[True] - preds[False]).mean()
            < 0.02 * np.abs(preds[False]).mean())


def test_bf16_copy_follows_autocast_and_resumes():
    """amp on a CPU trains a bf16 copy of the stacked model: its gradients, copied
    into the flat fp32 master weights, agree with autocast's; the optimizer's update
    reaches the copy; and a state rebuilt from saved state dicts trains on exactly
    like the state that was saved."""
    data = task_data("wrenformer")
    members = members_of(N_ROWS, 2)
    cfg = training.TrainConfig("regression", 3, batch_size=32, amp=True, **EXACT)
    state = training.new_train_state("wrenformer", data, members, cfg, n_attn_layers=2)
    bf16 = state.bf16
    assert bf16 is not None and state.optimizer.param_groups[0]["params"] == [
        bf16.master]
    params = list(state.model.parameters())
    master_ptr = bf16.master.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == master_ptr for p in params)

    twin = copy.deepcopy(state.model)
    plan = data.plan([m.fit_idx for m in members], 32, [np.random.default_rng(0)] * 2)
    inputs, targets, weight, _ = data.step(plan, 0)
    bf16.model.train()
    losses = training.member_losses(bf16.model(*inputs), targets, weight, cfg,
                                    state.norm_mean, state.norm_std)
    bf16.backward(losses.sum())
    with training.autocast(CPU, True):
        output = twin(*inputs)
    training.member_losses(output, targets, weight, cfg, state.norm_mean,
                           state.norm_std).sum().backward()
    for grad, (name, param) in zip(bf16.grads, twin.named_parameters(), strict=True):
        assert torch.nn.functional.cosine_similarity(
            grad.flatten(), param.grad.flatten(), dim=0) > 0.98, name

    before = bf16.master.detach().clone()
    state.optimizer.step()
    bf16.refresh()
    assert not torch.equal(before, bf16.master)
    for param, copy_param in zip(params, bf16.model.parameters(), strict=True):
        assert torch.equal(copy_param, param.to(torch.bfloat16))

    state = training.new_train_state("wrenformer", data, members, cfg, n_attn_layers=2)
    training.train(state, data, cfg, progress=False,
                   on_epoch_end=lambda epoch, metrics: epoch == 1)
    saved = copy.deepcopy({"model": state.model.state_dict(),
                           "optimizer": state.optimizer.state_dict(),
                           "scheduler": state.scheduler.state_dict()})
    resumed = training.new_train_state("wrenformer", data,
                                       members_of(N_ROWS, 2, seed=9), cfg,
                                       n_attn_layers=2)
    resumed.members = members
    resumed.model.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.scheduler.load_state_dict(saved["scheduler"])
    resumed.norm_mean, resumed.norm_std = state.norm_mean, state.norm_std
    resumed.epoch = 1
    for st in (state, resumed):
        training.train(st, data, cfg, progress=False)
    test = [np.arange(N_ROWS)] * 2
    np.testing.assert_array_equal(training.predict(state, data, test, cfg),
                                  training.predict(resumed, data, test, cfg))


# --- the recipe's levers: gated output, fraction jitter, threshold ---------------
def config(**kwargs) -> training.TrainConfig:
    return training.TrainConfig(task_type="regression", epochs=1, **kwargs)


def test_gate_can_predict_exact_zeros_whatever_the_mean():
    mean, std = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])
    value = torch.randn(2, 4)
    closed = torch.stack([value, torch.full_like(value, -50.0)], dim=-1)  # gate shut
    opened = torch.stack([value, torch.full_like(value, 50.0)], dim=-1)
    cfg = config(gate=True)
    assert training.output_to_prediction(closed, cfg, mean, std).abs().max() < 1e-12
    torch.testing.assert_close(training.output_to_prediction(opened, cfg, mean, std),
                               value * std[:, None] + mean[:, None])
    half = torch.stack([value, torch.zeros_like(value)], dim=-1)
    torch.testing.assert_close(training.output_to_prediction(half, cfg, mean, std),
                               0.5 * (value * std[:, None] + mean[:, None]))
    # the loss is L1 of that prediction in normalized units; robust adds a log std
    targets = torch.randn(2, 4)
    weight = torch.ones(2, 4)
    pred = training.output_to_prediction(half, cfg, mean, std)
    expect = ((pred - targets).abs() / std[:, None]).mean(dim=1)
    torch.testing.assert_close(
        training.member_losses(half, targets, weight, cfg, mean, std), expect)
    robust = torch.cat([half, torch.zeros(2, 4, 2)], dim=-1)
    torch.testing.assert_close(
        training.member_losses(robust, targets, weight, config(gate=True, robust=True),
                               mean, std), 2**0.5 * expect)


def test_log_target_fits_the_log_and_predicts_its_exp():
    """--log-target: the normalizer is fitted on log(target), the loss is L1 of
    normalized logs (the pad row's target 0 gives a finite loss at weight 0), and
    the prediction is exp of the de-normalized output."""
    data = task_data("roostformer")  # steels: yield strengths, all above 0
    members = members_of(N_ROWS, 2)
    cfg = config(log_target=True, **EXACT)
    state = training.new_train_state("roostformer", data, members, cfg, **TINY)
    for m, member in enumerate(members):
        logs = np.log(data.targets[member.fit_idx].double().numpy())
        assert state.norm_mean[m].item() == pytest.approx(logs.mean(), rel=1e-6)
        assert state.norm_std[m].item() == pytest.approx(logs.std(ddof=1), rel=1e-6)
    mean, std = torch.tensor([5.0, 6.0]), torch.tensor([0.5, 2.0])
    output = torch.randn(2, 4, 1)
    pred = training.output_to_prediction(output, cfg, mean, std)
    torch.testing.assert_close(pred, torch.exp(output[..., 0] * std[:, None]
                                               + mean[:, None]))
    targets = torch.tensor([[100.0, 200.0, 300.0, 0.0]] * 2)  # last: the pad row
    weight = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2)
    normed = (torch.log(targets[:, :3]) - mean[:, None]) / std[:, None]
    torch.testing.assert_close(
        training.member_losses(output, targets, weight, cfg, mean, std),
        (output[:, :3, 0] - normed).abs().mean(dim=1))
    # a short run trains and predicts positive values, as the targets are
    training.train(state, data, cfg, progress=False)
    preds = training.predict(state, data, [np.arange(N_ROWS)] * 2, cfg)
    assert all(np.isfinite(p).all() and (p > 0).all() for p in preds)
    tokens, targets = fixture("roostformer")
    bad = training.TaskData(tokens, np.zeros_like(targets), CPU)
    with pytest.raises(ValueError, match="above 0"):
        training.new_train_state("roostformer", bad, members, cfg, **TINY)


def test_fraction_jitter_keeps_padding_and_sums():
    frac = torch.tensor([[[0.5, 0.25, 0.25, 0.0]], [[1.0, 0.0, 0.0, 0.0]]])
    inputs = (torch.ones_like(frac, dtype=torch.long), frac, None, frac == 0)
    assert training.jitter_fractions(inputs, 0.0) is inputs
    torch.manual_seed(0)
    _, noisy, wyckoff, mask = training.jitter_fractions(inputs, 0.05)
    assert wyckoff is None and mask is inputs[3]
    torch.testing.assert_close(noisy.sum(dim=-1), torch.ones(2, 1))
    assert (noisy[frac == 0] == 0).all() and (noisy[frac > 0] > 0).all()
    assert not torch.equal(noisy[0], frac[0])


def test_best_threshold_maximizes_balanced_accuracy():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 40))
        targets, probs = rng.integers(0, 2, n), np.round(rng.random(n), 1)
        if len(set(targets)) < 2:
            assert training.best_threshold(targets, probs) == training.CLASS_THRESHOLD
            continue
        chosen = balanced_accuracy_score(
            targets, probs > training.best_threshold(targets, probs))
        brute = max(balanced_accuracy_score(targets, probs > cut)
                    for cut in np.linspace(-0.05, 1.05, 221))
        assert chosen == pytest.approx(brute)
    # imbalanced classes: 0.5 labels everything 1, the chosen threshold separates
    targets = np.array([1] * 90 + [0] * 10)
    probs = np.concatenate([rng.uniform(0.8, 1.0, 90), rng.uniform(0.6, 0.8, 10)])
    assert balanced_accuracy_score(targets, probs > 0.5) == 0.5
    assert balanced_accuracy_score(targets, probs > training.best_threshold(
        targets, probs)) == 1.0
    assert training.crossfit_balanced_accuracy(targets, probs) > 0.9


def test_score_rocauc_is_matbenchs_of_the_labels():
    targets = np.array([0, 0, 1, 1, 1])
    probs = np.array([0.1, 0.6, 0.4, 0.7, 0.9])
    scores = training.score(targets, probs, "classification")
    assert scores["rocauc"] == balanced_accuracy_score(targets, probs > 0.5)
    assert scores["rocauc_prob"] == pytest.approx(5 / 6)
    assert training.score(targets, probs, "classification", 0.3)["rocauc"] == 0.75


def test_wyckoff_features_scaled_to_their_largest_value():
    raw, scaled = training.wyckoff_table("raw"), training.wyckoff_table("max")
    assert torch.equal(raw, training.wyckoff_vocab()[1]) and raw.max() == 192
    assert scaled.min() >= 0 and scaled.max() == 1
    used = raw.abs().amax(dim=0) > 0
    assert torch.allclose(scaled.amax(dim=0)[used], torch.ones(int(used.sum())))
    assert torch.allclose(scaled * raw.abs().amax(dim=0), raw)
    torch.manual_seed(0)
    member = training.MatbenchTransformer(
        wyckoff=True, wyckoff_features="max", task_dict={"target": "regression"},
        robust=False, n_targets=[1], d_model=16, n_attn_layers=1, n_attn_heads=2)
    stacked = training.StackedTransformer([member])
    assert torch.equal(stacked.wyckoff_table, scaled)
    assert stacked.model_params["wyckoff_features"] == "max"
    with pytest.raises(ValueError, match="unknown Wyckoff feature scaling"):
        training.wyckoff_table("unit")


@pytest.mark.parametrize("amp", [False, True])
def test_weight_average_is_the_mean_of_the_last_epochs(amp):
    """The weight average measured beside the recipe (SWA) is the mean of each
    member's weights at the end of the last quarter of the epochs, kept per member;
    predicting with it inside weights_swapped leaves the model's own weights, and
    so its predictions, exactly as they were."""
    data = task_data("roostformer")
    members = members_of(N_ROWS, 2)
    cfg = training.TrainConfig("regression", 8, batch_size=32, amp=amp, **EXACT)
    state = training.new_train_state("roostformer", data, members, cfg, **TINY)
    assert training.swa_start(8) == 6 and training.swa_start(300) == 225
    assert training.swa_start(1) == 0
    seen: list[list[torch.Tensor]] = []

    def keep(epoch, metrics):
        seen.append([p.detach().clone() for p in state.model.parameters()])
        return False

    training.train(state, data, cfg, progress=False, on_epoch_end=keep)
    assert state.n_averaged == 2
    for avg, *at_epochs in zip(state.weight_average, *seen[6:], strict=True):
        torch.testing.assert_close(avg, torch.stack(at_epochs).mean(0))
    # each member averages its own weights: member 1's average is member 1's mean
    first = next(n for n, p in state.model.named_parameters() if p.dim() > 1)
    names = [n for n, _ in state.model.named_parameters()]
    at = names.index(first)
    torch.testing.assert_close(state.weight_average[at][1],
                               (seen[6][at][1] + seen[7][at][1]) / 2)
    test = [np.arange(N_ROWS)] * 2
    before = training.predict(state, data, test, cfg)
    with training.weights_swapped(state, state.weight_average):
        averaged = training.predict(state, data, test, cfg)
    after = training.predict(state, data, test, cfg)
    np.testing.assert_array_equal(before, after)
    assert np.abs(np.array(averaged) - np.array(before)).max() > 0
    # the validation predictions at the curve's epochs are kept for the epoch choice
    assert [epoch for epoch, _ in state.val_curve_preds] == [8]
    np.testing.assert_allclose(state.val_curve_preds[0][1][1], training.predict(
        state, data, [m.val_idx for m in members], cfg)[1], rtol=1e-6)


def test_keep_best_epochs_keeps_each_members_own_best():
    """keep_best_epochs keeps, per member, the weights of the curve epoch with its
    best score so far: the lowest MAE or the highest ROC-AUC, a score that is not
    finite never, and each member's row of the stacked weights on its own."""
    data = task_data("roostformer")
    cfg = training.TrainConfig("regression", 1, batch_size=32, epoch_choice=True)
    state = training.new_train_state("roostformer", data, members_of(N_ROWS, 3), cfg,
                                     **TINY)
    params = list(state.model.parameters())

    def at_epoch(epoch: int, scores: list[float], lower_is_better: bool) -> None:
        with torch.no_grad():
            for param in params:
                param.fill_(epoch)
        training.keep_best_epochs(state, epoch, scores, lower_is_better)

    nan = float("nan")
    at_epoch(10, [nan, 2.0, 3.0], True)
    at_epoch(20, [5.0, 1.0, 3.0], True)  # a tie (member 2) keeps the earlier epoch
    at_epoch(30, [6.0, nan, 4.0], True)
    assert state.chosen_epochs == [20, 20, 10]
    assert state.chosen_scores == [5.0, 1.0, 3.0]
    for kept in state.chosen_weights:
        assert [float(row.flatten()[0]) for row in kept] == [20.0, 20.0, 10.0]
    training.use_chosen_epochs(state)
    first = params[0].detach()
    assert [float(row.flatten()[0]) for row in first] == [20.0, 20.0, 10.0]
    # ROC-AUC: higher is better
    state.chosen_weights = []
    at_epoch(10, [0.9, 0.5, 0.7], False)
    at_epoch(20, [0.8, 0.6, 0.7], False)
    assert state.chosen_epochs == [10, 20, 10]


@pytest.mark.parametrize("amp", [False, True])
def test_epoch_choice_predicts_at_each_members_best_curve_epoch(monkeypatch, amp):
    """Trained with cfg.epoch_choice, each member keeps its weights from the curve
    epoch with its lowest validation MAE; after use_chosen_epochs the model
    predicts each member's validation split exactly as it did at that epoch, bf16
    copy included."""
    monkeypatch.setattr(training, "VAL_CURVE_EPOCHS", 1)
    data = task_data("roostformer")
    members = members_of(N_ROWS, 3)
    cfg = training.TrainConfig("regression", 8, batch_size=32, learning_rate=0.01,
                               amp=amp, epoch_choice=True, **EXACT)
    state = training.new_train_state("roostformer", data, members, cfg, **TINY)
    training.train(state, data, cfg, progress=False)
    curve = np.array([scores for _, scores in state.val_curve])  # (epochs, members)
    assert len(curve) == 8
    best = curve.argmin(axis=0)
    assert (best < 7).any()  # some member's best is not its last epoch
    assert state.chosen_epochs == [int(t) + 1 for t in best]
    training.use_chosen_epochs(state)
    val = training.predict(state, data, [m.val_idx for m in members], cfg)
    for m, t in enumerate(best):
        np.testing.assert_allclose(val[m], state.val_curve_preds[t][1][m], rtol=1e-5)
