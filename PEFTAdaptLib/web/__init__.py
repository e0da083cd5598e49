"""The PEFTAdapt panel in the browser (`peftadapt web`): trame-slicer's server-side MRML scene, views and segment
editor, driven through the same scene logic and job client as the Slicer module. Needs the `web` extra; nothing in
the engine imports this package."""
