"""The foundation every stage stands on, below all of them: it imports no stage and not `pipelines`.

config.py         typed dataclass configs from configs/<profile>.yaml (unknown keys are errors), each field's role
keys.py           what makes two runs the same: every key that decides reuse and resume, from the fields' roles
errors.py         UserError (one line naming the culprit), Diverged, the finite-value guard
models.py         loading and saving models, the embedded model, precision, LoRA, gradient checkpointing
distributed.py    several processes under accelerate: the main process, per-process batch sizes, replica checks
tasks.py          the tasks (prompts, gold reward) and reading preference files in TRL's format
data.py           the one preference set both methods train on
sequences.py      sampling, response log-probs, reward-model scores, padding
reference.py      which model is pi_ref (the base model, or the SFT stage's)
evaluate.py       the one evaluator for every policy at every eval point
flops.py          compute counted alike: 2·N·tokens a forward pass, 6·N·tokens a training pass
atomic.py         files written whole or not at all, and `cached`: a value kept in one for whoever asks next
rundir.py         run directories: manifests, metrics.jsonl, finding a run by its key (docs/run-directory.md)
checkpoints.py    resume points: committed with every file's sha256, checked before they are resumed from
trl_callbacks.py  TRL trainers' hooks into the evaluator and the run directory
trl_stage.py      one driver for the stages that fine-tune pi_ref with a TRL trainer: seed, run, train, save
trl_compat.py     every use of TRL beyond its public API, installed by the CLI (tests/test_trl_contract.py)
online.py         what the online methods share (RLOO, online DPO): r_phi as a TRL reward function, one run
hub.py            the profiles that may use the Hugging Face hub fail fast when it is unreachable
"""
