"""Training throughput and MFU: herd's training step beside a plain transformers training loop on the
same model (same config, same initial weights) and the same batches, in one run.

    .venv/bin/python benchmarks/train.py [--models tiny scout] [--steps 4] [--warmup 1] [--threads N]

Models: `tiny`, the shipped tiny Llama 4 config (training/configs/tiny.yaml); `scout`, a Llama 4
Scout-shaped model with fewer layers: Scout's widths (hidden 5120, 40 query / 8 KV heads of 128,
experts and shared expert 8192 wide, top-1 sigmoid routing, chunked attention), with on CUDA its
16 experts, 202,048-token vocabulary and one layer (float32 weights + AdamW state are 16 bytes
per parameter: 4.3B parameters fill an 80 GB H100), and on a CPU what fits in 24 GB beside the
peer: 2 experts and a 32,768-token vocabulary (--scout-* flags change all of these).

Peer: transformers' Llama4ForCausalLM in a plain loop (forward with labels, backward, clip, AdamW),
the same autocast and optimiser settings. torchtitan was the first choice, but its current
release (0.3.0, checked on PyPI) has no Llama 4 model (its Llama 4 lived in experiments and is
gone), assumes an accelerator (its device helper falls back to "cuda") and pulls datasets, wandb
and spmd_types into the environment; so it neither installs cleanly beside herd nor runs here.
transformers' Llama 4 experts are dense (every expert runs on every token, then scores mask
them); MFU counts only the routed work for both engines (training/flops.py), so that shows.

Data: windows of the stdlib-docstring corpus tokenised with the tiny model's BPE tokenizer. herd
attends within documents inside a window, transformers across the whole window (it has no packed
document mask on CPU); MFU credits each with the attention it does.

Writes benchmarks/results/<date>-train-<device>[-<N>thread].md / .json (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # first: benchmarks/kernels.py must not shadow the kernels package
from report import md_table, write_results

from training.config import TrainConfig, load_train_config
from training.flops import peak_flops, train_flops


def scout_fields(layers: int, experts: int, vocab: int) -> dict:
    return {"architectures": ["Llama4ForCausalLM"], "vocab_size": vocab, "hidden_size": 5120,
            "num_hidden_layers": layers, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
            "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_local_experts": experts,
            "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "no_rope_layer_interval": 4,
            "attention_chunk_size": 8192, "use_qk_norm": True, "attn_temperature_tuning": True,
            "floor_scale": 8192, "attn_scale": 0.1, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
            "max_position_embeddings": 131072, "tie_word_embeddings": False}


def config_for(name: str, args: argparse.Namespace, device: str, out: Path) -> TrainConfig:
    raw = load_train_config("tiny").to_dict()
    cuda = device == "cuda"
    raw["train"].update(dtype="bfloat16" if cuda else "float32", device=device, steps=args.warmup + args.steps,
                        activation_checkpointing=name == "scout")
    raw["schedule"]["warmup_steps"] = 1
    raw["output"].update(dir=str(out / name), progress=False, plot=False, tensorboard=False, export=False,
                         resume="never")
    if name == "scout":
        raw["model"]["config"] = scout_fields(args.scout_layers, args.scout_experts or (16 if cuda else 2),
                                              args.scout_vocab or (202048 if cuda else 32768))
        raw["data"].update(seq_len=args.seq_len or (8192 if cuda else 256), batch_size=1)
        raw["optim"]["lr"] = 3e-4
    elif args.seq_len:
        raw["data"]["seq_len"] = args.seq_len
    return TrainConfig.from_dict(raw)


def _median_rate(times: list[float], tokens: int, flops: float, peak: float) -> dict:
    t = statistics.median(times)
    return {"step_time_s": t, "tokens_per_s": tokens / t, "mfu": flops / (t * peak)}


def bench_herd(cfg: TrainConfig, warmup: int, steps: int):
    """herd's trainer step (training.step.train_step) on the trainer's own batches."""
    from training.schedule import lr_at
    from training.step import train_step
    from training.trainer import Trainer

    trainer = Trainer(cfg)
    peak, source = peak_flops(trainer.device, trainer.dtype)
    times, losses, flops, tokens = [], [], 0.0, 0
    batches_seen = []
    for step in range(warmup + steps):
        batches = trainer.next_batches()
        batches_seen.append([b.input_ids_T.cpu() for b in batches])
        lr = lr_at(step, cfg.optim.lr, cfg.schedule.warmup_steps, cfg.train.steps, cfg.schedule.min_lr_ratio)
        sync(trainer.device)
        t0 = time.perf_counter()
        out = train_step(trainer.model, trainer.optimizer, batches, lr, precision=trainer.precision,
                         router=trainer.router, aux_coef=cfg.train.aux_loss_coef, grad_clip=cfg.optim.grad_clip,
                         ctx=trainer.ctx)
        sync(trainer.device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            flops = sum(train_flops(trainer.model_config, b.seq_lens) for b in batches)
            tokens = out.tokens
        losses.append(out.loss)
    row = {"engine": "herd", **_median_rate(times, tokens, flops, peak), "first_loss": losses[0],
           "peak_tflops": peak / 1e12, "peak_source": source}
    # The peer starts from the weights herd started from: re-initialise the same way.
    from training.model_setup import init_weights

    init_weights(trainer.model, cfg.model.init_std, cfg.train.seed)
    from models.llama4.weights import export_tensors

    tensors = {k: v.detach().to("cpu", copy=True) for k, v in export_tensors(trainer.model).items()}
    hf_config = trainer.model_config.to_hf_dict()
    n_params = trainer.model.num_parameters()
    trainer.close()
    del trainer
    gc.collect()
    return row, {"tensors": tensors, "hf_config": hf_config, "batches": batches_seen, "params": n_params}


def bench_transformers(cfg: TrainConfig, shared: dict, warmup: int, steps: int, device: torch.device) -> dict:
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from models.llama4 import ModelConfig

    hf_cfg = Llama4TextConfig.from_dict(shared["hf_config"])
    with torch.device("meta"):
        model = Llama4ForCausalLM(hf_cfg)
    model = model.to_empty(device=device)
    model.load_state_dict(shared.pop("tensors"), strict=True)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.optim.lr, betas=cfg.optim.betas,
                            eps=cfg.optim.eps, fused=True)  # as herd's (training/optim.py)
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dtype = torch.bfloat16 if cfg.train.dtype == "bfloat16" else torch.float32
    peak, _ = peak_flops(device, dtype)
    mc = ModelConfig.from_hf_dict(shared["hf_config"])
    times, losses, flops, tokens = [], [], 0.0, 0
    for step, micro in enumerate(shared["batches"][:warmup + steps]):
        sync(device)
        t0 = time.perf_counter()
        for ids_T in micro:
            ids_BS = ids_T.view(-1, cfg.data.seq_len).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(input_ids=ids_BS, labels=ids_BS).loss / len(micro)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            n = sum(t.numel() for t in micro)
            tokens = n
            flops = train_flops(mc, [cfg.data.seq_len] * (n // cfg.data.seq_len))
        losses.append(float(loss.detach()) * len(micro))
    del model, opt
    gc.collect()
    return {"engine": "transformers", **_median_rate(times, tokens, flops, peak), "first_loss": losses[0]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "scout"], choices=["tiny", "scout"])
    ap.add_argument("--steps", type=int, default=4, help="timed steps (the median is reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seq-len", type=int, default=None, help="default: the config's (tiny), 8192 CUDA / 256 CPU")
    ap.add_argument("--scout-layers", type=int, default=1)
    ap.add_argument("--scout-experts", type=int, default=None, help="default 16 on CUDA, 2 on CPU")
    ap.add_argument("--scout-vocab", type=int, default=None, help="default 202048 on CUDA, 32768 on CPU")
    ap.add_argument("--no-peer", action="store_true", help="herd only")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's); on a busy small CPU, 1 helps tiny models")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows, ratios = [], {}
    with tempfile.TemporaryDirectory(prefix="herd-train-bench-") as tmp:
        for name in args.models:
            cfg = config_for(name, args, args.device, Path(tmp))
            herd, shared = bench_herd(cfg, args.warmup, args.steps)
            common = {"model": name, "params": shared["params"], "device": args.device, "dtype": cfg.train.dtype,
                      "tokens_per_step": cfg.data.seq_len * cfg.data.batch_size * cfg.train.grad_accum,
                      "activation_checkpointing": cfg.train.activation_checkpointing}
            rows.append({**common, **herd})
            print(json.dumps(rows[-1]), flush=True)
            if not args.no_peer:
                peer = bench_transformers(cfg, shared, args.warmup, args.steps, device)
                rows.append({**common, **peer})
                print(json.dumps(rows[-1]), flush=True)
                ratios[f"{name}: herd / transformers tokens/s"] = round(herd["tokens_per_s"] / peer["tokens_per_s"], 2)
            del shared
            gc.collect()
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    stem = f"train-{args.device}" + (f"-{args.threads}thread" if args.threads else "")
    out, command, info = write_results(stem, "train.py", rows, ratios)
    cols = [("model", "model"), ("engine", "engine"), ("params", "parameters"), ("dtype", "dtype"),
            ("tokens_per_step", "tokens / step"), ("step_time_s", "s / step"), ("tokens_per_s", "tokens/s"),
            ("mfu", "MFU"), ("first_loss", "first loss")]
    peak_note = next((f"{r['peak_tflops']:.3g} TFLOP/s per device ({r['peak_source']})" for r in rows
                      if "peak_tflops" in r), "-")
    note = (f"MFU = model FLOPs (training/flops.py: routed experts only, attention over visible keys) / "
            f"(step time x {peak_note}). The peer is transformers' Llama4ForCausalLM in a plain loop with the "
            "same weights, batches, autocast and AdamW; see the docstring of benchmarks/train.py for why not "
            "torchtitan.")
    md = [f"# Training throughput on {device_name} ({out.name[:10]})", "", f"Command: `{command}`", "",
          f"Machine: {info}", "", md_table(rows, cols), "",
          "Ratios: " + (", ".join(f"{k} = {v}" for k, v in ratios.items()) or "-"), "", note]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
