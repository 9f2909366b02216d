"""Throughput of this project's Swin against timm's, with identical weights, measured side by side.

    python scripts/benchmark.py [--model swin_tiny] [--batch-size 16] [--img-size 224]
        [--dtypes fp32,bf16] [--modes eager,compiled] [--train] [--memory] [--levers]
        [--iters 2] [--rounds 5] [--json out.json] [--device auto]

Both models get the same weights: ours is built from the config (``--model`` is a name under
configs/, ``demo`` for the digits demo, or a YAML path), timm's SwinTransformer with the same
architecture (``swin_tiny_patch4_window7_224`` for swin_tiny; for V2 configs timm's
SwinTransformerV2, ``swinv2_tiny_window8_256`` for swinv2_tiny) loads our state_dict through timm's
``checkpoint_filter_fn``; the script checks that the fp32 logits agree.

Timing uses ``timing.time_images_per_second`` (as ``main.py --throughput``). Other processes may
share the machine, so every row times its candidates in the same run, interleaved: each round
times every candidate once (``--iters`` batches each, the order reversed every other round) and
the table reports the median images/s over ``--rounds`` rounds, the ratio ours/timm of those
medians, and ``paired``: the median over rounds of each round's own ratio (the steadier figure
when the machine's load drifts). Before the rounds, ``--warmup`` batches each and, on the CPU,
up to ``--settle`` passes over all candidates until the page faults stop
(``timing.settle_page_faults``), so the first round does not time the heap growing.

Rows:
* forward: images/s under ``torch.inference_mode``. fp32; bf16 (autocast and weights cast to
  bf16, each side's best is reported; ``--half-forward cast`` times only the cast, which halves
  the compiles); fp16 the same, on CUDA only. On the CPU the eager rows add ``fast path``:
  our model as ``--eval``/``--throughput``/``predict.py`` run it (``inference.inference_model``:
  linear weights prepacked, ``models.prepacked``; in bf16 as bf16 copies under autocast), and
  with ``--onnxruntime`` the fp32 row our model exported to ONNX.
* train (``--train``): one step = forward + cross-entropy + backward + AdamW step. Ours uses
  ``optimizer.build_optimizer`` (TRAIN.OPTIMIZER.IMPL from the config), timm's side
  ``torch.optim.AdamW`` over the same parameter groups, lr, betas, eps, weight decay and
  foreach/fused setting. fp32; bf16 autocast (fp16 + GradScaler on CUDA).
* modes: ``eager``; ``compiled``: ``torch.compile`` of the whole model on both sides;
  ``frozen`` (forward only): the same with Inductor's weight freezing (weights prepacked, what
  ``--eval --compile`` runs, ``inference.FrozenCompiled``), on both sides;
  ``blocks``: each Swin block compiled on its own (ours through ``models.compile_model``, what
  ``--compile`` does in training; timm's blocks the same way). Compile time = the first call; a
  side whose compile takes longer than ``--compile-budget`` seconds is recorded as skipped.
* memory (``--memory``): peak memory per image of an fp32 training step, with and without
  gradient checkpointing. CUDA: ``torch.cuda.max_memory_allocated`` above the memory in use
  before the step. CPU: the peak of the running sum of tensor allocations and frees that
  ``torch.profiler(profile_memory=True)`` records during the step (so it counts activations,
  gradients and temporaries, not the weights and optimizer state that exist before it). The
  profiler sees no free of a tensor made before it started, so the previous step's gradients,
  dropped by ``zero_grad(set_to_none=True)``, are never subtracted: the CPU figure is the CUDA
  one plus the gradients' bytes per image (Swin-T batch 16: ~7 MiB), and the two are not compared.
* sharded memory (``--memory --ranks N``): per-rank memory and step time of a training step of
  ``--ranks-models`` (default Swin-B and Swin-L) under DDP and under FSDP on N CPU processes
  (gloo), the share of parameters, gradients and AdamW state each rank holds, and its peak RSS
  (``sharding_memory.py``; nothing else is measured, timm is not involved).
* levers (``--levers [NAMES]``): rows with our model's switches flipped (attention path, eval
  bias cache, gather vs roll partition, folding windows into heads vs expanding the bias, the
  release's -100 shift mask vs V1's underflowing one, foreach vs single-tensor AdamW), timm
  alongside. Forward levers take ``--levers-dtype`` (weights cast) and ``--levers-mode
  compiled``; train levers are fp32 eager.

bf16 on a CPU without AVX-512 BF16 / AMX is emulated (a few GFLOP/s against ~90 fp32): such
rows are timed with one warm-up and one iteration and flagged, and bf16 training is skipped
there (it would take minutes per step and tell nothing new).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from allocator import retain_freed_memory  # noqa: E402
from config import get_config, model_section  # noqa: E402
from distributed import Precision, configure_matmul_precision, cpu_has_fast_bf16, synchronize  # noqa: E402
from inference import FrozenCompiled, inference_model  # noqa: E402
from models.build import build_model  # noqa: E402
from models.compile import allow_recompiles, compile_model  # noqa: E402
from models.onnx_export import EXPORTERS  # noqa: E402
from models.prepacked import PrepackedLinear, prepack_linears  # noqa: E402
from models.swin_transformer import WindowAttention  # noqa: E402
from models.swin_transformer_v2 import WindowAttentionV2  # noqa: E402
from models.windows import MASK_VALUE, WindowBlockBase  # noqa: E402
from optimizer import build_optimizer, param_groups  # noqa: E402
from timing import QUIET_FAULTS_PER_BATCH, SETTLE_PASSES, settle_page_faults, time_images_per_second  # noqa: E402

MODELS = {
    "swin_tiny": "configs/swin_tiny.yaml",
    "swin_small": "configs/swin_small.yaml",
    "swin_base": "configs/swin_base.yaml",
    "demo": "configs/demo/swin_demo_digits.yaml",
    "swinv2_tiny": "configs/swinv2/swinv2_tiny_patch4_window8_256.yaml",
    "swinv2_tiny_w16": "configs/swinv2/swinv2_tiny_patch4_window16_256.yaml",
    "swinv2_demo": "configs/demo/swinv2_demo_digits.yaml",
}
TIMM_NAMES = {
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
    "swinv2_tiny": "swinv2_tiny_window8_256",
    "swinv2_tiny_w16": "swinv2_tiny_window16_256",
}
# The image size each timm name is built for.
TIMM_SIZES = {"swinv2_tiny": 256, "swinv2_tiny_w16": 256}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Machine and models
# ---------------------------------------------------------------------------------------------
def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """GFLOP/s of square matrix products in ``dtype`` on ``device`` (2n³ per product): the fastest
    product of those run in ``seconds``, the ceiling any model's images/s is measured against (a
    mean over the window would let a shared VM's slow moments lower the ceiling; seen on a 2-core
    VM: a row at "101 %" of a bound measured in one)."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up (and the first call's allocation)
    synchronize(device)
    best, start = float("inf"), time.perf_counter()
    while True:
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        now = time.perf_counter()
        best = min(best, now - t0)
        if now - start >= seconds:
            return 2.0 * n**3 / best / 1e9


def matmul_peaks(device: torch.device, slow_bf16: bool, seconds: float = 1.0) -> dict[str, float | None]:
    """:func:`matmul_peak_gflops` per dtype the rows are set against: fp32, bf16 (None where the
    CPU only emulates it) and, on CUDA, fp16."""
    peaks = {"fp32": matmul_peak_gflops(device, torch.float32, seconds)}
    peaks["bf16"] = None if slow_bf16 else matmul_peak_gflops(device, torch.bfloat16, seconds)
    if device.type == "cuda":
        peaks["fp16"] = matmul_peak_gflops(device, torch.float16, seconds)
    return peaks


def higher_peaks(first: dict[str, float | None], last: dict[str, float | None]) -> dict[str, float | None]:
    """Per dtype, the higher of the peaks measured before and after the rows. A shared VM's core
    can slow down for minutes; a run whose only measurement fell in such a stretch showed the
    fp32 fast path at 102 % of its bound (2-core AMD EPYC, a 21-minute run)."""
    return {k: max((v for v in (first[k], last.get(k)) if v), default=None) for k in first}


def isa_line(info: dict) -> str:
    """The CPU's vector instruction sets that decide fp32 and bf16 speed, in one line."""
    names = [("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-512 BF16", "avx512_bf16"), ("AMX", "amx")]
    return ", ".join(f"{label} {'yes' if info.get(key) else 'no'}" for label, key in names)


def machine_info(device: torch.device) -> dict:
    cpu, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not cpu:
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    import timm

    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "avx2": " avx2" in flags,
        "avx512f": " avx512f" in flags,
        "avx512_bf16": " avx512_bf16" in flags,
        "amx": " amx_bf16" in flags or " amx_tile" in flags,
        "fast_bf16": cpu_has_fast_bf16(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        info["triton"] = None
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_at_start"] = f.read().split()[:3]
    except OSError:
        pass
    info["cpu"] = info["cpu"] or platform.processor() or platform.machine()
    return info


def load_config(model: str, img_size: int | None, extra_opts: list[str]):
    path = MODELS.get(model, model)
    if not os.path.isabs(path):
        path = os.path.join(ROOT, path)
    opts = list(extra_opts)
    if img_size:
        opts += ["DATA.IMG_SIZE", str(img_size)]
    return get_config(path, opts)


def build_timm(config, model_name: str) -> torch.nn.Module:
    """timm's SwinTransformer (or SwinTransformerV2, for ``MODEL.TYPE: swinv2``) with the
    architecture of ``config``."""
    import timm

    s = model_section(config)
    kwargs = dict(
        img_size=config.DATA.IMG_SIZE,
        num_classes=config.MODEL.NUM_CLASSES,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
    )
    name = TIMM_NAMES.get(model_name)
    if config.MODEL.TYPE == "swinv2":
        from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

        if s.APE or not s.PATCH_NORM:
            raise SystemExit("this config (APE / no patch norm) has no timm equivalent")
        pretrained = tuple(s.PRETRAINED_WINDOW_SIZES)
        if name and config.DATA.IMG_SIZE == TIMM_SIZES.get(model_name):
            return timm.create_model(name, pretrained=False, pretrained_window_sizes=pretrained, **kwargs)
        return TimmSwinV2(
            patch_size=s.PATCH_SIZE,
            in_chans=s.IN_CHANS,
            embed_dim=s.EMBED_DIM,
            depths=tuple(s.DEPTHS),
            num_heads=tuple(s.NUM_HEADS),
            window_size=s.WINDOW_SIZE,
            mlp_ratio=s.MLP_RATIO,
            qkv_bias=s.QKV_BIAS,
            pretrained_window_sizes=pretrained,
            **kwargs,
        )
    from timm.models.swin_transformer import SwinTransformer as TimmSwin

    if s.APE or not s.PATCH_NORM or not s.SHIFT or not s.RPB or s.QK_SCALE:
        raise SystemExit("this config (APE / no patch norm / no shift / no RPB / QK_SCALE) has no timm equivalent")
    if name and config.DATA.IMG_SIZE == 224:
        return timm.create_model(name, pretrained=False, **kwargs)
    return TimmSwin(
        patch_size=s.PATCH_SIZE,
        in_chans=s.IN_CHANS,
        embed_dim=s.EMBED_DIM,
        depths=tuple(s.DEPTHS),
        num_heads=tuple(s.NUM_HEADS),
        window_size=s.WINDOW_SIZE,
        mlp_ratio=s.MLP_RATIO,
        qkv_bias=s.QKV_BIAS,
        **kwargs,
    )


def paired_models(config, model_name: str, device: torch.device):
    """(ours, timm) with identical weights, on ``device``, and the fp32 eval logits' max |diff|."""
    if config.MODEL.TYPE == "swinv2":
        from timm.models.swin_transformer_v2 import checkpoint_filter_fn
    else:
        from timm.models.swin_transformer import checkpoint_filter_fn

    torch.manual_seed(0)
    ours = build_model(config)
    theirs = build_timm(config, model_name)
    theirs.load_state_dict(checkpoint_filter_fn(ours.state_dict(), theirs))
    ours.to(device).eval()
    theirs.to(device).eval()
    s = model_section(config)
    x = torch.randn(2, s.IN_CHANS, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE, device=device)
    with torch.inference_mode():
        diff = float((ours(x) - theirs(x)).abs().max())
    return ours, theirs, diff


# Forward levers: a name and the switches of ``variant`` it sets.
FORWARD_LEVERS = {
    "attn=auto": {},
    "attn=sdpa": {"attn_impl": "sdpa"},
    "attn=reference": {"attn_impl": "reference"},
    "roll+partition": {"gather": False},
    "no eval bias cache": {"cache": False},
    "fold windows": {"fold": True},
    "expand bias": {"fold": False},
    "roll+expand bias": {"gather": False, "fold": False},
    "prepacked linears": {"prepack": True},
    "release mask": {"release_mask": True},
}
DEFAULT_LEVERS = ("attn=auto", "attn=sdpa", "attn=reference", "roll+partition", "no eval bias cache")


def variant(
    model: torch.nn.Module,
    attn_impl: str | None = None,
    gather: bool = True,
    cache: bool = True,
    fold: bool | None = None,
    prepack: bool = False,
    release_mask: bool = False,
):
    """A copy of our model with the speed switches set (same weights); ``fold`` None keeps the
    device's choice of folding windows into heads for shifted-window sdpa; ``prepack``: the linear
    weights reordered for oneDNN (``models.prepacked``), in the dtype the copy is cast to later;
    ``release_mask``: shifted windows masked with the release's -100 (subnormal weights) instead
    of V1's underflowing value (V2 uses -100 either way)."""
    m = copy.deepcopy(model)
    if prepack:
        prepack_linears(m)
    for mod in m.modules():
        if isinstance(mod, (WindowAttention, WindowAttentionV2)):
            if attn_impl:
                mod.attn_impl = attn_impl
            mod.cache_eval_bias = cache
            mod.fold_windows = fold
        elif isinstance(mod, WindowBlockBase):
            mod.gather_partition = gather
            if release_mask:
                mod.mask_value = MASK_VALUE
    return m


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def top_kernels(step: Callable[[], None], device: torch.device, n: int) -> list[dict]:
    """The ``n`` operations (kernels, on a GPU) with the most self time in one call of ``step``:
    where two candidates' time differs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    synchronize(device)
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"name": e.key, "calls": e.count, "ms": getattr(e, attr) / 1e3} for e in events[:n]]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def onnxruntime_step(model: torch.nn.Module, x: torch.Tensor, exporter: str = "auto") -> tuple[Callable[[], None], str]:
    """One inference batch of ``model`` exported to ONNX by ``exporter`` and run by onnxruntime on
    the CPU, with as many threads as torch uses (the peer a CPU user might pick instead); and the
    exporter that wrote it ('dynamo' or 'torchscript': auto may have fallen back)."""
    from models.onnx_export import export_onnx, onnxruntime_session

    path = os.path.join(tempfile.mkdtemp(prefix="bench_onnx_"), "model.onnx")
    used = export_onnx(model, path, x.shape[-1], x.shape[1], batch=x.shape[0], exporter=exporter)
    session = onnxruntime_session(path, threads=torch.get_num_threads())
    feed = {"images": x.detach().cpu().numpy()}
    return (lambda: session.run(None, feed)), used


# The fast path's note per autocast dtype (None: fp32) the inference commands prepack under.
FAST_PATH_NOTES = {
    None: "as --eval/--throughput run it in fp32: linear weights prepacked",
    torch.bfloat16: "as --eval/--throughput run it in bf16: autocast, linear weights prepacked in bf16",
}


def fast_path_model(model: torch.nn.Module, amp: torch.dtype | None) -> torch.nn.Module | None:
    """A copy of our model as the eager inference commands run it on the CPU under autocast to
    ``amp`` (None: fp32) (``inference.inference_model``: linear weights prepacked, in bf16 under
    bf16 autocast), to be run under that autocast; None where nothing would change (no oneDNN
    linear)."""
    cpu = torch.device("cpu")
    fast, _ = inference_model(copy.deepcopy(model), cpu, Precision(cpu, amp, "benchmark"), compile=False)
    return fast if any(isinstance(m, PrepackedLinear) for m in fast.modules()) else None


def forward_step(model, x, amp: torch.dtype | None) -> Callable[[], None]:
    device = x.device
    model.eval()

    def step():
        with torch.inference_mode(), autocast(device, amp):
            model(x)

    return step


def adamw_like(model: torch.nn.Module, config, reference: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """timm's optimizer: torch AdamW with our parameter groups and settings (lr, betas, eps, wd, impl)."""
    o = config.TRAIN.OPTIMIZER
    impl = {k: reference.defaults[k] for k in ("foreach", "fused") if reference.defaults.get(k) is not None}
    return torch.optim.AdamW(
        param_groups(model, config.TRAIN.WEIGHT_DECAY),
        lr=float(config.TRAIN.BASE_LR),
        eps=float(o.EPS),
        betas=tuple(o.BETAS),
        **impl,
    )


def train_step(model, optimizer, x, y, amp: torch.dtype | None) -> Callable[[], None]:
    device = x.device
    model.train()
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None

    def step():
        with autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


MODES = ("eager", "compiled", "blocks", "frozen")


def compile_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Compile every Swin block of ``model`` in place: ours through ``compile_model`` (what
    ``--compile`` does), timm's blocks one by one with the same recompile allowance."""
    if any(isinstance(m, WindowBlockBase) for m in model.modules()):
        return compile_model(model, "blocks")
    blocks = [m for m in model.modules() if type(m).__name__ in ("SwinTransformerBlock", "SwinTransformerV2Block")]
    allow_recompiles(2 * len(blocks) + 8)
    for blk in blocks:
        blk.compile(dynamic=False)
    return model


class CompileTimeout(Exception):
    pass


def first_call(step: Callable[[], None], device: torch.device, budget_s: float) -> float:
    """Run ``step`` once (the compile, for a compiled model); seconds taken. CompileTimeout past the budget."""
    use_alarm = budget_s > 0 and hasattr(signal, "SIGALRM")

    def on_alarm(signum, frame):
        raise CompileTimeout()

    old = signal.signal(signal.SIGALRM, on_alarm) if use_alarm else None
    if use_alarm:
        signal.alarm(int(max(1, budget_s)))
    start = time.perf_counter()
    try:
        step()
        synchronize(device)
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Interleaved timing
# ---------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    name: str
    step: Callable[[], None] | None
    note: str = ""
    compile_s: float | None = None
    samples: list[float] = field(default_factory=list)
    settle: tuple[int, float | None] = (0, None)  # settling passes, page faults per batch in the last

    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


def min_seconds(device: torch.device) -> float:
    """Shortest timed span per measurement: a GPU step takes milliseconds, so a couple of batches
    would time launch jitter; a CPU step already takes seconds."""
    return 1.0 if device.type == "cuda" else 0.0


def time_interleaved(
    cands: list[Candidate],
    batch_size: int,
    device: torch.device,
    rounds: int,
    iters: int,
    warmup: int,
    settle: int = 0,
) -> None:
    """Median-ready samples for each live candidate: ``warmup`` batches each, then up to
    ``settle`` passes until the page faults stop (``settle_page_faults``), then ``rounds``
    rounds of ``iters`` batches per candidate, in alternating order."""
    live = [c for c in cands if c.step is not None]
    for c in live:
        for _ in range(warmup):
            c.step()
    settled = settle_page_faults([c.step for c in live], device, settle)
    for c in live:
        c.settle = settled
    synchronize(device)
    for r in range(rounds):
        for c in live if r % 2 == 0 else live[::-1]:
            timing = time_images_per_second(
                c.step, batch_size, device, warmup=0, iters=iters, min_seconds=min_seconds(device)
            )
            c.samples.append(timing.images_per_s)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
def _cpu_peak_bytes(prof) -> int:
    """Peak of the running sum of CPU allocations (+) and frees (-) recorded by the profiler."""
    import torch._C._profiler as P

    events = []

    def walk(node):
        if node.tag == P._EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    events.sort()
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak


def train_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak memory above the starting point during one call of ``step`` (run once before, untimed);
    on the CPU the gradients the step replaces are counted too (see the module docstring)."""
    step()  # optimizer state and lazily built caches exist before the measured step
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return _cpu_peak_bytes(prof)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def forget_compiled_graphs() -> None:
    """Drops every graph Dynamo has cached, before a compiled mode's first calls.

    Dynamo keeps compiled code with the model class's ``forward``, guarded on the module object,
    not with the ``torch.compile`` wrapper: compiling the same model again for ``frozen`` after
    ``compiled`` found the unfrozen graph (a 2 s "compile") and timed it as the frozen row.
    """
    torch._dynamo.reset()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="swin_tiny", help=f"{', '.join(MODELS)} or a config YAML (default swin_tiny)")
    p.add_argument("--batch-size", type=int, help="images per step (default 16 on the CPU, 128 on CUDA)")
    p.add_argument("--img-size", type=int, default=None, help="default: the config's DATA.IMG_SIZE")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16 (fp16: CUDA only)")
    p.add_argument(
        "--half-forward",
        default="autocast,cast",
        help="bf16/fp16 forward candidates per side: autocast, cast, or both (default); fewer compiles",
    )
    p.add_argument(
        "--modes", default="eager,compiled", help="comma list of eager, compiled, blocks, frozen (forward only)"
    )
    p.add_argument("--train", action="store_true", help="also time training steps")
    p.add_argument("--memory", action="store_true", help="peak training memory per image, with/without checkpointing")
    p.add_argument(
        "--ranks",
        type=int,
        default=0,
        help="with --memory: per-rank memory under DDP and FSDP on this many CPU processes instead",
    )
    p.add_argument(
        "--ranks-models",
        default="swin_base,swin_large",
        help="models for --ranks: swin_base, swin_large, swinv2_large, another --model name, or config YAMLs",
    )
    p.add_argument(
        "--levers",
        nargs="?",
        const=",".join(DEFAULT_LEVERS),
        default=None,
        help=f"rows with our speed switches flipped (forward; train too with --train, fp32 eager); a comma "
        f"list of {', '.join(FORWARD_LEVERS)} (default: {', '.join(DEFAULT_LEVERS)})",
    )
    p.add_argument(
        "--levers-dtype",
        default="fp32",
        choices=tuple(DTYPES),
        help="forward levers: weights and input cast to this dtype (default fp32)",
    )
    p.add_argument(
        "--profile-kernels",
        type=int,
        default=0,
        metavar="N",
        help="forward levers: also print each variant's N operations (GPU kernels) with the most self time",
    )
    p.add_argument(
        "--levers-mode",
        default="eager",
        choices=("eager", "compiled"),
        help="forward levers: each variant (and timm) eager or torch.compile'd (default eager)",
    )
    p.add_argument("--iters", type=int, default=2, help="timed batches per candidate per round (default 2)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are over these (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per candidate first (default 1)")
    p.add_argument(
        "--settle",
        type=int,
        default=SETTLE_PASSES,
        help="CPU: then up to this many untimed passes over the candidates, until one pass faults in "
        f"fewer than {QUIET_FAULTS_PER_BATCH} pages per batch (default {SETTLE_PASSES}; 0: off)",
    )
    p.add_argument("--compile-budget", type=float, default=180.0, help="seconds allowed for one compile (default 180)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument(
        "--malloc",
        default="auto",
        choices=("auto", "default", "keep"),
        help="'keep': glibc keeps freed memory for reuse instead of unmapping it (both models); 'auto' (default): "
        "keep on the CPU, as the trainer, --eval, --throughput and predict.py do there (RETAIN_FREED_MEMORY); "
        "'default': glibc's own thresholds",
    )
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument(
        "--onnxruntime",
        action="store_true",
        help="CPU: add onnxruntime running our model exported to ONNX to the fp32 eager forward row",
    )
    p.add_argument(
        "--onnx-exporter",
        choices=EXPORTERS,
        default="auto",
        help="the exporter that writes the --onnxruntime model, as export.py's --exporter (default: auto); "
        "the graphs run level, the TorchScript exporter writes Swin-T in 3 s instead of ~30",
    )
    p.add_argument("--opts", nargs="*", default=[], help="extra config KEY VALUE pairs for our model")
    return p.parse_args(argv)


SHARDING_MODELS = {
    "swin_base": MODELS["swin_base"],
    "swin_large": "configs/swin/swin_large_patch4_window7_224_22kto1k_finetune.yaml",
    "swinv2_large": "configs/swinv2/swinv2_large_patch4_window12to24_192to384_22kto1k_ft.yaml",
}


def sharded_memory(args: argparse.Namespace) -> dict:
    """``--memory --ranks N``: each model's training step under DDP and FSDP on N CPU ranks."""
    import sharding_memory

    rows: list[dict] = []
    batch = args.batch_size or 2
    for name in args.ranks_models.split(","):
        path = SHARDING_MODELS.get(name) or MODELS.get(name, name)
        path = path if os.path.isabs(path) else os.path.join(ROOT, path)
        opts = ["DATA.BATCH_SIZE", str(batch), "AMP_ENABLE", "False", *args.opts]
        if args.img_size:
            opts += ["DATA.IMG_SIZE", str(args.img_size)]
        for mode in sharding_memory.MODES:
            print(f"{name} {mode}: {args.ranks} CPU ranks, batch {batch} per rank, fp32 ...", flush=True)
            for r in sharding_memory.measure(path, opts, mode, args.ranks, steps=max(2, args.iters + 1)):
                rows.append({**r, "model": name, "batch_per_rank": batch})
    print(sharding_memory.table(rows))
    result = {"machine": machine_info(torch.device("cpu")), "sharded_memory": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    return result


def bound_text(row: dict) -> str:
    """A row's images/s as a share of its bound; 'n/a (emul.)' where the dtype is emulated."""
    if row.get("fraction_of_bound") is not None:
        return f"{100 * row['fraction_of_bound']:.0f} %"
    return "n/a (emul.)" if row.get("bound_img_s") is None and row.get("dtype") == "bf16" else "-"


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def malloc_keeps(choice: str, device: torch.device) -> bool:
    """Whether this run keeps freed memory: ``keep``, or ``auto`` on the CPU (what the project's
    trainer and inference commands do there, ``RETAIN_FREED_MEMORY``)."""
    return choice == "keep" or (choice == "auto" and device.type == "cpu")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory and args.ranks:
        return sharded_memory(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    keep = malloc_keeps(args.malloc, device)
    malloc_kept = retain_freed_memory(large_blocks=True) if keep else False
    if keep and not malloc_kept:
        print("--malloc keep: mallopt unavailable (not glibc?); default allocator behaviour")
    config = load_config(args.model, args.img_size, args.opts)
    # fp32 products as the trainer runs them (TF32 on Ampere and newer; nothing on the CPU).
    configure_matmul_precision(device, config.CUDA_MATMUL_PRECISION)
    bs, size = args.batch_size or (128 if device.type == "cuda" else 16), config.DATA.IMG_SIZE
    info = machine_info(device)
    info["malloc"] = "keep (mmap off, no trim)" if malloc_kept else "default"
    ours, theirs, diff = paired_models(config, args.model, device)
    print(
        f"machine: {info['cpu']} | {info['logical_cpus']} logical CPUs, {info['torch_threads']} torch threads | "
        f"GPU: {info['gpu'] or 'none'} | torch {info['torch']}, timm {info['timm']}, triton {info['triton']} | "
        f"malloc {info['malloc']}"
    )
    print(
        f"model: {args.model} ({config.MODEL.NAME}), batch {bs}, {size}x{size}, device {device}; "
        f"fp32 eval logits max |ours - timm| = {diff:.2e}"
    )

    x = torch.randn(bs, model_section(config).IN_CHANS, size, size, device=device)
    y = torch.randint(0, config.MODEL.NUM_CLASSES, (bs,), device=device)
    slow_bf16 = device.type == "cpu" and not cpu_has_fast_bf16()
    # The limit every row is set against: this machine's matrix-product peak, measured in this run
    # (here and again after the rows; the higher counts).
    peaks = matmul_peaks(device, slow_bf16)
    gflop_per_image = 2.0 * ours.flops() / 1e9  # multiply-accumulates -> FLOPs
    print(
        f"ISA: {isa_line(info)} | matmul peak: "
        + ", ".join(f"{k} {fmt(v, '.0f') if v else 'n/a (emulated)'} GFLOP/s" for k, v in peaks.items())
        + f" | {gflop_per_image:.2f} GFLOP per forward, 3x that per training step"
    )
    info["matmul_peak_gflops"] = peaks
    info["gflop_per_forward"] = gflop_per_image
    rows: list[dict] = []
    levers: list[dict] = []
    kernels: list[dict] = []
    memory: list[dict] = []
    command = " ".join([os.path.basename(sys.argv[0])] + (list(argv) if argv is not None else sys.argv[1:]))

    def snapshot() -> dict:
        return dict(
            machine=info,
            command=command,
            model=args.model,
            config_name=config.MODEL.NAME,
            batch_size=bs,
            img_size=size,
            rounds=args.rounds,
            iters=args.iters,
            logits_max_abs_diff=diff,
            rows=rows,
            levers=levers,
            kernels=kernels,
            memory=memory,
        )

    def save() -> None:
        """Written after every measurement, so a run cut short keeps what it measured."""
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(snapshot(), f, indent=1)
            os.replace(tmp, args.json)

    def record(phase, dtype, mode, cands: list[Candidate], extra: dict | None = None) -> None:
        by = {c.name: c for c in cands}
        t = by.get("timm")
        for c in cands:
            if c.name == "timm":
                continue
            o = c.median()
            tm = t.median() if t else None
            same_rounds = t is not None and len(c.samples) == len(t.samples)
            paired = [a / b for a, b in zip(c.samples, t.samples, strict=True)] if same_rounds else []
            rows.append(
                dict(
                    phase=phase,
                    dtype=dtype,
                    mode=mode,
                    variant=c.name,
                    ours_img_s=o,
                    timm_img_s=tm,
                    ratio=(o / tm if o and tm else None),
                    paired_ratio=statistics.median(paired) if paired else None,
                    ours_samples=c.samples,
                    timm_samples=t.samples if t else [],
                    ours_note=c.note,
                    timm_note=t.note if t else "",
                    ours_compile_s=c.compile_s,
                    timm_compile_s=t.compile_s if t else None,
                    settle_passes=c.settle[0],
                    settle_faults_per_batch=c.settle[1],
                    **(extra or {}),
                )
            )
            passes, faults = c.settle
            settled = f", {passes} settling passes ({faults:,.0f} faults per batch in the last)" if passes else ""
            print(
                f"  {phase} {dtype} {mode}: {c.name} {fmt(o)} img/s, timm {fmt(tm)} img/s, "
                f"ratio {fmt(rows[-1]['ratio'], '.3f')}, "
                f"paired {fmt(rows[-1]['paired_ratio'], '.3f')}{settled}",
                flush=True,
            )
        save()

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; use fp32, bf16, fp16")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; use {', '.join(MODES)}")
    half_forward = {v.strip() for v in args.half_forward.split(",") if v.strip()}
    if not half_forward or half_forward - {"autocast", "cast"}:
        raise SystemExit(f"--half-forward {args.half_forward!r}: use autocast, cast, or autocast,cast")

    def maybe_compile(model, mode):
        """The module to time in ``mode``; 'blocks' compiles a copy's blocks (the caller's model stays eager)."""
        if mode == "compiled":
            return torch.compile(model)
        if mode == "frozen":
            return FrozenCompiled(model)
        if mode == "blocks":
            return compile_blocks(copy.deepcopy(model))
        return model

    def prepare(cands: list[Candidate], mode: str) -> None:
        """For compiled candidates: time the first call (the compile) within the budget."""
        if mode == "eager":
            return
        forget_compiled_graphs()
        for c in cands:
            try:
                c.compile_s = first_call(c.step, device, args.compile_budget)
                print(f"  compiled {c.name}: first call {c.compile_s:.1f} s")
            except Exception as e:  # noqa: BLE001 - report and go on
                # The alarm may surface wrapped (e.g. InductorError) when it fires inside inductor.
                chain, timed_out = e, False
                while chain is not None:
                    timed_out = timed_out or isinstance(chain, CompileTimeout) or "CompileTimeout" in str(chain)
                    chain = chain.__cause__ or chain.__context__
                if timed_out:
                    c.note = f"compile > {args.compile_budget:.0f} s budget: skipped"
                else:
                    c.note = f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                c.step = None
                print(f"  {c.name}: {c.note}")

    # -- forward ------------------------------------------------------------------------------
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        if dtype_name == "fp16" and device.type != "cuda":
            print("skip fp16: CUDA only")
            continue
        rounds, iters, warmup, settle = args.rounds, args.iters, args.warmup, args.settle
        note = ""
        if dtype != torch.float32 and slow_bf16:
            # One untimed call first: the fast path packs its bf16 weights on its first call.
            rounds, iters, warmup, settle = 1, 1, 1, 0
            note = "emulated bf16 (no AVX512-BF16/AMX): 1 batch, eager only"
        for mode in modes:
            if note and mode != "eager":
                continue
            print(f"forward {dtype_name} {mode} ...", flush=True)
            cands: list[Candidate] = []
            for name, model in (("ours", ours), ("timm", theirs)):
                if dtype == torch.float32:
                    cands.append(Candidate(name, forward_step(maybe_compile(model, mode), x, None), note))
                else:
                    if "autocast" in half_forward:
                        cands.append(
                            Candidate(f"{name}|autocast", forward_step(maybe_compile(model, mode), x, dtype), note)
                        )
                    if "cast" in half_forward:
                        cast = copy.deepcopy(model).to(dtype)
                        cands.append(
                            Candidate(f"{name}|cast", forward_step(maybe_compile(cast, mode), x.to(dtype), None), note)
                        )
                if name == "ours" and mode == "eager" and device.type == "cpu":
                    amp = None if dtype == torch.float32 else dtype
                    fast = fast_path_model(model, amp) if amp in FAST_PATH_NOTES else None
                    if fast is not None:
                        cands.append(Candidate("fast path", forward_step(fast, x, amp), FAST_PATH_NOTES[amp]))
                    if args.onnxruntime and dtype == torch.float32:
                        step, used = onnxruntime_step(model, x, args.onnx_exporter)
                        cands.append(Candidate("onnxruntime", step, f"our model as ONNX ({used} exporter)"))
            prepare(cands, mode)
            time_interleaved(cands, bs, device, rounds, iters, warmup, settle)
            if dtype == torch.float32:
                record("forward", dtype_name, mode, cands)
            else:

                def best(prefix, cands=cands):
                    got = [c for c in cands if c.name.startswith(prefix + "|") and c.median()]
                    return max(got, key=lambda c: c.median()) if got else None

                b_ours, b_timm = best("ours"), best("timm")
                if b_ours and b_timm:
                    merged_o = Candidate(
                        "ours",
                        None,
                        f"{b_ours.name.split('|')[1]}; {note}".strip("; "),
                        b_ours.compile_s,
                        b_ours.samples,
                    )
                    merged_t = Candidate(
                        "timm",
                        None,
                        f"{b_timm.name.split('|')[1]}; {note}".strip("; "),
                        b_timm.compile_s,
                        b_timm.samples,
                    )
                    whole = [c for c in cands if "|" not in c.name]  # rows of their own (the fast path)
                    record(
                        "forward",
                        dtype_name,
                        mode,
                        [merged_o, merged_t, *whole],
                        {"all": {c.name: c.median() for c in cands}},
                    )
                else:
                    record("forward", dtype_name, mode, cands)

    # -- train --------------------------------------------------------------------------------
    if args.train:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            if dtype_name == "fp16" and device.type != "cuda":
                continue
            if dtype != torch.float32 and slow_bf16:
                rows.append(
                    dict(
                        phase="train",
                        dtype=dtype_name,
                        mode="-",
                        variant="ours",
                        ours_img_s=None,
                        timm_img_s=None,
                        ratio=None,
                        ours_note="skipped: emulated bf16 on this CPU (see the forward row)",
                    )
                )
                continue
            amp = None if dtype == torch.float32 else dtype
            for mode in modes:
                if mode == "frozen":
                    continue  # frozen weights are for inference only
                print(f"train {dtype_name} {mode} ...", flush=True)
                # maybe_compile copies for 'blocks': the optimizers are built on what is trained.
                o_model, t_model = maybe_compile(copy.deepcopy(ours), mode), maybe_compile(copy.deepcopy(theirs), mode)
                o_opt = build_optimizer(config, getattr(o_model, "_orig_mod", o_model))
                t_opt = adamw_like(getattr(t_model, "_orig_mod", t_model), config, o_opt)
                cands = [
                    Candidate("ours", train_step(o_model, o_opt, x, y, amp)),
                    Candidate("timm", train_step(t_model, t_opt, x, y, amp)),
                ]
                prepare(cands, mode)
                time_interleaved(cands, bs, device, args.rounds, args.iters, args.warmup, args.settle)
                record("train", dtype_name, mode, cands)
                del o_model, t_model, o_opt, t_opt, cands

    # -- levers -------------------------------------------------------------------------------
    def add_levers(phase: str, cands: list[Candidate]) -> None:
        t = cands[-1]
        for c in cands:
            paired = [a / b for a, b in zip(c.samples, t.samples, strict=True)]
            levers.append(
                dict(
                    phase=phase,
                    variant=c.name,
                    img_s=c.median(),
                    vs_timm=c.median() / t.median(),
                    paired_vs_timm=statistics.median(paired),
                    samples=c.samples,
                )
            )
            print(
                f"  lever {phase} {c.name}: {c.median():.2f} img/s, vs timm {levers[-1]['vs_timm']:.3f}, "
                f"paired {levers[-1]['paired_vs_timm']:.3f}",
                flush=True,
            )
        save()

    if args.levers:
        names = [n.strip() for n in args.levers.split(",") if n.strip()]
        unknown = [n for n in names if n not in FORWARD_LEVERS]
        if unknown:
            raise SystemExit(f"unknown lever {unknown[0]!r}; use {', '.join(FORWARD_LEVERS)}")
        l_dtype, l_mode = DTYPES[args.levers_dtype], args.levers_mode
        print(f"levers: forward {args.levers_dtype} {l_mode} ...", flush=True)
        xl = x.to(l_dtype)
        cands = [
            Candidate(n, forward_step(maybe_compile(variant(ours, **FORWARD_LEVERS[n]).to(l_dtype), l_mode), xl, None))
            for n in names
        ]
        cands.append(
            Candidate("timm", forward_step(maybe_compile(copy.deepcopy(theirs).to(l_dtype), l_mode), xl, None))
        )
        prepare(cands, l_mode)
        # Every lever is reported against timm: if timm's compile failed there is nothing to compare.
        compared = cands[-1].step is not None
        cands = [c for c in cands if c.step is not None] if compared else []
        time_interleaved(cands, bs, device, args.rounds, args.iters, args.warmup, args.settle)
        if cands:
            add_levers(f"forward {args.levers_dtype} {l_mode}", cands)
        if args.profile_kernels:
            for c in cands:
                top = top_kernels(c.step, device, args.profile_kernels)
                kernels.append({"variant": c.name, "dtype": args.levers_dtype, "mode": l_mode, "top": top})
                print(f"  top kernels, {c.name} (one batch, self time on the {device.type}):")
                for k in top:
                    print(f"    {k['ms']:8.3f} ms {k['calls']:5d}x  {k['name'][:110]}")
            save()
    if args.levers and args.train:
        print("levers: train fp32 eager ...", flush=True)
        impls = ("auto", "sdpa", "reference")
        single_cfg = load_config(args.model, args.img_size, args.opts + ["TRAIN.OPTIMIZER.IMPL", "single"])
        cands = []
        for name, model, cfg in [(f"attn={i}", variant(ours, i), config) for i in impls] + [
            ("roll+partition", variant(ours, gather=False), config),
            ("release mask", variant(ours, release_mask=True), config),
            ("single-tensor AdamW", variant(ours), single_cfg),
        ]:
            cands.append(Candidate(name, train_step(model, build_optimizer(cfg, model), x, y, None)))
        t_model = copy.deepcopy(theirs)
        cands.append(
            Candidate(
                "timm",
                train_step(t_model, adamw_like(t_model, config, build_optimizer(config, variant(ours))), x, y, None),
            )
        )
        time_interleaved(cands, bs, device, args.rounds, args.iters, args.warmup, args.settle)
        add_levers("train fp32 eager", cands)
        del cands

    # -- memory -------------------------------------------------------------------------------
    if args.memory:
        print("memory: fp32 eager training step ...", flush=True)
        for ckpt in (False, True):
            for name, model in (("ours", ours), ("timm", theirs)):
                m = copy.deepcopy(model)
                m.set_grad_checkpointing(ckpt)
                opt = (
                    build_optimizer(config, m)
                    if name == "ours"
                    else adamw_like(m, config, build_optimizer(config, copy.deepcopy(ours)))
                )
                peak = train_peak_bytes(train_step(m, opt, x, y, None), device)
                memory.append(
                    dict(
                        model=name,
                        checkpointing=ckpt,
                        peak_mib=peak / 2**20,
                        mib_per_image=peak / 2**20 / bs,
                        method="cuda max_memory_allocated"
                        if device.type == "cuda"
                        else "torch.profiler allocation events",
                    )
                )
                print(f"  memory {name} checkpointing={ckpt}: {memory[-1]['mib_per_image']:.1f} MiB/image", flush=True)
                save()
                del m, opt

    # -- report -------------------------------------------------------------------------------
    first_peaks = peaks
    peaks = higher_peaks(first_peaks, matmul_peaks(device, slow_bf16))
    print(
        "matmul peak, the higher of the measurements before and after the rows: "
        + ", ".join(f"{k} {fmt(v, '.0f')} GFLOP/s" for k, v in peaks.items() if v)
    )
    info["matmul_peak_gflops"] = peaks
    info["matmul_peak_gflops_before_rows"] = first_peaks
    for r in rows:
        # images/s at the matmul peak: peak / FLOPs per image (forward; 3x for a training step).
        peak = peaks.get(r["dtype"])
        per_image = gflop_per_image * (3.0 if r["phase"] == "train" else 1.0)
        bound = peak / per_image if peak else None
        r["bound_img_s"] = bound
        r["fraction_of_bound"] = r["ours_img_s"] / bound if bound and r.get("ours_img_s") else None
    save()
    print()
    print(
        f"{'phase':8s} {'dtype':5s} {'mode':9s} {'variant':12s} {'img/s':>9s} {'timm img/s':>11s} "
        f"{'ratio':>7s} {'paired':>7s} {'of bound':>9s}  notes"
    )
    for r in rows:
        notes = []
        if r.get("ours_compile_s") is not None or r.get("timm_compile_s") is not None:
            notes.append(
                f"compile ours {fmt(r.get('ours_compile_s'), '.0f')} s, timm {fmt(r.get('timm_compile_s'), '.0f')} s"
            )
        for k in ("ours_note", "timm_note"):
            if r.get(k):
                notes.append(f"{k.split('_')[0]}: {r[k]}")
        print(
            f"{r['phase']:8s} {r['dtype']:5s} {r['mode']:9s} {r.get('variant', 'ours'):12s} "
            f"{fmt(r['ours_img_s']):>9s} {fmt(r['timm_img_s']):>11s} "
            f"{fmt(r['ratio'], '.3f'):>7s} {fmt(r.get('paired_ratio'), '.3f'):>7s} {bound_text(r):>9s}  "
            f"{'; '.join(notes)}"
        )
    if levers:
        print()
        print(f"{'lever':28s} {'phase':22s} {'img/s':>8s} {'vs timm':>8s} {'paired':>7s}")
        for r in levers:
            print(
                f"{r['variant']:28s} {r['phase']:22s} {fmt(r['img_s']):>8s} {fmt(r['vs_timm'], '.3f'):>8s} "
                f"{fmt(r['paired_vs_timm'], '.3f'):>7s}"
            )
    if memory:
        print()
        print(f"{'model':6s} {'checkpointing':13s} {'peak MiB':>9s} {'MiB/image':>9s}  method")
        for r in memory:
            print(
                f"{r['model']:6s} {str(r['checkpointing']):13s} {r['peak_mib']:9.1f} "
                f"{r['mib_per_image']:9.1f}  {r['method']}"
            )
    save()
    if args.json:
        print(f"\nwrote {args.json}")
    return snapshot()


if __name__ == "__main__":
    main()
