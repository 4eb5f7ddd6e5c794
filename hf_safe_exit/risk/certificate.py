"""``RiskCertificate``: what a risk-controlled threshold guarantees, for which model, data and decoding."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["RiskCertificate", "guarantee_text", "infeasible_message"]


@dataclass(frozen=True)
class RiskCertificate:
    """What was guaranteed, for which model and data. Grid lists are in ascending λ order.

    ``risk_bound`` is the quantity compared with ε at λ̂: R̂ (naive), n/(n+1)·R̂ + B/(n+1)
    (crc), the UCB (ucb), or the Hoeffding–Bentkus UCB at level δ (ltt, whose test itself
    uses ``p_value`` ≤ δ). ``feasible`` is False when no λ < 1 qualified (then λ̂ = 1).

    ``max_new_tokens`` / ``max_input_length``: the lengths the calibration decoded with (None if its
    losses did not record them). The guarantee is for outputs made the same way, so ``generate`` uses
    them by default and warns when a call departs from them.
    """

    eps: float
    delta: float | None
    method: str
    bound: str | None
    risk: str
    monotonize: str | None
    n: int
    threshold: float  # λ̂
    empirical_risk: float
    risk_bound: float
    p_value: float | None
    feasible: bool
    guarantee: str
    loss_bounds: tuple[float, float]
    grid: list[float] = field(default_factory=list)
    grid_empirical_risk: list[float] = field(default_factory=list)
    grid_statistic: list[float] = field(default_factory=list)
    model_fingerprint: str | None = None
    task: str | None = None
    measure: str | None = None
    max_new_tokens: int | None = None
    max_input_length: int | None = None

    def to_dict(self) -> dict:
        """The JSON form; λ̂ keeps the key ``lambda_hat`` that every stored calibration has (the file format)."""
        data = asdict(self)
        data["lambda_hat"] = data.pop("threshold")
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RiskCertificate":
        data = dict(data)
        data["threshold"] = data.pop("lambda_hat")
        data["loss_bounds"] = tuple(data["loss_bounds"])
        return cls(**data)


def guarantee_text(method: str, eps: float, delta: float | None, risk: str) -> str:
    """The guarantee of ``method`` at (ε, δ) in words, as a certificate states it."""
    if method == "crc":
        return f"E[{risk}(λ̂) on a new example] ≤ {eps:g}"
    if method in ("ucb", "ltt"):
        return f"P({risk} risk at λ̂ ≤ {eps:g}) ≥ {1 - delta:g}"
    return "none (naive empirical risk, for comparison only)"


def infeasible_message(method: str, eps: float, delta: float | None, sel, upper: float) -> str:
    """Why no λ < 1 passed the test of ``sel`` (a :class:`~hf_safe_exit.risk.selection.Selection`), and what λ̂ = 1
    means for decoding. ``upper``: the upper bound B of the losses (CRC's minimum ε is B/(n+1))."""
    compared = "its p-value" if method == "ltt" else "its risk bound"
    limit = f"δ = {delta:g}" if method == "ltt" else f"ε = {eps:g}"
    if not sel.passed[0]:  # the largest threshold, λ = 1 (the full model), already fails
        why = (f"n={sel.n} calibration examples are too few for this test: even at λ = 1, the full model, where the "
               f"empirical risk is {sel.empirical_risk[0]:.3g}, {compared} is {sel.statistic[0]:.3g} > {limit}; "
               "so no λ < 1 can pass either")
    else:
        why = (f"no λ < 1 passes the test with n={sel.n} calibration examples: at the largest, λ = "
               f"{sel.lambdas[1]:g}, the empirical risk is {sel.empirical_risk[1]:.3g} and {compared} "
               f"{sel.statistic[1]:.3g} > {limit}")
    crc = f" (CRC needs eps ≥ B/(n+1) = {upper / (sel.n + 1):.3g})" if method == "crc" else ""
    return (f"RiskControlled({method}, eps={eps:g}{'' if delta is None else f', delta={delta:g}'}): {why}. So "
            "λ̂ = 1: the model decodes at λ = 1, running every decoder layer for every token (it never exits early: "
            f"the full model's output, no speed-up). Raise eps (or delta), or calibrate on more examples{crc}.")
