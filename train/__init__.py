"""Training for edgetag: MAE-AST pretraining, fine-tuning, distillation, evaluation."""

import edgetag  # noqa: F401  before numpy: pins numpy's BLAS to one thread (see edgetag/__init__.py)
