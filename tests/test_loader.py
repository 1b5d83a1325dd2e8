"""The train and eval loaders: epoch coverage across DP ranks and workers, resampling, weighted
sources, counted bad input, exact resume."""
import hashlib
import itertools
import tarfile
from collections import Counter

import pytest
import torch

from megaclip.data.eval_loader import build_eval_loader
from megaclip.data.loader import build_train_loader
from megaclip.data.samples import BAD_SHARD, SampleDecoder, Skipped, read_shards
from megaclip.data.shards import Source, expand_shards, parse_sources, resampled_shards
from megaclip.data.transforms import eval_transform, train_transform
from tests.data_helpers import data_config, image_bytes, write_bad_shards, write_tar


def loader(shards, tokenizer, *, dp_rank=0, dp_size=1, seed=0, transform=None, **cfg):
    return build_train_loader(shards, data_config(**{"shuffle_buffer": 40, "shuffle_window": 1, **cfg}),
                              dp_rank=dp_rank, dp_size=dp_size, micro_batch_size=16,
                              image_transform=transform or eval_transform(32), tokenizer=tokenizer, seed=seed)


def hashes(batches):
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for images, _ in batches for image in images]


def take(iterator, n):
    return list(itertools.islice(iterator, n))


@pytest.fixture(scope="module")
def every_train_image(synthetic, tokenizer):
    batches = build_eval_loader(synthetic.train_shards, data_config(), dp_rank=0, dp_size=1, batch_size=64,
                                image_transform=eval_transform(32), tokenizer=tokenizer)
    return set(hashes((batch.images, None) for batch in batches))


def test_epoch_mode_dp2_workers2_reads_every_sample_once_per_epoch(synthetic, tokenizer, every_train_image):
    # 8 shards of 32 over 2 ranks x 2 workers: 2 shards (4 batches of 16) per reader and epoch
    epochs = {0: [], 1: []}
    for rank in range(2):
        stream = take(iter(loader(synthetic.train_shards, tokenizer, dp_rank=rank, dp_size=2, num_workers=2)), 16)
        for epoch in epochs:
            seen = hashes(stream[8 * epoch:8 * (epoch + 1)])
            assert len(seen) == len(set(seen)) == 128
            epochs[epoch].append(seen)
    for first, second in epochs.values():
        assert not set(first) & set(second) and set(first) | set(second) == every_train_image
    assert epochs[0][0] != epochs[1][0]  # reshuffled


def test_resampled_is_deterministic_per_rank_and_draws_with_replacement(synthetic, tokenizer, every_train_image):
    def stream(rank, **kw):
        return take(iter(loader(synthetic.train_shards, tokenizer, dp_rank=rank, dp_size=2, resampled=True, **kw)), 16)

    rank0, rank1 = stream(0), stream(1)
    again = stream(0)
    # the same samples through the same decoding and transforms: bitwise
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rank0, again))
    assert hashes(rank0) != hashes(rank1)
    assert set(hashes(rank0)) <= every_train_image
    # 16 batches = 8 shard draws of 32: with replacement, this seed draws some shards twice
    assert len(set(hashes(rank0))) < 256 and len(set(hashes(rank0))) % 32 == 0
    assert hashes(stream(0, num_workers=2)) != hashes(rank0)  # readers draw their own shards
    assert hashes(stream(0, seed=1)) != hashes(rank0)


def test_weighted_sources(tmp_path):
    a, b = Source(("a0", "a1"), 1.0), Source(("b0",), 3.0)
    draws = Counter(url[0] for epoch in range(40) for url in resampled_shards(
        [a, b], seed=0, epoch=epoch, dp_rank=0, worker=0, count=100))
    assert sum(draws.values()) == 4000 and abs(draws["b"] / 4000 - 0.75) < 0.03
    assert resampled_shards([a, b], seed=0, epoch=3, dp_rank=1, worker=0, count=50) == \
        resampled_shards([a, b], seed=0, epoch=3, dp_rank=1, worker=0, count=50)
    paths = [write_tar(tmp_path / f"{name}.tar", []) for name in ("x0", "x1", "y0")]
    sources = parse_sources([{"shards": str(tmp_path / "x{0..1}.tar"), "weight": 2}, {"shards": paths[2]}])
    assert sources == [Source(tuple(paths[:2]), 2.0), Source((paths[2],), 1.0)]
    assert expand_shards([{"shards": paths[2]}, str(tmp_path)]) == [paths[2], *sorted(paths)]
    with pytest.raises(ValueError, match="source weights need model.data.resampled=true"):
        build_train_loader([{"shards": paths[0], "weight": 2}, {"shards": paths[2]}], data_config(), dp_rank=0,
                           dp_size=1, micro_batch_size=2, image_transform=None, tokenizer=None, seed=0)
    with pytest.raises(FileNotFoundError, match="1 shard"):
        parse_sources([{"shards": str(tmp_path / "x{1..2}.tar")}])


def test_too_few_shards_in_epoch_mode(synthetic, tokenizer):
    with pytest.raises(ValueError, match="8 train shards cannot feed 2 data-parallel ranks x 8 loader workers: "
                                         "need at least 16 shards"):
        loader(synthetic.train_shards, tokenizer, dp_size=2, num_workers=8)
    loader(synthetic.train_shards, tokenizer, dp_size=2, num_workers=8, resampled=True)  # fine with replacement


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    return write_bad_shards(tmp_path_factory.mktemp("bad"))


EXPECTED_SKIPS = {"bad_images": 1, "missing_captions": 1, "missing_images": 1, "bad_shards": 3}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_pass_counts_every_kind_of_bad_input(bad_shards, tokenizer, num_workers):
    eval_loader = build_eval_loader(bad_shards, data_config(num_workers=num_workers), dp_rank=0, dp_size=1,
                                    batch_size=4, image_transform=eval_transform(16), tokenizer=tokenizer)
    keys = sorted(key for batch in eval_loader for key in batch.keys)
    # the truncated shard keeps the samples before its cut, less the one whose members were still being grouped
    assert keys == [f"a{i:03d}" for i in range(5)] + ["e%03d" % i for i in range(11)] + ["t000", "t001"]
    assert eval_loader.skipped == EXPECTED_SKIPS


def test_train_loader_counts_reach_the_main_process(bad_shards, tokenizer):
    train = loader(bad_shards, tokenizer, num_workers=2, shuffle_window=2)
    batches = iter(train)
    take(batches, 1)
    assert 0 < sum(train.skipped.values())
    # 20 batches of 16 from 18 usable samples per epoch: at least 16 epochs over both readers
    take(batches, 19)
    assert set(train.skipped) == set(EXPECTED_SKIPS)
    for kind, per_epoch in EXPECTED_SKIPS.items():
        assert 16 * per_epoch <= train.skipped[kind] <= 19 * per_epoch


def test_a_shard_cut_anywhere_is_a_bad_shard_never_a_bad_sample(tmp_path):
    # tarfile ends a stream silently where a header is cut off or missing: at a member boundary the
    # last sample used to come out incomplete (counted as missing a caption) or a lost tail went unseen
    samples = [{"__key__": f"s{i}", "png": image_bytes((i, 0, 0)), "txt": f"caption {i}"} for i in range(3)]
    whole = open(write_tar(tmp_path / "whole.tar", samples), "rb").read()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        last = tar.getmembers()[-1]
        end_of_members = last.offset_data + -(-last.size // 512) * 512  # the end-of-archive blocks start here
    decoder = SampleDecoder(["png"], "txt")
    cuts = sorted({c for boundary in range(0, len(whole), 512) for c in (boundary, boundary + 1, boundary + 300)})
    for cut in cuts + [len(whole)]:
        (tmp_path / "cut.tar").write_bytes(whole[:cut])
        read = list(read_shards([str(tmp_path / "cut.tar")]))
        complete = cut >= end_of_members + 512  # one whole end-of-archive block is enough to end a tar
        assert (read[-1] == {BAD_SHARD: str(tmp_path / "cut.tar")}) != complete, cut
        good = [s for s in read if BAD_SHARD not in s]
        assert [s["__key__"] for s in good] == [s["__key__"] for s in samples[:len(good)]], cut
        assert all(decoder(s) for s in good) and (len(good) == 3) == complete, cut


def test_a_bad_shard_is_reported_once_in_one_line(tmp_path, tokenizer, capfd):
    write_tar(tmp_path / "good.tar", [{"__key__": f"g{i}", "png": image_bytes((i, 0, 0)), "txt": "x"} for i in range(20)])
    whole = write_tar(tmp_path / "whole.tar", [{"__key__": f"t{i}", "png": image_bytes((0, i, 0)), "txt": "y"}
                                               for i in range(4)])
    with tarfile.open(whole) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "t2.txt").offset
    (tmp_path / "cut.tar").write_bytes(open(whole, "rb").read()[:cut])
    shards = [str(tmp_path / "good.tar"), str(tmp_path / "cut.tar")]
    train = loader(shards, tokenizer)
    take(iter(train), 6)  # 22 usable samples per epoch: more than 4 epochs
    eval_loader = build_eval_loader(shards, data_config(), dp_rank=0, dp_size=1, batch_size=8,
                                    image_transform=eval_transform(16), tokenizer=tokenizer)
    for _ in range(2):
        assert sum(len(batch.keys) for batch in eval_loader) == 22
    assert list(train.skipped) == ["bad_shards"] and train.skipped["bad_shards"] >= 4  # once per epoch
    assert eval_loader.skipped == {"bad_shards": 1}
    assert capfd.readouterr().err.splitlines() == [
        f"megaclip: warning: skipping the rest of shard {tmp_path / 'cut.tar'} after 2 samples: truncated, "
        f"no end-of-archive block (counted in bad_shards)"]


def test_no_usable_sample_is_an_error_not_a_hang(tmp_path, tokenizer):
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(RuntimeError, match="not one usable sample in 20 epochs"):
        next(iter(loader(str(tmp_path / "empty.tar"), tokenizer)))


@pytest.mark.parametrize("resampled,num_workers", [(False, 0), (False, 2), (True, 2)])
def test_resume_continues_the_stream_exactly(synthetic, tokenizer, resampled, num_workers):
    def fresh():
        # random crops, to check that augmentation resumes exactly too
        return loader(synthetic.train_shards, tokenizer, num_workers=num_workers, resampled=resampled,
                      transform=train_transform(24))

    original = fresh()
    batches = iter(original)
    take(batches, 11)  # odd: with 2 workers the second reader serves next
    state = original.state_dict()
    expected = take(batches, 14)  # on across shuffle windows and into the next epoch
    resumed = fresh()
    resumed.load_state_dict(state)
    got = take(iter(resumed), 14)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))
    assert resumed.state_dict() == original.state_dict()
    assert max(p[0] for p in original.state_dict()["positions"]) >= 1
    other = loader(synthetic.train_shards, tokenizer, num_workers=num_workers, resampled=resampled, seed=5)
    with pytest.raises(ValueError, match=r"another data layout \(seed differ"):
        other.load_state_dict(state)


def test_sample_decoder_reads_json_captions_and_labels():
    decoder = SampleDecoder(["webp", "png"], "json:caption", label_key="cls")
    sample = {"png": image_bytes((1, 2, 3)), "json": b'{"caption": ["a cat", " ", "a small cat"]}', "cls": b"7\n"}
    captions, label, image = decoder(sample)
    assert captions == ["a cat", "a small cat"] and label == 7 and image.size == (20, 16)
    assert SampleDecoder(["png"], "txt")({"png": sample["png"], "txt": b"one\n\ntwo\n"})[0] == ["one", "two"]
    for broken, kind in (({**sample, "json": b'{"text": "x"}'}, "missing_captions"),
                         ({**sample, "cls": b"seven"}, "missing_labels"),
                         ({**sample, "png": b"junk"}, "bad_images")):
        with pytest.raises(Skipped) as info:
            decoder(broken)
        assert info.value.kind == kind
