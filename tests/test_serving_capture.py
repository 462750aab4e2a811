"""Workers capture their CUDA graphs before serving (``workers.serving.capture_graphs``)."""
from __future__ import annotations

from workers.serving import capture_graphs


class FakeGraphEngine:
    def __init__(self, graphs: bool) -> None:
        self.graphs = graphs
        self.calls: list[tuple[int, int]] = []

    def default_shapes(self) -> list[tuple[int, int, int]]:
        return [(b, t, 64) for b in (1, 2, 4) for t in (1, 5, 9, 12)]

    def capture(self, shapes=None, progress=None) -> int:
        todo = self.default_shapes() if shapes is None else shapes
        for i in range(len(todo)):
            self.calls.append((i + 1, len(todo)))
            if progress:
                progress(i + 1, len(todo))
        return len(todo)


def test_capture_graphs_captures_every_default_shape_with_progress():
    eng = FakeGraphEngine(graphs=True)
    assert capture_graphs(eng, "target model") == 12
    assert eng.calls[-1] == (12, 12) and len(eng.calls) == 12


def test_capture_graphs_skips_engines_without_graphs():
    eng = FakeGraphEngine(graphs=False)
    assert capture_graphs(eng) == 0 and eng.calls == []
    assert capture_graphs(object()) == 0  # an eager engine (no capture at all)
