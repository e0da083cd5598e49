"""The MRML side of the front-ends (Slicer module, browser app): nodes ⇄ files, worker events → tables and plots,
and the panel logic on a scene. Imports `slicer` (Slicer's own, or the slicer-core wheel); nothing in the engine
core imports this package."""
