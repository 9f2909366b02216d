"""Train, fine-tune, evaluate and benchmark Swin Transformers.

python main.py --cfg configs/swin_tiny.yaml --data-path /data/imagenet          # one process
torchrun --nproc_per_node=8 main.py --cfg configs/swin_tiny.yaml --data-path ... # one node, 8 GPUs
python main.py --cfg ... --eval --resume ckpt.pth                              # validate and exit
python main.py --cfg ... --throughput                                          # images/s and exit
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from allocator import keep_process_memory
from checkpoint import (
    capture_rng_state,
    config_yaml,
    find_resume_checkpoint,
    is_official_training_checkpoint,
    load_checkpoint_file,
    restore_official_training_state,
    restore_trainer_state,
    save_epoch_checkpoint,
    save_step_checkpoint,
)
from config import config_from_args, default_config, dump_config, is_pretraining, model_section
from data import build_loader
from distributed import (
    DistEnv,
    Precision,
    all_gather_object,
    barrier,
    cleanup,
    configure_matmul_precision,
    init_distributed,
    make_grad_scaler,
    seed_everything,
    wrap_ddp,
)
from engine import (
    StepHooks,
    StopTraining,
    TrainState,
    evaluate,
    evaluate_reconstruction,
    throughput,
    train_one_epoch,
)
from errors import UserError, report_user_errors
from fsdp import (
    ensure_process_group,
    is_sharded,
    load_full_optimizer_state,
    mixed_precision_dtype,
    same_initial_weights,
    shard_model,
    sharded_grad_scaler,
)
from inference import inference_model
from logger import create_logger
from lr_scheduler import build_scheduler
from models import build_model, compile_model, load_weights
from optimizer import build_optimizer, load_optimizer_state, scaled_lrs
from preemption import StopRequest
from sharded_checkpoint import is_sharded_checkpoint, resume_sharded, save_epoch_sharded, save_step_sharded

_EXAMPLES = """examples:
  python main.py --cfg configs/demo/swin_demo_digits.yaml --data-path demo_data         # train on one CPU/GPU
  torchrun --nproc_per_node=8 main.py --cfg configs/swin_tiny.yaml --data-path /data/imagenet  # one node, 8 GPUs
  python main.py --cfg configs/swin_tiny.yaml --eval --resume best.pth --data-path /data/imagenet
  python main.py --cfg configs/swin_tiny.yaml --throughput --batch-size 8                 # no data needed
  python main.py --cfg configs/simmim/simmim_pretrain__swin_base__img192_window6__800ep.yaml --pretrain simmim \
      --data-path /data/images                                                          # SimMIM pre-training

Every config key can be set with --opts KEY VALUE ...; the flags above are shortcuts for the
common ones (the config key each sets is named in brackets, with its default). Flag spellings of the official
release are kept; each has a dashed or underscored alias."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's config key with its default (config.py's, unless --cfg or --opts change it)
    in brackets; the examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if text.endswith("]") and "[" in text:
            key = text[text.rindex("[") + 1 : -1]
            value = _config_default(key.split(" ")[0])
            if value is not None:
                text = f"{text[:-1]}, default {value if value != '' else 'unset'}]"
        return text


def _config_default(key: str):
    """config.py's default of ``key`` (dotted), or None when the key is not a config key."""
    node = default_config()
    for part in key.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="main.py",
        description="Train, fine-tune, evaluate and benchmark Swin Transformers (V1 and V2).",
        epilog=_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    run = p.add_argument_group("what to run")
    run.add_argument("--cfg", type=str, metavar="FILE", help="config YAML file (defaults for every key: config.py)")
    run.add_argument("--opts", nargs="+", metavar="KEY VALUE", help="override config keys, e.g. TRAIN.EPOCHS 30")
    run.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint [EVAL_MODE]")
    run.add_argument(
        "--throughput",
        action="store_true",
        help="only measure images/s on a random batch; reads no data [THROUGHPUT_MODE]",
    )
    run.add_argument(
        "--device", type=str, choices=["auto", "cpu", "cuda"], help="where to run; auto prefers CUDA [DEVICE]"
    )
    run.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    data = p.add_argument_group("data")
    data.add_argument(
        "--data-path", "--data_path", type=str, help="dataset root holding train/ and val/ [DATA.DATA_PATH]"
    )
    data.add_argument("--dataset", type=str, help="imagenet (any ImageFolder) or imagenet22K [DATA.DATASET]")
    data.add_argument("--batch-size", "--batch_size", type=int, help="batch size per process [DATA.BATCH_SIZE]")
    data.add_argument(
        "--zip",
        action="store_true",
        help="read DATA_PATH/{train,val}.zip and {train,val}_map.txt instead of folders [DATA.ZIP_MODE]",
    )
    data.add_argument(
        "--cache-mode",
        "--cache_mode",
        type=str,
        choices=["no", "full", "part"],
        help="with --zip, images each rank keeps in RAM: no (none), part (1/world of them) or full [DATA.CACHE_MODE]",
    )

    weights = p.add_argument_group("weights and checkpoints")
    weights.add_argument("--pretrained", help="weights to fine-tune from, .pth or .safetensors [MODEL.PRETRAINED]")
    weights.add_argument("--resume", help="checkpoint to continue training from, or to evaluate [MODEL.RESUME]")
    weights.add_argument(
        "--output", type=str, metavar="PATH", help="output root; the run writes to OUTPUT/MODEL.NAME/TAG [OUTPUT]"
    )
    weights.add_argument("--tag", help="name of the run, the last folder of its output [TAG]")

    train = p.add_argument_group("training")
    train.add_argument(
        "--accumulation-steps",
        "--accumulation_steps",
        type=int,
        help="batches per optimizer step [TRAIN.ACCUMULATION_STEPS]",
    )
    train.add_argument(
        "--use-checkpoint",
        "--use_checkpoint",
        action="store_true",
        help="gradient checkpointing [TRAIN.USE_CHECKPOINT]",
    )
    train.add_argument(
        "--disable_amp", "--disable-amp", action="store_true", help="run in fp32 (AMP_ENABLE False) [AMP_ENABLE]"
    )
    train.add_argument(
        "--amp-opt-level",
        "--amp_opt_level",
        choices=["O0", "O1", "O2"],
        help="the release's old apex flag: O0 runs in fp32 (as --disable_amp), O1/O2 leave torch's AMP on",
    )
    train.add_argument("--optim", type=str, help="adamw or sgd [TRAIN.OPTIMIZER.NAME]")
    train.add_argument(
        "--pretrain",
        type=str,
        choices=["simmim"],
        help="self-supervised pre-training on unlabelled images instead of classification [TRAIN.PRETRAIN]",
    )
    train.add_argument("--compile", action="store_true", help="torch.compile, block by block [TRAIN.COMPILE]")
    train.add_argument(
        "--fsdp",
        action="store_true",
        help="shard weights, gradients and optimizer state over the ranks (FSDP2); sharded checkpoints [TRAIN.FSDP]",
    )
    train.add_argument(
        "--fused_window_process",
        "--fused-window-process",
        action="store_true",
        help="Triton shift + window partition kernel, on CUDA [FUSED_WINDOW_PROCESS]",
    )
    train.add_argument(
        "--fused_layernorm", "--fused-layernorm", action="store_true", help="accepted; torch's layer norm is used"
    )
    # torch.distributed.launch passes --local_rank; torchrun sets LOCAL_RANK instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_criterion(config, mixup_active: bool) -> nn.Module:
    if mixup_active:
        return SoftTargetCrossEntropy()  # Mixup already folds label smoothing into the targets
    if config.MODEL.LABEL_SMOOTHING > 0.0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def _prepare_output(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        # One probe name per process: with a shared name, another rank could remove the file
        # between this rank's write and remove (FileNotFoundError -> a false "cannot write").
        probe = os.path.join(path, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to output folder {path} ({e.strerror}); pass a writable --output") from e


def _check_config(config) -> None:
    size, patch = config.DATA.IMG_SIZE, model_section(config).PATCH_SIZE
    if size < patch:
        raise UserError(
            f"DATA.IMG_SIZE {size} is smaller than one {patch}x{patch} patch; use a size of at least {patch}"
        )
    if config.TRAIN.ACCUMULATION_STEPS < 1:
        raise UserError(f"TRAIN.ACCUMULATION_STEPS is {config.TRAIN.ACCUMULATION_STEPS}; use 1 or more")


def load_resume(
    path: str,
    model: nn.Module,
    optimizer,
    lr_scheduler,
    scaler,
    state: TrainState,
    env: DistEnv,
    logger,
    model_only: bool,
    steps_per_epoch: int = 0,
    weights_loaded: bool = False,
    checkpoint: dict | None = None,
    global_batch: int = 0,
) -> dict:
    """Restore a full training state (or only the weights with ``model_only``); a training
    checkpoint of the official release goes on at its next epoch (``steps_per_epoch`` places the
    lr schedule). ``weights_loaded``: the weights are in already (an --fsdp run loads them before
    sharding), the rest is restored. ``checkpoint``: the file's contents when already read.
    ``global_batch``: this run's images per batch over all ranks, which places a mid-epoch
    position saved by another world size or batch (0: the checkpoint's own)."""
    checkpoint = checkpoint if checkpoint is not None else load_checkpoint_file(path)
    if not weights_loaded:
        load_weights(model, checkpoint, "resume", name=path)
    logger.info("resumed weights from %s", path)
    if model_only or "optimizer" not in checkpoint:
        return checkpoint
    if is_official_training_checkpoint(checkpoint):
        if is_sharded(model):
            raise UserError(
                f"{path} is a training checkpoint of the official release: continue it without --fsdp "
                "(or start from its weights with --pretrained)"
            )
        state.epoch, state.step, state.max_accuracy = restore_official_training_state(
            checkpoint, path, model, optimizer, lr_scheduler, scaler, steps_per_epoch
        )
        logger.info("resuming at epoch %d (optimizer step %d)", state.epoch, state.step)
        return checkpoint
    if is_sharded(model):
        load_full_optimizer_state(model, optimizer, checkpoint["optimizer"])
    else:
        load_optimizer_state(optimizer, checkpoint["optimizer"])
    restore_trainer_state(checkpoint, state, lr_scheduler, scaler, env, global_batch)
    return checkpoint


def config_file_name(config) -> str:
    """Each mode keeps its own record: ``config.yaml`` stays the training run's config."""
    if config.EVAL_MODE:
        return "config_eval.yaml"
    if config.THROUGHPUT_MODE:
        return "config_throughput.yaml"
    return "config.yaml"


def run_record(config, num_classes: int):
    """The config as this run uses it, for config.yaml and its checkpoints: MODEL.NUM_CLASSES is
    the dataset's (the run's own config is left as it was read)."""
    record = config.clone()
    record.defrost()
    record.MODEL.NUM_CLASSES = num_classes
    record.freeze()
    return record


def save_run_config(config, env: DistEnv, logger) -> None:
    path = os.path.join(config.OUTPUT, config_file_name(config))
    if env.rank == 0:
        dump_config(config, path)
    logger.info("config saved to %s", path)


def run_throughput(config, env: DistEnv, logger, precision: Precision) -> float:
    """``--throughput``: images/s of the configured model on a random batch; no data, no checkpoint."""
    save_run_config(config, env, logger)
    if config.MODEL.RESUME or config.MODEL.PRETRAINED:
        logger.info("throughput does not depend on the weights: the checkpoint is not read")
    model = build_model(config).to(env.device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "model %s: %s parameters, %.3f GMACs (%d classes: MODEL.NUM_CLASSES, as no dataset is read)",
        config.MODEL.NAME,
        f"{n_params:,}",
        model.flops() / 1e9,
        config.MODEL.NUM_CLASSES,
    )
    model, precision = inference_model(
        model, env.device, precision, config.TRAIN.COMPILE, config.TRAIN.COMPILE_BACKEND, config.RETAIN_FREED_MEMORY
    )
    return throughput(config, model, env, precision=precision)


def run(args: argparse.Namespace) -> dict | None:
    config = config_from_args(args)
    _check_config(config)
    env = init_distributed(config.DEVICE)
    configure_matmul_precision(env.device, config.CUDA_MATMUL_PRECISION)
    _prepare_output(config.OUTPUT)
    logger = create_logger(config.OUTPUT, dist_rank=env.rank, name="swin")
    throughput_only = config.THROUGHPUT_MODE and not config.EVAL_MODE  # --eval wins over --throughput
    if config.TRAIN.FSDP and not throughput_only:
        env = ensure_process_group(env)  # a single process runs as 1 rank of its own group
    seed_everything(config.SEED, env.rank)

    # Mixed precision is decided here, once, and handed to every loop.
    precision = Precision.decide(env.device, config.AMP_ENABLE, config.AMP_DTYPE)
    logger.info("device %s, world size %d, precision %s", env.device, env.world_size, precision.description)
    if throughput_only:
        return {"images_per_s": run_throughput(config, env, logger, precision)}

    data = build_loader(config, env.world_size, env.rank, pin_memory=env.device.type == "cuda")
    if not config.EVAL_MODE:  # --eval keeps it in inference_model
        keep_process_memory(env.device.type, config.RETAIN_FREED_MEMORY, "training")
    record = run_record(config, data.num_classes)
    save_run_config(record, env, logger)
    pretraining = is_pretraining(config)
    n_val = len(data.dataset_val) if data.dataset_val is not None else 0
    if pretraining:
        logger.info("SimMIM pre-training: %d train / %d val images (labels unused)", len(data.dataset_train), n_val)
        if config.EVAL_MODE and data.loader_val is None:
            raise UserError(f"--eval needs a val/ folder of images in {config.DATA.DATA_PATH} to score reconstructions")
    else:
        logger.info("%d train / %d val images, %d classes", len(data.dataset_train), n_val, data.num_classes)
        if config.MODEL.NAME.startswith("simmim_pretrain"):
            logger.warning("%s is a SimMIM pre-training config: add --pretrain simmim to pre-train", config.MODEL.NAME)

    with same_initial_weights(config.SEED, enabled=config.TRAIN.FSDP):  # FSDP broadcasts no weights
        model = build_model(config, num_classes=data.num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model %s: %s parameters, %.3f GMACs", config.MODEL.NAME, f"{n_params:,}", model.flops() / 1e9)
    if not config.TRAIN.FSDP:
        model.to(env.device)  # FSDP moves each block to the device as it shards it: no device holds all

    resume_path = config.MODEL.RESUME
    if config.TRAIN.AUTO_RESUME and not config.EVAL_MODE:
        found = find_resume_checkpoint(config.OUTPUT)
        if found:
            if resume_path:
                logger.warning("auto-resume: %s replaces --resume %s", found, resume_path)
            resume_path = found
    if config.MODEL.PRETRAINED and not resume_path:
        # Pre-training from supervised weights starts the encoder from them; the decoder stays new.
        load_weights(model.encoder if pretraining else model, config.MODEL.PRETRAINED, "finetune")
    file_resume = bool(resume_path) and not is_sharded_checkpoint(resume_path)
    # Read once: under --fsdp its weights go in before sharding, the rest after the optimizer exists.
    resume_checkpoint = load_checkpoint_file(resume_path) if file_resume else None
    if config.TRAIN.FSDP:
        if file_resume:  # one file (of a DDP run, say): its weights go in before sharding
            load_weights(model, resume_checkpoint, "resume", name=resume_path)
        if config.TRAIN.COMPILE and config.TRAIN.COMPILE_SCOPE == "blocks":
            compile_model(model, "blocks", config.TRAIN.COMPILE_BACKEND)  # in place, each block then sharded
        param_dtype = mixed_precision_dtype(env.device, precision.enabled, precision.dtype)
        shard_model(model, env, param_dtype, config.TRAIN.FSDP_RESHARD_AFTER_FORWARD)
    model_without_ddp = model

    optimizer = build_optimizer(config, model)  # after sharding: it holds this rank's shards
    base_lr, warmup_lr, min_lr = scaled_lrs(config, env.world_size)
    steps_per_epoch = len(data.loader_train) // config.TRAIN.ACCUMULATION_STEPS
    lr_scheduler = build_scheduler(config, optimizer, steps_per_epoch, base_lr, warmup_lr, min_lr)
    scaler = make_grad_scaler(env.device, precision.enabled, precision.dtype)
    if config.TRAIN.FSDP:
        scaler = sharded_grad_scaler(scaler)
    # SimMIM returns its own reconstruction loss.
    criterion = None if pretraining else build_criterion(config, data.mixup_fn is not None)
    state = TrainState()

    if resume_path and not file_resume:
        resume_sharded(
            resume_path,
            model_without_ddp,
            optimizer,
            lr_scheduler,
            scaler,
            state,
            env,
            model_only=config.EVAL_MODE,
            global_batch=config.DATA.BATCH_SIZE * env.world_size,
        )
    elif resume_path:
        load_resume(
            resume_path,
            model,
            optimizer,
            lr_scheduler,
            scaler,
            state,
            env,
            logger,
            model_only=config.EVAL_MODE,
            steps_per_epoch=steps_per_epoch,
            weights_loaded=config.TRAIN.FSDP,
            checkpoint=resume_checkpoint,
            global_batch=config.DATA.BATCH_SIZE * env.world_size,
        )
    del resume_checkpoint  # not held in memory for the whole run

    # --eval compiles for inference below (inference.py), not block by block as for training.
    train_compile = config.TRAIN.COMPILE and not config.EVAL_MODE
    if train_compile and config.TRAIN.COMPILE_SCOPE == "blocks" and not config.TRAIN.FSDP:
        compile_model(model, "blocks", config.TRAIN.COMPILE_BACKEND)  # in place: DDP below wraps the same module
    if env.distributed and not config.TRAIN.FSDP:
        model = wrap_ddp(model, env.device)
    if train_compile and config.TRAIN.COMPILE_SCOPE != "blocks":
        model = compile_model(model, config.TRAIN.COMPILE_SCOPE, config.TRAIN.COMPILE_BACKEND)

    if not config.EVAL_MODE and state.epoch >= config.TRAIN.EPOCHS:
        logger.info(
            "this run is complete (%d of %d epochs, best accuracy %.2f%%) in %s: nothing to train; to train longer, "
            "run again with --opts TRAIN.EPOCHS N (N > %d), or start another run with --tag",
            state.epoch,
            config.TRAIN.EPOCHS,
            state.max_accuracy,
            config.OUTPUT,
            config.TRAIN.EPOCHS,
        )
        return {"complete": True, "max_accuracy": state.max_accuracy}

    validate = evaluate_reconstruction if pretraining else evaluate
    if (config.EVAL_MODE or (config.MODEL.PRETRAINED and not resume_path)) and data.loader_val is not None:
        eval_model, eval_precision = model, precision
        if config.EVAL_MODE and not config.TRAIN.FSDP:
            eval_model, eval_precision = inference_model(
                model_without_ddp,
                env.device,
                precision,
                config.TRAIN.COMPILE,
                config.TRAIN.COMPILE_BACKEND,
                config.RETAIN_FREED_MEMORY,
            )
        stats = validate(config, data.loader_val, eval_model, env, eval_precision)
        if not pretraining:
            logger.info(f"Accuracy of the network on the {stats['count']} test images: {stats['acc1']:.2f}%")
        if config.EVAL_MODE:
            return stats

    writer = None
    if env.rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(config.OUTPUT, "tensorboard"))

    def trainer_state(step_level: bool) -> dict:
        """Everything a checkpoint holds but the weights and the optimizer (collective: RNG states)."""
        rng = all_gather_object(capture_rng_state(env.device))
        batch = state.batch_in_epoch if step_level else 0
        return {
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "epoch": state.epoch,
            "step": state.step,
            "max_accuracy": state.max_accuracy,
            "nonfinite_in_row": state.nonfinite_in_row,
            "nonfinite_total": state.nonfinite_total,
            "config": config_yaml(record),
            "sampler": {
                "epoch": state.epoch,
                "batch_in_epoch": batch,
                "global_batch": config.DATA.BATCH_SIZE * env.world_size,
            },
            "rng": rng,
            "class_names": list(data.class_names),
        }

    def checkpoint_state(step_level: bool) -> dict:
        weights = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict()}
        return {**weights, **trainer_state(step_level)}

    def save_step() -> None:
        if config.TRAIN.FSDP:  # every rank writes its shards
            path = save_step_sharded(config.OUTPUT, model_without_ddp, optimizer, trainer_state(step_level=True))
            logger.info("step checkpoint: %s (epoch %d, batch %d)", path, state.epoch, state.batch_in_epoch)
            return
        payload = checkpoint_state(step_level=True)
        if env.rank == 0:
            path = save_step_checkpoint(config.OUTPUT, payload)
            logger.info("step checkpoint: %s (epoch %d, batch %d)", path, state.epoch, state.batch_in_epoch)
        barrier()

    stop = StopRequest(config.TRAIN.STOP_POLL_FREQ).install()
    hooks = StepHooks(
        save_step_checkpoint=save_step,
        stop_requested=lambda: stop.agreed(env.device, state.step),
        step_save_freq=config.TRAIN.STEP_SAVE_FREQ,
    )
    steps_to_go = (
        config.TRAIN.EPOCHS - state.epoch
    ) * steps_per_epoch - state.batch_in_epoch // config.TRAIN.ACCUMULATION_STEPS
    logger.info(
        "start training: epochs %d..%d of %d, %d optimizer steps per epoch, %d to go, lr %.3e (scaled)",
        state.epoch,
        config.TRAIN.EPOCHS - 1,
        config.TRAIN.EPOCHS,
        steps_per_epoch,
        steps_to_go,
        base_lr,
    )
    start = time.time()
    stats: dict = {}
    try:
        for epoch in range(state.epoch, config.TRAIN.EPOCHS):
            state.epoch = epoch
            data.sampler_train.set_epoch(epoch)
            data.sampler_train.set_start_index(state.batch_in_epoch * config.DATA.BATCH_SIZE)
            train_stats = train_one_epoch(
                config,
                model,
                criterion,
                data.loader_train,
                optimizer,
                lr_scheduler,
                scaler,
                data.mixup_fn,
                env,
                state,
                hooks,
                writer,
                precision,
            )
            stats = validate(config, data.loader_val, model, env, precision) if data.loader_val is not None else {}
            # Pre-training has no accuracy: checkpoints follow SAVE_FREQ only, as released.
            is_best = "acc1" in stats and stats["acc1"] > state.max_accuracy
            if "acc1" in stats:
                state.max_accuracy = max(state.max_accuracy, stats["acc1"])
                logger.info(
                    f"Accuracy of the network on the {stats['count']} test images: {stats['acc1']:.2f}%; "
                    f"max accuracy {state.max_accuracy:.2f}%"
                )
            if writer is not None:
                for key in ("acc1", "acc5", "loss"):
                    if key in stats:
                        writer.add_scalar(f"val/{key}", stats[key], epoch)
                writer.add_scalar("train/epoch_loss", train_stats["loss"], epoch)
                writer.flush()
            stats["train_loss"] = train_stats["loss"]
            # A new best is always saved, so best.pth never lags behind a SAVE_FREQ boundary.
            if epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1 or is_best:
                if config.TRAIN.FSDP:  # every rank writes its shards
                    current = trainer_state(step_level=False)
                    path = save_epoch_sharded(
                        config.OUTPUT, epoch, model_without_ddp, optimizer, current, config.SAVE_KEEP, is_best
                    )
                    logger.info("saved %s", path)
                else:
                    payload = checkpoint_state(step_level=False)
                    if env.rank == 0:
                        path = save_epoch_checkpoint(
                            config.OUTPUT, epoch, payload, keep=config.SAVE_KEEP, is_best=is_best
                        )
                        logger.info("saved %s", path)
                    barrier()
    except StopTraining as e:
        logger.warning(
            "%s after %s: checkpoint written to %s; run the same command again to continue",
            e,
            stop.signal_name,
            config.OUTPUT,
        )
        stats = {"stopped": True}
    finally:
        stop.uninstall()
        if writer is not None:
            writer.close()
    logger.info("training time %s", datetime.timedelta(seconds=int(time.time() - start)))
    stats["max_accuracy"] = state.max_accuracy
    return stats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return report_user_errors(lambda: run(args), debug=args.debug)
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
