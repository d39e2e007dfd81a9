"""Training: labelled volumes in, a self-describing checkpoint out.

``config`` (every option, declared once) -> ``splits`` -> ``planning`` (spacing, patch size,
normalisation, network from the data) -> ``patches`` (cases prepared once, patches sampled) ->
``augment`` -> ``step`` (one optimiser step, the schedule, the log) with ``losses`` ->
``validation`` (the inference sliding window on whole cases) -> ``trainer`` (the loop, checkpoints,
resume), which ``distributed`` joins to ``torchrun``.
"""
