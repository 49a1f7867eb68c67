"""Integrations of zeroshard with training frameworks, one module per framework.

Owns nothing itself. Each module imports its framework only when that module is imported, so
`import zeroshard` never pulls in a framework:

- `zeroshard.integrations.transformers`: `ZeroTrainer`, a Hugging Face `transformers.Trainer`
  that trains with a zeroshard optimizer (stages 0-2) instead of DDP + `torch.optim.AdamW`.
"""
