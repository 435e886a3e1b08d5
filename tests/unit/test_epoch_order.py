"""The epoch reaches the sampler and the dataset through Accelerate's prepared loader (and the loader that skips
the first batches on resume): order and flips change every epoch and are a pure function of (seed, epoch, index)."""
from __future__ import annotations

import pickle

import pytest
import torch
from accelerate.data_loader import prepare_data_loader

from tests.unit.test_data import experiment, make_tiles
from trainer.data import build_datasets
from trainer.train.loop import EpochSampler, epoch_loader

N = 6


@pytest.fixture(scope="module")
def train_ds(tmp_path_factory):
    root = make_tiles(tmp_path_factory.mktemp("tiles"), n_train=N, n_val=1)
    return build_datasets(experiment(root, flips=True))[0]


def _prepared(dataset, nproc: int, rank: int):
    sampler = EpochSampler(N, N, seed=0)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=1, drop_last=True)
    return prepare_data_loader(loader, device=torch.device("cpu"), num_processes=nproc, process_index=rank,
                               put_on_device=True), sampler


def _expected(dataset, epoch: int) -> list[torch.Tensor]:
    """Sample images in the sampler's order of `epoch`, from an independent copy of the dataset."""
    ref = pickle.loads(pickle.dumps(dataset))
    ref.set_epoch(epoch)
    sampler = EpochSampler(N, N, seed=0)
    sampler.set_epoch(epoch)
    return [ref[i]["image"] for i in sampler]


def _take(loader, n: int) -> list[torch.Tensor]:
    it = iter(loader)  # like the training loop: take the epoch's batches, never exhaust the iterator
    return [next(it)["image"][0] for _ in range(n)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_order_and_flips_differ_between_epochs(train_ds):
    orders, flips = [], []
    for epoch in range(3):
        s = EpochSampler(N, N, seed=0)
        s.set_epoch(epoch)
        orders.append(list(s))
        train_ds.set_epoch(epoch)
        flips.append([train_ds.flips_for(i) for i in range(N)])
    assert len({tuple(o) for o in orders}) == 3, orders
    assert len({tuple(f) for f in flips}) == 3, flips
    assert not _same(_expected(train_ds, 0), _expected(train_ds, 1))


@pytest.mark.parametrize("nproc", [1, 2])
def test_prepared_loader_follows_the_epoch_and_resume_skips_within_it(train_ds, nproc):
    per_rank = N // nproc
    for rank in range(nproc):
        loader, sampler = _prepared(train_ds, nproc, rank)
        for epoch in range(3):  # one loader across epochs, as in training
            got = _take(epoch_loader(loader, sampler, train_ds, epoch), per_rank)
            assert _same(got, _expected(train_ds, epoch)[rank::nproc]), f"epoch {epoch}, rank {rank}"
        # a resume in the middle of epoch 2, on a fresh loader (a new process): the rest of epoch 2's batches
        fresh, fresh_sampler = _prepared(pickle.loads(pickle.dumps(train_ds)), nproc, rank)
        resumed = epoch_loader(fresh, fresh_sampler, fresh.dataset, 2, skip=1)
        got = _take(resumed, per_rank - 1)
        assert _same(got, _expected(train_ds, 2)[rank::nproc][1:]), f"resumed epoch 2, rank {rank}"
        # and the epoch after that resume is epoch 3, not a replay of the resumed one
        got = _take(epoch_loader(fresh, fresh_sampler, fresh.dataset, 3), per_rank)
        assert _same(got, _expected(train_ds, 3)[rank::nproc])
