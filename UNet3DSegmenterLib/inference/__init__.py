"""Inference: a preprocessed volume through the network, window by window, back to a labelmap.

``predictor`` (the one pipeline the command line, the Python API and Slicer call) ->
``fast`` (the network rewritten for speed without changing what it computes) ->
``sliding_window`` (Gaussian-weighted windows, batched, cancellable) -> ``postprocess``
(probabilities back on the input grid, argmax, largest component).
"""
