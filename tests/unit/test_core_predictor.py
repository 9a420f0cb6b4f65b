"""HyGen latency predictor: fit, MAPE on held-back samples, budget inversion."""

import pytest

from duopool.core.perfmodel import PerfModel, ProfileSample
from duopool.core.predictor import LatencyPredictor, fit, load_profiles, profile_sim, save_profiles

pytestmark = pytest.mark.unit


def test_exact_linear_data_is_recovered():
    coef = (2.0, 0.01, 0.0005, 1e-7, 0.3, 0.02)
    pred = LatencyPredictor(coef)
    samples = []
    for sp, nd, cx in [(0, 10, 500), (512, 0, 0), (1024, 64, 1000), (4096, 8, 2000), (256, 200, 700),
                       (2048, 32, 300), (100, 1, 10), (3000, 128, 1500), (800, 16, 4000), (60, 250, 900)]:
        ch = ((sp, sp),) if sp else ()
        d = tuple([cx] * nd)
        s = ProfileSample(ch, d, 0)
        samples.append(ProfileSample(ch, d, pred.predict_sample_ms(s)))
    p = fit(samples, holdout=0.2)
    assert p.test_mape < 1e-6
    assert p.coef == pytest.approx(coef, rel=1e-4, abs=1e-9)


def test_fits_roofline_profiles_and_reports_holdout():
    pm = PerfModel.load("H100-SXM", "llama-3.1-8b")
    samples = profile_sim(pm, n=300, seed=1)
    p = fit(samples, holdout=0.25, seed=0)
    assert p.n_test == 75 and p.n_train == 225
    assert p.test_mape < 0.10  # the roofline's max() kinks are not linear; report, don't hide
    decode_only = fit(profile_sim(pm, n=200, kind="decode"))
    assert decode_only.test_mape < 0.005  # decode steps are linear in S_d and N_d on the roofline


def test_max_prefill_tokens_inverts_prediction():
    p = LatencyPredictor((5.0, 0.02, 1e-4, 2e-6, 0.5, 0.01))
    x = p.max_prefill_tokens(60.0, s_d=20000, n_p=1, n_d=50)
    assert p.predict_ms(x, 20000, 1, 50) <= 60.0 < p.predict_ms(x + 2, 20000, 1, 50)
    assert p.max_prefill_tokens(1.0, 20000, 1, 50) == 0


def test_profiles_roundtrip(tmp_path):
    pm = PerfModel.load("H100-SXM", "llama-3.1-8b")
    s = profile_sim(pm, n=5)
    save_profiles(tmp_path / "p.json", s, {"engine": "sim"})
    assert load_profiles(tmp_path / "p.json") == s
