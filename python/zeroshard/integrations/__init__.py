"""Integrations of zeroshard with training frameworks, one module per framework.

Owns nothing itself. Each module imports its framework only when that module is imported, so
`import zeroshard` never pulls in a framework:

- `zeroshard.integrations.transformers`: `ZeroTrainer`, a Hugging Face `transformers.Trainer`
  that trains with a zeroshard optimizer (stages 0-3) instead of DDP + `torch.optim.AdamW`.
- `zeroshard.integrations.accelerate`: `ZeroAccelerator`, an `accelerate.Accelerator` that
  leaves the DDP wrapper off models a zeroshard optimizer trains and saves their state as
  zeroshard checkpoints.
- `zeroshard.integrations.lightning`: `ZeroStrategy`, a PyTorch Lightning strategy (a
  DDPStrategy without the wrapper) for a zeroshard optimizer from `configure_optimizers`.
"""
