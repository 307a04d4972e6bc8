"""Files and grids: volumes with their geometry, resampling, atomic writes, devices, where files live."""
