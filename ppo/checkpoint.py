"""PPO resume points: everything the loop needs to go on exactly as if it had never stopped.

    checkpoints/checkpoint-<iteration>/
        state.pt          policy and value-model weights, AdamW moments, the learning-rate schedule's position, the
                          fp16 loss scale
        rng_<rank>.pt     each process's torch / CUDA / python / numpy RNG (rollout sampling, minibatch order)
        progress.json     iteration, tokens, FLOPs, training seconds, the KL coefficient beta, the last eval's metrics
        checkpoint.json   every file's sha256, written last (rlhf.rundir.commit_checkpoint)

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

from rlhf.checkpoints import commit_checkpoint, prune_checkpoints


def _rng_state() -> dict:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos,
                                                   np_has_gauss, np_gauss)}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np_name, np_keys, *rest = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), *rest))


def save(root: Path, iteration: int, accelerator: Accelerator, policy, value_model, optimizer, scheduler, scaler,
         progress: dict) -> Path:
    """Write checkpoint-<iteration> under `root` (every process calls this; each saves its own RNG) and delete
    the older ones. Returns the folder."""
    folder = root / f"checkpoint-{iteration}"
    tmp = root / f".tmp-checkpoint-{iteration}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a kill during an earlier save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if main:
        torch.save({"policy": accelerator.unwrap_model(policy).state_dict(),
                    "value_model": accelerator.unwrap_model(value_model).state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict()}, tmp / "state.pt")
        (tmp / "progress.json").write_text(json.dumps({"iteration": iteration, **progress}, indent=2))
    accelerator.wait_for_everyone()
    if main:
        commit_checkpoint(tmp, iteration)
        shutil.rmtree(folder, ignore_errors=True)  # a half-written one with this name from an earlier attempt
        os.replace(tmp, folder)
        prune_checkpoints(root, keep=folder)
    accelerator.wait_for_everyone()
    return folder


def restore(folder: Path, accelerator: Accelerator, policy, value_model, optimizer, scheduler, scaler) -> dict:
    """Load a checkpoint written by `save` into the (already built and prepared) models, optimizer and
    scheduler, and this process's RNG. Returns progress.json. Call it last, just before the loop, so that
    nothing draws from the restored RNG first."""
    state = torch.load(folder / "state.pt", map_location=accelerator.device, weights_only=True)
    accelerator.unwrap_model(policy).load_state_dict(state["policy"])
    accelerator.unwrap_model(value_model).load_state_dict(state["value_model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])  # a no-op for a disabled scaler (not fp16)
    _set_rng_state(torch.load(folder / f"rng_{accelerator.process_index}.pt", weights_only=True))
    return json.loads((folder / "progress.json").read_text())
