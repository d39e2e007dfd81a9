"""User-facing text marked for Slicer's translation: ``_("Segment")``.

Slicer (5.4 and newer) translates through ``slicer.i18n.tr``, and its tools collect the strings
wrapped in ``_()`` into the translation catalogues; where that layer is absent (``slicer-core``, the
tests) the text is shown as written.
"""

from __future__ import annotations

try:
    from slicer.i18n import tr as _
except ImportError:  # no translation layer here: the English text as written

    def _(text: str) -> str:
        return text


__all__ = ["_"]
