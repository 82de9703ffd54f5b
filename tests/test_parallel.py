"""Scale-out (glassmind.parallel): every layout gives the losses of one process, checkpoints resume exactly
under any layout, wrong layouts fail clearly on every rank, and `glassmind plan` counts what ranks hold.

Multi-process checks run real process groups (torchrun, gloo, CPU) through tests/dist_worker.py: one launch
per world size runs all its layouts (torchrun costs seconds per start), each with its own mesh. Every
launch has a deadline and is killed as a process group if it passes it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from glassmind.common import GlassmindError
from glassmind.parallel import memory
from glassmind.parallel.launch import torchrun
from glassmind.parallel.mesh import ParallelSpec, check_model, parse_spec

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker as W  # noqa: E402

WORKER = str(Path(__file__).parent / "dist_worker.py")
LAYOUTS_2 = ["dp=2", "dp=2,zero=1", "dp=2,zero=2", "fsdp=2", "tp=2", "pp=2,schedule=gpipe,microbatches=2",
             "pp=2,schedule=1f1b,microbatches=4", "fsdp=2,mp=bf16", "dp=2,mp=bf16", "fsdp=2,mp=fp16"]
LAYOUTS_4 = ["dp=2,tp=2", "fsdp=2,tp=2", "pp=2,dp=2,microbatches=2", "pp=2,fsdp=2,microbatches=2",
             "pp=2,tp=2,microbatches=2", "pp=2,tp=2,microbatches=2,mp=bf16"]
# Runs with lr 0 under a bf16 layout: test_checks_reject_a_model_that_never_trains shows the checks fail them.
FROZEN_2 = [W.FROZEN + "dp=2,mp=bf16", W.FROZEN + "fsdp=2,mp=bf16"]
# What each precision is held to. bf16 layouts are compared with a one-process bf16 (autocast) run, fp16 ones
# with the fp32 run. The three steps move the loss by about 0.037 (4.582 -> 4.607 vs 4.570 untrained at step
# 3), so a loss tolerance must stay well under that; the update (final - initial weights, as one vector) is
# what a model that never trains gets wrong by 100%.
# Measured worst cases (2 and 4 gloo ranks): fp32 layouts 2.4e-7 / 1.1e-6 / 3e-7 / 1.3e-5; bf16 layouts vs the bf16
# run 2.0e-4 / 0.030 / 1.2e-3 / 0.084; a bf16 run with lr 0: 0.037 / - / 1.9 / 1.0.
TOLS = {  # precision -> (loss, first-step gradient per parameter (relative L2), gradient norm (relative), update (relative L2))
    "fp32": (1e-5, 1e-4, 1e-5, 1e-3),
    "bf16": (2e-3, 0.1, 0.01, 0.2),
    "fp16": (5e-3, 0.02, 5e-3, 0.1),
}
LAUNCH_TIMEOUT = 300


# ----------------------------------------------------------------------------------------------------
# the single-process reference and the launches


def initial_weights() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in W.make_model().state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the same global batch: losses per step, every gradient of the first step, the gradient
    norms, the model after all steps, and a checkpoint after SAVE_AT steps written by
    glassmind.train.checkpoint (the layouts resume from it too)."""
    from glassmind.train import checkpoint as ckpt
    from glassmind.train.optim import adamw

    torch.manual_seed(0)
    model = W.make_model()
    opt = adamw(model, lr=W.LR)
    record: dict = {}
    first, _ = W.reference_run(W.SAVE_AT, model=model, optimizer=opt, record=record)
    root = tmp_path_factory.mktemp("single") / "train_state"
    path = ckpt.save(root, W.SAVE_AT, model=model, optimizer=opt)
    rest, _ = W.reference_run(W.STEPS, model=model, optimizer=opt, start=W.SAVE_AT, record=record)
    data = W.batches()
    with torch.no_grad():
        eval_loss = float(W.causal_lm_loss(model(data[0][:, :-1]), data[0][:, 1:]))
    return {"losses": first + rest, "model": model, "checkpoint": path, "eval_loss": eval_loss,
            "grads": record["grads"], "grad_norms": record["grad_norms"], "state": model.state_dict()}


@pytest.fixture(scope="module")
def bf16_reference():
    """The same run in one process under bf16 autocast: what the bf16 layouts are compared with."""
    record: dict = {}
    model = W.make_model()
    losses, model = W.reference_run(W.STEPS, model=model, mp="bf16", record=record)
    return {"losses": losses, "grads": record["grads"], "grad_norms": record["grad_norms"],
            "state": model.state_dict()}


def precision(layout: str) -> str:
    return "bf16" if "bf16" in layout else "fp16" if "fp16" in layout else "fp32"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def disagreements(root: Path, layout: str, ref: dict) -> list[str]:
    """Everything in which the layout's run differs from the one-process run `ref` by more than its
    precision's tolerance: losses, every parameter's first-step gradient (gathered to full tensors), the
    gradient norm of every step, and the update the three steps made. [] when it agrees."""
    from safetensors.torch import load_file

    loss_tol, grad_tol, norm_tol, update_tol = TOLS[precision(layout)]
    got = result_of(root, layout)
    folder = root / W.folder_name(layout)
    out = []
    worst = max(abs(a - b) for a, b in zip(got["losses"], ref["losses"]))
    if worst > loss_tol:
        out.append(f"losses differ by {worst:.3g} > {loss_tol}")
    grads = torch.load(folder / "grads_first_step.pt")
    if grads.keys() != ref["grads"].keys():
        out.append(f"gradients of {sorted(set(grads) ^ set(ref['grads']))} missing on one side")
    for name in sorted(set(grads) & set(ref["grads"])):
        if grads[name].shape != ref["grads"][name].shape:
            out.append(f"gradient of {name}: shape {tuple(grads[name].shape)}")
        elif (e := rel(grads[name], ref["grads"][name])) > grad_tol:
            out.append(f"gradient of {name} differs by {e:.3g} (relative) > {grad_tol}")
    for i, (a, b) in enumerate(zip(got["grad_norms"], ref["grad_norms"])):
        if abs(a - b) > norm_tol * b:
            out.append(f"step {i + 1}: gradient norm {a:.6g} vs {b:.6g}")
    state, start = load_file(str(folder / "model" / "model.safetensors")), initial_weights()
    mine = torch.cat([(state[k].float() - start[k]).flatten() for k in start])
    theirs = torch.cat([(ref["state"][k].float() - start[k]).flatten() for k in start])
    if (e := rel(mine, theirs)) > update_tol:
        out.append(f"the update (final - initial weights) differs by {e:.3g} (relative) > {update_tol}")
    return out


def launch(tmp_path_factory, name: str, nproc: int, layouts: list[str], reference) -> Path:
    out = tmp_path_factory.mktemp(name)
    result = torchrun([WORKER, "suite", str(out), *layouts], nproc=nproc, timeout=LAUNCH_TIMEOUT,
                      env={"GM_SINGLE_CKPT": str(reference["checkpoint"])})
    if not result.ok:
        pytest.fail(f"torchrun {name} {'timed out' if result.timed_out else f'exited {result.returncode}'}:\n"
                    f"{result.output[-6000:]}")
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, reference):
    return launch(tmp_path_factory, "two", 2, LAYOUTS_2 + FROZEN_2, reference)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, reference):
    return launch(tmp_path_factory, "four", 4, LAYOUTS_4, reference)


def result_of(root: Path, layout: str) -> dict:
    folder = root / W.folder_name(layout)
    if not (folder / "result.json").exists():
        errors = [p.read_text() for p in sorted(folder.glob("error_*.txt"))]
        pytest.fail(f"{layout} failed in the worker:\n" + (errors[0][-4000:] if errors else "no result"))
    return json.loads((folder / "result.json").read_text())


def tolerance(layout: str) -> float:
    return TOLS[precision(layout)][0]


def reference_for(request, layout: str) -> dict:
    return request.getfixturevalue("bf16_reference" if precision(layout) == "bf16" else "reference")


def each_layout():
    return ([pytest.param("two_ranks", x, id=x) for x in LAYOUTS_2]
            + [pytest.param("four_ranks", x, id=x) for x in LAYOUTS_4])


# ----------------------------------------------------------------------------------------------------
# same losses, exact resume, single-process inference


@pytest.mark.parametrize("launch_name,layout", each_layout())
def test_losses_gradients_and_update_match_one_process(request, launch_name, layout):
    """Losses alone cannot see a gradient scaled uniformly (AdamW with clipping is nearly invariant to it:
    summing instead of averaging over 2 replicas moves these losses by < 1e-6); every parameter's gradient
    and the gradient norm can."""
    root = request.getfixturevalue(launch_name)
    ref = reference_for(request, layout)
    assert disagreements(root, layout, ref) == []
    got = result_of(root, layout)
    if precision(layout) != "bf16":  # the bf16 reference has no eval loss; bf16's is checked through the update
        assert got["eval_loss"] == pytest.approx(ref["eval_loss"], abs=tolerance(layout))
    assert abs(got["losses"][2] - got["losses"][0]) > 1e-3  # the layouts really train: the loss moves


@pytest.mark.parametrize("layout", FROZEN_2)
def test_checks_reject_a_model_that_never_trains(two_ranks, bf16_reference, layout):
    """The bf16 tolerances are no tolerance if an untrained model meets them: a run with lr 0 must fail both
    the loss and the update checks (its first-step gradients are right: it computes them, then does not step)."""
    problems = disagreements(two_ranks, layout, bf16_reference)
    assert any(p.startswith("losses differ") for p in problems), problems
    assert any(p.startswith("the update") for p in problems), problems


@pytest.mark.parametrize("launch_name,layout", each_layout())
def test_resume_repeats_the_next_step(request, reference, launch_name, layout):
    got = result_of(request.getfixturevalue(launch_name), layout)
    assert got["resumed_from"] == W.SAVE_AT
    assert got["resumed"] == pytest.approx(got["losses"][W.SAVE_AT:], abs=1e-6)
    # from the checkpoint one process wrote: the next step is the reference's
    tol = tolerance(layout)
    assert got["from_single"] == pytest.approx(reference["losses"][W.SAVE_AT:], abs=tol)


@pytest.mark.parametrize("launch_name,layout", [p for p in each_layout() if "mp=" not in p.id])
def test_saved_model_runs_in_one_process(request, reference, launch_name, layout):
    import glassmind.model

    root = request.getfixturevalue(launch_name)
    result_of(root, layout)
    model = glassmind.model.load_model(root / W.folder_name(layout) / "model")
    ids = W.batches()[0][:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference["model"](ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["fsdp=2", "tp=2", "pp=2,schedule=1f1b,microbatches=4"])
def test_one_process_resumes_a_parallel_checkpoint(two_ranks, reference, layout):
    """The other direction: a checkpoint written under a layout resumes in a plain process."""
    from glassmind.train import checkpoint as ckpt
    from glassmind.train.optim import adamw

    result_of(two_ranks, layout)
    model = W.make_model(seed=5)
    opt = adamw(model, lr=W.LR)
    info = ckpt.load(two_ranks / W.folder_name(layout) / "train_state" / f"step_{W.SAVE_AT:08d}",
                     model=model, optimizer=opt)
    losses, _ = W.reference_run(W.STEPS, model=model, optimizer=opt, start=info["step"])
    assert losses == pytest.approx(reference["losses"][W.SAVE_AT:], abs=1e-5)


# ----------------------------------------------------------------------------------------------------
# the plan's numbers against what the ranks held


def coordinates(rank: int, spec: ParallelSpec) -> dict[str, int]:
    """Rank -> (pp, dp, tp) coordinates: the mesh is row-major with tp fastest."""
    dp_rank = (rank // spec.tp) % spec.dp
    return {"pp_rank": rank // (spec.tp * spec.dp), "dp_rank": dp_rank}


@pytest.mark.parametrize("launch_name,layout", each_layout())
def test_plan_counts_what_each_rank_holds(request, launch_name, layout):
    root = request.getfixturevalue(launch_name)
    result_of(root, layout)
    nproc = 2 if launch_name == "two_ranks" else 4
    spec = parse_spec(layout, nproc)
    cfg = W.tiny_config()
    work = memory.Workload(W.GLOBAL_BATCH, W.GLOBAL_BATCH // W.ACCUM // spec.dp, W.SEQ)
    table = memory.param_table(cfg)
    totals = []
    for rank in range(nproc):
        held = json.loads((root / W.folder_name(layout) / f"memory_{rank}.json").read_text())
        planned = memory.rank_memory(cfg, spec, work, table=table, **coordinates(rank, spec))
        assert held["params"] == planned.param_numel, f"rank {rank}"
        assert held["optimizer_bytes"] == planned.optimizer, f"rank {rank}"
        totals.append(held["params"])
    n = sum(memory.numel(s) for _, s, _ in table)
    if spec.sharded or spec.tp > 1:
        assert max(totals) < n  # sharding really shrank what a rank holds
    if spec.dp > 1 and spec.zero >= 2 and spec.tp == spec.pp == 1:
        assert sum(totals) == n  # FSDP: the shards add up to the model, nothing held twice


def test_zero1_partition_is_balanced():
    params = [(n, memory.numel(s), g) for n, s, g in memory.param_table(W.tiny_config())]
    owned = memory.zero1_owned(params, 2)
    assert sorted(sum(owned, [])) == sorted(n for n, _, _ in params)
    sizes = {n: k for n, k, _ in params}
    a, b = (sum(sizes[n] for n in o) for o in owned)
    assert abs(a - b) <= max(sizes.values())


@pytest.mark.parametrize("kw", [dict(), dict(activation="gelu", positional="learned", n_kv_heads=None),
                                dict(n_layers=2, norm_position="post", norm="rmsnorm"),
                                dict(norm="rmsnorm", bias=False, n_kv_heads=None)])
def test_activation_estimate_close_to_saved_tensors(kw):
    """The activation estimate against the bytes autograd really saves (single process, fp32)."""
    cfg = W.tiny_config(vocab_size=512, context_length=64, d_model=64, **kw)
    torch.manual_seed(0)
    model = W.Transformer(cfg)
    ids = torch.randint(0, 512, (4, 64))
    measured = memory.measure_saved_activations(model, ids, ids)
    planned = memory.activation_bytes(cfg, 4, 64, layers=cfg.n_layers)
    assert planned == pytest.approx(measured, rel=0.1)


# ----------------------------------------------------------------------------------------------------
# layout errors: clear, the same on every rank, before any collective; no hang


@pytest.fixture(scope="module")
def errors_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("errors")
    result = torchrun([WORKER, "errors", str(out)], nproc=2, timeout=90)
    return out, result


def test_wrong_layouts_fail_the_same_on_every_rank(errors_run):
    out, _ = errors_run
    per_rank = [json.loads((out / f"errors_{r}.json").read_text()) for r in range(2)]
    assert per_rank[0] == per_rank[1]
    msgs = per_rank[0]
    assert "does not divide the model's 3 attention heads" in msgs["tp=2"]
    assert "choose tp among [1, 3]" in msgs["tp=2"]
    assert "pp=2 stages but the model has only 1 layers" in msgs["pp=2"]
    assert "dp=3" in msgs["dp=3"] and "2 were launched" in msgs["dp=3"]


def test_a_silent_peer_times_out_instead_of_hanging(errors_run):
    out, result = errors_run
    assert not result.timed_out, result.output[-3000:]
    assert result.returncode != 0
    got = json.loads((out / "timeout.json").read_text())
    assert got["outcome"] != "completed"
    # the group's 3 s timeout, not the 30 min default (1800 s); generous for a loaded machine, and under the
    # launch's own 90 s limit (errors_run), past which nothing would be written
    assert 2 < got["seconds"] < 85


def test_launcher_kills_a_hung_group(tmp_path):
    result = torchrun([WORKER, "sleep", str(tmp_path)], nproc=2, timeout=12)
    assert result.timed_out
    pids = [int(p.read_text()) for p in tmp_path.glob("sleeping_*")]
    assert len(pids) == 2, result.output[-3000:]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ----------------------------------------------------------------------------------------------------
# layout strings and checks (no processes)


def test_parse_spec():
    assert parse_spec("dp=2,tp=2", 4) == ParallelSpec(dp=2, tp=2)
    assert parse_spec("tp=2", 4) == ParallelSpec(dp=2, tp=2)            # dp inferred
    assert parse_spec("fsdp=4", 4) == ParallelSpec(dp=4, zero=3)
    assert parse_spec("zero=1", 2) == ParallelSpec(dp=2, zero=1)
    spec = parse_spec("pp=2,schedule=GPipe,microbatches=4,mp=bfloat16", 2)
    assert (spec.pp, spec.schedule, spec.n_microbatches, spec.mp) == (2, "gpipe", 4, "bf16")
    assert parse_spec("pp=2,mp=fp16", 2).mp == "fp16"  # the pipeline step takes the fp16 loss scaler too
    assert parse_spec("", 1) == ParallelSpec()
    assert str(parse_spec("dp=2,tp=2,zero=3", 4)) == "dp=2,tp=2,zero=3"


@pytest.mark.parametrize("text,world,message", [
    ("dp=2,tp=2", 2, "4 processes, but 2 were launched"),
    ("tp=3", 4, "does not divide the 4 processes"),
    ("dp=two", 2, "must be an integer"),
    ("dp", 2, "is not key=value"),
    ("cp=2", 2, "unknown key 'cp'"),
    ("fsdp=2,zero=1", 2, "either fsdp or dp/zero"),
    ("dp=2,zero=5", 2, "zero=5 must be 0, 1, 2 or 3"),
    ("pp=2,schedule=zb", 2, "schedule='zb'"),
    ("pp=4,microbatches=2", 4, "at least as many microbatches as stages"),
    ("dp=2,tp=2,zero=1", 4, "zero=1"),
    ("mp=fp8", 1, "mp='fp8'"),
])
def test_parse_spec_errors(text, world, message):
    with pytest.raises(GlassmindError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_spec(text, world)


def test_model_checks():
    check_model(parse_spec("tp=2", 2), W.tiny_config())
    with pytest.raises(GlassmindError, match="key/value heads"):
        check_model(parse_spec("tp=4", 4), W.tiny_config())             # 4 heads but 2 kv heads
    with pytest.raises(GlassmindError, match="decoder-only"):
        check_model(parse_spec("pp=2", 2), W.tiny_config(arch="encoder", head="mlm"))


def test_pipeline_split_and_tp_shapes():
    from glassmind.parallel.pipeline import stage_layers

    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    assert memory.tp_shape("decoder.blocks.0.self_attn.q_proj.weight", (32, 32), 2) == (16, 32)
    assert memory.tp_shape("decoder.blocks.0.ffn.down.weight", (32, 128), 2) == (32, 64)
    assert memory.tp_shape("decoder.blocks.0.ffn.down.bias", (32,), 2) == (32,)
    assert memory.tp_shape("token_embedding.weight", (96, 32), 2) == (96, 32)
    assert [memory.fsdp_rows(5, 2, r) for r in range(2)] == [3, 2]


def test_plan_verb(capsys):
    from glassmind.__main__ import main

    assert main(["plan", "--devices", "4", "--memory-gb", "0.01", "--d-model", "64", "--n-layers", "4",
                 "--n-heads", "4", "--vocab-size", "512", "--context-length", "64", "--global-batch", "16",
                 "--micro-batch", "4", "--mp", "fp32"]) == 0
    out = capsys.readouterr().out
    for layout in ("dp=4 ", "dp=4,zero=3", "dp=2,tp=2", "pp=2,dp=2"):
        assert layout in out
    assert "suggested: --parallel" in out
    assert main(["plan", "--devices", "2", "--layout", "tp=2", "--n-heads", "3", "--d-model", "48"]) == 2
    assert "does not divide the model's 3 attention heads" in capsys.readouterr().err
