"""Pure ``Volume -> Volume`` preprocessing, recorded in ``Volume.history`` and invertible.

Public API::

    RoleSpec(grid, spacing=None, normalization="auto", ct_window=(-1000, 1000), fit="resize")
    prepare_volume(volume, spec) -> Volume          # source -> model grid
    map_to_source(values, processed, source) -> Volume   # model grid -> source grid
    to_tensor_input(volume) -> np.ndarray (1, I, J, K)

and the single steps ``to_canonical``, ``resample_to_spacing``, ``resize_to_shape``,
``crop_or_pad``, ``window_ct``, ``standardize_mr``, ``normalize_xray``, ``select_channel``.
See docs/preprocessing.md.
"""

from medfusion.preprocess.pipeline import (
    map_to_source,
    prepare_volume,
    resolve_normalization,
    to_tensor_input,
)
from medfusion.preprocess.spec import RoleSpec
from medfusion.preprocess.steps import (
    crop_or_pad,
    normalize_xray,
    resample_to_spacing,
    resize_to_shape,
    select_channel,
    standardize_mr,
    to_canonical,
    window_ct,
)

__all__ = [
    "RoleSpec",
    "crop_or_pad",
    "map_to_source",
    "normalize_xray",
    "prepare_volume",
    "resample_to_spacing",
    "resize_to_shape",
    "resolve_normalization",
    "select_channel",
    "standardize_mr",
    "to_canonical",
    "to_tensor_input",
    "window_ct",
]
