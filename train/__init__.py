"""Training for edgetag: MAE-AST pretraining, fine-tuning, distillation, evaluation."""
