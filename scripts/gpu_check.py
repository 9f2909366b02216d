"""One command for a GPU: the CUDA tests, short demo trainings in fp16 and bf16, and the benchmark
against timm (Swin-T and SwinV2-T, training step and inference, eager and compiled), with the
fraction of the GPU's bf16 peak each figure reaches. Writes ``gpu_check.json`` and
``gpu_check.md`` into ``--out`` (default ``$OUT``, else ``output/gpu-check``).

    make gpu-check                 # or: python3 scripts/gpu_check.py --out DIR

Runs with the interpreter it is started with (on a GPU machine, its own ``python3`` with torch),
not the project's venv. yacs and termcolor, which such an image may lack, are installed from the
wheels in ``.whl/`` (no network) into ``.whl/site`` and put on the path. On a machine without CUDA
it says so in one line and exits 0. Each step has a time limit (tests 120 s, demo data 30 s, three
demo trainings 60 s each, eager benchmarks 100 s and compiled ones 300 s each) and the whole check
a budget (``--budget``, 540 s), so it fits one 10-minute command: the steps run in order of
importance (CUDA tests, fp16/bf16 trainings, eager figures, then the compiled ones the budget may
cut), and a step that fails or runs out of time is recorded and the next one runs. On an H200 the
budget reaches Swin-T's compiled row (four compiles of 15-75 s each); ``--steps
benchmark-swinv2_tiny-compiled`` runs what it cut in a second command.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(ROOT, ".whl")
WHEEL_SITE = os.path.join(WHEELS, "site")

# Dense bf16 tensor-core peaks (TFLOP/s) as published, by a substring of the device name; the
# check also measures a large bf16 matrix product and reports both.
# The first name found in the device's name wins: the PCIe and NVL cards before their SXM namesakes.
BF16_PEAK_TFLOPS = {
    "H200 NVL": 835.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "4090": 165.0,
}


def published_bf16_peak(device_name: str) -> float | None:
    """The published dense bf16 peak (TFLOP/s) of the GPU called ``device_name``; None if unknown."""
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_name), None)


# Forward GFLOP per image (2 x the GMACs of model.flops()); a training step counts 3x.
FORWARD_GFLOP = {"swin_tiny": 2 * 4.49, "swinv2_tiny": 2 * 5.93}


# A step with less time than this left before the deadline is skipped rather than started.
MIN_STEP_S = 5.0
# Tests that exercise CUDA when there is a GPU (the rest of the suite runs on the CPU in CI).
CUDA_TESTS = ["tests/test_kernels.py", "tests/test_fast_paths.py", "tests/test_uint8_batches.py"]
# Short trainings through main.py: fp16 with the loss scaler and bf16, V1 and V2.
DEMO_TRAININGS = [
    ("configs/demo/swin_demo_digits.yaml", "float16"),
    ("configs/demo/swin_demo_digits.yaml", "bfloat16"),
    ("configs/demo/swinv2_demo_digits.yaml", "bfloat16"),
]


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


def run_step(name: str, cmd: list[str], limit_s: float, out_dir: str) -> dict:
    """Run one step in its own process group with a time limit; its output streams to
    ``{out_dir}/{name}.log`` (kept when the step is stopped). On time-out the whole group is
    killed, so compile workers a step started do not run on into the next one."""
    start = time.time()
    log_path = os.path.join(out_dir, f"{name}.log")
    if limit_s < MIN_STEP_S:
        print(f"gpu-check: {name}: skipped (the check's deadline is reached)", flush=True)
        return {"step": name, "status": "skipped: deadline", "seconds": 0.0, "tail": ""}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=limit_s)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timed out after {limit_s:.0f} s"
    with open(log_path, errors="replace") as f:
        output = f.read()
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
    peak = published_bf16_peak(name)
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
    p.add_argument(
        "--steps",
        default="",
        help="only the steps whose names start with one of these (comma list, e.g. "
        "benchmark-swinv2_tiny-compiled); default all",
    )
    p.add_argument(
        "--budget", type=float, default=540.0, help="seconds for the whole check; later steps are cut (default 540)"
    )
    args = p.parse_args(argv)
    # Steps run in the repository root: a relative --out must mean the same folder to them and here.
    args.out = os.path.abspath(args.out)
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

    deadline = time.time() + args.budget

    wanted = [w.strip() for w in args.steps.split(",") if w.strip()]

    def selected(name: str) -> bool:
        return not wanted or any(name.startswith(w) for w in wanted)

    def step(name: str, cmd: list[str], limit_s: float, needed: bool = False) -> None:
        """Run ``cmd`` as step ``name`` if selected (or ``needed`` by a selected step), within the budget."""
        if not (needed or selected(name)):
            return
        report["steps"].append(run_step(name, cmd, min(limit_s, deadline - time.time()), args.out))
        save()

    # In order of what a GPU session must not miss: correctness first, then eager figures, then
    # compiled ones (the compiles take most of the time and are the first to be cut by the deadline).
    step("cuda-tests", [py, "-m", "pytest", "-q", "-rs", *CUDA_TESTS], 120)
    data = os.path.join(args.out, "demo_data")
    trainings = [
        (f"demo-train-{os.path.basename(cfg).split('_')[0]}-{dtype}", cfg, dtype) for cfg, dtype in DEMO_TRAININGS
    ]
    needed = any(selected(name) for name, _, _ in trainings)
    step("demo-data", [py, "scripts/prepare_demo_data.py", "--out", data], 30, needed=needed)
    for name, cfg, dtype in trainings:
        cmd = [py, "main.py", "--cfg", cfg, "--data-path", data, "--device", "cuda", "--output", args.out]
        cmd += ["--tag", name, "--opts", "TRAIN.EPOCHS", "8", "AMP_DTYPE", dtype]
        step(name, cmd, 60)
    rounds = ["--rounds", "2" if args.quick else "3"]
    peak = report["machine"]["bf16_peak_tflops_published"] or report["machine"]["bf16_matmul_tflops_measured"]
    for mode, dtypes, limit_s in (("eager", "bf16,fp16", 100), ("compiled", "bf16", 300)):
        for model in ("swin_tiny", "swinv2_tiny"):
            name = f"benchmark-{model}-{mode}"
            if not selected(name):
                continue
            json_path = os.path.join(args.out, f"bench_{model}_{mode}.json")
            if os.path.isfile(json_path):
                os.remove(json_path)  # an earlier check's figures are not this one's
            cmd = [py, "scripts/benchmark.py", "--model", model, "--device", "cuda", "--dtypes", dtypes]
            cmd += ["--modes", mode, "--train", "--half-forward", "cast", "--compile-budget", "100"]
            step(name, [*cmd, "--json", json_path, *rounds], limit_s)
            if os.path.isfile(json_path):
                with open(json_path) as f:
                    report["benchmark"] += mfu_rows(json.load(f), model, peak)
                save()
    print(markdown(report))
    print(f"gpu-check: wrote {os.path.join(args.out, 'gpu_check.json')} and gpu_check.md")
    # Steps the budget cut are expected on a slower GPU (--steps runs them next): not failures.
    return 0 if all(s["status"] in ("ok", "skipped: deadline") for s in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
