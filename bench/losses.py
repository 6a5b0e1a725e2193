"""Benchmark kd's chunked losses against naive dense autograd implementations (fwd + bwd time, peak extra memory).

    python bench/losses.py                                  # CPU: B·T = 4096, V = 49,152, fp32 and bf16
    python bench/losses.py --dtype fp32 --only fkl,akl --repeats 5
    python bench/losses.py --device cuda --compile          # GPU: V = 128,256, bf16, plus a torch.compile variant

Naive = what torchtune's ForwardKLLoss / DistiLLM's losses do: full float32 (log-)softmaxes of the whole [B·T, V]
teacher and student, the divergence as tensor expressions, autograd for the backward.

Memory, honestly:
- CPU: every (divergence, implementation, dtype) runs in a fresh subprocess. Inputs (student logits, teacher logits,
  labels) are allocated in place, then the kernel's peak-RSS counter is reset (/proc/self/clear_refs = 5) and one
  fwd + bwd runs; peak extra = VmHWM − RSS after inputs. The student's gradient (kept in .grad) is inside both
  figures. Where clear_refs is not allowed, ru_maxrss is used (inputs are built without temporaries, so the
  baseline is still exact).
- CUDA: torch.cuda.max_memory_allocated − memory_allocated after inputs, same single fwd + bwd, gradient included.
Time: the median of --repeats fwd + bwd runs after a warm-up. On CPU, naive and kd alternate in one process so that
other load on a shared machine slows both alike; CUDA times use CUDA events.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kdcli.host import cpu_model, memory_info, process_memory, reset_peak_memory  # noqa: E402
from kdcli.losses import LOSSES, get_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEQ = 1024  # rows per sequence; the first eighth of each is a masked prompt, as in SFT-style distillation


# ------------------------------------------------------------------------------------------- naive baselines


def _kl_terms(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    return (a * (log_a - log_b)).sum(-1)


def naive_loss(name: str, s: Tensor, t: Tensor, y: Tensor, temperature: float = 1.0) -> Tensor:
    """Straightforward dense autograd implementations (default parameters), masked mean over valid positions."""
    s = s.reshape(-1, s.shape[-1])
    t = t.reshape(-1, t.shape[-1])
    y = y.reshape(-1)
    lq = F.log_softmax(s.float() / temperature, dim=-1)
    lp = F.log_softmax(t.float() / temperature, dim=-1)
    valid = y != -100
    if name == "fkl":
        d = _kl_terms(lp.exp(), lp, lq)
    elif name == "rkl":
        d = _kl_terms(lq.exp(), lq, lp)
    elif name == "skl":
        p, q = lp.exp(), lq.exp()
        d = _kl_terms(p, lp, torch.log(0.1 * p + 0.9 * q))
    elif name == "srkl":
        p, q = lp.exp(), lq.exp()
        d = _kl_terms(q, lq, torch.log(0.9 * p + 0.1 * q))
    elif name == "js":
        p, q = lp.exp(), lq.exp()
        lm = torch.log(0.5 * p + 0.5 * q)
        d = 0.5 * _kl_terms(p, lp, lm) + 0.5 * _kl_terms(q, lq, lm)
    elif name == "tvd":
        d = 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    elif name == "akl":  # as the official code: full descending sort of the teacher, cumulative mask
        p, q = lp.exp(), lq.exp()
        ps, order = torch.sort(p, dim=-1, descending=True)
        head_sorted = ps.cumsum(-1) <= 0.5
        head_sorted[:, 0] = True
        head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
        gap = (p - q.detach()).abs()
        g_head = (gap * head).sum(-1)
        g_tail = (gap * ~head).sum(-1)
        w = g_head / (g_head + g_tail).clamp_min(1e-30)
        d = w * _kl_terms(p, lp, lq) + (1 - w) * _kl_terms(q, lq, lp)
    elif name == "atkd":
        p, q = lp.exp(), lq.exp()
        g = y.clamp_min(0).unsqueeze(-1)
        pg, qg = p.gather(-1, g).squeeze(-1), q.gather(-1, g).squeeze(-1)
        tkd = pg * (pg.log() - qg.log()) + (1 - pg) * ((1 - pg).log() - (1 - qg).log())
        p_hat = p.scatter(-1, g, 0.0) / (1 - pg).unsqueeze(-1)
        dkd = (p_hat * (lp - lq)).sum(-1) - (1 - pg).log() + (1 - qg).log()
        u = (1 - pg).masked_fill(~valid, -1.0)
        n = int(valid.sum())
        n_hard = math.ceil(0.5 * n)
        hard = torch.zeros_like(valid)
        hard[u.topk(n_hard).indices] = True
        easy = valid & ~hard
        return 0.2 * dkd[easy].mean() + 0.8 * (tkd + dkd)[hard].mean()
    else:
        raise ValueError(name)
    return (d * valid).sum() / valid.sum()


# ------------------------------------------------------------------------------------------------- inputs


def make_inputs(bt: int, vocab: int, dtype: torch.dtype, device: str) -> tuple[Tensor, Tensor, Tensor]:
    """[B, T, V] logits and labels, built in place so that building them leaves no transient RSS peak."""
    seq = min(SEQ, bt)
    b = max(1, bt // seq)
    gen = torch.Generator(device=device).manual_seed(0)
    s = torch.empty(b, seq, vocab, dtype=dtype, device=device).normal_(0.0, 2.0, generator=gen)
    t = torch.empty(b, seq, vocab, dtype=dtype, device=device).normal_(0.0, 3.0, generator=gen)
    y = torch.randint(0, vocab, (b, seq), generator=gen, device=device)
    y[:, : seq // 8] = -100
    s.requires_grad_(True)
    return s, t, y


def build(name: str, impl: str, chunk_size: int | None):
    if impl == "naive":
        return lambda s, t, y: naive_loss(name, s, t, y)
    fn = get_loss(name, chunk_size=chunk_size)
    if impl == "kd+compile":
        fn.compile(dynamic=True)
    return fn


# --------------------------------------------------------------------------------------------------- CPU


def _progress(r: dict) -> None:
    print(f"  {r['dtype']:5s} {r['div']:5s} {r['impl']:10s} {r['ms']:9.2f} ms {r['peak_extra_mb']:8.0f} MB", flush=True)


def cpu_worker(args: argparse.Namespace) -> None:
    """One case in this (fresh) process; prints one JSON line.

    `--impl naive` or `--impl kd`: peak extra memory and the value of one fwd + bwd (peak RSS is per process, so
    each implementation gets its own). `--impl pair`: timings only, naive and kd alternating in one process, so a
    neighbour's load slows both alike and the ratio stays fair on a shared machine.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s, t, y = make_inputs(args.bt, args.vocab, DTYPES[args.dtype], "cpu")
    if args.impl == "pair":
        fns = {impl: build(args.div, impl, args.chunk_size) for impl in ("naive", "kd")}
        times: dict[str, list[float]] = {impl: [] for impl in fns}
        for repeat in range(args.repeats + 1):  # the first round warms up both
            for impl, fn in fns.items():
                s.grad = None
                t0 = time.perf_counter()
                fn(s, t, y).backward()
                if repeat:
                    times[impl].append(time.perf_counter() - t0)
        print(json.dumps({impl: 1e3 * statistics.median(ts) for impl, ts in times.items()}), flush=True)
        return
    fn = build(args.div, args.impl, args.chunk_size)
    base = process_memory("VmRSS") or 0
    if reset_peak_memory():
        peak_of = lambda: process_memory("VmHWM") or 0  # noqa: E731
    else:  # ru_maxrss (KiB) is a high-water mark since process start; make_inputs leaves no transient above base
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731
    loss = fn(s, t, y)
    loss.backward()
    peak = peak_of()
    out = {
        "div": args.div,
        "impl": args.impl,
        "dtype": args.dtype,
        "peak_extra_mb": (peak - base) / 2**20,
        "loss": float(loss.detach()),
    }
    print(json.dumps(out), flush=True)


def _worker(args: argparse.Namespace, name: str, impl: str, dtype: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--div", name,
        "--impl", impl,
        "--dtype", dtype,
        "--bt", str(args.bt),
        "--vocab", str(args.vocab),
        "--repeats", str(args.repeats),
    ]  # fmt: skip
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"worker failed: {name} {impl} {dtype}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cpu(args: argparse.Namespace, names: list[str], dtypes: list[str]) -> list[dict]:
    results = []
    for dtype in dtypes:
        for name in names:
            load_before = os.getloadavg()[0]
            cases = {impl: _worker(args, name, impl, dtype) for impl in ("naive", "kd")}
            timings = _worker(args, name, "pair", dtype)
            # Other processes on the machine inflate CPU timings (OpenMP threads spin on busy cores); the load is
            # recorded so a reader can tell a quiet run from a busy one.
            load = max(load_before, os.getloadavg()[0])
            for impl, res in cases.items():
                res.update(ms=timings[impl], load=load)
                results.append(res)
                _progress(res)
    return results


# -------------------------------------------------------------------------------------------------- CUDA


def run_cuda(args: argparse.Namespace, names: list[str], dtypes: list[str]) -> list[dict]:
    impls = ["naive", "kd"] + (["kd+compile"] if args.compile else [])
    results = []
    for dtype in dtypes:
        s, t, y = make_inputs(args.bt, args.vocab, DTYPES[dtype], "cuda")
        for name in names:
            for impl in impls:
                fn = build(name, impl, args.chunk_size)
                s.grad = None
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                loss = fn(s, t, y)
                loss.backward()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
                value = float(loss.detach())
                for _ in range(2 if impl == "kd+compile" else 1):  # compile: recompiles for the last chunk's shape
                    s.grad = None
                    fn(s, t, y).backward()
                times = []
                for _ in range(args.repeats):
                    s.grad = None
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn(s, t, y).backward()
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end))
                s.grad = None
                res = {
                    "div": name,
                    "impl": impl,
                    "dtype": dtype,
                    "ms": statistics.median(times),
                    "peak_extra_mb": peak / 2**20,
                    "loss": value,
                }
                results.append(res)
                _progress(res)
        del s, t, y
    return results


# ----------------------------------------------------------------------------------------------- reporting


def summarise(results: list[dict], mem_target: float = 0.35) -> tuple[list[list[str]], list[str]]:
    rows, gaps = [], []
    naive = {(r["div"], r["dtype"]): r for r in results if r["impl"] == "naive"}
    for r in results:
        if r["impl"] == "naive":
            continue
        n = naive[(r["div"], r["dtype"])]
        mem_ratio = r["peak_extra_mb"] / n["peak_extra_mb"]
        speedup = n["ms"] / r["ms"]
        ok = mem_ratio <= mem_target and speedup >= 1.0
        if not ok:
            gaps.append(
                f"{r['div']} {r['dtype']} {r['impl']}: memory {mem_ratio:.2f}× naive (target ≤ {mem_target}), "
                f"speed {speedup:.2f}× naive (target ≥ 1)"
            )
        rows.append(
            [
                r["div"],
                r["dtype"],
                r["impl"],
                f"{n['ms']:.1f}",
                f"{r['ms']:.1f}",
                f"{speedup:.2f}×",
                f"{n['peak_extra_mb']:.0f}",
                f"{r['peak_extra_mb']:.0f}",
                f"{mem_ratio:.2f}×",
                "met" if ok else "GAP",
                f"{abs(r['loss'] - n['loss']) / max(abs(n['loss']), 1e-12):.1e}",
            ]
        )
    return rows, gaps


HEADER = [
    "divergence",
    "dtype",
    "impl",
    "naive ms",
    "kd ms",
    "speed-up",
    "naive MB",
    "kd MB",
    "kd/naive mem",
    "targets",
    "rel. diff",
]


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def machine(device: str) -> str:
    torch_v = torch.__version__
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch_v}, CUDA {torch.version.cuda}"
    total = memory_info("MemTotal")
    mem = f", {total / 2**30:.0f} GiB RAM" if total else ""
    threads = torch.get_num_threads()
    py = platform.python_version()
    return f"{cpu_model()}, {os.cpu_count()} cores ({threads} torch threads){mem}, torch {torch_v}, Python {py}"


def write_docs(path: Path, section: str, body: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"## {section}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def write_section(path: Path, section: str) -> None:
    """`write_docs` for a section rendered whole, its `## Title` line first."""
    heading, _, body = section.partition("\n")
    write_docs(path, heading.removeprefix("## "), body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--bt", type=int, default=4096, help="B·T rows (default 4096)")
    ap.add_argument("--vocab", type=int, default=None, help="V (default 49152 on CPU, 128256 on CUDA)")
    ap.add_argument("--dtype", default=None, help="fp32, bf16, fp16 or a comma list (default fp32,bf16 CPU; bf16 CUDA)")
    ap.add_argument("--repeats", type=int, default=3, help="timed fwd+bwd runs after the warm-up/memory run")
    ap.add_argument("--only", default=None, help="comma list of divergences (default: all)")
    ap.add_argument("--chunk-size", type=int, default=None, help="override kd's automatic chunk size (rows)")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads per case (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="CUDA: also time kd with torch.compile'd chunk kernels")
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md", help="file to write the section to")
    ap.add_argument("--no-docs", action="store_true", help="print only, do not touch the docs")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--div", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vocab is None:
        args.vocab = 128_256 if args.device == "cuda" else 49_152
    if args.worker:
        cpu_worker(args)
        return
    dtypes = (args.dtype or ("bf16" if args.device == "cuda" else "fp32,bf16")).split(",")
    names = args.only.split(",") if args.only else list(LOSSES)
    for n in names:
        if n not in LOSSES:
            raise SystemExit(f"unknown divergence {n!r}; valid: {', '.join(LOSSES)}")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; valid: {', '.join(DTYPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")

    print(f"kd losses benchmark: {args.device}, B·T = {args.bt}, V = {args.vocab}, {dtypes}, {machine(args.device)}")
    t0 = time.time()
    results = run_cuda(args, names, dtypes) if args.device == "cuda" else run_cpu(args, names, dtypes)
    rows, gaps = summarise(results)
    table = markdown_table(rows)
    print()
    print(table)
    print()
    print("targets (peak extra memory ≤ 0.35× naive, time ≤ naive):", "all met" if not gaps else "GAPS:")
    for g in gaps:
        print("  " + g)
    if args.no_docs:
        return
    argv = sys.argv[1:]
    if "--docs" in argv:  # where the table was written is not part of how to reproduce it
        i = argv.index("--docs")
        argv = argv[:i] + argv[i + 2 :]
    cmd = "python bench/losses.py " + " ".join(argv)
    loads = [r["load"] for r in results if "load" in r]
    load_note = (
        f" 1-minute load average around the cases: {min(loads):.1f}–{max(loads):.1f} "
        f"(the machine has {os.cpu_count()} cores; a higher load means other processes shared them)."
        if loads
        else ""
    )
    body = "\n".join(
        [
            f"Machine: {machine(args.device)}.",
            f"Command: `{cmd.strip()}` ({time.time() - t0:.0f} s, {time.strftime('%Y-%m-%d')}).",
            "",
            f"B·T = {args.bt} rows (sequences of {min(SEQ, args.bt)} with the first eighth masked as prompt), "
            f"V = {args.vocab}, fwd + bwd of the loss with respect to the student logits, default parameters. "
            "Naive = full-tensor float32 (log-)softmaxes and autograd (torchtune ForwardKLLoss / DistiLLM style; "
            "AKL with the official full sort). Peak extra memory is above the inputs (student logits, teacher "
            "logits, labels) and includes the student-logit gradient in both columns; "
            + (
                "CPU figures are peak RSS of a fresh subprocess per case."
                if args.device == "cpu"
                else "CUDA figures are torch.cuda.max_memory_allocated."
            )
            + f" Time: median of {args.repeats} runs after a warm-up"
            + (", naive and kd alternating in one process." if args.device == "cpu" else ".")
            + " rel. diff = |kd − naive| / naive loss value."
            + load_note
            + (
                " kd+compile = `get_loss(name).compile(dynamic=True)`: the per-chunk functions under torch.compile "
                "(compilation happens in the warm-up call, not in the timings)."
                if args.compile
                else ""
            )
            + (
                " The rel. diff of atkd comes from the naive side: it ranks positions by 1 − p_g in float32, which "
                "ties or reorders near-equal uncertainties; kd ranks by log p_g and matches a float64 reference."
                if "atkd" in names
                else ""
            ),
            "",
            table,
            "",
            "Targets (peak extra memory ≤ 0.35× naive and time no worse than naive): "
            + ("met for every divergence." if not gaps else "not met for: " + "; ".join(gaps) + "."),
        ]
    )
    section = "Losses (CPU)" if args.device == "cpu" else "Losses (CUDA)"
    write_docs(args.docs, section, body)
    print(f"wrote section '{section}' of {args.docs}")


if __name__ == "__main__":
    main()
