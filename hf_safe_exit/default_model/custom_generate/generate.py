"""Early-exit decoding (CALM with risk control) for this checkpoint: https://pypi.org/project/hf_safe_exit

transformers runs this file when the model is loaded with `from_pretrained(..., trust_remote_code=True)`,
or called with `generate(..., custom_generate=<this repo>, trust_remote_code=True)`. It adds one keyword
to `generate`: `early_exit=hf_safe_exit.RiskControlled(eps=0.05)` (a threshold with a statistical
guarantee, fitted on the calibration stored under calibration/<task>/) or `hf_safe_exit.EarlyExit(...)`.
Without it (or with `early_exit=False`) `generate` is transformers' own.
"""

from hf_safe_exit.decoding.generate import model_generate as generate  # noqa: F401
