"""Full state <-> TP shards: the name-based split agrees with the model's own layout, and round trips."""
import torch

from megaclip import distributed
from megaclip.model import CLIPModel
from megaclip.model.state import full_state_dict, load_full_state_dict, local_state, partition_dim, shard_state, unshard_state
from tests.distributed import run_distributed
from tests.helpers import small_config


def shard_and_reload():
    cfg = small_config(f"tp={distributed.tp_size()}")
    distributed.seed_everything(1)
    model = CLIPModel(cfg.model)
    for name, p in model.named_parameters():  # the name rule matches megatron-core's attributes
        expected = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        assert partition_dim(name) == expected, name
    full = full_state_dict(model, cfg.model.text.vocab_size)
    assert {k: v.shape for k, v in shard_state(full, distributed.tp_size(), distributed.tp_rank()).items()} == \
        {k: v.shape for k, v in local_state(model).items()}
    distributed.seed_everything(2)
    fresh = CLIPModel(cfg.model)
    load_full_state_dict(fresh, full, distributed.tp_size(), distributed.tp_rank())
    return full, local_state(fresh), local_state(model)


def test_full_state_round_trips_through_tp2():
    results = run_distributed(shard_and_reload, 2, 2)
    full = results[0][0]
    assert full["text.token_embedding.weight"].shape[0] == small_config().model.text.vocab_size
    for _, reloaded, original in results:  # splitting and joining copy tensors, no arithmetic: bitwise
        for name in original:
            torch.testing.assert_close(reloaded[name], original[name], rtol=0, atol=0)
    rebuilt = unshard_state([r[1] for r in results], small_config().model.text.vocab_size)
    for name in full:
        torch.testing.assert_close(rebuilt[name], full[name], rtol=0, atol=0)
