"""Task metrics for corpus models whose float outputs' SNR is no measure of the task.

`swift_f0`'s `pitch` output (Hz) is arbitrary on unvoiced frames, where the model's `confidence`
is low: a one-bin change there costs the pitch output's SNR 10-20 dB while no user sees it (the
package calls a frame voiced when its confidence is at least 0.5). Its task metric is the share
of the frames the original calls voiced whose pitch stays within 50 cents (raw pitch accuracy
against the original) and the share of frames whose voicing decision is unchanged.

    OUTPUTS_NOT_SCORED_BY_SNR: {model id: {output name: why}}
    task_metrics(model_id, want_runs, got_runs) -> {metric: value in [0, 1]} (empty: none defined)
"""

from __future__ import annotations

import numpy as np

SWIFT_F0_VOICED = 0.5  # swift_f0.core: "a frame is voiced when its confidence is at least 0.5"
OUTPUTS_NOT_SCORED_BY_SNR = {
    "swift_f0": {"pitch": "pitch in Hz is arbitrary on unvoiced frames; scored by voiced pitch within 50 cents"},
}
# The floor every command's default must keep, per task metric.
TASK_FLOORS = {"voiced_pitch_within_50_cents": 0.99, "voicing_agreement": 0.99}


def task_metrics(model_id: str, want_runs: list[list[np.ndarray]], got_runs: list[list[np.ndarray]]) -> dict[str, float]:
    """Outputs per run as onnxruntime returns them, in the model's output order."""
    if model_id != "swift_f0":
        return {}
    pitch0 = np.concatenate([r[0].reshape(-1) for r in want_runs]).astype(np.float64)
    conf0 = np.concatenate([r[1].reshape(-1) for r in want_runs]).astype(np.float64)
    pitch = np.concatenate([r[0].reshape(-1) for r in got_runs]).astype(np.float64)
    conf = np.concatenate([r[1].reshape(-1) for r in got_runs]).astype(np.float64)
    voiced = conf0 >= SWIFT_F0_VOICED
    with np.errstate(divide="ignore", invalid="ignore"):
        cents = 1200 * np.abs(np.log2(pitch / pitch0))
    within = np.isfinite(cents) & (cents < 50)
    return {"voiced_pitch_within_50_cents": float(within[voiced].mean()) if voiced.any() else 1.0,
            "voicing_agreement": float(((conf >= SWIFT_F0_VOICED) == voiced).mean())}
