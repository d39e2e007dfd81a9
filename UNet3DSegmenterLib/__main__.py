"""``python -m UNet3DSegmenterLib``: the same as the ``unet3d-segmenter`` command."""

import sys

from .commands.cli import main

sys.exit(main())
