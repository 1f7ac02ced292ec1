"""The one exception type for mistakes a user can make (bad file, bad setting), and the readouts' warning.

The CLI prints a `GMAEError` as a single line and exits with status 2; anything
else is a bug and keeps its traceback.

`DepthCollapseWarning` is what the Python API (`gmae.load(...)` models) warns
with when the Gaussians it reads have collapsed depths, so that their depth
order is the query-token order (the commands print the same line).
"""


class GMAEError(ValueError):
    """A user-caused error: the message names the file or value and what to do."""


class DepthCollapseWarning(UserWarning):
    """The Gaussians read have collapsed depths (gmae.readouts.core.depth_collapse): depth-ordered readouts
    show the order of the query tokens, not depth."""


class LayoutWarning(UserWarning):
    """The model's Gaussians sit in the same place (and depth order) for every image (gmae.readouts.layout): its
    readouts show that fixed layout more than the image read."""
