import numpy as np
import pytest

from optimize.inputs.calibration import ImageOptions, load_samples
from optimize.errors import CalibrationError, InputSpecError
from optimize.inputs.specs import dynamic_spec, parse_input_shapes


def test_parse_input_shapes():
    assert parse_input_shapes(("1x3x8x8",), ["x"]) == [("x", (1, 3, 8, 8), "float32")]
    assert parse_input_shapes(("ids:2x16:int64", "mask:2x16:int64"), ["ids", "mask"]) == [
        ("ids", (2, 16), "int64"), ("mask", (2, 16), "int64")]
    with pytest.raises(InputSpecError, match="batch first"):
        parse_input_shapes(("1,3,8,8",), ["x"])
    with pytest.raises(InputSpecError, match="has no input 'y'"):
        parse_input_shapes(("y:1x3",), ["x"])
    with pytest.raises(InputSpecError, match="name each one"):
        parse_input_shapes(("1x3", "1x4"), ["a", "b"])


def test_shape_check_message():
    spec = dynamic_spec("pixels", (1, 3, 224, 224), "float32", sequence=False)
    with pytest.raises(InputSpecError) as info:
        spec.check(np.zeros((3, 224), np.float32), "request")
    assert str(info.value) == ("request: input 'pixels' has shape (3, 224) but the model expects "
                               "(N, 3, 224, 224) float32")


def test_npz_split_is_deterministic_and_disjoint(tmp_path):
    x = np.arange(100, dtype=np.float32).reshape(100, 1)
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(100))
    samples = load_samples(str(tmp_path / "d.npz"))
    assert samples.labels is not None and len(samples) == 100
    calib, held = samples.split(0.2)
    calib2, held2 = load_samples(str(tmp_path / "d.npz")).split(0.2)
    assert np.array_equal(held.arrays["x"], held2.arrays["x"]) and len(held) == 20
    assert not set(calib.arrays["x"].ravel()) & set(held.arrays["x"].ravel())
    assert np.array_equal(held.labels, held.arrays["x"].ravel().astype(int))


def test_npy_and_callable_sources(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((10, 3, 16, 16), np.float32))
    assert len(load_samples(str(tmp_path / "a.npy"))) == 10
    samples = load_samples("tests/tiny_models.py:calibration_batches")
    assert samples.arrays["x"].shape == (32, 3, 16, 16)


def test_conform_reports_missing_and_extra_inputs(tmp_path):
    np.savez(tmp_path / "d.npz", a=np.zeros((4, 2), np.float32), b=np.zeros((4, 2), np.float32))
    specs = [dynamic_spec("a", (1, 2), "float32", False), dynamic_spec("c", (1, 2), "float32", False)]
    with pytest.raises(CalibrationError, match=r"has no data for input\(s\) \['c'\] of the model's forward\(a, c\)"):
        load_samples(str(tmp_path / "d.npz")).conform(specs)


def test_image_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    for label, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 30), colour).save(tmp_path / label / f"{i}.png")
    samples = load_samples(str(tmp_path), ImageOptions(size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1)))
    x = samples.arrays["input"]
    assert x.shape == (6, 3, 8, 8)
    assert list(samples.labels) == [0, 0, 0, 1, 1, 1]
    assert np.allclose(x[0, 0], 1.0) and np.allclose(x[3, 2], 1.0) and np.allclose(x[0, 2], 0.0)


def test_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="contains no images"):
        load_samples(str(tmp_path / "empty"), ImageOptions(size=(8, 8)))
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(CalibrationError, match="corrupt or not a NumPy file"):
        load_samples(str(tmp_path / "bad.npz"))
    with pytest.raises(CalibrationError, match="does not exist"):
        load_samples(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "ragged.npz", a=np.zeros((4, 2)), b=np.zeros((5, 2)))
    with pytest.raises(CalibrationError, match="share their first"):
        load_samples(str(tmp_path / "ragged.npz"))
