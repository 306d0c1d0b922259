"""PPO resume points: everything the loop needs to go on exactly as if it had never stopped.

accelerate's `save_state` writes what the Accelerator knows (and knows how FSDP and DeepSpeed shard it); the loop's
own counters go beside it:

    checkpoints/checkpoint-<iteration>/
        pytorch_model.bin         the policy's weights        (the models `prepare` saw, in that order)
        pytorch_model_1.bin       the value model's weights
        optimizer.bin             AdamW's moments and step counts
        custom_checkpoint_0.pkl   the learning-rate schedule's position    (`track`)
        custom_checkpoint_1.pkl   the fp16 loss scale (empty in other precisions)
        random_states_<rank>.pkl  each process's torch / CUDA / python / numpy RNG (rollout sampling, minibatch order)
        progress.json             iteration, tokens, FLOPs, training seconds, the KL coefficient beta, the last eval
        checkpoint.json           every file's sha256, written last (rlhf.checkpoints.commit_checkpoint)

The folder is written under a hidden temporary name and renamed when whole, so a kill mid-save leaves the
previous checkpoint as the latest; that one is deleted only after the new one is in place. The prompt order
needs no saving: it is a function of the seed and the iteration.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import RNG_STATE_NAME, load

from rlhf.checkpoints import commit_checkpoint, prune_checkpoints
from rlhf.errors import UserError


def track(
    accelerator: Accelerator, scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler
) -> None:
    """Have `save_state` / `load_state` carry the schedule and the loss scaler too. Neither goes through `prepare`:
    a prepared scheduler steps once per process on each call under DDP (and the loop steps it once an iteration),
    and the Accelerator has a scaler of its own only when it runs the fp16 autocast itself, which the loop does."""
    accelerator.register_for_checkpointing(scheduler, scaler)


def save(root: Path, iteration: int, accelerator: Accelerator, progress: dict) -> Path:
    """Write checkpoint-<iteration> under `root` (every process calls this: the main one writes the weights and the
    optimizer, each one its RNG) and delete the older ones. Returns the folder."""
    folder = root / f"checkpoint-{iteration}"
    tmp = root / f".tmp-checkpoint-{iteration}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a kill during an earlier save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # torch's format rather than safetensors: it stores a tied LM head (SmolLM2's) once, as the shared tensor it
    # is, where safetensors drops it from the file with a warning at every save and relies on the load to re-tie it
    accelerator.save_state(str(tmp), safe_serialization=False)
    if main:
        (tmp / "progress.json").write_text(json.dumps({"iteration": iteration, **progress}, indent=2))
    accelerator.wait_for_everyone()
    if main:
        commit_checkpoint(tmp, iteration)
        shutil.rmtree(folder, ignore_errors=True)  # a half-written one with this name from an earlier attempt
        os.replace(tmp, folder)
        prune_checkpoints(root, keep=folder)
    accelerator.wait_for_everyone()
    return folder


def restore(folder: Path, accelerator: Accelerator) -> dict:
    """Load a checkpoint written by `save` into what the Accelerator was given (the prepared models and optimizer,
    and what `track` registered) and this process's RNG. Returns progress.json. Call it last, just before the loop,
    so that nothing draws from the restored RNG first."""
    if (folder / "state.pt").exists():
        raise UserError(
            f"checkpoint {folder} is in the format PPO wrote before its resume points went through "
            "accelerate's save_state, which this version does not read; delete that folder to run this "
            "run again from its start, or set resume=false to leave it as it is and start a new one"
        )
    accelerator.load_state(str(folder))
    _check_rng_restored(folder, accelerator.process_index)
    return json.loads((folder / "progress.json").read_text())


def _check_rng_restored(folder: Path, process_index: int) -> None:
    """`load_state` catches any error restoring the random state and only logs it (at info level); a run that went
    on with other random numbers would differ from the uninterrupted one without a word, so compare."""
    file = folder / f"{RNG_STATE_NAME}_{process_index}.pkl"
    saved = load(file)
    np_saved, np_now = saved["numpy_random_seed"], np.random.get_state()
    cuda_saved = saved.get("torch_cuda_manual_seed", [])
    cuda_now = torch.cuda.get_rng_state_all() if cuda_saved else []
    restored = (
        saved["random_state"] == random.getstate()
        and torch.equal(saved["torch_manual_seed"], torch.get_rng_state())
        and np_saved[0] == np_now[0]
        and np.array_equal(np_saved[1], np_now[1])
        and np_saved[2:] == np_now[2:]
        and len(cuda_saved) == len(cuda_now)
        and all(map(torch.equal, cuda_saved, cuda_now))
    )
    if not restored:
        raise UserError(
            f"checkpoint {folder}: accelerate could not restore the random state saved in {file.name}, "
            "so the resumed run would not continue as the interrupted one would have"
        )
