"""Image I/O, geometry-preserving resampling, intensity normalisation and patch sampling."""
