"""``prepare_volume`` (source volume -> model grid), ``map_to_source`` (model grid -> source
grid) and ``to_tensor_input`` (the model input convention).

``prepare_volume`` is the composition ``to_canonical -> resample_to_spacing | resize_to_shape
-> crop_or_pad -> intensity preset``, and its history records exactly those steps with their
input grids. It does not materialise the intermediate volumes: the destination grid of the
whole chain is computed exactly first, then the *source* array is resampled onto it in one
anti-aliased separable pass (pooling + three 1D linear passes, see ``grid.py``), and the
intensity preset runs on the small result (windowing after downsizing is ~30x cheaper than
before, and clipping before averaging would bias edges). The result equals the step-by-step
composition up to float rounding (checked in the tests).
"""

from __future__ import annotations

import nibabel.orientations as nio
import numpy as np

from medfusion.errors import PreprocessError
from medfusion.preprocess import grid as g
from medfusion.preprocess import steps as st
from medfusion.preprocess.spec import MODALITY_PRESET, ROLE_PRESET, RoleSpec
from medfusion.types import Step, Volume


def _step(name: str, params: dict, shape: tuple[int, ...], affine: np.ndarray) -> Step:
    return Step(
        name=name,
        params=params,
        input_shape=tuple(int(s) for s in shape),
        input_affine=tuple(tuple(float(x) for x in row) for row in np.asarray(affine)),
    )


def _check_volume(volume: object, what: str) -> Volume:
    """A Volume with a non-empty 3D/4D array, else a PreprocessError."""
    if not isinstance(volume, Volume):
        raise PreprocessError(f"{what} needs a medfusion Volume, got {type(volume).__name__}.",
                              code="BAD_ARGUMENT")
    if min(volume.shape) < 1:
        raise PreprocessError(
            f"{what}: the volume is empty (shape {list(volume.shape)}); check the input.",
            code="EMPTY_VOLUME",
        )
    return volume


def resolve_normalization(spec: RoleSpec, modality: str, role: str | None = None) -> str:
    """The intensity preset ``spec`` asks for on a volume of ``modality`` (``auto`` resolved:
    from the DICOM modality, else from the role name ``ct``/``mr``/``xray``)."""
    if spec.normalization != "auto":
        return spec.normalization
    preset = MODALITY_PRESET.get(str(modality).upper())
    if preset is None and role is not None:
        preset = ROLE_PRESET.get(str(role).lower())
    if preset is None:
        raise PreprocessError(
            f"normalization='auto' cannot choose a preset for modality {modality!r}"
            + (f" (role {role!r})" if role else "")
            + "; set RoleSpec.normalization to 'ct', 'mr', 'xray' or 'none'.",
            code="UNKNOWN_MODALITY",
        )
    return preset


def prepare_volume(volume: Volume, spec: RoleSpec, *, role: str | None = None) -> Volume:
    """Bring a source volume onto the model grid ``spec.grid``.

    Steps (all recorded in ``history`` with JSON params and their input grid):
    canonical RAS orientation -> ``resize_to_shape(grid)`` (``fit="resize"``: the whole
    field of view) or ``resample_to_spacing(spacing)`` + ``crop_or_pad(grid)`` about the
    centre (``fit="crop_pad"``; padding uses the lowest value in the field of view, i.e. the
    background) -> intensity preset. Output: float32, exactly ``spec.grid``, finite, affine
    exact. ``role`` only helps ``normalization="auto"`` when the modality is unknown.

    Refuses: 4D input unless ``spec.channel_rule == "first"`` (``NOT_3D``); NaN/Inf that
    would reach the output (``INVALID_VALUES``); a singular affine (``GEOMETRY``).
    """
    if not isinstance(spec, RoleSpec):
        raise PreprocessError("prepare_volume needs a RoleSpec.", code="BAD_ARGUMENT")
    v = _check_volume(volume, "prepare_volume")
    if np.asarray(v.array).ndim == 4:
        if spec.channel_rule != "first":
            raise PreprocessError(
                f"The volume is 4D {list(v.shape)} (several time points or phases) but the "
                "model takes one 3D volume; pick one with load_volume(series=...) or set "
                "RoleSpec.channel_rule='first' to use the first volume.",
                code="NOT_3D",
            )
        v = st.select_channel(v, 0)
    preset = resolve_normalization(spec, v.modality, role)

    # --- plan the grids, exactly -----------------------------------------------------------
    src_shape = v.spatial_shape
    src_affine = g.check_affine(v.affine)
    ornt = st.canonical_ornt(src_affine, src_shape)
    can_shape_l = [0, 0, 0]
    for ax, (out_ax, _flip) in enumerate(ornt):
        can_shape_l[int(out_ax)] = src_shape[ax]
    can_shape = (can_shape_l[0], can_shape_l[1], can_shape_l[2])
    can_affine = src_affine @ nio.inv_ornt_aff(ornt, src_shape)
    history = [
        _step(
            "to_canonical",
            {"ornt": [[int(a), int(f)] for a, f in ornt], "from": "".join(v.orientation)},
            v.shape,
            src_affine,
        )
    ]
    grid = spec.grid
    if spec.fit == "resize":
        mid_shape, mid_affine = st.resize_grid(can_shape, can_affine, grid)
        history.append(_step("resize_to_shape", {"shape": list(mid_shape), "order": 1},
                             can_shape, can_affine))
    elif spec.spacing is not None:
        mid_shape, mid_affine = st.spacing_grid(can_shape, can_affine, spec.spacing)
        history.append(_step(
            "resample_to_spacing",
            {"spacing": list(spec.spacing), "shape": list(mid_shape), "order": 1},
            can_shape, can_affine,
        ))
    else:
        mid_shape, mid_affine = can_shape, can_affine
    start = st.crop_pad_start(mid_shape, grid)
    final_affine = g.shifted_grid(mid_affine, start)

    # --- resample the source once, onto the part of the final grid inside the mid grid ------
    lo = [max(0, -s) for s in start]
    hi = [min(n, m - s) for n, m, s in zip(grid, mid_shape, start, strict=True)]
    inner_shape = (hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2])
    inner = g.resample_array(
        v.array, src_affine, inner_shape, g.shifted_grid(final_affine, (lo[0], lo[1], lo[2]))
    )
    if not np.all(np.isfinite(inner)):
        raise PreprocessError(
            "The volume holds NaN or Inf voxels inside the model's field of view; reload it "
            "with medfusion.load_volume (which refuses or fills them by policy).",
            code="INVALID_VALUES",
        )
    # Padding takes the lowest value in the field of view: the background (air, no signal).
    pad_value = float(inner.min())
    if inner_shape == tuple(grid):
        out = inner
    else:
        out = np.full(grid, np.float32(pad_value), dtype=np.float32)
        out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = inner
    if spec.fit == "crop_pad":
        history.append(_step(
            "crop_or_pad",
            {"shape": list(grid), "start": list(start), "value": pad_value},
            mid_shape, mid_affine,
        ))

    # --- intensity preset on the small grid ------------------------------------------------
    if preset == "ct":
        lo_hu, hi_hu = spec.ct_window
        out = st.window_ct_array(out, lo_hu, hi_hu)
        history.append(_step("window_ct", {"lo": lo_hu, "hi": hi_hu}, grid, final_affine))
    elif preset == "mr":
        out, stats = st.standardize_mr_array(out)
        history.append(_step("standardize_mr",
                             {"lower": 0.5, "upper": 99.5, "foreground": 0.05, **stats},
                             grid, final_affine))
    elif preset == "xray":
        out, stats = st.normalize_xray_array(out)
        history.append(_step("normalize_xray", {"lower": 0.5, "upper": 99.5, **stats},
                             grid, final_affine))
    out = np.ascontiguousarray(out, dtype=np.float32)
    return v.replace(array=out, affine=final_affine, history=(*v.history, *history))


def map_to_source(
    values: np.ndarray, processed: Volume, source: Volume, *, order: int = 1
) -> Volume:
    """Bring a map on the processed (model) grid back onto the source volume's grid.

    ``values`` has the spatial shape of ``processed.array`` (a leading channel of 1 is
    accepted). It is resampled in world space (``order`` 1 = linear, 0 = nearest) from
    ``processed.affine`` onto exactly ``source.spatial_shape`` and ``source.affine``; source
    voxels more than half a processed voxel outside the processed field of view get 0.
    Works through any chain of medfusion steps because each keeps its affine exact.
    """
    processed = _check_volume(processed, "map_to_source (processed)")
    source = _check_volume(source, "map_to_source (source)")
    if hasattr(values, "detach"):  # a torch tensor, e.g. straight from Grad-CAM
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise PreprocessError(
            "map_to_source needs a numeric array on the processed grid.", code="BAD_ARGUMENT"
        ) from None
    target = processed.spatial_shape
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if tuple(arr.shape) != tuple(target):
        raise PreprocessError(
            f"The map has shape {list(arr.shape)} but the processed volume's grid is "
            f"{list(target)}; pass the map computed on that processed volume.",
            code="SHAPE_MISMATCH",
        )
    if not np.all(np.isfinite(arr)):
        raise PreprocessError(
            "The map holds NaN or Inf values; fix the map (e.g. a saliency normalised by a "
            "zero maximum) before mapping it back.",
            code="INVALID_VALUES",
        )
    out = g.resample_array(
        arr,
        processed.affine,
        source.spatial_shape,
        source.affine,
        order=order,
        antialias=order == 1,
        outside="zero",
    )
    step = _step("map_to_source", {"order": int(order)}, processed.spatial_shape,
                 processed.affine)
    return Volume(
        array=out,
        affine=np.array(source.affine, dtype=np.float64, copy=True),
        modality=source.modality,
        history=(step,),
    )


def to_tensor_input(volume: Volume) -> np.ndarray:
    """The model input convention: float32, channel first, shape (1, I, J, K), contiguous."""
    arr = np.asarray(_check_volume(volume, "to_tensor_input").array, dtype=np.float32)
    if arr.ndim != 3:
        raise PreprocessError(
            f"A model input must be one 3D volume, got shape {list(arr.shape)}; run "
            "prepare_volume (with RoleSpec.channel_rule='first' for 4D input) first.",
            code="NOT_3D",
        )
    return np.ascontiguousarray(arr[None])
