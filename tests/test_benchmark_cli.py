"""``python -m fastae bench``: the ratio table, the figures, and the eager baselines' math;
``bench/warm_cache.py``: its jobs and a run of them; the bench scripts' options."""

import argparse
import importlib
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import types
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

import fastae
from fastae import __main__ as cli
from fastae import baselines
from fastae import benchmark as fb

CASES = ("sparse", "denoising", "contractive", "vae", "deep")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """``python -m fastae bench`` on a tiny CPU case (run in-process: its ``main``)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["bench", "--device", "cpu", "--size", "64x48x32", "--cases", ",".join(CASES)]
    argv += ["--providers", "eager,fastae,fastae_regenerate", "--rounds", "2", "--figures"]
    argv += ["--json", str(out)]
    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: one thread is fastest and steady on a busy machine
    try:
        with fastae.use_backend("reference"), redirect_stdout(stdout), redirect_stderr(stderr):
            assert cli.main(argv) == 0, stderr.getvalue()
    finally:
        torch.set_num_threads(threads)
    with open(out) as f:
        return stdout.getvalue(), fb.records_from_json(json.load(f))


def test_prints_ratio_table(bench_run):
    stdout, _ = bench_run
    lines = stdout.splitlines()
    header = lines[0].split()
    for column in ("case", "eager", "fastae", "vs"):
        assert column in header
    for case in CASES:
        row = next(line for line in lines if line.startswith(case))
        assert "64x48x32" in row and "fp32" in row
        # cells: case size dtype precision eager compile fastae, then fastae vs eager
        assert row.split()[7].endswith("x")  # e.g. "0.85x"
    # the legend says what the ratios hold, under the table (its line after the last row)
    legend = lines.index(fb.RATIO_LEGEND)
    assert legend > max(lines.index(next(x for x in lines if x.startswith(c))) for c in CASES)
    assert "their ms over fastae's (above 1: fastae is faster)" in lines[legend]
    # on the CPU fastae's ops run the reference's PyTorch code, and the run says so
    assert lines[legend + 1] == (
        "fastae's ops ran on: reference (its PyTorch code; the Triton kernels run on CUDA devices)"
    )


def test_the_backends_line_names_each_backend_of_fastaes_providers():
    records = [
        {"provider": "eager", "fastae_backends": {"encode": "ignored"}},
        {"provider": "fastae", "fastae_backends": {"encode": "triton", "corrupt": "reference"}},
        {"provider": fb.GEMM, "fastae_backends": {"encode": "triton"}},
    ]
    assert fb.backends_line(records) == "fastae's ops ran on: reference, triton"


def test_a_busy_host_is_warned_of(monkeypatch):
    monkeypatch.setattr(fb, "usable_cores", lambda: 2)
    monkeypatch.setattr(fb.os, "getloadavg", lambda: (5.0, 1.0, 1.0))
    assert fb._busy_host().startswith("warning: the host was busy (load average 5.0 on 2 cores)")
    monkeypatch.setattr(fb.os, "getloadavg", lambda: (1.5, 9.0, 9.0))
    assert fb._busy_host() is None


def test_json_needs_the_file_writable_where_it_exists_else_its_folder(monkeypatch, tmp_path):
    """As open(path, "w"): an existing file must be writable (its folder need not be: an
    existing file in a read-only folder, /dev/null), a new one needs its folder writable."""
    existing = tmp_path / "run.json"
    existing.write_text("")
    asked = []
    monkeypatch.setattr(fb.os, "access", lambda path, mode: asked.append(str(path)) or False)
    for path, checked in ((existing, existing), (tmp_path / "new.json", tmp_path)):
        with pytest.raises(ValueError, match=r"^--json .* is not writable"):
            fb.check_writable_file("--json", str(path))
        assert asked[-1] == str(checked)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--rounds", "0"], "--rounds must be a positive int, got 0"),
        (["--rounds", "-1"], "--rounds must be a positive int, got -1"),
        (["--cases", ""], "--cases must name at least one of"),
        (["--cases", "plain,nope"], "--cases must be among ('encode', "),
        (["--providers", ","], "--providers must name at least one of"),
        (["--dtype", ""], "--dtype must name at least one of"),
        (["--size", ""], "--size must look like BATCHxINPUTSxHIDDEN"),
        (["--device", "CPU"], "--device must be cpu or cuda"),
        (["--device", "mps"], "--device must be cpu or cuda"),
        (["--cases", "deep", "--size", "8x8x2"], "--size 8x8x2 for --cases deep: the deep step"),
        (["--size", "99999999999999999999x8x8"], "--size '99999999999999999999x8x8' makes a"),
        (
            ["--providers", "jacrev,fastae_graph", "--cases", "plain,vae"],
            "nothing to run on cpu: jacrev (plain, vae): the jacrev provider only computes the "
            "contractive step; fastae_graph (plain, vae): CUDA graphs need a CUDA device\n",
        ),
        (["--json", "NEW/sub/run.json"], "its folder 'NEW/sub' does not exist"),
        (["--json", "NEW"], "--json must name a file, got 'NEW'"),
        (["--json", ""], "--json must name a file, got ''"),
    ],
)
def test_bad_options_are_errors_before_any_timing(options, message, monkeypatch, tmp_path):
    monkeypatch.setattr(fb, "measure", lambda *args: pytest.fail("measured"))
    monkeypatch.chdir(tmp_path)  # NEW: a folder there
    (tmp_path / "NEW").mkdir()
    argv = ["bench", "--device", "cpu", "--cases", "plain", "--size", "8x8x8", *options]
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        assert cli.main(argv) == 2
    assert stderr.getvalue().startswith("error: ") and message in stderr.getvalue()


def test_a_backend_that_cannot_run_fastaes_providers_is_an_error(monkeypatch):
    monkeypatch.setattr(fb.backend, "triton_interpreting", lambda: False)
    argv = ["bench", "--device", "cpu", "--cases", "plain", "--size", "8x8x8", "--rounds", "1"]
    for requested, message in [
        ("triton", "error: the backend requested is 'triton', but "),
        ("cuda", "error: FASTAE_BACKEND must be one of ('auto', 'triton', 'reference'), got "),
    ]:
        monkeypatch.setenv("FASTAE_BACKEND", requested)
        monkeypatch.setattr(fb, "measure", lambda *args: pytest.fail("measured"))
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            assert cli.main(argv) == 2
        assert stderr.getvalue().startswith(message)
        monkeypatch.setattr(fb, "measure", lambda *args: [])  # eager alone needs no backend
        with redirect_stderr(io.StringIO()):
            assert cli.main([*argv, "--providers", "eager"]) == 0


def test_a_cuda_device_without_cuda_is_an_error_naming_it(monkeypatch):
    monkeypatch.setattr(fb, "measure", lambda *args: pytest.fail("measured"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        assert cli.main(["bench", "--device", "cuda:1", "--cases", "plain"]) == 2
    assert stderr.getvalue() == "error: --device cuda:1, but CUDA is not available\n"


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
    ],
)
def test_a_size_too_large_for_the_memory_is_an_error_naming_it(error, monkeypatch, tmp_path):
    """Reported after what was measured before it: its table and JSON."""
    calls = []

    def measure(case, providers, size, *args):
        calls.append(size)
        if len(calls) == 2:
            raise error
        return [{"provider": "fastae", "median_s": 1e-3}]

    monkeypatch.setattr(fb, "measure", measure)
    monkeypatch.setattr(fb, "ratio_table", lambda records: f"table of {len(records)}")
    monkeypatch.setattr(fb, "to_json", lambda records, conditions: {"records": len(records)})
    stdout, stderr, saved = io.StringIO(), io.StringIO(), tmp_path / "bench.json"
    with redirect_stdout(stdout), redirect_stderr(stderr):
        options = ["--cases", "plain", "--size", "8x4x2,9x4x2,10x4x2", "--json", str(saved)]
        assert cli.main(["bench", "--device", "cpu", *options]) == 2
    backends = "fastae's ops ran on: -"  # the stand-in records name none
    assert len(calls) == 2 and stdout.getvalue() == f"table of 1\n{fb.RATIO_LEGEND}\n{backends}\n"
    assert json.loads(saved.read_text()) == {"records": 1}
    first_line = str(error).splitlines()[0]
    assert stderr.getvalue().endswith(
        f"error: --size 9x4x2 does not fit in the memory of cpu (plain, fp32): {first_line}\n"
    )


def test_other_runtime_errors_are_not_taken_for_a_full_memory(monkeypatch):
    def measure(*args):
        raise RuntimeError("expected a 2-D tensor")

    monkeypatch.setattr(fb, "measure", measure)
    with redirect_stderr(io.StringIO()), pytest.raises(RuntimeError, match="2-D"):
        cli.main(["bench", "--device", "cpu", "--cases", "plain", "--size", "8x4x2"])


def test_a_cpu_index_is_the_cpu(monkeypatch):
    """``--device cpu:0`` takes the CPU's defaults (fp32, 256x784x1024), not CUDA's."""
    seen = []
    monkeypatch.setattr(fb, "measure", lambda *args: seen.append(args[2:5]) or [])
    monkeypatch.setattr(fb, "ratio_table", lambda records: "")
    with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
        assert cli.main(["bench", "--device", "cpu:0", "--cases", "plain"]) == 0
    assert seen == [(fb.Size(256, 784, 1024), "fp32", "cpu")]
    assert fb.parse_device("cuda:1") == "cuda:1" and fb.parse_device("cpu:3") == "cpu"


@pytest.mark.parametrize("text", ["0", "-2", "1.5", "x"])
def test_the_scripts_counts_are_positive_ints(text):
    """bench/host_time.py and bench/launch_time.py take --rounds and --calls by this type."""
    assert fb.positive_int("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match=f"must be a positive int, got '{text}'"):
        fb.positive_int(text)


def test_timed_calls_alternate_between_providers(monkeypatch):
    """The providers of a case take turns, one timed call each per round."""
    order = []
    timed = fb.Bench.timed  # every call, warm-up (run) and timed round alike
    monkeypatch.setattr(fb, "figures", lambda bench: {})
    monkeypatch.setattr(fb.Bench, "timed", lambda self: (order.append(self.provider), timed(self)))
    records = fb.measure("plain", ["eager", "fastae"], fb.Size.parse("8x16x16"), "fp32", "cpu", 3)
    assert [r["provider"] for r in records] == ["eager", "fastae"]
    assert [r["rounds"] for r in records] == [3, 3]
    warm_up = ["eager"] * 2 + ["fastae"] * 2  # two calls each (fastae's first autotunes)
    assert order == warm_up + ["eager", "fastae"] * 3  # then turns
    assert fb.measure("plain", [], fb.Size.parse("8x16x16"), "fp32", "cpu") == []


@pytest.mark.parametrize("case", ["plain", "all", "deep", "vae", "encode_stats"])
def test_cases_run_on_nonzero_biases(case):
    """Zero biases would hide a kernel that drops or misplaces them: every case's model has
    random ones, the same for every provider."""
    size = fb.Size.parse("8x16x16")
    eager, fast = (fb.build(case, p, size, "fp32", "cpu") for p in ("eager", "fastae"))
    assert eager.params and len(eager.params) == len(fast.params)
    for ours, theirs in zip(fast.params, eager.params, strict=True):
        assert torch.equal(ours, theirs)
        if ours.dim() == 1:
            assert ours.abs().min() > 0


def _records(bench_run) -> dict[tuple[str, str], dict]:
    _, records = bench_run
    return {(r["case"], r["provider"]): r for r in records}


@pytest.mark.parametrize("case", CASES)
def test_fastae_step_dispatches_fewer_ops(bench_run, case):
    records = _records(bench_run)
    eager, fast = records[(case, "eager")], records[(case, "fastae")]
    assert fast["median_s"] > 0 and eager["median_s"] > 0
    assert 0 < fast["aten_ops"] < eager["aten_ops"], (fast["ops_by_name"], eager["ops_by_name"])
    assert fast["fastae_ops"] >= 2 and eager["fastae_ops"] == 0


@pytest.mark.parametrize("case", CASES)
def test_fastae_step_saves_less_for_backward(bench_run, case):
    records = _records(bench_run)
    # with noise the default keeps x~, as eager does; the memory-free path is the one to compare
    fast = records[(case, fb.REGENERATE if case == "denoising" else "fastae")]
    eager = records[(case, "eager")]
    # the KL penalty keeps its gradient, an H-vector computed in forward (backward is then one
    # product): at this tiny size it can tip the balance of H-vectors against eager
    h_vectors = 2 * 4 * eager["hidden"]
    saved_less = eager["saved_bytes_beyond_inputs"] - fast["saved_bytes_beyond_inputs"]
    if case == "deep":
        # both keep each hidden layer's output and one (B, d) decoder tensor; the one node also
        # holds on to parameters (the first layer's weight, the biases): inputs, no memory
        assert saved_less == 0 and fast["saved_bytes"] > 0
        return
    assert 0 < fast["saved_bytes"] <= eager["saved_bytes"] + h_vectors
    if case == "sparse":
        # both keep h and one (B, d) decoder tensor; the rest are a few H-vectors either way
        assert saved_less >= -h_vectors
    elif case == "vae":
        # both keep each layer's input and output and one (B, d) decoder tensor; eager also
        # eps and exp(logvar / 2), (B, k) each, where fastae regenerates eps from its seed
        assert saved_less >= 2 * 4 * eager["batch"] * baselines.VAE_LATENT
    else:
        # eager also keeps the mask and x~ (denoising) or s and s^2 (contractive)
        assert saved_less >= 4 * eager["batch"] * min(eager["inputs"], eager["hidden"])


def test_regenerated_corrupted_input_provider(bench_run):
    """fastae_regenerate runs only the denoising case: it keeps one (B, d) tensor (x~) less
    for backward than fastae's default, and the ratio table gets its column."""
    stdout, records = bench_run
    regenerated = [r for r in records if r["provider"] == fb.REGENERATE]
    assert [r["case"] for r in regenerated] == ["denoising"]
    fast = _records(bench_run)[("denoising", "fastae")]
    assert regenerated[0]["env"]["FASTAE_CORRUPTED_INPUT"] == "regenerate"
    less = fast["saved_bytes_beyond_inputs"] - regenerated[0]["saved_bytes_beyond_inputs"]
    assert less == fast["batch"] * fast["inputs"] * 4  # x~ in fp32
    header = stdout.splitlines()[0].split()
    assert "regen/fastae" in header


def test_fastae_numbers_are_checked_against_the_reference(bench_run):
    """Each fastae provider's record holds its largest relative difference from the float64
    reference and the reference's own at the dtype (here the same code: equal, float32
    rounding), the figures table shows it, and the other providers have none."""
    stdout, records = bench_run
    for record in records:
        if record["provider"] in fb.VARIANTS:
            assert 0 < record["rel_diff_vs_reference"] < 1e-5 or record["case"] == "corrupt"
            assert record["rel_diff_vs_reference"] == record["reference_rel_diff"]
            assert record["beyond_rounding"] is False
        else:
            assert "rel_diff_vs_reference" not in record
    header = next(line for line in stdout.splitlines() if "saved MiB" in line)
    assert header.endswith("vs ref fastae  vs ref fastae_regenerate")


def test_graph_replays_show_no_op_count(bench_run):
    """A replayed CUDA graph's figures (aten_ops, saved bytes: None) show as '-', not 0."""
    _, records = bench_run
    eager = next(r for r in records if r["provider"] == "eager" and r["case"] == "sparse")
    replay = dict(eager, provider=fb.GRAPH, aten_ops=None, saved_bytes_beyond_inputs=None)
    *_, row = fb.figures_table([eager, replay]).splitlines()
    cells = row.split()
    assert cells[3:5] == [str(eager["aten_ops"]), "-"] and cells[-1] == "-"


def test_a_difference_beyond_rounding_is_marked(bench_run):
    _, records = bench_run
    record = next(r for r in records if r["provider"] == "fastae")
    assert not fb.figures_table([record]).endswith("!")
    wrong = dict(record, rel_diff_vs_reference=0.5, beyond_rounding=True)
    assert fb.figures_table([wrong]).endswith(" !")
    where = f"{record['case']} {record['size']} fp32 fastae"
    assert fb.agreement_line([record, wrong]) == (
        "numbers checked against the float64 reference: 2 calls, largest relative difference "
        f"{0.5:.1e} ({where}), 1 beyond rounding at their dtype"
    )
    # a record made before the float64 reference: its fixed limit
    old = {k: v for k, v in record.items() if k not in ("beyond_rounding", "reference_rel_diff")}
    limit = fb.AGREEMENT_LIMITS[record["dtype"]]
    assert not fb.beyond_rounding(dict(old, rel_diff_vs_reference=limit / 2))
    assert fb.beyond_rounding(dict(old, rel_diff_vs_reference=2 * limit))
    # and the line names what such records were compared with, apart from the float64 checks
    stale = dict(old, rel_diff_vs_reference=0.0)
    assert fb.agreement_line([record, stale]) == (
        "numbers checked against the float64 reference: 1 call, largest relative difference "
        f"{record['rel_diff_vs_reference']:.1e} ({where}), 0 beyond rounding at their dtype; "
        "numbers checked against the reference backend at their dtype: 1 call, largest "
        f"relative difference {0.0:.1e} ({where}), 0 beyond rounding at their dtype"
    )
    assert fb.agreement_line([]) == "numbers checked against the float64 reference: none"


# per case, the kernel function made to compute wrong numbers: (module, function)
BROKEN = {
    "encode_stats": ("encoder", "encode_forward"),
    "decode_loss": ("decoder", "decode_forward"),
    "corrupt": ("noise", "corrupt"),
    "reparameterize": ("vae", "reparameterize_forward"),
    "all": ("encoder", "encode_forward"),
    "vae": ("decoder", "decode_forward"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_agreement_of_the_kernels_with_the_reference(case, monkeypatch, kernel_device):
    """The triton backend (its interpreter here) against the reference, the noise and eps
    drawn from one seed: float32 rounding apart. A kernel whose first output is off by a
    factor of 2 shows as order 1."""
    pytest.importorskip("triton")
    module = importlib.import_module(f"fastae.kernels.{BROKEN[case][0]}")
    size = fb.Size.parse("16x32x16")
    with fastae.use_backend("triton"):
        checked = fb.agreement(fb.build(case, "fastae", size, device=kernel_device))
        assert checked["rel_diff_vs_reference"] < 1e-5 and not checked["beyond_rounding"]
        real = getattr(module, BROKEN[case][1])

        def doubled(*args, **kwargs):
            out = real(*args, **kwargs)
            return (2 * out[0], *out[1:]) if isinstance(out, tuple) else 2 * out

        monkeypatch.setattr(module, BROKEN[case][1], doubled)
        checked = fb.agreement(fb.build(case, "fastae", size, device=kernel_device))
        assert checked["rel_diff_vs_reference"] > 0.5 and checked["beyond_rounding"]


@pytest.mark.parametrize("dtype, error", [("fp32", 0.01), ("bf16", 0.15)])
def test_agreement_flags_an_error_in_one_gradient(dtype, error, monkeypatch, kernel_device):
    """A step whose encoder's weight gradient is off by 1% in float32 or 15% in bfloat16
    (tied: a third or so of the whole gradient's error) lies beyond rounding (a contractive
    term dropped moves the figures by about 2% at 4096x784->1024: seen in tf32 and float32,
    at the floor in bfloat16)."""
    pytest.importorskip("triton")
    from fastae.kernels import encoder

    real = encoder.encode_backward

    def off(*args, **kwargs):
        dw, *rest = real(*args, **kwargs)
        return (dw * (1 + error), *rest)

    size = fb.Size.parse("64x100x64")
    with fastae.use_backend("triton"):
        assert not fb.agreement(fb.build("contractive", "fastae", size, dtype, kernel_device))[
            "beyond_rounding"
        ]
        monkeypatch.setattr(encoder, "encode_backward", off)
        assert fb.agreement(fb.build("contractive", "fastae", size, dtype, kernel_device))[
            "beyond_rounding"
        ]


def test_agreement_counts_nan_as_the_largest_difference(monkeypatch, kernel_device):
    pytest.importorskip("triton")
    from fastae.kernels import encoder

    real = encoder.encode_forward

    def unwritten(*args, **kwargs):
        h, *rest = real(*args, **kwargs)
        return (torch.full_like(h, float("nan")), *rest)

    monkeypatch.setattr(encoder, "encode_forward", unwritten)
    with fastae.use_backend("triton"):
        bench = fb.build("encode", "fastae", fb.Size.parse("16x32x16"), device=kernel_device)
        assert fb.agreement(bench)["rel_diff_vs_reference"] == float("inf")


def _params(d=13, hidden=7, batch=5, seed=0):
    torch.manual_seed(seed)
    model = fastae.Autoencoder(d, hidden).double()
    torch.nn.init.normal_(model.bias)
    torch.nn.init.normal_(model.decoder_bias)
    x = torch.rand(batch, d, dtype=torch.float64)
    return x, model.weight.detach(), model.bias.detach(), model.decoder_bias.detach()


@pytest.mark.parametrize(
    ("step", "options"),
    [
        (baselines.plain_step, {}),
        (
            baselines.sparse_step,
            {"sparsity": fastae.KLSparsity(baselines.RHO, baselines.SPARSITY_WEIGHT)},
        ),
        (baselines.contractive_step, {"contractive": baselines.CONTRACTIVE}),
        (baselines.contractive_jacrev_step, {"contractive": baselines.CONTRACTIVE}),
    ],
)
def test_eager_baselines_compute_the_fastae_loss(step, options):
    x, W, b, c = _params()
    model = fastae.Autoencoder(x.shape[1], W.shape[0], **options).double()
    with torch.no_grad():
        model.weight.copy_(W), model.bias.copy_(b), model.decoder_bias.copy_(c)
    with fastae.use_backend("reference"):
        expected = model(x).loss
    torch.testing.assert_close(step(x, W, b, c), expected)


def test_eager_vae_step_computes_the_fastae_loss(monkeypatch):
    """baselines.vae_step is fastae.VAE's training loss: with fastae's eps in place of
    torch.randn_like, the same number."""
    torch.manual_seed(0)
    model = fastae.VAE(13, 7, baselines.VAE_LATENT).double()
    x = torch.rand(5, 13, dtype=torch.float64)
    eps = fastae.reference.standard_normal(4, 5, baselines.VAE_LATENT, x.device).double()
    monkeypatch.setattr(torch, "randn_like", lambda like: eps)
    with fastae.use_backend("reference"):
        expected = model(x, seed=4).loss
    params = [p.detach() for p in model.parameters()]
    torch.testing.assert_close(baselines.vae_step(x, *params), expected)


def test_eager_deep_step_computes_the_fastae_loss():
    """baselines.deep_step is fastae.DeepAutoencoder's training loss (ReLU, untied, BCE)."""
    torch.manual_seed(0)
    model = fastae.DeepAutoencoder(13, baselines.deep_sizes(8), tied=False).double()
    assert model.sizes == (8, 4, 2)
    x = torch.rand(5, 13, dtype=torch.float64)
    with fastae.use_backend("reference"):
        expected = model(x).loss
    params = [p.detach() for p in model.parameters()]
    torch.testing.assert_close(baselines.deep_step(x, *params), expected)
    with pytest.raises(ValueError, match="H must be at least 4, got 3"):
        baselines.deep_sizes(3)


def test_eager_ops_compute_the_fastae_ops():
    x, W, b, c = _params()
    with fastae.use_backend("reference"):
        h, rho_hat, jac = fastae.ops.encode(x, W, b)
        per_sample = fastae.ops.decode_loss(h, W.t(), c, target=x)
    for got, want in zip(baselines.encode_with_statistics(x, W, b), (h, rho_hat, jac), strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(baselines.decode_loss(h, W, c, x), per_sample)
    torch.testing.assert_close(baselines.contractive_penalty_jacrev(x, W, b), jac)
    kept = baselines.corrupt(torch.ones(200, 50)).mean().item()
    assert abs(kept - (1 - baselines.MASK_P)) < 0.05


@pytest.fixture
def warm_cache(monkeypatch):
    """bench/warm_cache.py as a module (on sys.path, so its pool's processes import it too)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    return importlib.import_module("warm_cache")


def test_warm_cache_jobs_follow_the_run_order(warm_cache):
    args = argparse.Namespace(
        device="cpu", sizes="32x24x16,64x24x16", dtypes="fp32,bf16",
        providers="compile,fastae,fastae_gemm,fastae_split,fastae_regenerate",
    )  # fmt: skip
    jobs = warm_cache.jobs(args)
    fastae_jobs = [job for job in jobs if job[2] != ("compile",)]
    assert [(case, dtype) for case, dtype, *_ in fastae_jobs] == [
        (case, dtype) for dtype in ("fp32", "bf16") for case in fb.CASE_ORDER
    ]
    providers = {case: job_providers for case, _, job_providers, _, _ in fastae_jobs}
    assert providers["all"] == ("fastae", "fastae_gemm", "fastae_split", "fastae_regenerate")
    assert providers["encode"] == ("fastae", "fastae_gemm", "fastae_split")
    assert providers["decode_loss"] == ("fastae", "fastae_gemm", "fastae_split")
    assert providers["corrupt"] == ("fastae",)
    assert len(jobs) - len(fastae_jobs) == 2 * len(fb.CASES)
    assert all(job[3] == (fb.Size(32, 24, 16), fb.Size(64, 24, 16)) for job in jobs)


def test_warm_cache_runs_every_job(warm_cache, monkeypatch, capsys):
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTAE_BACKEND", "triton")  # on the GPU, or interpreted on the CPU
    device = "cuda" if torch.cuda.is_available() else "cpu"
    argv = ["--fastae-device", device, "--fastae-sizes", "16x12x8", "--fastae-dtypes", "fp32"]
    argv += ["--fastae-providers", "fastae", "--workers", "1", "--benchmark-only"]
    assert warm_cache.main(argv) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out
    done = [line.split("] ", 1)[1] for line in out.splitlines() if " fastae: " in line]
    assert sorted(line.split()[0] for line in done) == sorted(fb.CASES)


def _event(name: str, us: float, on_gpu: bool = True):
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    device = DeviceType.CUDA if on_gpu else DeviceType.CPU
    span = SimpleNamespace(elapsed_us=lambda: us)
    return SimpleNamespace(name=name, device_type=device, time_range=span)


def test_kernel_table_averages_the_profiled_calls():
    calls = 3
    events = []
    for _ in range(calls):
        events += [_event("gemm", 10.0), _event("stats", 4.0), _event("stats", 3.0)]
        events += [_event("Memset (Device)", 50.0), _event("aten::mm", 99.0, on_gpu=False)]
    table = fb.kernel_table(events, calls)
    assert table["kernel_launches"] == 3
    assert table["kernel_time_us"] == pytest.approx(17.0)
    assert table["kernels"] == [["gemm", 1.0, pytest.approx(10.0)], ["stats", 2.0, 7.0]]
    assert table["copies"] == 1 and table["copy_time_us"] == pytest.approx(50.0)


def _summarize(records, folder, monkeypatch, conditions=None) -> str:
    """SUMMARY.md of ``bench/summarize.py`` run on ``records`` (``conditions``: the run's)."""
    path = folder / "bench.json"
    path.write_text(json.dumps(fb.to_json(records, conditions)))
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    summarize = importlib.import_module("summarize")
    with redirect_stdout(io.StringIO()):
        assert summarize.main([str(path), "--out", str(folder)]) == 0
    return (folder / "SUMMARY.md").read_text()


def test_summary_shows_where_the_gpu_time_goes(bench_run, tmp_path, monkeypatch):
    _, records = bench_run
    profiled = []
    for record in records:
        record = dict(record, device_name="Some GPU")
        if record["case"] == "sparse":
            busy_us = record["median_s"] * 1e6 / 2  # busy half of the wall time
            kernels = [["a_long_kernel_name_" * 4, 2.0, busy_us * 0.75], ["k", 1.0, busy_us / 4]]
            record.update(kernel_launches=3, kernel_time_us=busy_us * 0.9, kernels=kernels)
            record.update(copies=1, copy_time_us=busy_us * 0.1)  # busy: kernels and copies
        profiled.append(record)
    summary = _summarize(profiled, tmp_path, monkeypatch)
    section = summary.split("### Where the GPU time goes", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| sparse")]
    assert {row.split(" | ")[3] for row in rows} == {"eager", "fastae"}
    cells = rows[0].split(" | ")
    assert cells[6] == "50%" and cells[7] == "3" and cells[8] == "1"
    assert cells[9].startswith("a_long_kernel_name_a_long_kernel_name_a_long_...")
    assert "(x2)" in cells[9] and "; k " in cells[9]
    assert "| denoising" not in section  # no profile, no row


def _load_summarize(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    return importlib.import_module("summarize")


def test_summary_marks_ratios_across_runs(bench_run, tmp_path, monkeypatch):
    """Ratios are side by side within one run: where two files hold one case's providers,
    the ratio between them is marked and the note says why."""
    _, records = bench_run
    sparse = [r for r in records if r["case"] == "sparse"]
    fastae_run = [r for r in sparse if r["provider"] == "fastae"]
    eager_run = [r for r in sparse if r["provider"] == "eager"]
    paths = []
    for name, part in (("one.json", fastae_run), ("two.json", eager_run)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(fb.to_json(part, None)))
    summarize = _load_summarize(monkeypatch)
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        assert summarize.main([*map(str, paths), "--out", str(tmp_path / "out")]) == 0
    # the compact ratio table, printed last
    row = [line for line in stdout.getvalue().splitlines() if line.startswith("sparse")][-1]
    assert row.split()[7].endswith("x*")  # vs eager
    assert fb.ACROSS_RUNS_NOTE in stdout.getvalue()
    assert fb.ACROSS_RUNS_NOTE in (tmp_path / "out" / "SUMMARY.md").read_text()
    # one file: no mark, no note
    both = tmp_path / "both.json"
    both.write_text(json.dumps(fb.to_json(sparse, None)))
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        assert summarize.main([str(both), "--out", str(tmp_path / "out")]) == 0
    assert "x*" not in stdout.getvalue() and fb.ACROSS_RUNS_NOTE not in stdout.getvalue()


def test_summarize_names_a_bad_input_file(bench_run, tmp_path, monkeypatch, capsys):
    _, records = bench_run
    good = tmp_path / "good.json"
    good.write_text(json.dumps(fb.to_json(records[:2], None)))
    summarize = _load_summarize(monkeypatch)
    no_provider = {"benchmarks": [{"extra_info": {"case": "plain"}, "stats": {"median": 1.0}}]}
    bad = {
        "{not json": "Expecting property name",
        "[1, 2]": "not the JSON of a benchmark run",
        '{"benchmarks": [1]}': "not the JSON of a benchmark run",
        '{"benchmarks": [{}, 1]}': "not the JSON of a benchmark run",
        "{}": "not the JSON of a benchmark run",  # another program's JSON object
        '{"benchmarks": [{"name": "other"}]}': "no fastae benchmark record",  # another suite's
        json.dumps(no_provider): "a record of case 'plain' has no provider",
    }
    for text, says in bad.items():
        path = tmp_path / "bad.json"
        path.write_text(text)
        with pytest.raises(SystemExit) as exit_:
            summarize.main([str(good), str(path), "--out", str(tmp_path / "out")])
        assert exit_.value.code == 2
        assert f"error: json: {path}: {says}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        summarize.main([str(good), str(tmp_path / "missing.json")])
    assert f"json: no such file: {tmp_path / 'missing.json'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        summarize.main([str(good), "--out", str(good)])
    assert f"--out {good} is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written on any refusal


def test_summary_lists_the_run_conditions(bench_run, tmp_path, monkeypatch):
    _, records = bench_run
    assert "torch threads" not in _summarize(records, tmp_path, monkeypatch)
    conditions = {"torch_threads": 2, "load_average": [1.5, 0.75, 0.5]}
    conditions.update(launch_us_before_profiling=4.5, launch_us_at_end=6.5)
    summary = _summarize(records, tmp_path, monkeypatch, conditions)
    assert (
        "- bench.json: 2 torch threads, load average 1.5 / 0.75 / 0.5 (1, 5, 15 minutes, at the "
        "end), a kernel launch 4.5 us before the first profile, 6.5 us at the end\n"
    ) in summary


def test_summary_of_a_run_without_eager_or_compile(bench_run, tmp_path, monkeypatch):
    _, records = bench_run
    fastae_only = [r for r in records if r["provider"].startswith("fastae")]
    assert "| sparse |" in _summarize(fastae_only, tmp_path, monkeypatch)


# bench/host_time.py runs the triton backend on CPU tensors, its kernels stubbed: a tool of
# Triton's interpreter (importing it sets TRITON_INTERPRET, for the rest of the process)
HOST_TIME = pytest.mark.skipif(
    not fastae.backend.triton_interpreting(), reason="host_time needs Triton's interpreter"
)


def _stubbed_host_time(monkeypatch):
    """bench/host_time.py imported with every kernel stubbed: (the module, its stubbed kernels'
    names, the list each stubbed launch's grid is appended to)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    host_time = importlib.import_module("host_time")
    names = host_time.stub_kernels(monkeypatch.setattr)
    launched = []
    stub_launch = host_time._StubKernel.__getitem__

    def counted(self, grid):
        launched.append(grid)
        return stub_launch(self, grid)

    monkeypatch.setattr(host_time._StubKernel, "__getitem__", counted)
    return host_time, names, launched


@HOST_TIME
@pytest.mark.parametrize("size", [fb.Size(4, 6, 5), fb.Size(8, 16, 16)], ids=str)
@pytest.mark.parametrize("case", ["all", "vae"])
def test_host_time_stubs_every_launch(monkeypatch, size, case):
    """bench/host_time.py: with every kernel stubbed, a full training step (the autoencoder's
    with all three regularizers, the VAE's) on the triton backend runs through the stubs (its
    outputs unwritten) and is timed; d and H multiples of 16 take the fused GEMMs (their
    split-K weight gradients among them), others the split boundary."""
    host_time, names, launched = _stubbed_host_time(monkeypatch)
    assert {"_encoder_forward_kernel", "_decoder_loss_kernel", "_corrupt_kernel"} <= set(names)
    with fastae.use_backend("triton"):
        best, median = host_time.time_case(fb.build(case, "fastae", size), 1, 2)
    assert 0 < best <= median
    assert launched  # the stubs stood in for the launches


@HOST_TIME
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_host_time_routes_take_turns_and_restore_the_default(monkeypatch, backend):
    """bench/host_time.py --routes: the dispatcher, the eager route with the ops composed and
    the one-node step, each timed every round, with the kernels stubbed or on the reference
    backend (which launches none); afterwards the default path is back."""
    from fastae import ops, steps

    host_time, _, launched = _stubbed_host_time(monkeypatch)
    plain_eager = ops._plain_eager
    means = host_time.time_routes("all", fb.Size(8, 16, 16), 2, 3, backend)
    assert bool(launched) == (backend == "triton")
    assert list(means) == [
        "dispatcher, ops composed", "eager route, ops composed", "eager route, one node"
    ]  # fmt: skip
    assert all(len(m) == 2 and min(m) > 0 for m in means.values())
    assert ops._plain_eager is plain_eager and steps.ONE_NODE_STEP


@HOST_TIME
def test_host_time_of_deep_models(monkeypatch):
    """bench/host_time.py --deep: each deep model's step as one node and as the ops
    composed, timed every round; afterwards the one node is the default again."""
    from fastae import steps

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    host_time = importlib.import_module("host_time")
    host_time.stub_kernels(monkeypatch.setattr)
    results = host_time.time_deep(2, 1)
    assert list(results) == list(host_time.DEEP_MODELS)
    for means in results.values():
        assert list(means) == ["one node", "ops composed"]
        assert all(len(m) == 2 and min(m) > 0 for m in means.values())
    assert steps.ONE_NODE_STEP


def test_optimizer_time_compares_fits_adam_with_the_single_tensor_one(monkeypatch):
    """bench/optimizer_time.py: both optimizers timed on every parameter set and in a
    detector's fit; afterwards fit builds its own default Adam again."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    optimizer_time = importlib.import_module("optimizer_time")
    default = fastae.training.default_optimizer
    shapes = optimizer_time.PARAMETER_SETS["64 -> 32 tied layer (W, b, c)"]
    times = optimizer_time.update_times(shapes, 1, 2)
    assert list(times) == ["fit's default", "single-tensor"] and min(times.values()) > 0
    single = optimizer_time.single_tensor_adam(torch.nn.Linear(3, 2), 1e-3)
    assert not single.param_groups[0]["fused"] and not single.param_groups[0]["foreach"]
    seconds = optimizer_time.detector_fit_seconds(1, epochs=1)
    assert list(seconds) == list(times) and min(seconds.values()) > 0
    assert fastae.training.default_optimizer is default
    assert fastae.sklearn.default_optimizer is default


def test_triton_launch_provider(bench_run):
    """fastae_triton_launch: fastae with FASTAE_DIRECT_LAUNCH=0, on CUDA only; its column in
    the ratio table is tlaunch/fastae (fastae's time through Triton's launch path over its
    time through the direct one)."""
    assert fb.unavailable(fb.TRITON_LAUNCH, "cpu", "all")
    assert fb.VARIANTS[fb.TRITON_LAUNCH][1]["FASTAE_DIRECT_LAUNCH"] == "0"
    # fastae launches directly unless the process says otherwise (gpu_check.sh's fallback)
    direct = os.environ.get("FASTAE_DIRECT_LAUNCH", "1")
    assert all(fb.VARIANTS[p][1]["FASTAE_DIRECT_LAUNCH"] == direct for p in ("fastae", fb.GEMM))
    _, records = bench_run
    fast = next(r for r in records if r["provider"] == "fastae" and r["case"] == "sparse")
    slow = dict(fast, provider=fb.TRITON_LAUNCH, median_s=3 * fast["median_s"])
    header, *_, row = fb.ratio_table([fast, slow]).splitlines()
    assert "tlaunch ms" in header and "tlaunch/fastae" in header
    assert "3x" in row.split()


def _ms(record):
    return f"{record['median_s'] * 1e3:.3f}"


def test_cuda_graph_providers(bench_run):
    """fastae_graph and compile_graph: CUDA only, training steps only; the ratio
    table shows eager over fastae_graph and compile_graph over fastae_graph."""
    for provider in fb.GRAPH_PROVIDERS:
        assert "CUDA" in fb.unavailable(provider, "cpu", "plain")
        if torch.cuda.is_available():
            assert fb.unavailable(provider, "cuda", "all") is None
            assert "training step" in fb.unavailable(provider, "cuda", "encode")
    _, records = bench_run
    eager = next(r for r in records if r["provider"] == "eager" and r["case"] == "sparse")
    graph = dict(eager, provider=fb.GRAPH, median_s=eager["median_s"] / 4)
    compiled = dict(eager, provider=fb.COMPILE_GRAPH, median_s=eager["median_s"] / 2)
    header, *_, row = fb.ratio_table([eager, graph, compiled]).splitlines()
    assert header.split()[-6:] == ["graph", "ms", "eager/graph", "cgraph", "ms", "cgraph/graph"]
    assert row.split()[-4:] == [_ms(graph), "4x", _ms(compiled), "2x"]


@pytest.mark.skipif(not fastae.backend.triton_available(), reason="needs Triton")
def test_kernel_times_variants_run(monkeypatch):
    """bench/kernel_times.py (CUDA only): each variant it times runs (here interpreted on
    the CPU at a tiny size), and its pairs differ only in what they name."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    for name in ("FASTAE_ENCODER_FUSION", "FASTAE_DECODER_FUSION"):
        monkeypatch.setenv(name, "gemm")  # as its main sets them (its split variants reset them)
    kernel_times = importlib.import_module("kernel_times")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = kernel_times.variants(fb.Size(5, 7, 6), torch.float32, device)
    results = {name: call() for name, call in calls.items()}
    with_stats, h_only = results["encode forward, statistics"], results["encode forward, h only"]
    torch.testing.assert_close(with_stats[0], h_only[0])
    assert h_only[1].numel() == 0
    per_sample = results["decode backward, per-sample weight"]
    uniform = results["decode backward, uniform weight"]
    for a, b in zip(per_sample, uniform, strict=True):
        torch.testing.assert_close(a, b)
    pairs = [("encode backward (dz, dW, db)", "encode backward, split-K off")]
    pairs += [("encode backward (dz, dW, db)", "encode backward, split (cuBLAS dW)")]
    pairs += [("decode backward (dV, dc), uniform", "decode backward (dV, dc), split-K off")]
    pairs += [("decode backward (dV, dc), uniform", "decode backward (dV, dc), split")]
    for autotuned, unsplit in pairs:
        for a, b in zip(results[autotuned], results[unsplit], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)


@pytest.mark.skipif(not fastae.backend.triton_available(), reason="needs Triton")
@pytest.mark.parametrize("parts, hidden, block", [(3, 40, 32), (5, 100, 16)])
def test_kernel_times_finish_call_computes_the_statistics(monkeypatch, parts, hidden, block):
    """bench/kernel_times.py --finish times a launch that computes rho_hat, c and jac from the
    partial sums, and again on a second call (its ticket zeroed before each)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    kernel_times = importlib.import_module("kernel_times")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    part_h, part_s2 = torch.rand(2, parts, hidden, device=device).unbind()
    sq_norm = torch.rand(hidden, device=device)
    call, (rho_hat, c, jac) = kernel_times.finish_call(part_h, part_s2, sq_norm, block)
    batch = parts * 128
    for _ in range(2):
        jac.fill_(float("nan"))
        call()
        torch.testing.assert_close(rho_hat, part_h.sum(0) / batch)
        torch.testing.assert_close(c, part_s2.sum(0))
        torch.testing.assert_close(jac, (part_s2.sum(0) * sq_norm).sum(0, keepdim=True) / batch)


@pytest.mark.skipif(not fastae.backend.triton_available(), reason="needs Triton")
def test_kernel_times_finish_sweep_prints_a_line_per_launch(monkeypatch, capsys):
    """bench/kernel_times.py --finish: one line per (parts, H, block) with its time and the
    bytes read over it (the timer replaced by one call of a fixed 2 us)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    kernel_times = importlib.import_module("kernel_times")
    monkeypatch.setattr(kernel_times, "FINISH_PARTS", (3, 5))
    monkeypatch.setattr(kernel_times, "FINISH_HIDDEN", (40,))
    monkeypatch.setattr(kernel_times, "FINISH_BLOCKS", (32, 16))
    monkeypatch.setattr(kernel_times, "do_bench", lambda fn, **kwargs: (fn(), 0.002)[1])
    kernel_times.finish_times("cuda" if torch.cuda.is_available() else "cpu")
    lines = capsys.readouterr().out.splitlines()
    assert [re.findall(r"(\w+)=\s*(\d+)", line) for line in lines] == [
        [("parts", str(parts)), ("H", "40"), ("block", str(block))]
        for parts in (3, 5)
        for block in (32, 16)
    ]
    # 2 x parts x 40 float32 read in 2 us
    assert [float(line.split()[-2]) for line in lines] == [0.5, 0.5, 0.8, 0.8]


@pytest.fixture
def peers(monkeypatch):
    """bench/peers.py as a module, as if PyOD and Keras were not installed."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    for name in ("pyod", "keras"):
        monkeypatch.setitem(sys.modules, name, None)  # their import raises ImportError
    return importlib.import_module("peers")


def test_peers_report_each_detectors_auroc_of_its_anomaly_scores(peers, tmp_path, monkeypatch):
    from sklearn.ensemble import IsolationForest
    from sklearn.metrics import roc_auc_score

    monkeypatch.setattr(peers, "PYOD_VAE_EPOCHS", 2)
    results = peers.run(seeds=[0], held_out=[1], epochs=2, pyod=False)
    deep = "fastae deep (PyOD's 64-32 ReLU, standardized)"
    vae = "fastae VAE (PyOD's 128-64-32, latent 2, 2 epochs)"
    streamed = "fastae plain, streamed (partial_fit, chunks of 256, 2 passes)"
    rows = {"fastae plain", "fastae denoising (30% masking)", streamed, deep, vae}
    rows.add("IsolationForest")
    assert {row for _, row in results} == rows
    assert {task for task, _ in results} == {"digits", "cancer"}
    task, normal, test, anomaly = next(peers.tasks(0, [1]))
    assert task == "digits" and normal.shape[1] == test.shape[1] == 64
    assert (anomaly.sum(), len(anomaly)) == (46, 450)  # the 1s in the stratified test split
    forest = -IsolationForest(random_state=0).fit(normal).score_samples(test)
    detector = fastae.AutoencoderOutlierDetector(
        32, scale=None, epochs=2, batch_size=64, lr=1e-2, random_state=0
    ).fit(normal)
    deep_detector = fastae.AutoencoderOutlierDetector(
        32, hidden_layer_sizes=(64,), activation="relu", epochs=2, batch_size=64, lr=1e-2,
        random_state=0,
    ).fit(normal)  # fmt: skip
    assert deep_detector.module_.sizes == (64, 32)
    vae_detector = fastae.AutoencoderOutlierDetector(
        2, model="vae", hidden=(128, 64, 32), activation="relu", epochs=2, batch_size=32,
        lr=1e-3, random_state=0,
    ).fit(normal)  # fmt: skip
    streamed_detector = fastae.AutoencoderOutlierDetector(
        32, scale=None, batch_size=64, lr=1e-2, random_state=0
    )
    for _ in range(2):
        for start in range(0, len(normal), 256):
            streamed_detector.partial_fit(normal[start : start + 256])
    assert streamed_detector.n_iter_ == 2 * -(-len(normal) // 256)
    for row, scores in [
        ("IsolationForest", forest),
        (streamed, -streamed_detector.score_samples(test)),
        ("fastae plain", -detector.score_samples(test)),
        (deep, -deep_detector.score_samples(test)),
        (vae, -vae_detector.score_samples(test)),
    ]:
        auroc = results[("digits", row)]["auroc"]
        assert auroc == [pytest.approx(roc_auc_score(anomaly, scores))]
        assert auroc[0] > 0.5  # anomalies score higher
    out = tmp_path / "peers.md"
    with redirect_stdout(io.StringIO()) as printed:
        peers.main(
            ["--seeds", "0", "--digits", "1", "--epochs", "2", "--keras-epochs", "1", "--out",
             str(out)]
        )  # fmt: skip
    assert "PyOD not installed" in printed.getvalue()
    assert "Keras not installed" in printed.getvalue()
    assert out.read_text() == printed.getvalue()
    assert "| fastae denoising (30% masking) | 0." in out.read_text()
    assert "| denoising | - | " in out.read_text()


def test_peers_training_scores_reconstructions_by_binary_cross_entropy(peers):
    results = peers.training(seeds=[0], epochs=1, keras=False)
    assert set(results) == {(kind, "fastae") for kind in ("plain", "sparse", "denoising", "deep")}
    x_tr, x_te = peers.upsampled_digits(0)
    assert x_tr.shape == (1347, 784) and x_te.shape == (450, 784)
    assert x_te.min() >= 0 and x_te.max() <= 1 and x_te.std() > 0.1
    torch.manual_seed(0)
    model = fastae.Autoencoder(784, 32, activation="relu", tied=False)
    fastae.fit(
        model, torch.from_numpy(x_tr), epochs=1, batch_size=256, lr=1e-3, seed=0, progress=False
    )
    with torch.no_grad():
        probabilities = model.reconstruct(torch.from_numpy(x_te)).double().clamp(1e-7, 1 - 1e-7)
        target = torch.from_numpy(x_te).double()
        summed = torch.nn.functional.binary_cross_entropy(probabilities, target, reduction="sum")
    assert results[("plain", "fastae")]["test_bce"] == [pytest.approx(float(summed) / 450)]


def test_peers_streaming_scores_reconstructions_of_chunked_training(peers):
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA, IncrementalPCA
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    results = peers.streaming(seeds=[0], passes=2)
    names = [
        "IncrementalPCA, partial_fit (1 pass)",
        "fastae transformer, partial_fit (2 passes)",
        "fastae transformer, fit in memory (2 epochs)",
        "fastae transformer, untied, fit in memory (2 epochs)",
        "fastae transformer, squared error, tanh, fit in memory (2 epochs)",
        "PCA on standardized pixels",
        "fastae transformer, its defaults (standardized), fit in memory (2 epochs)",
        "fastae transformer, its defaults but untied, fit in memory (2 epochs)",
    ]
    assert list(results) == names
    x_tr, x_te = train_test_split(load_digits().data / 16.0, test_size=0.25, random_state=0)
    pca = IncrementalPCA(32)
    streamed = fastae.AutoencoderTransformer(32, scale=None, random_state=0)
    for model, passes in ((pca, 1), (streamed, 2)):
        for _ in range(passes):
            for start in range(0, len(x_tr), 256):
                model.partial_fit(x_tr[start : start + 256])
    assert streamed.n_iter_ == 2 * 6  # 1347 rows: 6 chunks a pass
    untied = fastae.AutoencoderTransformer(32, scale=None, random_state=0, epochs=2, tied=False)
    squared = fastae.AutoencoderTransformer(
        32, scale=None, random_state=0, epochs=2, loss="mse", activation="tanh"
    )
    standardized = make_pipeline(StandardScaler(), PCA(32, random_state=0))
    defaults = fastae.AutoencoderTransformer(32, random_state=0, epochs=2)
    defaults_untied = fastae.AutoencoderTransformer(32, random_state=0, epochs=2, tied=False)
    for model in (untied, squared, standardized, defaults, defaults_untied):
        model.fit(x_tr)
    assert not untied.module_.tied and squared.loss_ == "mse" and defaults.loss_ == "mse"
    models = (pca, streamed, None, untied, squared, standardized, defaults, defaults_untied)
    for name, model in zip(names, models, strict=True):
        if model is None:  # fit in memory, tied: the streamed model's settings
            continue
        error = np.square(model.inverse_transform(model.transform(x_te)) - x_te).sum(1).mean()
        assert results[name]["test_error"] == [pytest.approx(error)]
    assert 0 < results[names[0]]["test_error"][0] < results[names[2]]["test_error"][0]
    assert "| fastae transformer, partial_fit (2 passes) | " in peers.streaming_table(results)


def test_a_case_of_two_runs_is_warned_about():
    """Two runs' records of one case on one card would make a row of mixed runs: the later
    record is kept and the summary says so."""
    ident = dict(device_name="card", case="plain", size="8x4x2", dtype="fp32")
    first = dict(ident, provider="fastae", median_s=2.0)
    later = dict(ident, provider="fastae", median_s=1.0)
    eager = dict(ident, provider="eager", median_s=3.0)
    with pytest.warns(UserWarning, match=r"^two records of provider 'fastae' for \('card'"):
        (row,) = fb.group_rows([first, eager, later])
    assert row["providers"]["fastae"] is later and fb.speedup(row, "eager") == 3.0


def test_the_figures_come_after_the_timed_calls(monkeypatch):
    """The figures profile a call (on CUDA the profiler's tracing may slow the launches after
    it): measure times every provider first."""
    events = []
    monkeypatch.setattr(fb, "figures", lambda bench: events.append("figures") or {})
    timed = fb.time_calls
    monkeypatch.setattr(fb, "time_calls", lambda *a: events.append("timed") or timed(*a))
    fb.measure("plain", ["eager", "fastae"], fb.Size.parse("8x16x16"), "fp32", "cpu", 2)
    assert events == ["timed"] * 4 + ["figures"] * 2


def test_the_cache_is_flushed_between_rounds_on_cuda_only(monkeypatch):
    """Each timed round on CUDA starts with the L2 cache evicted, untimed; the CPU has none
    to flush."""
    assert fb.cache_flush("cpu") is None
    flushes = []
    monkeypatch.setattr(fb, "cache_flush", lambda device: lambda: flushes.append(device))
    monkeypatch.setattr(fb, "figures", lambda bench: {})
    fb.measure("plain", ["eager", "fastae"], fb.Size.parse("8x16x16"), "fp32", "cpu", 3)
    assert len(flushes) == 6  # before each timed call of each provider


@pytest.mark.cuda
def test_the_cache_flush_keeps_one_buffer_for_every_round():
    flush = fb.cache_flush("cuda")
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(3):
        flush()
    # the buffer made once is written each time, no allocation per call
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before


def test_the_compact_ratio_table_keeps_eager_compile_and_fastae(bench_run):
    """summarize.py prints it last (a log's tail keeps it): the providers beside fastae's own
    variants and the CUDA graphs left out."""
    _, records = bench_run
    eager = next(r for r in records if r["provider"] == "eager" and r["case"] == "sparse")
    fast = next(r for r in records if r["provider"] == "fastae" and r["case"] == "sparse")
    graph = dict(eager, provider=fb.GRAPH, median_s=eager["median_s"] / 4)
    regenerated = dict(fast, provider=fb.REGENERATE, median_s=2 * fast["median_s"])
    group = [eager, fast, graph, regenerated]
    full = fb.ratio_table(group)
    header, row = fb.ratio_table(group, compact=True).splitlines()
    assert "graph ms" in full and "regen ms" in full
    columns = "case size dtype precision eager ms compile ms fastae ms vs eager vs compile"
    assert header.split() == columns.split()
    assert row.split()[-5:-2] == [_ms(eager), "-", _ms(fast)]


def test_the_run_conditions_join_the_json():
    """Threads and load averages (CPU timings swing with them); the launch probe (before the
    first profile and at the end) on CUDA only."""
    assert fb.launch_probe("cpu") is None
    conditions = fb.run_conditions("cpu", None)
    assert conditions["torch_threads"] == torch.get_num_threads()
    assert len(conditions["load_average"]) == 3 and min(conditions["load_average"]) >= 0
    assert "launch_us_at_end" not in conditions
    info = fb.to_json([], conditions)["machine_info"]
    assert info["torch"] == torch.__version__ and info["torch_threads"] == torch.get_num_threads()


@pytest.mark.cuda
def test_the_launch_probe_times_a_launch_on_cuda():
    before = fb.launch_probe("cuda")
    conditions = fb.run_conditions("cuda", before)
    assert 0 < before < 1e3 and 0 < conditions["launch_us_at_end"] < 1e3
    assert conditions["launch_us_before_profiling"] == before


# ----------------------------------------------------------------------------- the scripts' options


def _bench_script(monkeypatch, name: str):
    """bench/<name>.py as a module."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    return importlib.import_module(name)


def _usage_error(main, argv: list[str], capsys) -> str:
    """What ``main(argv)`` wrote to stderr, exiting as argparse does on a bad option (2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--sizez", "8x16x16"], "error: unrecognized arguments: --sizez\n"),
        (["--fastae-sizes-typo", "8x16x16"], "error: unrecognized arguments: --fastae-sizes-typo"),
        (["--providers", "bogus"], "--providers must be among ('eager', "),
        (["--workers", "0"], "argument --workers: must be a positive int, got '0'"),
        (["--sizes", "0x8x8"], "--sizes must look like BATCHxINPUTSxHIDDEN"),
        (["--fastae-dtypes", "fp64"], "--dtypes must be among ('fp32', 'tf32', 'bf16')"),
        (["--budget-s", "0"], "--budget-s must be a positive number of seconds, got 0"),
        (["--device", "gpu"], "--device must be cpu or cuda[:N], got 'gpu'"),
        (["--fastae-device", "cuda"], "--device cuda, but CUDA is not available"),
    ],
)
def test_warm_cache_refuses_bad_options_before_warming(
    warm_cache, monkeypatch, capsys, options, message
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(warm_cache.multiprocessing, "get_context", lambda *a: pytest.fail("ran"))
    argv = ["--device", "cpu", "--sizes", "8x16x16", "--providers", "fastae", *options]
    assert message in _usage_error(warm_cache.main, argv, capsys)


def test_warm_cache_reads_the_suites_options_and_ignores_pytests(warm_cache, capsys):
    """bench/gpu_check.sh passes its BENCH_ARGS, the suite's options, to both."""
    argv = ["--fastae-device", "cpu", "--fastae-sizes", "8x16x16", "--fastae-dtypes", "fp32"]
    argv += ["--fastae-providers", "eager,floor", "--fastae-budget-s", "30", "--benchmark-only"]
    argv += ["--benchmark-json=out.json", "-k", "not (deep or vae)", "-q", "-p", "no:cacheprovider"]
    argv += ["--maxfail", "2", "--fastae-compile-cases", "steps"]
    assert warm_cache.main(argv) == 0
    assert capsys.readouterr().out == "nothing to warm: none of the providers compiles on cpu\n"


def test_warm_cache_compiles_the_cases_the_suite_compiles(warm_cache):
    args = argparse.Namespace(device="cpu", sizes="8x16x16", dtypes="fp32", providers="compile")
    for scope, cases in ((None, fb.CASES), ("all", fb.CASES), ("steps", fb.STEPS), ("none", ())):
        args.compile_cases = scope
        assert sorted(case for case, *_ in warm_cache.jobs(args)) == sorted(cases)


@pytest.fixture
def bench_conftest():
    """bench/conftest.py as a plain module (its helpers called directly)."""
    path = Path(__file__).parents[1] / "bench" / "conftest.py"
    spec = importlib.util.spec_from_file_location("bench_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _options(**values):
    """A stand-in for pytest's config with these ``--fastae-*`` options (fastae_device=...)."""
    names = {"--" + name.replace("_", "-"): value for name, value in values.items()}
    return argparse.Namespace(getoption=names.get)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("fastae_device", "gpu", "--fastae-device must be cpu or cuda[:N], got 'gpu'"),
        ("fastae_sizes", "0x8x8", "--fastae-sizes must look like BATCHxINPUTSxHIDDEN"),
        ("fastae_dtypes", "fp64", "--fastae-dtypes must be among ('fp32', 'tf32', 'bf16')"),
        ("fastae_providers", "bogus", "--fastae-providers must be among ('eager', "),
        ("fastae_budget_s", -1.0, "--fastae-budget-s must be a positive number, got -1"),
        ("fastae_budget_s", 0.0, "--fastae-budget-s must be a positive number, got 0"),
    ],
)
def test_the_suites_options_are_checked_by_name(bench_conftest, option, value, message):
    with pytest.raises(pytest.UsageError, match=re.escape(message)):
        bench_conftest._chosen(_options(**{"fastae_device": "cpu", option: value}))


def test_the_suites_defaults_on_the_cpu(bench_conftest):
    assert bench_conftest._chosen(_options(fastae_device="cpu", fastae_budget_s=5.0)) == {
        "device": "cpu",
        "size": [fb.Size(256, 784, 1024)],
        "dtype": ["fp32"],
        "provider": ["eager", "compile", "fastae"],
    }


def test_the_suite_stops_at_a_bad_option_before_collecting():
    """pytest's usage error (status 4) naming the option, not a failure per case."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-p", "no:cacheprovider",
         "--fastae-device", "gpu"],
        cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 4, done.stdout + done.stderr
    assert "ERROR: --fastae-device must be cpu or cuda[:N], got 'gpu'" in done.stderr


@pytest.mark.parametrize(
    "options, message",
    [
        (["--lrs", "0"], "argument --lrs: must be comma-separated positive finite numbers"),
        (["--lrs", "1e-3,nan"], "argument --lrs: must be comma-separated positive finite numbers"),
        (["--seeds", "0,-1"], "argument --seeds: must be comma-separated ints from 0 to 2**32"),
        (["--seeds", "a"], "argument --seeds: must be comma-separated ints from 0 to 2**32"),
    ],
)
def test_vae_learning_rate_refuses_bad_options(monkeypatch, capsys, options, message):
    script = _bench_script(monkeypatch, "vae_learning_rate")
    monkeypatch.setattr(script, "measure", lambda *a: pytest.fail("measured"))
    assert message in _usage_error(script.main, options, capsys)


@pytest.mark.parametrize("option", ["--rounds", "--calls"])
@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_optimizer_time_counts_are_positive_ints(monkeypatch, capsys, option, value):
    optimizer_time = _bench_script(monkeypatch, "optimizer_time")
    monkeypatch.setattr(optimizer_time, "update_times", lambda *a: pytest.fail("timed"))
    message = f"argument {option}: must be a positive int, got '{value}'"
    assert message in _usage_error(optimizer_time.main, [option, value], capsys)


def test_optimizer_time_warms_each_optimizer_up_and_alternates_turns(monkeypatch):
    optimizer_time = _bench_script(monkeypatch, "optimizer_time")
    steps = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def step(self):
            steps.append(self.name)

    makers = {name: lambda model, lr, name=name: Recorder(name) for name in ("a", "b")}
    monkeypatch.setattr(optimizer_time, "OPTIMIZERS", makers)
    optimizer_time.update_times([(2, 3)], rounds=3, calls=2)
    warm_up = ["a"] * optimizer_time.WARM_UP_STEPS + ["b"] * optimizer_time.WARM_UP_STEPS
    assert steps == warm_up + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]


def test_optimizer_time_fits_once_untimed_and_alternates_turns(monkeypatch):
    optimizer_time = _bench_script(monkeypatch, "optimizer_time")
    fits = []

    class Detector:
        def __init__(self, *args, epochs, **kwargs):
            self.epochs = epochs

        def fit(self, x):
            fits.append((fastae.training.default_optimizer, self.epochs))

    monkeypatch.setattr(fastae, "AutoencoderOutlierDetector", Detector)
    fused, single = optimizer_time.OPTIMIZERS.values()
    seconds = optimizer_time.detector_fit_seconds(2, epochs=7)
    assert fits == [(fused, 1), (single, 1), (fused, 7), (single, 7), (single, 7), (fused, 7)]
    assert list(seconds) == list(optimizer_time.OPTIMIZERS)
    assert fastae.training.default_optimizer is fused


@HOST_TIME
@pytest.mark.parametrize(
    "options, message",
    [
        (["--size", "0x8x8"], "--size must look like BATCHxINPUTSxHIDDEN"),
        (["--size", "8x16"], "--size must look like BATCHxINPUTSxHIDDEN"),
        (["--cases", "bogus"], "--cases must be among ('encode', "),
        (["--backend", "reference"], "--backend reference needs --routes or --deep"),
        (
            ["--routes", "--cases", "all,encode"],
            "--routes times training steps, got --cases encode",
        ),
    ],
)
def test_host_time_refuses_bad_options_before_timing(monkeypatch, capsys, options, message):
    host_time = _bench_script(monkeypatch, "host_time")
    monkeypatch.setattr(host_time, "stub_kernels", lambda: pytest.fail("ran"))
    assert message in _usage_error(host_time.main, options, capsys)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--size", "0x8x8"], "--size must look like BATCHxINPUTSxHIDDEN"),
        (["--cases", "bogus"], "--cases must be among ('encode', "),
    ],
)
def test_launch_time_refuses_bad_options(options, message):
    """In a process of its own: bench/launch_time.py unsets TRITON_INTERPRET on import."""
    pytest.importorskip("triton")
    script = Path(__file__).parents[1] / "bench" / "launch_time.py"
    done = subprocess.run(
        [sys.executable, str(script), *options], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.parametrize(
    "options, message",
    [
        (["--parts", "bogus"], "--parts must be among ('anomaly', 'training', 'streaming')"),
        (["--digits", "11"], "argument --digits: must be comma-separated ints from 0 to 9"),
        (["--digits", "1,"], "argument --digits: must be comma-separated ints from 0 to 9"),
        (["--seeds", "a"], "argument --seeds: must be comma-separated ints from 0 to"),
        (["--seeds", "-1"], "argument --seeds: must be comma-separated ints from 0 to"),
        (["--epochs", "0"], "argument --epochs: must be a positive int, got '0'"),
        (["--out", "missing/peers.md"], "--out 'missing/peers.md': its folder 'missing' does not"),
    ],
)
def test_peers_refuses_bad_options_before_running(
    peers, monkeypatch, capsys, tmp_path, options, message
):
    monkeypatch.chdir(tmp_path)
    for part in ("run", "training", "streaming"):
        monkeypatch.setattr(peers, part, lambda *a: pytest.fail("ran"))
    assert message in _usage_error(peers.main, options, capsys)


def test_peers_warm_every_detector_up_before_timing(peers, monkeypatch):
    calls = []

    def detectors(task, seed, epochs, pyod):
        def detector(name):
            def detect(normal, test):
                calls.append((name, len(normal), epochs))
                return np.arange(len(test))

            return detect

        return {name: detector(name) for name in ("a", "b")}

    monkeypatch.setattr(peers, "detectors", detectors)
    peers.run(seeds=[0], held_out=[1], epochs=5)
    assert calls[:2] == [("a", peers.WARM_UP_ROWS, 1), ("b", peers.WARM_UP_ROWS, 1)]
    assert len(calls) == 2 + 2 * 2  # then digits and breast_cancer, timed
    assert all(rows > peers.WARM_UP_ROWS and epochs == 5 for _, rows, epochs in calls[2:])


@pytest.mark.parametrize("name", ["kernel_times", "vae_learning_rate", "peers"])
def test_the_scripts_help_gives_the_first_paragraph_whole(name, monkeypatch, capsys):
    if name == "kernel_times" and not fastae.backend.triton_available():
        pytest.skip("kernel_times needs Triton")
    script = _bench_script(monkeypatch, name)
    with pytest.raises(SystemExit) as exit_:
        script.main(["--help"])
    assert exit_.value.code == 0
    first = " ".join(script.__doc__.split("\n\n")[0].split())
    assert first.endswith(".") or first.endswith(":")
    assert first in " ".join(capsys.readouterr().out.split())


# ----------------------------------------------------------------------------- ratio math


def _record(provider, ms, source="a.json", size="8x4x2", dtype="float32", **extra):
    """A synthetic record: ``provider``'s median ``ms`` for the sparse case."""
    record = {"case": "sparse", "size": size, "dtype": dtype, "provider": provider}
    record |= {"median_s": ms / 1e3, "source": source, "device_name": "cpu"}
    return record | {"matmul_precision": "highest"} | extra


def _table_rows(table: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line) for line in table.splitlines() if line.startswith("sparse")]


def test_stats_are_the_medians_and_spread_of_the_rounds():
    stats = fb.stats_of([1.0, 2.0, 10.0])
    assert stats == pytest.approx(
        {"min": 1.0, "max": 10.0, "mean": 13 / 3, "median": 2.0, "stddev": 4.9328828623,
         "rounds": 3}
    )  # fmt: skip
    record = _record("fastae", 1.0) | {"mean_s": 0.005, "min_s": 0.0005, "stddev_s": 0.002}
    record["rounds"] = 3
    (back,) = fb.records_from_json(json.loads(json.dumps(fb.to_json([record]))))
    for key in ("median_s", "mean_s", "min_s", "stddev_s", "rounds"):
        assert back[key] == record[key], key


def test_ratios_pair_records_of_one_size_and_dtype():
    """A row per (case, size, dtype): a size timed by fastae alone has no ratio, and each
    dtype's ratio divides its own times (3 sig. figures)."""
    records = [
        _record("eager", 3.0), _record("fastae", 1.0), _record("fastae", 2.0, size="16x4x2"),
        _record("eager", 1.2345, dtype="bfloat16"), _record("fastae", 1.0, dtype="bfloat16"),
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no provider twice in a row
        rows = _table_rows(fb.ratio_table(records, compact=True))
    by_key = {(row[1], row[2]): row for row in rows}
    assert len(rows) == 3
    assert by_key[("8x4x2", "float32")][3:8] == ["highest", "3.000", "-", "1.000", "3x"]
    assert by_key[("16x4x2", "float32")][4] == "-" and by_key[("16x4x2", "float32")][7] == "-"
    assert by_key[("8x4x2", "bfloat16")][7] == "1.23x"


def test_floor_and_graph_ratios_are_marked_across_runs():
    """fastae over the floor, eager and compile's graphs over fastae's graph: plain within one
    run; a row mixing runs is marked and the note given, whichever row it is."""
    same = [
        _record("eager", 2.0), _record("fastae", 1.0), _record(fb.FLOOR, 0.25),
        _record(fb.GRAPH, 0.5), _record(fb.COMPILE_GRAPH, 1.0),
    ]  # fmt: skip
    table = fb.ratio_table(same)
    (row,) = _table_rows(table)
    header = re.split(r"\s{2,}", table.splitlines()[0])
    cell = dict(zip(header, row, strict=True))
    assert (cell["fastae/floor"], cell["eager/graph"], cell["cgraph/graph"]) == ("4x", "4x", "2x")
    assert fb.ACROSS_RUNS_NOTE not in table
    for provider in (fb.FLOOR, fb.GRAPH):
        mixed = [dict(r, size="16x4x2") for r in same]
        for record in mixed:
            if record["provider"] == provider:
                record["source"] = "b.json"
        table = fb.ratio_table(same + mixed)
        first, second = _table_rows(table)
        assert not any(c.endswith("x*") for c in first)
        marked = dict(zip(header, second, strict=True))
        if provider == fb.FLOOR:
            assert marked["fastae/floor"] == "4x*" and marked["eager/graph"] == "4x"
        else:
            assert (marked["eager/graph"], marked["cgraph/graph"]) == ("4x*", "2x*")
        assert table.endswith(fb.ACROSS_RUNS_NOTE)


def test_summary_sections_per_card(tmp_path, monkeypatch):
    """A section per card name (two CUDA cards are two), each with its own records, its torch
    versions, fastae's settings (not its variants'), the commit of the run; two files of one
    name are told apart by their paths."""
    summarize = _load_summarize(monkeypatch)
    cards = {"H100": "2.11.0", "H200": "2.13.0"}
    records = []
    for card, version in cards.items():
        for provider, ms in (("eager", 2.0), ("fastae", 1.0)):
            extra = {"device_name": card, "device": "cuda", "torch": version}
            records.append(_record(provider, ms, **extra, env={"FASTAE_FUSION": "auto"}))
    gemm = {"device_name": "H100", "device": "cuda", "torch": "2.12.0"}  # a second run
    records.append(_record(fb.GEMM, 1.1, **gemm, env={"FASTAE_FUSION": "gemm"}))
    paths = []
    for folder, part in (("one", records[:2] + records[4:]), ("two", records[2:4])):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "bench.json")
        run = fb.to_json(part) | {"commit_info": {"id": "abcdef123456"}}
        paths[-1].write_text(json.dumps(run))
    summary = summarize.summary_markdown(summarize.load(paths), paths)
    assert f"From {paths[0]}, {paths[1]}." in summary
    assert f"- {paths[0]}: commit abcdef1" in summary
    sections = summary.split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections] == ["H100", "H200"]
    for section, versions in zip(sections, ("2.11.0, 2.12.0", "2.13.0"), strict=True):
        assert f"torch {versions};" in section and "FASTAE_FUSION=auto" in section
        assert "FASTAE_FUSION=gemm" not in section
        assert section.count("| sparse |") == 2  # its own row, in the time and figures tables


def test_figures_table_shows_mib_and_the_backends_line_every_fastae_provider():
    """Saved bytes in MiB (2^20 bytes); the backends line gathers every fastae provider's."""
    records = [
        _record("fastae", 1.0, saved_bytes_beyond_inputs=3 * 2**20),
        _record(fb.GEMM, 1.0, fastae_backends={"encode": "triton"}),
        _record("eager", 1.0, fastae_backends={"encode": "eager's own"}),
    ]
    records[0]["fastae_backends"] = {"encode": "reference"}
    (row,) = _table_rows(fb.figures_table(records))
    header = re.split(r"\s{2,}", fb.figures_table(records).splitlines()[0])
    assert dict(zip(header, row, strict=True))["saved MiB fastae"] == "3"
    assert fb.backends_line(records) == "fastae's ops ran on: reference, triton"


def test_a_size_needs_three_positive_ints_in_any_case():
    """BxDxH with an upper-case X too; four parts are refused with the size's own message."""
    assert fb.Size.parse("8X16x4") == fb.Size(8, 16, 4)
    for text in ("1x2x3x4", "8x16", "8x16x"):
        with pytest.raises(ValueError, match=r"^size must look like BATCHxINPUTSxHIDDEN"):
            fb.Size.parse(text)


@pytest.mark.parametrize(
    "text",
    [f"2x{2**62}x1", f"1x{2**32}x{2**31}", f"{2**40}x1x{2**23}"],
    ids=["batch*inputs", "inputs*hidden", "batch*hidden"],
)
def test_a_size_of_2_to_the_63_elements_in_any_tensor_is_refused(text):
    """Every matrix of a case (x: BxD, h: BxH, W: HxD) must stay under 2**63 elements; one
    element fewer is accepted."""
    with pytest.raises(ValueError, match=r"makes a tensor of 2\*\*63 elements or more"):
        fb.Size.parse(text)
    batch, inputs, hidden = map(int, text.split("x"))
    smaller = fb.Size.parse(f"{batch}x{inputs}x{hidden - 1}" if hidden > 1 else
                            f"{batch}x{inputs - 1}x{hidden}")  # fmt: skip
    assert smaller.batch == batch


def test_sizes_are_comma_separated_with_spaces_allowed():
    assert fb.parse_sizes("cpu, 8x4x2 ,host") == [
        fb.Size(256, 784, 1024), fb.Size(8, 4, 2), fb.Size(64, 784, 1024)
    ]  # fmt: skip


def test_rounds_fit_the_budget_within_the_devices_bounds():
    """Half a second on the CPU (3 to 30 rounds), 0.3 s on CUDA (10 to 200)."""
    assert fb.rounds_for(0.1, "cpu") == 5
    assert fb.rounds_for(0.001, "cpu") == 30 and fb.rounds_for(1.0, "cpu") == 3
    assert fb.rounds_for(0.01, "cuda") == 30
    assert fb.rounds_for(1e-4, "cuda") == 200 and fb.rounds_for(1.0, "cuda") == 10
    assert fb.rounds_for(0.1, "cpu", budget_s=2.0) == 20
    assert fb.rounds_for(0.0, "cpu") == 30  # a call too short to time: the most rounds


def test_a_single_round_has_no_spread():
    assert fb.stats_of([0.25]) == {
        "min": 0.25, "max": 0.25, "mean": 0.25, "median": 0.25, "stddev": 0.0, "rounds": 1
    }  # fmt: skip


def test_warm_up_calls_twice_or_four_times_for_compiles_cuda_graphs():
    """compile_graph's CUDA-graph trees record at the third call: it warms up four times; the
    seconds returned are the last call's."""
    for provider, calls in (("eager", 2), (fb.COMPILE_GRAPH, 4)):
        runs = []
        bench = types.SimpleNamespace(provider=provider, run=lambda runs=runs: runs.append(1))
        assert math.isfinite(fb.warm_up(bench)) and len(runs) == calls
    runs = []
    assert fb.warm_up(types.SimpleNamespace(provider="eager", run=lambda: runs.append(1)), 5)
    assert len(runs) == 5


def test_what_cannot_run_where_is_named():
    """Each provider's limits, case by case (on a machine without CUDA)."""
    assert fb.unavailable(fb.JACREV, "cpu") is None  # no case: it can run one
    assert fb.unavailable(fb.JACREV, "cpu", "contractive") is None
    assert fb.unavailable(fb.JACREV, "cpu", "plain").startswith("the jacrev provider only")
    assert fb.unavailable(fb.FLOOR, "cpu", "reparameterize") == (
        "no matrix-product floor for reparameterize"
    )
    assert fb.unavailable(fb.FLOOR, "cpu", "corrupt") is None
    for provider in (fb.GEMM, fb.SPLIT):
        assert fb.unavailable(provider, "cpu", "corrupt").startswith("a fusion boundary")
        assert fb.unavailable(provider, "cpu", "decode_loss") is None
    assert fb.unavailable(fb.TRITON_LAUNCH, "cpu", "plain") == (
        "Triton's launch path is fastae's on CUDA only"
    )


def test_a_cuda_graph_provider_runs_training_steps_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for provider in fb.GRAPH_PROVIDERS:
        assert fb.unavailable(provider, "cuda", "encode") == (
            "a CUDA graph replays a whole training step"
        )
    assert fb.unavailable(fb.GRAPH, "cuda", "plain") is None


def test_compile_on_the_cpu_needs_one_of_the_cpp_compilers(monkeypatch):
    """c++ or g++ will do; with neither, the compile providers cannot run on the CPU."""
    for found, expected in [({"c++"}, None), ({"g++"}, None), (set(), "needs a C++ compiler")]:
        monkeypatch.setattr(fb.shutil, "which", lambda name, found=found: name if name in found
                            else None)  # fmt: skip
        why = fb.unavailable("compile", "cpu", "plain")
        assert why == expected if expected is None else expected in why


def test_a_cases_environment_and_precision_are_restored_after_it():
    """A variable the case set is removed again, one it changed gets its value back; the
    matmul precision too."""
    name, kept = "FASTAE_TEST_SET_BY_A_CASE", "FASTAE_TEST_CHANGED_BY_A_CASE"
    os.environ.pop(name, None)
    os.environ[kept] = "before"
    try:
        with fb._environment({name: "1", kept: "during"}):
            assert os.environ[name] == "1" and os.environ[kept] == "during"
        assert name not in os.environ and os.environ[kept] == "before"
    finally:
        os.environ.pop(kept, None)
    saved = torch.get_float32_matmul_precision()
    with fb.matmul_precision("medium" if saved != "medium" else "high"):
        assert torch.get_float32_matmul_precision() != saved
    assert torch.get_float32_matmul_precision() == saved


def test_bfloat16_records_no_float32_matmul_precision():
    def info(dtype):
        size, cpu = fb.Size(8, 4, 2), torch.device("cpu")
        bench = fb.Bench(case="plain", provider="eager", size=size, dtype=dtype, device=cpu,
                         forward=lambda: (), params=[], inputs=[])  # fmt: skip
        return bench.info()

    assert info("bf16")["matmul_precision"] == "n/a"
    assert info("tf32")["matmul_precision"] == "high"
    assert info("fp32")["matmul_precision"] == "highest"


def test_a_stored_verdict_beats_the_old_fixed_limit():
    """A record's own ``beyond_rounding`` is what counts; only records without one compare
    with the fixed limit, which itself is still within rounding."""
    limit = fb.AGREEMENT_LIMITS["fp32"]
    assert not fb.beyond_rounding({"dtype": "fp32", "rel_diff_vs_reference": 10 * limit,
                                   "beyond_rounding": False})  # fmt: skip
    assert fb.beyond_rounding({"dtype": "fp32", "rel_diff_vs_reference": 0.0,
                               "beyond_rounding": True})  # fmt: skip
    assert not fb.beyond_rounding({"dtype": "fp32", "rel_diff_vs_reference": limit})


def test_relative_differences_divide_by_the_reference():
    """|got - want| / |want| per tensor (Frobenius norms); a zero reference: the absolute
    difference; NaN: inf."""
    want = torch.tensor([3.0, 4.0])
    got = [2 * want, want, torch.tensor([3.0, 4.0]), torch.tensor([float("nan"), 0.0])]
    wants = [want, want, torch.zeros(2), want]
    assert fb._relative_differences(got, wants) == [1.0, 0.0, 5.0, math.inf]


def test_the_agreement_verdict_weighs_the_references_own_rounding_and_the_floor(monkeypatch):
    """Beyond rounding: some tensor's difference exceeds twice the reference's own at the
    dtype and the dtype's floor; the figures are the largest differences. (The differences
    are given: this pins the verdict, not the computation.)"""
    bench = fb.build("plain", "fastae", fb.Size(4, 6, 5))
    monkeypatch.setattr(fb, "_outputs_and_grads", lambda bench, backend, upstream=None: ([], None))
    floor = fb.AGREEMENT_FLOOR["fp32"]

    def verdict(ours, theirs):
        given = iter([ours, theirs])
        monkeypatch.setattr(fb, "_relative_differences", lambda got, want: next(given))
        return fb.agreement(bench)

    # within twice the reference's own, above the floor
    assert not verdict([1.5 * floor], [floor])["beyond_rounding"]
    # above twice the reference's own, under the floor
    assert not verdict([floor / 2], [floor / 100])["beyond_rounding"]
    # one tensor of two beyond both
    assert verdict([0.0, 100 * floor], [3 * floor / 100, floor / 100]) == {
        "rel_diff_vs_reference": 100 * floor,
        "reference_rel_diff": 3 * floor / 100,
        "beyond_rounding": True,
    }


def test_rows_follow_case_size_and_dtype_order():
    """Rows sort by case (the order of CASES), then inputs, hidden and batch, then dtype
    (fp32, tf32, bf16), whatever order the records come in."""

    def record(case, batch, inputs, hidden, dtype="fp32"):
        return {"case": case, "size": f"{batch}x{inputs}x{hidden}", "batch": batch,
                "inputs": inputs, "hidden": hidden, "dtype": dtype, "provider": "eager",
                "device_name": "cpu", "median_s": 1e-3}  # fmt: skip

    records = [
        record("deep", 8, 4, 2), record("plain", 8, 4, 2, "bf16"), record("plain", 8, 4, 2),
        record("plain", 5, 20, 5), record("plain", 50, 10, 50), record("plain", 8, 4, 2, "tf32"),
    ]  # fmt: skip
    order = [(row["first"]["case"], row["first"]["size"], row["first"]["dtype"])
             for row in fb.group_rows(records)]  # fmt: skip
    assert order == [
        ("plain", "8x4x2", "fp32"), ("plain", "8x4x2", "tf32"), ("plain", "8x4x2", "bf16"),
        ("plain", "50x10x50", "fp32"), ("plain", "5x20x5", "fp32"), ("deep", "8x4x2", "fp32"),
    ]  # fmt: skip


def test_no_ratio_over_a_time_of_zero():
    row = {"providers": {"eager": {"median_s": 1e-3}, "fastae": {"median_s": 0.0}}}
    assert fb.speedup(row, "eager") is None


def test_kernel_table_counts_copies_apart_and_keeps_the_longest_kernels():
    events = [_event("Memcpy HtoD (Pageable -> Device)", 20.0), _event("Memset (Device)", 5.0)]
    events += [_event(f"kernel{i}", float(i)) for i in range(1, 11)]
    table = fb.kernel_table(events, 1)
    assert table["copies"] == 2 and table["copy_time_us"] == pytest.approx(25.0)
    assert table["kernel_launches"] == 10 and table["kernel_time_us"] == pytest.approx(55.0)
    assert [name for name, _, _ in table["kernels"]] == [f"kernel{i}" for i in range(10, 2, -1)]


def test_kernel_time_table_counts_copies_as_busy_and_lists_the_top_kernels():
    record = {"case": "plain", "size": "8x4x2", "dtype": "fp32", "provider": "fastae",
              "device_name": "card", "median_s": 2e-3, "kernel_time_us": 900.0,
              "copy_time_us": 100.0, "kernel_launches": 5, "copies": 1,
              "kernels": [[f"k{i}", 1.0, 100.0 * i] for i in range(5, 0, -1)]}  # fmt: skip
    header, _, row = fb.kernel_time_table([record], markdown=True).splitlines()
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5:9] == ["1.000", "50%", "5", "1"]
    assert cells[9] == "k5 500.0 (x1); k4 400.0 (x1); k3 300.0 (x1); k2 200.0 (x1)"


def test_a_load_equal_to_the_cores_is_not_busy(monkeypatch):
    monkeypatch.setattr(fb, "usable_cores", lambda: 2)
    monkeypatch.setattr(fb.os, "getloadavg", lambda: (2.0, 0.0, 0.0))
    assert fb._busy_host() is None


def test_the_json_names_each_benchmark_and_keeps_stats_apart():
    record = {"case": "plain", "provider": "eager", "size": "8x4x2", "dtype": "fp32",
              "median_s": 1e-3, "min_s": 5e-4, "rounds": 5, "aten_ops": 7}  # fmt: skip
    (entry,) = fb.to_json([record])["benchmarks"]
    assert entry["name"] == "plain[eager-8x4x2-fp32]" and entry["group"] == "plain 8x4x2 fp32"
    assert entry["stats"] == {"median": 1e-3, "min": 5e-4, "rounds": 5}
    assert entry["extra_info"] == {"case": "plain", "provider": "eager", "size": "8x4x2",
                                   "dtype": "fp32", "aten_ops": 7}  # fmt: skip


def test_records_of_other_benchmarks_are_skipped():
    data = {"benchmarks": [
        {"extra_info": {"name": "other"}, "stats": {"median": 1.0}},
        {"extra_info": {"case": "plain", "provider": "eager"}, "stats": {"median": 2.0}},
    ]}  # fmt: skip
    assert fb.records_from_json(data) == [
        {"case": "plain", "provider": "eager", "median_s": 2.0, "rounds": None}
    ]


def test_jacrev_left_out_of_other_cases_is_not_reported(monkeypatch):
    """Asked for every case, jacrev computes the contractive one: no skip line for the rest,
    unlike another provider that cannot run a case."""
    monkeypatch.setattr(fb, "measure", lambda *args: [])
    stderr = io.StringIO()
    argv = ["bench", "--device", "cpu", "--cases", "plain,contractive,encode", "--size", "8x4x2"]
    with redirect_stderr(stderr), redirect_stdout(io.StringIO()):
        assert cli.main([*argv, "--providers", f"eager,{fb.JACREV},{fb.REGENERATE}"]) == 0
    lines = stderr.getvalue().splitlines()
    assert not any("jacrev" in line for line in lines if line.startswith("skip"))
    assert (
        "skip plain fastae_regenerate: the regenerated corrupted input needs a denoising case"
        in lines
    )


def test_measure_times_as_many_rounds_as_the_slowest_provider_fits(monkeypatch):
    """Without --rounds: the fewest any provider's budget allows (rounds alternate, so every
    provider gets the same count)."""
    seconds = {"eager": 0.1, "fastae": 0.01}  # 5 and 30 rounds on the CPU
    monkeypatch.setattr(fb, "warm_up", lambda bench: seconds[bench.provider])
    monkeypatch.setattr(fb, "figures", lambda bench: {})
    records = fb.measure("plain", ["eager", "fastae"], fb.Size(4, 6, 5), "fp32", "cpu")
    assert [r["rounds"] for r in records] == [5, 5]


def test_figures_mark_an_old_record_beyond_its_fixed_limit():
    """A record made before the float64 check (no verdict stored) is marked by its limit."""
    limit = fb.AGREEMENT_LIMITS["fp32"]
    old = {"case": "plain", "size": "8x4x2", "dtype": "fp32", "provider": "fastae",
           "device_name": "cpu", "rel_diff_vs_reference": 2 * limit}  # fmt: skip
    assert fb.figures_table([old]).endswith(" !")
    assert not fb.figures_table([dict(old, rel_diff_vs_reference=limit / 2)]).endswith("!")


def test_a_run_with_any_cuda_record_shows_the_cuda_figures():
    cpu = {"case": "plain", "size": "8x4x2", "dtype": "fp32", "provider": "eager",
           "device_name": "cpu", "device": "cpu", "aten_ops": 3}  # fmt: skip
    cuda = dict(cpu, device_name="card", device="cuda", peak_allocated_beyond_start_bytes=2**20)
    header = fb.figures_table([cpu, cuda]).splitlines()[0]
    assert "peak MiB eager" in header and "kernels eager" in header
    assert "peak MiB" not in fb.figures_table([cpu]).splitlines()[0]


def test_decode_loss_upstream_gradient_is_the_mean_over_the_batch():
    bench = fb.build("decode_loss", "eager", fb.Size(8, 6, 5))
    (upstream,) = bench.grads(bench.forward())
    assert torch.equal(upstream, torch.full_like(upstream, 1 / 8))


def test_defaults_per_device_kind():
    """On any CUDA device (an index too) the suite's defaults add fastae's variants and the
    floor, both CUDA dtypes and the full size set; the CPU keeps to fp32 and one size."""
    for device in ("cuda", "cuda:1"):
        assert fb.default_providers(device).split(",") == [
            "eager", "compile", "fastae", fb.GEMM, fb.SPLIT, fb.REGENERATE, fb.FLOOR
        ]  # fmt: skip
        assert fb.default_dtypes(device) == "tf32,bf16"
        assert fb.default_sizes(device) == "full"
    assert fb.default_providers("cpu") == "eager,compile,fastae"
    assert (fb.default_dtypes("cpu"), fb.default_sizes("cpu")) == ("fp32", "cpu")


def test_a_cuda_run_defaults_to_tf32_at_the_mnist_batch_of_4096(monkeypatch):
    """Without --dtype and --size a CUDA run times tf32 at 4096x784x1024 (CUDA stood in for:
    nothing runs on it here)."""
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fb, "device_name", lambda device: "a card")
    monkeypatch.setattr(fb, "launch_probe", lambda device: None)
    monkeypatch.setattr(fb, "measure", lambda *args: seen.append(args[2:5]) or [])
    with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
        assert (
            cli.main(["bench", "--device", "cuda", "--cases", "plain", "--providers", "eager"]) == 0
        )
    assert seen == [(fb.Size(4096, 784, 1024), "tf32", "cuda")]


def _brute_params(d=6, hidden=4, batch=5):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, d, generator=g, dtype=torch.float64)
    W = torch.randn(hidden, d, generator=g, dtype=torch.float64)
    b = torch.randn(hidden, generator=g, dtype=torch.float64)
    c = torch.randn(d, generator=g, dtype=torch.float64)
    return x, W, b, c


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _brute_encode(x, W, b):
    """h_ij = sigmoid(sum_k x_ik W_jk + b_j), element by element."""
    h = []
    for xi in x:
        dots = [sum(xk * wk for xk, wk in zip(xi, wj, strict=True)) for wj in W]
        pre = [dot + bj for dot, bj in zip(dots, b, strict=True)]
        h.append([_sigmoid(v) for v in pre])
    return h


def _brute_mask(x, u):
    """x with the entries whose uniform is below MASK_P zeroed (lists of lists)."""
    return [
        [xi if ui >= baselines.MASK_P else 0.0 for xi, ui in zip(xr, ur, strict=True)]
        for xr, ur in zip(x.tolist(), u.tolist(), strict=True)
    ]


def _brute_bce(h, W, c, target):
    """Per-sample sum_k BCE(sigmoid(sum_j h_ij W_jk + c_k), target_ik)."""
    losses = []
    for hi, ti in zip(h, target, strict=True):
        total = 0.0
        for k, (ck, tk) in enumerate(zip(c, ti, strict=True)):
            p = _sigmoid(sum(hj * wj[k] for hj, wj in zip(hi, W, strict=True)) + ck)
            total -= tk * math.log(p) + (1 - tk) * math.log(1 - p)
        losses.append(total)
    return losses


def _brute_kl(h, rho, weight):
    total = 0.0
    for j in range(len(h[0])):
        q = sum(row[j] for row in h) / len(h)
        q = min(max(q, 2.0**-20), 1 - 2.0**-20)
        total += rho * math.log(rho / q) + (1 - rho) * math.log((1 - rho) / (1 - q))
    return weight * total


def _brute_contractive(h, W):
    """mean_i ||J_i||_F^2 with J_i[j, k] = h_ij (1 - h_ij) W_jk."""
    per_sample = [
        sum((hj * (1 - hj) * w) ** 2 for hj, wj in zip(hi, W, strict=True) for w in wj) for hi in h
    ]
    return sum(per_sample) / len(per_sample)


def _fixed_uniforms(shape):
    """Uniforms for torch.rand_like: exactly MASK_P (kept: u >= p), just above it, well below
    and well above, so the mask does not follow from scaling or a flipped comparison."""
    values = [baselines.MASK_P, 0.32, 0.05, 0.9, 0.29, 0.6, 0.31, 0.1, 0.75, 0.2]
    flat = [values[i % len(values)] for i in range(math.prod(shape))]
    return torch.tensor(flat, dtype=torch.float64).reshape(shape)


def test_baseline_encode_is_the_sigmoid_layer_with_its_bias():
    """baselines.encode is h = sigmoid(x W^T + b): the bias counts and the nonlinearity is the
    logistic sigmoid."""
    x, W, b, _ = _brute_params()
    want = torch.tensor(_brute_encode(x.tolist(), W.tolist(), b.tolist()), dtype=torch.float64)
    torch.testing.assert_close(baselines.encode(x, W, b), want)


def test_baseline_corrupt_keeps_the_entries_whose_uniform_reaches_p(monkeypatch):
    """corrupt zeroes x where torch.rand_like's uniform is below p and keeps it where the
    uniform is >= p (a uniform equal to p keeps the entry, as fastae's masking does)."""
    x = torch.rand(4, 5, dtype=torch.float64) + 0.5
    u = _fixed_uniforms(x.shape)
    monkeypatch.setattr(torch, "rand_like", lambda like: u)
    want = _brute_mask(x, u)
    assert baselines.corrupt(x).tolist() == want


def test_baseline_kl_sparsity_clamps_a_dead_unit():
    """A unit never active (batch mean 0) gives the finite KL of the clamped mean KL_EPS, not
    inf, as fastae's KL sparsity does."""
    h = torch.rand(6, 3, dtype=torch.float64)
    h[:, 1] = 0.0
    h[:, 2] = 1.0
    got = baselines.kl_sparsity(h)
    assert math.isfinite(got.item())
    want = _brute_kl(h.tolist(), baselines.RHO, baselines.SPARSITY_WEIGHT)
    assert got.item() == pytest.approx(want, rel=1e-12)


def _brute_denoising(monkeypatch):
    """Parameters, the code of the masked input and the mean BCE against the clean x, by
    hand, with torch.rand_like giving fixed uniforms."""
    x, W, b, c = _brute_params()
    u = _fixed_uniforms(x.shape)
    monkeypatch.setattr(torch, "rand_like", lambda like: u)
    h = _brute_encode(_brute_mask(x, u), W.tolist(), b.tolist())
    losses = _brute_bce(h, W.tolist(), c.tolist(), x.tolist())
    return (x, W, b, c), h, sum(losses) / len(losses)


def test_baseline_denoising_step_encodes_the_corrupted_input_and_reconstructs_the_clean_one(
    monkeypatch,
):
    """denoising_step: the mask u >= MASK_P applied to x, the code of the corrupted input, and
    the BCE against the clean x (batch mean)."""
    (x, W, b, c), h, want = _brute_denoising(monkeypatch)
    assert baselines.denoising_step(x, W, b, c).item() == pytest.approx(want, rel=1e-10)


def test_baseline_all_step_adds_sparsity_and_contraction_to_the_denoising_loss(monkeypatch):
    """all_step: the denoising BCE (clean target) + the KL sparsity of the corrupted input's
    code + CONTRACTIVE times the Jacobian penalty at the corrupted input."""
    (x, W, b, c), h, want = _brute_denoising(monkeypatch)
    want += _brute_kl(h, baselines.RHO, baselines.SPARSITY_WEIGHT)
    want += baselines.CONTRACTIVE * _brute_contractive(h, W.tolist())
    assert baselines.all_step(x, W, b, c).item() == pytest.approx(want, rel=1e-10)


def test_the_command_names_itself_after_the_script_that_ran_it(monkeypatch, capsys):
    """Run as an installed ``fastae`` script the usage line says ``fastae``; otherwise (or with
    no argv at all, as in an embedded interpreter) ``python -m fastae``."""
    for argv0, prog in (("/usr/local/bin/fastae", "fastae"), ("-c", "python -m fastae")):
        monkeypatch.setattr(sys, "argv", [argv0])
        with pytest.raises(SystemExit) as exited:
            cli.main(["--help"])
        assert exited.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: {prog} ")
    monkeypatch.setattr(sys, "argv", [])
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m fastae ")


def test_a_missing_command_is_a_usage_error(capsys, monkeypatch):
    """No subcommand: argparse's usage error (status 2), nothing is run."""
    from fastae import benchmark, demo

    def ran(args):
        raise AssertionError("nothing should run")

    monkeypatch.setattr(demo, "run", ran)
    monkeypatch.setattr(benchmark, "run", ran)
    with pytest.raises(SystemExit) as exited:
        cli.main([])
    assert exited.value.code == 2
    assert "required" in capsys.readouterr().err


@pytest.mark.parametrize("status", [0, 1, 2])
def test_the_command_exits_with_mains_status(status, monkeypatch):
    """entry() exits with main's status, whatever it is (a usage error's 2 included)."""
    monkeypatch.setattr(cli, "main", lambda: status)
    with pytest.raises(SystemExit) as exited:
        cli.entry()
    assert exited.value.code == status


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_each_command_runs_its_own_job(command, monkeypatch):
    """``demo`` runs the demo, ``bench`` the benchmark, and main returns the job's status."""
    from fastae import benchmark, demo

    calls = []
    monkeypatch.setattr(demo, "run", lambda args: calls.append(("demo", args.command)) or 3)
    monkeypatch.setattr(benchmark, "run", lambda args: calls.append(("bench", args.command)) or 4)
    assert cli.main([command]) == (3 if command == "demo" else 4)
    assert calls == [(command, command)]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_the_command_ends_by_sigint_even_where_sigint_was_ignored():
    """After Ctrl-C the command restores SIGINT's default action before signalling itself:
    started with SIGINT ignored (as a background job is), it still ends by SIGINT."""
    import signal
    import subprocess

    code = (
        "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "import fastae.__main__ as m; m.main = lambda: m.INTERRUPTED; m.entry()"
    )
    result = subprocess.run([sys.executable, "-c", code], timeout=120, check=False)
    assert result.returncode == -signal.SIGINT


@pytest.fixture
def summarize(monkeypatch):
    return _load_summarize(monkeypatch)


def _rec(provider, ms, **extra):
    """A synthetic sparse-case record: ``provider``'s median of ``ms`` milliseconds."""
    record = {"case": "sparse", "size": "8x4x2", "dtype": "float32", "provider": provider}
    record |= {"median_s": ms / 1e3, "device_name": "cpu", "matmul_precision": "highest"}
    return record | extra


def _write(path, records, conditions=None, **top):
    path.write_text(json.dumps(fb.to_json(records, conditions) | top))
    return path


def _pair(**extra):
    return [_rec("eager", 2.0, **extra), _rec("fastae", 1.0, **extra)]


def test_summarize_names_a_file_that_is_not_text(summarize, tmp_path, capsys):
    """Bytes that are not UTF-8 are a usage error naming the file, not a traceback."""
    good = _write(tmp_path / "good.json", _pair())
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'{"benchmarks": ["\xff\xfe"]}')
    with pytest.raises(SystemExit) as exited:
        summarize.main([str(good), str(binary), "--out", str(tmp_path / "out")])
    assert exited.value.code == 2
    assert f"error: json: {binary}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_lines_abbreviate_the_commit_to_seven_characters(summarize, tmp_path):
    """The commit is shown as git's short hash: its first seven characters."""
    path = _write(tmp_path / "one.json", _pair(), commit_info={"id": "0123456789abcdef"})
    assert summarize.run_lines([str(path)]) == ["one.json: commit 0123456"]


def test_run_lines_need_both_launch_times(summarize, tmp_path):
    """The launch-time phrase needs both figures; one alone is left out (no crash)."""
    for key in ("launch_us_before_profiling", "launch_us_at_end"):
        path = _write(tmp_path / "one.json", _pair(), {"torch_threads": 3, key: 4.5})
        assert summarize.run_lines([str(path)]) == ["one.json: 3 torch threads"]
    path = _write(tmp_path / "one.json", _pair(), {"launch_us_at_end": 4.5, "load_average": []})
    assert summarize.run_lines([str(path)]) == []


def test_summary_without_commit_or_conditions_lists_no_runs(summarize, tmp_path):
    """A file with neither a commit nor run conditions adds no line, and with none the summary
    has no "Runs:" list."""
    path = _write(tmp_path / "one.json", _pair())
    assert summarize.run_lines([str(path)]) == []
    summary = summarize.summary_markdown(summarize.load([str(path)]), [str(path)])
    assert "Runs:" not in summary
    assert summary.startswith("# fastae benchmark summary\n\nFrom one.json.\n\nMedian time")


def test_summary_of_records_without_settings_or_checks(summarize, tmp_path):
    """No device name: the section is "unknown"; no fastae backends or settings: "-"; no
    numbers checked: the agreement line says so, as a sentence; no profile: no GPU-time
    section."""
    records = [{k: v for k, v in r.items() if k != "device_name"} for r in _pair()]
    path = _write(tmp_path / "one.json", records)
    summary = summarize.summary_markdown(summarize.load([str(path)]), [str(path)])
    assert "\n## unknown\n" in summary
    assert "fastae backends: -; fastae's settings: -\n" in summary
    assert "\nnumbers checked against the float64 reference: none.\n" in summary
    assert "Where the GPU time goes" not in summary


def test_summarize_writes_the_chart_into_a_new_nested_folder(summarize, tmp_path):
    """--out may name folders that do not exist yet; SUMMARY.md and speedup.png are written
    there and the first line of the output names both."""
    pytest.importorskip("matplotlib")
    path = _write(tmp_path / "one.json", _pair())
    out = tmp_path / "a" / "b"
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        assert summarize.main([str(path), "--out", str(out)]) == 0
    lines = stdout.getvalue().splitlines()
    assert lines[0] == f"wrote {out / 'SUMMARY.md'} and {out / 'speedup.png'}"
    assert (out / "SUMMARY.md").read_text().startswith("# fastae benchmark summary")
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summarize_prints_each_cards_tables_then_the_compact_ones(summarize, tmp_path):
    """Per card: its name, the figures table, the ratio table and the agreement line; then,
    last, each card's compact ratio table (without the other providers' columns)."""
    records = _pair() + [_rec(fb.GEMM, 1.2)]
    records += [_rec(p, ms, device_name="H100") for p, ms in (("eager", 3.0), ("fastae", 1.0))]
    path = _write(tmp_path / "one.json", records)
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        assert summarize.main([str(path), "--out", str(tmp_path)]) == 0
    text = stdout.getvalue()
    for card in ("cpu", "H100"):
        mine = [r for r in summarize.load([str(path)]) if r["device_name"] == card]
        block = "\n".join(
            [f"\n{card}\n", fb.figures_table(mine), "", fb.ratio_table(mine), ""]
            + [fb.agreement_line(mine)]
        )
        assert block in text
        assert f"\n{card}: fastae against eager and compile\n\n" in text
    compact = ""
    for card in ("cpu", "H100"):
        mine = [r for r in summarize.load([str(path)]) if r["device_name"] == card]
        compact += f"\n{card}: fastae against eager and compile\n\n"
        compact += fb.ratio_table(mine, compact=True) + "\n"
    assert text.endswith(compact)
    assert "gemm/fastae" in text and "gemm/fastae" not in compact  # the full table's column
