"""One command for a GPU: the CUDA tests, a short demo training in fp16 and bf16, and the benchmark
against timm (Swin-T and SwinV2-T, training step and inference, eager and compiled), with the
fraction of the GPU's bf16 peak each figure reaches. Writes ``gpu_check.json`` and
``gpu_check.md`` into ``--out`` (default ``$OUT``, else ``output/gpu-check``).

    make gpu-check                 # or: python3 scripts/gpu_check.py --out DIR

Runs with the interpreter it is started with (on a GPU machine, its own ``python3`` with torch),
not the project's venv. yacs and termcolor, which such an image may lack, are installed from the
wheels in ``.whl/`` (no network) into ``.whl/site`` and put on the path. On a machine without CUDA
it says so in one line and exits 0. Each step has a time limit (tests 120 s, demo data 30 s, two
demo trainings 60 s each, two benchmarks 140 s each), so the whole check fits one 10-minute
command; a step that fails or runs out of time is recorded and the next one runs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(ROOT, ".whl")
WHEEL_SITE = os.path.join(WHEELS, "site")

# Dense bf16 tensor-core peaks (TFLOP/s) as published, by a substring of the device name; the
# check also measures a large bf16 matrix product and reports both.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}
# Forward GFLOP per image (2 x the GMACs of model.flops()); a training step counts 3x.
FORWARD_GFLOP = {"swin_tiny": 2 * 4.49, "swinv2_tiny": 2 * 5.93}


def ensure_dependencies() -> list[str]:
    """Install what the image lacks from ``.whl/`` (offline); returns what was installed."""
    missing = []
    for module in ("yacs", "termcolor"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if not missing:
        return []
    wheels = sorted(glob.glob(os.path.join(WHEELS, "*.whl")))
    if not wheels:
        raise SystemExit(f"gpu-check: {', '.join(missing)} missing and no wheels in {WHEELS}; copy them there")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", WHEEL_SITE, *wheels],
        check=True,
    )
    return missing


def child_env() -> dict:
    env = dict(os.environ)
    paths = [ROOT] + ([WHEEL_SITE] if os.path.isdir(WHEEL_SITE) else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_step(name: str, cmd: list[str], limit_s: int, out_dir: str) -> dict:
    """Run one step in a subprocess with a time limit; its output goes to ``{out_dir}/{name}.log``."""
    start = time.time()
    log_path = os.path.join(out_dir, f"{name}.log")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=limit_s)
        status, output = (
            ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"),
            proc.stdout + proc.stderr,
        )
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {limit_s} s"
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    with open(log_path, "w") as f:
        f.write(output)
    seconds = round(time.time() - start, 1)
    print(f"gpu-check: {name}: {status} in {seconds} s", flush=True)
    return {"step": name, "status": status, "seconds": seconds, "tail": output[-2000:]}


def measured_bf16_tflops() -> float:
    """A large bf16 matrix product, timed: what this GPU delivers to a dense kernel."""
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    iters, start = 20, time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def gpu_info() -> dict:
    import torch

    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    return {
        "gpu": name,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "bf16_peak_tflops_published": peak,
        "bf16_matmul_tflops_measured": round(measured_bf16_tflops(), 1),
    }


def mfu_rows(bench: dict, model: str, peak_tflops: float | None) -> list[dict]:
    """The benchmark's rows with the fraction of the bf16 peak each images/s reaches."""
    rows = []
    for r in bench.get("rows", []):
        gflop = FORWARD_GFLOP[model] * (3 if r["phase"] == "train" else 1)
        row = dict(
            model=model,
            phase=r["phase"],
            dtype=r["dtype"],
            mode=r["mode"],
            ours=r.get("ours_img_s"),
            timm=r.get("timm_img_s"),
            ratio=r.get("ratio"),
        )
        row["mfu"] = row["ours"] * gflop / 1e3 / peak_tflops if row["ours"] and peak_tflops else None
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    """The report as the README's table: one row per model, phase, dtype and mode."""
    info = report.get("machine", {})
    lines = [
        f"GPU: {info.get('gpu')} (compute {info.get('capability')}, {info.get('memory_gib')} GiB), torch "
        f"{info.get('torch')}, CUDA {info.get('cuda')}; bf16 peak {info.get('bf16_peak_tflops_published')} TFLOP/s "
        f"published, {info.get('bf16_matmul_tflops_measured')} measured (8192² matmul).",
        "",
        "| model | phase | dtype | mode | ours img/s | timm img/s | ours/timm | MFU (bf16 peak) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for r in report.get("benchmark", []):
        lines.append(
            f"| {r['model']} | {r['phase']} | {r['dtype']} | {r['mode']} | {fmt(r['ours'], '.1f')} | "
            f"{fmt(r['timm'], '.1f')} | {fmt(r['ratio'], '.2f')} | {fmt(r['mfu'], '.1%')} |"
        )
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in report.get("steps", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "output", "gpu-check"))
    p.add_argument("--quick", action="store_true", help="fewer benchmark rounds (a smoke run)")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu-check: torch is not installed here; nothing to check")
        return 0
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing to check (run it where a GPU is)")
        return 0
    os.makedirs(args.out, exist_ok=True)
    report: dict = {"installed_from_wheels": ensure_dependencies(), "steps": [], "benchmark": []}
    report["machine"] = gpu_info()
    print(f"gpu-check: {report['machine']}", flush=True)
    py = sys.executable

    def save() -> None:
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
            f.write(markdown(report))

    cuda_tests = ["tests/test_kernels.py", "tests/test_fast_paths.py", "tests/test_model_v2.py", "tests/test_model.py"]
    report["steps"].append(run_step("cuda-tests", [py, "-m", "pytest", "-q", "-x", *cuda_tests], 120, args.out))
    save()
    data = os.path.join(args.out, "demo_data")
    report["steps"].append(run_step("demo-data", [py, "scripts/prepare_demo_data.py", "--out", data], 30, args.out))
    for dtype in ("float16", "bfloat16"):
        cmd = [
            py,
            "main.py",
            "--cfg",
            "configs/demo/swin_demo_digits.yaml",
            "--data-path",
            data,
            "--device",
            "cuda",
            "--output",
            args.out,
            "--tag",
            f"demo-{dtype}",
            "--opts",
            "TRAIN.EPOCHS",
            "3",
            "AMP_DTYPE",
            dtype,
        ]
        report["steps"].append(run_step(f"demo-train-{dtype}", cmd, 60, args.out))
        save()
    rounds = ["--rounds", "2" if args.quick else "5"]
    peak = report["machine"]["bf16_peak_tflops_published"] or report["machine"]["bf16_matmul_tflops_measured"]
    for model in ("swin_tiny", "swinv2_tiny"):
        json_path = os.path.join(args.out, f"bench_{model}.json")
        cmd = [
            py,
            "scripts/benchmark.py",
            "--model",
            model,
            "--device",
            "cuda",
            "--dtypes",
            "bf16,fp16",
            "--modes",
            "eager,compiled",
            "--train",
            "--compile-budget",
            "60",
            "--json",
            json_path,
            *rounds,
        ]
        report["steps"].append(run_step(f"benchmark-{model}", cmd, 140, args.out))
        if os.path.isfile(json_path):
            with open(json_path) as f:
                report["benchmark"] += mfu_rows(json.load(f), model, peak)
        save()
    print(markdown(report))
    print(f"gpu-check: wrote {os.path.join(args.out, 'gpu_check.json')} and gpu_check.md")
    return 0 if all(s["status"] == "ok" for s in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
