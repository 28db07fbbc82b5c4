"""Self-supervised objectives for pretraining an encoder on unlabelled audio (train.pretrain):
MAE-AST (`mae.py`: the encoder sees only the visible tokens) and the SSAST baseline (`ssast.py`)."""
