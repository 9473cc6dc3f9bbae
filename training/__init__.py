"""Training and fine-tuning of the shared Llama 4 model (`herd train CONFIG`).

The model class, kernels and weights format are serving's own: a run starts from a new model
config or a checkpoint, and ends with an HF directory that `herd serve --model` loads. See
docs/training.md; the parts, one per module:

    config                typed config (YAML or Python), validated; errors name the field
    model_setup           new model (full config.json, initialisation) or checkpoint to fine-tune
    corpus, bpe           demo corpus from the Python standard library's docstrings; a 4k BPE on it
    documents             text and chat documents -> token ids + which tokens are trained on
    packing, loader       fixed-length windows with document boundaries; seeded, resumable order
    precision             bf16 autocast over float32 master weights
    activation_checkpoint recompute each decoder layer in the backward
    aux_loss              MoE load-balancing loss from router hooks
    optim, schedule       AdamW; warmup + cosine
    step                  one optimiser step (accumulation, fused linear + cross-entropy, clipping)
    distributed           process group and device; parallelize applies TP then FSDP2
    checkpoint, export    sharded DCP checkpoints for resume; HF safetensors export
    flops, records        MFU; progress bar, metrics JSONL, TensorBoard, loss plot
    trainer               the run
"""
