"""`glassmind pretrain`: self-supervised pre-training of any of the three families, a loop you read in
sections (after nanochat's scripts/base_train.py).

    1. config        one dataclass; flags come from its fields; the depth dial and its rule
    2. setup         device, precision, seeds, determinism, the run directory (resume or refuse to clobber)
    3. tokenizer     load one or train one; add the special tokens the objective needs
    4. data          token shards (built once), train and validation loaders
    5. model         built from the dial (or from a parent run), wrapped from outside, optionally compiled
    6. optimizer     AdamW on matrices, warmup + cosine/linear decay, gradient scaler for fp16
    7. resume        the newest complete checkpoint puts back weights, optimizer, RNGs and the data position
    8. the loop      accumulate to the target batch, guard against NaN/inf, clip, step, log, eval, checkpoint
    9. the end       final checkpoint, model files, loss curve, card.md

Objectives by `--arch`: decoder -> causal LM, encoder -> masked LM, encoder-decoder -> span corruption.

Exact resume. A batch is a function of its index (the loader), masks are a function of the batch index
(objectives use a generator seeded per batch), the learning rate is a function of the step (schedule), and
the checkpoint holds weights, optimizer moments and every RNG state bit for bit. So a run killed at any
instant and resumed computes, on CPU in fp32 with deterministic algorithms, the very same losses.

Distributed. `--parallel` lays the run out over torchrun's processes (data, ZeRO/FSDP, tensor and pipeline
parallelism; glassmind/parallel applies them from outside). Loaders take their data-parallel replica's
micro-batches, metrics are averaged over replicas, checkpoints are gathered and written by rank 0 in the
one-process format, so a run resumes under any layout.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from glassmind.common import (GlassmindError, config_field, cpu_summary, is_rank0, pick_device, print0, rank,
                              seed_everything, world_size)
from glassmind.data import objectives
from glassmind.data.loader import WindowLoader
from glassmind.data.shards import Shards, build_shards, separator_id
from glassmind.train import metrics
from glassmind.train import run as run_lib
from glassmind.train.optim import adamw
from glassmind.train.run import ParallelRunSettings, Run, resolve_run_dtype, setup_torch
from glassmind.train.schedule import lr_at

ARCHS = ("decoder", "encoder", "encoder-decoder")
CONFIG_FILE = "pretrain.json"


# ======================================================================================================
# 1. Configuration
# ======================================================================================================


@dataclass
class PretrainConfig(ParallelRunSettings):
    """Every dial of a pre-training run. Sizes come from `depth` unless overridden:

        d_model = 64 * depth     n_heads = d_model / 64 (head dim 64)     n_layers = depth (per stack)
        d_ff = 4 * d_model       lr = 6e-4 * sqrt(768 / d_model)

    The lr rule anchors at GPT-2 small (d_model 768, lr 6e-4) and grows as 1/sqrt(width) for narrower
    models, the way Adam learning rates are usually scaled with width (e.g. Kaplan et al. 2020, eq. D.1, fits
    a similar slow dependence on size); d=256 -> 1.0e-3, d=128 -> 1.5e-3.
    """

    out: str = config_field("runs/pretrain", "run directory to write (config, weights, tokenizer, train_state, metrics)")
    arch: str = config_field("decoder", "decoder (causal LM), encoder (masked LM), encoder-decoder (span corruption)",
                   choices=ARCHS)
    # data
    data: list[str] | None = config_field(None, "corpus sources: files, dirs, globs, x.jsonl[:field], hf:NAME (default: "
                                      "the built-in corpus)")
    max_bytes: int | None = config_field(None, "read at most this many bytes of the corpus")
    val_fraction: float = config_field(0.01, "fraction of documents held out for validation (by a hash of their id)")
    shards_dir: str | None = config_field(None, "where token shards are cached (default $GLASSMIND_CACHE/shards or "
                                      "~/.cache/glassmind/shards)")
    tokenizer: str | None = config_field(None, "an existing tokenizer (run dir or tokenizer.json); else one is trained")
    vocab_size: int | None = config_field(None, "vocabulary of the tokenizer to train (default 4096); must match --tokenizer")
    tokenizer_bytes: int = config_field(4_000_000, "bytes of training text the tokenizer is trained on")
    init_from: str | None = config_field(None, "a parent run whose weights (and tokenizer) start this one")
    # model: the depth dial and its overrides
    depth: int = config_field(4, "size dial: d_model = 64*depth, heads = d_model/64, layers = depth, lr from d_model")
    d_model: int | None = config_field(None, "override the width derived from --depth")
    n_heads: int | None = config_field(None, "override the heads derived from --depth")
    n_layers: int | None = config_field(None, "override the layers derived from --depth (per stack)")
    d_ff: int | None = config_field(None, "override the FFN width (default 4 * d_model)")
    positional: str = config_field("learned", "positional encoding", choices=("learned", "sinusoidal", "rope", "none"))
    dropout: float = config_field(0.0, "dropout probability")
    context: int = config_field(256, "tokens per sequence (encoder input length for encoder-decoder)")
    parallel: str = config_field("", "layout over the torchrun processes: dp=N, zero=1|2|3, fsdp=N, tp=N, pp=N, "
                           "schedule=gpipe|1f1b, microbatches=M, e.g. dp=2,tp=2 (empty: data parallel over all; "
                           "`glassmind plan` compares layouts)")
    # optimisation
    steps: int = config_field(1000, "optimizer steps")
    batch_tokens: int = config_field(16384, "tokens per optimizer step over all ranks; divisible by "
                                  "micro_batch * context * world size (the rest is gradient accumulation)")
    micro_batch: int = config_field(8, "sequences per forward/backward on one rank")
    lr: float | None = config_field(None, "peak learning rate (default: from d_model, see the depth rule)")
    warmup_steps: int | None = config_field(None, "linear warmup steps (default 5%% of --steps)")
    decay: str = config_field("cosine", "decay after warmup", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = config_field(0.1, "final lr as a fraction of the peak")
    weight_decay: float = config_field(0.1, "AdamW weight decay (matrices only)")
    decay_embeddings: bool = config_field(False, "apply weight decay to embedding tables too")
    beta1: float = config_field(0.9, "AdamW beta1")
    beta2: float = config_field(0.95, "AdamW beta2")
    grad_clip: float = config_field(1.0, "clip the global gradient norm to this (0: no clipping)")
    # objectives
    mask_prob: float = config_field(0.15, "masked LM: fraction of tokens chosen")
    whole_word: bool = config_field(False, "masked LM: mask whole words (WordPiece ## pieces with their word)")
    noise_density: float = config_field(0.15, "span corruption: fraction of tokens dropped")
    mean_span: float = config_field(3.0, "span corruption: mean span length")
    # precision and device
    device: str = config_field("auto", "auto, cpu, cuda, cuda:1, mps")
    dtype: str = config_field("auto", "compute dtype: auto (bf16 where this machine computes it natively: a GPU with bf16, "
                            "a CPU with AMX or AVX512-BF16; else fp32), fp32, bf16 (autocast, CPU or GPU), fp16 "
                            "(autocast + grad scaler; for GPUs, slow on a CPU)", choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = config_field(False, "torch.compile the model")
    fused_loss: str = config_field("auto", "compute the output projection and cross-entropy in row chunks without the full "
                                 "fp32 logits (decoder, encoder-decoder; masked LM: the head on chosen positions "
                                 "only): auto = under bf16 autocast, on = also in fp32 (other rounding than the "
                                 "golden fp32 path) and fp16 (computed in fp32), off = never; models wrapped by "
                                 "DDP/FSDP/compile use the logits path", choices=("auto", "on", "off"))
    seed: int = config_field(1337, "seed for init, data order and masks")
    deterministic: bool = config_field(True, "torch.use_deterministic_algorithms (exact resume)")
    # evaluation, logging, checkpoints
    eval_every: int = config_field(100, "evaluate on validation every N steps (0: only at the start and the end)")
    eval_batches: int = config_field(8, "validation micro-batches per evaluation (over all ranks)")
    log_every: int = config_field(1, "write a metrics.jsonl row every N steps")
    ckpt_every: int = config_field(200, "checkpoint every N steps (and always at the end)")
    keep_last: int = config_field(3, "checkpoints to keep")
    peak_flops: float | None = config_field(None, "peak FLOP/s for MFU (default: measure the matmul rate at start)")


# fields a resumed run may change besides the shared ones (train.run.RESUME_MAY_CHANGE): they do not alter what
# is computed, or (compile, fused_loss) only its rounding, which the resume then says
RESUME_MAY_CHANGE = run_lib.RESUME_MAY_CHANGE | {"device", "compile", "eval_every", "eval_batches", "log_every",
                                                 "peak_flops", "shards_dir", "steps", "fused_loss"}


def default_lr(d_model: int) -> float:
    """Peak learning rate for a width: 6e-4 at GPT-2 small's 768, scaled as 1/sqrt(d_model)."""
    return 6e-4 * math.sqrt(768 / d_model)


def derived_sizes(cfg: PretrainConfig) -> dict:
    """The depth dial: width, heads, layers, FFN and learning rate, each overridable (see PretrainConfig)."""
    d_model = cfg.d_model or 64 * cfg.depth
    return {"d_model": d_model,
            "n_heads": cfg.n_heads or max(1, d_model // 64),
            "n_layers": cfg.n_layers or cfg.depth,
            "d_ff": cfg.d_ff or 4 * d_model,
            "lr": cfg.lr if cfg.lr is not None else default_lr(d_model)}


def check_config(cfg: PretrainConfig) -> None:
    """Mistakes caught before any work (the ones that need the tokenizer or model come later, still
    before training)."""
    if cfg.arch not in ARCHS:
        raise GlassmindError(f"--arch {cfg.arch!r}: use one of {', '.join(ARCHS)}")
    for name in ("steps", "micro_batch", "context", "batch_tokens", "depth"):
        if getattr(cfg, name) <= 0:
            raise GlassmindError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    dp = data_parallel_size(cfg)
    per_pass = cfg.micro_batch * cfg.context * dp
    if cfg.batch_tokens % per_pass:
        lo = max(per_pass, cfg.batch_tokens // per_pass * per_pass)
        raise GlassmindError(
            f"--batch-tokens {cfg.batch_tokens} is not divisible by micro_batch x context x world size = "
            f"{cfg.micro_batch} x {cfg.context} x {dp} (data-parallel replicas) = {per_pass}: use "
            f"--batch-tokens {lo} or "
            f"{lo + per_pass}, or change --micro-batch/--context")
    if cfg.init_from and any(v is not None for v in (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff)):
        raise GlassmindError("--init-from takes the model's sizes from the parent run: drop --d-model, "
                             "--n-heads, --n-layers and --d-ff")
    if cfg.whole_word and cfg.arch != "encoder":
        raise GlassmindError("--whole-word is a masked-LM option: use it with --arch encoder")


def data_parallel_size(cfg: PretrainConfig) -> int:
    """Replicas that read different data: the world size divided by the tensor and pipeline degrees."""
    from glassmind.parallel.mesh import parse_spec  # parallelism is applied from outside; imported on use

    return parse_spec(cfg.parallel, mp=cfg.dtype).dp


# ======================================================================================================
# 2. Setup: device, precision, determinism, run directory
# ======================================================================================================


def resolve_config_dtype(cfg: PretrainConfig) -> tuple[PretrainConfig, str]:
    """`--dtype auto` -> the dtype this machine computes fast, written into the config so that pretrain.json and
    the card say what ran (train.run.resolve_run_dtype: a resumed run keeps the dtype it started with)."""
    return resolve_run_dtype(cfg, CONFIG_FILE, pick_device(cfg.device))


def setup_device(cfg: PretrainConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    device = pick_device(cfg.device)
    if device.type == "cuda" and dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
    if dtype == torch.float16 and device.type == "cpu":
        # CPU autocast and GradScaler("cpu") do support fp16, so the scaler path runs (and is tested) here;
        # but few CPUs multiply fp16 natively, so it is slow: bf16 is the CPU's half precision
        print0("note: --dtype fp16 on a CPU is slow (no native fp16 matmuls on most CPUs): prefer --dtype bf16")
    setup_torch(cfg.threads, deterministic=cfg.deterministic, compile=cfg.compile)
    return device, dtype


# ======================================================================================================
# 3. Tokenizer
# ======================================================================================================


def get_tokenizer(cfg: PretrainConfig, out: Path):
    """The run's tokenizer: on resume the one in the run; else --tokenizer, the parent run's, or a new one
    trained on the corpus (BPE for decoders and encoder-decoders, WordPiece for encoders). Special tokens the
    objective needs are added (mask for MLM with BPE, sentinels for span corruption)."""
    from glassmind import tokenizer as tok_lib

    if cfg.resume and (out / "tokenizer.json").exists():
        return tok_lib.load(out)
    source = cfg.tokenizer or cfg.init_from
    if source:
        tok = tok_lib.load(source)
        if cfg.vocab_size is not None and cfg.vocab_size != tok.vocab_size:
            raise GlassmindError(f"--vocab-size {cfg.vocab_size} does not match the tokenizer in {source} "
                                 f"({tok.vocab_size} tokens): drop --vocab-size, or train a new tokenizer")
    else:
        tok = train_tokenizer(cfg)
    return add_objective_tokens(cfg, tok)


def train_tokenizer(cfg: PretrainConfig):
    from glassmind.data.corpus import texts

    vocab = cfg.vocab_size or 4096
    sample = list(texts(cfg.data, split="train", max_bytes=cfg.tokenizer_bytes))
    print0(f"training a {'WordPiece' if cfg.arch == 'encoder' else 'BPE'} tokenizer "
           f"({vocab} tokens) on {sum(len(t) for t in sample) / 1e6:.1f}M characters")
    if cfg.arch == "encoder":
        from glassmind.tokenizer.wordpiece import WordPieceTokenizer

        return WordPieceTokenizer.train(sample, vocab, progress=cfg.progress and is_rank0())
    from glassmind.tokenizer.bpe import BPETokenizer

    return BPETokenizer.train(sample, vocab, progress=cfg.progress and is_rank0())


def sentinel_names(n: int) -> list[str]:
    """T5's names for the span-corruption sentinels."""
    return [f"<extra_id_{i}>" for i in range(n)]


def mask_token(tok) -> str:
    return "[MASK]" if "[MASK]" in tok.special_tokens else "<|mask|>"


def add_objective_tokens(cfg: PretrainConfig, tok):
    needed: list[str] = []
    if cfg.arch == "encoder":
        needed = [mask_token(tok)]
    elif cfg.arch == "encoder-decoder":
        spans = objectives.span_lengths_for_context(cfg.context, cfg.noise_density, cfg.mean_span).spans
        needed = sentinel_names(spans)
    missing = [t for t in needed if t not in tok.special_tokens]
    if missing:
        if not hasattr(tok, "add_special_tokens"):
            raise GlassmindError(f"the {cfg.arch} objective needs the special tokens {missing[:3]}... which this "
                                 "tokenizer lacks and cannot add: use a BPE tokenizer or one that has them")
        tok.add_special_tokens(missing)
        print0(f"added {len(missing)} special token(s) for the {cfg.arch} objective ({missing[0]} ...)")
    return tok


# ======================================================================================================
# 4. Data: shards and loaders
# ======================================================================================================


def window_of(cfg: PretrainConfig) -> tuple[int, int]:
    """(window, stride) of token stream per example: T+1 tokens every T for causal LM (inputs and shifted
    targets share all but one), T for masked LM, the raw length whose corruption fills T for span
    corruption."""
    if cfg.arch == "decoder":
        return cfg.context + 1, cfg.context
    if cfg.arch == "encoder":
        return cfg.context, cfg.context
    raw = objectives.span_lengths_for_context(cfg.context, cfg.noise_density, cfg.mean_span).raw
    return raw, raw


def make_loaders(cfg: PretrainConfig, shards: Shards, *, rank: int = 0,
                 world: int = 1) -> tuple[WindowLoader, WindowLoader]:
    window, stride = window_of(cfg)
    if shards.tokens("val") < window:
        raise GlassmindError(f"the validation split has {shards.tokens('val')} tokens, fewer than one window of "
                             f"{window}: raise --val-fraction or give more data")
    train = WindowLoader(shards.split("train"), window=window, stride=stride, batch_size=cfg.micro_batch,
                         seed=cfg.seed, shuffle=True, rank=rank, world_size=world)
    val_batch = min(cfg.micro_batch, (shards.tokens("val") - window) // stride + 1)
    val = WindowLoader(shards.split("val"), window=window, stride=stride, batch_size=val_batch, seed=cfg.seed,
                       shuffle=False, rank=rank, world_size=world)
    return train, val


def batch_generator(seed: int, g: int, stream: int = 0) -> torch.Generator:
    """The generator that draws batch g's masks/spans: a function of (seed, stream, g) only."""
    state = np.random.SeedSequence([seed, stream, g]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# ======================================================================================================
# 5. Model
# ======================================================================================================


def build_model_config(cfg: PretrainConfig, vocab_size: int):
    from glassmind.model import ModelConfig, load_config

    if cfg.init_from:
        mc = load_config(cfg.init_from)
        if mc.arch != cfg.arch:
            raise GlassmindError(f"--init-from {cfg.init_from} is a {mc.arch}, not a {cfg.arch}: match --arch")
        if cfg.context > mc.context_length:
            raise GlassmindError(f"--context {cfg.context} is longer than the parent model's context "
                                 f"{mc.context_length}: use --context {mc.context_length} or less")
        if mc.vocab_size != vocab_size:
            raise GlassmindError(f"the parent model has {mc.vocab_size} token embeddings but the tokenizer has "
                                 f"{vocab_size} tokens: use the parent run's tokenizer (drop --tokenizer)")
        return mc
    s = derived_sizes(cfg)
    if s["d_model"] % s["n_heads"]:
        raise GlassmindError(f"d_model {s['d_model']} is not divisible by {s['n_heads']} heads: change "
                             "--n-heads or --d-model")
    return ModelConfig(arch=cfg.arch, vocab_size=vocab_size, context_length=cfg.context, d_model=s["d_model"],
                       n_heads=s["n_heads"], n_layers=s["n_layers"], d_ff=s["d_ff"], positional=cfg.positional,
                       dropout=cfg.dropout)


def identity(model: nn.Module) -> nn.Module:
    return model


def fused_loss_applies(model: nn.Module, cfg: PretrainConfig, device: torch.device) -> bool:
    """Whether `forward_loss` skips the full logits (see PretrainConfig.fused_loss). Only for the plain model
    (alone or tensor-parallel, whose LM head stays replicated): DDP, FSDP, compile and test instruments do
    their work in forward(), which `features` would bypass."""
    from glassmind.model import Transformer

    if cfg.fused_loss == "off" or type(model) is not Transformer or _is_dtensor(model.output_projection()[0]):
        return False
    if cfg.fused_loss == "on":
        return True
    return torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.bfloat16


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def forward_loss(model: nn.Module, arch: str, window: torch.Tensor, *, tok_ids: dict,
                 generator: torch.Generator, cfg: PretrainConfig, device: torch.device) -> torch.Tensor:
    """One micro-batch through the objective of `arch`: window (B, W) token ids on the CPU -> scalar loss.

    Masks and spans are drawn on the CPU from `generator` (so they do not depend on the device), then the
    tensors move to `device`."""
    fused = fused_loss_applies(model, cfg, device)
    if arch == "decoder":
        inputs, targets = objectives.causal_lm(window.to(device))                   # (B, T), (B, T)
        if fused:
            weight, bias = model.output_projection()
            return objectives.linear_cross_entropy(model.features(inputs), weight, targets, bias)
        return objectives.cross_entropy(model(inputs), targets)
    if arch == "encoder":
        inputs, labels = objectives.mask_tokens(
            window, mask_id=tok_ids["mask"], vocab_size=tok_ids["vocab"], special_ids=tok_ids["specials"],
            mask_prob=cfg.mask_prob, generator=generator, continuation=tok_ids.get("continuation"))
        inputs, labels = inputs.to(device), labels.to(device)
        if fused:  # the MLM head on the ~15% chosen positions only (as RoBERTa's fairseq code does)
            chosen = labels != objectives.IGNORE_INDEX                                # (B, T)
            hidden = model.features(inputs)[chosen]                                   # (n, C)
            return objectives.cross_entropy(model.head(hidden, model.token_embedding.weight), labels[chosen])
        return objectives.cross_entropy(model(inputs).logits, labels)                 # logits (B, T, V)
    batch = objectives.span_corrupt(window, sentinel_ids=tok_ids["sentinels"], start_id=tok_ids["sep"],
                                    end_id=tok_ids["sep"], noise_density=cfg.noise_density,
                                    mean_span=cfg.mean_span, generator=generator)
    encoder_ids, decoder_input = batch.encoder_ids.to(device), batch.decoder_input.to(device)
    if fused:
        weight, bias = model.output_projection()
        return objectives.linear_cross_entropy(model.features(encoder_ids, decoder_input), weight,
                                               batch.decoder_target.to(device), bias)
    logits = model(encoder_ids, decoder_input)                                        # (B, Td, V)
    return objectives.cross_entropy(logits, batch.decoder_target.to(device))


def objective_ids(cfg: PretrainConfig, tok) -> dict:
    ids = {"vocab": tok.vocab_size, "sep": separator_id(tok), "specials": sorted(tok.special_tokens.values())}
    if cfg.arch == "encoder":
        ids["mask"] = tok.special_tokens[mask_token(tok)]
        if cfg.whole_word:
            ids["continuation"] = objectives.continuation_table(tok)
    if cfg.arch == "encoder-decoder":
        spans = objectives.span_lengths_for_context(cfg.context, cfg.noise_density, cfg.mean_span).spans
        ids["sentinels"] = [tok.special_tokens[n] for n in sentinel_names(spans)]
    return ids


# ======================================================================================================
# evaluation (used by the loop and by the demo)
# ======================================================================================================


@torch.no_grad()
def evaluate(model: nn.Module, loader: WindowLoader, *, n_batches: int, cfg: PretrainConfig, tok_ids: dict,
             device: torch.device, autocast: Any, pm: Any = None) -> float:
    """Mean validation loss over the first `n_batches` validation micro-batches, split over ranks.

    Masks and spans use a fixed generator per batch (stream 1), so every evaluation sees the same problems
    and the curve measures the model, not the draw."""
    was_training = model.training
    model.eval()
    n_batches = max(1, min(n_batches, loader.batches_per_epoch))
    total = torch.zeros(2, dtype=torch.float64, device=device)
    first, every = (pm.dp_rank, pm.dp_size) if pm is not None else (rank(), world_size())
    for g in range(first, n_batches, every):
        weight = 1.0
        if pm is not None and pm.schedule is not None:  # a pipeline: only the last stage has the loss
            inputs, targets = objectives.causal_lm(loader.batch(g))
            loss = pm.eval_loss(inputs, targets)
            weight = float(pm.pp_rank == pm.pp_size - 1)
        else:
            with autocast():
                loss = forward_loss(model, cfg.arch, loader.batch(g), tok_ids=tok_ids,
                                    generator=batch_generator(cfg.seed, g, 1), cfg=cfg, device=device)
        total += torch.tensor([float(loss) * weight, weight], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


def val_metrics(loss: float, bytes_per_token: float) -> dict:
    """Perplexity exp(loss), and bits per byte loss / ln 2 / (bytes per token): comparable across tokenizers.
    (For masked LM and span corruption it is per predicted token, a random sample of the tokens.)"""
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)),
            "val_bpb": loss / math.log(2) / bytes_per_token}


# ======================================================================================================
# the run
# ======================================================================================================


def pretrain(cfg: PretrainConfig, *, wrap_model: Callable[[nn.Module], nn.Module] = identity) -> dict:
    """Run (or resume) a pre-training run; returns its key numbers (also in card.md).

    `wrap_model` is the single place the model gets wrapped from outside (DDP, FSDP, test instruments): the
    loop runs forward/backward through the wrapper and saves, clips and optimizes the unwrapped module.
    """
    from glassmind.parallel import apply_parallel
    from glassmind.parallel.mesh import mesh_coordinate
    from glassmind.parallel.runtime import join

    t_start = time.perf_counter()
    # -- 2. setup ------------------------------------------------------------------------------------------
    cfg, dtype_reason = resolve_config_dtype(cfg)  # `auto` -> fp32 or bf16, before anything reads cfg.dtype
    check_config(cfg)
    spec, mesh = join(cfg.parallel, pick_device(cfg.device).type, mp=cfg.dtype)  # None: one process
    dp_rank, dp_size = mesh_coordinate(mesh, "dp")
    device, dtype = setup_device(cfg)
    run = Run(cfg, CONFIG_FILE, RESUME_MAY_CHANGE)  # checks only: nothing is written before every check passed
    out = run.out

    # -- 3. tokenizer --------------------------------------------------------------------------------------
    tok = get_tokenizer(cfg, out)
    tok_ids = objective_ids(cfg, tok)
    mcfg = build_model_config(cfg, tok.vocab_size)  # checks vocab and context against a parent run

    # -- 4. data -------------------------------------------------------------------------------------------
    shards = build_shards(tok, cfg.data, root=cfg.shards_dir, val_fraction=cfg.val_fraction,
                          max_bytes=cfg.max_bytes, progress=cfg.progress and is_rank0())
    train_loader, val_loader = make_loaders(cfg, shards, rank=dp_rank, world=dp_size)
    run.start(extra={"dtype_reason": dtype_reason})  # every check passed: only now does the run directory get written
    if is_rank0():
        tok.save(out)
    bytes_per_token = shards.bytes_per_token("val")
    accum = cfg.batch_tokens // (cfg.micro_batch * cfg.context * dp_size)
    print0(f"data: {shards.tokens('train'):,} train / {shards.tokens('val'):,} val tokens ({shards.path}); "
           f"{cfg.batch_tokens:,} tokens per step = {cfg.micro_batch} x {cfg.context} x {dp_size} replica(s) "
           f"x {accum} accumulation step(s); layout {spec}")

    # -- 5. model ------------------------------------------------------------------------------------------
    from glassmind.model import Transformer, load_model

    seed_everything(cfg.seed)  # here, after the tokenizer: init is the same whether or not one was trained
    raw_model = load_model(cfg.init_from) if cfg.init_from else Transformer(mcfg)
    raw_model.to(device)
    n_params = raw_model.num_params()
    pm = apply_parallel(raw_model, spec, mesh)  # DDP / ZeRO / FSDP / TP / PP, from outside (1 process: as is)
    model = wrap_model(pm.module)   # instruments: the one place the model is wrapped
    if cfg.compile:
        model = torch.compile(model)
    flops_per_token = mcfg.flops_per_token(cfg.context, training=True)
    print0(f"model: {cfg.arch}, {n_params:,} parameters, d_model {mcfg.d_model}, "
           f"{mcfg.n_heads} heads, {mcfg.n_layers} layers, context {mcfg.context_length}")

    # -- 6. optimizer, schedule, scaler --------------------------------------------------------------------
    max_lr = cfg.lr if cfg.lr is not None else default_lr(mcfg.d_model)  # mcfg: a parent run's width counts
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * cfg.steps))
    optimizer = pm.wrap_optimizer(adamw(pm.module, lr=max_lr, weight_decay=cfg.weight_decay,
                                        betas=(cfg.beta1, cfg.beta2), decay_embeddings=cfg.decay_embeddings))
    scaler = pm.grad_scaler(enabled=dtype == torch.float16)  # sharded layouts skip an inf step on all ranks

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    peak = cfg.peak_flops or metrics.measure_matmul_flops(dtype, device, seconds=0.3)

    # -- 7. resume -----------------------------------------------------------------------------------------
    log = run.log
    step, restored = run.resume(pm, optimizer, scaler=scaler)  # rows logged after that checkpoint are dropped
    if step:
        train_loader.load_state_dict(restored["loader"])

    def save_checkpoint() -> None:
        # every rank gathers its pieces; rank 0 writes, in the one-process format
        run.checkpoint(pm, step, optimizer=optimizer, scaler=scaler, loader_state=train_loader.state_dict())
        pm.save_model(out)  # the run directory always holds the latest weights, ready to load

    def run_eval() -> dict:
        loss = evaluate(model, val_loader, n_batches=cfg.eval_batches, cfg=cfg, tok_ids=tok_ids, device=device,
                        autocast=autocast, pm=pm)
        row = {"step": step, "tokens": step * cfg.batch_tokens, "split": "val", **val_metrics(loss, bytes_per_token)}
        log.log(row)
        metrics.plot_loss(log.rows(), out / "loss.png", title=f"{out.name}: {cfg.arch} pre-training")
        return row

    first_val = None
    if step == 0 and not any(r.get("split") == "val" and r["step"] == 0 for r in log.rows()):
        first_val = run_eval()

    # -- 8. the loop ---------------------------------------------------------------------------------------
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, unit="step", disable=not (cfg.progress and is_rank0()),
               dynamic_ncols=True)
    pm.module.train()
    speeds: list[float] = []
    last_loss = float("nan")
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, max_lr=max_lr, total_steps=cfg.steps, warmup_steps=warmup, decay=cfg.decay,
                   min_lr_ratio=cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # forward/backward over `accum` micro-batches; gradients are reduced over the data-parallel
        # replicas only on the last one
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            g, window = train_loader.next()
            last = micro == accum - 1
            if pm.schedule is not None:  # a pipeline: its schedule runs forward and backward
                inputs, targets = objectives.causal_lm(window)
                loss = pm.forward_backward(inputs, targets, loss_scale=1 / accum, sync=last, scaler=scaler)
            else:
                with pm.grad_sync(last):
                    with autocast():
                        loss = forward_loss(model, cfg.arch, window, tok_ids=tok_ids,
                                            generator=batch_generator(cfg.seed, g), cfg=cfg, device=device)
                    scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
        mean_loss = torch.tensor(pm.global_loss(loss_sum / accum))

        # unscale, clip, the NaN/inf guard (before the optimizer touches the weights), step
        loss_value = float(mean_loss)
        try:
            outcome = run.optimizer_step(pm, optimizer, loss_value, step=step, grad_clip=cfg.grad_clip, scaler=scaler)
        except GlassmindError:
            bar.close()
            raise
        norm_value, bad, scale = outcome.grad_norm, outcome.skipped, outcome.loss_scale
        step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens_per_s = cfg.batch_tokens / dt
        speeds.append(tokens_per_s)
        last_loss = loss_value
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {"step": step, "tokens": step * cfg.batch_tokens, "loss": loss_value, "lr": lr,
                   "grad_norm": norm_value, "tokens_per_s": tokens_per_s,
                   "mfu": metrics.mfu(tokens_per_s / world_size(), flops_per_token, peak)}
            if scale is not None:
                row["loss_scale"] = scale
            if bad:
                row["skipped"] = True
            log.log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:,.0f}")

        if run.due(cfg.eval_every, step, cfg.steps):
            run_eval()
        if run.due(cfg.ckpt_every, step, cfg.steps):
            save_checkpoint()
    bar.close()

    # -- 9. the end ----------------------------------------------------------------------------------------
    rows = log.rows()
    final_val = next((r for r in reversed(rows) if r.get("split") == "val" and r["step"] == step), None)
    if final_val is None:
        final_val = run_eval()
    if run.needs_final_checkpoint(step):
        save_checkpoint()
    if first_val is None:
        first_val = next((r for r in rows if r.get("split") == "val"), final_val)
    metrics.plot_loss(log.rows(), out / "loss.png", title=f"{out.name}: {cfg.arch} pre-training")
    train_rows = [r for r in log.rows() if "loss" in r and r.get("split") != "val" and "event" not in r]
    median_speed = float(np.median(speeds)) if speeds else float("nan")
    summary = {
        "run": str(out), "arch": cfg.arch, "dtype": cfg.dtype, "parameters": n_params, "steps": step,
        "tokens": step * cfg.batch_tokens,
        "train_loss": train_rows[-1]["loss"] if train_rows else last_loss,
        "val_loss_start": first_val["val_loss"], "val_loss": final_val["val_loss"],
        "val_ppl": final_val["val_ppl"], "val_bpb": final_val["val_bpb"],
        "tokens_per_s": median_speed, "mfu": metrics.mfu(median_speed / world_size(), flops_per_token, peak),
        "peak_flops": peak, "seconds": time.perf_counter() - t_start,
    }
    objective = {"decoder": "causal language modelling", "encoder": "masked language modelling (BERT 80/10/10)",
                 "encoder-decoder": "span corruption (T5, sentinels)"}[cfg.arch]
    metrics.write_card(
        out, title=f"{out.name}: pre-trained {cfg.arch}",
        what=(f"Pre-trained a {n_params:,}-parameter {cfg.arch} with {objective} for {step} steps "
              f"({step * cfg.batch_tokens:,} tokens) on {', '.join(cfg.data) if cfg.data else 'the built-in corpus'}"
              f", {cfg.dtype} on {device.type} ({dtype_reason}; {cpu_summary() if device.type == 'cpu' else device})."),
        parent=cfg.init_from or (f"tokenizer from {cfg.tokenizer}" if cfg.tokenizer else None),
        numbers={k: v for k, v in summary.items() if k not in ("run", "arch")},
        config={**dataclasses.asdict(cfg), "dtype_reason": dtype_reason},
        plots=["loss.png"])
    print0(f"done: val loss {summary['val_loss_start']:.4f} -> {summary['val_loss']:.4f} "
           f"(ppl {summary['val_ppl']:.1f}, {summary['val_bpb']:.3f} bits/byte), {out}")
    return summary


# ======================================================================================================
# command line
# ======================================================================================================


def main(argv: list[str] | None = None) -> int:
    from glassmind.parallel.runtime import recipe_main

    return recipe_main(pretrain, PretrainConfig, argv, prog="glassmind pretrain", settings_file=CONFIG_FILE,
                       description="Pre-train a decoder (causal LM), encoder (masked LM) or encoder-decoder (span corruption).")


if __name__ == "__main__":
    import sys

    sys.exit(main())
