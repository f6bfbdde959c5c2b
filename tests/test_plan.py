import shlex

import pytest

from petra.cli import main, overrides_from, parser
from petra.config import ConfigError, build_config
from petra.plan import CONTEXT_GIB, candidates, make_plan, micro_batches, parse_gib, probe, probe_in_child


@pytest.mark.parametrize(
    "text, gib", [("24GiB", 24), ("24G", 24), ("16GB", 16e9 / 2**30), ("1536MiB", 1.5), ("80", 80), (" 7.5 gib", 7.5)]
)
def test_gpu_memory_sizes(text, gib):
    assert parse_gib(text) == pytest.approx(gib)


@pytest.mark.parametrize("text", ["lots", "24TB", "-3GiB", "", "0.4"])
def test_bad_gpu_memory_is_refused_naming_the_flag(text):
    with pytest.raises(ConfigError, match="--gpu-mem"):
        parse_gib(text)


def test_micro_batches_divide_the_batch():
    assert micro_batches(64, None) == [64, 32, 16, 8, 4, 2, 1]
    assert micro_batches(48, None) == [16, 8, 4, 2, 1]
    assert micro_batches(64, 8) == [8]
    with pytest.raises(ConfigError, match="must divide"):
        micro_batches(64, 24)


def test_candidates_are_what_each_method_accepts():
    base = {"preset": "1b", "train.batch_size": 8}
    cands = candidates(base, ["galore", "apollo", "muon"], [8])
    kinds = {(c.method, c.cfg.method.layerwise, c.cfg.train.grad_clip) for c in cands}
    # GaLore: layer-wise with and without clipping; APOLLO layer-wise only without; Muon never
    assert kinds == {
        ("galore", False, 1.0),
        ("galore", True, 1.0),
        ("galore", True, 0.0),
        ("apollo", False, 1.0),
        ("apollo", True, 0.0),
        ("muon", False, 1.0),
    }
    assert all(c.estimate["total"] > 0 for c in cands)


def test_plan_for_7b_on_16_gib_is_apollo_mini_8bit_layer_wise_with_bf16_weights():
    chosen, missing = make_plan({"preset": "7b", "train.batch_size": 1}, ["full", "galore8bit", "apollo-mini8bit"], 16)
    by = {c.method: c for c in chosen}
    c = by["apollo-mini8bit"]
    assert c.cfg.method.layerwise and c.cfg.model.activation_checkpointing and c.cfg.train.grad_clip == 0
    assert c.cfg.method.int8_weights == "off"  # int8 weights only where nothing else fits
    assert c.needs_gib() <= 16 and c.needs_gib() > c.estimate["total"] + CONTEXT_GIB
    assert by["galore8bit"].cfg.method.int8_weights == "stochastic"  # fits only so
    assert "int8 weights" in by["galore8bit"].settings and "int8_weights=stochastic" in by["galore8bit"].command()
    assert [m for m, _ in missing] == ["full"] and "needs about" in missing[0][1]


def test_plan_for_7b_on_a_12_gib_gpu_holds_the_weights_in_int8():
    chosen, missing = make_plan({"preset": "7b", "train.batch_size": 1}, ["apollo-mini8bit", "apollo-mini"], 12)
    assert {c.method for c in chosen} == {"apollo-mini8bit", "apollo-mini"}
    assert all(c.cfg.method.int8_weights == "stochastic" and c.needs_gib() <= 12 for c in chosen)


def test_more_memory_fits_more_methods_and_cheaper_settings():
    methods = ["full", "galore", "galore8bit", "relora"]
    small, _ = make_plan({"preset": "1b", "train.batch_size": 64}, methods, 8)
    large, _ = make_plan({"preset": "1b", "train.batch_size": 64}, methods, 60)
    assert {c.method for c in small} < {c.method for c in large} == set(methods)
    by = {c.method: c for c in small}
    for c in large:
        if c.method in by:
            assert c.cost() <= by[c.method].cost()
    # without a GPU to measure, cheaper settings come first
    assert [c.cost() for c in large] == sorted(c.cost() for c in large)


def test_each_command_trains_exactly_the_planned_config():
    chosen, _ = make_plan({"preset": "1b", "train.batch_size": 64}, ["full", "galore8bit", "apollo", "relora"], 20)
    assert chosen
    for c in chosen:
        argv = shlex.split(c.command())
        assert argv[:2] == ["petra", "train"]
        args = parser().parse_args(argv[1:])
        got = build_config(overrides=overrides_from(args))
        assert got.model == c.cfg.model and got.method == c.cfg.method
        assert (got.train.batch_size, got.micro_batch, got.train.grad_clip) == (
            c.cfg.train.batch_size,
            c.cfg.micro_batch,
            c.cfg.train.grad_clip,
        )


def test_probe_trains_real_steps_and_its_child_reports_them():
    cfg = build_config(
        overrides={"preset": "tiny", "train.batch_size": 8, "method.name": "galore", "train.device": "cpu"}
    )
    r = probe(cfg, steps=3)
    assert r["step_ms"] > 0 and r["tokens_per_s"] == pytest.approx(8 * cfg.seq_len / (r["step_ms"] / 1e3))
    assert r["peak_gib"] > 0
    child = probe_in_child(cfg, cap_gib=8)
    assert set(child) == {"peak_gib", "reserved_gib", "step_ms", "tokens_per_s"}


def test_a_failing_probe_reports_why():
    cfg = build_config(overrides={"preset": "tiny", "train.device": "cuda"})
    r = probe_in_child(cfg, cap_gib=8) if not _cuda() else {"error": "CUDA"}
    assert "CUDA" in r["error"]


def test_probed_plan_is_ordered_by_measured_speed():
    base = {"preset": "tiny", "train.batch_size": 8, "train.device": "cpu"}
    chosen, missing = make_plan(base, ["full", "relora"], 8, probe_on=True, log=lambda *a: None)
    assert {c.method for c in chosen} == {"full", "relora"} and not missing
    speeds = [c.probe["tokens_per_s"] for c in chosen]
    assert speeds == sorted(speeds, reverse=True)


def test_cli_plan(capsys):
    assert main(["plan", "--preset", "7b", "--gpu-mem", "16GiB", "--batch-size", "1", "--no-probe"]) == 0
    out = capsys.readouterr().out
    assert "apollo-mini8bit" in out and "petra train --preset 7b --method apollo-mini8bit" in out
    assert "does not fit: full: needs about" in out and "order: expected step time, not measured" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--preset", "1b", "--gpu-mem", "24GiB", "--methods", "galore,nope"], "--methods: nope not known"),
        (["plan", "--preset", "1b", "--gpu-mem", "huge"], "--gpu-mem 'huge' must be a size"),
    ],
)
def test_cli_plan_bad_input(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_plan_needs_a_size_without_a_gpu(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["plan", "--preset", "1b"]) == 2
    assert "--gpu-mem is needed without a CUDA device" in capsys.readouterr().err


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_plan_on_several_gpus_weighs_ddp_against_fsdp2_per_gpu(capsys):
    from petra.cli import main

    argv = ["plan", "--preset", "7b", "--gpu-mem", "24GiB", "--batch-size", "16", "--gpus", "8", "--no-probe"]
    assert main([*argv, "--methods", "galore,galore-adafactor"]) == 0
    out = capsys.readouterr().out
    galore = next(line for line in out.splitlines() if line.startswith("| galore"))
    # a replica of 7b's weights, gradients and GaLore state does not fit 24 GiB; an eighth of them does
    assert "FSDP2 on 8 GPUs" in galore and "torchrun --nproc_per_node 8" in galore and "train.parallel=fsdp" in galore
    # a replica fits only layer-wise (slower): GaLore-Adafactor, which now shards, takes FSDP2
    adafactor = next(line for line in out.splitlines() if line.startswith("| galore-adafactor"))
    assert "FSDP2 on 8 GPUs" in adafactor and "layer-wise" not in adafactor
    assert main([*argv[:-1], "--gpus", "3"]) == 2
    assert "--gpus 3 must be at least 1 and divide --batch-size 16" in capsys.readouterr().err


def test_the_per_gpu_estimate_divides_what_fsdp2_shards_and_keeps_what_it_does_not():
    from petra.config import build_config
    from petra.memory import breakdown_gib

    cfg = build_config(overrides={"preset": "1b", "method.name": "galore", "train.batch_size": 8})
    one, ddp, fsdp = breakdown_gib(cfg), breakdown_gib(cfg, gpus=8), breakdown_gib(cfg, gpus=8, mode="fsdp")
    assert ddp["weights"] == one["weights"] and ddp["optimizer_state"] == one["optimizer_state"]
    row = build_config(overrides={"preset": "1b", "method.name": "galore", "train.batch_size": 1})
    assert ddp["activations"] == breakdown_gib(row)["activations"]  # each process: its one row of the 8
    assert fsdp["optimizer_state"] == pytest.approx(one["optimizer_state"] / 8)
    assert fsdp["projectors"] == one["projectors"]  # every process holds them whole
    assert one["weights"] / 8 < fsdp["weights"] < one["weights"] / 2  # a share, plus one layer and the root gathered
