"""The Slicer side of UNet3DSegmenter: what ``UNet3DSegmenter.py`` (the module file) builds on.

One concern per module::

    install       what the engine needs, whether it loads, how to install it; the one door to the engine
    scene         volume nodes <-> engine Volumes, segmentations <-> labelmaps, placement beside the input
    export        training pairs of the scene -> a dataset the trainer reads (datalist.write_datalist)
    segmentation  the Segment job: prepare, run (here or in a child process), finish
    training      the Train job: prepare (TrainingConfig, export), run, finish; the curves in the scene
    process       the engine's command line in a child process: events, cancel, graceful stop (stdlib only)
    panel         everything the panel decides, without Qt, driven by the Widget
    selftest      what the self-test builds on: a tiny model trained in seconds, phantoms in the scene
    views         Slicer's own slice and 3D views rendered offscreen (pictures of results, their tests)
    samples       the bundled sample volume, registered with the Sample Data module
    translation   ``_()``: user-facing text marked for Slicer's translation

This package is the only place besides the module file that imports slicer or vtk; the Widget in
the module file is the only one that uses qt and ctk. Importing it imports no torch: the engine is
imported when first used (``install.engine``). Names follow Slicer's camelCase, as the module file's
do. It runs inside Slicer only and is not part of the engine's wheel.
"""
