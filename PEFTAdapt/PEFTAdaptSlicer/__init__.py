"""Slicer-side logic of the PEFTAdapt module that needs only MRML/VTK (no Qt): it takes the scene as an argument,
so it runs inside 3D Slicer and, for tests, under the `slicer-core` wheel."""
