"""FSDP2 and tensor parallelism on CPU processes (gloo) train step for step as one process does.

One spawn of 2 processes runs every 2-rank case, one of 4 the 2-D case; each rank trains a few
steps (clip_grad_norm_, then AdamW, both foreach as on CUDA), gathers its gradients and parameters
(full_state_dict) and the tests compare them with the same steps run here in one process. The
model: a tiny Llama 4 with MoE and dense layers, a NoPE layer and chunked attention (sequences
longer than a chunk).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from kernels import fused_linear_cross_entropy
from models.llama4.attention import DenseAttention
from models.llama4.config import ModelConfig
from models.llama4.model import Llama4Model
from tests.parity import tiny_checkpoints as tiny
from training.parallelize import build_mesh, full_state_dict, gather_full, load_full_state_dict, parallelize
from training.tp_plan import Split, check_divisible, from_rank_major, to_rank_major

STEPS = 3
# Each dp rank's sequences: the same number of labelled tokens on both, so the mean of the two
# ranks' mean losses is the whole batch's mean loss.
SEQ_LENS = ([12, 20], [16, 16])
LR, WEIGHT_DECAY, EPS = 1e-2, 0.1, 1e-4
MAX_NORM = 0.5
RTOL = 1e-5
# AdamW moves a parameter by about lr * g / (|g| + eps) whatever the size of g, so where g is near
# eps (an embedding row of a token seen once) it amplifies the rounding of a different summation
# order: one process accumulating the two halves' gradients differs from the whole batch by ~4e-6
# on one element after 3 steps at eps = 1e-5, ~3e-5 at the default 1e-8. Parameters are compared to
# 1e-3 of one step's size; eps = 1e-4 keeps the amplification well inside that.
PARAM_ATOL = 1e-3 * LR

# name -> (dp, tp, tied embeddings). FSDP with the tied head is the case where a root parameter is
# used inside forward (embedding) and after it (the loss).
CASES_2 = {"fsdp": (2, 1, True), "tp": (1, 2, False)}
CASES_4 = {"fsdp_tp": (2, 2, True)}


def _config(**overrides) -> ModelConfig:
    # MoE on layers 1 and 3 (top-2 of 4 experts), dense on 0 and 2; layer 3 is NoPE; chunks of 8.
    args = {"interleave_moe_layer_step": 2, "num_experts_per_tok": 2} | overrides
    return ModelConfig.from_hf_dict(tiny.llama4_text_config(**args).to_dict())


def _weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    model = Llama4Model(config)
    tiny._randomize(model, seed)
    return model.state_dict()


def _batch(seq_lens: list[int], g: torch.Generator):
    """Random tokens; labels are each sequence's next tokens, -100 on its last."""
    ids, labels, positions = [], [], []
    for n in seq_lens:
        seq = torch.randint(0, tiny.VOCAB, (n + 1,), generator=g)
        ids.append(seq[:-1])
        labels.append(torch.cat([seq[1:-1], torch.tensor([-100])]))
        positions.append(torch.arange(n))
    return torch.cat(ids), torch.cat(positions), list(seq_lens), torch.cat(labels)


def _batches(seed: int = 1):
    """Per step: the two dp ranks' batches."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(_batch(lens, g) for lens in SEQ_LENS) for _ in range(STEPS)]


def _joined(halves):
    ids, pos, lens, labels = zip(*halves)
    return torch.cat(ids), torch.cat(pos), [n for ls in lens for n in ls], torch.cat(labels)


def _loss(model: Llama4Model, batch) -> torch.Tensor:
    ids, positions, seq_lens, labels = batch
    hidden_ND = model(ids, positions, DenseAttention(seq_lens, positions))
    head = (model.embed_tokens if model.lm_head is None else model.lm_head).weight
    if isinstance(head, DTensor):  # replicated over tp
        head = head.full_tensor()
    return fused_linear_cross_entropy(hidden_ND, head, labels)


def _train(model: Llama4Model, batches, pick, gather=dict) -> dict:
    """The trainer's kind of step (clip, then AdamW, both foreach as on CUDA): each step's loss and
    gradient norm, and the first step's gradients (through `gather`)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS, foreach=True)
    losses, norms, first_grads = [], [], None
    for step in batches:
        loss = _loss(model, pick(step))
        loss.backward()
        if first_grads is None:
            first_grads = gather({n: p.grad.clone() for n, p in model.named_parameters()})
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "norms": torch.stack(norms), "grads": first_grads}


# --- what each rank runs -------------------------------------------------------------------------

def _run_case(dp: int, tp: int, config: ModelConfig, weights, batches) -> dict:
    rank = dist.get_rank()
    mesh = build_mesh(dp, tp)
    model = Llama4Model(config)
    model.load_state_dict(weights)
    parallelize(model, mesh, fsdp=dp > 1, tp=tp > 1)
    dp_rank = mesh["dp"].get_local_rank()
    result = _train(model, batches, lambda step: step[dp_rank] if dp > 1 else _joined(step),
                    lambda g: gather_full(model, g))
    if dp > 1:  # the whole batch's loss: the mean of the ranks' means
        dist.all_reduce(result["losses"], group=mesh["dp"].get_group())
        result["losses"] /= dp
    state = full_state_dict(model, rank0_only=True)
    assert (state == {}) == (rank != 0)

    # The same layout built on meta, then filled from full tensors, gives them back.
    with torch.device("meta"):
        empty = Llama4Model(config)
    parallelize(empty, mesh, fsdp=dp > 1, tp=tp > 1)
    empty.to_empty(device="cpu")
    empty.inv_freq = Llama4Model.rope_frequencies(config)  # was built on meta
    trained = full_state_dict(model)
    load_full_state_dict(empty, trained)
    reloaded = full_state_dict(empty)
    roundtrip = reloaded.keys() == trained.keys() and all(torch.equal(reloaded[k], trained[k]) for k in trained)
    next_loss = _loss(empty, _joined(batches[0])).detach()
    return result | {"state": state, "roundtrip": roundtrip, "next_loss": next_loss}


def _errors(config: ModelConfig) -> dict[str, str]:
    """The messages of misuses that need a process group (2 ranks)."""
    attempts = {
        "dp_without_fsdp": lambda: parallelize(Llama4Model(config), build_mesh(2, 1), fsdp=False, tp=False),
        "tp_mesh_without_tp": lambda: parallelize(Llama4Model(config), build_mesh(1, 2), fsdp=False, tp=False),
        "kv_heads": lambda: parallelize(Llama4Model(config.replace(num_key_value_heads=1)), build_mesh(1, 2),
                                        fsdp=False, tp=True),
        "world_size": lambda: build_mesh(2, 2),
    }
    messages = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            messages[name] = "no error"
        except ValueError as e:
            messages[name] = str(e)
    return messages


def _worker(rank: int, world: int, port: int, cases: dict, batches, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        results = {name: _run_case(*case, batches) for name, case in cases.items()}
        if world == 2:
            results["errors"] = _errors(next(iter(cases.values()))[2])
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, cases: dict, setup, tmp: Path) -> dict:
    from tests.integration.servers import free_port  # here, not at the top: every rank imports this module

    models, batches = setup
    out = tmp / f"results_{world}.pt"
    args = {name: (dp, tp, *models[tied]) for name, (dp, tp, tied) in cases.items()}
    # A fork server that has imported torch's distributed packages once forks every rank of both
    # spawns: a spawned rank would spend seconds importing them again. (Python 3.11's fork server
    # ignores the parent's sys.path, so this module itself is imported by each rank.)
    mp.set_forkserver_preload(["torch.distributed.fsdp", "torch.distributed.tensor.parallel", "pytest"])
    mp.start_processes(_worker, args=(world, free_port(), args, batches, out), nprocs=world,
                       start_method="forkserver")
    return torch.load(out)


# --- the tests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup():
    """tied -> (config, initial weights); the batches."""
    models = {}
    for tied in (False, True):
        config = _config(tie_word_embeddings=tied)
        models[tied] = (config, _weights(config))
    return models, _batches()


@pytest.fixture(scope="module")
def one_process(setup):
    models, batches = setup
    results = {}
    for tied, (config, weights) in models.items():
        model = Llama4Model(config)
        model.load_state_dict(weights)
        results[tied] = _train(model, batches, _joined) | {
            "state": model.state_dict(), "next_loss": _loss(model, _joined(batches[0])).detach()}
    return results


@pytest.fixture(scope="module")
def two_ranks(setup, tmp_path_factory):
    return _spawn(2, CASES_2, setup, tmp_path_factory.mktemp("parallel"))


@pytest.fixture(scope="module")
def four_ranks(setup, tmp_path_factory):
    return _spawn(4, CASES_4, setup, tmp_path_factory.mktemp("parallel"))


@pytest.fixture(params=[*CASES_2, *CASES_4])
def case(request, one_process):
    """(what the ranks got, what one process got) for one case."""
    name = request.param
    ranks = request.getfixturevalue("two_ranks" if name in CASES_2 else "four_ranks")
    return ranks[name], one_process[(CASES_2 | CASES_4)[name][2]]


def _assert_close_each(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=RTOL, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_losses_equal_one_process(case):
    """fsdp: each dp rank trains on its half of the batch; tp: both tp ranks on the same tokens."""
    got, want = case
    assert len(got["losses"]) == STEPS
    torch.testing.assert_close(got["losses"], want["losses"], rtol=RTOL, atol=0)
    assert not torch.equal(want["losses"][0], want["losses"][-1])  # the steps did train


def test_gradient_norms_equal_one_process(case):
    """clip_grad_norm_ over the DTensor parameters (one mesh) sees the whole model's norm."""
    got, want = case
    torch.testing.assert_close(got["norms"], want["norms"], rtol=RTOL, atol=0)
    assert (want["norms"] > MAX_NORM).any()  # the clipping did scale gradients


def test_first_gradients_equal_one_process(case):
    """Gathered and re-laid: AdamW would hide a gradient off by a constant factor, so check them."""
    got, want = case
    _assert_close_each(got["grads"], want["grads"], atol=1e-6)


def test_parameters_equal_one_process(case):
    got, want = case
    _assert_close_each(got["state"], want["state"], atol=PARAM_ATOL)


def test_load_full_state_dict_round_trip(case):
    """A model parallelized on meta and loaded from full tensors gives them back and computes
    the same loss as one process with those weights."""
    got, want = case
    assert got["roundtrip"]
    torch.testing.assert_close(got["next_loss"], want["next_loss"], rtol=RTOL, atol=0)


def test_misuse_raises_naming_the_cause(two_ranks):
    errors = two_ranks["errors"]
    assert "needs fsdp=True" in errors["dp_without_fsdp"]
    assert "needs tp=True" in errors["tp_mesh_without_tp"]
    assert "config num_key_value_heads = 1 is not divisible by tp = 2" in errors["kv_heads"]
    assert "world size 2" in errors["world_size"]


def test_build_mesh_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        build_mesh(1, 1)


def test_full_state_dict_of_unparallelized_model(setup):
    config, weights = setup[0][True]
    model = Llama4Model(config)
    model.load_state_dict(weights)
    state = full_state_dict(model)
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)


def test_rank_major_layout_gives_each_rank_its_parts():
    x = torch.arange(12).reshape(12, 1)  # q = rows 0..5, k = 6..8, v = 9..11
    split = Split(0, (6, 3, 3))
    relaid = to_rank_major(x, split, 3)
    assert relaid.flatten().tolist() == [0, 1, 6, 9, 2, 3, 7, 10, 4, 5, 8, 11]
    assert torch.equal(from_rank_major(relaid, split, 3), x)
    cols = torch.arange(8).reshape(1, 1, 8)  # gate 0..3, up 4..7 along dim 2
    relaid = to_rank_major(cols, Split(2, (4, 4)), 2)
    assert relaid.flatten().tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert torch.equal(from_rank_major(relaid, Split(2, (4, 4)), 2), cols)


@pytest.mark.parametrize("field, overrides", [
    ("num_attention_heads", {"num_attention_heads": 3, "num_key_value_heads": 1}),
    ("num_key_value_heads", {"num_key_value_heads": 1}),
    ("intermediate_size", {"intermediate_size": 31}),
    ("intermediate_size_mlp", {"intermediate_size_mlp": 95}),
])
def test_sizes_that_do_not_split_name_the_config_field(field, overrides):
    with pytest.raises(ValueError, match=f"config {field} = "):
        check_divisible(_config(**overrides), 2)


def test_load_full_state_dict_names_the_bad_tensor(setup):
    config, weights = setup[0][True]
    model = Llama4Model(config)
    name = "layers.1.feed_forward.experts_gate_up"
    with pytest.raises(ValueError, match=f"missing tensor {name}"):
        load_full_state_dict(model, {k: v for k, v in weights.items() if k != name})
    with pytest.raises(ValueError, match="unexpected tensor lm_head.weight"):
        load_full_state_dict(model, weights | {"lm_head.weight": weights["embed_tokens.weight"]})
    with pytest.raises(ValueError, match=rf"tensor {name} has shape \[4, 64, 32\]"):
        load_full_state_dict(model, weights | {name: weights[name][..., :32]})
    load_full_state_dict(model, weights)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
