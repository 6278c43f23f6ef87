"""A packed member computes what the same trial computes alone (core/stacked.py): its
losses per epoch, its evaluation, its model; a diverging member fails alone.

Both sides run in float64. The equivalence is of the arithmetic (the same sums in
another order, another matmul shape), and in float32 rounding alone moves a trial by
more than any tolerance that would still catch a packing bug (tests/conftest.py,
PACKED_REL: up to 9e-2 in loss for Adam at lr 1e-2, packed against alone). In
float64 a packed member matches its trial alone to within 1.1e-14 under
ATEN_CPU_CAPABILITY=default, avx2 and avx512, every member here included, so PACKED_REL
(1e-10) holds on any CPU and still fails for any real difference (a member stepping
with another's options, a shared optimizer state, another data order).

Imports torch and the engine only, so `.ci/gpu-check` runs it on CUDA on a GPU machine
that has no Hydra or MLflow."""

from __future__ import annotations

import contextlib
import io
import itertools
from inspect import signature

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fashion_sweep.core import stacked
from fashion_sweep.core.data import load_splits, make_loaders
from fashion_sweep.core.engine import DivergedError, TrainStep, evaluate, train_one_epoch
from fashion_sweep.core.model import NeuralNetwork
from tests.conftest import PACKED_REL

pytestmark = pytest.mark.equivalence
# On a GPU machine (.ci/gpu-check) every test runs on CUDA too.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EPOCHS = 2
DTYPE = torch.float64


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="module")
def splits(data_root):
    # 1,000 and 500 are not multiples of 64: the ragged last batch is in every epoch
    return load_splits(data_root, train_size=1000, test_size=500)


def loaders(splits, device, shuffle, seed, batch_size=64):
    """The resident loaders a trial gets, their images in DTYPE."""
    made = make_loaders(splits, "resident", batch_size, device, shuffle, seed=seed)
    for loader in made.values():
        images, labels = loader.dataset.tensors
        loader.dataset = TensorDataset(images.to(DTYPE), labels)
    return made


def model(seed, device, width=512, depth=2):
    torch.manual_seed(seed)
    return NeuralNetwork(width, depth).to(device, DTYPE)


def alone(
    splits,
    device,
    optimizer,
    options,
    seed,
    shuffle=False,
    width=512,
    depth=2,
    epochs=EPOCHS,
    batch_size=64,
):
    """The trial as run.py runs it: per epoch its train loss and test metrics, or the
    DivergedError's message."""
    made = loaders(splits, device, shuffle, seed, batch_size)
    net = model(seed, device, width, depth)
    step = TrainStep(net, nn.CrossEntropyLoss(), optimizer(net.parameters(), **options))
    results = []
    for _ in range(epochs):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                loss = train_one_epoch(made["train"], step, device)["loss"]
        except DivergedError as error:
            return results, str(error), net
        results.append((loss, evaluate(made["test"], net, nn.CrossEntropyLoss(), device)))
    return results, None, net


def together(
    splits, device, optimizer, options, seeds, shuffle=False, width=512, depth=2, graph=False
):
    models = [model(seed, device, width, depth) for seed in seeds]
    pack = stacked.Pack(models, optimizer, options, cuda_graph=graph)
    per_member = [loaders(splits, device, shuffle, s) for s in seeds]
    train = [made["train"] for made in per_member]
    epochs = []
    for _ in range(EPOCHS):
        losses = stacked.train_epoch(train if shuffle else train[:1], pack)
        epochs.append((losses, stacked.evaluate(per_member[0]["test"], pack)))
    return pack, [[(e[0][i], e[1][i]) for e in epochs] for i in range(len(seeds))]


def assert_same(ours, theirs):
    """Per epoch: train loss and test loss within PACKED_REL, test accuracy equal."""
    assert len(ours) == len(theirs)
    for (loss, metrics), (their_loss, their_metrics) in zip(ours, theirs, strict=True):
        assert loss == pytest.approx(their_loss, rel=PACKED_REL)
        assert metrics["loss"] == pytest.approx(their_metrics["loss"], rel=PACKED_REL)
        assert metrics["accuracy"] == their_metrics["accuracy"]


# Members whose options differ in every way a param group can (lr, momentum, nesterov,
# weight decay, dampening; betas, eps), up to steps large enough that float32 would
# make the comparison meaningless
SGD_MEMBERS = [
    dict(lr=1e-3),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(lr=0.1, momentum=0.5, dampening=0.1),
    dict(lr=0.2, momentum=0.9),
]
ADAM_MEMBERS = [dict(lr=1e-3), dict(lr=3e-4, betas=(0.8, 0.99)), dict(lr=1e-3, eps=1e-6)]
ADAM_MEMBERS += [dict(lr=1e-2)]
# A captured pack's Adam is capturable=True, and so is its trial alone here (an eager
# capturable Adam): capturable Adam keeps its step count on the device in float32 and
# computes its bias corrections from it, which moves a float64 member by ~6e-8 relative
# in its first epoch (seen on an H200) against the float64 Python arithmetic of
# capturable=False.


@pytest.mark.parametrize(
    "optimizer, options",
    [
        (torch.optim.SGD, SGD_MEMBERS),
        (torch.optim.Adam, ADAM_MEMBERS),
        (torch.optim.AdamW, [dict(lr=1e-3, weight_decay=0.01), dict(lr=2e-3, weight_decay=0.1)]),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_each_member_trains_as_its_trial_alone(splits, device, optimizer, options):
    seeds = list(range(len(options)))
    pack, results = together(splits, device, optimizer, options, seeds)
    assert not pack.failed
    for member, (kwargs, seed) in enumerate(zip(options, seeds, strict=True)):
        epochs, failed, net = alone(splits, device, optimizer, kwargs, seed)
        assert failed is None
        assert_same(results[member], epochs)
        # model.pth: the trial's own model, a NeuralNetwork's state_dict
        state = pack.state_dict(member)
        assert list(state) == list(net.state_dict())
        for key, tensor in net.state_dict().items():
            scale = PACKED_REL * tensor.abs().max()
            assert torch.allclose(state[key], tensor, rtol=PACKED_REL, atol=scale), key


@pytest.mark.parametrize("shuffle", [True, False], ids=["own-orders", "one-order"])
@pytest.mark.parametrize(
    "optimizer, options",
    [(torch.optim.SGD, SGD_MEMBERS[1:4]), (torch.optim.Adam, ADAM_MEMBERS[:3])],
    ids=["sgd", "adam"],
)
def test_members_of_different_batch_sizes_each_train_as_their_trial_alone(
    splits, device, optimizer, options, shuffle
):
    """Batch sizes 64, 192 and 256 in one pack (1,000 images: each has a ragged last
    batch of its own; 192's is a single micro-batch, after 5 full batches of 3), trained
    in micro-batches of 64: each member steps after its own number of them, on the
    gradient of its whole batch's mean loss, so it trains, is evaluated and ends as its
    trial alone."""
    sizes, seeds = [64, 192, 256], [0, 1, 2]
    models = [model(seed, device) for seed in seeds]
    pack = stacked.Pack(models, optimizer, options, batch_sizes=sizes)
    train = [loaders(splits, device, shuffle, seed)["train"] for seed in seeds]  # of 64
    tests = [
        loaders(splits, device, shuffle, s, size)["test"]
        for s, size in zip(seeds, sizes, strict=True)
    ]
    results = [[] for _ in seeds]
    for _ in range(EPOCHS):
        losses = stacked.train_epoch(train if shuffle else train[:1], pack)
        for member, metrics in enumerate(stacked.evaluate(tests, pack)):
            results[member].append((losses[member], metrics))
    assert not pack.failed
    for member, (kwargs, seed, size) in enumerate(zip(options, seeds, sizes, strict=True)):
        epochs, failed, net = alone(
            splits, device, optimizer, kwargs, seed, shuffle, batch_size=size
        )
        assert failed is None
        assert_same(results[member], epochs)
        for key, tensor in net.state_dict().items():
            scale = PACKED_REL * tensor.abs().max()
            assert torch.allclose(pack.state_dict(member)[key], tensor, rtol=0, atol=scale), key


@pytest.mark.parametrize(
    "optimizer, options",
    [(torch.optim.SGD, SGD_MEMBERS), (torch.optim.Adam, ADAM_MEMBERS)],
    ids=["sgd", "adam"],
)
def test_each_members_step_is_torch_optims_own(splits, device, optimizer, options):
    """Given the member's gradients, its step is bit for bit the step torch.optim takes
    for the model alone with the member's arguments, state included (5 steps, float32)."""
    models = []
    for seed in range(len(options)):
        torch.manual_seed(seed)
        models.append(NeuralNetwork().to(device))
    pack = stacked.Pack(models, optimizer, options)
    alone = [optimizer(m.parameters(), **kwargs) for m, kwargs in zip(models, options, strict=True)]
    batches = make_loaders(splits, "resident", 64, device)["train"]
    for X, y in itertools.islice(batches, 5):
        pack.step(X, y)
        for member, (net, opt) in enumerate(zip(models, alone, strict=True)):
            for param, own in zip(net.parameters(), pack.members[member], strict=True):
                param.grad = own.grad.clone()
            opt.step()
            for key, tensor in net.state_dict().items():
                assert torch.equal(pack.state_dict(member)[key], tensor), (member, key)


def test_shuffled_members_each_see_their_own_seeds_order(splits, device):
    options, seeds = [dict(lr=0.05), dict(lr=0.05, momentum=0.9)], [3, 4]
    _, results = together(splits, device, torch.optim.SGD, options, seeds, shuffle=True)
    for member, seed in enumerate(seeds):
        epochs, _, _ = alone(splits, device, torch.optim.SGD, options[member], seed, True)
        assert_same(results[member], epochs)
    same_lr = together(splits, device, torch.optim.SGD, [options[0]] * 2, seeds, shuffle=True)[1]
    assert same_lr[0][0][0] != pytest.approx(same_lr[1][0][0], rel=1e-4)  # not one order


def test_a_diverging_member_fails_alone_and_the_others_train_as_without_it(splits, device):
    options = [dict(lr=0.05), dict(lr=1e150), dict(lr=0.2, momentum=0.9)]  # float64: 1e150
    pack, results = together(splits, device, torch.optim.SGD, options, [0, 1, 2])
    _, failed, _ = alone(splits, device, torch.optim.SGD, options[1], 1)
    assert failed is not None  # the same reason, alone
    assert {k: str(v) for k, v in pack.failed.items()} == {1: failed}
    _, without = together(splits, device, torch.optim.SGD, [options[0], options[2]], [0, 2])
    assert_same(results[0], without[0])
    assert_same(results[2], without[1])


def test_a_narrower_deeper_shape_packs_too(splits, device):
    options = [dict(lr=0.1), dict(lr=0.01)]
    pack, results = together(splits, device, torch.optim.SGD, options, [0, 1], False, 64, 3)
    for member in range(2):
        sgd = torch.optim.SGD
        epochs, _, net = alone(splits, device, sgd, options[member], member, False, 64, 3)
        assert_same(results[member], epochs)
        net.load_state_dict(pack.state_dict(member))  # the keys and shapes fit


def in_one_buffer(step):
    """`step`, returning its losses in one buffer that its next call overwrites, as a
    captured step does."""
    buffer = None

    def reused(X, y):
        nonlocal buffer
        losses = step(X, y)
        buffer = losses.clone() if buffer is None else buffer.copy_(losses)
        return buffer

    return reused


def test_each_steps_losses_are_read_before_the_next_step_overwrites_them(splits):
    """A captured pack's step returns its losses in its CUDA graph's buffer, which the
    next step overwrites (Pack.step: valid until the next call): train_epoch's means are
    those of every batch, not of the last one counted again (seen on an H200: only the
    reported train loss was wrong). Here on the CPU, a step returning one buffer."""
    device, means = torch.device("cpu"), []
    for reused in (False, True):
        pack = stacked.Pack([model(s, device) for s in (0, 1)], torch.optim.SGD, SGD_MEMBERS[:2])
        if reused:
            pack.step = in_one_buffer(pack.step)
        train = [loaders(splits, device, True, seed)["train"] for seed in (0, 1)]
        means.append(stacked.train_epoch(train, pack))
    assert means[1] == means[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shuffle", [False, True], ids=["shared-batch", "own-batches"])
@pytest.mark.parametrize(
    "optimizer, options",
    [(torch.optim.SGD, SGD_MEMBERS), (torch.optim.Adam, ADAM_MEMBERS)],
    ids=["sgd", "adam"],
)
def test_a_captured_pack_trains_as_the_eager_pack(splits, optimizer, options, shuffle):
    """trainer.cuda_graph=true on a pack: the whole packed step is one CUDA graph, and
    each member computes what it computes eagerly (the ragged last batch included)."""
    device, seeds = torch.device("cuda"), list(range(len(options)))
    if "capturable" in signature(optimizer).parameters:  # on both sides (ADAM_MEMBERS says why)
        options = [{**kwargs, "capturable": True} for kwargs in options]
    _, eager = together(splits, device, optimizer, options, seeds, shuffle)
    pack, graphed = together(splits, device, optimizer, options, seeds, shuffle, graph=True)
    assert pack.captured.graph is not None and not pack.failed
    for member in range(len(seeds)):
        assert_same(graphed[member], eager[member])


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph"])
@pytest.mark.parametrize(
    "optimizer, options",
    [(torch.optim.SGD, SGD_MEMBERS), (torch.optim.Adam, ADAM_MEMBERS)],
    ids=["sgd", "adam"],
)
def test_members_dropped_from_a_pack_leave_the_rest_as_alone(
    splits, device, optimizer, options, graph
):
    """Pruned or finished members leave their pack (Pack.keep), after epoch 1 and again
    after epoch 2: the pack computes only the others from then on, and they keep their
    weights, optimizer state (momentum, Adam's moments and step count) and own shuffled
    data order, so each trains on as alone. After the second drop a member's position in
    the pack is no longer its number."""
    if graph and device.type != "cuda":
        pytest.skip("needs CUDA")
    if graph and "capturable" in signature(optimizer).parameters:
        options = [{**kwargs, "capturable": True} for kwargs in options]
    models = [model(seed, device) for seed in range(len(options))]
    pack = stacked.Pack(models, optimizer, options, cuda_graph=graph)
    made = [loaders(splits, device, True, seed) for seed in pack.ids]
    train = [member["train"] for member in made]
    last = len(options) - 1
    # after epoch 1 the first member leaves; after epoch 2 all but the last
    drops = {0: list(range(1, len(options))), 1: [last - 1]}
    epochs = {member: [] for member in pack.ids}
    for epoch in range(3):
        losses = stacked.train_epoch(train, pack)
        for member, loss, metrics in zip(
            pack.ids, losses, stacked.evaluate(made[0]["test"], pack), strict=True
        ):
            epochs[member].append((loss, metrics))
        if epoch in drops:
            train = [train[position] for position in drops[epoch]]  # as launchers/packed.py
            pack.keep(drops[epoch])
    assert pack.ids == [last] and len(pack) == 1
    assert [len(epochs[m]) for m in epochs] == [1] + [2] * (last - 1) + [3]
    for member in (1, last):
        theirs, _, net = alone(
            splits, device, optimizer, options[member], member, True, epochs=len(epochs[member])
        )
        assert_same(epochs[member], theirs)
    net.load_state_dict(pack.state_dict(0))  # the last member's model.pth
    test_metrics = evaluate(made[0]["test"], net, nn.CrossEntropyLoss(), device)
    assert test_metrics == epochs[last][-1][1]


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph"])
@pytest.mark.parametrize("sizes", [None, [64, 192, 128]], ids=["one-size", "mixed-sizes"])
@pytest.mark.parametrize(
    "optimizer, options",
    [(torch.optim.SGD, SGD_MEMBERS[1:4]), (torch.optim.Adam, ADAM_MEMBERS[:3])],
    ids=["sgd", "adam"],
)
def test_a_member_that_joins_a_pack_trains_as_its_trial_alone(
    splits, device, optimizer, options, sizes, graph
):
    """A continuous pack (Pack.add): members 0 and 1 train an epoch, member 0 leaves and
    member 2 joins, with its own seed, options, data order and (mixed) batch size; it
    trains its first two epochs while member 1 trains its second and third, each as its
    trial alone, member 1's optimizer state (momentum, Adam's moments and step count)
    kept across the join. Member 2 leaves the pack a member with a number of its own."""
    if (graph and device.type != "cuda") or (graph and sizes):
        pytest.skip("a captured pack is of one batch size, on CUDA")
    if graph and "capturable" in signature(optimizer).parameters:
        options = [{**kwargs, "capturable": True} for kwargs in options]
    size = sizes or [64] * 3
    pack = stacked.Pack(
        [model(0, device), model(1, device)],
        optimizer,
        options[:2],
        cuda_graph=graph,
        batch_sizes=size[:2] if sizes else None,
    )
    train = {m: loaders(splits, device, True, m)["train"] for m in (0, 1)}  # of 64
    tests = {m: loaders(splits, device, False, m, size[m])["test"] for m in range(3)}
    epochs = {member: [] for member in range(3)}
    for epoch in range(3):
        losses = stacked.train_epoch([train[m] for m in pack.ids], pack)
        evaluated = stacked.evaluate([tests[m] for m in pack.ids], pack)
        for member, loss, metrics in zip(pack.ids, losses, evaluated, strict=True):
            epochs[member].append((loss, metrics))
        if epoch == 0:
            pack.keep([1])
            joined = pack.add([model(2, device)], options[2:], size[2:] if sizes else None)
            assert joined == [2] and pack.ids == [1, 2]
            train[2] = loaders(splits, device, True, 2)["train"]
    assert [len(epochs[m]) for m in range(3)] == [1, 3, 2]
    for member in (1, 2):
        theirs, _, net = alone(
            splits,
            device,
            optimizer,
            options[member],
            member,
            True,
            epochs=len(epochs[member]),
            batch_size=size[member],
        )
        assert_same(epochs[member], theirs)
        state = pack.state_dict(pack.ids.index(member))
        for key, tensor in net.state_dict().items():
            scale = PACKED_REL * tensor.abs().max()
            assert torch.allclose(state[key], tensor, rtol=0, atol=scale), key
