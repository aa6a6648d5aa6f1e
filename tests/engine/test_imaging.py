import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citrusv import InputError, imaging
from citrusv.imaging import FrameMap, smart_resize


def test_abdomen_window_values():
    hu = np.array([[40.0, -1000.0, -160.0, 240.0, 3000.0]])
    grey = imaging.to_rgb_uint8(hu, "abdomen")[..., 0]
    assert grey.tolist() == [[128, 0, 0, 255, 255]]


def test_lung_bone_and_explicit_windows():
    hu = np.array([[-600.0, 150.0, -1350.0]])
    assert imaging.to_rgb_uint8(hu, "lung")[0, :, 0].tolist() == [128, 255, 0]
    assert imaging.to_rgb_uint8(np.array([[400.0]]), "bone")[0, 0, 0] == 128
    assert imaging.to_rgb_uint8(np.array([[50.0]]), "soft_tissue")[0, 0, 0] == 128
    assert imaging.to_rgb_uint8(np.array([[10.0, 0.0]]), [10, 20])[0, :, 0].tolist() == [128, 0]


def test_percentile_scaling_and_monochrome1():
    mr = np.arange(1000, dtype=np.float32).reshape(20, 50)
    grey = imaging.to_rgb_uint8(mr)[..., 0]
    assert grey.min() == 0 and grey.max() == 255
    assert grey[10, 0] == 128  # value 500 between the 0.5 and 99.5 percentiles 5 and 994
    inverted = imaging.to_rgb_uint8(mr, photometric="MONOCHROME1")[..., 0]
    np.testing.assert_array_equal(inverted, 255 - grey)


def test_no_window_means_abdomen_for_hu_and_percentiles_otherwise():
    hu = np.array([[-1000.0, 40.0, 240.0]])
    np.testing.assert_array_equal(imaging.to_rgb_uint8(hu), imaging.to_rgb_uint8(hu, "abdomen"))
    mr = np.array([[0.0, 500.0, 1000.0]])
    assert imaging.to_rgb_uint8(mr, "auto")[0, :, 0].tolist() == [0, 128, 255]


def test_rgb_is_three_channel_uint8():
    rgb = imaging.to_rgb_uint8(np.zeros((4, 5)), "abdomen")
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8


def test_unknown_window_is_input_error():
    with pytest.raises(InputError, match="window"):
        imaging.to_rgb_uint8(np.zeros((4, 4)), "brain-ish")


@pytest.mark.parametrize("bad", [np.zeros(10), np.zeros((2, 3, 4, 5)),
                                 np.full((8, 8), np.nan), np.zeros((1, 9))])
def test_bad_images_raise_input_error(bad):
    with pytest.raises(InputError) as err:
        imaging.check_slice(bad)
    assert "image" in str(err.value)


def test_pixel_limit():
    with pytest.raises(InputError, match="over the limit"):
        imaging.check_slice(np.zeros((100, 100)), max_pixels=5000)


def test_smart_resize_matches_qwen_rule():
    assert smart_resize(512, 512, 28, 56 * 56, 28 * 28 * 1280) == (504, 504)
    h, w = smart_resize(4000, 3000, 28, 56 * 56, 28 * 28 * 1280)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 1280


@settings(max_examples=200, deadline=None)
@given(h=st.integers(28, 2000), w=st.integers(28, 2000), data=st.data())
def test_box_maps_to_frame_and_back_within_one_pixel(h, w, data):
    """A box drawn on the original goes to the model frame (rounded to integers, as the model
    writes it) and back within 1 px."""
    if max(h, w) / min(h, w) > 50:
        return
    out_h, out_w = smart_resize(h, w, 28, 56 * 56, 28 * 28 * 1280 * 4)
    fmap = FrameMap(h, w, out_h, out_w)
    x1 = data.draw(st.floats(0, w - 1))
    y1 = data.draw(st.floats(0, h - 1))
    x2 = data.draw(st.floats(x1, w))
    y2 = data.draw(st.floats(y1, h))
    frame = [round(v) for v in fmap.to_frame([x1, y1, x2, y2])]
    back = fmap.to_input(frame)
    assert max(abs(a - b) for a, b in zip(back, [x1, y1, x2, y2])) <= 1.0
    assert 0 <= back[0] <= back[2] <= w and 0 <= back[1] <= back[3] <= h
