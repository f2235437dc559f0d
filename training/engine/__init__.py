"""The pieces behind `training.trainer.Trainer` and `training/train.py`.

options        the trainer's config groups as small typed dataclasses
trainer_setup  building the device, process group, model, loss, optimizer, data; the banner
step           one optimisation step: AMP, accumulation, non-finite losses, clipping
checkpointer   atomic training checkpoints, resume, RNG capture
progress       metering: progress lines, TensorBoard scalars, ETA, summaries
validation_hook  metrics on `data.val` during training, checkpoint_best.pt, early stopping
run_summary    the closing summary of a run and its picture of predictions
config         finding, composing and saving a run's config
validate       checking a config before any process starts (one-line errors)
launch         running the trainer: in-process, spawned ranks, torchrun, SLURM via submitit
"""
