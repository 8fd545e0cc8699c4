"""The converters, on small files that the tests write in each real format."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd as xsd
import nibabel as nib
import numpy as np
import pytest
import torch

from mri.cli import main
from mri.data import DataFormatError, inspect_slices, read_slices
from mri.data._backend import sense_combine
from mri.data.convert import convert_fastmri, convert_mridata, convert_nifti
from mri.data.phantoms import random_phantom, smooth_phase
from mri.data.simulate import coil_maps
from mri.fft import fftc, ifftc

REPO = Path(__file__).resolve().parents[3]
FAST_JSENSE = {"mps_ker_width": 6, "max_iter": 5}


def _complex_volume(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    magnitude = torch.from_numpy(random_phantom(shape, rng)).float()
    phase = torch.from_numpy(smooth_phase(shape, rng, 1.0))
    return (magnitude * torch.exp(1j * phase)).to(torch.complex64)


def _psnr_up_to_scale(got: torch.Tensor, ref: torch.Tensor, where: torch.Tensor) -> float:
    """PSNR of |got| against |ref| on ``where``, after the best global scale of |got|."""
    got, ref = got.abs()[where], ref.abs()[where]
    scale = (got * ref).sum() / got.square().sum()
    rmse = (scale * got - ref).square().mean().sqrt()
    return float(20 * torch.log10(ref.max() / rmse))


# --------------------------------------------------------------------------------------------
# mridata.org ISMRMRD


def _limit(n: int) -> xsd.limitType:
    return xsd.limitType(minimum=0, maximum=n - 1, center=n // 2)


def _ismrmrd_header(nx: int, ny: int, nz: int, coils: int, *, limits_z: bool = True) -> str:
    space = xsd.encodingSpaceType(
        matrixSize=xsd.matrixSizeType(x=nx, y=ny, z=nz),
        fieldOfView_mm=xsd.fieldOfViewMm(x=nx, y=ny, z=nz),
    )
    limits = xsd.encodingLimitsType(
        kspace_encoding_step_1=_limit(ny),
        kspace_encoding_step_2=_limit(nz) if limits_z else None,
    )
    header = xsd.ismrmrdHeader(
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=63_860_000),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(receiverChannels=coils),
        encoding=[
            xsd.encodingType(
                encodedSpace=space,
                reconSpace=space,
                encodingLimits=limits,
                trajectory=xsd.trajectoryType.CARTESIAN,
            )
        ],
    )
    return header.toXML("utf-8")


def _write_ismrmrd(
    path: Path, kspace: np.ndarray, *, skip: tuple[int, int] | None = None, limits_z: bool = True
) -> None:
    """An ISMRMRD file as mridata.org publishes 3D FSE knees: one readout per (ky, kz).

    Written with the ``ismrmrd`` package, so the converter's chunked reader is checked against
    the reference writer's record layout and flags."""
    coils, nx, ny, nz = kspace.shape
    dset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    dset.write_xml_header(_ismrmrd_header(nx, ny, nz, coils, limits_z=limits_z))
    # A noise pre-scan comes first in scanner files; it must not land on the grid.
    noise = ismrmrd.Acquisition.from_array(np.full((coils, nx), 1e3, dtype=np.complex64))
    noise.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    dset.append_acquisition(noise)
    for kz in range(nz):
        for ky in range(ny):
            if (ky, kz) == skip:
                continue
            acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(kspace[:, :, ky, kz]))
            acq.idx.kspace_encode_step_1 = ky
            acq.idx.kspace_encode_step_2 = kz
            dset.append_acquisition(acq)
    dset.close()


@pytest.fixture(scope="module")
def knee3d(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A small 3D "knee": (path, complex volume (x, y, z), maps (C, x, y, z))."""
    shape = (6, 16, 16)
    volume = _complex_volume(shape, seed=3)
    maps = coil_maps(shape, 4, "3d")
    kspace = fftc(maps * volume, dims=(1, 2, 3))
    path = tmp_path_factory.mktemp("mridata") / "knee.h5"
    _write_ismrmrd(path, kspace.numpy())
    return path, volume, maps


def test_convert_mridata_places_acquisitions_and_recovers_the_phantom(knee3d, tmp_path):
    path, volume, maps = knee3d
    (out,) = convert_mridata(path, tmp_path, calib=12, jsense_kwargs=FAST_JSENSE)
    assert out == tmp_path / "knee.h5"
    data = read_slices(out)
    assert data.info.kind == "2d"
    assert tuple(data.kspace.shape) == (6, 4, 16, 16)  # (x slices, coils, ky, kz)
    # Every x slice's k-space is the 2D transform over (y, z) of that slice's coil images.
    expected = fftc(maps * volume, dims=(2, 3)).transpose(0, 1)
    assert torch.allclose(data.kspace, expected, atol=1e-4 * float(expected.abs().max()))
    signal = volume.abs() > 0.05 * float(volume.abs().max())
    assert _psnr_up_to_scale(data.target, volume, signal) > 40.0
    provenance = data.info.provenance
    assert provenance["converter"] == "mri.data.convert.convert_mridata"
    assert provenance["source"] == str(path.resolve())
    assert provenance["parameters"]["calib"] == 12
    assert provenance["parameters"]["jsense_kwargs"] == FAST_JSENSE


def test_convert_mridata_keeps_only_the_chosen_slices(knee3d, tmp_path):
    path, _, _ = knee3d
    (out,) = convert_mridata(path, tmp_path, calib=12, slices=[1, 4], jsense_kwargs=FAST_JSENSE)
    info = inspect_slices(out)
    assert info.num_slices == 2
    assert info.provenance["parameters"]["slices"] == [1, 4]


def test_convert_mridata_recentres_kspace_from_the_header(tmp_path):
    # A header centre off n // 2 means k-space must be rolled so masks calibrate at the centre.
    shape = (4, 16, 16)
    maps, volume = coil_maps(shape, 2, "3d"), _complex_volume(shape, 5)
    kspace = fftc(maps * volume, dims=(1, 2, 3)).numpy()
    shifted = np.roll(kspace, -3, axis=2)  # the centre now sits at ky = 5
    dset_path = tmp_path / "off.h5"
    _write_ismrmrd(dset_path, shifted)
    with h5py.File(dset_path, "r+") as f:
        xml = f["dataset/xml"][0]
        xml = xml.decode() if isinstance(xml, bytes) else xml
        fixed = xml.replace("<center>8</center>", "<center>5</center>", 1)
        assert fixed != xml
        del f["dataset/xml"]
    dset = ismrmrd.Dataset(str(dset_path), "dataset", create_if_needed=False)
    dset.write_xml_header(fixed)
    dset.close()
    (out,) = convert_mridata(dset_path, tmp_path / "out", calib=8, jsense_kwargs=FAST_JSENSE)
    centred = fftc(maps * volume, dims=(2, 3)).transpose(0, 1)
    assert torch.allclose(read_slices(out).kspace, centred, atol=1e-4 * float(centred.abs().max()))
    assert read_slices(out).info.provenance["parameters"]["roll_ky_kz"] == [3, 0]


def test_convert_mridata_errors_name_the_file_and_problem(tmp_path):
    with pytest.raises(DataFormatError, match=r"missing\.h5: file does not exist"):
        convert_mridata(tmp_path / "missing.h5", tmp_path / "out")
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(DataFormatError, match=r"notes\.h5: cannot be opened as HDF5"):
        convert_mridata(text, tmp_path / "out")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["kspace"] = np.zeros((2, 2), np.complex64)
    with pytest.raises(DataFormatError, match=r"plain\.h5: not an ISMRMRD file.*\['kspace'\]"):
        convert_mridata(plain, tmp_path / "out")
    kspace = np.ones((2, 4, 8, 8), np.complex64)
    no_kz = tmp_path / "no_kz.h5"
    _write_ismrmrd(no_kz, kspace, limits_z=False)
    with pytest.raises(DataFormatError, match=r"no_kz\.h5: .*lacks .*kspace_encoding_step_2"):
        convert_mridata(no_kz, tmp_path / "out")
    holey = tmp_path / "holey.h5"
    _write_ismrmrd(holey, kspace, skip=(3, 2))
    with pytest.raises(DataFormatError, match=r"holey\.h5: 1 of 64 .* never acquired"):
        convert_mridata(holey, tmp_path / "out")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(DataFormatError, match=r"empty_dir: folder holds no ISMRMRD"):
        convert_mridata(empty, tmp_path / "out")


def test_convert_mridata_rejects_bad_arguments(knee3d, tmp_path):
    path, _, _ = knee3d
    with pytest.raises(ValueError, match=r"calib must be an int >= 4, got 2"):
        convert_mridata(path, tmp_path, calib=2)
    with pytest.raises(ValueError, match=r"unknown keys \['ksp_calib_width'\]; valid keys"):
        convert_mridata(path, tmp_path, jsense_kwargs={"ksp_calib_width": 8})
    with pytest.raises(ValueError, match=r"slices \[9\] out of range; valid are 0..5"):
        convert_mridata(path, tmp_path, calib=12, slices=[9], jsense_kwargs=FAST_JSENSE)


# --------------------------------------------------------------------------------------------
# fastMRI multicoil h5

_FASTMRI_HEADER = """<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
 <encoding>
  <encodedSpace><matrixSize><x>{H}</x><y>{W}</y><z>1</z></matrixSize></encodedSpace>
  <reconSpace><matrixSize><x>{h}</x><y>{h}</y><z>1</z></matrixSize></reconSpace>
 </encoding>
</ismrmrdHeader>"""


def _write_fastmri(path: Path, kspace: np.ndarray, recon_x: int, **extra: np.ndarray) -> None:
    """A file laid out as fastMRI publishes multicoil train/val data."""
    height, width = kspace.shape[-2:]
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace)
        header = _FASTMRI_HEADER.format(H=height, W=width, h=recon_x)
        f.create_dataset("ismrmrd_header", data=np.bytes_(header.encode()))
        f.create_dataset(
            "reconstruction_rss", data=np.zeros((kspace.shape[0], recon_x, recon_x), np.float32)
        )
        for key, value in extra.items():
            f.create_dataset(key, data=value)
        f.attrs["acquisition"] = "CORPD_FBK"
        f.attrs["max"] = 1.0
        f.attrs["norm"] = 1.0
        f.attrs["patient_id"] = "test"


@pytest.fixture(scope="module")
def fastmri_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """(path, images (slices, 48, 24)): the object fills the central 24 of the 48 readout rows,
    as oversampling leaves it in real files."""
    images = torch.zeros(2, 48, 24, dtype=torch.complex64)
    for s in range(2):
        images[s, 12:36] = _complex_volume((24, 24), seed=10 + s)
    maps = coil_maps((48, 24), 4, "2d")
    kspace = fftc(maps * images[:, None], dims=(-2, -1))
    path = tmp_path_factory.mktemp("fastmri") / "file1000000.h5"
    _write_fastmri(path, kspace.numpy(), recon_x=24)
    return path, images


def test_convert_fastmri_crops_the_readout_and_recovers_the_images(fastmri_file, tmp_path):
    path, images = fastmri_file
    (out,) = convert_fastmri(path, tmp_path, calib_width=12)
    data = read_slices(out)
    assert tuple(data.kspace.shape) == (2, 4, 24, 24)
    assert tuple(data.maps.shape) == (2, 4, 24, 24)
    reference = images[:, 12:36]
    signal = reference.abs() > 0.05
    assert _psnr_up_to_scale(data.target, reference, signal) > 30.0
    parameters = data.info.provenance["parameters"]
    assert parameters["readout_cropped_to"] == 24
    assert parameters["acquisition"] == "CORPD_FBK"
    assert data.info.provenance["converter"] == "mri.data.convert.convert_fastmri"


def test_convert_fastmri_without_crop_keeps_the_oversampled_readout(fastmri_file, tmp_path):
    path, images = fastmri_file
    (out,) = convert_fastmri(path, tmp_path, calib_width=12, crop_readout=False, slices=[1])
    data = read_slices(out)
    assert tuple(data.kspace.shape) == (1, 4, 48, 24)
    signal = images[1:].abs() > 0.05
    assert _psnr_up_to_scale(data.target, images[1:], signal) > 30.0
    assert data.info.provenance["parameters"]["readout_cropped_to"] is None


def test_convert_fastmri_errors_name_the_file_and_problem(fastmri_file, tmp_path):
    with pytest.raises(DataFormatError, match=r"nope\.h5: file does not exist"):
        convert_fastmri(tmp_path / "nope.h5", tmp_path / "out")
    no_header = tmp_path / "no_header.h5"
    with h5py.File(no_header, "w") as f:
        f["kspace"] = np.zeros((1, 2, 16, 16), np.complex64)
    with pytest.raises(DataFormatError, match=r"no_header\.h5: missing key 'ismrmrd_header'"):
        convert_fastmri(no_header, tmp_path / "out")
    single = tmp_path / "single.h5"
    with h5py.File(single, "w") as f:
        f["kspace"] = np.zeros((1, 16, 16), np.complex64)
        f["ismrmrd_header"] = np.bytes_(b"<x/>")
    with pytest.raises(DataFormatError, match=r"single\.h5: 'kspace' must be complex64.*\(1, 16"):
        convert_fastmri(single, tmp_path / "out")
    test_file = tmp_path / "test_file.h5"
    _write_fastmri(test_file, np.ones((1, 2, 32, 16), np.complex64), 16, mask=np.ones(16, bool))
    with pytest.raises(DataFormatError, match=r"test_file\.h5: has a 'mask'.*undersampled"):
        convert_fastmri(test_file, tmp_path / "out")
    with pytest.raises(ValueError, match=r"espirit_kwargs: unknown keys \['calib'\]"):
        convert_fastmri(fastmri_file[0], tmp_path / "out", espirit_kwargs={"calib": 3})


# --------------------------------------------------------------------------------------------
# NIfTI magnitude volumes


def _write_nifti(path: Path, volume: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(volume, affine=np.eye(4)), str(path))


def test_convert_nifti_target_magnitude_is_the_normalised_slice(tmp_path):
    rng = np.random.default_rng(0)
    slices = [random_phantom((20, 16), rng) for _ in range(3)]
    volume = (np.stack(slices, axis=-1) * 250.0).astype(np.float32)
    src = tmp_path / "brain.nii.gz"
    _write_nifti(src, volume)
    (out,) = convert_nifti(src, tmp_path / "out", num_coils=3, noise_std=0.0)
    assert out.name == "brain.h5"
    data = read_slices(out)
    assert tuple(data.kspace.shape) == (3, 3, 20, 16)  # slices along the last axis
    expected = torch.from_numpy(np.moveaxis(volume / volume.max(), -1, 0))
    assert torch.allclose(data.target.abs(), expected, atol=1e-5)
    # Noise-free k-space combines back to the target exactly (unit-RSS maps).
    combined = sense_combine(data.kspace, data.maps, "2d")
    assert torch.allclose(combined, data.target, atol=1e-5)
    assert data.info.provenance["parameters"]["scale"] == pytest.approx(float(volume.max()))


def test_convert_nifti_is_deterministic_per_seed_and_slices_along_the_axis(tmp_path):
    volume = np.random.default_rng(1).random((12, 10, 9)).astype(np.float32)
    src = tmp_path / "vol.nii"
    _write_nifti(src, volume)
    a = read_slices(convert_nifti(src, tmp_path / "a", num_coils=2, slice_axis=0, seed=4)[0])
    b = read_slices(convert_nifti(src, tmp_path / "b", num_coils=2, slice_axis=0, seed=4)[0])
    c = read_slices(convert_nifti(src, tmp_path / "c", num_coils=2, slice_axis=0, seed=5)[0])
    assert tuple(a.kspace.shape) == (12, 2, 10, 9)
    assert torch.equal(a.kspace, b.kspace)
    assert not torch.equal(a.kspace, c.kspace)


def test_convert_nifti_errors_name_the_file_and_problem(tmp_path):
    with pytest.raises(DataFormatError, match=r"gone\.nii: file does not exist"):
        convert_nifti(tmp_path / "gone.nii", tmp_path / "out")
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"\x00" * 40)
    with pytest.raises(DataFormatError, match=r"junk\.nii: cannot be read as NIfTI"):
        convert_nifti(junk, tmp_path / "out")
    series = tmp_path / "series.nii"
    _write_nifti(series, np.ones((8, 8, 8, 2), np.float32))
    with pytest.raises(DataFormatError, match=r"series\.nii: volume has shape \(8, 8, 8, 2\)"):
        convert_nifti(series, tmp_path / "out")
    thin = tmp_path / "thin.nii"
    _write_nifti(thin, np.ones((4, 16, 16), np.float32))
    with pytest.raises(DataFormatError, match=r"thin\.nii: slices along axis 1 are \(4, 16\)"):
        convert_nifti(thin, tmp_path / "out", slice_axis=1)
    with pytest.raises(ValueError, match=r"slice_axis must be an int in \[-3, 2\].*got 3"):
        convert_nifti(thin, tmp_path / "out", slice_axis=3)
    with pytest.raises(ValueError, match=r"num_coils must be an int >= 1, got 0"):
        convert_nifti(thin, tmp_path / "out", num_coils=0)


def test_cli_prepare_nifti_writes_slice_files(tmp_path):
    src = tmp_path / "head.nii.gz"
    _write_nifti(src, np.random.default_rng(2).random((16, 16, 2)).astype(np.float32))
    out = tmp_path / "prepared"
    run = subprocess.run(
        [sys.executable, "-m", "mri", "prepare", "nifti", str(src), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "wrote 1 file(s)" in run.stdout
    info = inspect_slices(out / "head.h5")
    assert (info.kind, info.num_slices, info.num_coils) == ("2d", 2, 8)


def test_cli_prepare_reports_a_missing_source_in_one_line(tmp_path, capsys):
    gone = tmp_path / "x.nii"
    assert main(["prepare", "nifti", str(gone), "--out", str(tmp_path / "out")]) == 2
    assert (
        capsys.readouterr().err.strip() == f"error: {gone}: file does not exist (expected a "
        "NIfTI (.nii, .nii.gz) file or a folder)"
    )


# The XML header of the Stanford 3D FSE knees on mridata.org, with the values all 19 files of
# the GLEAM paper carry (per the official GLEAM repository's metadata table): matrixSize z 1,
# kspace_encoding_step_2 0..1 and 256 partitions as `slice`, stored in hybrid space.
MRIDATA_KNEE_HEADER = """<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <experimentalConditions><H1resonanceFrequency_Hz>127000000</H1resonanceFrequency_Hz></experimentalConditions>
  <acquisitionSystemInformation><systemVendor>GE MEDICAL SYSTEMS</systemVendor><receiverChannels>8</receiverChannels></acquisitionSystemInformation>
  <encoding>
    <encodedSpace><matrixSize><x>320</x><y>320</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>160</x><y>160</y><z>153.6</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>512</x><y>512</y><z>256</z></matrixSize>
      <fieldOfView_mm><x>160</x><y>160</y><z>153.6</z></fieldOfView_mm></reconSpace>
    <encodingLimits>
      <kspace_encoding_step_1><minimum>0</minimum><maximum>320</maximum><center>160</center></kspace_encoding_step_1>
      <kspace_encoding_step_2><minimum>0</minimum><maximum>1</maximum><center>0</center></kspace_encoding_step_2>
      <slice><minimum>0</minimum><maximum>255</maximum><center>128</center></slice>
    </encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
</ismrmrdHeader>"""  # noqa: E501


def _write_hybrid_ismrmrd(path: Path, header: str, kspace: np.ndarray) -> None:
    """Write centered k-space ``(C, kx, ky, kz)`` the way the mridata.org knees store it.

    Every partition is a ``slice`` in hybrid space: the scanner's uncentred inverse FFT over kz,
    which equals the centered one times ``(-1)^z``. Records go straight into the standard
    acquisition table (the ``ismrmrd`` package's dtype) in one call, since the package's
    one-record writer would take minutes for the 81,920 readouts of a real-sized file.
    """
    coils, nx, ny, nz = kspace.shape
    hybrid = ifftc(torch.from_numpy(kspace), dims=(-1,)).numpy()
    hybrid *= np.where(np.arange(nz) % 2 == 0, 1, -1).astype(np.float32)
    dset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    dset.write_xml_header(header)
    dset.close()
    records = np.zeros(ny * nz, dtype=ismrmrd.hdf5.acquisition_dtype)
    head = records["head"]
    head["version"] = 1
    head["number_of_samples"] = nx
    head["active_channels"] = coils
    head["available_channels"] = coils
    z, y = np.divmod(np.arange(ny * nz), ny)
    head["idx"]["kspace_encode_step_1"] = y
    head["idx"]["slice"] = z
    # Acquisition data are (coils, samples), interleaved (re, im) float32.
    lines = np.ascontiguousarray(hybrid.transpose(3, 2, 0, 1)).reshape(ny * nz, -1)
    for i in range(ny * nz):
        records["data"][i] = lines[i].view(np.float32)
        records["traj"][i] = np.zeros(0, np.float32)
    with h5py.File(path, "a") as f:
        f["dataset"].create_dataset("data", data=records, maxshape=(None,))


def test_convert_mridata_reads_the_hybrid_slice_layout_of_the_mridata_knees(tmp_path):
    # The real header, with data of its full phase-encode size (320 ky x 256 partitions, 8 coils)
    # and a short readout so the test stays small: the layout is found from the header, and the
    # partitions come back to centered kz k-space of the object.
    nx, ny, nz = 4, 320, 256
    volume = _complex_volume((nx, ny, nz), seed=11)
    maps = coil_maps((nx, ny, nz), 8, "3d")
    kspace = fftc(maps * volume, dims=(1, 2, 3))
    path = tmp_path / "52c2fd53.h5"
    _write_hybrid_ismrmrd(path, MRIDATA_KNEE_HEADER, kspace.numpy())
    (out,) = convert_mridata(
        path, tmp_path / "out", calib=12, slices=[1, 2], jsense_kwargs=FAST_JSENSE
    )
    data = read_slices(out)
    assert tuple(data.kspace.shape) == (2, 8, ny, nz)
    expected = fftc(maps * volume, dims=(2, 3)).transpose(0, 1)[1:3]
    assert torch.allclose(data.kspace, expected, atol=1e-4 * float(expected.abs().max()))
    # The kz zero frequency sits at nz // 2, where the masks put their calibration region.
    energy = data.kspace.abs().square().sum(dim=(0, 1, 2))
    assert int(energy.argmax()) == nz // 2
    parameters = data.info.provenance["parameters"]
    assert parameters["layout"] == "slice_hybrid"
    assert parameters["matrix"] == [320, ny, nz]


def test_hybrid_slices_written_record_by_record_with_ismrmrd_convert_like_kz_encodes(tmp_path):
    # The same small volume in both layouts, the hybrid one written by the ismrmrd package's
    # own record writer (header by its xsd classes): both give the same slices.
    shape = (4, 16, 16)
    maps, volume = coil_maps(shape, 2, "3d"), _complex_volume(shape, 7)
    kspace = fftc(maps * volume, dims=(1, 2, 3)).numpy()
    hybrid = ifftc(torch.from_numpy(kspace), dims=(-1,)).numpy() * np.where(
        np.arange(16) % 2 == 0, 1, -1
    ).astype(np.float32)
    header = xsd.CreateFromDocument(_ismrmrd_header(4, 16, 16, 2))
    limits = header.encoding[0].encodingLimits
    limits.kspace_encoding_step_2 = xsd.limitType(minimum=0, maximum=0, center=0)
    limits.slice = xsd.limitType(minimum=0, maximum=15, center=8)
    header.encoding[0].encodedSpace.matrixSize.z = 1
    path = tmp_path / "hybrid.h5"
    dset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    dset.write_xml_header(header.toXML("utf-8"))
    for z in range(16):
        for ky in range(16):
            acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(hybrid[:, :, ky, z]))
            acq.idx.kspace_encode_step_1 = ky
            acq.idx.slice = z
            dset.append_acquisition(acq)
    dset.close()
    reference = tmp_path / "kz.h5"
    _write_ismrmrd(reference, kspace)
    (got,) = convert_mridata(path, tmp_path / "a", calib=8, jsense_kwargs=FAST_JSENSE)
    (want,) = convert_mridata(reference, tmp_path / "b", calib=8, jsense_kwargs=FAST_JSENSE)
    a, b = read_slices(got).kspace, read_slices(want).kspace
    assert torch.allclose(a, b, atol=1e-4 * float(b.abs().max()))


def test_convert_mridata_refuses_a_header_with_both_kz_encodes_and_slices(tmp_path):
    both = MRIDATA_KNEE_HEADER.replace("<z>1</z></matrixSize>", "<z>16</z></matrixSize>", 1)
    path = tmp_path / "slab.h5"
    _write_hybrid_ismrmrd(path, both, np.ones((8, 2, 8, 8), np.complex64))
    with pytest.raises(
        DataFormatError, match=r"slab\.h5: header declares both 16 kz .* 256 slices"
    ):
        convert_mridata(path, tmp_path / "out")
