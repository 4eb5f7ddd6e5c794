"""Shared fixtures."""

import sys

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded: the machine is shared, and tiny models run fastest on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _calibrated_length_warnings_afresh():
    """Every test starts with no calibrated-length warning shown: they are shown once per process, so a test that
    expects one would otherwise depend on which tests (in any file) ran before it."""
    module = sys.modules.get("hf_safe_exit.decoding.calibrated_lengths")  # not imported yet: nothing was shown
    if module is not None:
        module.clear_warned()
    yield


@pytest.fixture
def fresh_risk_cache():
    """Fits, stored calibrations and Hub lookups are cached per process (``hf_safe_exit.risk.clear_cache``): a test
    that writes or edits calibration files starts and ends with none of them cached."""
    from hf_safe_exit.risk import clear_cache

    clear_cache()
    yield
    clear_cache()
