"""Neuron backend (AWS Trainium/Inferentia) via transformers-neuronx: an optional import, a stub here.

It cannot be installed or run on our machines, so this module only fails clearly. How it would map onto ``Engine``:

* load: ``LlamaForSampling.from_pretrained(model_dir, batch_size=slots, n_positions=max_context, tp_degree=N,
  amp=dtype)`` with a ``NeuronConfig`` for continuous batching (one batch row per slot), then
  ``enable_speculative_decoder(k, batch_sizes)`` to compile one graph per (gamma+1, batch) bucket and ``to_neuron()``.
* ``buckets()`` returns those compiled (batch, tokens) shapes; the target worker pads a tick's work up to one.
* ``forward(rows)``: ``speculative_forward(input_ids, cache_ids, start_ids, speculation_length)`` with
  ``start_ids`` = the rows' slots and ``cache_ids`` = per-row positions (length + arange): the same per-row
  positions our torch backend uses. Prefill chunks go through the context-encoding path (``forward`` with
  ``cache_ids``/``start_ids``).
* ``rollback``: a length change, as here; the next ``cache_ids`` overwrite stale entries.
"""
from __future__ import annotations

from pathlib import Path

from workers.engine.base import Engine, EngineError


def load_neuron_engine(model_dir: str | Path, slots: int = 8, max_context: int | None = None,
                       dtype: str = "bfloat16", **_: object) -> Engine:
    try:
        import transformers_neuronx  # noqa: F401
    except ImportError as exc:
        raise EngineError("the neuron backend needs transformers-neuronx (pip install 'specmq[neuron]' on a "
                          "Trainium/Inferentia host with the Neuron SDK index)") from exc
    raise EngineError("the neuron backend is not implemented yet (see workers/engine/neuron.py for the plan)")
