"""The export's plots say which images measured the fidelity they draw."""

from __future__ import annotations

from snapvit_lightning.report import _fidelity_figure, measured_on

ENTRIES = [{"flops_fraction": 0.7, "fidelity": 0.6, "fidelity_corrected": 0.9, "label": "a"},
           {"flops_fraction": 0.5, "fidelity": 0.3, "fidelity_corrected": 0.8, "label": "b"}]


def test_measured_on_names_in_sample_images() -> None:
    in_sample = {"fidelity_images": 14, "correction": {"fidelity_images_are_calibration_images": True}}
    assert measured_on(in_sample).startswith("on its 14 calibration images (in-sample")
    assert measured_on({"fidelity_images": 14, "correction": None}) == "on 14 images"
    assert measured_on({"fidelity_images": 9, "correction": {"fidelity_images_are_calibration_images": False}}) == "on 9 images"
    assert measured_on({"fidelity_images": None, "correction": None}) == ""


def test_fidelity_plot_title_carries_the_images() -> None:
    fig = _fidelity_figure(ENTRIES, "m", measured_on({"fidelity_images": 14, "correction": None}))
    assert fig.axes[0].get_title() == "m\non 14 images"
    assert _fidelity_figure(ENTRIES, "m").axes[0].get_title() == "m"
