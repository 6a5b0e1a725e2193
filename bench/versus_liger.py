"""kd's fused head against Liger-Kernel's fused linear distillation loss: the same hidden states, output weights and
labels, forward + backward time and peak memory, each case in its own process, in one run on one machine.

    python bench/versus_liger.py                                   # every shape, fkl/rkl/js, eager, then the docs
    python bench/versus_liger.py --shapes 576x49152x2048 --divergences fkl --rounds 1 --no-doc
    python bench/versus_liger.py --compile                         # also both under torch.compile

Liger lives in its own virtual environment, made once beside kd's `.venv` (its chunked losses are plain torch and
run on a CPU; `--no-deps` keeps triton and its other GPU requirements out):

    python -m venv .liger-env
    .liger-env/bin/pip install torch==2.13.0
    .liger-env/bin/pip install --no-deps liger-kernel==0.8.5

(elsewhere: pass `--liger-python`, or set $KD_LIGER_PYTHON).

What is compared. Both take the student's and the teacher's last hidden states ([B·T, d], fp32) and output weights
([V, d], fp32, no bias), project them a chunk of rows at a time and return

    0.5 · CE + 0.5 · D      (Liger's defaults weight_hard_loss = weight_soft_loss = 0.5; kd's `fused_objective`
                             with ce_weight = kd_weight = 0.5, what `loss.kd_ratio: 0.5` asks of it)

averaged over the valid positions (every position is valid here: Liger computes masked rows too), with gradients
into the student's hidden states and output weight. Liger 0.8.5's chunked distillation loss is
`LigerFusedLinearJSDLoss`, a generalised JSD with Liger's β: D = β KL(p‖m) + (1−β) KL(q‖m), m = β p + (1−β) q
(p the teacher, q the student), and at the ends KL(p‖q) for β = 0 and KL(q‖p) for β = 1. That is kd's convention
(`kdcli/losses/js.py`), so the divergences map as

    kd fkl  ↔  Liger β = 0        kd rkl  ↔  Liger β = 1        kd js (β = 0.5)  ↔  Liger β = 0.5

with temperature 1 on both. Every case asserts that the two losses, and the norms of the two gradients, agree
(`--tolerance`); `--check` first holds the gradients themselves to each other element by element at a small shape.

Processes. Each (shape, divergence, implementation) runs in a child process of its own, which builds the inputs from
a seeded generator (the same tensors in both environments: the same torch), runs one untimed fwd + bwd (the warm-up;
with torch.compile it compiles) and `--repeats` timed ones, and prints their seconds. Its peak resident memory is the
child's `ru_maxrss` as `os.wait4` reports it to this parent (which stays below every child's peak: Linux starts a
child's count at its parent's); a child that only builds the inputs, in each implementation's environment, gives
its baseline, and a variant's "extra" peak is its peak minus that one (the gradients of the hidden states and the
weight, which both hand to autograd, are inside it). Implementations alternate within a round and rounds repeat
(`--rounds`); times are the median over rounds of each child's median, so a shared machine's load slows both
alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Only the standard library at module level: the Liger child runs this file in an environment without kdcli.
REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Side by side with Liger-Kernel"
DEFAULT_LIGER_PYTHON = os.environ.get("KD_LIGER_PYTHON") or str(REPO / ".liger-env" / "bin" / "python")
# (hidden size, vocabulary, B·T): the built-in models' head, and Llama 3's vocabulary at a 1B model's width.
DEFAULT_SHAPES = ("576x49152x2048", "576x49152x8192", "2048x128256x2048", "2048x128256x8192")
# kd's divergence and its parameters ↔ Liger's β (the module docstring says why these match).
DIVERGENCES: dict[str, tuple[dict[str, float], float]] = {
    "fkl": ({}, 0.0),
    "rkl": ({}, 1.0),
    "js": ({"beta": 0.5}, 0.5),
}
CE_WEIGHT = KD_WEIGHT = 0.5
# The process that only builds the inputs, in each implementation's environment (its "extra" is measured from it).
BASELINES = {"kd": "inputs", "liger": "liger-inputs"}
CHECK_SHAPE = "64x2048x512"


# --- the child: one case ------------------------------------------------------------------------------------


def make_inputs(hidden: int, vocab: int, rows: int, seed: int = 0) -> dict[str, Any]:
    """Student and teacher hidden states and output weights (fp32), and labels; logits come out with a standard
    deviation near 2 (student) and 3 (teacher), as trained models' do."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(hidden)
    hs = torch.empty(rows, hidden).normal_(0.0, 1.0, generator=gen)
    ws = torch.empty(vocab, hidden).normal_(0.0, 2.0 * scale, generator=gen)
    ht = torch.empty(rows, hidden).normal_(0.0, 1.0, generator=gen)
    wt = torch.empty(vocab, hidden).normal_(0.0, 3.0 * scale, generator=gen)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    return {"hs": hs, "ws": ws, "ht": ht, "wt": wt, "labels": labels}


def kd_loss(divergence: str, compiled: bool) -> Any:
    sys.path.insert(0, str(REPO))
    from kdcli.losses import OutputLayer, ProjectedLogits, fused_objective, get_loss

    params, _ = DIVERGENCES[divergence]
    div = get_loss(divergence, temperature=1.0, **params)
    if compiled:
        div.compile(dynamic=False)

    def loss(x: dict[str, Any]) -> Any:
        vocab = int(x["ws"].shape[0])
        student = ProjectedLogits(x["hs"], OutputLayer(x["ws"], vocab, x["ws"].dtype))
        teacher = ProjectedLogits(x["ht"], OutputLayer(x["wt"], vocab, x["wt"].dtype))
        return fused_objective(div, student, teacher, x["labels"], ce_weight=CE_WEIGHT, kd_weight=KD_WEIGHT).total

    return loss


def liger_loss(divergence: str, compiled: bool, chunk_size: int) -> Any:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    _, beta = DIVERGENCES[divergence]
    fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=CE_WEIGHT,
        weight_soft_loss=KD_WEIGHT,
        beta=beta,
        temperature=1.0,
        compiled=compiled,
        chunk_size=chunk_size,
    )
    return lambda x: fn(x["hs"], x["ws"], x["ht"], x["wt"], x["labels"])


def child(spec: dict[str, Any]) -> None:
    """One case in this process; prints one RESULT line of JSON."""
    import torch

    torch.set_num_threads(spec["threads"])
    hidden, vocab, rows = parse_shape(spec["shape"])
    x = make_inputs(hidden, vocab, rows)
    out: dict[str, Any] = {"seconds": []}
    impl = spec["impl"]
    if not impl.endswith("inputs"):
        compiled = impl.endswith("+compile")
        if impl.startswith("kd"):
            fn = kd_loss(spec["divergence"], compiled)
        else:
            fn = liger_loss(spec["divergence"], compiled, spec["liger_chunk"])
        warmup = spec["warmup"] or impl.endswith("+compile")  # a compiled function's first call compiles
        for repeat in range(spec["repeats"] + warmup):
            x["hs"].grad = x["ws"].grad = None
            started = time.perf_counter()
            loss = fn(x)
            loss.backward()
            seconds = time.perf_counter() - started
            if repeat == 0:
                out["first_s"] = seconds
            if repeat >= warmup:
                out["seconds"].append(seconds)
        out["loss"] = float(loss.detach())
        out["grad_h_norm"] = norm64(x["hs"].grad)
        out["grad_w_norm"] = norm64(x["ws"].grad)
        if spec.get("dump"):
            torch.save({"loss": loss.detach(), "grad_h": x["hs"].grad, "grad_w": x["ws"].grad}, spec["dump"])
    print("RESULT " + json.dumps(out), flush=True)


def norm64(t: Any, rows: int = 4096) -> float:
    """The float64 norm of a gradient, a block of rows at a time: a whole float64 copy of a [128,256, 2,048] ∂W
    (2 GiB) would be the process's peak, hiding the loss's own (and counted against both implementations)."""
    import torch

    flat = t.reshape(-1, t.shape[-1])
    total = torch.zeros((), dtype=torch.float64)
    for lo in range(0, flat.shape[0], rows):
        total += flat[lo : lo + rows].double().square().sum()
    return float(total.sqrt())


# --- the parent -----------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int, int]:
    hidden, vocab, rows = (int(v) for v in text.lower().split("x"))
    return hidden, vocab, rows


def run_case(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    python = args.liger_python if spec["impl"].startswith("liger") else args.kd_python
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    command = [python, str(Path(__file__).resolve()), "_child", json.dumps(spec)]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+", encoding="utf-8") as errors:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env, cwd=REPO)
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        # wait4 reaps the child itself, so the rusage is that child's alone (Popen must not wait again).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        stderr = errors.read()
    if proc.returncode != 0:
        tail = "\n".join(stderr.splitlines()[-25:])
        killed = proc.returncode == -9
        if not (killed or spec["impl"].endswith("+compile")):
            raise SystemExit(f"case {spec} failed with exit status {proc.returncode}:\n{tail}")
        # torch.compile on a CPU may fail where eager runs (a compiler, a graph break it cannot take), and on a
        # machine shared with other jobs the kernel's out-of-memory killer may end a case: the table says so and
        # the run goes on.
        last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "?")
        if killed:
            last = "killed by SIGKILL (on this shared machine: the kernel's out-of-memory killer)"
        print(f"  {spec['shape']:>18s} {spec['divergence']:4s} {spec['impl']:15s} failed: {last}", flush=True)
        return {**spec, "seconds": [], "error": last[:200], "peak_mib": usage.ru_maxrss / 1024}
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    result.update(spec, peak_mib=usage.ru_maxrss / 1024, process_s=time.perf_counter() - started)
    timed = result["seconds"]
    shown = f"{statistics.median(timed):7.2f} s" if timed else "       -"
    loss = f"  loss {result['loss']:.6f}" if "loss" in result else ""
    peak = f"peak {result['peak_mib']:8,.0f} MiB"
    print(f"  {spec['shape']:>18s} {spec['divergence']:4s} {spec['impl']:15s} {shown}  {peak}{loss}", flush=True)
    return result


def check_gradients(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """At a small shape, kd's and Liger's loss and both gradients, element by element (fp32 both)."""
    import torch

    rows = []
    for divergence in args.divergence_list:
        dumps = {}
        for impl in ("kd", "liger"):
            dump = work / f"check-{divergence}-{impl}.pt"
            spec = base_spec(args, CHECK_SHAPE, divergence, impl, repeats=1)
            run_case(args, {**spec, "dump": str(dump)})
            dumps[impl] = torch.load(dump)
        kd, lg = dumps["kd"], dumps["liger"]
        row = {"divergence": divergence, "loss_kd": float(kd["loss"]), "loss_liger": float(lg["loss"])}
        for name in ("grad_h", "grad_w"):
            scale = float(lg[name].abs().max())
            row[name] = float((kd[name] - lg[name]).abs().max()) / scale
        row["loss"] = abs(row["loss_kd"] - row["loss_liger"]) / abs(row["loss_liger"])
        worst = max(row["loss"], row["grad_h"], row["grad_w"])
        if not worst <= args.tolerance:
            raise SystemExit(f"kd and Liger disagree at {CHECK_SHAPE} ({divergence}): {row}")
        rows.append(row)
    return rows


def base_spec(args: argparse.Namespace, shape: str, divergence: str, impl: str, repeats: int) -> dict[str, Any]:
    once = shape in args.once_at and repeats > 0
    return {
        "shape": shape,
        "divergence": divergence,
        "impl": impl,
        "repeats": 1 if once else repeats,
        "warmup": 0 if once else args.warmup,
        "threads": args.threads,
        "liger_chunk": args.liger_chunk,
    }


def agree(results: list[dict[str, Any]], tolerance: float) -> list[str]:
    """Each case's kd and Liger values (loss, gradient norms) against each other: the problems, if any."""
    problems = []
    for key in {(r["shape"], r["divergence"]) for r in results}:
        runs = [r for r in results if (r["shape"], r["divergence"]) == key and "loss" in r]
        base = next((r for r in runs if r["impl"] == "liger"), None)
        if base is None:
            continue
        for r in runs:
            for field in ("loss", "grad_h_norm", "grad_w_norm"):
                gap = abs(r[field] - base[field]) / max(abs(base[field]), 1e-30)
                if not gap <= tolerance:
                    problems.append(f"{key} {r['impl']} {field}: {r[field]!r} against Liger's {base[field]!r}")
    return problems


def summarise(results: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in results:
        key = (r["shape"], r["divergence"], r["impl"])
        entry = out.setdefault(key, {"medians": [], "peaks": [], "firsts": [], "loss": r.get("loss")})
        if r["seconds"]:
            entry["medians"].append(statistics.median(r["seconds"]))
            entry["firsts"].append(r["first_s"])
        entry["peaks"].append(r["peak_mib"])
    for entry in out.values():
        entry["s"] = statistics.median(entry["medians"]) if entry["medians"] else None
        entry["first"] = statistics.median(entry["firsts"]) if entry["firsts"] else None
        entry["peak"] = max(entry["peaks"])
    return out


def machine_line(args: argparse.Namespace) -> str:
    sys.path.insert(0, str(REPO / "bench"))
    from versus_trl import machine

    return machine()


def render(args: argparse.Namespace, results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    summary = summarise(results)
    impls = args.impl_list
    lines = [
        SECTION,
        "",
        f"`{meta['command']}` on {meta['machine']}, {args.threads} torch threads per process, {meta['date']}; torch "
        f"{meta['torch']} in both environments, liger-kernel {meta['liger']} (its own venv, `--no-deps`: no triton, "
        "the chunked loss is plain torch). "
        + (
            "The machine was shared with other jobs (load average "
            # at the start this run adds nothing to the load yet; at the end its own case is in it
            if meta["load"][0] > 1.0 or meta["load"][1] > args.threads + 1.0
            else "Nothing else ran (load average "
        )
        + f"{meta['load'][0]:.1f} at the start, {meta['load'][1]:.1f} at the end, {args.threads} threads a case): read "
        "the seconds as ratios, taken by alternating the implementations within each round.",
        "",
        "Both compute 0.5 · CE + 0.5 · D from the student's and teacher's hidden states and output weights (fp32, no "
        "bias), every position valid, gradients into the student's hidden states and weight. Divergences matched to "
        "Liger's β (`LigerFusedLinearJSDLoss`, whose generalised JSD is kd's `js` convention): fkl = β 0, rkl = β 1, "
        f"js = β 0.5; temperature 1. kd's chunk is its automatic one, Liger's its default ({args.liger_chunk} rows). "
        f"Time: forward + backward of one call, the median of {args.repeats} in each process"
        + (" after an untimed warm-up call" if args.warmup else " (no warm-up call, except under torch.compile)")
        + (
            f" ({', '.join(args.once_at)}: one call each, no warm-up except under torch.compile, whose first call "
            "compiles, for time's sake)"
            if args.once_at
            else ""
        )
        + f", median over {args.rounds} round(s). Peak: each process's `ru_maxrss` from `os.wait4`; extra = peak "
        "− that of a process that only builds the inputs in the same environment (kd's or Liger's venv; the "
        "gradients of the hidden states and the weight are in the extra).",
        "",
    ]
    if meta.get("check"):
        lines += [
            f"Gradient check at {CHECK_SHAPE} (hidden × V × B·T), kd against Liger, fp32, relative to Liger's largest "
            "element: "
            + "; ".join(
                f"{c['divergence']}: loss {c['loss']:.1e}, ∂h {c['grad_h']:.1e}, ∂W {c['grad_w']:.1e}"
                for c in meta["check"]
            )
            + ". At every shape below the two losses and the norms of both gradients agree to "
            f"{args.tolerance:g} relative (asserted).",
            "",
        ]
    header = "| hidden × V | B·T | div | loss |"
    rule = "|---|---|---|---|"
    for impl in impls:
        header += f" {impl} s | {impl} extra MiB |"
        rule += "---|---|"
    pairs = [(k, g) for k, g in (("kd", "liger"), ("kd+compile", "liger+compile")) if k in impls and g in impls]
    for k, g in pairs:
        header += f" {k} / {g} time | {k} / {g} extra |"
        rule += "---|---|"
    lines += [header, rule]
    for shape in args.shape_list:
        hidden, vocab, rows = parse_shape(shape)
        bases = {i: summary.get((shape, "-", BASELINES[i.split("+")[0]])) for i in impls}
        if any(base is None for base in bases.values()):
            continue
        for divergence in args.divergence_list:
            cells = []
            entries = {i: summary.get((shape, divergence, i)) for i in impls}
            loss = next((e["loss"] for e in entries.values() if e and e["loss"] is not None), None)
            if loss is None:
                continue
            for impl in impls:
                e = entries[impl]
                if e is None or e["s"] is None:
                    cells += ["-", "-"]
                else:
                    cells += [f"{e['s']:.2f}", f"{e['peak'] - bases[impl]['peak']:,.0f}"]
            row = f"| {hidden:,} × {vocab:,} | {rows:,} | {divergence} | {loss:.4f} | " + " | ".join(cells) + " |"
            for k, g in pairs:
                kd, lg = entries.get(k), entries.get(g)
                if kd and lg and kd["s"] and lg["s"]:
                    extra = (kd["peak"] - bases[k]["peak"]) / (lg["peak"] - bases[g]["peak"])
                    row += f" **{kd['s'] / lg['s']:.2f}** | **{extra:.2f}** |"
                else:
                    row += " - | - |"
            lines.append(row)
    skipped = [
        f"{shape} {', '.join(d for d in args.divergence_list if d not in chosen)}"
        for shape, chosen in args.only_at.items()
        if any(d not in chosen for d in args.divergence_list)
    ]
    skipped += [f"{shape} (left out of `--shapes`)" for shape in DEFAULT_SHAPES if shape not in args.shape_list]
    if skipped:
        lines += ["", "Not run, for this run's time budget: " + "; ".join(skipped) + "."]
    lines += [
        "",
        "Inputs alone (hidden states, both weights, labels) peak at "
        + ", ".join(
            f"{summary[(s, '-', 'inputs')]['peak']:,.0f} MiB in kd's environment and "
            f"{summary[(s, '-', 'liger-inputs')]['peak']:,.0f} MiB in Liger's ({s})"
            for s in args.shape_list
            if (s, "-", "inputs") in summary and (s, "-", "liger-inputs") in summary
        )
        + ".",
    ]
    firsts = [
        f"{impl} {e['first']:.0f} s ({shape}, {div})"
        for (shape, div, impl), e in summary.items()
        if impl.endswith("+compile") and e["first"] is not None
    ]
    if firsts:
        lines += ["", "First call under torch.compile (compiling included): " + "; ".join(firsts) + "."]
    failed = [
        f"{r['impl']} at {r['shape']} {r['divergence']}: {r['error']} (peak {r['peak_mib']:,.0f} MiB when it ended)"
        for r in results
        if r.get("error")
    ]
    if failed:
        lines += ["", "Failed (a `-` in the table): " + "; ".join(failed) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma list of HIDDENxVOCABxROWS")
    parser.add_argument("--divergences", default="fkl,rkl,js", help="comma list of fkl, rkl, js")
    parser.add_argument("--compile", action="store_true", help="also run both under torch.compile")
    parser.add_argument(
        "--compile-at",
        action="append",
        default=[],
        metavar="SHAPE[:DIVS]",
        help="--compile at this shape only (and only these divergences, a comma list); may repeat",
    )
    parser.add_argument("--impls", help="comma list of kd, liger, kd+compile, liger+compile (overrides --compile)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per process (default 2)")
    parser.add_argument(
        "--warmup", type=int, choices=(0, 1), default=1, help="an untimed first call (default 1; always compiled)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SHAPE:DIVS",
        help="at SHAPE run only these divergences (a comma list), e.g. 2048x128256x8192:fkl; may repeat",
    )
    parser.add_argument(
        "--once-at",
        action="append",
        default=[],
        metavar="SHAPE",
        help="at SHAPE time one call with no warm-up (a long call's first-call costs are small); may repeat",
    )
    parser.add_argument("--rounds", type=int, default=1, help="processes per implementation, alternating")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process (default 2)")
    parser.add_argument("--liger-chunk", type=int, default=1024, help="Liger's chunk_size (its default 1024)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="relative agreement asserted (default 1e-4)")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True, help="the gradient check")
    parser.add_argument("--liger-python", default=DEFAULT_LIGER_PYTHON, help="Liger's python")
    parser.add_argument("--kd-python", default=sys.executable, help="kd's python (default: this one)")
    parser.add_argument("--no-doc", action="store_true", help=f"do not rewrite the section of {DOC.name}")
    args = parser.parse_args(argv)
    args.shape_list = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for shape in args.shape_list:
        try:
            parse_shape(shape)
        except ValueError:
            parser.error(f"--shapes: {shape!r} is not HIDDENxVOCABxROWS")
    args.divergence_list = [d.strip() for d in args.divergences.split(",") if d.strip()]
    if any(d not in DIVERGENCES for d in args.divergence_list):
        parser.error(f"--divergences: a comma list of {', '.join(DIVERGENCES)}")
    args.only_at = {}
    for item in args.only:
        shape, _, divs = item.partition(":")
        chosen = [d.strip() for d in divs.split(",") if d.strip()]
        if shape not in args.shape_list or not chosen or any(d not in args.divergence_list for d in chosen):
            parser.error(f"--only {item!r}: SHAPE (one of --shapes) and a comma list of --divergences")
        args.only_at[shape] = chosen
    impls = args.impls or ("kd,liger,kd+compile,liger+compile" if args.compile or args.compile_at else "kd,liger")
    args.impl_list = [i.strip() for i in impls.split(",") if i.strip()]
    compile_at: dict[str, list[str]] = {}
    for item in args.compile_at:
        shape, _, divs = item.partition(":")
        chosen = [d.strip() for d in divs.split(",") if d.strip()] or args.divergence_list
        if shape not in args.shape_list or any(d not in args.divergence_list for d in chosen):
            parser.error(f"--compile-at {item!r}: SHAPE (one of --shapes), optionally :DIVS of --divergences")
        compile_at[shape] = chosen
    args.compile_at = compile_at
    if any(shape not in args.shape_list for shape in args.once_at):
        parser.error("--once-at: one of --shapes")
    if any(i not in ("kd", "liger", "kd+compile", "liger+compile") for i in args.impl_list):
        parser.error("--impls: a comma list of kd, liger, kd+compile, liger+compile")
    if any(i.startswith("liger") for i in args.impl_list) and not Path(args.liger_python).exists():
        parser.error(f"--liger-python {args.liger_python}: no such file; make Liger's venv first (see --help)")
    return args


def versions(args: argparse.Namespace) -> dict[str, str]:
    code = "import torch, importlib.metadata as m; print(torch.__version__, m.version('liger-kernel'))"
    out = subprocess.run([args.liger_python, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"torch": out[0], "liger": out[1]}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_child":
        child(json.loads(sys.argv[2]))
        return
    args = parse_args()
    meta: dict[str, Any] = {
        "command": " ".join(["python bench/versus_liger.py", *map(shlex.quote, sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "machine": machine_line(args),
        **versions(args),
    }
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kd-versus-liger-") as work:
        if args.check:
            meta["check"] = check_gradients(args, Path(work))
    results = []
    for shape in args.shape_list:
        # The inputs alone, in each environment: its own torch and imports are part of its every peak.
        for baseline in BASELINES.values():
            results.append(run_case(args, base_spec(args, shape, "-", baseline, repeats=0)))
        for divergence in args.only_at.get(shape, args.divergence_list):
            compiled = not args.compile_at or divergence in args.compile_at.get(shape, ())
            impls = [i for i in args.impl_list if compiled or not i.endswith("+compile")]
            for _ in range(args.rounds):
                for impl in impls:
                    results.append(run_case(args, base_spec(args, shape, divergence, impl, args.repeats)))
            problems = agree([r for r in results if r["shape"] == shape], args.tolerance)
            if problems:
                raise SystemExit("kd and Liger disagree:\n" + "\n".join(problems))
    meta["load"] = (load_start, os.getloadavg()[0])
    section = render(args, results, meta)
    print(section)
    if not args.no_doc:
        sys.path.insert(0, str(REPO / "bench"))
        from losses import write_section

        write_section(DOC, section)
        print(f"wrote section '{SECTION}' of {DOC}")


if __name__ == "__main__":
    main()
