"""Active learning with the model: the least-sure unlabelled image and slice, cached per version.

Runs first (file order), while every sample image is still unlabelled.
"""

from __future__ import annotations

import time


def test_uncertainty_picks_an_unlabelled_image_and_slice(citrusv_server):
    r = citrusv_server.post("/activelearning/citrusv_uncertainty", json={})
    assert r.status_code == 200, r.text
    pick = r.json()
    assert pick["id"] in {"chest_ct", "chest_xray"}
    if pick["id"] == "chest_ct":
        assert isinstance(pick["slice"], int) and 0 <= pick["slice"] < 133
    else:
        assert pick["slice"] is None
    assert 0.0 <= pick["score"] <= 1.0
    assert abs(pick["uncertainty"] - (1.0 - pick["score"])) < 1e-3
    assert "mask IoU" in pick["reason"]

    t0 = time.monotonic()
    again = citrusv_server.post("/activelearning/citrusv_uncertainty", json={}).json()
    assert (again["id"], again["slice"]) == (pick["id"], pick["slice"])
    assert time.monotonic() - t0 < 5, "scores are cached per model version"
