"""Bad image files never pass silently: truncated, non-finite or oversized volumes are refused before any work, in
every supported format; FreeSurfer's MGH/MGZ volumes are read and written with exact geometry.

All inputs are the real files of ../shared/data, damaged here the way a broken copy or a hostile header would be.
"""
from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared
from PEFTAdaptLib.data.cases import load_case
from PEFTAdaptLib.data.formats import SUFFIXES as SUPPORTED_SUFFIXES
from PEFTAdaptLib.data.io import read_image, same_geometry, write_image
from PEFTAdaptLib.data.limits import DEFAULT_MAX_VOXELS, MAX_VOXELS_ENV
from PEFTAdaptLib.errors import InputError
from PEFTAdaptLib.models.card import LabelInfo, ModelCard

PEFTADAPT = Path(sys.executable).with_name("peftadapt.exe" if sys.platform == "win32" else "peftadapt")
BRATS_T1C = "brats/brats_2013_pat0003_1/T1c_subtrMeanDivStd.nii.gz"  # float32, 240×240×155
SPINE_T2 = "spine/t2/t2.nii.gz"  # int16, 60×55×52, 1 mm
SPINE_T2_LABEL = "spine/t2/t2_seg-manual.nii.gz"
NORM_MGZ = "freesurfer/bert/norm.mgz"  # uint8, 256³ conformed (LIA)
ASEG_MGZ = "freesurfer/bert/aseg.mgz"  # int32 FreeSurfer labels


def cli_error(*args: str, env: dict | None = None) -> str:
    """Run the console script; it must fail with exactly one `peftadapt: error:` line (exit 2) and no traceback."""
    import os

    result = subprocess.run([str(PEFTADAPT), *args], capture_output=True, text=True, timeout=600,
                            env={**os.environ, **(env or {})})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("peftadapt: error:"), result.stderr
    return lines[0]


def float_copy(relative: str, path: Path) -> Path:
    """A real volume rewritten as float32 in the format `path`'s suffix names (MGZ through nibabel)."""
    image = sitk.ReadImage(str(shared(relative)), sitk.sitkFloat32)
    write_image(image, path)
    return path


# --- 4: truncated files ---------------------------------------------------------------------------------------------


def test_truncated_gzip_nifti_is_refused_not_padded_with_zeros(tmp_path):
    data = shared(BRATS_T1C).read_bytes()
    half = tmp_path / "half.nii.gz"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated") as error:
        read_image(half)
    assert str(half) in str(error.value)
    # every voxel present, only the gzip trailer (CRC + length) cut: the stream end is checked too
    no_trailer = tmp_path / "no_trailer.nii.gz"
    no_trailer.write_bytes(data[:-8])
    with pytest.raises(InputError, match="truncated"):
        read_image(no_trailer)
    assert "truncated" in cli_error("predict", "--image", str(half), "--output", str(tmp_path / "o.nii.gz"))


def test_half_a_raw_nifti_is_refused_with_the_byte_counts(tmp_path):
    raw = tmp_path / "t2.nii"
    raw.write_bytes(gzip.decompress(shared(SPINE_T2).read_bytes()))
    assert read_image(raw).GetSize() == (60, 55, 52)  # the intact file reads
    data = raw.read_bytes()
    raw.write_bytes(data[: len(data) // 2])
    expected = 60 * 55 * 52 * 2
    held = len(data) // 2 - 352  # the voxel bytes after the 352-byte header
    with pytest.raises(InputError, match=f"int16 voxels \\({expected:,} bytes\\) but it holds {held:,}"):
        read_image(raw)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mgz"])
def test_truncated_files_of_the_other_formats_are_refused(tmp_path, suffix):
    whole = float_copy(SPINE_T2, tmp_path / f"t2{suffix}")
    data = whole.read_bytes()
    half = tmp_path / f"half{suffix}"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated|cannot read") as error:
        read_image(half)
    assert str(half) in str(error.value) and "No such file" not in str(error.value)


# --- 5: NaN / inf in every format -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mgz"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_intensities_are_refused_in_every_format(tmp_path, suffix, bad):
    image = sitk.ReadImage(str(shared(SPINE_T2)), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[20, 30, 40] = bad
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    path = tmp_path / f"bad{suffix}"
    if suffix.startswith(".nii"):  # written by nibabel, as a user's pipeline would; SimpleITK reads the NaN as 0
        nib.save(nib.Nifti1Image(array.T, nib.load(str(shared(SPINE_T2))).affine), str(path))
    else:
        write_image(broken, path)
    with pytest.raises(InputError, match="NaN or infinite") as error:
        read_image(path)
    assert str(path) in str(error.value)
    with pytest.raises(InputError, match="label contains NaN or infinite"):
        read_image(path, what="label")


def test_nan_is_found_across_chunk_boundaries_that_split_a_voxel(tmp_path, monkeypatch):
    from PEFTAdaptLib.data import integrity

    monkeypatch.setattr(integrity, "CHUNK_BYTES", 1001)  # odd: every chunk ends inside a float32 voxel
    array = np.asanyarray(nib.load(str(shared(SPINE_T2))).dataobj).astype(np.float32)
    path = tmp_path / "t2.nii.gz"
    nib.save(nib.Nifti1Image(array, nib.load(str(shared(SPINE_T2))).affine), str(path))
    assert read_image(path).GetSize() == (60, 55, 52)  # finite values misread across a boundary would fail here
    array[-1, -1, -1] = np.nan  # the very last voxel
    nib.save(nib.Nifti1Image(array, nib.load(str(shared(SPINE_T2))).affine), str(path))
    with pytest.raises(InputError, match="NaN"):
        read_image(path)


def test_a_gzip_holding_far_more_than_its_header_declares_is_refused(tmp_path):
    header = nib.load(str(shared(SPINE_T2))).header.copy()
    bomb = tmp_path / "bomb.nii.gz"
    with gzip.open(bomb, "wb") as stream:
        stream.write(header.binaryblock + b"\0" * 4)
        for _ in range(80):
            stream.write(b"\0" * 2**20)  # 80 MiB of zeros: about 80 kB once compressed
    assert bomb.stat().st_size < 200_000
    with pytest.raises(InputError, match="far more data than its header declares"):
        read_image(bomb)


def test_nan_nifti_is_refused_by_the_cli(tmp_path):
    path = tmp_path / "nan.nii.gz"
    array = np.asanyarray(nib.load(str(shared(SPINE_T2))).dataobj).astype(np.float32)
    array[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(array, nib.load(str(shared(SPINE_T2))).affine), str(path))
    assert "NaN" in cli_error("predict", "--image", str(path), "--output", str(tmp_path / "o.nii.gz"))


def test_a_constant_image_is_refused_before_training(tmp_path):
    """Found by a user-level check: a blank volume (every voxel 0) trained, and its audit reported Dice 0 kept."""
    path = tmp_path / "blank.nii.gz"
    scan = nib.load(str(shared(SPINE_T2)))
    nib.save(nib.Nifti1Image(np.zeros(scan.shape, np.float32), scan.affine), str(path))
    line = cli_error("adapt", "--train", str(path), str(shared(SPINE_T2_LABEL)), "--output", str(tmp_path / "job"))
    assert line == f"peftadapt: error: {path}: image is constant (every voxel 0); give the scan itself"
    assert not (tmp_path / "job").exists()


def test_a_binary_mask_saved_as_0_and_255_is_refused_with_the_value_to_save(tmp_path):
    """Many tools save a mask as 0/255: the refusal listed the model's classes and left the user to guess why."""
    path = tmp_path / "mask255.nii.gz"
    label = nib.load(str(shared(SPINE_T2_LABEL)))
    nib.save(nib.Nifti1Image((np.asanyarray(label.dataobj) > 0.5).astype(np.uint8) * 255, label.affine), str(path))
    line = cli_error("adapt", "--model", str(shared("meshnet/mindgrab")), "--train", str(shared(SPINE_T2)), str(path),
                     "--output", str(tmp_path / "job"))
    assert line == (f"peftadapt: error: {path}: label values [255] are not classes of this model (known: [0, 1]); "
                    "a binary mask: save its foreground as 1")
    assert not (tmp_path / "job").exists()


def test_a_slice_saved_with_its_volumes_3d_affine_names_the_singular_direction(tmp_path):
    """Found by a user-level check: ITK prints the direction matrix over several lines after its message, and the
    error line ended on the matrix's last row ("cannot read image …: 1 -0")."""
    path = tmp_path / "slice.nii.gz"
    scan = nib.load(str(shared(SPINE_T2)))
    nib.save(nib.Nifti1Image(np.asarray(scan.dataobj)[:, :, 26].astype(np.float32), scan.affine), str(path))
    line = cli_error("predict", "--image", str(path), "--output", str(tmp_path / "o.nii.gz"))
    assert line.startswith(f"peftadapt: error: {path}: cannot read image (corrupt or not an image): Bad direction")


# --- 9: sizes from the header, before any voxel is allocated ----------------------------------------------------------


def _header_only_nifti(path: Path, shape: tuple[int, ...]) -> Path:
    """A NIfTI header declaring `shape` float32 voxels, with none of them: 70 bytes once gzipped."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def test_a_tiny_file_declaring_1200_cubed_is_refused_from_its_header(tmp_path):
    bomb = _header_only_nifti(tmp_path / "bomb.nii.gz", (1200, 1200, 1200))
    assert bomb.stat().st_size < 100
    with pytest.raises(InputError, match=r"image is 1200×1200×1200 = 1,728,000,000 voxels \(about 6.4 GiB per float32 "
                                         r"copy\), beyond the limit of 268,435,456 voxels") as error:
        read_image(bomb)
    assert MAX_VOXELS_ENV in str(error.value) and str(bomb) in str(error.value)
    line = cli_error("predict", "--image", str(bomb), "--output", str(tmp_path / "o.nii.gz"))
    assert "beyond the limit" in line and "internal error" not in line


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mgz"])
def test_the_voxel_limit_is_configurable_and_checked_for_every_format(tmp_path, monkeypatch, suffix):
    path = float_copy(SPINE_T2, tmp_path / f"t2{suffix}")  # 171,600 voxels
    monkeypatch.setenv(MAX_VOXELS_ENV, "100000")
    with pytest.raises(InputError, match=r"image is 60×55×52 = 171,600 voxels .* beyond the limit of 100,000") as error:
        read_image(path)
    assert str(path) in str(error.value)
    monkeypatch.setenv(MAX_VOXELS_ENV, "200000")
    assert read_image(path).GetSize() == (60, 55, 52)
    monkeypatch.setenv(MAX_VOXELS_ENV, "lots")
    with pytest.raises(InputError, match=f"{MAX_VOXELS_ENV}='lots': not a positive number"):
        read_image(path)


def test_resampling_to_the_model_grid_is_refused_before_it_allocates(monkeypatch):
    card = ModelCard(id="fine", title="fine grid", description="", modality="MR", input_channels=1,
                     spacing=(0.5, 0.5, 0.5), orientation="RAS", normalization={"name": "zscore"},
                     patch_size=(16, 16, 16), inference_roi=(16, 16, 16),
                     labels=[LabelInfo(0, "background"), LabelInfo(1, "cord")], license="test", source="test")
    monkeypatch.setenv(MAX_VOXELS_ENV, "1000000")  # the image (171,600 voxels) fits; 8× as many at 0.5 mm do not
    with pytest.raises(InputError, match=r"t2: the image on the model's 0.5×0.5×0.5 mm grid is 104×120×110 = "
                                         r"1,372,800 voxels"):
        load_case([shared(SPINE_T2)], card)
    monkeypatch.setenv(MAX_VOXELS_ENV, "2000000")
    assert load_case([shared(SPINE_T2)], card).array.shape == (1, 104, 120, 110)


def test_every_real_volume_passes_the_default_checks():
    assert DEFAULT_MAX_VOXELS >= 256**3
    volumes = sorted(shared(".").rglob("*.nii.gz")) + sorted(shared("freesurfer").rglob("*.mgz"))
    assert len(volumes) > 40
    for path in volumes:
        assert min(read_image(path, what="label" if "seg" in path.name else "image").GetSize()) >= 5


# --- issue 18.9: FreeSurfer MGH/MGZ ----------------------------------------------------------------------------------


def test_mgz_geometry_matches_the_nifti_route_exactly(tmp_path):
    """nibabel's RAS affine → ITK's LPS spacing/origin/direction, checked against SimpleITK reading the same volume
    saved by nibabel as NIfTI (an independent conversion), voxel for voxel."""
    source = nib.load(str(shared(NORM_MGZ)))
    as_nifti = tmp_path / "norm.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(source.dataobj), source.affine), str(as_nifti))
    image, reference = read_image(shared(NORM_MGZ)), sitk.ReadImage(str(as_nifti))
    assert same_geometry(image, reference, tolerance=1e-6)
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reference))
    for index in [(0, 0, 0), (255, 0, 0), (17, 200, 93)]:
        ras = source.affine @ [*index, 1]
        assert np.allclose(image.TransformIndexToPhysicalPoint(index), [-ras[0], -ras[1], ras[2]], atol=1e-4)
    label = read_image(shared(ASEG_MGZ), what="label")
    assert same_geometry(label, image) and {2, 41, 17, 53} <= set(np.unique(sitk.GetArrayViewFromImage(label)))


@pytest.mark.parametrize("suffix", [".mgz", ".mgh"])
def test_a_label_written_as_mgh_keeps_the_inputs_affine(tmp_path, suffix):
    image = read_image(shared(ASEG_MGZ), what="label")
    cortex = sitk.Cast(sitk.BinaryThreshold(image, 3, 3) | sitk.BinaryThreshold(image, 42, 42), sitk.sitkUInt8)
    path = write_image(cortex, tmp_path / f"cortex{suffix}")
    written, source = nib.load(str(path)), nib.load(str(shared(ASEG_MGZ)))
    assert np.allclose(written.affine, source.affine, atol=1e-4) and written.shape == source.shape
    assert written.get_data_dtype() == np.uint8
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".mgz")
    assert np.array_equal(np.asanyarray(written.dataobj), sitk.GetArrayFromImage(cortex).T)
    assert same_geometry(read_image(path, what="label"), image, tolerance=1e-6)


def test_a_prediction_of_an_mgz_input_is_an_mgz_with_its_affine(deepbet, tmp_path):
    from PEFTAdaptLib.data.formats import prediction_name
    from PEFTAdaptLib.pipeline import predict_file

    assert ".mgz" in SUPPORTED_SUFFIXES and ".mgh" in SUPPORTED_SUFFIXES
    name = prediction_name("norm", shared(NORM_MGZ), set())
    assert name == "norm_seg.mgz"
    path, _ = predict_file(deepbet, [shared(NORM_MGZ)], tmp_path / name)
    written, source = nib.load(str(path)), nib.load(str(shared(NORM_MGZ)))
    assert isinstance(written, nib.MGHImage)
    assert np.allclose(written.affine, source.affine, atol=1e-4) and written.shape == source.shape
    # bert's skull-stripped FreeSurfer volume: deepbet's brain mask (1.0–2.0 litres at 1 mm³) lies inside it, and
    # lands there only if the geometry was carried over (a flipped axis would put it partly outside)
    mask = np.asanyarray(written.dataobj) == 1
    stripped = np.asanyarray(source.dataobj) > 0
    assert 1.0e6 < mask.sum() < 2.0e6
    assert (mask & stripped).sum() > 0.99 * mask.sum() and mask.sum() > 0.8 * stripped.sum()


def test_an_mgz_with_a_damaged_header_is_named(tmp_path):
    broken = tmp_path / "norm.mgz"
    broken.write_bytes(gzip.compress(b"\0" * 100))
    with pytest.raises(InputError, match="cannot read image|truncated") as error:
        read_image(broken)
    assert str(broken) in str(error.value)


# --- a folder given where an image file is expected -----------------------------------------------------------------


def test_a_folder_given_as_an_image_or_label_is_called_a_folder(tmp_path):
    """Not "file not found" (a folder named like an image) nor "unsupported file type" (a data folder; no folder,
    a DICOM series included, is an input we read)."""
    named, data_folder = tmp_path / "t2.nii.gz", shared(SPINE_T2).parent
    named.mkdir()
    for folder in (named, data_folder):
        with pytest.raises(InputError) as error:
            read_image(folder)
        assert str(error.value) == f"{folder}: is a folder, not an image file"
    with pytest.raises(InputError, match="t2.nii.gz: is a folder, not a label file$"):
        read_image(named, what="label")
    job = tmp_path / "job"
    assert cli_error("adapt", "--model", "deepbet-brain", "--train", str(data_folder), str(named), "--output",
                     str(job)) == f"peftadapt: error: {data_folder.resolve()}: is a folder, not an image file"
    assert cli_error("adapt", "--train", str(shared(SPINE_T2)), str(named), "--output",
                     str(job)) == f"peftadapt: error: {named}: is a folder, not a label file"
    assert not job.exists()
