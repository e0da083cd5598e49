"""PEFTAdapt engine: parameter-efficient adaptation of pretrained 3D segmentation models.

Importable without 3D Slicer or Qt; the Slicer module and the CLI both drive it.
"""
__version__ = "0.1.0"
