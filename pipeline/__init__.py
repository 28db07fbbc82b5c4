"""The floor above train/ and deploy/: the bundled model built end to end (`recipe`, pretrain ->
finetune -> distill -> calibrate -> export -> evaluate -> card), its model card, its example clip."""

import edgetag  # noqa: F401  before numpy: pins numpy's BLAS to one thread (see edgetag/__init__.py)
