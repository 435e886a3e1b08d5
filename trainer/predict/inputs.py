"""The scenes given to `terrascale predict`, checked before any model is loaded: readable, georeferenced, the
band count the model was trained on, every date on one grid. Used by native and `terratorch fit` predictions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from trainer.config import Experiment
from trainer.data.geotiff import TileHeader, same_grid, read_header
from trainer.errors import DataError


def check_inputs(paths: Sequence[Path], exp: Experiment, n_stats: int, num_dates: int) -> list[TileHeader]:
    """Every input readable, georeferenced, with the trained band count, all dates on one grid."""
    expect = f"{num_dates} dates (--input t0 --input2 t1 ...)" if num_dates > 1 else "one scene (--input)"
    if len(paths) != num_dates:
        raise DataError(f"the model of this job takes {expect} but {len(paths)} file(s) were given: {list(map(str, paths))}")
    headers = []
    for path in paths:
        h = read_header(str(path))  # DataError naming the file when rasterio cannot read it
        if h.crs is None or h.transform == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0):
            raise DataError(f"{path} is not georeferenced (no CRS or no geotransform): the prediction could not be "
                            "placed on the map; assign them first (e.g. gdal_edit.py -a_srs EPSG:XXXX -a_ullr ...)")
        bands = exp.data.bands
        if bands is None and h.count != n_stats:
            raise DataError(f"wrong band count: {path} has {h.count} bands but the model was trained on {n_stats}-band "
                            "tiles (stats.json); give a scene with the same bands in the same order")
        if bands and max(bands) > h.count:
            raise DataError(f"wrong band count: {path} has {h.count} bands but the job's data.bands={list(bands)} "
                            f"reads band {max(bands)}; give a scene with the bands the model was trained on")
        if bands and n_stats not in (h.count, len(bands)):
            raise DataError(f"wrong band count: {path} has {h.count} bands but stats.json has {n_stats} entries "
                            f"(neither the scene's bands nor data.bands={list(bands)})")
        if headers and not same_grid(headers[0], h):
            f = headers[0]
            raise DataError(f"dates are not co-registered: {f.path} ({f.crs}, {f.height}x{f.width}, {f.transform}) vs "
                            f"{h.path} ({h.crs}, {h.height}x{h.width}, {h.transform}); resample every date onto one "
                            "grid (e.g. gdalwarp -tap -tr ...)")
        headers.append(h)
    return headers
