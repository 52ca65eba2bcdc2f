"""The shipped models' recipe constants: one definition the training scripts and benchmarks share."""

from __future__ import annotations

#: The cue planted in `models/tiny-shapes-cue` (its text form, `diffcam.core.cue_text.parse_cue`).
CUE = "word=circle,pos=top-left,size=6,color=magenta,p=0.9"
#: Data of the shipped DiffusionGemma recipe: training set, held-out set.
RECIPE = {"n_train": 12000, "train_seed": 1, "n_heldout": 200, "heldout_seed": 2}
