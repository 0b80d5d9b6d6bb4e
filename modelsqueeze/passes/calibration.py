"""What the calibrated passes share: load the calibration data once, capture each layer's input
Gram matrix H = XᵀX (or, with --sequential, the inputs produced by the already-compressed layers
before it, Xq, with the cross term C = XqᵀX), and hand each layer its canonical (K, N) view.

A layer that cannot be calibrated (subgraph, shared weight, grouped conv, ...) gets a note and the
pass's data-free treatment."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.model import WeightInfo


@dataclass
class LayerData:
    """One layer's calibration: its view (to_matrix/from_matrix), H = XqᵀXq and, sequentially, C = XqᵀX."""

    view: object
    H: np.ndarray
    C: np.ndarray | None = None
    rows: int = 0


@dataclass
class Calibrator:
    """Calibration of one pass run. `reference` is the model as the pass received it (the outputs
    to preserve); `current()` gives the model with the layers compressed so far."""

    path: Path
    reference: onnx.ModelProto
    sequential: bool
    damp: float
    max_rows: int = 20000
    arrays: dict = field(default_factory=dict)
    views: dict = field(default_factory=dict)
    _stats: dict = field(default_factory=dict)

    @classmethod
    def create(cls, config, model: onnx.ModelProto, infos: list[WeightInfo], notes: list[str]) -> "Calibrator | None":
        """None when the config asks for no calibration. Unsupported layers are noted and skipped."""
        path = getattr(config, "calibration", None)
        if path is None:
            return None
        from modelsqueeze import calibrate

        if not np.isfinite(config.damp) or config.damp < 0:
            raise ModelSqueezeError(f"--damp {config.damp}: must be 0 or more")
        cal = cls(Path(path), model, config.sequential, config.damp)
        cal.arrays = calibrate.load_calibration(cal.path)
        for info in infos:
            view = calibrate.layer_view(model, info)
            if isinstance(view, str):
                notes.append(f"{info.key}: {view}; not calibrated (data-free)")
            else:
                cal.views[info.key] = view
        if cal.views:  # the reference inputs of every layer (mask choice, notes; the fit when not sequential)
            stats = calibrate.capture(model, cal.arrays, list(cal.views.values()), max_rows=cal.max_rows)
            for key, s in stats.items():
                if np.isfinite(s.H).all():
                    cal._stats[key] = LayerData(cal.views[key], s.H, None, s.rows)
                else:  # the model's own activations overflow on this data
                    notes.append(f"{key}: its inputs on {cal.path.name} are not finite (the activations overflow); "
                                 f"not calibrated (data-free)")
                    del cal.views[key]
        return cal

    @property
    def samples(self) -> int:
        """How many calibration samples (the most any array holds along its first axis)."""
        from modelsqueeze.validate import sample_count_hint

        return sample_count_hint(self.arrays) if self.arrays else 0

    def covers(self, key: str) -> bool:
        return key in self.views

    def reference_layer(self, key: str) -> LayerData:
        """H of the layer's inputs in the reference model."""
        return self._stats[key]

    def layer(self, key: str, current: onnx.ModelProto | None = None) -> LayerData:
        """What the fit of `key` uses: the reference H, or with --sequential the inputs `current`
        (the model with the earlier layers already compressed) gives it, with C = XqᵀX."""
        if not self.sequential or current is None:
            return self._stats[key]
        from modelsqueeze import calibrate

        stats = calibrate.capture_pair(self.reference, current, self.arrays, [self.views[key]])[key]
        if not (np.isfinite(stats.H).all() and np.isfinite(stats.C).all()):  # fall back to the reference inputs
            return self._stats[key]
        return LayerData(self.views[key], stats.H, stats.C, stats.rows)

    def error(self, key: str, data: LayerData, w: np.ndarray, w2: np.ndarray) -> float:
        """Relative output error of weights `w2` against the layer's original outputs X·w, on the
        inputs the fit used: ||X w2 - X w||² / ||X w||², or sequentially ||Xq w2 - X w||² / ||X w||²."""
        from modelsqueeze.kernels.calibrated import relative_output_error

        H = self.reference_layer(key).H
        if data.C is None:
            return relative_output_error(w, w2, H)
        energy = float(np.sum(w * (H @ w)))
        if energy <= 0:
            return 0.0
        error = float(np.sum(w2 * (data.H @ w2)) - 2 * np.sum(w2 * (data.C @ w)) + energy)
        return max(error, 0.0) / energy

    def note(self, key: str, data: LayerData, w: np.ndarray, plain: np.ndarray, fitted: np.ndarray) -> str:
        """A note with the layer's relative output error: data-free result -> data-aware fit."""
        how = "sequential" if self.sequential else "calibrated"
        before, after = self.error(key, data, w, plain), self.error(key, data, w, fitted)
        return f"{key}: {how} output error {100 * before:.2f}% -> {100 * after:.2f}% of the layer's output energy"
