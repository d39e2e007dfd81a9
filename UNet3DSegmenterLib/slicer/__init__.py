"""The Slicer side of UNet3DSegmenter: the only part that imports slicer, vtk, qt or ctk; never torch at load."""
