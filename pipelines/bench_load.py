"""Load benchmark: a 200-slice 512x512 CT series made on the fly, read by medfusion,
SimpleITK ImageSeriesReader, MONAI LoadImage(PydicomReader), a plain pydicom loop and a raw
file read (the bound), in the same run. Prints milliseconds and ratios.

Run: ``.venv/bin/python pipelines/bench_load.py [--slices 200] [--size 512] [--repeats 3]``
(``--private-tags N`` adds N vendor private tags per file, as real scanners write).
Each reader is timed warm (files in the page cache), best of ``--repeats``.

``--codec rle jpeg2000 jpegls`` writes the series compressed with pydicom's encoders
(RLE Lossless, JPEG 2000 Lossless, JPEG-LS Lossless) and, per codec, prints medfusion
(frames decoded across processes), medfusion decoding serially
(``MEDFUSION_DECODE_PROCESSES=1``), SimpleITK and the plain pydicom loop side by side:

    .venv/bin/python pipelines/bench_load.py --slices 100 --codec rle jpeg2000 jpegls
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from medfusion.io.dicom.parallel import ENV

CODECS = {"none": ExplicitVRLittleEndian, "rle": RLELossless, "jpeg2000": JPEG2000Lossless,
          "jpegls": JPEGLSLossless}


def _best_ms(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best = float("inf")
    result: object = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, (time.perf_counter() - start) * 1000.0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--private-tags", type=int, default=0)
    parser.add_argument("--skip-monai", action="store_true")
    parser.add_argument("--codec", nargs="+", default=["none"], choices=sorted(CODECS),
                        help="transfer syntax(es) of the series (compressed: MONAI skipped)")
    args = parser.parse_args()
    for codec in args.codec:
        bench(args, codec)


def bench(args: argparse.Namespace, codec: str) -> None:

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    import pydicom
    import SimpleITK as sitk

    from medfusion.io.volume import load_volume
    from medfusion.testing.dicom_factory import write_series

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ct"
        base = rng.integers(-1000, 2000, (args.size, args.size, 1)).astype(np.float64)
        arr = np.repeat(base, args.slices, axis=2)
        t0 = time.perf_counter()
        write_series(folder, arr, seed=0, n_private_tags=args.private_tags,
                     transfer_syntax=CODECS[codec])
        print(f"[{codec}] wrote {args.slices} x {args.size}x{args.size} CT slices in "
              f"{time.perf_counter() - t0:.1f} s ({args.private_tags} private tags/file)")
        files = sorted(str(folder / f) for f in os.listdir(folder))

        def raw() -> int:
            total = 0
            for f in files:
                with open(f, "rb") as fp:
                    total += len(fp.read())
            return total

        def plain_pydicom() -> np.ndarray:
            dss = [pydicom.dcmread(f) for f in files]
            dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
            return np.stack(
                [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss]
            )

        def simpleitk() -> tuple[object, np.ndarray]:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
            image = reader.Execute()
            # a zero-copy view (kept with its image: the view dies with the image)
            return image, sitk.GetArrayViewFromImage(image)

        def medfusion() -> np.ndarray:
            return load_volume(folder).array

        os.environ.setdefault(ENV, "auto")  # as the medfusion command runs it

        results: dict[str, float] = {}
        raw()  # warm the page cache
        results["raw file read"], _ = _best_ms(raw, args.repeats)
        results["medfusion load_volume"], vol = _best_ms(medfusion, args.repeats)
        if codec != "none":
            chosen, os.environ[ENV] = os.environ[ENV], "1"
            try:
                results["medfusion, serial decode"], _ = _best_ms(medfusion, args.repeats)
            finally:
                os.environ[ENV] = chosen
        results["SimpleITK ImageSeriesReader"], ref = _best_ms(simpleitk, args.repeats)
        results["plain pydicom loop"], _ = _best_ms(plain_pydicom, args.repeats)
        if not args.skip_monai and codec == "none":
            from monai.transforms import LoadImage

            loader = LoadImage(reader="PydicomReader", image_only=True)
            results["MONAI LoadImage(PydicomReader)"], _ = _best_ms(
                lambda: loader(str(folder)), max(1, args.repeats - 1)
            )
        # sanity: same voxels as SimpleITK (its array is (k, j, i))
        _image, ref_view = ref  # type: ignore[misc]
        same = np.array_equal(np.asarray(vol), np.asarray(ref_view).transpose(2, 1, 0))
        print(f"medfusion voxels identical to SimpleITK: {same}")

    sitk_ms = results["SimpleITK ImageSeriesReader"]
    med_ms = results["medfusion load_volume"]
    print(f"[{codec}] {'reader':34s} {'ms':>9s} {'x medfusion':>12s}")
    for name, ms in results.items():
        print(f"[{codec}] {name:34s} {ms:9.1f} {ms / med_ms:12.2f}")
    print(f"[{codec}] speed-up over SimpleITK: {sitk_ms / med_ms:.2f}x; "
          f"medfusion / raw read bound: {med_ms / results['raw file read']:.1f}x")


if __name__ == "__main__":
    main()
